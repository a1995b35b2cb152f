"""Cheap live previews of a latent: a linear latent -> RGB map fitted to the loaded VAE decoder.

One latent position becomes 8x8 output pixels. Their mean colour is, to a good approximation, an
affine function of the position's d latent channels (the same idea as ComfyUI's "latent2rgb"
previews; the factors there are fitted offline per model). Here the map is fitted once per loaded
VAE, at first use: a few random multi-scale latents (random bits at every scale of the schedule,
upsampled and summed, as the sampler builds them) are decoded, the images average-pooled to one
colour per latent position, and the 3 x (d + 1) affine map is the least-squares fit. `r2` tells
how much of the pooled colour the map explains on those latents.

Rendering a preview is a [h*w, d] x [d, 3] product plus one small host copy: far below one scale
of the transformer (BENCHMARKS.md measures it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quantizer import bits_to_codes, up
from .schedule import scale_schedule, vae_scales

FIT_SIZE = 32  # latent side of the fitting latents (256 px decodes)
FIT_SAMPLES = 2
FIT_SEED = 0
VAE_PATCH = 8  # output pixels per latent position
MAX_PREVIEW_SIDE = 512  # latent positions; larger latents are area-pooled first


@dataclass(frozen=True)
class LatentPreview:
    weight: torch.Tensor  # [3, d] float32: latent channels -> RGB in [0, 1]
    bias: torch.Tensor  # [3]
    r2: float  # fraction of the pooled colour variance the map explains on the fitting latents

    @classmethod
    @torch.no_grad()
    def fit(cls, vae, size: int = FIT_SIZE, samples: int = FIT_SAMPLES, seed: int = FIT_SEED) -> "LatentPreview":
        device = next(vae.parameters()).device
        dtype = vae.decoder.conv_in.conv.weight.dtype
        d = vae.quantizer.codebook_dim
        gen = torch.Generator().manual_seed(seed)
        full = vae_scales(scale_schedule(1.0, "1M"), True)[-1][0]
        latent = torch.zeros(samples, d, size, size)
        for h, w in vae_scales(scale_schedule(1.0, "1M"), True):
            side = (max(1, round(h * size / full)), max(1, round(w * size / full)))
            bits = (torch.rand(samples, d, *side, generator=gen) < 0.5).to(torch.uint8)
            latent += up(bits_to_codes(bits), (size, size))
        image = vae.decode(latent.to(device, dtype)).float().cpu()  # [S, 3, 8 size, 8 size] in [-1, 1]
        target = F.avg_pool2d((image + 1) / 2, VAE_PATCH)  # [S, 3, size, size]
        x = torch.cat([latent.permute(0, 2, 3, 1).reshape(-1, d), torch.ones(samples * size * size, 1)], 1)
        y = target.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(x.double(), y.double()).solution.float()  # [d + 1, 3]
        residual = (x @ solution - y).square().sum()
        total = (y - y.mean(0)).square().sum()
        r2 = float(1 - residual / total) if total > 0 else 1.0
        return cls(weight=solution[:d].T.contiguous(), bias=solution[d], r2=r2)

    @torch.no_grad()
    def render(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent [d, h, w] (any device) -> uint8 [h', w', 3] on the CPU, h', w' <= MAX_PREVIEW_SIDE."""
        h, w = latent.shape[-2:]
        if max(h, w) > MAX_PREVIEW_SIDE:
            f = -(-max(h, w) // MAX_PREVIEW_SIDE)
            latent = F.avg_pool2d(latent[None].float(), f, ceil_mode=True)[0]
        weight, bias = self.weight.to(latent.device), self.bias.to(latent.device)
        rgb = torch.einsum("dhw,cd->hwc", latent.float(), weight) + bias
        return rgb.clamp(0, 1).mul(255).to(torch.uint8).cpu()
