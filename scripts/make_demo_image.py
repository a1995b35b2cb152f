"""Render assets/demo.png: a small procedural landscape for the README quick start and the tests.

    python scripts/make_demo_image.py [OUT.png]

The picture is made here from seeded noise (numpy + Pillow only), so the repository ships an image
it owns: a sky with soft clouds and a sun glow, two mountain ranges fading into the haze, a lake
that mirrors them with ripples, conifers, rocks and a grassy shore. It has what an upscaler has to
deal with -- sharp silhouettes, smooth gradients, fine texture and a little sensor noise -- in a
256 x 256 LR image (one NSARM tile). It is rendered at 2x and downsampled, so its edges are
anti-aliased like a photo's. The output is identical on every run (fixed seed).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 256  # output side (the NSARM LR tile)
OVERSAMPLE = 2  # rendered at 2x, then downsampled with a Lanczos filter
SEED = 20251001
HORIZON = 0.58  # lake surface, as a fraction of the height
OUT = Path(__file__).resolve().parents[1] / "assets" / "demo.png"


def fractal_noise(rng: np.random.Generator, shape: tuple[int, int], octaves: int, base: int,
                  persistence: float = 0.5) -> np.ndarray:
    """Sum of bilinearly upsampled random grids (value noise), normalised to [0, 1]."""
    h, w = shape
    total = np.zeros(shape, np.float64)
    amplitude = 1.0
    for o in range(octaves):
        cells = base * 2**o
        grid = rng.random((cells + 1, cells + 1))
        y = np.linspace(0, cells, h, endpoint=False)
        x = np.linspace(0, cells, w, endpoint=False)
        y0, x0 = y.astype(int), x.astype(int)
        fy, fx = (y - y0)[:, None], (x - x0)[None, :]
        fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep between grid points
        a, b = grid[np.ix_(y0, x0)], grid[np.ix_(y0, x0 + 1)]
        c, d = grid[np.ix_(y0 + 1, x0)], grid[np.ix_(y0 + 1, x0 + 1)]
        total += amplitude * ((a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy)
        amplitude *= persistence
    total -= total.min()
    return total / total.max()


def ridge(rng: np.random.Generator, width: int, octaves: int, base: int) -> np.ndarray:
    """A 1-D fractal profile in [0, 1] (mountain silhouettes)."""
    return fractal_noise(rng, (1, width), octaves, base)[0]


def mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a * (1 - t[..., None]) + b * t[..., None]


def render(size: int = SIZE, seed: int = SEED) -> Image.Image:
    rng = np.random.default_rng(seed)
    n = size * OVERSAMPLE
    y, x = np.mgrid[0:n, 0:n] / n
    horizon = HORIZON

    # Sky: deep blue at the top to a warm haze at the horizon, soft clouds, a sun glow.
    t = np.clip(y / horizon, 0, 1) ** 0.8
    sky = mix(np.array([0.16, 0.33, 0.62]), np.array([0.93, 0.80, 0.62]), t)
    clouds = fractal_noise(rng, (n, n), 5, 3)
    clouds = np.clip((clouds - 0.55) * 3.0, 0, 1) * (1 - t) ** 0.5
    sky = mix(sky, np.array([0.97, 0.96, 0.94]), 0.8 * clouds)
    sun = np.exp(-(((x - 0.74) ** 2 + (y - 0.24) ** 2) / 0.004))
    sky = sky + np.array([1.0, 0.85, 0.55]) * (0.6 * sun + 0.15 * np.exp(-((x - 0.74) ** 2 + (y - 0.24) ** 2) / 0.05))[..., None]
    img = sky

    # Two mountain ranges: the far one bluish and hazy, the near one darker and textured.
    rock = fractal_noise(rng, (n, n), 6, 4)
    for top, height, colour, haze, octaves in ((0.33, 0.18, [0.42, 0.48, 0.60], 0.45, 6),
                                               (0.43, 0.15, [0.20, 0.30, 0.22], 0.15, 7)):
        profile = np.clip(horizon - height * ridge(rng, n, octaves, 3), top, horizon)
        inside = y >= profile[None, :]
        shade = 0.75 + 0.5 * (rock - 0.5) + 0.25 * (y - profile[None, :]) / height
        layer = np.array(colour) * shade[..., None]
        layer = mix(layer, np.array([0.80, 0.78, 0.75]), np.full(y.shape, haze))
        img = np.where(inside[..., None] & (y < horizon)[..., None], layer, img)

    # Conifers on the near shore: dark triangles with a ragged outline.
    for _ in range(14):
        cx, base_y = rng.uniform(0.02, 0.98), horizon + rng.uniform(-0.005, 0.01)
        h, w = rng.uniform(0.07, 0.16), rng.uniform(0.025, 0.045)
        rel = (base_y - y) / h  # 0 at the base, 1 at the tip
        ragged = 1 + 0.25 * np.sin(rel * 60 + cx * 100)
        inside = (rel >= 0) & (rel <= 1) & (np.abs(x - cx) <= w * (1 - rel) * ragged)
        green = np.array([0.07, 0.18, 0.09]) * (0.8 + 0.4 * rock[..., None])
        img = np.where(inside[..., None], green, img)

    # Lake: the scene above mirrored about the horizon, darkened, with horizontal ripples.
    below = y >= horizon
    ripple = 0.004 * np.sin(y * 900 + 8 * fractal_noise(rng, (n, n), 3, 6)) * (y - horizon) * 8
    src_y = np.clip(2 * horizon - y, 0, horizon - 1 / n)
    src_x = np.clip(x + ripple, 0, 1 - 1 / n)
    mirror = img[(src_y * n).astype(int), (src_x * n).astype(int)]
    water = mix(mirror * 0.78, np.array([0.10, 0.22, 0.28]), np.clip((y - horizon) * 3, 0, 0.6))
    sparkle = (fractal_noise(rng, (n, n), 2, 40) > 0.93) * np.exp(-((x - 0.74) ** 2) / 0.01)
    water = water + 0.35 * sparkle[..., None]
    img = np.where(below[..., None], water, img)

    # Grassy shore in the foreground with streaky blades and a few rocks.
    shore = 0.80 + 0.05 * (ridge(rng, n, 5, 4) - 0.5)
    ground = y >= shore[None, :]
    streaks = fractal_noise(rng, (n // 8, n), 5, 48)  # stretched 8x vertically: blades of grass
    streaks = np.asarray(Image.fromarray(streaks.astype(np.float32), "F").resize((n, n), Image.BICUBIC))
    blades = 0.65 * streaks + 0.35 * fractal_noise(rng, (n, n), 6, 8)
    grass = mix(np.array([0.24, 0.36, 0.10]), np.array([0.62, 0.66, 0.28]), blades)
    grass = grass * (0.85 + 0.3 * (y - 0.8))[..., None]
    img = np.where(ground[..., None], grass, img)
    for _ in range(5):
        cx, cy = rng.uniform(0.05, 0.95), rng.uniform(0.86, 0.97)
        rx, ry = rng.uniform(0.03, 0.07), rng.uniform(0.02, 0.035)
        d = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
        light = np.clip(0.55 - 0.6 * (y - cy) / ry - 0.3 * (x - cx) / rx, 0.15, 1.0)
        stone = np.array([0.52, 0.50, 0.47]) * (light * (0.8 + 0.4 * rock))[..., None]
        img = np.where((d <= 1)[..., None], stone, img)

    # Downsample (anti-aliasing), then a little sensor noise.
    big = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    small = np.asarray(big.resize((size, size), Image.LANCZOS), np.float64)
    small = small + rng.normal(0, 2.0, small.shape)
    return Image.fromarray(np.clip(small, 0, 255).round().astype(np.uint8))


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    render().save(out, optimize=True)
    print(f"{out}: {out.stat().st_size / 1000:.1f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
