"""Shared canvas vs independent tiles: time, memory, preview cost and seam scores.

    python scripts/bench_tiling.py [--models DIR] [--images DIR] [--size 480] [--photos 3] [--device cpu]

Without --models, tiny random models are made in a temporary folder (then the images are noise
and only the mechanism is measured). Inputs: --photos PNG images spread over the folder --images
(searched recursively; default: the repository's assets/demo.png) resized to --size x --size
(bicubic), so that they need several 256 px tiles. Prints, per mode: wall time split into sampling / decode / colour fix (from the progress
callback), the tensor-memory peak, and the seam score of `tiling.seam_score` at the tile seams;
then the cost of one preview against the mean time of one scale step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nsarm_nodes import tiling  # noqa: E402
from nsarm_nodes.canvas import plan_grid  # noqa: E402
from nsarm_nodes.lowvram import TensorMemoryTracker  # noqa: E402
from nsarm_nodes.pipeline import N_SCALES, load_pipeline  # noqa: E402
from nsarm_nodes.testing import make_tiny_models  # noqa: E402

MODES = ("independent", "shared")
DEMO_IMAGE = ROOT / "assets" / "demo.png"
PREVIEW_REPEATS = 50


def photos(source: Path, count: int, size: int) -> list[tuple[str, torch.Tensor]]:
    found = [source] if source.is_file() else sorted(source.rglob("*.png"))
    if not found:
        raise SystemExit(f"error: no PNG images in {source}")
    files = found[:: max(1, len(found) // count)][:count]
    out = []
    for path in files:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)
        out.append((path.name, torch.from_numpy(arr.copy()).float().div(255)[None]))
    return out


class Clock:
    """Progress callback recording when each step ended."""

    def __init__(self):
        self.start, self.times = time.perf_counter(), []

    def __call__(self, done: int, total: int) -> None:
        self.times.append(time.perf_counter() - self.start)
        self.total = total


def tensor_peak(pipe, image, mode: str, seed: int, batch: int) -> float:
    """Peak bytes of the tensors created during one run (a separate run: the tracker slows every op)."""
    with TensorMemoryTracker() as tracker:
        pipe(image, seed=seed, tiling=mode, tile_batch_size=batch)
    return tracker.peak


def run(pipe, image, mode: str, seed: int, batch: int, device) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = Clock()
    cpu = time.process_time()
    out = pipe(image, seed=seed, tiling=mode, tile_batch_size=batch, progress=clock)
    wall = time.perf_counter() - clock.start
    cpu = time.process_time() - cpu
    grid = plan_grid(image.shape[1], image.shape[2], 256, 32, mode=mode)
    batches = (len(clock.times) - 1 - (grid.batch if mode == "shared" else 0)) // (
        N_SCALES if mode == "shared" else N_SCALES + 1)
    sampling_steps = batches * N_SCALES
    # Step ends: shared = scales of every batch, then decodes, then colour fix; independent = per batch
    # 13 scales and its decode, then colour fix.
    t = clock.times
    if mode == "shared":
        sampling, decode = t[sampling_steps - 1], t[-2] - t[sampling_steps - 1]
    else:
        per_batch = [t[(b + 1) * (N_SCALES + 1) - 1] - t[(b + 1) * (N_SCALES + 1) - 2] for b in range(batches)]
        decode = sum(per_batch)
        sampling = t[-2] - decode
    return {
        "out": out, "grid": grid, "wall": wall, "cpu": cpu, "sampling": sampling, "decode": decode, "colour fix": t[-1] - t[-2],
        "step": sampling / sampling_steps * cpu / wall,  # process CPU seconds per scale step
        "cuda peak GB": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
        "seam": tiling.seam_score(out[0], grid, 4) if grid.tiles_per_image > 1 else 1.0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="models folder (default: tiny random models)")
    p.add_argument("--size", type=int, default=480, help="LR side of the test images (default 480: 2x2 tiles)")
    p.add_argument("--images", type=Path, default=DEMO_IMAGE, help="a PNG or a folder of PNGs (default: the demo image)")
    p.add_argument("--photos", type=int, default=3, help="how many images of --images")
    p.add_argument("--tile-batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models
        if models is None:
            models = tmp
            make_tiny_models(models)
        pipe = load_pipeline(models, device=device, text_encoder=args.models is None)
        images = photos(args.images, args.photos, args.size)
        pipe(images[0][1][:, :256, :256], seed=0, color_fix="none")  # warm-up
        rows = []
        for name, image in images:
            for mode in MODES:
                r = run(pipe, image, mode, args.seed, args.tile_batch_size, device)
                rows.append((name, mode, r))
                print(f"{name} {args.size}px {mode:11s}: process CPU {r['cpu']:6.1f}s  wall {r['wall']:6.1f}s  sampling {r['sampling']:6.1f}s  "
                      f"decode {r['decode']:6.1f}s  colour fix {r['colour fix']:5.2f}s"
                      + (f"  cuda peak {r['cuda peak GB']:.2f} GB" if r["cuda peak GB"] else "")
                      + f"  seam score {r['seam']:.3f}", flush=True)
        for mode in MODES:
            mine = [r for _, m, r in rows if m == mode]
            print(f"mean {mode:11s}: process CPU {statistics.mean(r['cpu'] for r in mine):.1f}s, wall "
                  f"{statistics.mean(r['wall'] for r in mine):.1f}s, sampling "
                  f"{statistics.mean(r['sampling'] for r in mine):.1f}s, decode {statistics.mean(r['decode'] for r in mine):.1f}s, "
                  f"seam score {statistics.mean(r['seam'] for r in mine):.3f}")
        for mode in MODES:
            peak = tensor_peak(pipe, images[0][1], mode, args.seed, args.tile_batch_size)
            print(f"tensor-memory peak, {mode}, {images[0][0]}: {peak / 1e9:.3f} GB")
        for key in ("cpu", "wall"):
            ratio = statistics.mean(r[key] for _, m, r in rows if m == "shared") / statistics.mean(
                r[key] for _, m, r in rows if m == "independent")
            print(f"shared / independent {'process CPU' if key == 'cpu' else 'wall'} time: {ratio:.2f}x")
        # Preview: render the latent of a whole image once per scale step.
        grid = rows[-1][2]["grid"]
        latent = torch.randn(pipe.vae.quantizer.codebook_dim, grid.padded_height // 2, grid.padded_width // 2,
                             device=device)
        pipe.preview_map.render(latent)
        t0 = time.process_time()
        for _ in range(PREVIEW_REPEATS):
            Image.fromarray(pipe.preview_map.render(latent).numpy())
        cost = (time.process_time() - t0) / PREVIEW_REPEATS
        step = statistics.mean(r["step"] for _, m, r in rows if m == "shared")
        print(f"preview ({latent.shape[1]}x{latent.shape[2]} latent -> PIL image): {cost * 1e3:.2f} ms = "
              f"{100 * cost / step:.2f}% of the mean scale step ({step * 1e3:.0f} ms); fit once: r2 "
              f"{pipe.preview_map.r2:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
