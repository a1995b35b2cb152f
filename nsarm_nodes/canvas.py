"""Shared latent canvas: the tiles of one image agree on one running latent per scale.

NSARM's running latent (`summed_codes`, the sum of the upsampled codes of every scale so far)
lives at the full latent resolution of its 256x256 LR tile: 128x128 positions, one per 2x2 LR
pixels (f8 VAE, 4x output). The tiles of an image therefore all live on one latent grid, the
*canvas* (the padded image at half the LR resolution), and can share their decisions on it:

  * Ownership: every canvas position belongs to exactly one tile, the one whose centre is nearest
    (per axis, since the tile centres form a product grid; ties go to the earlier tile). The
    boundary between neighbours is the centre of their overlap, where both have the same amount
    of context; every owned cell lies inside its tile.
  * Phases: tiles are coloured greedily in raster order so that tiles of one colour never overlap;
    colour c runs as phase c (a normal grid gives 4 phases by row / column parity; strides below
    half a tile need more). Tiles of one phase are independent of each other, so they can be
    batched in any way: the result does not depend on the batch size or batch composition.
  * Per scale k: after scale k's codes are added to a tile's running latent, the tile writes its
    owned cell into canvas k, and every position of its window owned by a tile of an *earlier*
    phase is replaced by canvas k, before the tile's next-scale input is built (the sampler's
    `latent_hook`). So a tile sees, and continues, its finished neighbours' decisions at every
    scale, the 7 transformation-network scales included.
  * After the last phase, canvas 12 is the whole image's decoder input (see `decode_canvas`).

Memory: the canvases of all scales are kept (a later phase reads every scale of an earlier one):
n_scales x d x 4 bytes per latent position, 728 bytes for 13 scales of 14 channels, i.e. 191 MB
for a 4096x4096 output. Transformer memory is unchanged: one KV cache per tile of the batch.

Geometry is in LR pixels in `tiling.TileGrid`; tile starts must be even (a whole latent position);
`SHARED_ALIGN` = 4 also puts every overlap centre on a whole latent position, so the ownership
boundaries are exactly the pixel-space seam lines of `tiling.seam_lines`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import options, tiling

LR_PER_LATENT = 2  # LR pixels per latent position (f8 VAE, 4x output: 8 output px = 2 LR px)
# Tile starts on multiples of 4 LR px: even (whole latent positions) and with even latent overlaps,
# so the overlap centre, where ownership switches, falls on a whole latent position.
SHARED_ALIGN = 4
TILING_MODES = options.TILING_MODES

LatentHook = Callable[[int, torch.Tensor], torch.Tensor]


def plan_grid(height: int, width: int, tile_size: int, overlap: int, *, batch: int = 1,
              mode: str = "shared") -> tiling.TileGrid:
    """The tile grid of a tiling mode. Shared mode aligns multi-tile axes to `SHARED_ALIGN`; an
    image that fits one tile gets exactly the independent-mode grid (nothing to share, so both
    modes give the same image)."""
    if mode not in TILING_MODES:
        raise ValueError(f"tiling must be one of {TILING_MODES}, got {mode!r}")
    grid = tiling.plan(height, width, tile_size, overlap, batch=batch)
    if mode == "independent" or grid.tiles_per_image == 1:
        return grid
    return tiling.plan(height, width, tile_size, overlap, batch=batch, align=SHARED_ALIGN)


def _axis_cells(starts: Sequence[int], tile: int) -> list[tuple[int, int]]:
    """Owned [begin, end) of every tile along one axis (latent units): the nearest tile centre,
    i.e. cuts at the centre of each overlap (rounded down), first and last cells to the edges."""
    cuts = [right + (left + tile - right) // 2 for left, right in zip(starts, starts[1:])]
    edges = [starts[0], *cuts, starts[-1] + tile]
    return list(zip(edges, edges[1:]))


def phases_of(positions: Sequence[tuple[int, int]], tile: int) -> list[int]:
    """Greedy colouring in the given (raster) order: a tile gets the smallest colour that no
    earlier tile whose window overlaps its own already has."""
    colours: list[int] = []
    for i, (y, x) in enumerate(positions):
        taken = {colours[j] for j, (yj, xj) in enumerate(positions[:i])
                 if abs(yj - y) < tile and abs(xj - x) < tile}
        colours.append(min(set(range(len(taken) + 1)) - taken))
    return colours


@dataclass(frozen=True)
class CanvasLayout:
    """Where each tile of one image sits on the canvas, what it owns and when it runs.

    All in latent positions of the padded image. Tile k (raster order, as `tiling.tile`) has its
    window at `windows[k]` = (y, x), size `tile` x `tile`, owns `cells[k]` = (y0, y1, x0, x1) and
    runs in phase `phase[k]`.
    """

    height: int  # canvas rows: padded LR height / 2
    width: int
    tile: int  # tile side: LR tile / 2 (128)
    windows: tuple[tuple[int, int], ...]
    cells: tuple[tuple[int, int, int, int], ...]
    phase: tuple[int, ...]

    @classmethod
    def from_grid(cls, grid: tiling.TileGrid) -> "CanvasLayout":
        values = {"tile size": grid.tile_size, "padded height": grid.padded_height,
                  "padded width": grid.padded_width}
        values.update({f"tile start {s}": s for s in (*grid.row_starts, *grid.col_starts)})
        odd = [f"{name} ({value} px)" for name, value in values.items() if value % LR_PER_LATENT]
        if odd:
            raise ValueError(
                f"the shared latent canvas needs tile positions on even LR pixels, but the grid has "
                f"{', '.join(odd)}; tile with align={SHARED_ALIGN} (NSARM Tile's align input) or use "
                f"tiling 'independent'")
        tile = grid.tile_size // LR_PER_LATENT
        rows = [s // LR_PER_LATENT for s in grid.row_starts]
        cols = [s // LR_PER_LATENT for s in grid.col_starts]
        row_cells, col_cells = _axis_cells(rows, tile), _axis_cells(cols, tile)
        windows = tuple((y, x) for y in rows for x in cols)
        cells = tuple((y0, y1, x0, x1) for y0, y1 in row_cells for x0, x1 in col_cells)
        return cls(height=grid.padded_height // LR_PER_LATENT, width=grid.padded_width // LR_PER_LATENT,
                   tile=tile, windows=windows, cells=cells, phase=tuple(phases_of(windows, tile)))

    @property
    def num_phases(self) -> int:
        return max(self.phase) + 1

    def owner_map(self) -> torch.Tensor:
        """int64 [height, width]: the tile index owning each canvas position."""
        owner = torch.full((self.height, self.width), -1, dtype=torch.int64)
        for k, (y0, y1, x0, x1) in enumerate(self.cells):
            owner[y0:y1, x0:x1] = k
        return owner

    def read_mask(self, k: int) -> torch.Tensor:
        """bool [tile, tile]: positions of tile k's window owned by a tile of an earlier phase."""
        phase_map = torch.tensor(self.phase)[self.owner_map()]  # [height, width]
        y, x = self.windows[k]
        return phase_map[y:y + self.tile, x:x + self.tile] < self.phase[k]

    def seam_lines(self) -> tuple[list[int], list[int]]:
        """(row_cuts, col_cuts) of the ownership boundaries in latent positions of the canvas."""
        rows = sorted({y0 for y0, _, _, _ in self.cells} - {0})
        cols = sorted({x0 for _, _, x0, _ in self.cells} - {0})
        return rows, cols


def phase_tiles(grid: tiling.TileGrid, layout: CanvasLayout | None = None) -> list[list[int]]:
    """Tile indices of the whole tile batch (image-major: b * N + k) of each phase, in running order."""
    layout = layout or CanvasLayout.from_grid(grid)
    n = grid.tiles_per_image
    return [[b * n + k for b in range(grid.batch) for k in range(n) if layout.phase[k] == p]
            for p in range(layout.num_phases)]


class LatentCanvas:
    """The canvases of every scale for a batch of images cut by one `TileGrid`.

    `phases()` gives the tile indices (of the whole image-major tile batch) of each phase; run
    them in that order, any batching inside a phase, passing `hook(tile_indices)` to
    `sampler.sample(latent_hook=...)`. `latent()` is then the decoder input [B, d, H, W].
    """

    def __init__(self, grid: tiling.TileGrid, n_scales: int, channels: int, device=None,
                 dtype: torch.dtype = torch.float32):
        self.grid = grid
        self.layout = CanvasLayout.from_grid(grid)
        self.n_scales = n_scales
        lay = self.layout
        self.canvas = torch.zeros(n_scales, grid.batch, channels, lay.height, lay.width, device=device,
                                  dtype=dtype)  # [S, B, d, H, W]
        # Latest scale written at each position (for previews): [B, d, H, W].
        self.latest = torch.zeros(grid.batch, channels, lay.height, lay.width, device=device, dtype=dtype)
        # Built once on the host and moved once: nothing is copied inside the scale loop.
        self._masks = torch.stack([lay.read_mask(k) for k in range(len(lay.windows))]).to(device)
        self._done: set[int] = set()

    @property
    def tiles_per_image(self) -> int:
        return self.grid.tiles_per_image

    def phases(self) -> list[list[int]]:
        """Tile indices (image-major: b * N + k) of each phase, in running order."""
        return phase_tiles(self.grid, self.layout)

    def hook(self, tiles: Sequence[int]) -> LatentHook:
        """The sampler's `latent_hook` for a batch of tiles (item i of the batch = tile tiles[i]).

        Refuses a tile while tiles of an earlier phase (of its image) have not run, and tiles run twice.
        """
        n, lay = self.tiles_per_image, self.layout
        tiles = list(tiles)
        for t in tiles:
            if t in self._done:
                raise ValueError(f"tile {t} has already been written to the canvas")
            b, k = divmod(t, n)
            waiting = [b * n + j for j in range(n) if lay.phase[j] < lay.phase[k] and b * n + j not in self._done]
            if waiting:
                raise ValueError(f"tile {t} (phase {lay.phase[k]}) needs tiles {waiting} of earlier phases first")
        self._done.update(tiles)
        masks = self._masks[[t % n for t in tiles]][:, None]  # [n, 1, T, T]
        T = lay.tile

        def latent_hook(si: int, summed: torch.Tensor) -> torch.Tensor:
            """summed [n, d, T, T] after scale si -> the same with earlier phases' cells from canvas si."""
            canvas = self.canvas[si]
            windows = []
            for i, t in enumerate(tiles):
                b, k = divmod(t, n)
                y, x = lay.windows[k]
                y0, y1, x0, x1 = lay.cells[k]
                cell = summed[i, :, y0 - y:y1 - y, x0 - x:x1 - x]
                canvas[b, :, y0:y1, x0:x1] = cell
                self.latest[b, :, y0:y1, x0:x1] = cell
                windows.append(canvas[b, :, y:y + T, x:x + T])
            return torch.where(masks, torch.stack(windows).to(summed.dtype), summed)

        return latent_hook

    def latent(self) -> torch.Tensor:
        """The decoder input of every image: canvas of the last scale [B, d, H, W]."""
        missing = sorted(set(range(self.grid.num_tiles)) - self._done)
        if missing:
            raise ValueError(f"tiles {missing} have not been sampled yet")
        return self.canvas[-1]
