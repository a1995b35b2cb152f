"""One table of every user-settable option: type, default, bounds or choices, help text.

The command line builds its arguments (and ``--help``, defaults included) from it, ``nodes.py``
builds its widget definitions (default / min / max / step / tooltip) from it, and both the nodes
and the headless runner validate values against it before any weights load. A value that is NaN,
infinite, out of range, of the wrong type or not one of the choices is an `OptionError` naming
where it came from (a CLI flag, or a node and input) and what is allowed.

Adding an option is one `Option(...)` line in `TABLE`. This module imports neither torch nor
ComfyUI at import time (the CLI's ``--help`` and the stdlib-only queue client use it).
"""
from __future__ import annotations

import argparse
import math
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

INT, FLOAT, CHOICE, BOOLEAN, TEXT = "INT", "FLOAT", "CHOICE", "BOOLEAN", "TEXT"

MAX_SEED = 0xFFFFFFFFFFFFFFFF  # seeds wrap modulo 2^64 in the sampler
DEFAULT_SERVER = "http://127.0.0.1:8188"
DEFAULT_MAX_PIXELS = 50_000_000  # input images above this are refused before decoding (--max-pixels)

# Choice lists the library modules share (colorfix.METHODS, tiling.BLEND_MODES, canvas.TILING_MODES are these).
COLOR_FIX_METHODS = ("adain+wavelet", "adain", "wavelet", "none")
BLEND_MODES = ("cosine", "linear", "none")
TILING_MODES = ("shared", "independent")
NEXT_SCALE_MODES = ("area", "trilinear")
DTYPES = ("auto", "bf16", "fp16", "fp32")
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # auto: precision.resolve_dtype
ATTENTION_KERNELS = ("auto", "math")
# Block weight storage (weights.FORMATS; "fp8", the value of old saved workflows, now loads q8_0).
WEIGHT_FORMATS = ("dense", "fp8", "q8_0_mixed", "q8_0", "q5_1_mixed", "q5_1", "q4_1")
# Output image formats by file extension (Pillow format names).
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF",
                  ".tiff": "TIFF", ".bmp": "BMP"}


class OptionError(ValueError):
    """A CLI option or node input with a value outside what the option table allows."""


@dataclass(frozen=True)
class Option:
    """One option. `parse` turns a TEXT option's string into its value (raising OptionError)."""

    name: str
    kind: str
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple = ()
    step: float | None = None
    parse: Callable[[str], Any] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def allowed(self) -> str:
        """What is allowed, for messages and help: '0.01..5', 'one of a, b', ..."""
        if self.kind == CHOICE:
            return "one of " + ", ".join(self.choices)
        if self.kind in (INT, FLOAT):
            lo = "" if self.min is None else _num(self.min)
            hi = "" if self.max is None else _num(self.max)
            return f"{lo}..{hi}"
        return ""

    def check(self, value: Any, where: str) -> Any:
        """`value` coerced to the option's type, or OptionError naming `where`."""
        if self.kind in (INT, FLOAT):
            return check_number(value, self.kind, self.min, self.max, where)
        if self.kind == CHOICE:
            if value not in self.choices:
                raise OptionError(f"{where}: {value!r} is not {self.allowed()}")
            return value
        if self.kind == BOOLEAN:
            if not isinstance(value, bool):
                raise OptionError(f"{where}: {value!r} is not a boolean (true or false)")
            return value
        if value is None:
            return None
        if not isinstance(value, str):
            raise OptionError(f"{where}: {value!r} is not text")
        if self.parse is None:
            return value
        try:
            return self.parse(value)
        except OptionError as exc:
            raise OptionError(f"{where}: {exc}") from None


def _num(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:g}"


def check_number(value: Any, kind: str, lo: float | None, hi: float | None, where: str) -> int | float:
    """`value` as an INT / FLOAT within [lo, hi]; OptionError for NaN, infinity, wrong type or range.
    Integral floats are accepted for INT (JSON writes 3.0); bools never are numbers here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"{where}: {value!r} is not {'an integer' if kind == INT else 'a number'}")
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"{where}: {value} is not a finite number")
    if kind == INT:
        if isinstance(value, float) and not value.is_integer():
            raise OptionError(f"{where}: {value!r} is not an integer")
        value = int(value)
    else:
        try:
            value = float(value)
        except OverflowError:
            raise OptionError(f"{where}: {value} is too large (allowed: {_num(lo)}..{_num(hi)})") from None
    span = f"{'' if lo is None else _num(lo)}..{'' if hi is None else _num(hi)}"
    if lo is not None and value < lo:
        raise OptionError(f"{where}: {_num(value)} is below the minimum {_num(lo)} (allowed: {span})")
    if hi is not None and value > hi:
        raise OptionError(f"{where}: {_num(value)} is above the maximum {_num(hi)} (allowed: {span})")
    return value


# ---------------------------------------------------------------------------------------------
# Text options with a syntax


def parse_device(text: str) -> str:
    """'cpu', 'cuda', 'cuda:N', 'mps': parsed and checked against this machine (torch imported here)."""
    import torch

    text = text.strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise OptionError(f"{text!r} is not a device; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{text}: CUDA is not available here (no NVIDIA GPU, or this torch is a "
                              f"CPU build); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise OptionError(f"{text}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise OptionError(f"{text}: Apple MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise OptionError(f"{text}: {device.type} devices are not supported; use cpu, cuda, cuda:N or mps")
    return str(device)


def parse_ray_address(text: str) -> str:
    """--ray ADDRESS: `local` (start a Ray instance here), `auto` (the cluster this machine is part
    of), ray://HOST[:PORT] (Ray Client) or HOST:PORT (a head node's GCS)."""
    address = text.strip()
    if address in ("local", "auto"):
        return address
    example = "auto, ray://HOST:10001 or HOST:6379"
    try:
        parts = urllib.parse.urlsplit(address if "://" in address else "ray://" + address)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as exc:
        raise OptionError(f"{text!r}: {exc} (expected {example})") from None
    if parts.scheme != "ray" or not parts.hostname or parts.path or parts.query or parts.fragment:
        raise OptionError(f"{text!r} is not a Ray address (expected {example}; --ray alone starts a local "
                          "instance)")
    if "://" not in address and port is None:
        raise OptionError(f"{text!r} is not a Ray address: a head node needs its port, e.g. {address}:6379 "
                          f"(expected {example})")
    return address


def parse_server_url(text: str) -> str:
    """A ComfyUI base URL: http(s)://host[:port][/prefix], normalised without a trailing slash."""
    server = text.strip().rstrip("/")
    if "://" not in server:
        server = "http://" + server
    try:
        parts = urllib.parse.urlsplit(server)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as exc:
        raise OptionError(f"{text!r}: {exc} (expected e.g. {DEFAULT_SERVER})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OptionError(f"{text!r}: not a ComfyUI server URL (expected e.g. {DEFAULT_SERVER})")
    if port == 0:
        raise OptionError(f"{text!r}: port 0 is not a server port (allowed: 1..65535)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise OptionError(f"{text!r}: give only scheme, host, port and path (e.g. {DEFAULT_SERVER})")
    if any(ord(c) < 33 for c in server):
        raise OptionError(f"{text!r}: the URL contains spaces or control characters")
    return server


# ---------------------------------------------------------------------------------------------
# The table (node input names are the option names, except where nodes say otherwise)

TABLE: dict[str, Option] = {o.name: o for o in (
    # sampling (NSARM Bitwise Decode, NSARM Upscale, upscale)
    Option("seed", INT, 1, "random seed of the bit sampler; tile (or batch item) i uses seed + i", 0, MAX_SEED),
    Option("tau", FLOAT, 0.5, "sampling temperature; NSARM uses 0.5, lower = more deterministic", 0.01, 5.0, step=0.01),
    Option("top_p", FLOAT, 0.97, "bits whose less likely value has probability <= 1 - top_p are decided "
           "deterministically", 0.5, 1.0, step=0.01),
    Option("cfg", FLOAT, 1.0, "classifier-free guidance; NSARM uses 1 (off, fastest)", 0.0, 20.0, step=0.1),
    Option("mode", CHOICE, "area", "next-scale input resampling: area (NSARM) or trilinear (current upstream "
           "Infinity)", choices=NEXT_SCALE_MODES),
    # tiling and output (NSARM Upscale, NSARM Tile / Untile, upscale)
    Option("tile_overlap", INT, 32, "minimum overlap of the 256 px LR tiles, in LR pixels", 0, 128, step=8),
    Option("tile_batch_size", INT, 1, "tiles per transformer pass (faster, more VRAM)", 1, 64),
    Option("color_fix", CHOICE, "adain+wavelet", "colour correction against the whole LR image (NSARM: "
           "adain+wavelet); none turns it off", choices=COLOR_FIX_METHODS),
    Option("output_scale", FLOAT, 4.0, "final scale; below 4 the 4x result is resampled", 1.0, 4.0, step=0.5),
    Option("blend", CHOICE, "cosine", "tile overlap blending; none = hard cut", choices=BLEND_MODES),
    Option("tiling", CHOICE, "shared", "shared: the tiles share one latent canvas, each continues its finished "
           "neighbours and the image is decoded as one (seamless); independent: every tile on its own, blended "
           "in pixel space", choices=TILING_MODES),
    Option("tile_size", INT, 256, "tile side in input pixels; NSARM needs 256", 16, 4096, step=8),
    Option("overlap", INT, 32, "minimum overlap between neighbouring tiles (at most tile_size / 2)", 0, 2048, step=8),
    Option("align", INT, 1, "tile positions on multiples of this; use q for a non-integer upscaler p/q "
           "(e.g. 2 for 2.5x)", 1, 16),
    Option("max_tiles", INT, 64, "refuse inputs needing more 256 px tiles than this (each is a full NSARM run)",
           1, 1_000_000),
    Option("max_pixels", INT, DEFAULT_MAX_PIXELS, "refuse input images with more pixels than this before "
           "decoding them (decompression-bomb guard)", 1, 2**40),
    # model loading (NSARM Model Loader, upscale)
    Option("dtype", CHOICE, "auto", "transformer block weights; auto = bf16 on CUDA GPUs with native bf16, fp32 "
           "on CPU, MPS and older GPUs; fp16 only when chosen (an overflow stops with an error). AdaLN, head and "
           "text path stay fp32", choices=DTYPES),
    Option("attention", CHOICE, "auto", "auto = PyTorch SDPA picks flash/memory-efficient kernels; math = "
           "reference kernel (slow)", choices=ATTENTION_KERNELS),
    Option("weight_format", CHOICE, "dense", "block linear weights stored as GGUF blocks of 32 with their own "
           "scale, dequantised per call, computed in bf16; error at the real width vs bf16's (README): "
           "q8_0_mixed = q8_0 with the q/k/v projection bf16 (9.9 bits/weight, 1.3x); q8_0 (8.5 bits, 1.9x); "
           "q5_1_mixed = q5_1 with q/k/v q8_0 (6.5 bits, 6.5x); q5_1 (6 bits, 11x); q4_1 (5 bits, 20x); "
           "fp8 = q8_0 (old workflows); a .gguf from `convert --format F` loads with the same F",
           choices=WEIGHT_FORMATS),
    Option("blocks_on_cpu", INT, 0, "keep this many transformer blocks in CPU memory and stream them in ahead "
           "of use (less VRAM, slower)", 0, 64),
    Option("offload_text_and_map", BOOLEAN, True, "keep the text path and the transformation network (~2 GB, "
           "used once per run) in CPU memory and move them to the GPU only for that step (ignored on the CPU); "
           "off keeps them on the GPU"),
    Option("strict", BOOLEAN, False, "refuse checkpoints holding tensors the model does not use (default: one "
           "warning naming them, and they are ignored, as upstream loads NSARM.pth non-strictly); missing or "
           "mis-shaped tensors are always an error"),
    Option("device", TEXT, None, "cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)",
           parse=parse_device),
    # ComfyUI server (queue)
    Option("server", TEXT, DEFAULT_SERVER, "ComfyUI URL", parse=parse_server_url),
    Option("timeout", FLOAT, 3600.0, "seconds for the whole job, uploads to downloads", 0.001, 30 * 86400.0),
    # folder jobs (upscale-dir; the Ray options need --ray)
    Option("ray", TEXT, None, "run on Ray Data: no ADDRESS starts a local Ray instance; auto, "
           "ray://HOST:10001 or HOST:6379 joins a running cluster (pip install 'nsarm-comfyui[ray]'; write "
           "--ray=ADDRESS or put it last)",
           parse=parse_ray_address),
    Option("workers", INT, None, "Ray: model replicas (default: one per GPU of the cluster, or 1 without GPUs)",
           1, 4096),
    Option("gpus_per_worker", FLOAT, None, "Ray: GPUs per replica (default 1; 0.5 puts two replicas on each "
           "GPU; a replica never spans GPUs)", 0.01, 1.0),
    Option("cpus_per_worker", FLOAT, None, "Ray: CPUs per replica (default 1 with GPUs, else the cluster's "
           "CPUs / workers)", 0.01, 4096.0),
    # make-test-models
    Option("model_seed", INT, 0, "seed of the random tiny weights", 0, 2**63 - 1),
)}


def option(name: str) -> Option:
    return TABLE[name]


def check(name: str, value: Any, where: str | None = None) -> Any:
    """`value` checked against option `name`; `where` names it in the message (default: its flag)."""
    opt = TABLE[name]
    return opt.check(value, where or opt.flag)


# ---------------------------------------------------------------------------------------------
# ComfyUI widgets


def widget(name: str, **extra: Any) -> tuple:
    """The INPUT_TYPES entry of option `name`: ("INT", {default, min, max, step, tooltip}),
    ([choices], {default, tooltip}) or ("BOOLEAN", {...}). `extra` adds or overrides keys."""
    opt = TABLE[name]
    spec: dict[str, Any] = {"default": opt.default}
    if opt.kind in (INT, FLOAT):
        for key in ("min", "max", "step"):
            if getattr(opt, key) is not None:
                spec[key] = getattr(opt, key)
    spec["tooltip"] = opt.help
    spec.update(extra)
    if opt.kind == CHOICE:
        return list(opt.choices), spec
    if opt.kind in (INT, FLOAT, BOOLEAN):
        return opt.kind, spec
    raise ValueError(f"option {name!r} ({opt.kind}) has no widget")


def _widget_spec(entry: Any) -> tuple[Any, dict]:
    if isinstance(entry, (tuple, list)) and entry:
        opts = entry[1] if len(entry) > 1 and isinstance(entry[1], Mapping) else {}
        return entry[0], dict(opts)
    return entry, {}


def check_widget(where: str, kind: Any, opts: Mapping[str, Any], value: Any) -> Any:
    """A widget value checked against its INPUT_TYPES entry (type, finite, min/max, choices)."""
    if isinstance(kind, (list, tuple)):
        if value not in kind:
            shown = ", ".join(map(repr, list(kind)[:20])) + (" ..." if len(kind) > 20 else "")
            raise OptionError(f"{where}: {value!r} is not one of the choices [{shown}]")
        return value
    if kind in (INT, FLOAT):
        return check_number(value, kind, opts.get("min"), opts.get("max"), where)
    if kind == BOOLEAN and not isinstance(value, bool):
        raise OptionError(f"{where}: {value!r} is not a boolean (true or false)")
    if kind == "STRING" and not isinstance(value, str):
        raise OptionError(f"{where}: {value!r} is not text")
    return value


def check_widgets(node: str, input_types: Mapping[str, Any], values: Mapping[str, Any],
                  skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every widget value of `values` checked against the node's INPUT_TYPES; returns the coerced
    values (only the widget inputs). `skip` names inputs not to check (e.g. file lists)."""
    out = {}
    for section in ("required", "optional"):
        for name, entry in (input_types.get(section) or {}).items():
            if name not in values or name in skip:
                continue
            kind, opts = _widget_spec(entry)
            if isinstance(kind, (list, tuple)) or kind in (INT, FLOAT, BOOLEAN, "STRING"):
                out[name] = check_widget(f"{node}: input {name!r}", kind, opts, values[name])
    return out


# ---------------------------------------------------------------------------------------------
# Command line


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" where there is a default worth showing (not for flags or required options)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """The help formatter of `parser`, printing a (sub-)command's description as written."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...`, exit status 2) and defaults in every help text."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def parser(**kwargs) -> argparse.ArgumentParser:
    """A top-level ArgumentParser whose sub-parsers share its one-line errors and help defaults."""
    return _Parser(**kwargs)


def _cli_type(opt: Option, flag: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if opt.kind in (INT, FLOAT):
            try:
                value = int(text) if opt.kind == INT else float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not {'an integer' if opt.kind == INT else 'a number'} (allowed: {opt.allowed()})"
                ) from None
        else:
            value = text
        try:
            return opt.check(value, flag)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from None

    convert.__name__ = opt.name  # argparse names the type in some messages
    return convert


def add_argument(p: argparse.ArgumentParser, name: str, *flags: str, **overrides: Any) -> argparse.Action:
    """Add option `name` to parser `p` (flag derived from the name unless `flags` are given; the
    parsed value is `args.<name>`); `overrides` replace argparse keywords (e.g. a specific help)."""
    opt = TABLE[name]
    flags = flags or (opt.flag,)
    kwargs: dict[str, Any] = {"default": opt.default, "help": opt.help, "dest": name}
    if opt.kind == BOOLEAN:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif opt.kind == CHOICE:
        kwargs["choices"] = opt.choices
    else:
        kwargs["type"] = _cli_type(opt, flags[0])
        if opt.kind in (INT, FLOAT):
            kwargs["help"] = f"{opt.help} ({opt.allowed()})"
            kwargs["metavar"] = "N" if opt.kind == INT else "X"
    kwargs.update(overrides)
    return p.add_argument(*flags, **kwargs)
