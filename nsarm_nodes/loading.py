"""Checkpoint reading and strict, memory-lean loading.

Formats: a torch `.pth/.pt/.bin/.ckpt` file (read with `torch.load(weights_only=True, mmap=True)`,
so no code in a pickle is ever executed and tensors stay on disk until used), a `.safetensors`
file, a folder of sharded safetensors with a `*.safetensors.index.json`, or an in-memory state dict.

Models are built on the `meta` device and then materialised tensor by tensor from the (memory
mapped) checkpoint in the target dtype and device, so the full-precision checkpoint is never held
in RAM or VRAM twice. Coverage is strict: missing, unexpected or shape-mismatched keys raise
`CheckpointError` naming the file.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
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


def describe(src) -> str:
    return str(src) if isinstance(src, (str, os.PathLike)) else "<state dict>"


def _read_torch(path: Path) -> object:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) serialisation cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refusing to load: the file needs arbitrary code execution to unpickle "
            f"(only plain tensors and containers are allowed). Use the official weights, or convert "
            f"a trusted copy to .safetensors. Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt download?). "
            f"Re-download it and compare its size/md5 with the source. Detail: {str(e).splitlines()[0]}"
        ) from None


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: not a readable .safetensors file (truncated or corrupt download?). "
            f"Re-download it. Detail: {e}"
        ) from None


def _read_sharded(folder: Path) -> StateDict:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{indexes[0]}: not a valid shard index ({e})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: shard(s) listed in {indexes[0].name} are missing: {missing[:MAX_LISTED_KEYS]}"
            )
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(
                f"{folder}: folder holds neither a *.safetensors.index.json nor *.safetensors shards"
            )
    sd: StateDict = {}
    for shard in shards:
        sd.update(_read_safetensors(folder / shard))
    return sd


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
    if path.suffix.lower() in TORCH_SUFFIXES:
        obj = _read_torch(path)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
        return obj
    raise CheckpointError(
        f"{path}: unknown checkpoint format {path.suffix!r}; expected one of "
        f"{', '.join(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES)} or a folder of safetensors shards"
    )


def unwrap(obj: Mapping, wrappers: tuple[str, ...], source: str) -> StateDict:
    """Descend into the first wrapper key present (e.g. `{'vae': sd}`) and keep tensor entries."""
    for key in wrappers:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
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


def coverage(expected: Mapping[str, tuple[int, ...]], sd: Mapping[str, torch.Tensor]) -> Coverage:
    cov = Coverage()
    for k, shape in expected.items():
        if k not in sd:
            cov.missing.append(k)
        elif tuple(sd[k].shape) != tuple(shape):
            cov.mismatched.append((k, tuple(sd[k].shape), tuple(shape)))
    cov.unexpected = [k for k in sd if k not in expected]
    return cov


def materialize(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    source: str,
    kind: str,
    device: torch.device | str = "cpu",
    dtype_for: Callable[[str, torch.Tensor], torch.dtype] | None = None,
    defaults: Mapping[str, torch.Tensor] | None = None,
    strict: bool = True,
) -> Coverage:
    """Fill a module built on the `meta` device from `sd`, tensor by tensor.

    `defaults` supplies tensors for keys a checkpoint may legitimately lack (e.g. all-zero bias
    buffers); `dtype_for(name, tensor)` picks the stored dtype per tensor (default: keep floats as
    in the file, except that integer buffers always keep their dtype).
    """
    defaults = dict(defaults or {})
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    merged = dict(sd)
    for k, v in defaults.items():
        merged.setdefault(k, v)
    cov = coverage(expected, merged)
    if strict and not cov.ok:
        raise CheckpointError(f"{source}: does not fit the {kind}: {cov.summary()}")
    targets = dict(module.named_parameters()) | dict(module.named_buffers())
    for name, target in targets.items():
        if name not in merged:
            continue
        value = merged[name]
        dtype = target.dtype if not value.is_floating_point() else (
            dtype_for(name, value) if dtype_for else value.dtype
        )
        new = value.to(device=device, dtype=dtype, copy=True).contiguous()
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
