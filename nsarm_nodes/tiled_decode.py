"""Tiled VAE decode of a whole-image latent, equal to decoding it whole away from window edges.

The latent [B, d, H, W] is cut into square windows of at most `window` positions per side that
overlap by at least 2 * `halo` (planned by `tiling.plan` on the latent grid). Each window runs
through the decoder's own submodules; the decoded windows are blended back with `tiling.untile`
(cosine ramps in the middle of each overlap, the outer quarter of every overlap owned by the
window whose interior it is, image borders never ramped).

GroupNorm. Every ResnetBlock normalises with statistics over the *whole* image; a window that
used its own statistics would come out with its own contrast and colour cast (measured in
BENCHMARKS.md: mean |difference| 0.03 of the range, visible blocks). So the windows of an image
advance in lock-step from one GroupNorm to the next: at each GroupNorm every window reports the
per-group sum and sum of squares over its *core* (the positions nearest its centre; the cores
partition the image), the totals give the whole image's mean and variance, and every window
normalises with those. What remains is the zero padding at a window's inner edges, confined to a
band of the decoder's receptive field that the overlap blend covers.

Memory: the decoder runs on one window at a time; between GroupNorms each window's state (the
activation and the block's skip input: at the finest level 2 x 128 channels per output pixel,
~0.5 KB per output pixel in bf16, 2.1 GB for a 2 x 2-tile image, 8.6 GB for 4096 x 4096) waits on
the decode device when all windows' states fit in half of its free memory, else it is parked on
the output device (host memory), so device memory is one window's decode whatever the image size.
A latent no larger than one window is decoded whole by `vae.decode`, exactly.
"""
from __future__ import annotations

from collections.abc import Callable, Generator

import torch
import torch.nn.functional as F

from . import tiling
from .canvas import _axis_cells

DEFAULT_WINDOW = 128  # latent positions per window side: 1024 px, one NSARM tile
DEFAULT_HALO = 8  # latent positions of context on each side of a window's blended core
VAE_PATCH = 8  # output pixels per latent position
DEFAULT_RAMP = 32  # output pixels of crossfade across each boundary between window cores

# A window's decode as a generator: at each GroupNorm it yields its core's (mean, variance, count)
# per group (float64 [G], [G], int) and receives the whole image's (mean, variance) per group.
Stats = tuple[torch.Tensor, torch.Tensor, int]
Steps = Generator[Stats, tuple[torch.Tensor, torch.Tensor], torch.Tensor]


def plan_windows(height: int, width: int, window: int = DEFAULT_WINDOW, halo: int = DEFAULT_HALO,
                 batch: int = 1) -> tiling.TileGrid:
    """The decode windows of a [B, d, height, width] latent as a TileGrid in latent positions."""
    if window < tiling.MIN_TILE_SIZE:
        raise ValueError(f"decode window {window} is too small: it must be >= {tiling.MIN_TILE_SIZE} latent positions")
    side = min(window, height, width)
    overlap = min(2 * halo, side // 2)
    return tiling.plan(height, width, side, overlap, batch=batch)


def _auto_park_device(vae, grid: tiling.TileGrid, device: torch.device, output_device) -> torch.device:
    """Keep the waiting windows' states on the decode device when they fit in half of its free memory
    (no transfers), else park them on `output_device`. The states peak at the finest level: the
    activation and the block's skip input, base_ch channels at 8x the window side, per window."""
    if device.type != "cuda":
        return device
    weight = vae.decoder.conv_out.conv.weight  # [3, base_ch, 3, 3]
    side = VAE_PATCH * grid.tile_size
    need = grid.tiles_per_image * 2 * weight.shape[1] * side * side * weight.element_size()
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return device if need < free / 2 else torch.device(output_device)


class _Window:
    """One window's place: its latent slice, its core (relative to the window) and where to park."""

    def __init__(self, y: int, x: int, side: int, core: tuple[int, int, int, int], device, park):
        self.y, self.x, self.side, self.core = y, x, side, core
        self.device, self.park_device = device, park

    def park(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.park_device)

    def load(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def norm(self, module, x: torch.Tensor) -> Steps:
        """GroupNorm `module` (vae.Norm) of x with the image's statistics; x may be parked."""
        gn = module.norm
        groups = gn.num_groups
        scale = x.shape[-1] // self.side  # activation pixels per latent position at this level
        y0, y1, x0, x1 = (v * scale for v in self.core)
        core = self.load(x[:, :, y0:y1, x0:x1])  # [1, C, h, w] (a view when not parked)
        # Per-channel sum and sum of squares (one pass each, accumulated in float32), then per group in float64.
        total = core.sum(dim=(0, 2, 3), dtype=torch.float32).double().unflatten(0, (groups, -1)).sum(1)  # [G]
        square = torch.linalg.vector_norm(core, dim=(0, 2, 3), dtype=torch.float32).double().square()
        square = square.unflatten(0, (groups, -1)).sum(1)
        count = core[0, :x.shape[1] // groups].numel()
        del core  # nothing but parked tensors stays referenced while the window waits
        mean = total / count
        var = (square / count - mean.square()).clamp_min(0)
        mean, var = yield (mean.double(), var.double(), count)
        x = self.load(x)
        per_channel = x.shape[1] // groups
        return F.batch_norm(x.float(), mean.float().repeat_interleave(per_channel),
                            var.float().repeat_interleave(per_channel), gn.weight.float(), gn.bias.float(),
                            False, 0.0, gn.eps).to(x.dtype)

    def resblock(self, blk, x: torch.Tensor) -> Steps:
        """vae.ResnetBlock with image-wide GroupNorm (GN, swish, conv, GN, swish, conv, + skip):
        parked input -> parked output."""
        h = yield from self.norm(blk.norm1, x)
        h = self.park(blk.conv1(F.silu(h)))
        h = yield from self.norm(blk.norm2, h)
        h = blk.conv2(F.silu(h))
        skip = self.load(x)
        return self.park((blk.nin_shortcut(skip) if blk.nin_shortcut is not None else skip) + h)

    def decode(self, decoder, z: torch.Tensor) -> Steps:
        """vae.Decoder.forward on this window, step by step: [1, d, s, s] -> [1, 3, 8s, 8s]."""
        h = self.park(decoder.conv_in(self.load(z)))
        h = yield from self.resblock(decoder.mid.block_1, h)
        h = yield from self.resblock(decoder.mid.block_2, h)
        for level in reversed(decoder.up):
            for blk in level.block:
                h = yield from self.resblock(blk, h)
            resample = getattr(level, level.resample_name)
            if resample is not None:
                h = self.park(resample(self.load(h)))
        h = yield from self.norm(decoder.norm_out, h)
        return decoder.conv_out(F.silu(h))


def _lockstep(decoder, windows: list[_Window], latents: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run every window's decode, pooling the GroupNorm statistics of all windows at each norm."""
    steps = [w.decode(decoder, z) for w, z in zip(windows, latents)]
    outputs: list[torch.Tensor | None] = [None] * len(steps)
    parts = [next(s) for s in steps]
    while True:
        # Pooled mean and variance of the cores (Chan et al.'s combination, in float64).
        count = sum(n for _, _, n in parts)
        mean = sum(m * n for m, _, n in parts) / count
        var = sum((v + (m - mean).square()) * n for m, v, n in parts) / count
        nxt = []
        for i, s in enumerate(steps):
            try:
                nxt.append(s.send((mean.to(windows[i].device), var.to(windows[i].device))))
            except StopIteration as done:
                outputs[i] = done.value
        if len(nxt) == 0:
            return outputs
        if len(nxt) != len(steps):
            raise RuntimeError("decode windows went out of step")  # every window has the same norms
        parts = nxt


@torch.no_grad()
def decode_tiled(vae, z: torch.Tensor, *, window: int = DEFAULT_WINDOW, halo: int = DEFAULT_HALO,
                 output_device: torch.device | str = "cpu", park_device: torch.device | str | None = None,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Latent [B, d, H, W] -> IMAGE [B, 8H, 8W, 3] in [0, 1] on `output_device`.

    park_device: where window states wait between GroupNorms (default: on the decode device when
    they fit, see `_auto_park_device`). progress(done, total) is called after each image.
    """
    if z.ndim != 4:
        raise ValueError(f"latent must be [B, d, H, W], got {tuple(z.shape)}")
    batch, _, height, width = z.shape
    grid = plan_windows(height, width, window, halo, batch=batch)
    device = next(vae.parameters()).device
    dtype = vae.decoder.conv_in.conv.weight.dtype
    if park_device is None:
        park_device = _auto_park_device(vae, grid, device, output_device)
    side = grid.tile_size
    cells = [(r0, r1, c0, c1) for r0, r1 in _axis_cells(grid.row_starts, side)
             for c0, c1 in _axis_cells(grid.col_starts, side)]
    decoded = []
    for b in range(batch):
        if grid.tiles_per_image == 1:
            images = [vae.decode(z[b:b + 1].to(device, dtype))]
        else:
            windows = [_Window(y, x, side, (r0 - y, r1 - y, c0 - x, c1 - x), device, park_device)
                       for (y, x), (r0, r1, c0, c1) in zip(grid.positions, cells)]
            latents = [z[b:b + 1, :, w.y:w.y + side, w.x:w.x + side].to(dtype) for w in windows]
            images = [out.float().clamp(-1.0, 1.0) for out in _lockstep(vae.decoder, windows, latents)]
        decoded += [((image + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).to(output_device) for image in images]
        if progress:
            progress(b + 1, batch)
    tiles = torch.cat(decoded)  # [B * N, 8 side, 8 side, 3]
    if grid.tiles_per_image == 1:
        return tiles
    return blend_windows(tiles, grid, cells)


def _axis_weights(starts: tuple[int, ...], side: int, length: int, cuts: list[tuple[int, int]],
                  ramp: int) -> list[torch.Tensor]:
    """Per-window 1-D weights in output pixels (float32 [8 side]): 1 on the window's core, 0 beyond,
    a linear ramp of `ramp` output pixels centred on each cut between two cores. Sum to 1."""
    total = torch.zeros(VAE_PATCH * length, dtype=torch.float64)
    weights = []
    pixel = torch.arange(VAE_PATCH * length, dtype=torch.float64) + 0.5
    for start, (a, b) in zip(starts, cuts):
        lo, hi = VAE_PATCH * a, VAE_PATCH * b
        w = torch.ones_like(pixel)
        if a > 0:
            w = w * ((pixel - lo) / ramp + 0.5).clamp(0, 1)
        if b < length:
            w = w * ((hi - pixel) / ramp + 0.5).clamp(0, 1)
        total += w
        weights.append(w)
    return [(w / total)[VAE_PATCH * s:VAE_PATCH * (s + side)].float() for w, s in zip(weights, starts)]


def blend_windows(tiles: torch.Tensor, grid: tiling.TileGrid, cells, ramp: int = DEFAULT_RAMP) -> torch.Tensor:
    """Decoded windows [B * N, 8 side, 8 side, 3] -> images [B, 8 H, 8 W, 3]: each window's core,
    with a `ramp`-pixel linear crossfade centred on every boundary between cores."""
    side = grid.tile_size
    rows = _axis_weights(grid.row_starts, side, grid.height, _axis_cells(grid.row_starts, side), ramp)
    cols = _axis_weights(grid.col_starts, side, grid.width, _axis_cells(grid.col_starts, side), ramp)
    n = grid.tiles_per_image
    out = torch.zeros(grid.batch, VAE_PATCH * grid.height, VAE_PATCH * grid.width, 3, dtype=tiles.dtype,
                      device=tiles.device)
    s8 = VAE_PATCH * side
    for k, (y, x) in enumerate(grid.positions):
        weight = (rows[grid.row_starts.index(y)][:, None] * cols[grid.col_starts.index(x)][None, :]).to(tiles.device)
        out[:, VAE_PATCH * y:VAE_PATCH * y + s8, VAE_PATCH * x:VAE_PATCH * x + s8] += tiles[k::n] * weight[..., None]
    return out
