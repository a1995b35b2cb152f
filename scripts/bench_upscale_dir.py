"""Throughput of `upscale-dir --ray` with 1 and with N workers (prints figures; not a test).

    python scripts/bench_upscale_dir.py [--images 8] [--workers 1,2] [--cpus-per-worker 1] [--models DIR]

Makes --images random 256x256 images (one tile each) and, without --models, the tiny test models;
then runs `python -m nsarm_nodes upscale-dir IN OUT --ray --workers W` for each W into a fresh
OUT and timestamps each finished image as the command reports it (-v). Figures per run: wall time
of the whole command (Ray start and model loading included) and the steady throughput
(images finished after the first W, over the time since the W-th), and the ratio of steady
throughputs to the first W (medians when a count is repeated). On CPUs give each worker the same
--cpus-per-worker, so the ratio measures scaling, not thread counts; the machine's load average is
printed (other jobs skew it).
"""
from __future__ import annotations

import argparse
import os
import statistics
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
    return {"workers": workers, "images": len(stamps), "wall": wall, "first": stamps[0], "steady": steady,
            "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--workers", default="1,2", help="comma list of worker counts, run in this order "
                    "(default 1,2; e.g. 1,2,1,2 to alternate on a busy machine: the ratios use the medians)")
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
        for i, w in enumerate(int(x) for x in args.workers.split(",")):
            results.append(run_once(in_dir, tmp / f"out{i}", models, w, args.cpus_per_worker, args.extra))
            r = results[-1]
            print(f"workers {w}: {r['images']} images, wall {r['wall']:.1f} s (first image after {r['first']:.1f} s), "
                  f"steady {r['steady']:.3f} images/s, load average {r['load']:.2f}", flush=True)
    by_workers: dict[int, list[dict]] = {}
    for r in results:
        by_workers.setdefault(r["workers"], []).append(r)
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("wall", "steady", "load")}
           for w, rs in by_workers.items()}
    base = med[results[0]["workers"]]
    print(f"\ncpus: {os.cpu_count()}  cpus per worker: {args.cpus_per_worker:g}  images: {args.images}")
    print("| workers | runs | wall (s) | steady images/s | steady ratio | wall ratio | load average |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for w, m in med.items():
        print(f"| {w} | {len(by_workers[w])} | {m['wall']:.1f} | {m['steady']:.3f} | "
              f"x{m['steady'] / base['steady']:.2f} | x{base['wall'] / m['wall']:.2f} | {m['load']:.1f} |")


if __name__ == "__main__":
    main()
