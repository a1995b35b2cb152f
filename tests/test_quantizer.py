"""BSQ and the multi-scale decomposition: golden parity (Algorithm 1, transformation-network bits,
summed codes of the NSARM run), layout properties, and Algorithm 2 (cascaded GT)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import golden, golden_json
from nsarm_nodes.config import NUM_REPLACED_SCALES
from nsarm_nodes.quantizer import (
    MultiScaleBSQ,
    bits_to_codes,
    bsq,
    latent_to_tokens,
    map_outputs_to_bits,
    resample_next,
    tokens_to_latent,
    up,
)
from nsarm_nodes.schedule import scale_schedule, vae_scales

D = 14  # latent channels of the 8B tokenizer
FULL = (128, 128)  # latent of a 1024x1024 image
VAE_SCALES = [(s, s) for s in (2, 4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128)]
MAP_SIDES = (2, 4, 8, 12, 16, 24, 32)
FLOAT_TOL = dict(atol=2e-4, rtol=1e-4)  # tests/golden/README.md, tolerances: summed_codes, F_hat
PROPS = settings(max_examples=25, deadline=None)


def _quantizer_layout(bits: torch.Tensor) -> torch.Tensor:
    """Our latent bits [B, d, h, w] -> upstream's quantizer layout [B, T=1, h, w, d]."""
    return bits.permute(0, 2, 3, 1).unsqueeze(1)


def _latents(draw_seed: int, batch: int, d: int, h: int, w: int, std: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw_seed)
    return torch.randn(batch, d, h, w, generator=g) * std


# ----------------------------------------------------------------------------------- golden


def test_schedule_gives_the_golden_vae_scales():
    assert vae_scales(scale_schedule()) == VAE_SCALES
    assert [tuple(s[1:]) for s in golden_json("schedule.json")["vae_scales_thw"]] == VAE_SCALES


def test_decompose_matches_golden():
    g = golden("bsq_multiscale")
    bits, f_hat = MultiScaleBSQ(D).decompose(g["F"], VAE_SCALES)
    assert len(bits) == len(VAE_SCALES)
    for k, (b, (s, _)) in enumerate(zip(bits, VAE_SCALES)):
        assert b.shape == (1, D, s, s) and b.dtype == torch.uint8
        assert torch.equal(_quantizer_layout(b), g[f"bits_k{k}"]), f"scale {k}"
    torch.testing.assert_close(f_hat, g["F_hat"], **FLOAT_TOL)


def test_map_outputs_to_bits_matches_golden_and_needs_the_reshape():
    g = golden("map_network")
    permute_differs = False
    for i, side in enumerate(MAP_SIDES):
        out = g[f"out_{i}"]  # [1, side*side, 14]
        bits = map_outputs_to_bits(out, side)
        assert torch.equal(_quantizer_layout(bits), g[f"bits_{i}"]), f"scale {i}"
        permuted = bsq(out.permute(0, 2, 1).reshape(1, D, side, side))[1]
        permute_differs |= not torch.equal(permuted, bits)
    assert permute_differs, "a permute instead of the reshape must change the bits"


def test_summed_codes_rebuilt_from_run_bits():
    run = golden("nsarm_run_area")
    schedule = scale_schedule()
    summed = torch.zeros(1, D, *FULL)
    for si, (h, w) in enumerate(schedule):
        tokens = run[f"bits_s{si}"]  # [1, h*w, 56]
        assert tokens.shape == (1, h * w, 4 * D)
        latent_bits = tokens_to_latent(tokens, h, w)  # [1, 14, 2h, 2w]
        summed = summed + up(bits_to_codes(latent_bits), FULL)
    torch.testing.assert_close(summed, run["summed_codes"], **FLOAT_TOL)


def test_map_bits_are_the_run_bits_of_the_replaced_scales():
    g, run = golden("map_network"), golden("nsarm_run_area")
    for i, side in enumerate(MAP_SIDES):
        assert torch.equal(latent_to_tokens(map_outputs_to_bits(g[f"out_{i}"], side)), run[f"bits_s{i}"])


# ----------------------------------------------------------------------------------- properties


@PROPS
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([1, 4, 14, 32]), h=st.integers(1, 6), w=st.integers(1, 6))
def test_bits_codes_bits_round_trip(seed, d, h, w):
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (2, d, h, w), generator=g, dtype=torch.uint8)
    codes = bits_to_codes(bits)
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(2, h, w))  # unit length per position
    again_codes, again_bits = bsq(codes)
    assert torch.equal(again_bits, bits)
    torch.testing.assert_close(again_codes, codes, atol=1e-7, rtol=0)


def test_bsq_maps_zero_to_bit_zero():
    codes, bits = bsq(torch.zeros(1, D, 2, 2))
    assert not bits.any()
    torch.testing.assert_close(codes, torch.full((1, D, 2, 2), -1 / math.sqrt(D)))


@PROPS
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([1, 3, 14]), h=st.integers(1, 5), w=st.integers(1, 5),
       patchify=st.booleans())
def test_tokens_latent_round_trip(seed, d, h, w, patchify):
    f = 2 if patchify else 1
    x = _latents(seed, 2, d, f * h, f * w)
    tokens = latent_to_tokens(x, patchify)
    assert tokens.shape == (2, h * w, d * f * f)
    assert torch.equal(tokens_to_latent(tokens, h, w, patchify), x)


@PROPS
@given(d=st.sampled_from([1, 3, 14]), h=st.integers(1, 4), w=st.integers(1, 4))
def test_token_bit_order_is_c4_i2_j(d, h, w):
    x = torch.arange(d * 2 * h * 2 * w, dtype=torch.float32).reshape(1, d, 2 * h, 2 * w)
    tokens = latent_to_tokens(x)  # [1, h*w, 4d]
    for r in range(h):
        for col in range(w):
            for c in range(d):
                for i in range(2):
                    for j in range(2):
                        assert tokens[0, r * w + col, c * 4 + i * 2 + j] == x[0, c, 2 * r + i, 2 * col + j]
    flat = latent_to_tokens(x, patchify=False)  # [1, 4hw, d], positions row-major
    assert torch.equal(flat[0, 2 * w + 1], x[0, :, 1, 1])


_GRIDS = st.sampled_from([
    (16, [(1, 1), (2, 2), (4, 4), (8, 8), (16, 16)]),
    (12, [(2, 2), (3, 3), (6, 6), (12, 12)]),
    (8, [(1, 1), (3, 3), (5, 5), (8, 8)]),
])


@PROPS
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([4, 14]), grid=_GRIDS)
def test_reconstruct_of_decompose_bits_is_f_hat(seed, d, grid):
    full, scales = grid
    x = _latents(seed, 2, d, full, full)
    bits, f_hat = MultiScaleBSQ(d).decompose(x, scales)
    assert [tuple(b.shape[-2:]) for b in bits] == scales
    torch.testing.assert_close(MultiScaleBSQ.reconstruct(bits, (full, full)), f_hat, atol=1e-5, rtol=0)


@PROPS
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([4, 14]), grid=_GRIDS, std=st.floats(0.5, 4.0))
def test_decomposition_reduces_residual_energy(seed, d, grid, std):
    # Holds for latents whose magnitude is comparable to the unit-length codes (as VAE features are).
    full, scales = grid
    x = _latents(seed, 2, d, full, full, std)
    _, f_hat = MultiScaleBSQ(d).decompose(x, scales)
    assert (x - f_hat).square().sum() < x.square().sum()


# ----------------------------------------------------------------------------------- Algorithm 2


def _map_bits() -> list[torch.Tensor]:
    g = golden("map_network")
    return [map_outputs_to_bits(g[f"out_{i}"], side) for i, side in enumerate(MAP_SIDES)]


def test_cascaded_gt_without_replaced_scales_is_decompose():
    hr = golden("bsq_multiscale")["F"]
    quantizer = MultiScaleBSQ(D)
    bits, f_hat = quantizer.decompose(hr, VAE_SCALES)
    gt_bits, cum = quantizer.cascaded_gt(hr, [], VAE_SCALES)
    assert all(torch.equal(a, b) for a, b in zip(gt_bits, bits))
    torch.testing.assert_close(cum, f_hat, atol=1e-5, rtol=0)


def test_cascaded_gt_with_replaced_scales():
    hr = golden("bsq_multiscale")["F"]  # [1, 14, 128, 128] HR latent
    replaced = _map_bits()
    assert len(replaced) == NUM_REPLACED_SCALES
    gt_bits, cum = MultiScaleBSQ(D).cascaded_gt(hr, replaced, VAE_SCALES)
    assert all(torch.equal(a, b) for a, b in zip(gt_bits, replaced))

    # Direct computation: the LR-derived scales first, then BSQ of the area-downsampled HR residual.
    expected = torch.zeros_like(hr)
    for b in replaced:
        expected += F.interpolate((b.float() * 2 - 1) / math.sqrt(D), size=FULL, mode="bilinear", align_corners=False)
    only_replaced = expected.clone()
    for k in range(NUM_REPLACED_SCALES, len(VAE_SCALES)):
        r = F.adaptive_avg_pool2d(hr - expected, VAE_SCALES[k])
        positive = F.normalize(r, dim=1) > 0
        assert torch.equal(gt_bits[k], positive.to(torch.uint8)), f"scale {k}"
        codes = torch.where(positive, 1.0, -1.0) / math.sqrt(D)
        expected += F.interpolate(codes, size=FULL, mode="bilinear", align_corners=False)
    torch.testing.assert_close(cum, expected, atol=1e-5, rtol=0)
    assert (hr - cum).square().sum() < (hr - only_replaced).square().sum()


def test_cascaded_gt_differs_from_plain_decompose_after_replacement():
    hr = golden("bsq_multiscale")["F"]
    plain, _ = MultiScaleBSQ(D).decompose(hr, VAE_SCALES)
    gt_bits, _ = MultiScaleBSQ(D).cascaded_gt(hr, _map_bits(), VAE_SCALES)
    assert any(not torch.equal(a, b) for a, b in zip(gt_bits[NUM_REPLACED_SCALES:], plain[NUM_REPLACED_SCALES:]))


@pytest.mark.parametrize("mode", ["area", "trilinear"])
def test_resample_next_modes(mode):
    x = _latents(0, 1, D, 16, 16)
    out = resample_next(x, (6, 6), mode)
    ref = F.adaptive_avg_pool2d(x, (6, 6)) if mode == "area" else F.interpolate(
        x, size=(6, 6), mode="bilinear", align_corners=False
    )
    assert torch.equal(out, ref)
    with pytest.raises(ValueError):
        resample_next(x, (6, 6), "nearest")
