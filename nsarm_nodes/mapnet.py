"""NSARM transformation network (upstream `Map_Transformer_residual_for8B`).

It maps the raw (unquantised) BSQ-VAE features of a 256x256 LR image, h [B, 14, 32, 32], to seven
continuous residual predictions [B, s*s, 14], one per replaced scale (s = 2, 4, 8, 12, 16, 24, 32
latent positions per side, i.e. the first 7 Infinity scales after the 2x2 patchify). The sampler
turns them into codes with a *reshape* (not a permute) to [B, 14, s, s] followed by BSQ, see
`quantizer.map_outputs_to_bits`.

Structure (submodule names are upstream's, so checkpoints load with their own keys):

    feature_extractor      shared trunk: 3 x (Conv3x3 -> LayerNorm over [C, 32, 32] -> GELU)
    for each branch i (width d, output side s):
      feature_transforms[i]  2 x (Conv3x3 -> LayerNorm over [C, 32, 32] -> GELU), 14 -> d/2 -> d
      adaptive_pools[i]      AdaptiveAvgPool2d(s)   (overlapping windows for s = 12, 24)
      transformers[i]        torch TransformerEncoder: post-norm, ReLU, batch_first, no final norm
      output_projs[i]        Linear(d, d/2) -> LayerNorm(d/2) -> GELU -> Linear(d/2, 14)

The LayerNorms normalise over channels *and* the 32x32 grid with [C, 32, 32] affine weights, so the
network only accepts a 32x32 latent: the LR image must be exactly 256x256.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .config import MapNetConfig
from .loading import CheckpointError, shape_of

CONV_KERNEL = 3
CONV_PADDING = 1  # "same" padding for the 3x3 convolutions
DROPOUT = 0.1  # upstream's training dropout; inactive in eval mode
LAYER_NORM_EPS = 1e-5  # torch default, used by every LayerNorm of the network
# Output sides and head counts of the released network. Neither can be read from the weights
# (pooling and attention heads have no parameter whose shape reveals them).
RELEASED_OUTPUT_SIZES = MapNetConfig().output_sizes
RELEASED_NUM_HEADS = MapNetConfig().num_heads
VAE_STRIDE = 8  # pixels per latent position of the f8 BSQ-VAE


def _conv_norm_gelu(c_in: int, c_out: int, grid: int) -> list[nn.Module]:
    """Conv3x3 -> LayerNorm([c_out, grid, grid]) -> exact GELU (3 modules, so keys step by 3)."""
    return [
        nn.Conv2d(c_in, c_out, CONV_KERNEL, padding=CONV_PADDING),
        nn.LayerNorm([c_out, grid, grid], eps=LAYER_NORM_EPS),
        nn.GELU(),
    ]


class MapTransformer(nn.Module):
    """Transformation network: h [B, C_in, G, G] -> list of [B, s*s, C_in], one per branch.

    State-dict keys: `feature_extractor.{0,1,3,4,6,7}`, `feature_transforms.{i}.{0,1,3,4}`,
    `transformers.{i}.layers.{l}.{self_attn.in_proj_weight, ...}`, `output_projs.{i}.{0,1,3}`
    (`adaptive_pools` has no parameters).
    """

    def __init__(self, cfg: MapNetConfig | None = None):
        super().__init__()
        cfg = cfg or MapNetConfig()
        branches = (cfg.hidden_dims, cfg.num_layers, cfg.num_heads, cfg.output_sizes)
        if len({len(b) for b in branches}) != 1:
            raise ValueError(
                f"MapNetConfig: hidden_dims, num_layers, num_heads and output_sizes must have one "
                f"entry per branch, got lengths {[len(b) for b in branches]}"
            )
        self.cfg = cfg
        c_in, g = cfg.input_channels, cfg.grid
        c1, c2 = cfg.trunk_channels
        # [B, c_in, G, G] -> [B, c1, G, G] -> [B, c2, G, G] -> [B, c_in, G, G]
        self.feature_extractor = nn.Sequential(
            *_conv_norm_gelu(c_in, c1, g), *_conv_norm_gelu(c1, c2, g), *_conv_norm_gelu(c2, c_in, g)
        )
        self.feature_transforms = nn.ModuleList()
        self.adaptive_pools = nn.ModuleList()
        self.transformers = nn.ModuleList()
        self.output_projs = nn.ModuleList()
        for d, layers, heads, side in zip(*branches):
            # [B, c_in, G, G] -> [B, d/2, G, G] -> [B, d, G, G]
            self.feature_transforms.append(
                nn.Sequential(*_conv_norm_gelu(c_in, d // 2, g), *_conv_norm_gelu(d // 2, d, g))
            )
            self.adaptive_pools.append(nn.AdaptiveAvgPool2d((side, side)))
            layer = nn.TransformerEncoderLayer(
                d_model=d, nhead=heads, dim_feedforward=int(d * cfg.mlp_ratio), dropout=DROPOUT,
                activation="relu", layer_norm_eps=LAYER_NORM_EPS, batch_first=True, norm_first=False,
            )
            # Nested tensors only pay off with padding masks, which this network never uses.
            self.transformers.append(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False))
            self.output_projs.append(
                nn.Sequential(
                    nn.Linear(d, d // 2),
                    nn.LayerNorm(d // 2, eps=LAYER_NORM_EPS),
                    nn.GELU(),
                    nn.Linear(d // 2, c_in),
                )
            )

    def _check_input(self, h: torch.Tensor) -> None:
        c, g = self.cfg.input_channels, self.cfg.grid
        if h.dim() != 4 or tuple(h.shape[1:]) != (c, g, g):
            raise ValueError(
                f"the transformation network needs VAE features of shape [B, {c}, {g}, {g}], got "
                f"{list(h.shape)}. A {g * VAE_STRIDE}x{g * VAE_STRIDE} LR image is required: its "
                f"LayerNorms carry learned weights for exactly a {g}x{g} latent (the f{VAE_STRIDE} VAE "
                f"features of such an image). Resize or tile the LR input to that size."
            )

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        """h [B, C_in, G, G] (raw VAE features) -> [out_i [B, s_i*s_i, C_in] for each branch i]."""
        self._check_input(h)
        b = h.shape[0]
        features = self.feature_extractor(h)  # [B, C_in, G, G]
        outputs = []
        for transform, pool, encoder, proj, side in zip(
            self.feature_transforms, self.adaptive_pools, self.transformers, self.output_projs,
            self.cfg.output_sizes,
        ):
            x = pool(transform(features))  # [B, d, s, s]
            tokens = x.permute(0, 2, 3, 1).reshape(b, side * side, x.shape[1])  # [B, s*s, d], row-major
            outputs.append(proj(encoder(tokens)))  # [B, s*s, C_in]
        return outputs


def _branch_count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    n = 0
    while f"{prefix}feature_transforms.{n}.3.weight" in sd:
        n += 1
    return n


def _layer_count(sd: Mapping[str, torch.Tensor], prefix: str, branch: int) -> int:
    pattern = re.compile(rf"{re.escape(prefix)}transformers\.{branch}\.layers\.(\d+)\.")
    indices = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def infer_mapnet_config(
    sd: Mapping[str, torch.Tensor], prefix: str = "map_transformer."
) -> MapNetConfig | None:
    """The MapNetConfig of the transformation network stored under `prefix` in a state dict, or
    None when the state dict has none (a plain Infinity checkpoint).

    Read from shapes: input channels and trunk widths (`feature_extractor.{0,3}`), the latent grid
    (`feature_extractor.1`, [C, G, G]), the branch widths (`feature_transforms.{i}.3`), the encoder
    depth per branch (number of `transformers.{i}.layers.{l}`) and the feed-forward ratio
    (`linear1` rows / width). Not readable from weights, hence taken from the released network:
    the output sides (2, 4, 8, 12, 16, 24, 32), which require exactly 7 branches, and the head
    counts (4, 4, 8, 8, 8, 12, 16), which require every width to be divisible by its head count.
    Anything else raises CheckpointError.
    """
    if f"{prefix}feature_extractor.0.weight" not in sd:
        return None

    def dims_of(key: str, rank: int) -> tuple[int, ...]:
        if key not in sd:
            raise CheckpointError(f"transformation network under {prefix!r} is incomplete: no tensor {key}")
        shape = tuple(shape_of(sd, key))  # from the header of a lazy state dict: nothing is read
        if len(shape) != rank or min(shape, default=0) < 1:
            raise CheckpointError(f"transformation network: tensor {key} has shape {list(shape)}, expected {rank} "
                                  "dimensions of size >= 1; the file is damaged: download it again")
        return shape

    c1, c_in = dims_of(f"{prefix}feature_extractor.0.weight", 4)[:2]  # conv [c1, c_in, 3, 3]
    c2 = dims_of(f"{prefix}feature_extractor.3.weight", 4)[0]  # conv [c2, c1, 3, 3]
    grid = dims_of(f"{prefix}feature_extractor.1.weight", 3)[-1]  # LayerNorm [c1, G, G]
    n = _branch_count(sd, prefix)
    dims = tuple(dims_of(f"{prefix}feature_transforms.{i}.3.weight", 4)[0] for i in range(n))
    layers = tuple(_layer_count(sd, prefix, i) for i in range(n))
    ffn = [dims_of(f"{prefix}transformers.{i}.layers.0.linear1.weight", 2)[0] for i in range(n)]
    if n != len(RELEASED_OUTPUT_SIZES):
        raise CheckpointError(
            f"transformation network under {prefix!r} has {n} branches; only the released layout "
            f"with {len(RELEASED_OUTPUT_SIZES)} (output sides {RELEASED_OUTPUT_SIZES}) is supported, "
            f"because the output sides cannot be read from the weights"
        )
    ratios = {f / d for f, d in zip(ffn, dims)}
    if len(ratios) != 1:
        raise CheckpointError(
            f"transformation network under {prefix!r}: feed-forward widths {ffn} are not one "
            f"common multiple of the branch widths {list(dims)}"
        )
    bad = [(d, h) for d, h in zip(dims, RELEASED_NUM_HEADS) if d % h]
    if bad:
        raise CheckpointError(
            f"transformation network under {prefix!r}: branch widths {list(dims)} do not fit the "
            f"released head counts {RELEASED_NUM_HEADS} (width, heads not divisible: {bad}); the "
            f"head counts cannot be read from the weights"
        )
    return MapNetConfig(
        input_channels=c_in,
        trunk_channels=(c1, c2),
        hidden_dims=dims,
        num_layers=layers,
        num_heads=RELEASED_NUM_HEADS,
        output_sizes=RELEASED_OUTPUT_SIZES,
        grid=grid,
        mlp_ratio=ratios.pop(),
    )
