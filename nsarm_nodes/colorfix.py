"""Colour correction of SR outputs against their LR input: AdaIN and wavelet colour fix.

NSARM post-processes every output (both fixes on by default): the LR is resized to the SR size
with PIL's default filter (bicubic), then

- AdaIN: per image and channel, (x - mean_x) / std_x * std_ref + mean_ref, with the mean and the
  *unbiased* variance over all pixels and eps = 1e-5 added to the variance; clamp to [0, 1];
- wavelet fix: split both images with 5 levels of a dilated 3x3 [1,2,1] x [1,2,1] / 16 blur
  (dilation 1, 2, 4, 8, 16, replicate padding); keep the SR's high frequencies (the sum of the
  per-level differences) and the reference's last low-pass; clamp to [0, 1].

Two APIs:
- float tensors [B, 3, H, W] in [0, 1] (`adain`, `wavelet`, `color_fix`), batched with per-image
  statistics, used by the nodes; the reference is resized with torch (`resize_reference`);
- `color_adjust_u8`: the upstream post-processing on one uint8 H x W x 3 image, bit for bit, with
  the PIL resize and the uint8 truncation (x * 255, truncated) after each fix; used for parity.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .options import COLOR_FIX_METHODS

ADAIN_EPS = 1e-5  # added to the variance
WAVELET_LEVELS = 5  # blur dilations 1, 2, 4, 8, 16
_BLUR_1D = (0.25, 0.5, 0.25)  # [1, 2, 1] / 4; the 3x3 kernel is its outer product (exact in fp32)
RGB = 3
U8_MAX = 255
METHODS = COLOR_FIX_METHODS


# ----------------------------------------------------------------------------------------------
# validation


def _check_images(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != RGB:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an RGB image batch [B, 3, H, W], got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor with values in [0, 1], got {x.dtype}")


def _check_pair(sr: torch.Tensor, ref: torch.Tensor, same_size: bool) -> None:
    _check_images(sr, "sr")
    _check_images(ref, "reference")
    if ref.shape[0] != sr.shape[0]:
        raise ValueError(
            f"sr and reference batch sizes differ ({sr.shape[0]} vs {ref.shape[0]}): give one "
            f"reference image per SR image"
        )
    if same_size and ref.shape[-2:] != sr.shape[-2:]:
        raise ValueError(
            f"reference size {tuple(ref.shape[-2:])} differs from the SR size "
            f"{tuple(sr.shape[-2:])}: resize it first (resize_reference) or use color_fix"
        )


def _check_u8_image(img, name: str) -> None:
    if not isinstance(img, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{name} must be a numpy array or tensor, got {type(img).__name__}")
    is_u8 = img.dtype == (torch.uint8 if isinstance(img, torch.Tensor) else np.uint8)
    if not is_u8 or img.ndim != 3 or img.shape[2] != RGB:
        raise ValueError(f"{name} must be a uint8 H x W x 3 image, got {tuple(img.shape)} {img.dtype}")


# ----------------------------------------------------------------------------------------------
# float maths, [B, 3, H, W]


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel: mean and sqrt(unbiased variance + eps), both [B, C, 1, 1]."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)  # [B, C, H*W]
    if flat.shape[2] < 2:
        raise ValueError(f"AdaIN needs images of at least 2 pixels (unbiased variance), got {list(x.shape)}")
    std = (flat.var(dim=2) + ADAIN_EPS).sqrt().reshape(b, c, 1, 1)
    mean = flat.mean(dim=2).reshape(b, c, 1, 1)
    return mean, std


def _adain(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """AdaIN without the clamp: x's per-channel statistics replaced by ref's."""
    mean, std = _mean_std(x)
    ref_mean, ref_std = _mean_std(ref)
    return (x - mean) / std * ref_std + ref_mean


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """Depthwise 3x3 [1,2,1] x [1,2,1] / 16 blur with the given dilation and replicate padding."""
    k1 = torch.tensor(_BLUR_1D, dtype=x.dtype, device=x.device)
    kernel = torch.outer(k1, k1).expand(x.shape[1], 1, 3, 3)  # [C, 1, 3, 3]
    padded = F.pad(x, (dilation,) * 4, mode="replicate")  # [B, C, H + 2d, W + 2d]
    return F.conv2d(padded, kernel, groups=x.shape[1], dilation=dilation)


def _wavelet_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low): the accumulated per-level differences and the last low-pass (high + low = x
    up to rounding; the high part is accumulated level by level, as upstream)."""
    high = torch.zeros_like(x)
    for level in range(WAVELET_LEVELS):
        low = _blur(x, 2**level)
        high = high + (x - low)
        x = low
    return high, x


def _wavelet(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Wavelet fix without the clamp: high frequencies of x + low frequencies of ref."""
    return _wavelet_split(x)[0] + _wavelet_split(ref)[1]


def adain(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """AdaIN colour fix. sr, ref: float [B, 3, H, W] in [0, 1], ref already at sr's size.
    Returns [B, 3, H, W] in [0, 1] (sr's dtype; computed in float32)."""
    _check_pair(sr, ref, same_size=True)
    return _adain(sr.float(), ref.float()).clamp(0.0, 1.0).to(sr.dtype)


def wavelet(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Wavelet colour fix. sr, ref: float [B, 3, H, W] in [0, 1], ref already at sr's size.
    Returns [B, 3, H, W] in [0, 1] (sr's dtype; computed in float32)."""
    _check_pair(sr, ref, same_size=True)
    return _wavelet(sr.float(), ref.float()).clamp(0.0, 1.0).to(sr.dtype)


# ----------------------------------------------------------------------------------------------
# reference resizing


def _size_hw(size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive (height, width), got {size}")
    return int(h), int(w)


def resize_reference(lr, size):
    """Resize the LR reference to the SR size `size` = (height, width) (or one int for a square).

    - uint8 H x W x 3 (numpy array or tensor): PIL's default `Image.resize` filter for RGB,
      BICUBIC, exactly as upstream `color_adjust`; returns the same kind, uint8 [height, width, 3].
    - float tensor [B, 3, h, w] in [0, 1]: torch bicubic with antialiasing (PIL's a = -0.5 cubic,
      widened when downsizing), clamped to [0, 1]; returns [B, 3, height, width].
    """
    h, w = _size_hw(size)
    if isinstance(lr, np.ndarray) or (isinstance(lr, torch.Tensor) and lr.dtype == torch.uint8):
        _check_u8_image(lr, "lr")
        arr = lr.cpu().numpy() if isinstance(lr, torch.Tensor) else lr
        out = np.array(Image.fromarray(np.ascontiguousarray(arr)).resize((w, h), Image.BICUBIC))
        return torch.from_numpy(out).to(lr.device) if isinstance(lr, torch.Tensor) else out
    _check_images(lr, "lr")
    x = F.interpolate(lr.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0).to(lr.dtype)


# ----------------------------------------------------------------------------------------------
# the node API (float) and the upstream parity path (uint8)


def color_fix(sr: torch.Tensor, lr: torch.Tensor, method: str = "adain+wavelet") -> torch.Tensor:
    """Colour-correct SR images against their LR inputs (float path, no uint8 steps).

    sr: [B, 3, H, W] in [0, 1]; lr: [B, 3, h, w] in [0, 1], any size (resized to H x W with torch
    bicubic); method: "adain+wavelet" (NSARM's default: AdaIN, then wavelet against the same
    reference), "adain", "wavelet" or "none". Returns [B, 3, H, W] in [0, 1].
    """
    if method not in METHODS:
        raise ValueError(f"unknown colour-fix method {method!r}; choose one of {METHODS}")
    _check_pair(sr, lr, same_size=False)
    if method == "none":
        return sr
    ref = resize_reference(lr, sr.shape[-2:]).float()
    x = sr.float()
    if "adain" in method:
        x = _adain(x, ref).clamp(0.0, 1.0)
    if "wavelet" in method:
        x = _wavelet(x, ref).clamp(0.0, 1.0)
    return x.to(sr.dtype)


def _u8_to_unit(img: torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] as torchvision's ToTensor (float, then / 255)."""
    return img.permute(2, 0, 1).unsqueeze(0).to(torch.float32).div(U8_MAX)


def _unit_to_u8(x: torch.Tensor) -> torch.Tensor:
    """float [1, 3, H, W] -> uint8 [H, W, 3] as upstream: clamp, x * 255, truncate (ToPILImage)."""
    return x.clamp(0.0, 1.0).mul(U8_MAX).to(torch.uint8)[0].permute(1, 2, 0).contiguous()


def color_adjust_u8(sr_u8, lr_u8, adain: bool = True, wavelet: bool = True):
    """Upstream `color_adjust` bit for bit on one image: resize the LR (uint8 H x W x 3) to the SR
    size with PIL's bicubic, then AdaIN and / or the wavelet fix, each followed by the uint8
    truncation. sr_u8, lr_u8: uint8 H x W x 3 numpy arrays or tensors; returns sr_u8's kind.
    (Upstream hard-codes the 1024 x 1024 resize; for a 1024 x 1024 SR this is the same.)
    """
    _check_u8_image(sr_u8, "sr_u8")
    _check_u8_image(lr_u8, "lr_u8")
    as_numpy = isinstance(sr_u8, np.ndarray)
    sr = torch.from_numpy(np.array(sr_u8)) if as_numpy else sr_u8.cpu()
    lr = lr_u8 if isinstance(lr_u8, np.ndarray) else lr_u8.cpu().numpy()
    ref = _u8_to_unit(torch.from_numpy(resize_reference(lr, tuple(sr.shape[:2]))))
    if adain:
        sr = _unit_to_u8(_adain(_u8_to_unit(sr), ref))
    if wavelet:
        sr = _unit_to_u8(_wavelet(_u8_to_unit(sr), ref))
    return sr.numpy() if as_numpy else sr.to(sr_u8.device)
