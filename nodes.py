"""ComfyUI nodes for NSARM (V1 node API: INPUT_TYPES / RETURN_TYPES / FUNCTION / CATEGORY).

Thin glue over the `nsarm_nodes` library. Node ids and input names are stable forever; new inputs
are only appended as optional. The same classes run outside ComfyUI (the headless runner loads
this file by path): then models come from $NSARM_MODELS_DIR (ComfyUI's models/ layout) and the
device is plain torch's.

Custom types (immutable once returned; ComfyUI caches and shares outputs):
  NSARM_MODEL   NSARMModel: transformer + VAE (+ lazy T5 and the prompt cache)
  NSARM_COND    text.PromptEmbeds: packed prompt features
  NSARM_SCALES  LRScales: the transformation network's bits of the 7 replaced scales + the LR images
                (+ the tile grid when the tiles share one latent canvas)
  NSARM_LATENT  NSARMLatent: summed codes [B, 14, 128, 128] per tile, or one canvas latent per image
                [B, 14, H/2, W/2] (padded LR size H x W) with its tile grid
  NSARM_TILES   tiling.TileGrid: where each tile came from
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

try:  # loaded by ComfyUI as a package
    from .nsarm_nodes import colorfix, options, tiling
    from .nsarm_nodes.canvas import CanvasLayout, LatentCanvas, phase_tiles
    from .nsarm_nodes.images import check_image
    from .nsarm_nodes.lowvram import estimate_for, memory_required, offload_text_and_map_for
    from .nsarm_nodes.config import DEFAULT_PROMPT
    from .nsarm_nodes.pipeline import N_SCALES, NSARMPipeline, check_model_pair
    from .nsarm_nodes.precision import resolve_dtype
    from .nsarm_nodes.sampler import sample, transformation_bits
    from .nsarm_nodes.text import PromptCache, PromptEmbeds, T5TextEncoder, negative_or_none
    from .nsarm_nodes.tiled_decode import decode_tiled
    from .nsarm_nodes.transformer import checkpoint_config, load_transformer
    from .nsarm_nodes.vae import load_vae
except ImportError:  # loaded by path (headless runner, tests)
    from nsarm_nodes import colorfix, options, tiling
    from nsarm_nodes.canvas import CanvasLayout, LatentCanvas, phase_tiles
    from nsarm_nodes.images import check_image
    from nsarm_nodes.lowvram import estimate_for, memory_required, offload_text_and_map_for
    from nsarm_nodes.config import DEFAULT_PROMPT
    from nsarm_nodes.pipeline import N_SCALES, NSARMPipeline, check_model_pair
    from nsarm_nodes.precision import resolve_dtype
    from nsarm_nodes.sampler import sample, transformation_bits
    from nsarm_nodes.text import PromptCache, PromptEmbeds, T5TextEncoder, negative_or_none
    from nsarm_nodes.tiled_decode import decode_tiled
    from nsarm_nodes.transformer import checkpoint_config, load_transformer
    from nsarm_nodes.vae import load_vae

try:
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    import folder_paths
    from comfy.cli_args import args as comfy_args
except ImportError:
    mm = None

CATEGORY = "NSARM"
MODELS_FOLDER = "nsarm"
TEXT_FOLDER = "text_encoders"
PROMPT_CACHE_FOLDER = "nsarm_prompt_cache"
CACHED_PROMPTS_ONLY = "cached prompts only"
widget = options.widget  # every number / choice widget comes from the option table (nsarm_nodes/options.py)
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".sft")  # as ComfyUI's model lists
GGUF_SUFFIX = ".gguf"  # block-quantised checkpoints from `python -m nsarm_nodes convert --format q8_0`
LR_SIDE = 256
SCALE = 4
PREVIEW_FORMAT = "JPEG"
DEFAULT_PREVIEW_SIZE = 512  # ComfyUI's --preview-size default


# ---------------------------------------------------------------------------------------------
# Where models live: ComfyUI's folder_paths, or $NSARM_MODELS_DIR outside ComfyUI


def _register_folders() -> None:
    for name in (MODELS_FOLDER, TEXT_FOLDER):
        exts = set(folder_paths.supported_pt_extensions) | ({GGUF_SUFFIX} if name == MODELS_FOLDER else set())
        default = os.path.join(folder_paths.models_dir, name)
        if name in folder_paths.folder_names_and_paths:
            paths, old_exts = folder_paths.folder_names_and_paths[name]
            if default not in paths:
                paths.append(default)
            folder_paths.folder_names_and_paths[name] = (paths, set(old_exts) | exts)
        else:
            folder_paths.folder_names_and_paths[name] = ([default], exts)


if mm is not None:
    _register_folders()


def _models_root() -> Path:
    return Path(os.environ.get("NSARM_MODELS_DIR", "models"))


def _folder_paths(name: str) -> list[Path]:
    if mm is not None:
        return [Path(p) for p in folder_paths.get_folder_paths(name)]
    return [_models_root() / name]


def _model_files() -> list[str]:
    if mm is not None:
        return folder_paths.get_filename_list(MODELS_FOLDER)
    names = set()
    for base in _folder_paths(MODELS_FOLDER):
        if base.is_dir():
            names |= {p.relative_to(base).as_posix() for p in base.rglob("*")
                      if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES + (GGUF_SUFFIX,)}
    return sorted(names)


def _text_encoder_folders() -> list[str]:
    names = set()
    for base in _folder_paths(TEXT_FOLDER):
        if base.is_dir():
            names |= {p.name for p in base.iterdir() if (p / "config.json").is_file()}
    return sorted(names)


def _looks_like_vae(name: str) -> bool:
    return "vae" in Path(name).name.lower()


def _default_checkpoint(files: list[str]) -> str | None:
    """The loader's fresh default: an NSARM file that is not a VAE, else any file that is not a VAE."""
    models = [f for f in files if not _looks_like_vae(f)]
    return next((f for f in models if "nsarm" in f.lower()), models[0] if models else None)


def _default_vae(files: list[str]) -> str | None:
    """The file that looks like a VAE (the d56 one first), not the alphabetically first file."""
    vaes = [f for f in files if _looks_like_vae(f)]
    return next((f for f in vaes if "d56" in f.lower()), vaes[0] if vaes else None)


def _default_text_encoder(folders: list[str]) -> str:
    """The Flan-T5 folder when one is installed, else cached prompts only."""
    return next((f for f in folders if "flan" in f.lower() or "t5" in f.lower()), CACHED_PROMPTS_ONLY)


def _combo(choices: list[str], default: str | None, tooltip: str) -> tuple:
    options = {"tooltip": tooltip}
    if default is not None:
        options["default"] = default
    return (choices, options)


def _resolve(folder: str, name: str) -> Path:
    for base in _folder_paths(folder):
        if (base / name).exists():
            return base / name
    places = ", ".join(str(p) for p in _folder_paths(folder))
    raise FileNotFoundError(f"{name!r} not found in models/{folder} ({places}); put the file there "
                            f"(see the README's model table) or pick another one in the loader")


def _prompt_cache_dir() -> Path:
    root = Path(folder_paths.models_dir) if mm is not None else _models_root()
    return root / PROMPT_CACHE_FOLDER


def _device() -> torch.device:
    if mm is not None:
        return mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _offload_device() -> torch.device:
    return mm.unet_offload_device() if mm is not None else _device()


def _output_device() -> torch.device:
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def _interrupt_check() -> None:
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()


# ---------------------------------------------------------------------------------------------
# Custom types


class NSARMWeights(nn.Module):
    """Transformer + VAE in one module, so ComfyUI's memory manager moves them together."""

    def __init__(self, transformer, vae):
        super().__init__()
        self.transformer, self.vae = transformer, vae


@dataclass(frozen=True)
class NSARMModel:
    pipeline: NSARMPipeline
    weights: NSARMWeights
    patcher: object | None  # comfy.model_patcher.ModelPatcher inside ComfyUI
    attention: str
    name: str

    @contextlib.contextmanager
    def session(self, batch: int = 1, cfg: float = 1.0):
        """Weights on the compute device (through ComfyUI's manager, which first frees room for the
        estimated activations of `batch` tiles) and the chosen attention kernel, for one node call."""
        if mm is not None:
            need = estimate_for(self.pipeline.transformer, self.pipeline.vae, batch, cfg_scale=cfg).inference
            if self.patcher is not None:
                mm.load_models_gpu([self.patcher], memory_required=need)
            else:  # self-managed placement: ComfyUI still unloads other models to make room
                mm.free_memory(need, self.pipeline.device)
        kernel = contextlib.nullcontext()
        if self.attention == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernel = sdpa_kernel([SDPBackend.MATH])
        with kernel, torch.no_grad():
            yield self.pipeline


@dataclass(frozen=True)
class LRScales:
    bits: tuple[torch.Tensor, ...]  # per replaced scale uint8 [B, d, s, s] (CPU)
    images: torch.Tensor  # the LR images [B, 256, 256, 3] (CPU), the colour reference
    grid: tiling.TileGrid | None = None  # set: the items are the tiles of this grid, sharing a canvas


@dataclass(frozen=True)
class NSARMLatent:
    summed_codes: torch.Tensor  # [B, d, 128, 128] per tile, or [images, d, H/2, W/2] canvases (CPU)
    grid: tiling.TileGrid | None = None  # set: summed_codes are the canvases of this grid's images


def _previews_enabled() -> bool:
    """As KSampler: previews unless ComfyUI runs with --preview-method none (the default before
    late 2025 ComfyUIs, which made "auto" the default)."""
    return mm is not None and getattr(getattr(comfy_args, "preview_method", None), "value", "none") != "none"


class _Progress:
    """ComfyUI progress bar (one tick per step: scales, decode, colour fix) + interrupt check, with a
    preview image on the bar when ComfyUI has previews on; silent outside ComfyUI."""

    def __init__(self):
        self.bar = None
        self.image = None  # the latest preview (PIL image), sent with the next tick
        self.preview = self.set_preview if _previews_enabled() else None

    def set_preview(self, rgb: torch.Tensor) -> None:
        from PIL import Image

        self.image = Image.fromarray(rgb.numpy())

    def __call__(self, done: int, total: int) -> None:
        _interrupt_check()
        if mm is not None:
            if self.bar is None:
                self.bar = comfy.utils.ProgressBar(total)
            preview = None
            if self.image is not None:
                preview = (PREVIEW_FORMAT, self.image, getattr(comfy_args, "preview_size", DEFAULT_PREVIEW_SIZE))
                self.image = None
            self.bar.update_absolute(done, total, preview)


def _release_text_encoder(pipe: NSARMPipeline) -> None:
    """T5 is only needed for prompts not yet cached: free its memory once they are encoded."""
    if pipe.text_encoder is not None and pipe.text_encoder.loaded:
        pipe.text_encoder.unload()


def _encode(model: NSARMModel, prompts: list[str]) -> PromptEmbeds:
    with model.session() as pipe:
        embeds = pipe.encode_prompts(prompts)
    _release_text_encoder(pipe)
    return embeds


def _to_output(images: torch.Tensor) -> torch.Tensor:
    return images.to(_output_device())


def _preview_step(pipe: NSARMPipeline, progress: _Progress, latent):
    """The sampler's progress callback: a preview of `latent()` (when previews are on), then a tick."""
    def step(si: int, total: int) -> None:
        if progress.preview:
            progress.preview(pipe.preview_map.render(latent()))
        progress(si + 1, total)
    return step


# ---------------------------------------------------------------------------------------------
# Nodes


def _custom_types() -> dict[str, type]:
    """The Python class behind each custom socket type (see the module docstring)."""
    return {"NSARM_MODEL": NSARMModel, "NSARM_COND": PromptEmbeds, "NSARM_SCALES": LRScales,
            "NSARM_LATENT": NSARMLatent, "NSARM_TILES": tiling.TileGrid}


def _checked(method):
    """Validate a node call before any work (ComfyUI's own checks let NaN through and skip tensors):
    widget values against the node's INPUT_TYPES, i.e. the option table (type, finite, in range, one
    of the choices), IMAGE inputs with `check_image` (empty batch, NaN/inf refused; grayscale to
    RGB, alpha dropped, values clamped to [0, 1]) and the custom-typed inputs (NSARM_TILES, ...)
    for their class. Errors name the node and the input."""
    signature = inspect.signature(method)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        cls = type(self)
        title = NODE_DISPLAY_NAME_MAPPINGS.get(cls.__name__, cls.__name__)
        values = signature.bind(self, *args, **kwargs).arguments
        del values["self"]
        spec = cls.INPUT_TYPES()
        values.update(options.check_widgets(title, spec, values, skip=getattr(cls, "FILE_INPUTS", ())))
        for section in ("required", "optional"):
            for name, entry in (spec.get(section) or {}).items():
                value = values.get(name)
                if entry[0] == "IMAGE" and value is not None:
                    values[name] = check_image(value, f"{title}: input {name!r}")
                expected = _custom_types().get(entry[0]) if isinstance(entry[0], str) else None
                if expected is not None and value is not None and not isinstance(value, expected):
                    raise options.OptionError(f"{title}: input {name!r} holds a {type(value).__name__}, not "
                                              f"{entry[0]}; connect it to a node output of that type")
        return method(self, **values)

    return call


def _sampling_inputs() -> dict:
    """tau, top_p, cfg, mode widgets shared by NSARMBitwiseDecode and NSARMUpscale (in this order)."""
    return {name: widget(name) for name in ("tau", "top_p", "cfg", "mode")}


class NSARMModelLoader:
    DESCRIPTION = ("Loads NSARM (NSARM.pth: Infinity-8B + transformation network), its BSQ-VAE and the "
                   "Flan-T5-XL text encoder. Weights go in models/nsarm and models/text_encoders.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("NSARM_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    FILE_INPUTS = ("checkpoint", "vae", "text_encoder")  # resolved (with a clear error) by _resolve

    @classmethod
    def INPUT_TYPES(cls):
        files, folders = _model_files(), _text_encoder_folders()
        return {"required": {
            "checkpoint": _combo(files, _default_checkpoint(files),
                                 "NSARM.pth (or a converted .safetensors, or a .gguf from convert --format q8_0 "
                                 "with the matching weight_format) in models/nsarm"),
            "vae": _combo(files, _default_vae(files), "infinity_vae_d56_f8_14_patchify.pth in models/nsarm"),
            "text_encoder": _combo([CACHED_PROMPTS_ONLY] + folders, _default_text_encoder(folders),
                                   "Flan-T5-XL folder in models/text_encoders, loaded only for prompts not yet "
                                   "cached; 'cached prompts only' never loads it"),
            "dtype": widget("dtype"),
            "attention": widget("attention"),
        }, "optional": {
            "weight_format": widget("weight_format"),
            "blocks_on_cpu": widget("blocks_on_cpu"),
            "offload_text_and_map": widget("offload_text_and_map"),
            "strict": widget("strict"),
        }}

    @_checked
    def load(self, checkpoint, vae, text_encoder, dtype, attention, weight_format="dense", blocks_on_cpu=0,
             offload_text_and_map=True, strict=False):
        load_device = _device()
        offload_text_and_map = offload_text_and_map_for(load_device, offload_text_and_map)  # the one policy
        # Streamed (swapped / offloaded) weights manage their own placement: they are loaded for the
        # compute device directly and kept out of ComfyUI's model manager, which would move them all.
        self_managed = blocks_on_cpu > 0 or offload_text_and_map
        home = load_device if self_managed else _offload_device()
        check_model_pair(_resolve(MODELS_FOLDER, checkpoint), _resolve(MODELS_FOLDER, vae))  # headers only
        if mm is not None and self_managed:
            # loaded straight onto the device, outside ComfyUI's manager: have it unload other models
            # until the resident weights fit (sized from the checkpoint's header, before it is read)
            cfg = checkpoint_config(_resolve(MODELS_FOLDER, checkpoint))
            resident = memory_required(cfg, dtype=resolve_dtype(dtype, load_device), vae=None,
                                       weight_format=weight_format, blocks_on_cpu=blocks_on_cpu,
                                       offload_text_and_map=offload_text_and_map).weights
            mm.free_memory(resident, load_device)
        transformer = load_transformer(_resolve(MODELS_FOLDER, checkpoint), device=home,
                                       dtype=resolve_dtype(dtype, load_device), weight_format=weight_format,
                                       blocks_on_cpu=blocks_on_cpu, offload_text_and_map=offload_text_and_map,
                                       strict=strict)
        vae_model = load_vae(_resolve(MODELS_FOLDER, vae), device=home, strict=strict)
        encoder = None
        if text_encoder != CACHED_PROMPTS_ONLY:
            text_device = mm.text_encoder_device() if mm is not None else load_device
            encoder = T5TextEncoder(_resolve(TEXT_FOLDER, text_encoder), device=text_device)
        pipe = NSARMPipeline(transformer, vae_model, encoder, PromptCache(_prompt_cache_dir()))
        weights = NSARMWeights(transformer, vae_model)
        patcher = None
        if mm is not None and not self_managed:
            patcher = comfy.model_patcher.ModelPatcher(weights, load_device=load_device, offload_device=home)
        return (NSARMModel(pipe, weights, patcher, attention, checkpoint),)


class NSARMTextEncode:
    DESCRIPTION = ("Encodes a prompt with Flan-T5-XL for NSARM. Embeddings are cached on disk, so each "
                   "prompt is encoded once ever. NSARM was trained with detailed image captions.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("NSARM_COND",)
    RETURN_NAMES = ("cond",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("NSARM_MODEL", {"tooltip": "from NSARM Model Loader"}),
            "prompt": ("STRING", {"multiline": True, "default": DEFAULT_PROMPT,
                                  "tooltip": "description of the image (may be empty)"}),
        }}

    @_checked
    def encode(self, model, prompt):
        return (_encode(model, [prompt]),)


class NSARMEncodeLR:
    DESCRIPTION = ("VAE-encodes 256x256 low-resolution images and runs NSARM's transformation network, "
                   "which predicts the first 7 scales. Use NSARM Tile first for other sizes; connect its "
                   "tile_info too and the tiles share one latent canvas (seamless).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("NSARM_SCALES",)
    RETURN_NAMES = ("scales",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("NSARM_MODEL", {"tooltip": "from NSARM Model Loader"}),
            "image": ("IMAGE", {"tooltip": "batch of 256x256 LR images (or tiles from NSARM Tile)"}),
        }, "optional": {
            "tile_info": ("NSARM_TILES", {"tooltip": "from NSARM Tile (tile size 256, align 4): the tiles then share "
                                          "one latent canvas, NSARM Bitwise Decode continues each tile from its "
                                          "neighbours and NSARM Decode gives the whole image"}),
        }}

    @_checked
    def encode(self, model, image, tile_info=None):
        if tuple(image.shape[1:3]) != (LR_SIDE, LR_SIDE):
            raise ValueError(f"NSARM Encode LR needs {LR_SIDE}x{LR_SIDE} images, got {image.shape[2]}x"
                             f"{image.shape[1]}: put NSARM Tile before it (or use NSARM Upscale)")
        if tile_info is not None:
            where = f"{NODE_DISPLAY_NAME_MAPPINGS['NSARMEncodeLR']}: input 'tile_info'"
            if tile_info.tile_size != LR_SIDE or tile_info.num_tiles != image.shape[0]:
                raise ValueError(f"{where} describes {tile_info.num_tiles} tiles of {tile_info.tile_size}px but "
                                 f"image holds {image.shape[0]} of {LR_SIDE}px; connect both outputs of the same "
                                 f"NSARM Tile (tile_size {LR_SIDE})")
            try:
                CanvasLayout.from_grid(tile_info)  # refuses grids the canvas cannot use, naming the fix
            except ValueError as exc:
                raise ValueError(f"{where}: {exc} (in the node chain: leave tile_info unconnected)") from None
            if tile_info.tiles_per_image == 1:
                tile_info = None  # nothing to share: a plain tile, which NSARM Untile crops as always
        with model.session() as pipe:
            bits = transformation_bits(pipe.transformer, pipe.encode_lr(image))
        return (LRScales(tuple(b.cpu() for b in bits), image.detach().cpu(), tile_info),)


class NSARMBitwiseDecode:
    DESCRIPTION = ("NSARM's next-scale bitwise autoregressive loop: the 7 scales from the LR image, then "
                   "6 generated scales up to 64x64 tokens (1024x1024 px). Item i uses seed + i. With tiles "
                   "that share a canvas (tile_info into Encode LR) the tiles run phase by phase on it.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("NSARM_LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("NSARM_MODEL", {"tooltip": "from NSARM Model Loader"}),
                "scales": ("NSARM_SCALES", {"tooltip": "from NSARM Encode LR"}),
                "seed": widget("seed", control_after_generate=True,
                               tooltip="random seed of the bit sampler (item i of the batch uses seed + i)"),
                **_sampling_inputs(),
            },
            "optional": {
                "cond": ("NSARM_COND", {"tooltip": "prompt; default: NSARM's generic quality prompt"}),
                "negative": ("NSARM_COND", {"tooltip": "negative prompt, used only when cfg != 1; an empty one means none "
                                            "(the model's learned unconditional rows)"}),
            },
        }

    @_checked
    def decode(self, model, scales, seed, tau, top_p, cfg, mode, cond=None, negative=None):
        if cond is None:
            cond = _encode(model, [DEFAULT_PROMPT])
        n = scales.images.shape[0]
        if cond.batch_size not in (1, n):
            raise ValueError(f"cond holds {cond.batch_size} prompts for {n} images: give one prompt or one per image")
        negative = negative_or_none(negative) if cfg != 1.0 else None  # blank: the learned unconditional rows
        sampling = dict(tau=tau, top_p=top_p, cfg=cfg, next_scale_mode=mode, negative_text=negative)
        progress = _Progress()
        if scales.grid is not None:  # one shared canvas per image, phase by phase (each phase one batch)
            return (self._decode_canvas(model, scales, cond, seed, progress, sampling),)
        latest: list[torch.Tensor] = []

        def record(si: int, summed: torch.Tensor) -> torch.Tensor:
            latest[:] = [summed[0]]
            return summed

        with model.session(n, cfg) as pipe:
            step = _preview_step(pipe, progress, lambda: latest[0])
            res = sample(pipe.transformer, pipe.vae, cond, seed=[seed + i for i in range(n)], replaced_bits=scales.bits,
                         progress=step, latent_hook=record if progress.preview else None, **sampling)
        return (NSARMLatent(res.summed_codes.cpu()),)

    @staticmethod
    def _decode_canvas(model, scales, cond, seed, progress, sampling) -> NSARMLatent:
        grid = scales.grid
        phases_ = phase_tiles(grid)
        with model.session(max(len(p) for p in phases_), sampling["cfg"]) as pipe:
            canvas = LatentCanvas(grid, N_SCALES, pipe.vae.quantizer.codebook_dim, device=pipe.device)
            done = 0
            for idx in canvas.phases():
                image = idx[0] // grid.tiles_per_image

                def tick(si: int, total: int, image=image) -> None:
                    if progress.preview:
                        progress.preview(pipe.preview_map.render(canvas.latest[image]))
                    progress(done + si + 1, len(phases_) * N_SCALES)

                text = cond if cond.batch_size == 1 else cond.select(idx)
                sample(pipe.transformer, pipe.vae, text, seed=[seed + i for i in idx],
                       replaced_bits=[b[idx] for b in scales.bits], progress=tick, latent_hook=canvas.hook(idx),
                       **sampling)
                done += N_SCALES
            latent = canvas.latent().cpu()
        return NSARMLatent(latent, grid)


class NSARMDecode:
    DESCRIPTION = ("Decodes an NSARM latent with the BSQ-VAE decoder: 1024x1024 per tile, or a shared canvas "
                   "as one whole image (tiled decode with image-wide statistics, padding cropped).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("NSARM_MODEL", {"tooltip": "from NSARM Model Loader"}),
            "latent": ("NSARM_LATENT", {"tooltip": "from NSARM Bitwise Decode"}),
        }}

    @_checked
    def decode(self, model, latent):
        progress = _Progress()
        if latent.grid is not None:
            g = latent.grid
            with model.session() as pipe:
                whole = decode_tiled(pipe.vae, latent.summed_codes, progress=progress)
            top, left = g.pad_top * SCALE, g.pad_left * SCALE
            return (_to_output(whole[:, top:top + g.height * SCALE, left:left + g.width * SCALE].contiguous()),)
        out = []
        n = latent.summed_codes.shape[0]
        with model.session() as pipe:
            for i in range(n):  # one 1024x1024 decode at a time
                out.append(pipe.decode(latent.summed_codes[i:i + 1]).cpu())
                progress(i + 1, n)
        return (_to_output(torch.cat(out)),)


class NSARMColorFix:
    DESCRIPTION = ("Matches the colours of the upscaled image to the LR reference (AdaIN, then wavelet "
                   "low frequencies, as NSARM). Apply once to the stitched image, not per tile.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "fix"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "the upscaled image(s)"}),
            "reference": ("IMAGE", {"tooltip": "the LR image(s) whose colours to keep (any size; one for all or one per image)"}),
            "method": widget("color_fix", tooltip="NSARM default: adain+wavelet; none returns the image unchanged"),
        }}

    @_checked
    def fix(self, image, reference, method):
        b = image.shape[0]
        if reference.shape[0] not in (1, b):
            raise ValueError(f"reference has {reference.shape[0]} images for {b}: give one or one per image")
        ref = reference.expand(b, -1, -1, -1) if reference.shape[0] == 1 else reference
        fixed = colorfix.color_fix(image.permute(0, 3, 1, 2), ref.permute(0, 3, 1, 2).to(image.device), method)
        return (fixed.permute(0, 2, 3, 1).contiguous(),)


class NSARMTile:
    DESCRIPTION = ("Splits images of any size into overlapping tiles (reflection-padded when smaller). "
                   "Works around any upscaler; stitch with NSARM Untile.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "NSARM_TILES")
    RETURN_NAMES = ("tiles", "tile_info")
    FUNCTION = "tile"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "images of any size"}),
                "tile_size": widget("tile_size"),
                "overlap": widget("overlap"),
            },
            "optional": {
                "align": widget("align"),
            },
        }

    @_checked
    def tile(self, image, tile_size, overlap, align=1):
        tiles, grid = tiling.tile(image, tile_size, overlap, align=align)
        return (tiles, grid)


class NSARMUntile:
    DESCRIPTION = ("Stitches processed tiles back together with smooth blending; the scale factor is read "
                   "from the tile size, so any upscaler (1x-8x) can sit between Tile and Untile. A whole 4x image "
                   "(NSARM Decode of a shared canvas) passes through unchanged.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "untile"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "processed tiles, in the order NSARM Tile made them"}),
            "tile_info": ("NSARM_TILES", {"tooltip": "from NSARM Tile"}),
            "blend": widget("blend"),
        }}

    @_checked
    def untile(self, image, tile_info, blend):
        g = tile_info
        # Already whole (NSARM Decode of a shared canvas): one image per input image, 4x its size. Tiles of
        # such a grid come several per image, so they cannot be mistaken for it (a one-tile image never shares
        # a canvas: its tile, of any upscaler, is cropped below).
        whole = (g.batch, g.height * SCALE, g.width * SCALE)
        if g.tiles_per_image > 1 and tuple(image.shape[:3]) == whole:
            return (image,)
        return (tiling.untile(image, tile_info, blend),)


class NSARMUpscale:
    DESCRIPTION = ("One node for the whole job: any-size image -> 4x (tiled at 256 px; by default the tiles "
                   "share one latent canvas and the image is decoded as one; colour fix once on the result).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("NSARM_MODEL", {"tooltip": "from NSARM Model Loader"}),
                "image": ("IMAGE", {"tooltip": "images of any size"}),
                "prompt": ("STRING", {"multiline": True, "default": DEFAULT_PROMPT,
                                      "tooltip": "description of the image (may be empty)"}),
                "seed": widget("seed", control_after_generate=True, tooltip="random seed (tile i uses seed + i)"),
                "tile_overlap": widget("tile_overlap"),
            },
            "optional": {
                "tile_batch_size": widget("tile_batch_size"),
                "color_fix": widget("color_fix"),
                "output_scale": widget("output_scale"),
                **_sampling_inputs(),
                "blend": widget("blend", tooltip="tile overlap blending of tiling 'independent'; none = hard cut"),
                "tiling": widget("tiling"),
            },
        }

    @_checked
    def upscale(self, model, image, prompt, seed, tile_overlap, tile_batch_size=1, color_fix="adain+wavelet",
                output_scale=4.0, tau=0.5, top_p=0.97, cfg=1.0, mode="area", blend="cosine", tiling="shared"):
        progress = _Progress()
        with model.session(tile_batch_size, cfg) as pipe:
            out = pipe(image, prompt=prompt, seed=seed, tau=tau, top_p=top_p, cfg=cfg, next_scale_mode=mode,
                       color_fix=color_fix, tile_overlap=tile_overlap, tile_batch_size=tile_batch_size,
                       blend=blend, output_scale=output_scale, progress=progress, tiling=tiling,
                       preview=progress.preview)
        _release_text_encoder(pipe)
        return (_to_output(out),)


NODE_CLASS_MAPPINGS = {
    "NSARMModelLoader": NSARMModelLoader,
    "NSARMTextEncode": NSARMTextEncode,
    "NSARMEncodeLR": NSARMEncodeLR,
    "NSARMBitwiseDecode": NSARMBitwiseDecode,
    "NSARMDecode": NSARMDecode,
    "NSARMColorFix": NSARMColorFix,
    "NSARMTile": NSARMTile,
    "NSARMUntile": NSARMUntile,
    "NSARMUpscale": NSARMUpscale,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "NSARMModelLoader": "NSARM Model Loader",
    "NSARMTextEncode": "NSARM Text Encode",
    "NSARMEncodeLR": "NSARM Encode LR",
    "NSARMBitwiseDecode": "NSARM Bitwise Decode",
    "NSARMDecode": "NSARM Decode",
    "NSARMColorFix": "NSARM Color Fix",
    "NSARMTile": "NSARM Tile",
    "NSARMUntile": "NSARM Untile",
    "NSARMUpscale": "NSARM Upscale",
}
