"""Checkpoint reading and strict, memory-lean loading.

Formats: a torch `.pth/.pt/.bin/.ckpt` file (zip archives read lazily by `torchzip.read_torch_zip`,
anything else with `torch.load(weights_only=True, mmap=True)`, so no code in a pickle is ever
executed and tensors stay on disk until used), a `.safetensors`
file, a folder of sharded safetensors with a `*.safetensors.index.json`, or an in-memory state dict.
Safetensors are read lazily: `read_checkpoint` returns a `LazyStateDict` that knows every key's
shape and dtype from the file headers and reads a tensor only when it is indexed (nothing cached).

Models are built on the `meta` device and then materialised tensor by tensor from the (memory
mapped or lazy) checkpoint in the target dtype and device, so at most one source tensor is in RAM
at a time and the full-precision checkpoint is never held in RAM or VRAM. Coverage: missing or
shape-mismatched keys raise `CheckpointError` naming the file; unexpected keys (e.g. training
leftovers: upstream loads NSARM.pth with strict=False) are ignored with one `UnexpectedKeysWarning`
naming how many and the first few, or refused with `strict=True`. Every floating-point tensor is
checked for NaN / inf as it is read (after its dtype conversion, before any post-processing such
as quantisation), so a damaged file is refused naming the file and the key, without a second pass.

`write_safetensors` streams tensors into a .safetensors file one at a time (the header is computed
from shapes first), atomically (temporary file + os.replace).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
MAX_LISTED_KEYS = 8

StateDict = dict[str, torch.Tensor]
Source = "str | os.PathLike | Mapping[str, torch.Tensor]"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: wrong kind, unreadable, or keys that do not fit."""


class UnexpectedKeysWarning(UserWarning):
    """A checkpoint holds tensors the model does not use; they were ignored (strict=False)."""


def describe(src) -> str:
    return str(src) if isinstance(src, (str, os.PathLike)) else "<state dict>"


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip format
PICKLE_PROTO = 0x80  # first byte of a pickle (the legacy torch.save format)
HTML_STARTS = (b"<!doctype", b"<html", b"<head")


def _error_detail(exc: BaseException) -> str:
    """The informative line of an exception message (torch's unpickling errors run over 10 lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line
    return lines[0] if lines else type(exc).__name__


def _read_torch(path: Path) -> object:
    """A torch.save file read with weights_only=True (memory-mapped when the format allows): no code
    in it is ever executed. Every way the file can be wrong is a CheckpointError naming it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes): the download or copy did not finish; "
                              "download it again")
    if head.lstrip().lower().startswith(HTML_STARTS):
        raise CheckpointError(f"{path}: this is a web page, not a checkpoint (a download link answered with "
                              "HTML, e.g. a sign-in or virus-scan page); download the file itself")
    if not (head.startswith(ZIP_MAGIC) or head[0] == PICKLE_PROTO):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save files are zip archives or pickles; "
                              f"this one starts with {head[:8]!r}); check that it is the right file")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) serialisation cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _error_detail(e)
        if "GLOBAL" in detail:
            raise CheckpointError(
                f"{path}: refusing to load: the file needs arbitrary code execution to unpickle "
                f"(only plain tensors and containers are allowed). Use the official weights, or convert "
                f"a trusted copy to .safetensors. Detail: {detail}"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (damaged, or not made by torch.save); "
                              f"download it again. Detail: {detail}") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse a user's file means a bad file
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt download?). "
            f"Re-download it and compare its size/md5 with the source. Detail: {type(e).__name__}: {_error_detail(e)}"
        ) from None


# safetensors dtype names <-> torch dtypes (the subset torch can hold).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class LazyEntry:
    """One tensor of a lazy state dict: how to read it, and its shape / dtype without reading."""

    load: Callable[[], torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: Iterable[int] | None = None) -> LazyEntry:
        """An entry reading `fn(this tensor)`; `shape` is the result's shape (default: unchanged)."""
        load = self.load
        return LazyEntry(lambda: fn(load()), tuple(self.shape if shape is None else shape), self.dtype)


class LazyStateDict(Mapping):
    """A read-only state dict whose tensors are read on access (`sd[key]`), one at a time, and never
    cached; `shape(key)` / `dtype(key)` answer from the file headers without reading tensor data."""

    def __init__(self, entries: Mapping[str, LazyEntry], source: str = "<lazy state dict>"):
        self._entries = dict(entries)
        self.source = source

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._entries[key].load()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def entry(self, key: str) -> LazyEntry:
        return self._entries[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype

    def nbytes(self) -> int:
        """Bytes of all tensors as stored."""
        return sum(math.prod(e.shape) * e.dtype.itemsize for e in self._entries.values())

    def with_entries(self, entries: Mapping[str, LazyEntry]) -> LazyStateDict:
        return LazyStateDict(entries, self.source)

    def __repr__(self) -> str:
        return f"LazyStateDict({self.source!r}, {len(self)} tensors)"


def shape_of(sd: Mapping, key: str) -> tuple[int, ...]:
    """Shape of `sd[key]`, without reading the tensor when `sd` is lazy."""
    return sd.shape(key) if isinstance(sd, (LazyStateDict, _Merged)) else tuple(sd[key].shape)


def dtype_of(sd: Mapping, key: str) -> torch.dtype:
    return sd.dtype(key) if isinstance(sd, (LazyStateDict, _Merged)) else sd[key].dtype


def replace_entry(sd: Mapping, key: str, fn: Callable[[torch.Tensor], torch.Tensor],
                  shape: Iterable[int]) -> Mapping:
    """A copy of `sd` where `key` holds fn(old tensor) of `shape`; lazy stays lazy (nothing read)."""
    if isinstance(sd, LazyStateDict):
        entries = dict(sd._entries)
        entries[key] = entries[key].map(fn, shape)
        return sd.with_entries(entries)
    out = dict(sd)
    out[key] = fn(out[key])
    return out


def _safetensors_error(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a readable .safetensors file (truncated or corrupt download?). "
        f"Re-download it. Detail: {detail}"
    )


MAX_HEADER_BYTES = 100_000_000


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header: ({key: (dtype, shape, begin, end)}, data start).

    Checks that every tensor's byte range fits its shape / dtype and that the data section is
    exactly covered (a truncated file fails here, before anything is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _safetensors_error(path, f"file of {size} bytes has no header")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise _safetensors_error(path, f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _safetensors_error(path, f"unreadable header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise _safetensors_error(path, "header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    table, covered = {}, 0
    for key, info in header.items():
        try:
            name, shape, (begin, end) = info["dtype"], tuple(int(x) for x in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise _safetensors_error(path, f"bad header entry for {key!r}") from None
        if name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has dtype {name}, which torch cannot hold")
        dtype = SAFETENSORS_DTYPES[name]
        if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end:
            raise _safetensors_error(path, f"tensor {key}: byte range {begin}..{end} does not fit {shape} {name}")
        if end > data_size:
            raise _safetensors_error(path, f"tensor {key} ends at byte {end} but the file holds {data_size} data "
                                           f"bytes (truncated)")
        covered = max(covered, end)
        table[key] = (dtype, shape, begin, end)
    if covered != data_size:
        raise _safetensors_error(path, f"data section is {data_size} bytes but the tensors cover {covered}")
    return table, data_start


def _read_range(path: Path, offset: int, nbytes: int) -> torch.Tensor:
    """nbytes of `path` from `offset` into a fresh uint8 tensor (plain reads: no memory map, so
    nothing but the returned tensor stays resident)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        view = memoryview(buf.numpy())
        got = 0
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            while got < nbytes:
                k = f.readinto(view[got:])
                if not k:
                    raise _safetensors_error(path, f"unexpected end of file at byte {offset + got}")
                got += k
    return buf


def _lazy_entries(path: Path, keys: Iterable[str] | None = None) -> dict[str, LazyEntry]:
    """Entries of one safetensors file (all keys, or `keys`); each read is one plain file read."""
    table, data_start = _safetensors_header(path)
    wanted = list(table) if keys is None else list(keys)
    absent = [k for k in wanted if k not in table]
    if absent:
        raise CheckpointError(f"{path}: tensors listed in the shard index are missing: {absent[:MAX_LISTED_KEYS]}")

    def reader(dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            try:
                raw = _read_range(path, data_start + begin, end - begin)
            except OSError as e:
                raise _safetensors_error(path, str(e)) from None
            return raw.view(dtype).reshape(shape)

        return load

    entries = {}
    for key in wanted:
        dtype, shape, begin, end = table[key]
        entries[key] = LazyEntry(reader(dtype, shape, begin, end), shape, dtype)
    return entries


def _read_safetensors(path: Path) -> LazyStateDict:
    return LazyStateDict(_lazy_entries(path), str(path))


def _read_sharded(folder: Path) -> LazyStateDict:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{indexes[0]}: not a valid shard index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{indexes[0]}: \"weight_map\" must map tensor names to shard file names")
        outside = [v for v in set(weight_map.values()) if Path(v).name != v or v in ("", ".", "..")]
        if outside:
            raise CheckpointError(f"{indexes[0]}: shard names must be files in {folder}, got {outside[:MAX_LISTED_KEYS]}")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: shard(s) listed in {indexes[0].name} are missing: {missing[:MAX_LISTED_KEYS]}"
            )
        keys_of = {s: [k for k, v in weight_map.items() if v == s] for s in shards}
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(
                f"{folder}: folder holds neither a *.safetensors.index.json nor *.safetensors shards"
            )
        keys_of = dict.fromkeys(shards)
    entries: dict[str, LazyEntry] = {}
    for shard in shards:
        for key, entry in _lazy_entries(folder / shard, keys_of[shard]).items():
            if key in entries:
                raise CheckpointError(f"{folder}: tensor {key} appears in more than one shard")
            entries[key] = entry
    return LazyStateDict(entries, str(folder))


def read_checkpoint(src) -> Mapping:
    """Read `src` (path or mapping) into a mapping without interpreting its layout."""
    if isinstance(src, Mapping):
        return src
    path = Path(src)
    if path.is_dir():
        return _read_sharded(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if path.suffix.lower() == GGUF_SUFFIX:
        return read_gguf(path)
    if path.suffix.lower() in TORCH_SUFFIXES:
        from .torchzip import read_torch_zip  # tensors read when used, with plain reads (no memory map)
        obj = read_torch_zip(path) or _read_torch(path)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
        return obj
    raise CheckpointError(
        f"{path}: unknown checkpoint format {path.suffix!r}; expected one of "
        f"{', '.join(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES + (GGUF_SUFFIX,))} or a folder of safetensors shards"
    )


def unwrap(obj: Mapping, wrappers: tuple[str, ...], source: str) -> Mapping[str, torch.Tensor]:
    """Descend into the first wrapper key present (e.g. `{'vae': sd}`) and keep tensor entries."""
    for key in wrappers:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if isinstance(obj, LazyStateDict):  # safetensors: all tensors, read later
        sd = obj
    else:
        sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{source}: no tensors found (top-level keys: {list(obj)[:MAX_LISTED_KEYS]})")
    return sd


@dataclass
class Coverage:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def loadable(self) -> bool:
        """Every tensor of the model is present with its shape (unexpected extras are allowed)."""
        return not (self.missing or self.mismatched)

    def summary(self) -> str:
        def head(items) -> str:
            more = f" ... (+{len(items) - MAX_LISTED_KEYS} more)" if len(items) > MAX_LISTED_KEYS else ""
            return ", ".join(map(str, items[:MAX_LISTED_KEYS])) + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {head(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): {head(self.unexpected)}")
        if self.mismatched:
            rows = [f"{k} file {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
            parts.append(f"{len(self.mismatched)} shape mismatch(es): {head(rows)}")
        return "; ".join(parts) or "all keys match"

    def unexpected_summary(self) -> str:
        return Coverage(unexpected=self.unexpected).summary()


def check_coverage(cov: Coverage, *, source: str, kind: str, strict: bool) -> None:
    """Missing or mis-shaped keys (and, with `strict`, unexpected ones) raise `CheckpointError`
    naming the file; unexpected keys otherwise give one `UnexpectedKeysWarning`."""
    if not cov.loadable or (strict and cov.unexpected):
        fix = " (drop the extra tensors, or load without strict to ignore them)" if cov.loadable else ""
        raise CheckpointError(f"{source}: does not fit the {kind}: {cov.summary()}{fix}")
    if cov.unexpected:
        warnings.warn(f"{source}: ignoring tensors the {kind} does not use: {cov.unexpected_summary()} "
                      f"(strict loading refuses such files)", UnexpectedKeysWarning, stacklevel=3)


def coverage(expected: Mapping[str, tuple[int, ...]], sd: Mapping[str, torch.Tensor],
             defaults: Mapping[str, torch.Tensor] | None = None) -> Coverage:
    """Compare key sets and shapes (shapes of a lazy state dict come from its headers; nothing is
    read). `defaults` fill keys a checkpoint may lack (as in `materialize`)."""
    if defaults:
        sd = _Merged(sd, defaults)
    cov = Coverage()
    for k, shape in expected.items():
        if k not in sd:
            cov.missing.append(k)
        elif shape_of(sd, k) != tuple(shape):
            cov.mismatched.append((k, shape_of(sd, k), tuple(shape)))
    cov.unexpected = [k for k in sd if k not in expected]
    return cov


class _Merged(Mapping):
    """`sd` with `defaults` for absent keys, without reading anything."""

    def __init__(self, sd: Mapping, defaults: Mapping):
        self.sd, self.defaults = sd, defaults

    def __getitem__(self, key):
        return self.sd[key] if key in self.sd else self.defaults[key]

    def __contains__(self, key) -> bool:
        return key in self.sd or key in self.defaults

    def __iter__(self):
        yield from self.sd
        yield from (k for k in self.defaults if k not in self.sd)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def shape(self, key) -> tuple[int, ...]:
        return shape_of(self.sd, key) if key in self.sd else tuple(self.defaults[key].shape)

    def dtype(self, key) -> torch.dtype:
        return dtype_of(self.sd, key) if key in self.sd else self.defaults[key].dtype


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN / inf in `t`, with one reduction and one host read. A sum is non-finite whenever an
    element is (NaN and inf propagate through any summation order) and costs ~1/10 of the tensor's
    dtype conversion on the CPU, where an elementwise isfinite costs 3-5x the conversion (measured
    on a 3584 x 14336 tensor, one thread). Only a non-finite sum (a bad element, or a sum of finite
    values beyond the dtype's range, e.g. fp16 past 65504) is settled by the exact elementwise test."""
    if t.element_size() == 1:  # float8 (sums are not implemented for it): widening keeps NaN
        t = t.to(torch.bfloat16)
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def non_finite_error(source: str, kind: str, name: str, stored: torch.Tensor, dtype: torch.dtype) -> CheckpointError:
    """The error for tensor `name` that is not finite once converted to `dtype`: NaN / inf in the
    file (a damaged download or a diverged training run), or finite values beyond `dtype`'s range."""
    count = int((~torch.isfinite(stored)).sum()) if stored.is_floating_point() else 0
    if count:
        return CheckpointError(
            f"{source}: tensor {name} of the {kind} holds {count} NaN/inf value(s) of {stored.numel()}; the file is "
            f"damaged (or from a diverged training run): download it again and compare its size / md5")
    return CheckpointError(
        f"{source}: tensor {name} of the {kind} overflows {str(dtype).removeprefix('torch.')} (largest |value| "
        f"{float(stored.float().abs().max()):.3g}); load it in bf16 or fp32 instead")


def check_finite(t: torch.Tensor, *, source: str, kind: str, name: str, stored: torch.Tensor | None = None) -> None:
    """Raise `non_finite_error` when floating-point `t` (tensor `name`, as read from `stored`,
    default `t`) holds NaN / inf: the check `materialize` runs on each tensor as it is read, also
    used where a loader quantises a tensor before it reaches `materialize`."""
    if t.is_floating_point() and not _all_finite(t):
        raise non_finite_error(source, kind, name, t if stored is None else stored, t.dtype)


def materialize(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    source: str,
    kind: str,
    device: torch.device | str = "cpu",
    dtype_for: Callable[[str, torch.Tensor], torch.dtype] | None = None,
    defaults: Mapping[str, torch.Tensor] | None = None,
    strict: bool = False,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> Coverage:
    """Fill a module built on the `meta` device from `sd`, tensor by tensor.

    `defaults` supplies tensors for keys a checkpoint may legitimately lack (e.g. all-zero bias
    buffers); `dtype_for(name, tensor)` picks the stored dtype per tensor (default: keep floats as
    in the file, except that integer buffers always keep their dtype). `transform(name, tensor)`,
    when given, post-processes each tensor after it reached `device` / its dtype and passed the
    finiteness check (e.g. quantisation, or moving a block back to pinned CPU memory for block
    swapping). Coverage as in `check_coverage` (unexpected keys: a warning, or with `strict` an error).

    Only one checkpoint tensor is read (and converted) at a time: a lazy or memory-mapped `sd` is
    never copied as a whole. Each floating-point tensor is checked for NaN / inf right after its
    conversion (one reduction and one host read per tensor: on a GPU the copy from host memory
    synchronises anyway), which also catches values that overflow the target dtype (fp16).
    """
    merged = _Merged(sd, dict(defaults or {}))
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    cov = coverage(expected, merged)
    check_coverage(cov, source=source, kind=kind, strict=strict)
    targets = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, target in targets.items():
        if name not in merged:
            continue
        value = merged[name]  # reads this one tensor (lazy) or maps it (mmap)
        dtype = target.dtype if not value.is_floating_point() else (
            dtype_for(name, value) if dtype_for else value.dtype
        )
        new = value.to(device=device, dtype=dtype, copy=True).contiguous()
        check_finite(new, source=source, kind=kind, name=name, stored=value)
        del value
        if transform is not None:
            new = transform(name, new)
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if isinstance(target, nn.Parameter):
            owner._parameters[attr] = nn.Parameter(new, requires_grad=False)
        else:
            owner._buffers[attr] = new
    # Re-read the module: `targets` still holds the replaced meta tensors.
    leftovers = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{source}: {kind} tensors left unloaded: {leftovers[:MAX_LISTED_KEYS]}")
    return cov


# ---------------------------------------------------------------------------------------------
# Streamed, atomic safetensors writing

SAFETENSORS_ALIGN = 8  # header padded with spaces so that the data starts 8-byte aligned


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor (any dtype, including bf16 / fp8)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_safetensors(
    path: str | os.PathLike,
    entries: Mapping[str, LazyEntry],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write `entries` (key -> LazyEntry with the shape and dtype the tensor will have) as one
    .safetensors file, streaming: the header is computed from the declared shapes / dtypes, then
    each tensor is loaded, checked against its declaration, written and dropped. Peak RAM is one
    tensor. The file appears atomically (temporary file in the same folder + os.replace); an
    existing file is refused unless `overwrite`. Keys are written sorted."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass --overwrite to replace it")
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    keys = sorted(entries)
    offset = 0
    for k in keys:
        e = entries[k]
        if e.dtype not in TORCH_TO_SAFETENSORS:
            raise ValueError(f"{k}: dtype {e.dtype} cannot be stored in safetensors")
        n = math.prod(e.shape) * e.dtype.itemsize
        header[k] = {"dtype": TORCH_TO_SAFETENSORS[e.dtype], "shape": list(e.shape),
                     "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % SAFETENSORS_ALIGN)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for i, k in enumerate(keys):
                e = entries[k]
                t = e.load()
                if tuple(t.shape) != tuple(e.shape) or t.dtype != e.dtype:
                    raise ValueError(f"{k}: produced {tuple(t.shape)} {t.dtype}, declared {e.shape} {e.dtype}")
                f.write(_tensor_bytes(t))
                del t
                if progress:
                    progress(i + 1, len(keys))
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------------------------------------
# GGUF files (block-quantised weights written by `python -m nsarm_nodes convert --format q8_0`)

GGUF_SUFFIX = ".gguf"
GGUF_PLAIN_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGMLQuantizationType F32, F16, BF16


class GGUFStateDict(LazyStateDict):
    """The tensors of a .gguf file, read lazily from its memory map (one tensor copied per read).

    `sd[key]` is a float tensor (block-quantised tensors dequantised to float32); `packed(key)` the
    raw GGUF blocks (uint8 [out, in / 32 * type_size]) of a block-quantised tensor;
    `block_types` = {key: weights.BlockType} of the block-quantised tensors; `metadata` = the
    file's string key/values."""

    def __init__(self, entries: Mapping[str, LazyEntry], source: str, block_types: Mapping,
                 packed: Mapping[str, Callable[[], torch.Tensor]], metadata: Mapping[str, str]):
        super().__init__(entries, source)
        self.block_types = {k: v for k, v in block_types.items() if k in self._entries}
        self._packed, self.metadata = dict(packed), dict(metadata)

    def packed(self, key: str) -> torch.Tensor:
        return self._packed[key]()

    def with_entries(self, entries: Mapping[str, LazyEntry]) -> GGUFStateDict:
        return GGUFStateDict(entries, self.source, self.block_types, self._packed, self.metadata)


def read_gguf(path: Path) -> GGUFStateDict:
    """Read a .gguf file's header (tensor names, types, shapes; string metadata); tensor data stays
    in the memory map until a tensor is indexed. Types: F32 / F16 / BF16 and the block types of
    weights.BLOCK_TYPES (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0); any other is refused naming the key."""
    from . import weights

    try:
        import numpy as np
        from gguf import GGUFReader, GGUFValueType
    except ImportError:
        raise CheckpointError(f"{path}: reading .gguf files needs the `gguf` package: pip install gguf") from None
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError / IndexError / struct errors
        raise CheckpointError(f"{path}: not a readable .gguf file (truncated or corrupt download?): "
                              f"{_error_detail(e)}. Download or convert it again") from None
    metadata = {name: str(f.contents()) for name, f in reader.fields.items()
                if f.types == [GGUFValueType.STRING]}
    entries, packed, block_types = {}, {}, {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        ggml = int(t.tensor_type)
        raw = (lambda data=t.data: torch.from_numpy(np.array(data).view(np.uint8)))  # noqa: E731
        if ggml in GGUF_PLAIN_TYPES:
            dtype = GGUF_PLAIN_TYPES[ggml]
            entries[t.name] = LazyEntry(lambda raw=raw, dtype=dtype, shape=shape: raw().reshape(-1).view(dtype)
                                        .reshape(shape), shape, dtype)
            continue
        bt = weights.BLOCK_TYPE_BY_GGML.get(ggml)
        if bt is None:
            raise CheckpointError(
                f"{path}: tensor {t.name} is stored as GGUF type {t.tensor_type.name}, which this loader does not "
                f"read (it reads F32, F16, BF16, {', '.join(b.upper() for b in weights.BLOCK_TYPES)}); write the "
                "file with `python -m nsarm_nodes convert CHECKPOINT --format q8_0 -o FILE.gguf`")
        if len(shape) != 2 or shape[1] % weights.BLOCK:
            raise CheckpointError(f"{path}: tensor {t.name} is {bt.name} with shape {list(shape)}; block-quantised "
                                  f"tensors must be 2-D with an input width divisible by {weights.BLOCK}")
        block_types[t.name] = bt
        packed[t.name] = lambda raw=raw, shape=shape, bt=bt: raw().reshape(weights.packed_shape(shape, bt))
        entries[t.name] = LazyEntry(lambda p=packed[t.name], bt=bt: weights.dequantize(p(), bt), shape, torch.float32)
    return GGUFStateDict(entries, str(path), block_types, packed, metadata)
