"""Error of each weight format at the real NSARM-8B width (random weights, CPU; a measurement, not a test).

    python scripts/format_error.py --blocks 1 --tokens 256
    python scripts/format_error.py --blocks 4 --tokens 256 --formats bf16,q8_0,q8_0_mixed,q5_1,q4_1

Builds `--blocks` real-width blocks (PRESETS['nsarm-8b']: C 3584, 28 heads, FFN 14336) with seeded
random weights (matrices ~ N(0, 1/fan_in); the per-head cosine-attention temperatures spread
log-uniformly over 4..100, the clamp range, because q/k errors grow with it), runs `--tokens`
tokens of a 2-D grid (RoPE positions) with `--text-tokens` text tokens through them in float32 (the
reference) and in each format, and reports, against the float32 reference:

- rel(out): |y - y_ref| / |y_ref| of the last block's output (the residual stream),
- rel(upd): |y - y_ref| / |y_ref - x| (the error relative to what the blocks added),
- x bf16: rel(upd) divided by bf16's,
- bits vs bf16 / vs fp32: fraction of sampled bits that differ, with a random bitwise head
  (LayerNorm + Linear(C, 2 x 56), tau 0.5) and the same uniform draws for every format.

Formats: `bf16` / `fp16` / `fp32` (dense blocks in that dtype, as `load_transformer(dtype=...)`),
any name of weights.FORMATS or block type (block weights quantised from the float32 weights, everything else bf16,
compute bf16), optionally with per-linear overrides `FORMAT:LINEAR=TYPE[:...]` (TYPE a block type or
`dense`), e.g. `dense:sa.mat_qkv=q8_0` (only the qkv projection quantised, for attribution) or
`q5_1:sa.mat_qkv=q8_0`. `--compute fp32` dequantises and multiplies in
float32 instead (isolates the quantisation error from bf16 rounding).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsarm_nodes import weights  # noqa: E402
from nsarm_nodes.config import PRESETS  # noqa: E402
from nsarm_nodes.schedule import rope_cos_sin  # noqa: E402
from nsarm_nodes.transformer import MAX_LOG_SCALE_MUL, CrossAttnBlock, layer_norm  # noqa: E402

DENSE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TAU = 0.5
MIN_LOG_TEMPERATURE = math.log(4.0)  # upstream's initial value


def random_block(cfg, gen) -> CrossAttnBlock:
    """A float32 block with seeded random weights (see the module docstring)."""
    block = CrossAttnBlock(cfg)
    for name, p in block.named_parameters():
        with torch.no_grad():
            if p.dim() >= 2 and "scale_mul" not in name and "ada_gss" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif "scale_mul" in name:
                p.copy_(torch.linspace(MIN_LOG_TEMPERATURE, MAX_LOG_SCALE_MUL, p.numel()).view(p.shape))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return block.eval().requires_grad_(False)


def variant(block: CrossAttnBlock, name: str, compute: str) -> tuple[CrossAttnBlock, float]:
    """(block in format `name`, stored bits per block-linear weight)."""
    shapes = {n: tuple(block.get_submodule(n).weight.shape) for n in weights.BLOCK_LINEARS}
    if name in DENSE:
        return copy.deepcopy(block).to(DENSE[name]), DENSE[name].itemsize * 8
    base, *overrides = name.split(":")  # e.g. q8_0:sa.mat_qkv=dense, dense:ffn.fc1=q8_0
    types = (weights.WeightFormat(base, dict.fromkeys(weights.BLOCK_LINEARS, base), "").types
             if base in weights.BLOCK_TYPES else dict(weights.weight_format(base).types))
    for o in overrides:
        linear, _, t = o.partition("=")
        if linear not in types or (t != "dense" and t not in weights.BLOCK_TYPES):
            raise SystemExit(f"{name}: expected LINEAR=TYPE with LINEAR in {weights.BLOCK_LINEARS}, TYPE dense or "
                             f"one of {tuple(weights.BLOCK_TYPES)}")
        types[linear] = None if t == "dense" else t
    fmt = weights.WeightFormat(name, types, "")
    dtype = DENSE[compute]
    b = copy.deepcopy(block)
    weights.swap_in_quantized(b, fmt, dtype)
    return b.to(dtype), weights.bits_per_weight(fmt, shapes, dtype.itemsize * 8)


def run(blocks, x, gss, text, cos, sin) -> torch.Tensor:
    with torch.no_grad():
        for b, t in zip(blocks, text):
            x = b(x, gss, b.ca.text_kv(*t), cos, sin)
    return x


def bits(y: torch.Tensor, head: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    logits = F.linear(layer_norm(y, 1e-6), head).unflatten(-1, (-1, 2))  # [1, L, 56, 2]
    p1 = torch.softmax(logits / TAU, dim=-1)[..., 1]
    return u < p1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256, help="image tokens (a square-ish grid)")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--formats", default="bf16,q8_0,q8_0:sa.mat_qkv=dense,q5_1,q4_1")
    ap.add_argument("--compute", choices=("bf16", "fp32"), default="bf16",
                    help="compute dtype of the quantised formats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = PRESETS["nsarm-8b"].transformer
    C = cfg.embed_dim
    gen = torch.Generator().manual_seed(a.seed)
    t0 = time.perf_counter()
    ref_blocks = [random_block(cfg, gen) for _ in range(a.blocks)]
    side = math.isqrt(a.tokens)
    grid = (side, a.tokens // side)
    L = grid[0] * grid[1]
    cos, sin = rope_cos_sin([grid], cfg.head_dim)
    x = torch.randn(1, L, C, generator=gen)
    gss = torch.cat((1 + 0.1 * torch.randn(1, 1, 2, C, generator=gen),  # gates g1, g2
                     0.1 * torch.randn(1, 1, 4, C, generator=gen)), dim=2)  # scales s1, s2, shifts b1, b2
    text = [(torch.randn(a.text_tokens, C, generator=gen), [0, a.text_tokens]) for _ in ref_blocks]
    head = torch.randn(2 * cfg.d_vae, C, generator=gen) / math.sqrt(C)
    u = torch.rand(1, L, cfg.d_vae, generator=gen)
    y_ref = run(ref_blocks, x, gss, text, cos, sin)
    bits_ref = bits(y_ref, head, u)
    print(f"# {a.blocks} real-width block(s) (C={C}, heads={cfg.num_heads}, FFN={cfg.ffn_hidden}), {L} tokens "
          f"({grid[0]}x{grid[1]}), {a.text_tokens} text tokens, seed {a.seed}, quantised formats compute in "
          f"{a.compute}; setup {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"{'format':<28} {'bits/w':>6} {'rel(out)':>9} {'rel(upd)':>9} {'x bf16':>7} {'bits vs bf16':>12} "
          f"{'vs fp32':>8} {'time':>6}", flush=True)
    base_upd, bits_bf16 = None, None
    names = a.formats.split(",")
    if "bf16" in names:  # the baseline first
        names.remove("bf16")
        names.insert(0, "bf16")
    for name in names:
        t1 = time.perf_counter()
        made = [variant(b, name, a.compute) for b in ref_blocks]
        y = run([m for m, _ in made], x, gss, text, cos, sin).float()
        rel_out = float((y - y_ref).norm() / y_ref.norm())
        rel_upd = float((y - y_ref).norm() / (y_ref - x).norm())
        b = bits(y, head, u)
        if name == "bf16":
            base_upd, bits_bf16 = rel_upd, b
        ratio = f"{rel_upd / base_upd:7.2f}" if base_upd else f"{'-':>7}"
        vs_bf16 = f"{float((b != bits_bf16).float().mean()):12.4%}" if bits_bf16 is not None else f"{'-':>12}"
        print(f"{name:<28} {made[0][1]:6.2f} {rel_out:9.4%} {rel_upd:9.4%} {ratio} {vs_bf16} "
              f"{float((b != bits_ref).float().mean()):8.4%} {time.perf_counter() - t1:5.0f}s", flush=True)
        del made
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
