"""Colour fix: upstream parity of the uint8 path (golden), the float node path, and properties."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import golden, golden_json
from nsarm_nodes.colorfix import (
    METHODS,
    adain,
    color_adjust_u8,
    color_fix,
    resize_reference,
    wavelet,
)

# tests/golden/README.md, tolerances: after the colour fix at most 2 levels off on at most ~4 % of the pixels
U8_MAX_DIFF = 2
U8_MAX_FRACTION = 0.04
FLOAT_VS_U8_ATOL = 2 / 255  # float chain vs the uint8-truncating upstream chain
POOL = 16
# Two views of the demo photo (assets/demo.png): all of it, and a 2x crop of the shore.
DEMO_VIEWS = ((0, 0, 256, 256), (64, 120, 192, 248))


def _u8_to_float(img_u8) -> torch.Tensor:
    """uint8 H x W x 3 (numpy or tensor) -> float32 [1, 3, H, W] in [0, 1]."""
    return torch.as_tensor(np.asarray(img_u8)).permute(2, 0, 1).unsqueeze(0).float() / 255


def _u8_diff(ours: torch.Tensor, ref: torch.Tensor) -> tuple[int, float]:
    d = (ours.int() - ref.int()).abs()
    return int(d.max()), float((d > 0).float().mean())


def _smooth_image(seed: int, size: int, lo: float, hi: float, batch: int = 1) -> torch.Tensor:
    """Random smooth colours in [lo, hi] ([batch, 3, size, size]): bilinear-upsampled noise."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(batch, 3, 4, 4, generator=g)
    return lo + (hi - lo) * F.interpolate(small, size=(size, size), mode="bilinear", align_corners=True)


@pytest.fixture(scope="module")
def real_pair(demo_image):
    """(sr_u8, lr_u8) numpy images from photo-like content: a colour-shifted 128x128 'SR' and a
    32x32 'LR' reference, so that the correction has real work to do."""
    pairs = []
    for box in DEMO_VIEWS:
        im = Image.open(demo_image).convert("RGB").crop(box)
        lr = np.array(im.resize((32, 32)))
        shifted = np.array(im.resize((128, 128))).astype(np.float32) * np.array([0.8, 1.1, 0.9]) + np.array([20, -10, 5])
        pairs.append((np.clip(shifted, 0, 255).astype(np.uint8), lr))
    return pairs


# ---------------------------------------------------------------------------------- golden: uint8


def test_pil_resize_matches_golden():
    g = golden("color_fix")
    assert torch.equal(resize_reference(g["lr_u8"], (128, 128)), g["lr_resized_u8"])
    assert np.array_equal(resize_reference(g["lr_u8"].numpy(), 128), g["lr_resized_u8"].numpy())


@pytest.mark.parametrize(
    "name, use_adain, use_wavelet",
    [("adain_u8", True, False), ("wavelet_only_u8", False, True), ("adain_wavelet_u8", True, True)],
)
def test_color_adjust_u8_matches_golden(name, use_adain, use_wavelet):
    g = golden("color_fix")
    ours = color_adjust_u8(g["sr_u8"], g["lr_u8"], adain=use_adain, wavelet=use_wavelet)
    assert ours.dtype == torch.uint8 and ours.shape == g[name].shape
    max_diff, fraction = _u8_diff(ours, g[name])
    print(f"{name}: max |diff| {max_diff}, {fraction:.4%} of values differ")
    assert max_diff <= U8_MAX_DIFF and fraction <= U8_MAX_FRACTION


def test_color_adjust_u8_numpy_in_numpy_out():
    g = golden("color_fix")
    ours = color_adjust_u8(g["sr_u8"].numpy(), g["lr_u8"].numpy())
    assert isinstance(ours, np.ndarray) and ours.dtype == np.uint8
    assert np.array_equal(ours, color_adjust_u8(g["sr_u8"], g["lr_u8"]).numpy())


def test_lr_resized_1024_matches_run_area():
    g = golden("nsarm_run_area")
    crops = golden_json("config.json")["crops"]
    resized = resize_reference(g["lr_u8"], 1024)
    size = crops["size"]
    for i, (y, x) in enumerate(crops["origins_yx"]):
        assert torch.equal(resized[y : y + size, x : x + size], g[f"lr_resized1024_u8_crop{i}"])
    as_float = resized.permute(2, 0, 1).unsqueeze(0).float()  # [1, 3, 1024, 1024], 0..255
    torch.testing.assert_close(F.avg_pool2d(as_float, POOL), g["lr_resized1024_u8_pool16"])
    torch.testing.assert_close(as_float.mean(dim=(0, 2, 3)), g["lr_resized1024_u8_mean"])


def test_run_area_adain_crops_are_one_affine_map_per_channel():
    """The full SR image is not stored, so its std is unknown; but AdaIN is the per-channel map
    x -> (x - mean_sr) * a + mean_ref with a = std_ref / std_sr. With mean_sr from the stored
    statistics and mean_ref from our PIL resize of the LR, one slope a per channel must reproduce
    every stored AdaIN-only crop pixel from the uncorrected crop (truncation included)."""
    g = golden("nsarm_run_area")
    ref = _u8_to_float(resize_reference(g["lr_u8"], 1024))
    mean_ref = ref.mean(dim=(0, 2, 3))
    mean_sr = g["sr_u8_mean"] / 255
    sr = torch.cat([g[f"sr_u8_crop{i}"].reshape(-1, 3) for i in range(3)]).float() / 255  # [N, 3]
    fixed = torch.cat([g[f"sr_adain_only_u8_crop{i}"].reshape(-1, 3) for i in range(3)]).float()
    for c in range(3):
        centred = sr[:, c] - mean_sr[c]
        inside = (fixed[:, c] > 0) & (fixed[:, c] < 255)
        target = (fixed[inside, c] + 0.5) / 255 - mean_ref[c]  # middle of the truncation bin
        slope = (target * centred[inside]).sum() / centred[inside].square().sum()
        candidates = slope * (1 + torch.linspace(-2e-3, 2e-3, 801)).unsqueeze(1)  # [K, 1]
        pred = (centred * candidates + mean_ref[c]).clamp(0, 1).mul(255).to(torch.uint8)
        mismatches = (pred.float() != fixed[:, c]).sum(dim=1)
        best = int(mismatches.argmin())
        max_diff = int((pred[best].float() - fixed[:, c]).abs().max())
        print(f"channel {c}: slope {float(candidates[best]):.6f}, {int(mismatches[best])} mismatches")
        assert max_diff <= 1 and int(mismatches[best]) <= 0.01 * len(fixed)


# --------------------------------------------------------------------------- float path vs uint8


@pytest.mark.parametrize("method", ["adain+wavelet", "adain", "wavelet"])
def test_float_color_fix_matches_u8_chain_on_real_images(real_pair, method):
    for sr_u8, lr_u8 in real_pair:
        expected = color_adjust_u8(sr_u8, lr_u8, adain="adain" in method, wavelet="wavelet" in method)
        ours = color_fix(_u8_to_float(sr_u8), _u8_to_float(lr_u8), method)
        err = (ours - _u8_to_float(expected)).abs().max().item()
        print(f"{method}: max |float - uint8 chain| = {err * 255:.3f} / 255")
        assert err <= FLOAT_VS_U8_ATOL


def test_float_resize_close_to_pil():
    g = golden("color_fix")
    ours = resize_reference(_u8_to_float(g["lr_u8"]), (128, 128))
    assert ours.shape == (1, 3, 128, 128)
    assert (ours - _u8_to_float(g["lr_resized_u8"])).abs().max() <= 1.5 / 255  # PIL rounds to uint8


def test_batch_items_are_independent(real_pair):
    sr = torch.cat([_u8_to_float(sr) for sr, _ in real_pair])
    lr = torch.cat([_u8_to_float(lr) for _, lr in real_pair])
    ref = resize_reference(lr, sr.shape[-2:])
    for fn, args in [(adain, (sr, ref)), (wavelet, (sr, ref)), (color_fix, (sr, lr))]:
        batched = fn(*args)
        for b in range(len(real_pair)):
            single = fn(*(a[b : b + 1] for a in args))
            torch.testing.assert_close(batched[b : b + 1], single, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ properties


def test_adain_takes_reference_statistics():
    sr = _smooth_image(1, 48, 0.3, 0.5, batch=2)
    ref = _smooth_image(2, 48, 0.4, 0.7, batch=2)
    out = adain(sr, ref)
    assert 0 < out.min() and out.max() < 1  # no clamping, so the statistics are exact
    torch.testing.assert_close(out.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-3, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3)), ref.std(dim=(2, 3)), atol=1e-3, rtol=0)


@settings(max_examples=15, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_wavelet_against_itself_is_identity(h, w, seed):
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(wavelet(x, x), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_color_fix_against_itself_is_identity(real_pair, method):
    x = _u8_to_float(real_pair[0][0])
    torch.testing.assert_close(color_fix(x, x, method), x, atol=1e-5, rtol=0)


def test_none_returns_input_and_dtype_is_kept():
    x = _smooth_image(3, 16, 0.0, 1.0)
    assert color_fix(x, x[..., ::2, ::2], "none") is x
    half = color_fix(x.half(), x[..., ::2, ::2].half())
    assert half.dtype == torch.float16 and half.shape == x.shape


# ------------------------------------------------------------------------------------ validation


def test_invalid_inputs_are_rejected():
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="batch sizes differ"):
        color_fix(x, x[:1])
    with pytest.raises(ValueError, match="resize it first"):
        adain(x, x[..., :8, :8])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        wavelet(x[:, :2], x[:, :2])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        color_fix(x[0], x[0])
    with pytest.raises(ValueError, match="float"):
        adain((x * 255).to(torch.uint8), (x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="unknown colour-fix method"):
        color_fix(x, x, "histogram")
    with pytest.raises(ValueError, match="at least 2 pixels"):
        adain(x[..., :1, :1], x[..., :1, :1])
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        color_adjust_u8(np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        color_adjust_u8(np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="positive"):
        resize_reference(x, (0, 4))
