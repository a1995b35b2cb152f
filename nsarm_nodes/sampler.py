"""The next-scale bitwise autoregressive loop of NSARM (Infinity's `autoregressive_infer_cfg`).

Per scale si with (h, w) tokens:
  1. input: the SOS token at si = 0, else word_embed of the running latent `summed_codes`
     resampled to (2h, 2w) ('area' in NSARM, 'trilinear' in current Infinity) and
     pixel-unshuffled into 4d channels; lvl_embed[si] is added before block 0;
  2. the blocks run with a KV cache holding every earlier scale;
  3. bits: for the first K scales (K = 7 for NSARM) the BSQ bits of the transformation network's
     outputs; otherwise sampled from the bitwise head: logits / tau, optional CFG mixing, top-p
     per bit pair, then a Bernoulli draw from a per-item generator;
  4. summed_codes += upsample(codes of the bits, full latent size).

Guard: the logits of every scale are checked for NaN / inf on the device (a flag per scale, no
host read in the loop); the flags are read once after the last scale and any non-finite scale
raises `NonFiniteLogitsError` naming the blocks' dtype and the fix (fp16 overflows in this model;
bf16 or fp32 do not), so that no plausible-looking wrong image is decoded from all-zero bits.

Two equivalent execution paths: `prefill=True` fills the cache for the K known scales in one
block-causal forward and skips their head; `prefill=False` steps through them one by one as the
reference does (and returns their logits, which the reference computes and discards).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .quantizer import (
    bits_to_codes,
    latent_to_tokens,
    map_outputs_to_bits,
    resample_next,
    tokens_to_latent,
    up,
)
from .schedule import scale_schedule, token_counts, token_offsets, vae_scales

NEXT_SCALE_MODES = ("area", "trilinear")


class NonFiniteLogitsError(ValueError):
    """The transformer produced NaN / inf logits: fp16 overflow, or NaN / inf in weights or inputs."""


def _non_finite_message(transformer, si: int, size: tuple[int, int]) -> str:
    dtype = getattr(transformer, "block_dtype", None)
    name = str(dtype).removeprefix("torch.")
    where = f"the transformer produced NaN/inf logits from scale {si} ({size[0]}x{size[1]} tokens) on, computing in {name}"
    if dtype == torch.float16:
        return (f"{where}: float16 overflows in this model's activations. Load the model with dtype bf16 "
                f"(fp32 on GPUs without bf16; dtype auto picks the right one)")
    return (f"{where}. Load the model with dtype fp32 (or bf16 on a GPU); if it persists the weights or the "
            f"prompt features hold NaN/inf: run check-models and download the checkpoint again")


@dataclass
class SampleResult:
    summed_codes: torch.Tensor  # [B, d, H, W] float32: the decoder input
    bits: list[torch.Tensor]  # per scale uint8 [B, L, n_bits] in token order
    logits: list[torch.Tensor] | None = None  # per scale [B, L, 2 * n_bits] before / tau


def _text_features(text) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(text, (tuple, list)) and len(text) == 2:
        return text[0], text[1]
    if hasattr(text, "kv_compact") and hasattr(text, "cu_seqlens"):
        return text.kv_compact, text.cu_seqlens
    raise TypeError("text must be prompt embeddings (text.PromptEmbeds) or a (kv_compact, cu_seqlens) pair")


def _repeat_packed(kv: torch.Tensor, cu: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat a packed batch of 1 prompt n times."""
    L = int(cu[-1])
    return kv.repeat(n, 1), torch.arange(0, L * (n + 1), L, dtype=torch.int32, device=cu.device)


def _uncond_features(cfg_uncond: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Unconditional text: each prompt's features replaced row for row by cfg_uncond[:len]."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    if max(lengths) > cfg_uncond.shape[0]:
        raise ValueError(
            f"prompt of {max(lengths)} tokens is longer than the model's {cfg_uncond.shape[0]} "
            f"unconditional rows; shorten the prompt or use cfg = 1"
        )
    return torch.cat([cfg_uncond[:n] for n in lengths]).float()


def sample_bits(
    logits: torch.Tensor, top_p: float, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """logits [B, L, 2n] already divided by tau -> bits uint8 [B, L, n].

    Top-p over each 2-way pair: when the smaller probability is <= 1 - top_p it is dropped and the
    larger logit wins; otherwise bit ~ Bernoulli(p1). One uniform per bit from item b's generator.
    """
    B, L, V = logits.shape
    probs = logits.float().view(B, L, V // 2, 2).softmax(dim=-1)  # [B, L, n, 2]
    p1 = probs[..., 1]
    decided = probs.min(dim=-1).values <= (1 - top_p)
    u = torch.stack([
        torch.rand(p1[b].shape, generator=g, device=logits.device) for b, g in enumerate(generators)
    ])
    bits = torch.where(decided, p1 > 0.5, u < p1)
    return bits.to(torch.uint8)


def transformation_bits(transformer, lr_features: torch.Tensor,
                        schedule: list[tuple[int, int]] | None = None) -> list[torch.Tensor]:
    """NSARM's replaced scales: the transformation network's outputs for raw LR features
    [B, d, 32, 32], BSQ-quantised after upstream's reshape -> latent bits uint8 [B, d, s, s] each."""
    if transformer.map_net is None:
        raise ValueError(
            "this checkpoint has no transformation network (map_transformer.*): it is plain Infinity, "
            "not NSARM; load NSARM.pth to super-resolve an LR image"
        )
    sizes = vae_scales(schedule or scale_schedule(1.0, "1M"), transformer.cfg.patchify)
    device = transformer.pos_start.device
    with torch.no_grad():
        outs = transformer.map_net(lr_features.to(device).float())
    bits = []
    for si, out in enumerate(outs):
        if si >= len(sizes) or sizes[si][0] != sizes[si][1] or out.shape[1] != sizes[si][0] ** 2:
            raise ValueError(f"transformation network output {si} does not fit scale {sizes[si] if si < len(sizes) else '-'}")
        bits.append(map_outputs_to_bits(out, sizes[si][0]))
    return bits


SEED_MODULUS = 2**64  # torch generators take seeds in [0, 2^64); larger ones (seed + tile index) wrap


def _generators(seed, batch: int, device) -> list[torch.Generator]:
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * batch
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    return [torch.Generator(device=device).manual_seed(int(s) % SEED_MODULUS) for s in seeds]


@torch.no_grad()
def sample(
    transformer,
    vae,
    text,
    lr_features: torch.Tensor | None = None,
    *,
    seed: int | Sequence[int],
    replaced_bits: Sequence[torch.Tensor] | None = None,
    tau: float = 0.5,
    top_p: float = 0.97,
    cfg: float = 1.0,
    next_scale_mode: str = "area",
    forced_bits: Sequence[torch.Tensor | None] | None = None,
    return_logits: bool = False,
    negative_text=None,
    schedule: list[tuple[int, int]] | None = None,
    prefill: bool = True,
    progress: Callable[[int, int], None] | None = None,
    latent_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> SampleResult:
    """Run the 13-scale loop. See the module docstring; docs/ARCHITECTURE.md documents the arguments.

    text: PromptEmbeds or (kv_compact [T, Ct], cu_seqlens int32 [B+1]); a single prompt is
    broadcast over a larger `lr_features` batch. lr_features: raw VAE features of the LR images
    [B, d, 32, 32]; when given, the first K scales come from the transformation network.
    replaced_bits: precomputed `transformation_bits` (instead of lr_features).
    seed: one seed for every item, or one per item (item b with seed s gives the same result as a
    batch of one with seed s); any non-negative int, taken modulo 2^64. forced_bits: per-scale token bits that replace the model's choice
    (teacher forcing), None entries sample. progress(si, n_scales) is called after each scale and
    may raise to interrupt. With cfg != 1, `.logits` are the CFG-mixed logits times tau.
    latent_hook(si, summed) -> summed is called after scale si's codes are added to the running
    latent [B, d, H, W] and before the next scale's input is built from it (the shared tile canvas).
    Raises NonFiniteLogitsError after the last scale when any scale's logits held NaN / inf.
    """
    if next_scale_mode not in NEXT_SCALE_MODES:
        raise ValueError(f"next_scale_mode must be one of {NEXT_SCALE_MODES}, got {next_scale_mode!r}")
    if not 0.0 < tau:
        raise ValueError(f"tau must be > 0, got {tau}")
    cfgm = transformer.cfg
    if vae is not None and vae.quantizer.codebook_dim != cfgm.codebook_dim:
        raise ValueError(
            f"wrong model pair: the transformer works on {cfgm.codebook_dim}-channel latents but the VAE "
            f"has {vae.quantizer.codebook_dim} (e.g. an Infinity-2B checkpoint with the 8B VAE); "
            f"use infinity_vae_d56_f8_14_patchify.pth with NSARM / Infinity-8B"
        )
    device = transformer.pos_start.device
    schedule = schedule or scale_schedule(1.0, "1M")
    sizes = vae_scales(schedule, cfgm.patchify)  # latent size per scale
    full = sizes[-1]
    counts, offsets = token_counts(schedule), token_offsets(schedule)
    n_scales = len(schedule)

    kv, cu = _text_features(text)
    kv, cu = kv.to(device), cu.to(device=device, dtype=torch.int32)
    B = len(cu) - 1
    if lr_features is not None and replaced_bits is None:
        replaced_bits = transformation_bits(transformer, lr_features, schedule)
    replaced = list(replaced_bits or [])  # latent bits [B, d, 2h, 2w] of the first K scales
    if replaced:
        n_items = replaced[0].shape[0]
        if B == 1 and n_items > 1:
            kv, cu = _repeat_packed(kv, cu, n_items)
            B = n_items
        if n_items != B:
            raise ValueError(f"{n_items} LR images but {B} prompts; give one prompt or one per image")
        replaced = [b.to(device) for b in replaced]
    K = len(replaced)
    generators = _generators(seed, B, device)

    use_cfg = cfg != 1.0
    if use_cfg:
        if negative_text is not None:
            nkv, ncu = _text_features(negative_text)
            nkv, ncu = nkv.to(device), ncu.to(device=device, dtype=torch.int32)
            if len(ncu) == 2 and B > 1:
                nkv, ncu = _repeat_packed(nkv, ncu, B)
        else:
            nkv, ncu = _uncond_features(transformer.cfg_uncond, cu), cu
        kv = torch.cat((kv.float(), nkv.float()))
        cu = torch.cat((cu, ncu[1:] + cu[-1]))
    bs = 2 * B if use_cfg else B
    cond = transformer.condition(kv, cu)
    cos_all, sin_all = transformer.rope(schedule, device)
    # The last scale's keys/values are never read again; prefill stores all K replaced scales.
    caches = transformer.new_caches(bs, sum(counts[: max(K if prefill else 0, n_scales - 1)]), device)
    lvl = transformer.lvl_embed.weight.float()

    summed = torch.zeros(B, cfgm.codebook_dim, *full, device=device)
    non_finite = torch.zeros(n_scales, dtype=torch.bool, device=device)  # per scale: NaN / inf in its logits
    bits_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] | None = [] if return_logits else None

    def head(x: torch.Tensor) -> torch.Tensor:
        """Hidden states [bs, L, C] -> (CFG-mixed) logits / tau [B, L, 2n]."""
        lg = transformer.logits(x, cond.sos) / tau
        return cfg * lg[:B] + (1 - cfg) * lg[B:] if use_cfg else lg

    def check(si: int, lg: torch.Tensor) -> None:
        """Record on the device whether scale si's logits hold NaN / inf (no host read)."""
        non_finite[si] = ~torch.isfinite(lg).all()

    def next_input(si: int) -> torch.Tensor:
        """Input tokens of scale si >= 1 from the running latent: [bs, L, C]."""
        tokens = latent_to_tokens(resample_next(summed, sizes[si], next_scale_mode), cfgm.patchify)
        x = transformer.embed(tokens)
        return torch.cat((x, x)) if use_cfg else x

    if forced_bits is not None:  # moved once, not per scale
        forced_bits = [None if f is None else f.to(device) for f in forced_bits]

    def forced(si: int) -> torch.Tensor | None:
        if forced_bits is None or si >= len(forced_bits) or forced_bits[si] is None:
            return None
        return forced_bits[si]

    def add_scale(si: int, latent_bits: torch.Tensor) -> None:
        nonlocal summed
        bits_out.append(latent_to_tokens(latent_bits, cfgm.patchify).to(torch.uint8))
        summed = summed + up(bits_to_codes(latent_bits), full)
        if latent_hook is not None:
            summed = latent_hook(si, summed)

    def scale_bits(si: int, sampled: torch.Tensor | None) -> torch.Tensor:
        """Latent bits of scale si: forced > replaced > sampled."""
        h, w = schedule[si]
        f = forced(si)
        if f is not None:
            return tokens_to_latent(f, h, w, cfgm.patchify)
        if si < K:
            return replaced[si]
        return tokens_to_latent(sampled, h, w, cfgm.patchify)

    start = 0
    if prefill and K > 0:
        # Scales 0..K-1 have known bits: build all their inputs, then one block-causal pass.
        xs = [cond.x_sos + lvl[0]]
        for si in range(K):
            add_scale(si, scale_bits(si, None))
            if si + 1 < K:
                xs.append(next_input(si + 1) + lvl[si + 1])
        n = offsets[K - 1] + counts[K - 1]
        mask = transformer.block_causal_mask(counts[:K], device)  # [n, n], cached: no host->device copy
        hidden = transformer.forward_blocks(torch.cat(xs, dim=1), cond, cos_all[:n], sin_all[:n], caches, True, mask)
        if return_logits:
            lg = head(hidden) * tau
            logits_out.extend(lg[:, offsets[si]:offsets[si] + counts[si]] for si in range(K))
            for si in range(K):
                check(si, logits_out[si])
        if progress:
            for si in range(K):
                progress(si, n_scales)
        start = K
        x = next_input(K) if K < n_scales else None
    else:
        x = cond.x_sos

    for si in range(start, n_scales):
        o, n = offsets[si], counts[si]
        hidden = transformer.forward_blocks(
            x + lvl[si], cond, cos_all[o:o + n], sin_all[o:o + n], caches, si < n_scales - 1
        )
        sampled = None
        if si >= K or return_logits:
            lg = head(hidden)
            check(si, lg)
            if logits_out is not None:
                logits_out.append(lg * tau)
            if si >= K and forced(si) is None:
                sampled = sample_bits(lg, top_p, generators)
        add_scale(si, scale_bits(si, sampled))
        if si + 1 < n_scales:
            x = next_input(si + 1)
        if progress:
            progress(si, n_scales)
    flags = non_finite.tolist()  # the one host read of the guard
    if any(flags):
        first = flags.index(True)
        raise NonFiniteLogitsError(_non_finite_message(transformer, first, schedule[first]))
    return SampleResult(summed_codes=summed, bits=bits_out, logits=logits_out)
