"""GPU benchmark of NSARM-8B shapes with random bf16 weights (under 8 minutes on an H200).

    python scripts/gpu_bench.py --json gpu_bench.json          # on a CUDA machine
    python scripts/gpu_bench.py --tiny --json /tmp/tiny.json    # smoke run on the CPU (tiny preset)

For each loader mode (all resident; the text path + transformation network offloaded, the
default on a GPU; 30 of 40 blocks on the CPU + offloaded) and weight format (dense bf16, and
q8_0_mixed, the 8-bit format that keeps quality), it loads 8B-shaped random weights directly on the device, then runs
one 1024^2 tile at cfg=1 (fast path: prefill + batched scales), and for the resident and default
modes also 4 tiles batched, each followed by the VAE decode. It reports seconds per tile, the time
of every scale (CUDA events, one synchronisation per run), the peak device memory
(torch.cuda.max_memory_allocated, weights included) against `lowvram.memory_required`'s peak, and
the VAE decode time with contiguous vs channels_last activations. Prints a table; --json writes
every figure. Random weights: the speed and memory figures hold for the real weights, not the
image quality.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsarm_nodes import lowvram  # noqa: E402
from nsarm_nodes.bench import BenchOptions, _lr_image, load_models  # noqa: E402
from nsarm_nodes.config import NUM_REPLACED_SCALES  # noqa: E402
from nsarm_nodes.sampler import sample  # noqa: E402
from nsarm_nodes.schedule import scale_schedule, vae_scales  # noqa: E402
from nsarm_nodes.text import PromptEmbeds  # noqa: E402

GB = 1e9
TEXT_TOKENS = 128
SWAPPED_BLOCKS_8B = 30  # the 12 GB recipe of the README: 30 of 40 blocks streamed from the CPU
QUANTIZED_FORMATS = ("q8_0_mixed",)  # the 8-bit format that keeps quality (BENCHMARKS)


class Clock:
    """Wall time of marked points: CUDA events (synchronised once in `read`) or perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def read(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def run_tiles(models, batch: int, schedule, device, seed: int = 0) -> dict:
    """One sampling call on `batch` tiles + their decode; per-scale times and the peak memory."""
    cfgm = models.transformer.cfg
    gen = torch.Generator().manual_seed(seed)
    text = PromptEmbeds.from_lengths(torch.randn(TEXT_TOKENS, cfgm.text_channels, generator=gen), [TEXT_TOKENS],
                                     ["<synthetic>"])
    lr = (_lr_image(256, seed).permute(0, 3, 1, 2) * 2 - 1).repeat(batch, 1, 1, 1).to(device)
    vae = models.vae
    _sync(device)
    _reset_peak(device)
    clock = Clock(device)
    with torch.no_grad():
        clock.mark()
        feats = vae.encode_features(lr)
        clock.mark()
        res = sample(models.transformer, vae, text, feats, seed=seed, schedule=schedule,
                     progress=lambda si, n: clock.mark())
        image = vae.decode(res.summed_codes.to(next(vae.decoder.parameters()).dtype))
        clock.mark()
    spans = clock.read()
    K = min(NUM_REPLACED_SCALES, len(schedule))
    # marks: start, encoded, after each scale (the first K are one prefill pass, marked K times), decoded
    encode, scale_spans, decode = spans[0], spans[1:1 + len(schedule)], spans[-1]
    total = sum(spans)
    return {"batch": batch, "seconds": total, "seconds_per_tile": total / batch, "vae_encode_s": encode,
            "map_net_and_prefill_s": sum(scale_spans[:K]), "scale_s": scale_spans[K:], "vae_decode_s": decode,
            "peak_GB": _peak(device), "output": list(image.shape)}


def decode_layouts(vae, device, side: int) -> dict:
    """VAE decode time of one [1, d, side, side] latent: contiguous vs channels_last (same weights)."""
    out = {}
    z = torch.randn(1, vae.config.codebook_dim, side, side, device=device).sign()
    dtype = next(vae.decoder.parameters()).dtype
    for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        vae.decoder.set_memory_format(fmt)
        with torch.no_grad():
            vae.decode(z.to(dtype))  # warm-up (cuDNN algorithm choice)
            _sync(device)
            t0 = time.perf_counter()
            vae.decode(z.to(dtype))
            _sync(device)
        out[name] = time.perf_counter() - t0
    vae.decoder.set_memory_format(torch.contiguous_format)
    return out


def modes(tiny: bool, depth: int) -> list[tuple[str, dict]]:
    swap = min(SWAPPED_BLOCKS_8B, depth) if not tiny else 1
    rows = [("all resident", dict(offload_text_and_map=False)),
            ("offload text+map (default)", dict(offload_text_and_map=True)),
            (f"{swap} blocks on CPU + offload", dict(blocks_on_cpu=swap, offload_text_and_map=True))]
    return [(f"{fmt} {name}", dict(kw, weight_format=fmt)) for fmt in ("dense",) + QUANTIZED_FORMATS
            for name, kw in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", "--dry-run", action="store_true", dest="tiny",
                    help="tiny preset on the CPU (a smoke run of this script, seconds)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    ap.add_argument("--batches", default="1,4", help="tile batches of the resident and default modes")
    ap.add_argument("--only", default=None, help="run only the modes whose name contains this text")
    ap.add_argument("--json", default=None, help="write every figure here")
    a = ap.parse_args(argv)
    device = torch.device(a.device or ("cpu" if a.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine, or pass --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    batches = [int(b) for b in a.batches.split(",")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the dtype policy: fp32 on the CPU
    pn = "0.25M" if a.tiny else "1M"  # tiny: a 512^2 output, 3 generated scales
    schedule = scale_schedule(1.0, pn)
    base = BenchOptions(preset="tiny" if a.tiny else "nsarm-8b", random_weights=True, device=str(device),
                        dtype="bf16" if dtype == torch.bfloat16 else "fp32", pn=pn, allow_cpu=a.tiny, text_tokens=TEXT_TOKENS)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "schedule": pn, "text_tokens": TEXT_TOKENS, "cfg": 1.0, "runs": []}
    t_start = time.perf_counter()
    warmed = False
    for name, kw in modes(a.tiny, 40):
        if a.only is not None and a.only not in name:
            continue
        o = replace(base, **kw)
        _sync(device)
        t0 = time.perf_counter()
        try:
            models = load_models(o, device, dtype)
        except (ValueError, NotImplementedError, RuntimeError) as e:
            line = f"{name}: could not load: {e}"
            print(line, flush=True)
            report["runs"].append({"mode": name, "skipped": line})
            continue
        _sync(device)
        load_s = time.perf_counter() - t0
        if not warmed:  # kernels, cuBLAS / cuDNN handles and algorithm choices, once
            run_tiles(models, 1, schedule, device)
            warmed = True
        resident = "blocks on CPU" not in name
        for batch in (batches if resident else [1]):
            run = run_tiles(models, batch, schedule, device)
            est = lowvram.estimate_for(models.transformer, models.vae, batch, text_tokens=TEXT_TOKENS,
                                       schedule=schedule)
            run.update(mode=name, load_s=load_s, estimate_GB=est.peak / GB,
                       estimate_error=None if run["peak_GB"] is None else est.peak / GB / run["peak_GB"] - 1)
            report["runs"].append(run)
            peak = "n/a (CPU)" if run["peak_GB"] is None else f"{run['peak_GB']:.2f} GB"
            print(f"{name:<40} batch {batch}: {run['seconds_per_tile']:.3f} s/tile, peak {peak}, "
                  f"estimate {est.peak / GB:.2f} GB, load {load_s:.1f}s", flush=True)
        if name.startswith("dense offload"):
            side = vae_scales(schedule, models.transformer.cfg.patchify)[-1][0]  # latent side of the output
            report["vae_decode_layouts_s"] = decode_layouts(models.vae, device, side)
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - t_start
    print()
    print(f"{'mode':<40} {'batch':>5} {'s/tile':>8} {'peak GB':>8} {'est GB':>8} {'est err':>8}")
    for r in report["runs"]:
        if "skipped" in r:
            continue
        peak = "-" if r["peak_GB"] is None else f"{r['peak_GB']:.2f}"
        err = "-" if r["estimate_error"] is None else f"{100 * r['estimate_error']:+.1f}%"
        print(f"{r['mode']:<40} {r['batch']:>5} {r['seconds_per_tile']:>8.3f} {peak:>8} {r['estimate_GB']:>8.2f} "
              f"{err:>8}")
    first = next((r for r in report["runs"] if "skipped" not in r), None)
    if first is not None:
        print("time per generated scale (s), " + first["mode"] + ": "
              + " ".join(f"{s:.3f}" for s in first["scale_s"]))
    if "vae_decode_layouts_s" in report:
        print("VAE decode (s): " + ", ".join(f"{k} {v:.3f}" for k, v in report["vae_decode_layouts_s"].items()))
    print(f"total {report['total_s']:.0f}s")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
