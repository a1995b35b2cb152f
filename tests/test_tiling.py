"""Tile / untile: geometry, exact round trips, stand-in upscalers, the seam metric, bad inputs."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nsarm_nodes.tiling import (
    BLEND_MODES,
    TileGrid,
    estimate_tiles,
    plan,
    seam_lines,
    seam_score,
    tile,
    to_rgb,
    untile,
)

IDENTITY_TOL = 1e-6
STANDIN_TOL = 1e-5
# Output pixels near the image border where reflection padding (tiled) and the interpolator's own
# border clamping (whole image) legitimately differ: bicubic 4x reads 2 LR pixels = 8 output px.
BICUBIC_BORDER = 8
FAST = settings(max_examples=25, deadline=None)


def texture(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Deterministic photo-like test image [B, H, W, 3] in [0, 1]: smooth octaves plus grain."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.full((batch, 3, height, width), 0.5)
    for cell, amplitude in ((64, 0.25), (16, 0.12), (4, 0.06)):
        coarse = torch.rand(batch, 3, height // cell + 2, width // cell + 2, generator=gen) - 0.5
        img += amplitude * F.interpolate(coarse, size=(height, width), mode="bilinear",
                                         align_corners=False)
    img += 0.02 * (torch.rand(batch, 3, height, width, generator=gen) - 0.5)
    return img.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def resize(images: torch.Tensor, scale: int, mode: str) -> torch.Tensor:
    """Stand-in upscaler on IMAGE batches [B, H, W, C] via NCHW F.interpolate."""
    nchw = images.permute(0, 3, 1, 2)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(nchw, scale_factor=scale, mode=mode, **kwargs).permute(0, 2, 3, 1)


def nearest_rational(images: torch.Tensor, num: int, den: int) -> torch.Tensor:
    """Exact integer-index nearest upscale by num/den: output pixel o reads input o * den // num."""
    height, width = images.shape[1:3]
    rows = torch.arange(height * num // den) * den // num
    cols = torch.arange(width * num // den) * den // num
    return images.index_select(1, rows).index_select(2, cols)


def roundtrip(images: torch.Tensor, tile_size: int, overlap: int, blend: str, upscale=None,
              align: int = 1) -> torch.Tensor:
    tiles, grid = tile(images, tile_size, overlap, align=align)
    return untile(tiles if upscale is None else upscale(tiles), grid, blend)


# ----------------------------------------------------------------------------- identity property
@FAST
@given(height=st.integers(1, 600), width=st.integers(1, 600),
       tile_size=st.sampled_from([16, 48, 256]), overlap=st.integers(0, 128),
       batch=st.integers(1, 2), blend=st.sampled_from(BLEND_MODES))
def test_identity_roundtrip_property(height, width, tile_size, overlap, batch, blend):
    overlap = min(overlap, tile_size // 2)
    x = torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(height * width))
    y = roundtrip(x, tile_size, overlap, blend)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert (y - x).abs().max().item() <= IDENTITY_TOL


@pytest.mark.parametrize("blend", BLEND_MODES)
@pytest.mark.parametrize("size", [(3000, 700), (700, 3000), (1, 1), (1, 2048), (2048, 1),
                                  (257, 255), (255, 257), (17, 999), (513, 511), (3, 5)])
def test_identity_roundtrip_fixed_sizes(size, blend):
    x = torch.rand(1, *size, 3, generator=torch.Generator().manual_seed(1))
    for overlap in (0, 32, 128):
        y = roundtrip(x, 256, overlap, blend)
        assert y.shape == x.shape
        assert (y - x).abs().max().item() <= IDENTITY_TOL


def test_none_blend_is_bit_exact_and_batch_is_image_major():
    x = torch.rand(2, 300, 700, 3, generator=torch.Generator().manual_seed(2))
    tiles, grid = tile(x, 256, 64)
    assert torch.equal(untile(tiles, grid, "none"), x)
    n = grid.tiles_per_image
    assert torch.equal(tiles[n:], tile(x[1:], 256, 64)[0])  # image 1's tiles follow image 0's


# ----------------------------------------------------------------------------- tiling contents
@FAST
@given(height=st.integers(1, 80), width=st.integers(1, 80), overlap=st.integers(0, 16),
       align=st.integers(1, 3))
def test_tiles_are_reflection_padded_crops(height, width, overlap, align):
    x = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(3))
    tiles, grid = tile(x, 32, overlap, align=align)
    pad = ((0, 0), (grid.pad_top, grid.pad_bottom), (grid.pad_left, grid.pad_right), (0, 0))
    padded = torch.from_numpy(np.pad(x.numpy(), pad, mode="reflect"))  # numpy as the reference
    assert padded.shape[1:3] == (grid.padded_height, grid.padded_width)
    for k, (y0, x0) in enumerate(grid.positions):
        assert torch.equal(tiles[k], padded[0, y0:y0 + 32, x0:x0 + 32])


def test_one_pixel_image_is_replicated():
    x = torch.tensor([0.1, 0.5, 0.9]).reshape(1, 1, 1, 3)
    tiles, grid = tile(x, 64, 8)
    assert tiles.shape == (1, 64, 64, 3) and grid.tiles_per_image == 1
    assert torch.equal(tiles, x.expand(1, 64, 64, 3))


# ----------------------------------------------------------------------------- geometry
@settings(max_examples=150, deadline=None)
@given(height=st.integers(1, 3000), width=st.integers(1, 3000), tile_size=st.integers(16, 300),
       overlap=st.integers(0, 150), align=st.integers(1, 4), batch=st.integers(1, 3))
def test_plan_geometry(height, width, tile_size, overlap, align, batch):
    overlap = min(overlap, tile_size // 2)
    grid = plan(height, width, tile_size, overlap, batch=batch, align=align)
    assert grid.tiles_per_image == estimate_tiles(height, width, tile_size, overlap, align=align)
    assert grid.num_tiles == batch * grid.rows * grid.cols
    assert len(grid.positions) == grid.tiles_per_image
    for starts, length, before, padded in (
            (grid.row_starts, height, grid.pad_top, grid.padded_height),
            (grid.col_starts, width, grid.pad_left, grid.padded_width)):
        assert padded >= max(length, tile_size) and padded - max(length, tile_size) < align
        assert 0 <= before <= padded - length
        # inside the padded image, first at 0, last flush
        assert starts[0] == 0 and starts[-1] + tile_size == padded
        assert all(s % align == 0 for s in starts)
        steps = np.diff(starts)
        # neighbour overlap >= requested (so coverage is gapless), evenly spaced
        assert all(tile_size - step >= overlap for step in steps)
        if len(steps):
            assert steps.max() - steps.min() <= align
        # no tile wasted: one tile fewer cannot span the axis at the allowed stride
        max_step = (tile_size - overlap) // align * align
        assert (len(starts) - 2) * max_step < padded - tile_size or len(starts) == 1
    # every input pixel covered (hence every output pixel, which maps back onto one)
    covered = np.zeros((grid.padded_height, grid.padded_width), dtype=bool)
    for y0, x0 in grid.positions:
        covered[y0:y0 + tile_size, x0:x0 + tile_size] = True
    assert covered.all()
    # JSON round trip, immutability, hashability
    restored = TileGrid.from_dict(json.loads(json.dumps(grid.to_dict())))
    assert restored == grid and hash(restored) == hash(grid)
    with pytest.raises(dataclasses.FrozenInstanceError):
        grid.overlap = 0  # type: ignore[misc]


@FAST
@given(height=st.integers(1, 120), width=st.integers(1, 120), tile_size=st.sampled_from([16, 40]),
       overlap=st.integers(0, 20), scale=st.integers(1, 8), blend=st.sampled_from(BLEND_MODES))
def test_weights_are_a_partition_of_unity(height, width, tile_size, overlap, scale, blend):
    overlap = min(overlap, tile_size // 2)
    grid = plan(height, width, tile_size, overlap)
    ones = torch.ones(grid.num_tiles, tile_size * scale, tile_size * scale, 3)
    out = untile(ones, grid, blend)
    assert out.shape == (1, height * scale, width * scale, 3)
    assert (out - 1).abs().max().item() <= IDENTITY_TOL


def test_none_blend_switches_tiles_exactly_on_the_seam_lines():
    grid = plan(300, 700, 64, 16)
    scale = 3
    labels = torch.arange(grid.num_tiles, dtype=torch.float32)  # tile k is filled with k
    tiles = labels.reshape(-1, 1, 1, 1).expand(-1, 64 * scale, 64 * scale, 3).contiguous()
    out = untile(tiles, grid, "none")[0, ..., 0]
    row_cuts, col_cuts = seam_lines(grid, scale)
    assert len(row_cuts) == grid.rows - 1 and len(col_cuts) == grid.cols - 1
    assert torch.nonzero(out.diff(dim=1)[0]).flatten().add(1).tolist() == col_cuts
    assert torch.nonzero(out.diff(dim=0)[:, 0]).flatten().add(1).tolist() == row_cuts


# ----------------------------------------------------------------------------- stand-in upscalers
def max_error(a: torch.Tensor, b: torch.Tensor, border: int = 0) -> float:
    h, w = a.shape[1:3]
    return (a - b)[:, border:h - border, border:w - border].abs().max().item()


@pytest.mark.parametrize("blend", ["cosine", "linear"])
@pytest.mark.parametrize("size,border", [((300, 520), 0), ((200, 600), BICUBIC_BORDER),
                                         ((100, 90), BICUBIC_BORDER)])
def test_bicubic_4x_matches_whole_image(size, border, blend):
    """Tile-edge pixels (bicubic clamps there) have zero weight, so the stitch equals bicubic of
    the whole image; unpadded images match to the border, padded axes except within 8 px."""
    x = texture(1, *size)
    stitched = roundtrip(x, 256, 32, blend, lambda t: resize(t, 4, "bicubic"))
    assert max_error(stitched, resize(x, 4, "bicubic"), border) <= STANDIN_TOL


@FAST
@given(height=st.integers(20, 150), width=st.integers(20, 150), overlap=st.integers(8, 16),
       blend=st.sampled_from(["cosine", "linear", "none"]))
def test_bicubic_4x_property_small_tiles(height, width, overlap, blend):
    x = texture(1, height, width, seed=height + width)
    stitched = roundtrip(x, 32, overlap, blend, lambda t: resize(t, 4, "bicubic"))
    assert max_error(stitched, resize(x, 4, "bicubic"), BICUBIC_BORDER) <= STANDIN_TOL


@pytest.mark.parametrize("scale,size", [(2, (300, 700)), (8, (150, 90)), (8, (40, 300))])
@pytest.mark.parametrize("blend", BLEND_MODES)
def test_nearest_matches_whole_image_everywhere(scale, size, blend):
    x = texture(2, *size)
    stitched = roundtrip(x, 64, 16, blend, lambda t: resize(t, scale, "nearest"))
    assert max_error(stitched, resize(x, scale, "nearest")) <= IDENTITY_TOL


def test_non_integer_scale_needs_alignment():
    x = texture(1, 130, 96)  # even sizes: 2.5x maps them to whole pixels
    upscale = lambda t: nearest_rational(t, 5, 2)  # noqa: E731
    stitched = roundtrip(x, 64, 12, "cosine", upscale, align=2)
    assert stitched.shape == (1, 325, 240, 3)
    assert max_error(stitched, nearest_rational(x, 5, 2)) <= IDENTITY_TOL
    tiles, grid = tile(x, 64, 12)  # align=1 puts tiles on odd starts
    assert any(s % 2 for s in grid.row_starts + grid.col_starts)
    with pytest.raises(ValueError, match=r"align=2"):
        untile(upscale(tiles), grid)


# ----------------------------------------------------------------------------- seam metric
@pytest.fixture(scope="module")
def seam_case():
    x = texture(1, 300, 520, seed=7)
    tiles, grid = tile(x, 256, 32)
    return x, tiles, grid, resize(tiles, 4, "bicubic"), resize(x, 4, "bicubic")


def test_seam_score_of_tiled_bicubic_matches_untiled(seam_case):
    _, _, grid, up_tiles, whole = seam_case
    reference = seam_score(whole, grid, 4)
    for blend in BLEND_MODES:
        assert seam_score(untile(up_tiles, grid, blend), grid, 4) == pytest.approx(reference, rel=0.05)
    assert 0.5 < reference < 2.0  # a smooth natural-ish image has no special energy on the lines
    assert seam_score(whole[0], grid, 4) == reference  # [H, W, C] accepted too


def test_seam_score_flags_a_broken_stitch(seam_case):
    _, _, grid, up_tiles, whole = seam_case
    broken = up_tiles.clone()
    broken[1::2] += 0.1  # every other tile brighter
    reference = seam_score(whole, grid, 4)
    hard = seam_score(untile(broken, grid, "none"), grid, 4)
    soft = seam_score(untile(broken, grid, "cosine"), grid, 4)
    assert hard > 1.5 * reference
    assert soft < hard  # blending spreads the step over the ramp


def test_seam_score_edge_cases():
    grid = plan(100, 100, 256, 32)  # a single tile: no seam lines
    assert seam_lines(grid, 4) == ([], [])
    assert seam_score(torch.rand(1, 400, 400, 3), grid, 4) == 1.0
    flat_grid = plan(40, 40, 16, 4)
    assert seam_score(torch.full((40, 40, 3), 0.3), flat_grid, 1) == 1.0
    with pytest.raises(ValueError, match="grid upscaled"):
        seam_score(torch.rand(1, 41, 40, 3), flat_grid, 1)


# ----------------------------------------------------------------------------- channels
def test_to_rgb_conversions():
    gray = torch.rand(2, 5, 7, 1)
    assert torch.equal(to_rgb(gray), gray.expand(2, 5, 7, 3))
    rgba = torch.rand(2, 5, 7, 4)
    assert torch.equal(to_rgb(rgba), rgba[..., :3])
    composited = to_rgb(rgba, background=1.0)
    assert torch.allclose(composited, rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:]))
    rgb = torch.rand(1, 4, 4, 3)
    assert to_rgb(rgb) is rgb
    with pytest.raises(ValueError, match="2 channels"):
        to_rgb(torch.rand(1, 4, 4, 2))
    with pytest.raises(ValueError, match="background"):
        to_rgb(rgba, background=2.0)


@pytest.mark.parametrize("channels", [1, 4])
def test_tile_rejects_non_rgb_and_points_to_to_rgb(channels):
    with pytest.raises(ValueError, match="to_rgb"):
        tile(torch.rand(1, 50, 50, channels))
    tiles, grid = tile(to_rgb(torch.rand(1, 50, 50, channels)))
    assert tiles.shape == (1, 256, 256, 3)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs,message", [
    ({"overlap": 129}, r"overlap=129 .*tile_size // 2 = 128"),
    ({"overlap": -1}, r"overlap=-1"),
    ({"tile_size": 8, "overlap": 2}, r"tile_size=8 is too small"),
    ({"tile_size": 64, "overlap": 8, "align": 57}, r"align=57"),
    ({"tile_size": 64.0}, r"tile_size must be an int"),
])
def test_bad_tiling_parameters(kwargs, message):
    x = torch.rand(1, 40, 40, 3)
    with pytest.raises(ValueError, match=message):
        tile(x, **kwargs)
    with pytest.raises(ValueError, match=message):
        plan(40, 40, **kwargs)
    with pytest.raises(ValueError, match=message):
        estimate_tiles(40, 40, **kwargs)


@pytest.mark.parametrize("images,message", [
    (torch.rand(40, 40, 3), r"images must have shape \[B, H, W, C\]"),
    (torch.zeros(1, 40, 40, 3, dtype=torch.uint8), r"floating-point"),
    (torch.rand(1, 0, 40, 3), r"empty"),
    (np.zeros((1, 4, 4, 3)), r"torch.Tensor"),
])
def test_bad_images(images, message):
    with pytest.raises(ValueError, match=message):
        tile(images)


def test_bad_untile_inputs():
    tiles, grid = tile(torch.rand(2, 300, 300, 3), 256, 32)  # 4 tiles per image, 8 in all
    up = resize(tiles, 2, "nearest")
    with pytest.raises(ValueError, match=r"processed has 7 tiles but the grid expects batch 2 x 4"):
        untile(up[:7], grid)
    with pytest.raises(ValueError, match=r"512x768: the height and width scales"):
        untile(torch.zeros(8, 512, 768, 3), grid)
    with pytest.raises(ValueError, match=r"outside the supported range"):
        untile(torch.zeros(8, 9 * 256, 9 * 256, 3), grid)
    with pytest.raises(ValueError, match=r"outside the supported range"):
        untile(torch.zeros(8, 128, 128, 3), grid)
    with pytest.raises(ValueError, match=r"blend='gauss'"):
        untile(up, grid, "gauss")
    with pytest.raises(ValueError, match=r"grid must be a TileGrid"):
        untile(up, grid.to_dict())
    with pytest.raises(ValueError, match=r"\(RGB\) channels"):
        untile(up[..., :1], grid)


def test_from_dict_rejects_inconsistent_metadata():
    data = plan(600, 520, 256, 32).to_dict()
    with pytest.raises(ValueError, match="tiles_per_image"):
        TileGrid.from_dict({**data, "tiles_per_image": 4})
    with pytest.raises(ValueError, match="row_starts"):
        TileGrid.from_dict({**data, "row_starts": [0, 300, 344]})
    with pytest.raises(ValueError, match="missing keys"):
        TileGrid.from_dict({k: v for k, v in data.items() if k != "col_starts"})
    with pytest.raises(ValueError, match="version"):
        TileGrid.from_dict({**data, "version": 99})
    assert TileGrid.from_dict(data).padded_height == 600
