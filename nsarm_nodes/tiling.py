"""Tile / untile any-size IMAGE batches for fixed-size upscalers (model-agnostic, torch only).

NSARM only accepts a 256x256 LR image, so larger (or smaller, or non-square) inputs are cut into
overlapping tiles, every tile is upscaled on its own, and the results are blended back together.
Nothing here knows about the model: any function that maps a tile batch [N, T, T, C] to
[N, T*s, T*s, C] may sit between `tile` and `untile`.

Images follow the ComfyUI IMAGE convention: float [B, H, W, C] in [0, 1] with C = 3 (RGB).
Grayscale and RGBA batches are converted explicitly with `to_rgb` first.

Geometry (per axis, all in input pixels):
  * An axis shorter than the tile is padded to exactly one tile, split evenly before/after, by
    mirror reflection without repeating the edge pixel (numpy "reflect"); when the padding is
    longer than the image the reflection repeats periodically (a b c -> ... b a b c b a b ...), and
    a 1-pixel axis is replicated (there is nothing to reflect).
  * An axis at least one tile long is not padded (unless `align` > 1 asks for a few pixels so that
    the last tile ends flush on an aligned position).
  * Tile starts are spaced as evenly as integers allow, the first at 0 and the last flush with the
    padded edge, using the fewest tiles whose stride stays <= tile_size - overlap. Neighbours
    therefore share at least `overlap` pixels, and dropping any tile would leave a gap.

Blending (per axis, in output pixels): where two neighbouring tiles overlap by `ov` pixels, the
outer ov // 4 pixels on each side belong entirely to the tile whose interior they are (tile-edge
pixels, which every upscaler renders worst for lack of context, get weight 0) and the middle part
ramps from one tile to the other (cosine, linear, or a hard cut at the zone centre for "none").
Image-border edges are never ramped. The per-axis weights of all tiles are normalised to sum to 1
at every coordinate (which also handles three-way overlaps), and the 2-D weight of a tile is the
product of its row and column weights, so the 2-D weights sum to 1 everywhere as well.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Literal, Union

import torch

from . import options

DEFAULT_TILE_SIZE = 256  # the NSARM LR input size
DEFAULT_OVERLAP = 32
MIN_TILE_SIZE = 16
MIN_SCALE = 1
MAX_SCALE = 8
RGB_CHANNELS = 3
GRAY_CHANNELS = 1
RGBA_CHANNELS = 4
BLEND_MODES = options.BLEND_MODES
# Outer 1/EDGE_MARGIN_DIVISOR of every overlap zone (each side) is owned by one tile, unblended.
EDGE_MARGIN_DIVISOR = 4
# Scales given as floats (seam_score) are read as fractions with at most this denominator.
MAX_SCALE_DENOMINATOR = 1024
GRID_FORMAT_VERSION = 1

Blend = Literal["cosine", "linear", "none"]
Scale = Union[int, float, Fraction]


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileGrid:
    """Immutable description of how an image batch was cut into tiles (JSON-serialisable).

    All coordinates are input (LR) pixels. `row_starts` / `col_starts` are the tile start
    positions in the padded image; the tiles of one image are every (row_start, col_start) pair
    in raster order, and the tile batch is image-major: tile k of image b is tile b * N + k.
    """

    height: int  # original image height H
    width: int  # original image width W
    batch: int  # images in the batch B
    tile_size: int  # tile side T
    overlap: int  # requested minimum overlap between neighbours
    pad_top: int
    pad_left: int
    pad_bottom: int
    pad_right: int
    row_starts: tuple[int, ...]  # tile y positions in the padded image, ascending
    col_starts: tuple[int, ...]  # tile x positions in the padded image, ascending
    align: int = 1  # every start and pad_top / pad_left is a multiple of this

    def __post_init__(self) -> None:
        object.__setattr__(self, "row_starts", tuple(self.row_starts))
        object.__setattr__(self, "col_starts", tuple(self.col_starts))
        for name in ("height", "width", "batch", "tile_size", "overlap", "pad_top", "pad_left",
                     "pad_bottom", "pad_right", "align"):
            _require_int(getattr(self, name), f"TileGrid.{name}")
        _check_tiling_params(self.tile_size, self.overlap, self.align)
        if min(self.height, self.width, self.batch) < 1:
            raise ValueError(f"TileGrid: height, width and batch must be >= 1, got "
                             f"{self.height}, {self.width}, {self.batch}")
        for axis, starts, before, after, padded in (
                ("row", self.row_starts, self.pad_top, self.pad_bottom, self.padded_height),
                ("col", self.col_starts, self.pad_left, self.pad_right, self.padded_width)):
            for value in starts:
                _require_int(value, f"TileGrid.{axis}_starts entry")
            if before < 0 or after < 0 or before % self.align:
                raise ValueError(f"TileGrid: invalid {axis} padding ({before}, {after}) for "
                                 f"align={self.align}")
            if not starts or starts[0] != 0 or starts[-1] != padded - self.tile_size:
                raise ValueError(f"TileGrid.{axis}_starts {starts} must start at 0 and end at "
                                 f"padded size - tile_size = {padded - self.tile_size}")
            steps = [b - a for a, b in zip(starts, starts[1:])]
            if any(step < 1 or step > self.tile_size - self.overlap for step in steps):
                raise ValueError(f"TileGrid.{axis}_starts {starts}: strides must be in "
                                 f"1..tile_size - overlap = {self.tile_size - self.overlap}")
            if any(start % self.align for start in starts):
                raise ValueError(f"TileGrid.{axis}_starts {starts} not multiples of "
                                 f"align={self.align}")

    @property
    def padded_height(self) -> int:
        return self.pad_top + self.height + self.pad_bottom

    @property
    def padded_width(self) -> int:
        return self.pad_left + self.width + self.pad_right

    @property
    def rows(self) -> int:
        return len(self.row_starts)

    @property
    def cols(self) -> int:
        return len(self.col_starts)

    @property
    def tiles_per_image(self) -> int:
        return self.rows * self.cols

    @property
    def num_tiles(self) -> int:
        """Tiles in the whole batch: batch * tiles_per_image."""
        return self.batch * self.tiles_per_image

    @property
    def positions(self) -> tuple[tuple[int, int], ...]:
        """(y, x) of every tile of one image in the padded image, raster order."""
        return tuple((y, x) for y in self.row_starts for x in self.col_starts)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (ints and lists); derived sizes are included for readability."""
        data: dict[str, Any] = asdict(self)
        data["row_starts"] = list(self.row_starts)
        data["col_starts"] = list(self.col_starts)
        data.update(version=GRID_FORMAT_VERSION, padded_height=self.padded_height,
                    padded_width=self.padded_width, rows=self.rows, cols=self.cols,
                    tiles_per_image=self.tiles_per_image)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TileGrid":
        """Inverse of `to_dict`; derived entries, when present, must agree with the geometry."""
        if not isinstance(data, dict):
            raise ValueError(f"TileGrid.from_dict expects a dict, got {type(data).__name__}")
        if data.get("version", GRID_FORMAT_VERSION) != GRID_FORMAT_VERSION:
            raise ValueError(f"TileGrid.from_dict: unsupported version {data.get('version')!r}")
        fields = ("height", "width", "batch", "tile_size", "overlap", "pad_top", "pad_left",
                  "pad_bottom", "pad_right", "row_starts", "col_starts")
        missing = [name for name in fields if name not in data]
        if missing:
            raise ValueError(f"TileGrid.from_dict: missing keys {missing}")
        grid = cls(**{name: data[name] for name in fields}, align=data.get("align", 1))
        for name in ("padded_height", "padded_width", "rows", "cols", "tiles_per_image"):
            if name in data and data[name] != getattr(grid, name):
                raise ValueError(f"TileGrid.from_dict: {name}={data[name]!r} disagrees with the "
                                 f"geometry ({getattr(grid, name)})")
        return grid


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
def _require_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")


def _check_tiling_params(tile_size: int, overlap: int, align: int) -> None:
    """Rule: tile_size >= 16, 0 <= overlap <= tile_size // 2, 1 <= align <= tile_size - overlap."""
    _require_int(tile_size, "tile_size")
    _require_int(overlap, "overlap")
    _require_int(align, "align")
    if tile_size < MIN_TILE_SIZE:
        raise ValueError(f"tile_size={tile_size} is too small: it must be >= {MIN_TILE_SIZE}")
    if not 0 <= overlap <= tile_size // 2:
        raise ValueError(f"overlap={overlap} is invalid for tile_size={tile_size}: it must "
                         f"satisfy 0 <= overlap <= tile_size // 2 = {tile_size // 2}")
    if not 1 <= align <= tile_size - overlap:
        raise ValueError(f"align={align} is invalid: it must satisfy 1 <= align <= "
                         f"tile_size - overlap = {tile_size - overlap}")


def _check_size(height: int, width: int) -> None:
    _require_int(height, "height")
    _require_int(width, "width")
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1, got {height}x{width}")


def _axis_padded_length(length: int, tile_size: int, align: int) -> int:
    """Padded length of one axis: one tile if shorter, else the length rounded up so that
    (padded - tile_size) is a multiple of align."""
    if length <= tile_size:
        return tile_size
    return tile_size + align * math.ceil((length - tile_size) / align)


def _axis_count(length: int, tile_size: int, overlap: int, align: int) -> int:
    """Fewest tiles along one axis with every stride <= tile_size - overlap (in align units)."""
    span_units = (_axis_padded_length(length, tile_size, align) - tile_size) // align
    max_step_units = (tile_size - overlap) // align
    return 1 + math.ceil(span_units / max_step_units)


def _axis_plan(length: int, tile_size: int, overlap: int,
               align: int) -> tuple[int, int, tuple[int, ...]]:
    """(pad_before, pad_after, starts) of one axis; starts evenly spaced, last flush."""
    padded = _axis_padded_length(length, tile_size, align)
    span_units = (padded - tile_size) // align
    count = _axis_count(length, tile_size, overlap, align)
    if count == 1:
        starts: tuple[int, ...] = (0,)
    else:
        starts = tuple(align * (i * span_units // (count - 1)) for i in range(count))
    pad = padded - length
    pad_before = align * ((pad // align) // 2)
    return pad_before, pad - pad_before, starts


def plan(height: int, width: int, tile_size: int = DEFAULT_TILE_SIZE,
         overlap: int = DEFAULT_OVERLAP, *, batch: int = 1, align: int = 1) -> TileGrid:
    """Pure geometry: the TileGrid that `tile` uses for a batch of `batch` HxW images.

    `align` > 1 makes every tile start and the top/left padding multiples of `align`; use the
    denominator q of a non-integer upscale factor p/q (e.g. align=2 for 2.5x) so that every tile
    lands on whole output pixels.
    """
    _check_size(height, width)
    _check_tiling_params(tile_size, overlap, align)
    _require_int(batch, "batch")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    pad_top, pad_bottom, row_starts = _axis_plan(height, tile_size, overlap, align)
    pad_left, pad_right, col_starts = _axis_plan(width, tile_size, overlap, align)
    return TileGrid(height=height, width=width, batch=batch, tile_size=tile_size, overlap=overlap,
                    pad_top=pad_top, pad_left=pad_left, pad_bottom=pad_bottom,
                    pad_right=pad_right, row_starts=row_starts, col_starts=col_starts,
                    align=align)


def estimate_tiles(height: int, width: int, tile_size: int = DEFAULT_TILE_SIZE,
                   overlap: int = DEFAULT_OVERLAP, *, align: int = 1) -> int:
    """Number of tiles per image that `plan` / `tile` produce (for memory guards)."""
    _check_size(height, width)
    _check_tiling_params(tile_size, overlap, align)
    return (_axis_count(height, tile_size, overlap, align)
            * _axis_count(width, tile_size, overlap, align))


# --------------------------------------------------------------------------------------------
# Channel conversion
# --------------------------------------------------------------------------------------------
def _check_image_batch(images: Any, name: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name} must have shape [B, H, W, C], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [0, 1], got {images.dtype}")
    if min(images.shape[:3]) < 1:
        raise ValueError(f"{name} is empty: shape {tuple(images.shape)}")


def to_rgb(images: torch.Tensor, background: float | None = None) -> torch.Tensor:
    """Explicit conversion of an IMAGE batch [B, H, W, C] to RGB [B, H, W, 3].

    C = 3: returned unchanged (same tensor). C = 1 (grayscale): the channel is repeated.
    C = 4 (RGBA, straight alpha): with `background=None` the alpha channel is dropped (ComfyUI
    keeps transparency in a separate MASK, so colour channels are plain colour); with a float
    `background` in [0, 1] the image is composited over that uniform gray: rgb * a + bg * (1 - a).
    Any other channel count raises ValueError.
    """
    _check_image_batch(images, "images")
    channels = images.shape[-1]
    if background is not None and not 0.0 <= background <= 1.0:
        raise ValueError(f"background must be in [0, 1] or None, got {background!r}")
    if channels == RGB_CHANNELS:
        return images
    if channels == GRAY_CHANNELS:
        return images.repeat(1, 1, 1, RGB_CHANNELS)
    if channels == RGBA_CHANNELS:
        rgb, alpha = images[..., :RGB_CHANNELS], images[..., RGB_CHANNELS:]
        if background is None:
            return rgb.contiguous()
        return rgb * alpha + background * (1.0 - alpha)
    raise ValueError(f"images has {channels} channels; to_rgb converts 1 (grayscale), "
                     f"3 (RGB) or 4 (RGBA)")


def _check_rgb(images: Any, name: str) -> None:
    _check_image_batch(images, name)
    if images.shape[-1] != RGB_CHANNELS:
        raise ValueError(f"{name} must have {RGB_CHANNELS} (RGB) channels, got "
                         f"{images.shape[-1]}; convert grayscale / RGBA with to_rgb() first")


# --------------------------------------------------------------------------------------------
# tile
# --------------------------------------------------------------------------------------------
def _reflect_index(index: torch.Tensor, length: int) -> torch.Tensor:
    """Map padded coordinates (relative to the image start) into 0..length-1 by repeated mirror
    reflection without edge repeat (period 2 * (length - 1)); a 1-pixel axis maps to 0."""
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * (length - 1)
    folded = torch.remainder(index, period)
    return torch.where(folded >= length, period - folded, folded)


def tile(images: torch.Tensor, tile_size: int = DEFAULT_TILE_SIZE,
         overlap: int = DEFAULT_OVERLAP, *, align: int = 1) -> tuple[torch.Tensor, TileGrid]:
    """Cut an RGB IMAGE batch [B, H, W, 3] of any size into tiles [B * N, T, T, 3] (T = tile_size).

    Tiles are image-major, raster order within an image (tile k of image b is index b * N + k;
    k = row * cols + col). Padding (only where an axis is shorter than a tile, or for `align`) is
    mirror reflection, see the module docstring. Returns the tiles (same dtype / device) and the
    TileGrid needed by `untile`.
    """
    _check_rgb(images, "images")
    batch, height, width, channels = images.shape
    grid = plan(height, width, tile_size, overlap, batch=batch, align=align)
    device = images.device
    offsets = torch.arange(tile_size, device=device)  # [T]
    row_index = [_reflect_index(offsets + y - grid.pad_top, height) for y in grid.row_starts]
    col_index = [_reflect_index(offsets + x - grid.pad_left, width) for x in grid.col_starts]
    tiles = images.new_empty(batch, grid.tiles_per_image, tile_size, tile_size, channels)
    for r, rows in enumerate(row_index):
        band = images.index_select(1, rows)  # [B, T, W, C]
        for c, cols in enumerate(col_index):
            tiles[:, r * grid.cols + c] = band.index_select(2, cols)  # [B, T, T, C]
    return tiles.reshape(batch * grid.tiles_per_image, tile_size, tile_size, channels), grid


# --------------------------------------------------------------------------------------------
# Output-space layout shared by untile and seam_score
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _AxisLayout:
    starts: tuple[int, ...]  # tile starts in the padded output
    tile: int  # tile length in output pixels
    crop: int  # output pixels of padding before the image
    length: int  # output image length


def _as_fraction(scale: Scale) -> Fraction:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, Fraction)):
        raise ValueError(f"scale must be a number, got {scale!r}")
    return Fraction(scale).limit_denominator(MAX_SCALE_DENOMINATOR)


def _check_scale(scale: Fraction) -> None:
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise ValueError(f"scale {scale} is outside the supported range "
                         f"{MIN_SCALE}x..{MAX_SCALE}x")


def _axis_layout(starts: tuple[int, ...], pad_before: int, length: int, tile_size: int,
                 scale: Fraction, axis: str) -> _AxisLayout:
    """Scale one axis into output pixels; every position must land on a whole output pixel."""
    values = {"tile size": tile_size, "padding": pad_before, "image size": length}
    values.update({f"tile start {start}": start for start in starts})
    for what, value in values.items():
        if (value * scale).denominator != 1:
            raise ValueError(
                f"scale {scale} does not map the {axis} {what} ({value} px) to whole output "
                f"pixels; use an integer scale, or tile with align={scale.denominator} and an "
                f"image size that is a multiple of {scale.denominator}")
    return _AxisLayout(starts=tuple(int(start * scale) for start in starts),
                       tile=int(tile_size * scale), crop=int(pad_before * scale),
                       length=int(length * scale))


def _layouts(grid: TileGrid, scale: Fraction) -> tuple[_AxisLayout, _AxisLayout]:
    _check_scale(scale)
    return (_axis_layout(grid.row_starts, grid.pad_top, grid.height, grid.tile_size, scale, "row"),
            _axis_layout(grid.col_starts, grid.pad_left, grid.width, grid.tile_size, scale,
                         "column"))


def _zone_cuts(layout: _AxisLayout) -> list[int]:
    """Seam line of every neighbour pair in output-image coordinates: the centre of the overlap
    zone (the tile edge when tiles only touch); a cut c separates pixels c - 1 and c. Lines that
    fall on or outside the image border are dropped."""
    cuts = []
    for left, right in zip(layout.starts, layout.starts[1:]):
        zone = left + layout.tile - right  # overlap width in output pixels
        cut = right + zone // 2 - layout.crop
        if 0 < cut < layout.length:
            cuts.append(cut)
    return cuts


def seam_lines(grid: TileGrid, scale: Scale) -> tuple[list[int], list[int]]:
    """(row_cuts, col_cuts): the seam lines of `grid` in an output image upscaled by `scale`.

    A cut c lies between output pixels c - 1 and c; it is the centre of a neighbour overlap zone,
    where blend "none" switches from one tile to the next and where cosine / linear ramps are
    steepest.
    """
    rows, cols = _layouts(grid, _as_fraction(scale))
    return _zone_cuts(rows), _zone_cuts(cols)


# --------------------------------------------------------------------------------------------
# untile
# --------------------------------------------------------------------------------------------
def _rise(zone: int, blend: Blend) -> torch.Tensor:
    """Weight of the later tile across an overlap zone of `zone` output pixels (float64, [zone]):
    0 on the outer margin, a ramp sampled at pixel centres in the middle, 1 on the far margin.
    The earlier tile gets exactly 1 - rise, so each pair is complementary by construction."""
    margin = zone // EDGE_MARGIN_DIVISOR
    ramp_len = zone - 2 * margin
    u = (torch.arange(ramp_len, dtype=torch.float64) + 0.5) / ramp_len  # [ramp_len] in (0, 1)
    if blend == "cosine":
        ramp = 0.5 - 0.5 * torch.cos(math.pi * u)
    elif blend == "linear":
        ramp = u
    else:  # "none": hard cut at the zone centre (pixel zone // 2 goes to the later tile)
        ramp = (u >= 0.5).to(torch.float64)
    return torch.cat([torch.zeros(margin, dtype=torch.float64), ramp,
                      torch.ones(margin, dtype=torch.float64)])


def _axis_weights(layout: _AxisLayout, blend: Blend) -> list[torch.Tensor]:
    """Per-tile 1-D weights (float64, [layout.tile] each) that sum to 1 at every coordinate."""
    count = len(layout.starts)
    weights = [torch.ones(layout.tile, dtype=torch.float64) for _ in range(count)]
    for i in range(count - 1):
        zone = layout.starts[i] + layout.tile - layout.starts[i + 1]
        if zone > 0:
            rise = _rise(zone, blend)
            weights[i + 1][:zone] *= rise
            weights[i][layout.tile - zone:] *= 1.0 - rise
    total = torch.zeros(layout.starts[-1] + layout.tile, dtype=torch.float64)  # [padded out]
    for start, weight in zip(layout.starts, weights):
        total[start:start + layout.tile] += weight
    return [weight / total[start:start + layout.tile]
            for start, weight in zip(layout.starts, weights)]


def _tile_slices(layout: _AxisLayout) -> list[tuple[slice, slice]]:
    """(destination in the cropped output, source in the tile) of every tile along one axis."""
    result = []
    for start in layout.starts:
        lo = max(0, layout.crop - start)
        hi = min(layout.tile, layout.crop + layout.length - start)
        result.append((slice(start + lo - layout.crop, start + hi - layout.crop), slice(lo, hi)))
    return result


def untile(processed: torch.Tensor, grid: TileGrid, blend: Blend = "cosine") -> torch.Tensor:
    """Stitch processed tiles [B * N, T*s, T*s, 3] back into images [B, H*s, W*s, 3].

    The scale s = processed tile height / grid.tile_size must equal the width ratio, lie in
    1..8 and map every tile start, the padding and the image size to whole output pixels
    (always true for integer s; for e.g. 2.5x tile with align=2). Overlaps are blended with
    `blend` ("cosine", "linear" or "none"; see the module docstring), padding is cropped.
    Accumulates into one output canvas in float32 (float64 if the tiles are float64); per tile
    only tile-sized temporaries are created.
    """
    if not isinstance(grid, TileGrid):
        raise ValueError(f"grid must be a TileGrid, got {type(grid).__name__}")
    if blend not in BLEND_MODES:
        raise ValueError(f"blend={blend!r} is not one of {BLEND_MODES}")
    _check_rgb(processed, "processed")
    total, tile_h, tile_w, channels = processed.shape
    if total != grid.num_tiles:
        raise ValueError(f"processed has {total} tiles but the grid expects batch {grid.batch} x "
                         f"{grid.tiles_per_image} tiles = {grid.num_tiles}")
    scale = Fraction(tile_h, grid.tile_size)
    if Fraction(tile_w, grid.tile_size) != scale:
        raise ValueError(f"processed tiles are {tile_h}x{tile_w}: the height and width scales "
                         f"({tile_h}/{grid.tile_size} vs {tile_w}/{grid.tile_size}) differ")
    rows, cols = _layouts(grid, scale)
    acc_dtype = torch.promote_types(processed.dtype, torch.float32)
    device = processed.device
    row_weights = [w.to(device, acc_dtype) for w in _axis_weights(rows, blend)]
    col_weights = [w.to(device, acc_dtype) for w in _axis_weights(cols, blend)]
    row_slices, col_slices = _tile_slices(rows), _tile_slices(cols)
    per_image = processed.reshape(grid.batch, grid.tiles_per_image, tile_h, tile_w, channels)
    out = torch.zeros(grid.batch, rows.length, cols.length, channels, dtype=acc_dtype,
                      device=device)  # [B, H*s, W*s, C]
    for r, (row_dst, row_src) in enumerate(row_slices):
        for c, (col_dst, col_src) in enumerate(col_slices):
            weight = row_weights[r][row_src, None] * col_weights[c][None, col_src]  # [h, w]
            source = per_image[:, r * grid.cols + c, row_src, col_src].to(acc_dtype)  # [B,h,w,C]
            out[:, row_dst, col_dst].addcmul_(source, weight[..., None])
    return out


# --------------------------------------------------------------------------------------------
# Seam metric
# --------------------------------------------------------------------------------------------
def seam_score(image: torch.Tensor, grid: TileGrid, scale: Scale) -> float:
    """Seam visibility of an upscaled image, 1.0 = seams indistinguishable from the interior.

    Definition. Let I be `image` ([B, H', W', C] or [H', W', C], H' = grid.height * scale,
    W' = grid.width * scale) in float64. Horizontal gradient energy of the pixel pair
    (x - 1, x) is gx(x) = (I[..., x, :] - I[..., x - 1, :])^2, vertical gy likewise. The seam
    lines are `seam_lines(grid, scale)`: cuts c between pixels c - 1 and c, at the centre of every
    overlap zone (the tile edge when tiles only touch). Per direction d in {x, y}:
      S_d = sum of g_d over all pairs that cross a seam line of direction d (all rows / columns,
            channels and images), n_d = how many such pairs (with channels and images),
      mu_d = mean of g_d over all other pairs (the interior).
    seam_score = (S_x + S_y) / (n_x * mu_x + n_y * mu_y), i.e. the observed energy across seam
    lines divided by the energy that interior statistics (same direction) predict there. A
    grid without seam lines scores 1.0; a perfectly flat interior scores 1.0 if the seams are
    flat too, else inf.
    """
    if not isinstance(grid, TileGrid):
        raise ValueError(f"grid must be a TileGrid, got {type(grid).__name__}")
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        raise ValueError(f"image must be a tensor [B, H, W, C] or [H, W, C], got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    pixels = (image if image.ndim == 4 else image[None]).to(torch.float64)  # [B, H', W', C]
    rows, cols = _layouts(grid, _as_fraction(scale))
    if pixels.shape[1:3] != (rows.length, cols.length):
        raise ValueError(f"image is {pixels.shape[1]}x{pixels.shape[2]} but the grid upscaled "
                         f"by {scale} gives {rows.length}x{cols.length}")
    seam_energy = 0.0
    expected_energy = 0.0
    for dim, cuts in ((2, _zone_cuts(cols)), (1, _zone_cuts(rows))):
        if not cuts:
            continue
        energy = torch.diff(pixels, dim=dim).square()  # pair i = (i, i + 1); cut c -> pair c - 1
        energy = energy.movedim(dim, 0).reshape(energy.shape[dim], -1)  # [pairs, rest]
        on_seam = torch.zeros(energy.shape[0], dtype=torch.bool, device=energy.device)
        on_seam[torch.tensor(cuts, device=energy.device) - 1] = True
        seam_energy += energy[on_seam].sum().item()
        expected_energy += energy[on_seam].numel() * energy[~on_seam].mean().item()
    if expected_energy == 0.0:
        return 1.0 if seam_energy == 0.0 else math.inf
    return seam_energy / expected_energy


__all__ = [
    "BLEND_MODES", "DEFAULT_OVERLAP", "DEFAULT_TILE_SIZE", "MAX_SCALE", "MIN_SCALE",
    "MIN_TILE_SIZE", "TileGrid", "estimate_tiles", "plan", "seam_lines", "seam_score", "tile",
    "to_rgb", "untile",
]
