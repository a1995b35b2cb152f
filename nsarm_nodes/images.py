"""IMAGE tensors from nodes and image files from users: checked, converted, named in every error.

IMAGE tensors (ComfyUI convention: float [B, H, W, C] in [0, 1]) handed to a node are checked by
`check_image` before any work: an empty batch, a wrong rank, NaN or infinite values are a
`ValueError` naming the node input. Grayscale (C = 1) is repeated to RGB; RGBA (C = 4) loses its
alpha channel (as ComfyUI's LoadImage, which puts alpha into a separate MASK, so the colour
channels are plain colour); values outside [0, 1] are clamped.
"""
from __future__ import annotations

from typing import Any

import torch

RGB_CHANNELS = 3
ALPHA_CHANNELS = 4
GRAY_CHANNELS = 1


def check_image(images: Any, where: str) -> torch.Tensor:
    """A usable IMAGE batch [B, H, W, 3] float32 in [0, 1] from `images`, or ValueError naming `where`.

    Grayscale becomes RGB, alpha is dropped, values outside [0, 1] are clamped (see the module doc)."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{where}: expected an IMAGE tensor [B, H, W, C], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{where}: expected an IMAGE batch [B, H, W, C], got a tensor of shape {tuple(images.shape)}")
    b, h, w, c = images.shape
    if b == 0:
        raise ValueError(f"{where}: the IMAGE batch is empty (0 images); check the node that feeds it")
    if h == 0 or w == 0:
        raise ValueError(f"{where}: the images are {w}x{h} pixels; nothing to process")
    if c not in (GRAY_CHANNELS, RGB_CHANNELS, ALPHA_CHANNELS):
        raise ValueError(f"{where}: IMAGE has {c} channels; expected 3 (RGB), 1 (grayscale) or 4 (RGBA)")
    if not images.is_floating_point():
        raise ValueError(f"{where}: IMAGE has dtype {images.dtype}; expected floating-point values in [0, 1]")
    bad = (~torch.isfinite(images)).sum().item()
    if bad:
        raise ValueError(f"{where}: the IMAGE holds {bad} NaN or infinite value(s); fix the node that produced it")
    images = images.float()
    if c == GRAY_CHANNELS:
        images = images.expand(b, h, w, RGB_CHANNELS)
    elif c == ALPHA_CHANNELS:
        images = images[..., :RGB_CHANNELS]
    if images.min() < 0 or images.max() > 1:
        images = images.clamp(0, 1)
    return images.contiguous()
