"""Cost of the NaN/inf check in the loading pass, at the real NSARM-8B widths on the CPU.

Builds an NSARM-8B-shaped transformer with `--depth` blocks (random fp32 weights in memory, the
transformation network and text path at full size), then times `load_transformer` into fp32 and
bf16 with the check as shipped and with it replaced by a no-op (after one warm-up load, the two
interleaved), best of `--repeat`. Prints one line
per case. Usage: python scripts/bench_load_checks.py [--depth 1] [--repeat 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from nsarm_nodes import loading
from nsarm_nodes.config import PRESETS
from nsarm_nodes.transformer import Infinity, load_transformer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = dataclasses.replace(PRESETS["nsarm-8b"].transformer, depth=a.depth, block_chunks=a.depth)
    with torch.device("meta"):
        meta = Infinity(cfg)
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=gen).mul_(0.02) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype)
          for k, v in meta.state_dict().items()}
    params = sum(v.numel() for v in sd.values())
    checked = loading._all_finite
    print(f"NSARM-8B widths, depth {a.depth}: {len(sd)} tensors, {params / 1e6:.0f} M parameters (fp32 in memory), "
          f"{a.threads} thread(s), torch {torch.__version__}")
    cases = (("no check", lambda t: True), ("check", checked))
    for dtype in (torch.float32, torch.bfloat16):
        load_transformer(sd, dtype=dtype)  # warm-up (first-touch page faults)
        times = dict.fromkeys((label for label, _ in cases), float("inf"))
        for _ in range(a.repeat):  # interleaved, best of each
            for label, fn in cases:
                loading._all_finite = fn
                t0 = time.perf_counter()
                load_transformer(sd, dtype=dtype)
                times[label] = min(times[label], time.perf_counter() - t0)
        loading._all_finite = checked
        extra = times["check"] - times["no check"]
        print(f"  blocks {str(dtype).removeprefix('torch.'):<8} load {times['no check']:.2f} s without the check, "
              f"{times['check']:.2f} s with it (+{extra:.2f} s, {100 * extra / times['no check']:+.0f}%)")


if __name__ == "__main__":
    main()
