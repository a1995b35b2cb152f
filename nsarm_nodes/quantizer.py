"""Binary spherical quantisation (BSQ) and the multi-scale residual decomposition of Infinity.

Latents are [B, d, H, W] (d = 14 for the 8B tokenizer). A BSQ code is the sign of the
l2-normalised d-vector, scaled to +-1/sqrt(d) (so each code vector has unit length); its bit is
1 where the code is positive. Zero maps to bit 0.

Layouts:
- latent bits: uint8 [B, d, H, W] (channel-first, like the codes);
- token bits: uint8 [B, L, n_bits] with L = h*w tokens row-major. For the patchified 8B model a
  token is a 2x2 latent patch and bit k = pixel_unshuffle channel c*4 + i*2 + j (n_bits = 4d).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 2  # 2x2 spatial patchify of the 8B model


def bsq(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise z [B, d, H, W] -> (codes float32 [B, d, H, W] in {+-1/sqrt(d)}, bits uint8)."""
    d = z.shape[1]
    zn = F.normalize(z.float(), dim=1)
    positive = zn > 0
    scale = 1.0 / math.sqrt(d)
    codes = torch.where(positive, scale, -scale).to(torch.float32)
    return codes, positive.to(torch.uint8)


def bits_to_codes(bits: torch.Tensor) -> torch.Tensor:
    """Latent bits uint8 [B, d, H, W] -> codes float32 (2*bit - 1) / sqrt(d)."""
    d = bits.shape[1]
    return (bits.to(torch.float32) * 2 - 1) / math.sqrt(d)


def area_down(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pooling to `size` (upstream 'area'); identity at the same size."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upstream's trilinear upsampling with T = 1: half-pixel bilinear with edge clamping."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(
        x, size=size, mode="bilinear", align_corners=False
    )


def resample_next(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Next-scale input resampling: 'area' (NSARM) or 'trilinear' (current upstream Infinity)."""
    if mode == "area":
        return area_down(x, size)
    if mode == "trilinear":
        return up(x, size)
    raise ValueError(f"next_scale_mode must be 'area' or 'trilinear', got {mode!r}")


def latent_to_tokens(x: torch.Tensor, patchify: bool = True) -> torch.Tensor:
    """[B, d, 2h, 2w] -> [B, h*w, 4d] (pixel_unshuffle channel order), or [B, H*W, d] unpatchified."""
    if patchify:
        x = F.pixel_unshuffle(x, PATCH)  # [B, 4d, h, w]
    return x.flatten(2).transpose(1, 2)


def tokens_to_latent(t: torch.Tensor, h: int, w: int, patchify: bool = True) -> torch.Tensor:
    """Inverse of `latent_to_tokens`: [B, h*w, n] -> [B, d, 2h, 2w] (or [B, n, h, w])."""
    x = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
    return F.pixel_shuffle(x, PATCH) if patchify else x


def map_outputs_to_bits(out: torch.Tensor, side: int) -> torch.Tensor:
    """Transformation-network output [B, s*s, d] -> latent bits uint8 [B, d, s, s].

    Upstream *reshapes* (memory order kept) the [B, s*s, d] tensor into [B, d, s, s] before BSQ,
    which mixes channels and positions; training used the same reshape, so it is reproduced here.
    """
    b, _, d = out.shape
    return bsq(out.reshape(b, d, side, side))[1]


class _LFQ(nn.Module):
    """Holds upstream's `lfq.mask` buffer (2^(d-1) ... 2^0) so checkpoints load with their keys."""

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1, dtype=torch.int64))


class MultiScaleBSQ(nn.Module):
    """Multi-scale residual BSQ (Algorithm 1) and the cascaded GT modification (Algorithm 2)."""

    def __init__(self, codebook_dim: int = 14):
        super().__init__()
        self.codebook_dim = codebook_dim
        self.lfq = _LFQ(codebook_dim)

    @torch.no_grad()
    def decompose(
        self, features: torch.Tensor, vae_scales: list[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Algorithm 1. features [B, d, H, W] -> (bits per scale uint8 [B, d, h_k, w_k], F_hat).

        r_k = area_down(R, s_k); q_k = BSQ(r_k); R -= up(q_k); F_hat += up(q_k).
        """
        full = tuple(features.shape[-2:])
        residual = features.float()
        f_hat = torch.zeros_like(residual)
        bits = []
        for size in vae_scales:
            codes, b = bsq(area_down(residual, size))
            q = up(codes, full)
            residual = residual - q
            f_hat = f_hat + q
            bits.append(b)
        return bits, f_hat

    @staticmethod
    def reconstruct(bits: list[torch.Tensor], full: tuple[int, int]) -> torch.Tensor:
        """Sum over scales of the upsampled codes of latent bits: the decoder input [B, d, H, W]."""
        return sum(up(bits_to_codes(b), full) for b in bits)

    @torch.no_grad()
    def cascaded_gt(
        self,
        hr_features: torch.Tensor,
        replaced_bits: list[torch.Tensor],
        vae_scales: list[tuple[int, int]],
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Algorithm 2: GT bits of an HR latent when the first K scales are given (NSARM).

        The first K = len(replaced_bits) scales use the given bits (from the transformation
        network); every later scale quantises the HR residual left after *those* scales, so the
        GT of the fine scales corrects what the LR-derived scales got wrong.
        """
        full = tuple(hr_features.shape[-2:])
        cum = torch.zeros_like(hr_features, dtype=torch.float32)
        bits = []
        for k, size in enumerate(vae_scales):
            if k < len(replaced_bits):
                b = replaced_bits[k]
                codes = bits_to_codes(b)
            else:
                codes, b = bsq(area_down(hr_features.float() - cum, size))
            cum = cum + up(codes, full)
            bits.append(b)
        return bits, cum
