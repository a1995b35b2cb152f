"""`python -m nsarm_nodes convert`: rewrite a transformer checkpoint in the layout the loader holds.

    python -m nsarm_nodes convert NSARM.pth --format bf16 -o NSARM_bf16.safetensors
    python -m nsarm_nodes convert NSARM.pth --format q8_0 -o NSARM_q8_0.gguf

Dense formats (bf16 / fp16 / fp32 blocks) are written as .safetensors, block-quantised weight
formats (weights.FORMATS) as .gguf (GGUF blocks through the `gguf` package's writer; the other
tensors F32, dense block tensors BF16 / F16 / F32). Either way the file holds exactly what
`load_transformer(dtype=..., weight_format=...)` would hold: keys normalised, missing
`zero_k_bias` added, `cfg_uncond` cut to 512 rows. Streamed (one tensor in RAM at a time), written
atomically (temporary file + os.replace), an existing output refused unless `overwrite`, and
verified afterwards by re-reading the header (keys, shapes, types) and inferring the model from it.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from . import weights
from .loading import (
    GGUF_SUFFIX,
    SAFETENSORS_SUFFIXES,
    CheckpointError,
    LazyEntry,
    check_coverage,
    check_finite,
    coverage,
    dtype_of,
    read_checkpoint,
    shape_of,
    write_safetensors,
)
from .transformer import GGUF_FORMAT_KEY, Infinity, _checkpoint_state, infer_config, quantized_entry

DENSE_FORMATS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BLOCK_FORMATS = tuple(n for n, f in weights.FORMATS.items() if f.quantized)
CONVERT_FORMATS = tuple(DENSE_FORMATS) + BLOCK_FORMATS
GGUF_ARCH = "nsarm"
# GGMLQuantizationType of dense tensors in a .gguf
GGUF_DENSE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}


def output_suffixes(fmt: str) -> tuple[str, ...]:
    return SAFETENSORS_SUFFIXES if fmt in DENSE_FORMATS else (GGUF_SUFFIX,)


def _dense_entry(sd: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, source: str) -> torch.Tensor:
    """Checkpoint tensor `key` in `dtype`, checked for NaN / inf as loading checks it."""
    value = sd[key]  # read once
    t = value.to(dtype).contiguous()
    check_finite(t, source=source, kind="transformer", name=key, stored=value)
    return t


def convert_checkpoint(src, dst, format: str = "bf16", *, dtype: torch.dtype | None = None,  # noqa: A002
                       overwrite: bool = False, strict: bool = False,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, object]:
    """Rewrite the transformer checkpoint `src` as `dst` in `format` (CONVERT_FORMATS).

    Dense formats: one .safetensors whose block tensors are that dtype and the rest float32.
    Block formats: one .gguf whose block linear weights are GGUF blocks (quantised from the
    checkpoint's own precision), the other block tensors `dtype` (default bf16, the compute dtype
    the loader will use) and the rest float32. Tensors the model does not use are left out with one
    warning (`strict`: refused, as in loading). Returns {"path", "tensors", "bytes", "source_bytes"}.
    """
    if format not in CONVERT_FORMATS:
        raise ValueError(f"format must be one of {CONVERT_FORMATS}, got {format!r}")
    dst = Path(dst)
    if dst.suffix.lower() not in output_suffixes(format):
        raise ValueError(f"{dst}: a {format} checkpoint is written as {' or '.join(output_suffixes(format))}; "
                         f"name the output accordingly")
    fmt = weights.weight_format(format) if format in BLOCK_FORMATS else weights.FORMATS["dense"]
    block_dtype = DENSE_FORMATS.get(format) or dtype or torch.bfloat16
    sd, source = _checkpoint_state(src)
    if getattr(sd, "block_types", None):
        raise CheckpointError(f"{source}: already block-quantised; convert the original checkpoint instead")
    cfg = infer_config(sd, source)  # fails early on a file that is not a transformer
    with torch.device("meta"):
        model = Infinity(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cov = coverage(expected, sd)
    cov.missing = [k for k in cov.missing if not k.endswith("zero_k_bias")]
    # as loading: tensors the model does not use are left out with one warning (strict: refused)
    check_coverage(cov, source=source, kind="transformer", strict=strict)

    def target_dtype(key: str, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point:
            return stored
        return block_dtype if key.startswith("block_chunks.") else torch.float32

    def entry(key: str) -> LazyEntry:
        if key not in sd:  # zero_k_bias buffers absent from upstream checkpoints
            want = target_dtype(key, torch.float32)
            return LazyEntry(lambda: torch.zeros(expected[key], dtype=want), expected[key], want)
        bt = fmt.block_type_for(key) if weights.is_block_linear(key) else None
        if bt is not None:  # read, checked for NaN / inf (naming the key) and quantised, as loading does
            return LazyEntry(functools.partial(quantized_entry, sd, key, bt, source, torch.device("cpu")),
                             weights.packed_shape(expected[key], bt), torch.uint8)
        want = target_dtype(key, dtype_of(sd, key))
        return LazyEntry(functools.partial(_dense_entry, sd, key, want, source), shape_of(sd, key), want)

    entries = {k: entry(k) for k in expected}
    meta = {"nsarm_converted_from": os.path.basename(source),
            "nsarm_block_dtype": str(block_dtype).removeprefix("torch."), "nsarm_other_dtype": "float32"}
    if format in DENSE_FORMATS:
        path = write_safetensors(dst, entries, {"format": "pt", **meta}, overwrite=overwrite, progress=progress)
    else:
        types = {k: fmt.block_type_for(k) if weights.is_block_linear(k) else None for k in expected}
        path = write_gguf(dst, entries, types, {GGUF_FORMAT_KEY: fmt.name, **meta}, overwrite=overwrite,
                          progress=progress)
    _verify(path, expected, entries, fmt)
    src_bytes = sum(math.prod(shape_of(sd, k)) * dtype_of(sd, k).itemsize for k in sd)
    return {"path": path, "tensors": len(expected), "bytes": path.stat().st_size, "source_bytes": src_bytes}


def _verify(path: Path, expected: Mapping[str, tuple[int, ...]], entries: Mapping[str, LazyEntry],
            fmt: weights.WeightFormat) -> None:
    """Re-read the header: exactly the expected keys, shapes and types; the model infers from it."""
    back = read_checkpoint(path)
    types = getattr(back, "block_types", {})

    def fits(k: str) -> bool:
        if k not in back or back.shape(k) != expected[k]:
            return False
        want = fmt.block_type_for(k) if weights.is_block_linear(k) else None
        if want is not None:
            return types.get(k) == want
        return k not in types and back.dtype(k) == entries[k].dtype

    bad = [k for k in expected if not fits(k)]
    if bad or len(back) != len(expected):
        os.replace(path, str(path) + ".invalid")
        raise CheckpointError(f"{path}: verification failed for {bad[:8]} (moved to {path}.invalid)")
    infer_config(back, str(path))


def write_gguf(path: str | os.PathLike, entries: Mapping[str, LazyEntry], block_types: Mapping, metadata: Mapping[str, str],
               *, overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `entries` (key -> LazyEntry; a key with a weights.BlockType in `block_types` yields its
    packed blocks, the others float32 / float16 / bfloat16 tensors) as one .gguf file with string
    `metadata`, streaming one tensor at a time through gguf.GGUFWriter, atomically (temporary file
    in the same folder + os.replace); an existing file is refused unless `overwrite`."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass --overwrite to replace it")
    writer = GGUFWriter(None, GGUF_ARCH)
    for k, v in metadata.items():
        writer.add_string(k, str(v))
    keys = list(entries)
    for k in keys:
        e, bt = entries[k], block_types.get(k)
        if bt is not None:
            qtype = GGMLQuantizationType(bt.ggml_type)
        elif e.dtype in GGUF_DENSE_TYPES:
            qtype = GGMLQuantizationType(GGUF_DENSE_TYPES[e.dtype])
        else:
            raise ValueError(f"{k}: dtype {e.dtype} cannot be stored in a .gguf")
        # byte shape (the writer turns it into the element shape of `qtype`): packed blocks as they are,
        # a dense tensor's last axis times its element size
        shape = e.shape if bt is not None else (*e.shape[:-1], e.shape[-1] * e.dtype.itemsize)
        writer.add_tensor_info(k, shape, np.dtype(np.uint8), math.prod(shape), raw_dtype=qtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        (fout,) = writer.fout
        for i, k in enumerate(keys):
            e = entries[k]
            t = e.load()
            if tuple(t.shape) != tuple(e.shape) or t.dtype != e.dtype:
                raise ValueError(f"{k}: produced {tuple(t.shape)} {t.dtype}, declared {e.shape} {e.dtype}")
            data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            # as GGUFWriter.write_tensor_data, but a plain file write, whose OSError carries the errno
            # (numpy's tofile reports a full disk without one)
            writer.write_padding(fout, fout.tell())
            fout.write(memoryview(data))
            writer.write_padding(fout, data.nbytes)
            del t, data
            if progress:
                progress(i + 1, len(keys))
        writer.flush()
        for f in writer.fout:
            os.fsync(f.fileno())
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------------------------------------
# CLI


def add_cli_command(sub) -> None:
    """Register the `convert` subcommand on an argparse subparsers object."""
    from .options import add_argument

    c = sub.add_parser("convert", help="rewrite NSARM.pth as bf16 safetensors, or as a block-quantised .gguf")
    c.add_argument("src", help="NSARM.pth, an Infinity weights file / shard folder, or a .safetensors")
    c.add_argument("-o", "--output", required=True, help="output file: .safetensors for bf16 / fp16 / fp32, "
                   f".gguf for {' / '.join(BLOCK_FORMATS)}")
    c.add_argument("--format", choices=CONVERT_FORMATS, default=None,
                   help="bf16 / fp16 / fp32: dense blocks in that dtype, rest fp32 (.safetensors); "
                        + "; ".join(f"{n}: {weights.FORMATS[n].note}" for n in BLOCK_FORMATS)
                        + " (.gguf, rest fp32, other block tensors bf16). Default bf16")
    c.add_argument("--dtype", choices=tuple(DENSE_FORMATS), default=None,
                   help="block dtype of a dense output (same as --format bf16 / fp16 / fp32; kept for old "
                        "command lines)")
    c.add_argument("--overwrite", action="store_true")
    add_argument(c, "strict")
    c.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .bench import peak_rss_bytes
    from .files import check_output_file

    if args.format and args.dtype and args.format != args.dtype:
        raise ValueError(f"--dtype {args.dtype} contradicts --format {args.format}; give only --format")
    fmt = args.format or args.dtype or "bf16"
    out = Path(args.output)
    if out.suffix.lower() not in output_suffixes(fmt):
        raise ValueError(f"{out}: the output of --format {fmt} must be a {output_suffixes(fmt)[0]} file")
    check_output_file(out, args.overwrite, "-o")
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            sys.stderr.write(f"\rconvert: {done}/{total} tensors")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    try:
        info = convert_checkpoint(args.src, out, fmt, overwrite=args.overwrite, strict=args.strict,
                                  progress=progress)
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    except OSError as e:  # e.g. the disk filled up: no partial file is left; name the output
        if e.filename is None or Path(str(e.filename)).name.startswith(f".{out.name}."):
            raise OSError(e.errno, e.strerror, str(out)) from None
        raise
    blocks = fmt if fmt in DENSE_FORMATS else f"{fmt} ({weights.FORMATS[fmt].note}), other block tensors bf16"
    print(f"{args.src} -> {info['path']}: {info['tensors']} tensors, {info['bytes'] / 1e9:.2f} GB "
          f"(source {info['source_bytes'] / 1e9:.2f} GB), blocks {blocks}, rest fp32, verified, "
          f"{time.perf_counter() - t0:.1f}s, peak RSS {peak_rss_bytes() / 1e9:.2f} GB")
    return 0
