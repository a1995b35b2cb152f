"""`python -m nsarm_nodes bench` (speed and memory); `convert` lives in convert.py.

Bench cases (each run on the fast path and the reference path in the same process, so their
ratio is meaningful):
  single  one 256x256 LR image -> 1024x1024 through NSARMPipeline (or, with a reduced --pn, the
          same stages driven directly at the smaller output size);
  tiled   one 1024x1024 LR image -> 4096x4096: 16 tiles (no overlap), through NSARMPipeline.
Paths:
  fast       prefill=True (the 7 known scales in one block-causal pass), tiles batched
             (--tile-batch-size, default all tiles, reduced to what the memory estimate fits);
  reference  prefill=False (scale by scale, as upstream), one tile at a time.

Per-stage times: VAE encode, transformation network, scales 0-6 (text conditioning + prefill, or
the 7 step-by-step scales), every generated scale, VAE decode, colour fix, and the rest (tiling,
blending, resize). On CUDA they come from CUDA events recorded in module hooks / the progress
callback (no synchronisation inside the run; one torch.cuda.synchronize at its end); on CPU from
perf_counter. Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the process's peak RSS
(VmHWM from /proc, reset per case via /proc/self/clear_refs where allowed) and, with
--track-tensors, the exact peak of live tensor bytes. Every case also prints the analytic
estimate of `lowvram.memory_required` for comparison.

Models: `--preset tiny` (default; random weights, CPU friendly), `--preset nsarm-8b
--random-weights` (the real shapes with random weights built directly on the device; CUDA only,
or --allow-cpu with a reduced --pn and/or --depth), or `--models DIR` for real weight files. The
prompt is a synthetic embedding of --text-tokens tokens (T5 is not part of the timed pipeline).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .options import WEIGHT_FORMATS

CASES = ("single", "tiled")
PATHS = ("fast", "reference")
BUCKETS = ("0.06M", "0.25M", "0.60M", "1M")


# ---------------------------------------------------------------------------------------------
# CLI wiring (called from __main__.build_parser)


def add_cli_commands(sub) -> None:
    """Register the `bench` and `convert` (convert.py) subcommands on an argparse subparsers object."""
    b = sub.add_parser("bench", help="per-stage speed and peak memory (tiny model on CPU, NSARM-8B on a GPU)")
    b.add_argument("--preset", choices=("tiny", "nsarm-8b"), default="tiny")
    b.add_argument("--random-weights", action="store_true", help="random weights of the preset's shapes "
                   "(the default for tiny; required for nsarm-8b without --models)")
    b.add_argument("--models", default=None, help="models folder with real weights (ComfyUI layout)")
    b.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    b.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="block compute dtype (auto: bf16 on CUDA GPUs with bf16, else fp32; as upscale)")
    b.add_argument("--weight-format", choices=WEIGHT_FORMATS, default="dense",
                   help="block weight storage (weights.FORMATS; fp8 = q8_0, kept for old command lines)")
    b.add_argument("--blocks-on-cpu", type=int, default=0, help="block swapping: blocks kept in CPU memory")
    b.add_argument("--offload-text-and-map", action="store_true",
                   help="keep the text path and transformation network on the CPU between calls")
    b.add_argument("--cases", default="single", help=f"comma list of {CASES} (default single)")
    b.add_argument("--paths", default="fast,reference", help=f"comma list of {PATHS}")
    b.add_argument("--tile-batch-size", type=int, default=0, help="fast path tile batch (0: all tiles, "
                   "limited by the memory estimate on CUDA)")
    b.add_argument("--warmup", type=int, default=1)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--pn", choices=BUCKETS, default="1M", help="scale schedule of the single case (1M = 1024 px)")
    b.add_argument("--depth", type=int, default=None, help="use only the first N blocks (random weights; smoke runs)")
    b.add_argument("--text-tokens", type=int, default=128, help="prompt length of the synthetic embedding")
    b.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance (NSARM: 1)")
    b.add_argument("--allow-cpu", action="store_true", help="allow nsarm-8b on CPU (needs a reduced --pn)")
    b.add_argument("--track-tensors", action="store_true", help="CPU: exact peak of live tensor bytes (slower)")
    b.add_argument("--check-syncs", choices=("auto", "on", "off"), default="auto",
                   help="CUDA: count host-device syncs inside the scale loop (auto: on for CUDA)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default=None, help="also write the report as JSON to this path")
    b.add_argument("--suite", choices=("none", "gpu"), default="none",
                   help="gpu: the prepared GPU run (bf16 single+tiled on both paths, then the low-VRAM variants "
                        "bf16+offload, q8_0+offload, 3/4 of the blocks on CPU+offload, then equivalence checks: "
                        "block swap == resident, q8_0 vs bf16 logits, fast vs reference logits)")
    b.add_argument("--scales", type=int, default=None, help="real-size CPU benchmark (with --preset nsarm-8b "
                   "--random-weights): write an 8B-shaped checkpoint, load it, run the first N scales (realsize_bench)")
    b.add_argument("--blocks", type=int, default=None, help="--scales: write only the first K blocks (real widths)")
    b.add_argument("--pth", action="store_true", help="--scales: an all-fp32 torch .pth instead of bf16 safetensors")
    b.add_argument("--keep", default=None, help="--scales: folder for the temporary checkpoint (default: system temp)")
    b.set_defaults(func=cmd_bench)

    from .convert import add_cli_command

    add_cli_command(sub)


def cmd_bench(args) -> int:
    if args.scales is not None:
        from .realsize_bench import cmd_realsize

        return cmd_realsize(args)
    options = BenchOptions.from_args(args)
    if args.suite == "gpu":
        report = run_suite(options, print_fn=lambda text: print(text, flush=True))
    else:
        report = run_bench(options)
        print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# Memory readings (no psutil)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM from /proc (resettable), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def current_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Options and models


@dataclass
class BenchOptions:
    preset: str = "tiny"
    random_weights: bool = True
    models: str | None = None
    device: str | None = None
    dtype: str = "auto"
    weight_format: str = "dense"
    blocks_on_cpu: int = 0
    offload_text_and_map: bool = False
    cases: tuple[str, ...] = ("single",)
    paths: tuple[str, ...] = PATHS
    tile_batch_size: int = 0
    warmup: int = 1
    repeats: int = 3
    pn: str = "1M"
    depth: int | None = None
    text_tokens: int = 128
    cfg: float = 1.0
    allow_cpu: bool = False
    track_tensors: bool = False
    check_syncs: str = "auto"
    seed: int = 0

    @classmethod
    def from_args(cls, a) -> BenchOptions:
        def split(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
            items = tuple(x.strip() for x in text.split(",") if x.strip())
            bad = [x for x in items if x not in allowed]
            if bad or not items:
                raise ValueError(f"--{what} takes a comma list of {allowed}, got {text!r}")
            return items

        return cls(preset=a.preset, random_weights=a.random_weights or a.models is None, models=a.models,
                   device=a.device, dtype=a.dtype, weight_format=a.weight_format, blocks_on_cpu=a.blocks_on_cpu,
                   offload_text_and_map=a.offload_text_and_map, cases=split(a.cases, CASES, "cases"),
                   paths=split(a.paths, PATHS, "paths"), tile_batch_size=a.tile_batch_size, warmup=a.warmup,
                   repeats=a.repeats, pn=a.pn, depth=a.depth, text_tokens=a.text_tokens, cfg=a.cfg,
                   allow_cpu=a.allow_cpu, track_tensors=a.track_tensors, check_syncs=a.check_syncs, seed=a.seed)


def _check_options(o: BenchOptions, device) -> None:
    if o.repeats < 1 or o.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    if o.text_tokens < 1:
        raise ValueError("--text-tokens must be >= 1")
    if o.models is None and not o.random_weights:
        raise ValueError("give --models DIR (real weights) or --random-weights")
    if o.preset == "nsarm-8b" and device.type != "cuda":
        if not o.allow_cpu:
            raise ValueError(
                "the nsarm-8b preset needs a CUDA GPU (17.5 GB of bf16 weights, ~1e14 FLOP per 1024x1024 "
                "image); no GPU is available here. Run it on a GPU, or pass --allow-cpu together with a reduced "
                "schedule (--pn 0.06M or 0.25M) and ideally --depth 2 for a smoke run"
            )
        if o.pn == "1M" or "tiled" in o.cases:
            raise ValueError("--allow-cpu runs nsarm-8b only on a reduced schedule: pass --pn 0.06M/0.25M/0.60M "
                             "and --cases single")
    if "tiled" in o.cases and o.pn != "1M":
        raise ValueError("the tiled case makes 4096x4096 through the pipeline and needs --pn 1M")
    if o.depth is not None and o.models is not None:
        raise ValueError("--depth applies to random weights only")


def _random_value(name: str, shape: tuple[int, ...], dtype, device, gen):
    """Seeded weights keeping activations O(1): matrices ~ N(0, 1/fan_in), norm gains ~ 1, else small."""
    import torch

    if len(shape) >= 2:
        std = 1.0 / math.sqrt(math.prod(shape[1:]))
        return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(std)
    t = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(0.02)
    if "norm" in name and name.endswith("weight"):
        t.add_(1.0)
    return t


def random_state(module, device, dtype_for, seed: int = 0, skip=()):
    """A LazyStateDict of random tensors for `module`'s keys, generated on `device` when read."""
    import torch

    from .loading import LazyEntry, LazyStateDict

    gen = torch.Generator(device=device).manual_seed(seed)
    entries = {}
    for name, t in module.state_dict().items():
        if any(name.endswith(s) for s in skip) or not t.is_floating_point():
            continue
        dt = dtype_for(name)
        entries[name] = LazyEntry(functools.partial(_random_value, name, tuple(t.shape), dt, device, gen),
                                  tuple(t.shape), dt)
    return LazyStateDict(entries, "<random weights>")


@dataclass
class Models:
    transformer: object
    vae: object
    source: str
    load_seconds: float


def load_models(o: BenchOptions, device, dtype) -> Models:
    import torch

    from .config import PRESETS
    from .transformer import Infinity, load_transformer
    from .vae import BSQVAE, load_vae

    t0 = time.perf_counter()
    kw = dict(weight_format=o.weight_format, blocks_on_cpu=o.blocks_on_cpu,
              offload_text_and_map=o.offload_text_and_map)
    if o.models is not None:
        from .pipeline import WEIGHTS, MissingModelsError, find_weight, missing_models_message

        root = Path(o.models)
        found = {spec.role: find_weight(root, spec) for spec in WEIGHTS}
        missing = [r for r in ("transformer", "vae") if found[r] is None]
        if missing:
            raise MissingModelsError(missing_models_message(root, missing))
        transformer = load_transformer(found["transformer"], device=device, dtype=dtype, **kw)
        vae = load_vae(found["vae"], device=device, dtype=dtype)
        return Models(transformer, vae, f"weights from {root}", time.perf_counter() - t0)
    preset = PRESETS[o.preset]
    tcfg = preset.transformer
    if o.depth is not None:
        if not 1 <= o.depth <= tcfg.depth:
            raise ValueError(f"--depth must be in 1..{tcfg.depth}")
        from dataclasses import replace

        tcfg = replace(tcfg, depth=o.depth, block_chunks=o.depth)
    with torch.device("meta"):
        meta_t = Infinity(tcfg)
        meta_v = BSQVAE(preset.vae)
    gen_dtype = dtype if dtype != torch.float32 else torch.float32
    sd_t = random_state(meta_t, device, lambda n: gen_dtype if n.startswith("block_chunks.") else torch.float32,
                        o.seed, skip=("zero_k_bias",))
    transformer = load_transformer(sd_t, device=device, dtype=dtype, **kw)
    sd_v = random_state(meta_v, device, lambda n: torch.float32, o.seed + 1)
    vae = load_vae(sd_v, device=device, dtype=dtype)
    depth = f", first {o.depth} blocks" if o.depth is not None else ""
    return Models(transformer, vae, f"random weights, {o.preset} shapes{depth}", time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Timing


class StageClock:
    """Named intervals from marks: CUDA events (no sync until `resolve`) or perf_counter."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.device = device
        self._torch = torch
        self.intervals: list[tuple[str, object, object]] = []
        self._open: dict[str, object] = {}

    def mark(self):
        if self.cuda:
            ev = self._torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._open[name] = self.mark()

    def stop(self, name: str) -> object:
        m = self.mark()
        self.intervals.append((name, self._open.pop(name), m))
        return m

    def add(self, name: str, a, b) -> None:
        self.intervals.append((name, a, b))

    def resolve(self) -> dict[str, float]:
        """Seconds per stage name (summed over repeated intervals, e.g. one per tile batch)."""
        if self.cuda:
            self._torch.cuda.synchronize(self.device)
        out: dict[str, float] = {}
        for name, a, b in self.intervals:
            dt = a.elapsed_time(b) / 1000 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + dt
        return out


class Instrument:
    """Hooks on the VAE encoder/decoder and the transformation network, a wrapped colour fix, and a
    progress callback that closes one interval per scale (scales 0..K-1 as one stage)."""

    def __init__(self, transformer, vae, clock: StageClock, n_scales: int, K: int, sync_check: bool = False):
        self.clock, self.n, self.K = clock, n_scales, K
        self.handles = []
        self.last = None  # mark where the current sampling interval starts
        self.sync_check = sync_check
        self._sync_on = False
        for name, mod in (("vae_encode", vae.encoder), ("vae_decode", vae.decoder),
                          ("map_network", transformer.map_net)):
            if mod is None:
                continue
            self.handles.append(mod.register_forward_pre_hook(functools.partial(self._pre, name)))
            self.handles.append(mod.register_forward_hook(functools.partial(self._post, name)))

    def _pre(self, name, _m, _a):
        self.clock.start(name)

    def _post(self, name, _m, _a, _o):
        m = self.clock.stop(name)
        if name == "map_network":
            self.last = m

    def progress(self, done: int, total: int) -> None:
        """Pipeline convention: done = chunk * n_scales + si + 1."""
        si = (done - 1) % self.n
        if si < self.K - 1:
            return
        m = self.clock.mark()
        name = f"scales 0-{self.K - 1}" if si == self.K - 1 else f"scale {si}"
        if self.last is not None:
            self.clock.add(name, self.last, m)
        self.last = m
        if self.sync_check:
            import torch

            if si == self.K - 1 and si < self.n - 1:
                torch.cuda.set_sync_debug_mode("warn")
                self._sync_on = True
            elif si == self.n - 1 and self._sync_on:
                torch.cuda.set_sync_debug_mode("default")
                self._sync_on = False

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        if self._sync_on:
            import torch

            torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class CaseRun:
    stages: dict[str, float]
    total: float


@dataclass
class CaseResult:
    case: str
    path: str
    tiles: int
    tile_batch: int
    output: tuple[int, int]
    runs: list[CaseRun] = field(default_factory=list)
    peak: dict[str, float] = field(default_factory=dict)
    estimate: dict[str, float] = field(default_factory=dict)
    tokens_per_tile: int = 0
    syncs_in_loop: int | None = None


def _lr_image(size: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, size // 8, size // 8, generator=g)
    img = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    return img.permute(0, 2, 3, 1).contiguous()


def run_bench(o: BenchOptions) -> dict:
    import torch

    from . import colorfix, lowvram
    from . import pipeline as pipeline_mod
    from . import sampler as sampler_mod
    from .config import NUM_REPLACED_SCALES
    from .pipeline import NSARMPipeline
    from .precision import resolve_dtype
    from .schedule import output_pixels, scale_schedule, token_counts
    from .text import PromptEmbeds

    device = torch.device(o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {o.device}: CUDA is not available on this machine")
    _check_options(o, device)
    dtype = resolve_dtype(o.dtype, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference numerics; bf16 matmuls unaffected
    models = load_models(o, device, dtype)
    transformer, vae = models.transformer, models.vae
    pipe = NSARMPipeline(transformer, vae)
    cfgm = transformer.cfg
    gen = torch.Generator().manual_seed(o.seed)
    kv = torch.randn(o.text_tokens, cfgm.text_channels, generator=gen)
    base_text = PromptEmbeds.from_lengths(kv, [o.text_tokens], ["<synthetic>"])
    pipe.encode_prompts = lambda prompts: PromptEmbeds.cat([base_text] * len(prompts))
    schedule = scale_schedule(1.0, o.pn)
    n_scales = len(schedule)
    K = min(NUM_REPLACED_SCALES, n_scales) if transformer.map_net is not None else 1
    tokens = sum(token_counts(schedule))
    check_syncs = cuda and o.check_syncs != "off"

    results: list[CaseResult] = []
    for case in o.cases:
        lr_side = 1024 if case == "tiled" else 256
        tiles = 16 if case == "tiled" else 1
        lr = _lr_image(lr_side, o.seed)
        for path in o.paths:
            prefill = path == "fast"
            batch = 1 if path == "reference" else (o.tile_batch_size or tiles)
            batch = min(batch, tiles)
            est_kw = dict(vae=vae.config, vae_dtype=dtype, schedule=schedule, cfg_scale=o.cfg,
                          text_tokens=o.text_tokens, weight_format=o.weight_format,
                          blocks_on_cpu=o.blocks_on_cpu, offload_text_and_map=o.offload_text_and_map,
                          prefill=prefill)
            if cuda and path == "fast" and o.tile_batch_size == 0 and tiles > 1:
                free, _total = torch.cuda.mem_get_info(device)
                budget = torch.cuda.memory_allocated(device) + int(0.9 * free)
                batch = min(batch, lowvram.max_tile_batch(cfgm, budget, dtype, limit=tiles, **est_kw))
            est = lowvram.memory_required(cfgm, batch, dtype, **est_kw)
            res = CaseResult(case, path, tiles, batch, output_pixels(schedule) if case == "single" else (4096, 4096),
                             tokens_per_tile=tokens)
            res.estimate = {"peak_GB": est.peak / 1e9, "weights_GB": est.weights / 1e9,
                            "sampling_GB": est.sampling / 1e9, "decode_GB": est.decode / 1e9,
                            "kv_cache_GB": est.kv_cache / 1e9}

            def once(clock_sync_check: bool = False) -> tuple[CaseRun, int]:
                clock = StageClock(device)
                inst = Instrument(transformer, vae, clock, n_scales, K, sync_check=clock_sync_check)
                samp = functools.partial(sampler_mod.sample, prefill=prefill)
                fix = colorfix.color_fix

                def timed_fix(*a, **k):
                    clock.start("colour_fix")
                    out = fix(*a, **k)
                    clock.stop("colour_fix")
                    return out

                n_warn = 0
                import warnings

                with warnings.catch_warnings(record=True) as caught, _patched(pipeline_mod, "sample", samp), \
                        _patched(colorfix, "color_fix", timed_fix):
                    warnings.simplefilter("always")
                    try:
                        t0 = clock.mark()
                        if case == "single" and o.pn != "1M":
                            _direct_single(pipe, lr, base_text, schedule, prefill, o, inst)
                        else:
                            pipe(lr, seed=o.seed, cfg=o.cfg, tile_overlap=0, tile_batch_size=batch,
                                 progress=inst.progress)
                        t1 = clock.mark()
                    finally:
                        inst.close()
                    n_warn = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
                clock.add("total", t0, t1)
                times = clock.resolve()
                total = times.pop("total")
                times["other (tiling, text, transfers)"] = max(0.0, total - sum(times.values()))
                return CaseRun(times, total), n_warn

            for _ in range(o.warmup):
                once()
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base_alloc = torch.cuda.memory_allocated(device)
            rss_reset = reset_peak_rss()
            rss_before = current_rss_bytes()
            tracker = lowvram.TensorMemoryTracker() if (o.track_tensors and not cuda) else None
            with tracker or contextlib.nullcontext():
                for _ in range(o.repeats):
                    res.runs.append(once()[0])
            if cuda:
                res.peak = {"cuda_max_allocated_GB": torch.cuda.max_memory_allocated(device) / 1e9,
                            "cuda_max_reserved_GB": torch.cuda.max_memory_reserved(device) / 1e9,
                            "cuda_resident_before_GB": base_alloc / 1e9}
            else:
                res.peak = {"peak_rss_GB": peak_rss_bytes() / 1e9, "rss_before_GB": rss_before / 1e9,
                            "rss_peak_reset": rss_reset}
                if tracker is not None:
                    weights = sum(t.numel() * t.element_size() for m in (transformer, vae)
                                  for t in m.state_dict().values())
                    res.peak["tensor_peak_GB"] = (tracker.peak + weights) / 1e9
            if check_syncs and path == "fast" and case == o.cases[0]:
                res.syncs_in_loop = once(clock_sync_check=True)[1]
            results.append(res)
    return _report(o, models, device, dtype, results)


def _direct_single(pipe, lr, text, schedule, prefill, o, inst) -> None:
    """The single case at a reduced schedule: encode -> sample -> decode -> colour fix, as the
    pipeline does for 1M (used for CPU smoke runs of the big preset)."""
    from . import colorfix
    from .sampler import sample

    feats = pipe.encode_lr(lr)
    n = len(schedule)
    res = sample(pipe.transformer, pipe.vae, text, feats, seed=o.seed, cfg=o.cfg, schedule=schedule,
                 prefill=prefill, progress=lambda si, _n: inst.progress(si + 1, n))
    img = pipe.decode(res.summed_codes)
    colorfix.color_fix(img.permute(0, 3, 1, 2), lr.permute(0, 3, 1, 2).to(img.device), "adain+wavelet")


def _median_stages(runs: list[CaseRun]) -> dict[str, float]:
    names = list(runs[0].stages)
    return {n: statistics.median(r.stages.get(n, 0.0) for r in runs) for n in names}


def _report(o: BenchOptions, models: Models, device, dtype, results: list[CaseResult]) -> dict:
    import platform

    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        machine = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, " \
                  f"{os.cpu_count()} cores visible"
    rows = []
    for r in results:
        stages = _median_stages(r.runs)
        total = statistics.median(x.total for x in r.runs)
        transformer_s = sum(v for k, v in stages.items() if k.startswith("scale"))
        rows.append({
            "case": r.case, "path": r.path, "tiles": r.tiles, "tile_batch": r.tile_batch,
            "output": f"{r.output[1]}x{r.output[0]}", "total_s": total, "stages_s": stages,
            "transformer_s": transformer_s, "tokens_per_tile": r.tokens_per_tile,
            "tokens_per_s": r.tiles * r.tokens_per_tile / transformer_s if transformer_s > 0 else None,
            "repeats": len(r.runs), "peak": r.peak, "estimate": r.estimate, "syncs_in_scale_loop": r.syncs_in_loop,
        })
    ratios = {}
    for case in {r["case"] for r in rows}:
        by = {r["path"]: r for r in rows if r["case"] == case}
        if "fast" in by and "reference" in by and by["fast"]["total_s"] > 0:
            ratios[case] = {"reference_over_fast_total": by["reference"]["total_s"] / by["fast"]["total_s"],
                            "reference_over_fast_transformer": by["reference"]["transformer_s"] / by["fast"]["transformer_s"]}
    return {
        "command": "python -m nsarm_nodes " + " ".join(sys.argv[1:]) if sys.argv and "bench" in sys.argv else None,
        "machine": machine, "device": str(device), "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
        "models": models.source, "load_s": models.load_seconds, "weight_format": o.weight_format,
        "blocks_on_cpu": o.blocks_on_cpu, "offload_text_and_map": o.offload_text_and_map, "pn": o.pn,
        "warmup": o.warmup, "cfg": o.cfg, "text_tokens": o.text_tokens, "results": rows, "ratios": ratios,
    }


def format_report(rep: dict) -> str:
    lines = [f"NSARM bench: {rep['models']}; {rep['machine']}; torch {rep['torch']}; device {rep['device']}; "
             f"blocks {rep['dtype']} ({rep['weight_format']}), blocks_on_cpu={rep['blocks_on_cpu']}, "
             f"offload_text_and_map={rep['offload_text_and_map']}, cfg={rep['cfg']}, schedule {rep['pn']}, "
             f"load {rep['load_s']:.1f}s, warm-up {rep['warmup']}"]
    for r in rep["results"]:
        lines.append(f"\n[{r['case']} / {r['path']}] {r['tiles']} tile(s) -> {r['output']}, tile batch {r['tile_batch']}, "
                     f"median of {r['repeats']}")
        for name, s in r["stages_s"].items():
            lines.append(f"  {name:<34} {s * 1000:10.1f} ms")
        lines.append(f"  {'total':<34} {r['total_s'] * 1000:10.1f} ms")
        if r["tokens_per_s"]:
            lines.append(f"  transformer tokens/s               {r['tokens_per_s']:10.0f}  "
                         f"({r['tiles']} x {r['tokens_per_tile']} tokens in {r['transformer_s'] * 1000:.1f} ms)")
        peak = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["peak"].items())
        lines.append(f"  peak memory: {peak}")
        est = ", ".join(f"{k} {v:.3f}" for k, v in r["estimate"].items())
        lines.append(f"  estimate (lowvram.memory_required): {est}")
        if r["syncs_in_scale_loop"] is not None:
            lines.append(f"  host-device syncs inside the scale loop: {r['syncs_in_scale_loop']}")
    for case, q in rep["ratios"].items():
        lines.append(f"\nreference / fast ({case}): total x{q['reference_over_fast_total']:.2f}, "
                     f"transformer x{q['reference_over_fast_transformer']:.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The prepared GPU suite


def suite_variants(o: BenchOptions, depth: int, cuda: bool) -> list[tuple[str, dict]]:
    """(label, option overrides): the main run, then the low-VRAM variants against their targets
    (the targets are NSARM-8B's on a GPU, in bf16)."""
    swap = min(depth, max(1, round(depth * 0.75)))
    single_fast = dict(cases=("single",), paths=("fast",))
    tiled = o.pn == "1M" and (cuda or "tiled" in o.cases)
    return [
        ("all resident (8B target: <= 0.5 s per 1024^2 on H200 bf16, 4096^2 in <= 12 s)",
         dict(cases=("single", "tiled") if tiled else ("single",), paths=("fast", "reference"))),
        ("text path + map network offloaded (8B target: peak <= 22 GB)",
         dict(single_fast, offload_text_and_map=True)),
        ("q8_0 weights + offloaded (8B target: peak <= 14 GB)",
         dict(single_fast, weight_format="q8_0", offload_text_and_map=True)),
        (f"{swap} of {depth} blocks on CPU + offloaded (8B target: peak <= 10 GB)",
         dict(single_fast, blocks_on_cpu=swap, offload_text_and_map=True)),
    ]


def run_suite(o: BenchOptions, print_fn=print) -> dict:
    import dataclasses
    import gc

    import torch

    from .config import PRESETS

    depth = o.depth or PRESETS[o.preset].transformer.depth
    cuda = torch.device(o.device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    out = {"variants": [], "checks": None}
    for label, overrides in suite_variants(o, depth, cuda):
        opts = dataclasses.replace(o, **overrides)
        print_fn(f"\n=== {label} ===")
        rep = run_bench(opts)
        rep["label"] = label
        print_fn(format_report(rep))
        out["variants"].append(rep)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print_fn("\n=== equivalence checks ===")
    out["checks"] = equivalence_checks(o, depth)
    print_fn(json.dumps(out["checks"], indent=2))
    return out


def equivalence_checks(o: BenchOptions, depth: int) -> dict:
    """On the benchmarked shapes and device: block swapping (+ offloading) gives the resident
    model's result exactly; q8_0 weights and the reference path give logits close to the bf16 fast path
    (teacher-forced on its bits, so every scale sees the same inputs)."""
    import dataclasses
    import gc

    import torch

    device = torch.device(o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _check_options(o, device)
    from .pipeline import NSARMPipeline
    from .precision import resolve_dtype

    dtype = resolve_dtype(o.dtype, device)
    from .sampler import sample
    from .schedule import scale_schedule

    def rel(a, b) -> float:
        return float((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-12))

    base = dataclasses.replace(o, weight_format="dense", blocks_on_cpu=0, offload_text_and_map=False)
    models = load_models(base, device, dtype)
    gen = torch.Generator().manual_seed(o.seed)
    text = (torch.randn(o.text_tokens, models.transformer.cfg.text_channels, generator=gen),
            torch.tensor([0, o.text_tokens], dtype=torch.int32))
    feats = NSARMPipeline(models.transformer, models.vae).encode_lr(_lr_image(256, o.seed))
    schedule = scale_schedule(1.0, o.pn)
    kw = dict(seed=o.seed, schedule=schedule, return_logits=True)
    ref = sample(models.transformer, None, text, feats, **kw)
    forced = [b.to(device) for b in ref.bits]
    slow = sample(models.transformer, None, text, feats, prefill=False, forced_bits=forced, **kw)
    checks = {"reference_vs_fast_max_rel_logit_diff": max(rel(a, b) for a, b in zip(ref.logits, slow.logits))}
    del models, slow
    gc.collect()
    swap = min(depth, max(1, round(depth * 0.75)))
    for name, over in (("block_swap", dict(blocks_on_cpu=swap, offload_text_and_map=True)),
                       ("q8_0", dict(weight_format="q8_0"))):
        m = load_models(dataclasses.replace(base, **over), device, dtype).transformer
        if name == "block_swap":
            res = sample(m, None, text, feats, **kw)
            checks["block_swap_identical_bits"] = all(torch.equal(a, b) for a, b in zip(ref.bits, res.bits))
            checks["block_swap_max_abs_latent_diff"] = float((ref.summed_codes - res.summed_codes).abs().max())
            checks["block_swap_loads"] = m.swapper.loads
            checks["block_swap_max_resident"] = m.swapper.max_resident
        else:
            res = sample(m, None, text, feats, forced_bits=forced, **kw)
            checks["q8_0_vs_bf16_max_rel_logit_diff_per_scale"] = [round(rel(a, b), 5) for a, b in zip(ref.logits, res.logits)]
        del m, res
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return checks
