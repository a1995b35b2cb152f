"""Throughput of `upscale-dir --ray` with 1 and with N workers (prints figures; not a test).

    python scripts/bench_upscale_dir.py [--images 8] [--workers 1,2] [--cpus-per-worker 1] [--models DIR]

Makes --images random 256x256 images (one tile each) and, without --models, the tiny test models;
then runs `python -m nsarm_nodes upscale-dir IN OUT --ray --workers W` for each W into a fresh
OUT and timestamps each finished image as the command reports it (-v). Figures per run: wall time
of the whole command (Ray start and model loading included) and the steady throughput
(images finished after the first W, over the time since the W-th), and the ratio of steady
throughputs to the first W. On CPUs give each worker the same --cpus-per-worker, so the ratio
measures scaling, not thread counts; the machine's load average is printed (other jobs skew it).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(in_dir: Path, out_dir: Path, models: Path, workers: int, cpus: float, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "nsarm_nodes", "upscale-dir", str(in_dir), str(out_dir), "--models", str(models),
           "--ray", "--workers", str(workers), "--cpus-per-worker", f"{cpus:g}", "-v", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stamps = []
    for line in proc.stdout:
        if " -> " in line:
            stamps.append(time.perf_counter() - t0)
    if proc.wait() != 0:
        raise SystemExit(f"upscale-dir failed (exit {proc.returncode}): {' '.join(cmd)}")
    wall = time.perf_counter() - t0
    k = min(workers, len(stamps) - 1)
    steady = (len(stamps) - k) / (stamps[-1] - stamps[k - 1]) if k >= 1 and stamps[-1] > stamps[k - 1] else float("nan")
    return {"workers": workers, "images": len(stamps), "wall": wall, "first": stamps[0], "steady": steady}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--workers", default="1,2", help="comma list of worker counts (default 1,2)")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--models", default=None, help="models folder (default: tiny random test models)")
    ap.add_argument("extra", nargs="*", help="more upscale-dir options, after --")
    args = ap.parse_args()

    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="nsarm-bench-dir-") as tmp:
        tmp = Path(tmp)
        models = Path(args.models) if args.models else tmp / "models"
        if not args.models:
            sys.path.insert(0, str(ROOT))
            from nsarm_nodes.testing import make_tiny_models

            make_tiny_models(models, seed=0)
        in_dir = tmp / "in"
        in_dir.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            Image.fromarray((rng.random((256, 256, 3)) * 255).astype(np.uint8)).save(in_dir / f"img{i:04d}.png")
        results = []
        for w in (int(x) for x in args.workers.split(",")):
            results.append(run_once(in_dir, tmp / f"out{w}", models, w, args.cpus_per_worker, args.extra))
            r = results[-1]
            print(f"workers {w}: {r['images']} images, wall {r['wall']:.1f} s (first image after {r['first']:.1f} s), "
                  f"steady {r['steady']:.3f} images/s", flush=True)
    base = results[0]
    print(f"\nload average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  cpus: {os.cpu_count()}  "
          f"cpus per worker: {args.cpus_per_worker:g}")
    print("| workers | wall (s) | steady images/s | steady ratio | wall ratio |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['workers']} | {r['wall']:.1f} | {r['steady']:.3f} | x{r['steady'] / base['steady']:.2f} | "
              f"x{base['wall'] / r['wall']:.2f} |")


if __name__ == "__main__":
    main()
