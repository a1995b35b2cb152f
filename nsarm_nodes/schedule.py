"""Scale schedules, token offsets and the RoPE-2D grid positions of Infinity / NSARM.

A schedule is a list of (h, w) token grids, coarse to fine. Each token covers 16x16 pixels. The
tables are the Infinity "dynamic resolution" buckets: for every aspect-ratio template the 1M
schedule has 13 scales; the 0.06M / 0.25M / 0.60M buckets are its first 7 / 10 / 12 scales.
"""
from __future__ import annotations

import torch

from .config import PIXELS_PER_TOKEN

# (h, w) token grids of the 1M schedule for each height/width ratio >= 1 (13 scales each).
_SCALES_1M_TALL: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24),
            (32, 32), (40, 40), (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24),
            (35, 28), (45, 36), (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21),
            (36, 27), (48, 36), (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22),
            (39, 26), (48, 32), (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20),
            (42, 24), (56, 32), (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19),
            (46, 23), (60, 30), (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16),
            (50, 20), (65, 26), (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15),
            (54, 18), (72, 24), (90, 30), (111, 37)),
}


def _build_templates() -> dict[float, tuple[tuple[int, int], ...]]:
    table = dict(_SCALES_1M_TALL)
    for ratio, scales in _SCALES_1M_TALL.items():
        if ratio != 1.0:
            # Upstream keys the wide templates by int(1000 / ratio) / 1000 (0.8, 0.75, 0.666, ...).
            table[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in scales)
    return table


SCALES_1M: dict[float, tuple[tuple[int, int], ...]] = _build_templates()
H_DIV_W_TEMPLATES: tuple[float, ...] = tuple(SCALES_1M)
# Number of scales of each pixel bucket.
BUCKET_LENGTHS: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def nearest_template(h_div_w: float) -> float:
    """The h/w template closest to `h_div_w` (as upstream picks it)."""
    return min(H_DIV_W_TEMPLATES, key=lambda t: abs(t - h_div_w))


def scale_schedule(h_div_w: float = 1.0, pn: str = "1M") -> list[tuple[int, int]]:
    """Token grids (h, w) of the bucket `pn` for the template nearest to `h_div_w`."""
    if pn not in BUCKET_LENGTHS:
        raise ValueError(f"unknown pixel bucket {pn!r}; expected one of {sorted(BUCKET_LENGTHS)}")
    return list(SCALES_1M[nearest_template(h_div_w)][: BUCKET_LENGTHS[pn]])


def output_pixels(schedule: list[tuple[int, int]]) -> tuple[int, int]:
    """(height, width) in pixels of the image made by `schedule`."""
    h, w = schedule[-1]
    return h * PIXELS_PER_TOKEN, w * PIXELS_PER_TOKEN


def token_counts(schedule: list[tuple[int, int]]) -> list[int]:
    return [h * w for h, w in schedule]


def token_offsets(schedule: list[tuple[int, int]]) -> list[int]:
    """Start of each scale in the concatenated token sequence (0, 1, 5, 21, ... for 1M square)."""
    offsets, total = [], 0
    for n in token_counts(schedule):
        offsets.append(total)
        total += n
    return offsets


def vae_scales(schedule: list[tuple[int, int]], patchify: bool = True) -> list[tuple[int, int]]:
    """Latent-space size of each scale: a token is a 2x2 latent patch for the patchified 8B VAE."""
    f = 2 if patchify else 1
    return [(h * f, w * f) for h, w in schedule]


def rope_positions(schedule: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid (row, col) of every token of the concatenated sequence, RoPE "star style".

    Token (i, j) of an (h, w) scale sits at round(i * H / h), round(j * W / w) where (H, W) is the
    last scale of the 1M schedule of the same aspect template (64 x 64 for square images), computed
    in float32 with round-half-to-even exactly as upstream. Returns two int64 tensors [N].
    """
    last_h, last_w = SCALES_1M[nearest_template(schedule[-1][0] / schedule[-1][1])][-1]
    rows, cols = [], []
    for h, w in schedule:
        r = (torch.arange(h) * (last_h / h)).round().long()  # [h]
        c = (torch.arange(w) * (last_w / w)).round().long()  # [w]
        rows.append(r[:, None].expand(h, w).reshape(-1))
        cols.append(c[None, :].expand(h, w).reshape(-1))
    return torch.cat(rows), torch.cat(cols)


def rope_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """[head_dim // 4] frequencies 10000^(-2m / (head_dim / 2)), one per axis pair."""
    half = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))


def rope_cos_sin(
    schedule: list[tuple[int, int]], head_dim: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim // 2] in float32 for every token of `schedule`.

    Rotation pair m (channels 2m, 2m+1 of a head) turns by row * inv_freq[m] for the first half of
    the pairs and by col * inv_freq[m - half/2] for the second half.
    """
    rows, cols = rope_positions(schedule)
    inv_freq = rope_inv_freq(head_dim, base)  # [head_dim // 4]
    angles = torch.cat([rows.float()[:, None] * inv_freq, cols.float()[:, None] * inv_freq], dim=-1)
    return torch.cos(angles), torch.sin(angles)
