"""BSQ-VAE of the Infinity tokenizer: Flux/LDM-style convolutional encoder and decoder.

Structure (no attention anywhere, no latent scale/shift):
- Encoder: `conv_in` 3 -> base_ch; per level i, `num_res_blocks` ResnetBlocks of width
  base_ch * ch_mult[i] and, for the first log2(patch_size) levels, an asymmetric downsample
  (zero pad right/bottom by 1, 3x3 conv stride 2); `mid.block_1`, `mid.block_2`; `norm_out`,
  swish, `conv_out` -> codebook_dim.
- Decoder: `conv_in` codebook_dim -> widest level; `mid.block_1/2`; levels from the last to the
  first with `num_res_blocks + 1` ResnetBlocks each and, at levels 1..log2(patch_size), nearest x2
  upsampling + 3x3 conv; `norm_out`, swish, `conv_out` -> 3. `decode` clamps to [-1, 1].
- GroupNorm: 32 groups (24 when the width is not a multiple of 32), eps 1e-6, affine.

Parameter names follow the upstream key layout, including its wrapper level around every conv and
norm (`encoder.conv_in.conv.weight`, `encoder.down.0.block.0.norm1.norm.weight`, ...), and the
quantizer is registered as both `quantizer` and `quantize` (upstream aliases one module under two
names, so its checkpoints carry `quantizer.lfq.mask` and `quantize.lfq.mask`).

Precision policy: the encoder is always float32 (its features feed sign decisions of BSQ and the
transformation network; the reference runs it in float32 too). The decoder is kept in the dtype
chosen at load time (the reference decodes under bf16 autocast). Convolutions compute in their
weight dtype; GroupNorm statistics are always computed in float32. `encode_features` and `decode`
accept any floating input and return float32.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig
from .loading import MAX_LISTED_KEYS, CheckpointError, describe, materialize, read_checkpoint, unwrap
from .quantizer import MultiScaleBSQ

GN_EPS = 1e-6
GN_GROUPS = 32
GN_GROUPS_FALLBACK = 24  # upstream's choice for widths that are not a multiple of 32
RGB = 3
# Upstream checkpoints hold the VAE under 'vae'; 'ema' (an EMA copy) is only used when 'vae' is absent.
CHECKPOINT_WRAPPERS = ("vae", "ema")
# Keys whose presence identifies a BSQ-VAE state dict (wrapped spelling).
REQUIRED_KEYS = ("encoder.conv_in.conv.weight", "encoder.conv_out.conv.weight", "decoder.conv_in.conv.weight")
# Keys of the other NSARM checkpoints, used only to explain what was passed instead of a VAE.
TRANSFORMER_HINT_KEYS = ("word_embed.weight", "pos_start", "lvl_embed.weight", "head.weight")
# The wrapper level upstream puts around every conv / norm module.
WRAPPERS = ("conv", "norm")
# The quantizer's constant buffer, registered under both of upstream's names.
MASK_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")


def group_norm_groups(channels: int) -> int:
    """Upstream's GroupNorm rule: 32 groups, or 24 when the width is not a multiple of 32."""
    return GN_GROUPS if channels % GN_GROUPS == 0 else GN_GROUPS_FALLBACK


class Conv(nn.Module):
    """nn.Conv2d under an extra `.conv` level, as upstream names it."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.to(self.conv.weight.dtype))


class Norm(nn.Module):
    """GroupNorm under an extra `.norm` level; statistics and affine always in float32."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(group_norm_groups(channels), channels, eps=GN_EPS, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        out = F.group_norm(x.float(), n.num_groups, n.weight.float(), n.bias.float(), n.eps)
        return out.to(x.dtype)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a (1x1 conv when widths differ) skip."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = Norm(c_in)
        self.conv1 = Conv(c_in, c_out, 3, padding=1)
        self.norm2 = Norm(c_out)
        self.conv2 = Conv(c_out, c_out, 3, padding=1)
        self.nin_shortcut = Conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, c_out, H, W]
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return skip + h


class Downsample(nn.Module):
    """Zero pad right/bottom by one pixel, then 3x3 conv with stride 2: [B,C,H,W] -> [B,C,H/2,W/2]."""

    PAD_LEFT_RIGHT_TOP_BOTTOM = (0, 1, 0, 1)

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.PAD_LEFT_RIGHT_TOP_BOTTOM))


class Upsample(nn.Module):
    """Nearest x2, then 3x3 conv: [B,C,H,W] -> [B,C,2H,2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlocks(nn.Module):
    """`mid.block_1`, `mid.block_2` (upstream has no attention between them with cnn_attention='no')."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Level(nn.Module):
    """One resolution level: `block.{j}` ResnetBlocks and an optional `downsample` / `upsample`."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(num_blocks)
        )
        self.resample_name = resample_name
        setattr(self, resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        resample = getattr(self, self.resample_name)
        return resample(x) if resample is not None else x


class Encoder(nn.Module):
    """[B, 3, H, W] in [-1, 1] -> raw features [B, codebook_dim, H/patch, W/patch]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_ch * m for m in cfg.ch_mult]
        self.conv_in = Conv(cfg.in_channels, cfg.base_ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = cfg.base_ch
        for i, width in enumerate(widths):
            down = Downsample(width) if i < cfg.num_downsamples else None
            self.down.append(Level(c_in, width, cfg.num_res_blocks, down, "downsample"))
            c_in = width
        self.mid = MidBlocks(widths[-1])
        self.norm_out = Norm(widths[-1])
        self.conv_out = Conv(widths[-1], cfg.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # [B, base_ch, H, W]
        for level in self.down:
            h = level(h)  # [B, width_i, H / 2^(i+1), ...] after a downsample
        h = self.mid(h)  # [B, widths[-1], H/patch, W/patch]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, d, H/patch, W/patch]


class Decoder(nn.Module):
    """Latent [B, codebook_dim, h, w] -> image [B, 3, h*patch, w*patch] (not clamped)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_ch * m for m in cfg.ch_mult]
        self.conv_in = Conv(cfg.codebook_dim, widths[-1], 3, padding=1)
        self.mid = MidBlocks(widths[-1])
        levels: list[Level] = []
        c_in = widths[-1]
        for i in reversed(range(len(widths))):
            up = Upsample(widths[i]) if 1 <= i <= cfg.num_downsamples else None
            levels.append(Level(c_in, widths[i], cfg.num_res_blocks + 1, up, "upsample"))
            c_in = widths[i]
        self.up = nn.ModuleList(reversed(levels))  # indexed by level: up.0 is the finest
        self.norm_out = Norm(widths[0])
        self.conv_out = Conv(widths[0], RGB, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # [B, widths[-1], h, w]
        for level in reversed(self.up):
            h = level(h)  # x2 spatially at levels with an upsample
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, h*patch, w*patch]


class BSQVAE(nn.Module):
    """Encoder, decoder and multi-scale BSQ quantizer of the Infinity tokenizer."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = MultiScaleBSQ(cfg.codebook_dim)
        self.quantize = self.quantizer  # upstream's alias: the same module under a second name

    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] in [-1, 1] -> raw unquantised features float32 [B, d, H/patch, W/patch]."""
        return self.encoder(x).float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B, d, h, w] -> image float32 [B, 3, h*patch, w*patch] clamped to [-1, 1]."""
        return self.decoder(z).float().clamp(-1.0, 1.0)


# --------------------------------------------------------------------------------------------
# Loading


def _wrap_key(key: str, expected: set[str]) -> str:
    """Map an unwrapped key (`encoder.conv_in.weight`) to the module name (`encoder.conv_in.conv.weight`).

    Like upstream's tolerant loader, a `.weight` / `.bias` that is not a module name gets the
    missing `.conv` or `.norm` level inserted when that yields a module name; anything else is
    left as is (and then reported by the strict coverage check).
    """
    if key in expected:
        return key
    prefix, _, leaf = key.rpartition(".")
    for wrapper in WRAPPERS:
        candidate = f"{prefix}.{wrapper}.{leaf}"
        if candidate in expected:
            return candidate
    return key


def _remap(sd: Mapping[str, torch.Tensor], expected: set[str], source: str) -> dict[str, torch.Tensor]:
    """Rename every key to the module spelling; a tensor present under both spellings is an error."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = _wrap_key(key, expected)
        if name in out:
            raise CheckpointError(f"{source}: {name} appears twice (with and without the .conv/.norm level)")
        out[name] = value
    return out


def _lookup(sd: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """`sd[name]` for a wrapped module name, or its unwrapped spelling; None when absent."""
    if name in sd:
        return sd[name]
    prefix, _, leaf = name.rpartition(".")
    unwrapped = prefix.rpartition(".")[0] + "." + leaf  # drop the `.conv` / `.norm` level
    return sd.get(unwrapped)


def _count_indices(keys: set[str], pattern: str, source: str) -> int:
    """Number of distinct integer indices captured by `pattern` over `keys` (must be 0..n-1)."""
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    if found != set(range(len(found))):
        raise CheckpointError(f"{source}: unexpected VAE layout: indices {sorted(found)} for {pattern!r}")
    return len(found)


def _not_a_vae(source: str, sd: Mapping[str, torch.Tensor]) -> CheckpointError:
    hint = ""
    if any(k in sd for k in TRANSFORMER_HINT_KEYS):
        hint = " It looks like a transformer (Infinity / NSARM) checkpoint; load it as the model instead."
    return CheckpointError(
        f"{source}: not a BSQ-VAE checkpoint: a VAE was expected (e.g. infinity_vae_d56_f8_14_patchify.pth) "
        f"but there is no {' / '.join(REQUIRED_KEYS)}.{hint} First keys: {sorted(sd)[:MAX_LISTED_KEYS]}"
    )


def _check_conv(source: str, key: str, weight: torch.Tensor, in_channels: int | None = None) -> None:
    """A 3x3 convolution weight [out >= 1, in, 3, 3] (in = `in_channels` when given), else CheckpointError
    naming the file, the key and the expected shape."""
    shape = tuple(weight.shape)
    ok = (len(shape) == 4 and shape[0] >= 1 and shape[1] >= 1 and shape[2:] == (3, 3)
          and (in_channels is None or shape[1] == in_channels))
    if not ok:
        out = shape[0] if shape and shape[0] >= 1 else "out"
        want = f"[{out}, {in_channels if in_channels is not None else 'in'}, 3, 3]"
        raise CheckpointError(f"{source}: {key} has shape {list(shape)}, expected {want} (a 3x3 convolution"
                              f"{' of the RGB image' if in_channels == RGB else ''}); the file is damaged or not "
                              "this VAE: download it again")


def infer_vae_config(sd: Mapping[str, torch.Tensor], source: str = "<state dict>") -> VAEConfig:
    """VAEConfig from the tensor shapes of a VAE state dict (either key spelling).

    base_ch and the input channels from `encoder.conv_in` [base_ch, 3, 3, 3]; codebook_dim from
    `encoder.conv_out` [d, C, 3, 3]; ch_mult from the output width of each encoder level's first
    block; num_res_blocks from the block count of level 0; patch_size = 2^(number of downsamples).
    """
    required = [_lookup(sd, k) for k in REQUIRED_KEYS]
    if any(t is None for t in required):
        raise _not_a_vae(source, sd)
    conv_in, conv_out, _ = required
    # The shapes the configuration is read from must be right, or the model would be built to fit
    # a damaged tensor and fail at the first convolution: [base_ch, 3 (RGB), 3, 3], [d, C, 3, 3].
    _check_conv(source, REQUIRED_KEYS[0], conv_in, in_channels=RGB)
    _check_conv(source, REQUIRED_KEYS[1], conv_out)
    base_ch, in_channels = conv_in.shape[:2]
    codebook_dim = conv_out.shape[0]
    keys = set(sd)
    num_levels = _count_indices(keys, r"encoder\.down\.(\d+)\.", source)
    num_res_blocks = _count_indices(keys, r"encoder\.down\.0\.block\.(\d+)\.", source)
    num_down = _count_indices(keys, r"encoder\.down\.(\d+)\.downsample\.", source)
    if num_levels == 0 or num_res_blocks == 0:
        raise CheckpointError(f"{source}: VAE checkpoint has no encoder levels / residual blocks")
    ch_mult = []
    for i in range(num_levels):
        name = f"encoder.down.{i}.block.0.conv1.conv.weight"  # [width_i, c_in, 3, 3]
        weight = _lookup(sd, name)
        if weight is None:
            raise CheckpointError(f"{source}: VAE checkpoint lacks {name}")
        width = weight.shape[0]
        if width % base_ch:
            raise CheckpointError(f"{source}: level {i} width {width} is not a multiple of base width {base_ch}")
        if width % GN_GROUPS and width % GN_GROUPS_FALLBACK:
            raise CheckpointError(
                f"{source}: VAE width {width} fits neither {GN_GROUPS} nor {GN_GROUPS_FALLBACK} GroupNorm groups"
            )
        ch_mult.append(width // base_ch)
    return VAEConfig(
        base_ch=int(base_ch),
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        codebook_dim=int(codebook_dim),
        patch_size=2**num_down,
        in_channels=int(in_channels),
    )


def load_vae(src, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> BSQVAE:
    """Load a BSQ-VAE from a path (.pth / .safetensors / sharded folder) or a state dict.

    Accepts the upstream checkpoint `{'vae': state_dict}` (or `{'ema': ...}` when 'vae' is absent,
    the upstream default being 'vae') as well as a flat state dict, in either key spelling (with
    or without the inner `.conv` / `.norm` level). The quantizer buffers `quantizer.lfq.mask` /
    `quantize.lfq.mask` may be present or absent (they are constants). Coverage is strict: any
    missing, unexpected or mis-shaped key raises `CheckpointError` naming the source. The
    encoder is stored in float32, the decoder in `dtype` (default: as in the checkpoint). The
    module is built on the `meta` device and filled tensor by tensor. Returns it in eval mode with
    gradients disabled.
    """
    source = describe(src)
    sd = unwrap(read_checkpoint(src), CHECKPOINT_WRAPPERS, source)
    cfg = infer_vae_config(sd, source)
    with torch.device("meta"):
        model = BSQVAE(cfg)
    sd = _remap(sd, set(model.state_dict()), source)
    defaults = dict.fromkeys(MASK_KEYS, MultiScaleBSQ(cfg.codebook_dim).lfq.mask)  # a constant buffer

    def dtype_for(name: str, value: torch.Tensor) -> torch.dtype:
        return torch.float32 if name.startswith("encoder.") else (dtype or value.dtype)

    materialize(model, sd, source=source, kind="BSQ-VAE", device=device, dtype_for=dtype_for, defaults=defaults)
    return model.eval().requires_grad_(False)
