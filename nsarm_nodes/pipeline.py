"""NSARMPipeline: LR image(s) of any size -> 4x super-resolved image(s); model discovery.

One 256x256 LR tile goes: VAE encoder -> transformation network -> 13-scale bitwise loop ->
VAE decoder -> 1024x1024. Other sizes are tiled (256 px tiles with overlap), in one of two modes:
  * "shared" (default): the tiles share one latent canvas per scale (canvas.py), so each tile
    continues its finished neighbours' decisions; the canvas is decoded as one latent with a
    tiled decode (tiled_decode.py). One image, one latent: no pixel-space blending of tiles.
  * "independent": every tile runs on its own and the decoded tiles are feathered together.
The colour fix runs once on the whole result against the whole LR image, so tiles cannot drift
apart in colour.

Images are ComfyUI IMAGE tensors: float [B, H, W, 3] in [0, 1].
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import colorfix, options
from . import tiling as tilegrid
from .canvas import LatentCanvas, phase_tiles, plan_grid
from .config import DEFAULT_PROMPT, LR_SIZE, SCALE_FACTOR
from .preview import LatentPreview
from .sampler import sample, transformation_bits
from .schedule import scale_schedule
from .tiled_decode import decode_tiled
from .text import PromptCache, PromptEmbeds, T5TextEncoder, encode_prompts, negative_or_none

Progress = Callable[[int, int], None]
Preview = Callable[[torch.Tensor], None]  # receives uint8 [h, w, 3] (CPU) images
N_SCALES = len(scale_schedule(1.0, "1M"))


class _Steps:
    """Progress over a known number of steps (scales of each tile batch, decodes, colour fix)."""

    def __init__(self, total: int, progress: Progress | None):
        self.done, self.total, self.progress = 0, total, progress

    def tick(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)


class MissingModelsError(FileNotFoundError):
    """Weight files are not where the pipeline looks; the message lists each and its source."""


@dataclass(frozen=True)
class WeightFile:
    role: str
    subdir: str  # below the models folder (ComfyUI's models/ layout)
    names: tuple[str, ...]  # accepted file (or folder) names, preferred first
    size: str
    md5: str
    source: str


WEIGHTS = (
    WeightFile(
        "transformer", "nsarm", ("NSARM.safetensors", "NSARM_bf16.safetensors", "NSARM.pth"),
        "~35 GB (fp32 .pth; 18.6 GB converted to bf16 safetensors)", "16905db52d64fd44c365b6a963a6598d (NSARM.pth)",
        "NSARM README (github.com/Xiangtaokong/NSARM): Google Drive folder 1AFTGsTjvvaQvjzlG7x606tFJdmi-9n_4 "
        "or Baidu Drive (key eqhc); join the parts with `cat NSARM_part_* > NSARM.pth`",
    ),
    WeightFile(
        "vae", "nsarm", ("infinity_vae_d56_f8_14_patchify.safetensors", "infinity_vae_d56_f8_14_patchify.pth"),
        "~0.33 GB", "-", "huggingface.co/FoundationVision/Infinity (infinity_vae_d56_f8_14_patchify.pth)",
    ),
    WeightFile(
        "text encoder", "text_encoders", ("flan-t5-xl",), "~9 GB folder (fp32 shards) or ~4.7 GB (fp16)", "-",
        "huggingface.co/google/flan-t5-xl (config, tokenizer and weights in one folder)",
    ),
)


def gguf_name(weight_format: str) -> str:
    """The file name `convert --format F` is documented with (README): NSARM_<F>.gguf."""
    from .weights import weight_format as format_named

    return f"NSARM_{format_named(weight_format).name}.gguf"


def present_weights(models_dir: Path, spec: WeightFile, weight_format: str = "dense") -> list[Path]:
    """Every accepted file of `spec` under `models_dir`, the one loaded first; for the transformer
    with a block `weight_format`, its pre-quantised NSARM_<format>.gguf leads (no quantising at load)."""
    from .weights import weight_format as format_named

    names = spec.names
    if spec.role == "transformer" and format_named(weight_format).quantized:
        names = (gguf_name(weight_format),) + names
    return [base / name for name in names for base in (models_dir / spec.subdir, models_dir) if (base / name).exists()]


def find_weight(models_dir: Path, spec: WeightFile, weight_format: str = "dense") -> Path | None:
    """The file of `spec` that loads (`present_weights`' first), or None."""
    found = present_weights(models_dir, spec, weight_format)
    return found[0] if found else None


def missing_models_message(models_dir: Path, roles: Sequence[str]) -> str:
    lines = [f"NSARM weights missing under {models_dir}:"]
    for spec in WEIGHTS:
        if spec.role in roles:
            where = models_dir / spec.subdir / spec.names[0]
            lines.append(
                f"  - {spec.role}: expected {where} (also accepted: {', '.join(spec.names[1:]) or '-'}); "
                f"size {spec.size}; md5 {spec.md5}; get it from {spec.source}"
            )
    return "\n".join(lines)


def _coverage_line(role: str, path: Path) -> tuple[str, bool]:
    """check-models: how `path`'s keys fit the model (keys and shapes only; no tensor data is
    read) and whether it loads."""
    from .loading import CheckpointError

    if role == "transformer":
        from .transformer import checkpoint_coverage
    else:
        from .vae import checkpoint_coverage
    try:
        cov = checkpoint_coverage(path)
    except CheckpointError as exc:
        return f"error: {exc}", False
    if cov.loadable and cov.unexpected:
        return (f"loads with a warning: {cov.unexpected_summary()}, ignored (refused with --strict / the "
                f"loader's strict input)"), True
    if cov.loadable:
        return "all keys match", True
    return f"error: does not fit the {role}: {cov.summary()}", False


def check_models(models_dir: str | os.PathLike) -> tuple[str, bool]:
    """A report of which weight files are present (path, size, format; every accepted name, the
    first being the one loaded), how each checkpoint's keys fit its model (from the headers / keys
    only) and what is missing. Not ok when a role is missing or the file it loads does not fit."""
    root = Path(models_dir)
    rows, missing, ok = [], [], True
    for spec in WEIGHTS:
        found = present_weights(root, spec)
        if not found:
            missing.append(spec.role)
            continue
        for i, path in enumerate(found):  # the first is the one loaded
            if path.is_dir():
                size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
                fmt = "folder"
            else:
                size, fmt = path.stat().st_size, path.suffix.lstrip(".")
            unused = f"; not used: {found[0].name} is preferred" if i else ""
            if spec.role in ("transformer", "vae"):
                line, loads = _coverage_line(spec.role, path)
                ok = ok and (loads or i > 0)
                rows.append(f"  {'ok ' if loads else 'BAD'} {spec.role:<13} {path}  ({size / 1e9:.2f} GB, {fmt}{unused})")
                rows.append(f"      keys: {line}")
            else:
                rows.append(f"  ok  {spec.role:<13} {path}  ({size / 1e9:.2f} GB, {fmt}{unused})")
    report = "\n".join(rows)
    if missing:
        report = "\n".join(filter(None, [report, missing_models_message(root, missing)]))
    return report, ok and not missing


def images_to_unit(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """IMAGE [B, H, W, 3] in [0, 1] -> [B, 3, H, W] in [-1, 1] (x * 2 - 1, as upstream)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be an IMAGE batch [B, H, W, 3], got {getattr(images, 'shape', type(images))}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or infinite values; check the node that produced it")
    return images.float().clamp(0, 1).permute(0, 3, 1, 2) * 2 - 1


def unit_to_images(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> IMAGE [B, H, W, 3] in [0, 1]."""
    return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in [0, 1] -> uint8 by truncation (upstream and ComfyUI SaveImage)."""
    return images.clamp(0, 1).mul(255).to(torch.uint8)


def resize_output(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resampling of IMAGE [B, H, W, 3] to (height, width)."""
    if tuple(images.shape[1:3]) == (height, width):
        return images
    x = F.interpolate(images.permute(0, 3, 1, 2), size=(height, width), mode="bicubic",
                      align_corners=False, antialias=True)
    return x.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


class NSARMPipeline:
    """The programmatic API: `NSARMPipeline(transformer, vae, ...)(images, prompt=..., seed=...)`."""

    def __init__(self, transformer, vae, text_encoder: T5TextEncoder | None = None,
                 prompt_cache: PromptCache | None = None):
        if transformer.map_net is None:
            raise ValueError("the transformer has no transformation network: load NSARM.pth, not plain Infinity")
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.prompt_cache = text_encoder, prompt_cache
        self._preview_map: LatentPreview | None = None

    @property
    def preview_map(self) -> LatentPreview:
        """The latent -> RGB preview map of this VAE, fitted at first use."""
        if self._preview_map is None:
            self._preview_map = LatentPreview.fit(self.vae)
        return self._preview_map

    @property
    def device(self) -> torch.device:
        return self.transformer.pos_start.device

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        return encode_prompts(list(prompts), self.text_encoder, self.prompt_cache,
                              channels=self.transformer.cfg.text_channels)

    @torch.no_grad()
    def encode_lr(self, images: torch.Tensor) -> torch.Tensor:
        """LR IMAGE [B, 256, 256, 3] -> raw VAE features [B, d, 32, 32] float32."""
        if tuple(images.shape[1:3]) != (LR_SIZE, LR_SIZE):
            raise ValueError(
                f"the NSARM encoder takes {LR_SIZE}x{LR_SIZE} LR images, got {tuple(images.shape[1:3])}; "
                f"tile larger or smaller images first (NSARMTile / NSARMUpscale do this)"
            )
        x = images_to_unit(images).to(self.device)
        return self.vae.encode_features(x.to(next(self.vae.parameters()).dtype))

    @torch.no_grad()
    def decode(self, summed_codes: torch.Tensor) -> torch.Tensor:
        """Latent [B, d, 128, 128] -> IMAGE [B, 1024, 1024, 3] in [0, 1]."""
        z = summed_codes.to(self.device, next(self.vae.parameters()).dtype)
        return unit_to_images(self.vae.decode(z))

    @torch.no_grad()
    def upscale_tiles(self, tiles: torch.Tensor, text: PromptEmbeds, *, seeds: Sequence[int],
                      batch_size: int = 1, progress: Progress | None = None, preview: Preview | None = None,
                      steps: _Steps | None = None, **sampling) -> torch.Tensor:
        """Independent tiles: 256x256 tiles [N, 256, 256, 3] -> [N, 1024, 1024, 3] (no colour fix),
        `batch_size` at a time through the transformer. `text` has one prompt per tile; `seeds` one
        seed per tile. Progress: one step per scale of each batch and one per batch decode."""
        n_batches = -(-tiles.shape[0] // batch_size)
        steps = steps or _Steps(n_batches * (N_SCALES + 1), progress)
        outs = []
        for start in range(0, tiles.shape[0], batch_size):
            idx = list(range(start, min(start + batch_size, tiles.shape[0])))
            latest: list[torch.Tensor] = []

            def record(si: int, summed: torch.Tensor) -> torch.Tensor:
                latest[:] = [summed[0]]
                return summed

            feats = self.encode_lr(tiles[idx])
            res = sample(self.transformer, self.vae, text.select(idx), feats, seed=[seeds[i] for i in idx],
                         progress=self._step(steps, preview, lambda: latest[0]),
                         latent_hook=record if preview else None, **sampling)
            outs.append(self.decode(res.summed_codes).cpu())
            steps.tick()
        return torch.cat(outs)

    def _step(self, steps: _Steps, preview: Preview | None, latent: Callable[[], torch.Tensor]):
        """The sampler's progress callback: a preview of `latent()`, then one progress step."""
        def step(si: int, n: int) -> None:
            if preview:
                preview(self.preview_map.render(latent()))
            steps.tick()
        return step

    @torch.no_grad()
    def upscale_shared(self, tiles: torch.Tensor, grid: tilegrid.TileGrid, text: PromptEmbeds, *,
                       seeds: Sequence[int], batch_size: int = 1, progress: Progress | None = None,
                       preview: Preview | None = None, steps: _Steps | None = None,
                       **sampling) -> torch.Tensor:
        """Shared canvas: tiles [B * N, 256, 256, 3] cut by `grid` -> the padded images
        [B, 4 * padded H, 4 * padded W, 3] (no colour fix). Phase by phase, `batch_size` tiles of a
        phase at a time; then one tiled decode of each image's canvas. Progress: one step per scale
        of each batch and one per decoded image."""
        canvas = LatentCanvas(grid, N_SCALES, self.vae.quantizer.codebook_dim, device=self.device)
        batches = [phase[i:i + batch_size] for phase in canvas.phases() for i in range(0, len(phase), batch_size)]
        steps = steps or _Steps(len(batches) * N_SCALES + grid.batch, progress)
        n = grid.tiles_per_image
        # The transformation network's scales of every tile, `batch_size` tiles at a time in raster order
        # (as NSARM Encode LR takes the whole tile batch); then the phases.
        replaced = [torch.cat(parts) for parts in zip(*(
            transformation_bits(self.transformer, self.encode_lr(tiles[i:i + batch_size]))
            for i in range(0, tiles.shape[0], batch_size)))]
        for idx in batches:
            image = idx[0] // n
            sample(self.transformer, self.vae, text.select(idx), seed=[seeds[i] for i in idx],
                   replaced_bits=[b[idx] for b in replaced],
                   progress=self._step(steps, preview, lambda: canvas.latest[image]),
                   latent_hook=canvas.hook(idx), **sampling)
        latent = canvas.latent().clone()  # [B, d, H/2, W/2]; the other scales' canvases are dropped
        del canvas
        return decode_tiled(self.vae, latent, output_device="cpu", progress=lambda done, total: steps.tick())

    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        prompt: str | Sequence[str] = DEFAULT_PROMPT,
        seed: int = 1,
        *,
        tau: float = 0.5,
        top_p: float = 0.97,
        cfg: float = 1.0,
        next_scale_mode: str = "area",
        negative_prompt: str | None = None,
        color_fix: str = "adain+wavelet",
        tile_overlap: int = 32,
        tile_batch_size: int = 1,
        blend: str = "cosine",
        output_scale: float = SCALE_FACTOR,
        max_tiles: int | None = None,
        progress: Progress | None = None,
        tiling: str = "shared",
        preview: Preview | None = None,
    ) -> torch.Tensor:
        """IMAGE [B, H, W, 3] of any size -> IMAGE [B, round(H*s), round(W*s), 3], s = output_scale.

        Tile i of the whole tile batch (image-major, raster order) is sampled with seed + i, as in the
        composable node chain (NSARMTile -> ... -> NSARMBitwiseDecode); a single 256x256 image uses
        `seed` itself. `prompt` is one prompt or one per image. `tiling`: "shared" (one latent
        canvas per image, the default) or "independent" (tiles blended in pixel space with `blend`);
        an image that fits one tile gives the same result in both. progress(done, total) counts the
        scales of every tile batch, the decodes and the colour fix; preview(uint8 [h, w, 3]) gets a
        picture of the running latent after every scale.
        """
        images_to_unit(images)  # validates shape and finiteness before any work
        for name, value in (("seed", seed), ("tau", tau), ("top_p", top_p), ("cfg", cfg), ("mode", next_scale_mode),
                            ("color_fix", color_fix), ("tile_overlap", tile_overlap),
                            ("tile_batch_size", tile_batch_size), ("blend", blend), ("output_scale", output_scale),
                            ("tiling", tiling)):
            options.check(name, value, f"NSARMPipeline: {name}")  # the bounds of the nodes and the CLI
        B, H, W, _ = images.shape
        prompts = [prompt] * B if isinstance(prompt, str) else list(prompt)
        if len(prompts) != B:
            raise ValueError(f"got {len(prompts)} prompts for {B} images; give one prompt or one per image")
        grid = plan_grid(H, W, LR_SIZE, tile_overlap, batch=B, mode=tiling)
        if max_tiles is not None and grid.num_tiles > max_tiles:
            raise ValueError(
                f"{B} image(s) of {W}x{H} need {grid.num_tiles} tiles of {LR_SIZE}px (limit {max_tiles}); "
                f"each tile is a full 1024x1024 NSARM run. Downscale the input, raise the limit, or lower the overlap"
            )
        tiles, grid = tilegrid.tile(images.float(), LR_SIZE, tile_overlap, align=grid.align)
        n = grid.tiles_per_image
        text = self.encode_prompts(prompts).repeat(n)  # one prompt per tile, image-major
        seeds = [seed + i for i in range(B * n)]
        negative = None
        if negative_or_none(negative_prompt) is not None and cfg != 1.0:  # "" = the learned unconditional rows
            negative = self.encode_prompts([negative_prompt])
        sampling = dict(tau=tau, top_p=top_p, cfg=cfg, next_scale_mode=next_scale_mode, negative_text=negative)
        fix = 1 if color_fix != "none" else 0
        if tiling == "shared":
            canvas_batches = sum(-(-len(p) // tile_batch_size) for p in phase_tiles(grid))
            steps = _Steps(canvas_batches * N_SCALES + B + fix, progress)
            padded = self.upscale_shared(tiles, grid, text, seeds=seeds, batch_size=tile_batch_size,
                                         preview=preview, steps=steps, **sampling)
            top, left = grid.pad_top * SCALE_FACTOR, grid.pad_left * SCALE_FACTOR
            out = padded[:, top:top + H * SCALE_FACTOR, left:left + W * SCALE_FACTOR].contiguous()
        else:
            steps = _Steps(-(-grid.num_tiles // tile_batch_size) * (N_SCALES + 1) + fix, progress)
            sr = self.upscale_tiles(tiles, text, seeds=seeds, batch_size=tile_batch_size, preview=preview,
                                    steps=steps, **sampling)
            out = tilegrid.untile(sr, grid, blend)
        if fix:
            fixed = colorfix.color_fix(out.permute(0, 3, 1, 2), images.float().permute(0, 3, 1, 2).to(out.device),
                                       color_fix)
            out = fixed.permute(0, 2, 3, 1).contiguous()
            steps.tick()
        return resize_output(out, round(H * output_scale), round(W * output_scale))


def check_model_pair(checkpoint, vae) -> None:
    """Before the big file is read: `checkpoint` holds a transformer, `vae` a BSQ-VAE, and they work
    on the same latent (shapes from the headers only; paths or state dicts). Raises CheckpointError
    naming the files and the fix."""
    from .loading import CheckpointError, describe, read_checkpoint, shape_of, unwrap
    from .transformer import CHECKPOINT_WRAPPERS as TRANSFORMER_WRAPPERS
    from .vae import CHECKPOINT_WRAPPERS as VAE_WRAPPERS
    from .vae import REQUIRED_KEYS, TRANSFORMER_HINT_KEYS, _lookup

    names = describe(checkpoint), describe(vae)
    model_sd = unwrap(read_checkpoint(checkpoint), TRANSFORMER_WRAPPERS, names[0])
    vae_sd = unwrap(read_checkpoint(vae), VAE_WRAPPERS, names[1])
    is_vae = [all(_lookup(sd, k) is not None for k in REQUIRED_KEYS) for sd in (model_sd, vae_sd)]
    is_model = [any(k in sd for k in TRANSFORMER_HINT_KEYS) for sd in (model_sd, vae_sd)]
    if is_vae[0] and is_model[1]:
        raise CheckpointError(f"checkpoint and vae are swapped: {names[0]} is the VAE and {names[1]} the "
                              f"transformer; pick them the other way round")
    if is_vae[0]:
        raise CheckpointError(f"{names[0]} is a VAE, not the NSARM transformer: choose NSARM.pth (or a converted "
                              f"NSARM .safetensors) as checkpoint")
    if is_model[1]:
        raise CheckpointError(f"{names[1]} is a transformer checkpoint, not the VAE: choose "
                              f"infinity_vae_d56_f8_14_patchify.pth as vae")
    if "word_embed.weight" in model_sd and is_vae[1]:
        bits = shape_of(model_sd, "word_embed.weight")[1]  # [C, d_vae]: bits per token
        channels = tuple(_lookup(vae_sd, REQUIRED_KEYS[1]).shape)[0]  # encoder.conv_out [d, C, 3, 3]
        if bits not in (channels, 4 * channels):
            raise CheckpointError(
                f"wrong model pair: {names[0]} works on {bits}-bit tokens but {names[1]} has {channels} latent "
                f"channels; NSARM / Infinity-8B need infinity_vae_d56_f8_14_patchify.pth (14 channels, 56 bits)")


def load_pipeline(models_dir: str | os.PathLike, device=None, dtype: torch.dtype | str | None = None,
                  text_encoder: bool = True, offload_text_and_map: bool | None = None, *,
                  strict: bool = False, weight_format: str = "dense") -> NSARMPipeline:
    """Find and load NSARM.pth (or safetensors), the d56 VAE and Flan-T5-XL under `models_dir`.

    dtype: of the transformer blocks; None / "auto" = `precision.resolve_dtype`'s policy for
    `device` (bf16 on CUDA GPUs with bf16, else fp32). strict: refuse checkpoints holding tensors
    the models do not use (default: one warning; see `load_transformer`).

    Layout (ComfyUI's): models_dir/nsarm/NSARM.pth, models_dir/nsarm/infinity_vae_d56_f8_14_patchify.pth,
    models_dir/text_encoders/flan-t5-xl/. Prompt embeddings are cached in models_dir/nsarm_prompt_cache (as inside ComfyUI).
    With text_encoder=False only cached prompts can be used. offload_text_and_map: None = the
    default policy (`lowvram.offload_text_and_map_for`: offloaded on a GPU, not on the CPU). `weight_format`: as in
    `load_transformer` (e.g. "q8_0_mixed" for block-quantised weights); models_dir/nsarm/NSARM_<format>.gguf
    (`convert --format`) is used when present, else the checkpoint is quantised while loading. Raises
    MissingModelsError listing what is missing and where to get it.
    """
    from .lowvram import offload_text_and_map_for
    from .transformer import load_transformer
    from .vae import load_vae

    root = Path(models_dir)
    found = {spec.role: find_weight(root, spec, weight_format) for spec in WEIGHTS}
    needed = ["transformer", "vae"] + (["text encoder"] if text_encoder else [])
    missing = [r for r in needed if found[r] is None]
    if missing:
        raise MissingModelsError(missing_models_message(root, missing))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_model_pair(found["transformer"], found["vae"])
    transformer = load_transformer(found["transformer"], device=device, dtype=dtype, strict=strict,
                                   weight_format=weight_format,
                                   offload_text_and_map=offload_text_and_map_for(device, offload_text_and_map))
    vae = load_vae(found["vae"], device=device, strict=strict)
    encoder = T5TextEncoder(found["text encoder"], device=device) if text_encoder else None
    cache = PromptCache(root / "nsarm_prompt_cache")
    return NSARMPipeline(transformer, vae, encoder, cache)
