"""`python -m nsarm_nodes bench --preset nsarm-8b --random-weights --scales N`: the real-size CPU benchmark.

Writes an NSARM-8B-shaped checkpoint with random weights to a temporary folder (bf16 blocks and
float32 rest as a .safetensors, as `convert` writes it; with --pth an all-float32 torch .pth as the
released NSARM.pth is), loads it through the real loader (`transformer.load_transformer`, the
function `load_pipeline` and the loader node call), runs the first N scales of one 1024^2 tile on
the reference path (scale by scale, so that each scale has its own time) and reports: the file
size, the load time, the peak RSS of loading against the bytes of the loaded model (the
checkpoint is never held twice: the growth stays near one copy of the model), and the seconds of
each scale. `--blocks K` writes only the first K of the 40 blocks (every width stays real) so
that it fits a small machine; the figures then scale with K, as stated in the report.

A benchmark, not a test: it prints figures (and --json writes them). The files are deleted at
the end unless --keep names a folder for them.
"""
from __future__ import annotations

import collections
import functools
import io
import json
import math
import pickle
import sys
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import torch

from .bench import _lr_image, _random_value, current_rss_bytes, peak_rss_bytes, reset_peak_rss
from .config import PRESETS
from .loading import LazyEntry, write_safetensors

GB = 1e9
TORCH_ZIP_ALIGNMENT = 64  # torch.save aligns every storage record to 64 bytes (mmap-friendly)
TORCH_ZIP_VERSION = "3"  # the archive format version torch.save writes


class _StopAfter(Exception):
    """Raised from the sampler's progress callback once the requested scales have run."""


def transformer_entries(cfg, block_dtype: torch.dtype, seed: int = 0) -> dict[str, LazyEntry]:
    """Random tensors (read lazily, one at a time) for every checkpoint key of `cfg`: block tensors
    in `block_dtype`, the rest float32, as `convert` / the released file store them."""
    from .transformer import Infinity

    with torch.device("meta"):
        model = Infinity(cfg)
    gen = torch.Generator().manual_seed(seed)
    entries = {}
    for name, t in model.state_dict().items():
        if name.endswith("zero_k_bias") or not t.is_floating_point():
            continue  # filled by the loader
        dtype = block_dtype if name.startswith("block_chunks.") else torch.float32
        entries[name] = LazyEntry(functools.partial(_random_value, name, tuple(t.shape), dtype, "cpu", gen),
                                  tuple(t.shape), dtype)
    return entries


# ---------------------------------------------------------------------------------------------
# A streamed torch .pth writer (torch.save needs the whole state dict in memory)


class _StorageRef:
    """Stands for one tensor's storage in the pickle (a persistent id, as torch.save writes it)."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles as torch.save pickles a contiguous tensor on its own storage."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


def write_torch_pth(path: Path, entries: dict[str, LazyEntry], wrapper: str | None = None) -> Path:
    """Write `entries` as a torch zip checkpoint ({wrapper: state dict} or the state dict), the
    format of torch.save, one tensor in memory at a time. Readable by torch.load(weights_only=True,
    mmap=True)."""
    archive = path.stem
    refs, storages = {}, []
    for i, (name, e) in enumerate(entries.items()):
        st = _StorageRef(str(i), e.dtype, math.prod(e.shape))
        refs[name] = _TensorRef(st, e.shape)
        storages.append((st.key, e))
    obj = {wrapper: refs} if wrapper else refs
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    data = buf.getvalue()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(f"{archive}/data.pkl", data)
        zf.writestr(f"{archive}/byteorder", sys.byteorder)
        for key, e in storages:
            t = e.load().contiguous()
            raw = t.view(torch.uint8).numpy() if t.numel() else b""
            info = zipfile.ZipInfo(f"{archive}/data/{key}")
            # pad the local header's extra field so that the data starts on a 64-byte boundary
            # (the zip64 extra field zipfile adds for large members is 20 bytes)
            header = 30 + len(info.filename.encode()) + (20 if t.nbytes >= zipfile.ZIP64_LIMIT else 0)
            pad = -(zf.fp.tell() + header + 4) % TORCH_ZIP_ALIGNMENT
            info.extra = b"\xfe\xca" + pad.to_bytes(2, "little") + b"\0" * pad  # an ignored extra block
            with zf.open(info, "w", force_zip64=t.nbytes >= zipfile.ZIP64_LIMIT) as f:
                f.write(memoryview(raw))
            del t, raw
        zf.writestr(f"{archive}/version", TORCH_ZIP_VERSION + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# The benchmark


def _model_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def run_realsize(scales: int, *, blocks: int | None = None, pth: bool = False, seed: int = 0,
                 keep: str | None = None, text_tokens: int = 128, print_fn=print) -> dict:
    """Write, load and run (see the module docstring). Returns the report as a dict."""
    from .bench import random_state
    from .sampler import sample
    from .schedule import scale_schedule
    from .text import PromptEmbeds
    from .transformer import load_transformer
    from .vae import BSQVAE, load_vae

    preset = PRESETS["nsarm-8b"]
    cfg = preset.transformer
    if blocks is not None:
        if not 1 <= blocks <= cfg.depth:
            raise ValueError(f"--blocks must be in 1..{cfg.depth}, got {blocks}")
        cfg = replace(cfg, depth=blocks, block_chunks=blocks)
    schedule = scale_schedule(1.0, "1M")
    if not 1 <= scales <= len(schedule):
        raise ValueError(f"--scales must be in 1..{len(schedule)}, got {scales}")
    rep: dict = {"preset": "nsarm-8b", "blocks": cfg.depth, "of_blocks": preset.transformer.depth,
                 "scales": scales, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="nsarm-realsize-", dir=keep) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        if pth:
            path = write_torch_pth(folder / "NSARM.pth", transformer_entries(cfg, torch.float32, seed), "gpt_fsdp")
        else:
            path = write_safetensors(folder / "NSARM_bf16.safetensors", transformer_entries(cfg, torch.bfloat16, seed))
        rep.update(file=path.name, file_GB=path.stat().st_size / GB, write_s=time.perf_counter() - t0)
        print_fn(f"wrote {path.name}: {rep['file_GB']:.2f} GB in {rep['write_s']:.1f}s "
                 f"({cfg.depth} of {preset.transformer.depth} blocks, real widths)")

        base = current_rss_bytes()
        reset_peak_rss()
        t0 = time.perf_counter()
        transformer = load_transformer(path, device="cpu", dtype=torch.bfloat16)
        rep["load_s"] = time.perf_counter() - t0
        model = _model_bytes(transformer)
        rep.update(model_GB=model / GB, rss_before_GB=base / GB, peak_rss_GB=peak_rss_bytes() / GB,
                   peak_rss_growth_GB=(peak_rss_bytes() - base) / GB, rss_after_GB=current_rss_bytes() / GB)
        rep["growth_over_model"] = rep["peak_rss_growth_GB"] / rep["model_GB"]
        print_fn(f"load_transformer({path.name}, bf16): {rep['load_s']:.1f}s; model {rep['model_GB']:.2f} GB; "
                 f"peak RSS {rep['peak_rss_GB']:.2f} GB (growth {rep['peak_rss_growth_GB']:.2f} GB = "
                 f"{rep['growth_over_model']:.2f}x the model; before {rep['rss_before_GB']:.2f} GB)")

    with torch.device("meta"):
        meta_vae = BSQVAE(preset.vae)
    vae = load_vae(random_state(meta_vae, "cpu", lambda n: torch.float32, seed + 1), dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    text = PromptEmbeds.from_lengths(torch.randn(text_tokens, cfg.text_channels, generator=gen), [text_tokens],
                                     ["<synthetic>"])
    lr = _lr_image(256, seed).permute(0, 3, 1, 2) * 2 - 1  # [1, 3, 256, 256] in [-1, 1]
    times: list[float] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        feats = vae.encode_features(lr)
        rep["vae_encode_s"] = time.perf_counter() - t0
        last = [time.perf_counter()]

        def progress(si: int, n: int) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
            if si + 1 >= scales:
                raise _StopAfter

        reset_peak_rss()
        t0 = time.perf_counter()
        try:
            sample(transformer, vae, text, feats, seed=seed, prefill=False, progress=progress)
        except _StopAfter:
            pass
    rep["run_s"] = time.perf_counter() - t0
    rep["peak_rss_run_GB"] = peak_rss_bytes() / GB
    # The first interval also holds the transformation network and the text conditioning.
    rep["scale_s"] = times
    tokens = [h * w for h, w in schedule[:scales]]
    for si, (s, n) in enumerate(zip(times, tokens)):
        extra = " (+ transformation network, text conditioning)" if si == 0 else ""
        print_fn(f"  scale {si:2d}: {n:5d} tokens {s:8.2f}s{extra}")
    print_fn(f"first {scales} scales: {rep['run_s']:.1f}s; peak RSS during the run {rep['peak_rss_run_GB']:.2f} GB")
    if cfg.depth != preset.transformer.depth:
        print_fn(f"note: {cfg.depth} of {preset.transformer.depth} blocks; block time and block bytes scale "
                 f"linearly with the block count (the transformation network and text path do not)")
    return rep


def cmd_realsize(args) -> int:
    """The bench CLI's --scales branch."""
    if args.preset != "nsarm-8b" or not args.random_weights or args.models is not None:
        raise ValueError("--scales runs the real-size CPU benchmark: use it with --preset nsarm-8b --random-weights")
    rep = run_realsize(args.scales, blocks=args.blocks, pth=args.pth, seed=args.seed, keep=args.keep,
                       text_tokens=args.text_tokens, print_fn=lambda s: print(s, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    return 0
