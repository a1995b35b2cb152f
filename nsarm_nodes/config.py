"""Model configurations: dataclasses, presets for the released models, and the tiny test preset.

Every loader infers its configuration from tensor shapes (see `vae.load_vae`,
`transformer.load_transformer`); the presets here document the released models and are used to
build tiny checkpoints in the real key layout for tests and benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# NSARM replaces the first K_t = 7 scales of the 13-scale 1M schedule by the transformation network.
NUM_REPLACED_SCALES = 7
# Pixels per transformer token: f8 VAE with 2x2 patchify (8B) or f16 VAE (2B).
PIXELS_PER_TOKEN = 16
# The transformation network takes a 256x256 LR image (32x32 latent) and makes 1024x1024 (x4).
LR_SIZE = 256
SCALE_FACTOR = 4
DEFAULT_PROMPT = "A high-quality image with harmonious colors and rich details."


@dataclass(frozen=True)
class VAEConfig:
    """BSQ-VAE (`AutoEncoder` of the Infinity tokenizer), encoder and decoder widths."""

    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # encoder; the decoder has num_res_blocks + 1 per level
    codebook_dim: int = 14  # latent channels = bits per latent position
    patch_size: int = 8  # spatial down-sampling factor of the encoder
    in_channels: int = 3

    @property
    def num_downsamples(self) -> int:
        return self.patch_size.bit_length() - 1


@dataclass(frozen=True)
class MapNetConfig:
    """Transformation network (`Map_Transformer_residual_for8B`). Head counts cannot be read from
    weights; the released table is the default and is used whenever the widths allow it."""

    input_channels: int = 14
    trunk_channels: tuple[int, int] = (64, 128)
    hidden_dims: tuple[int, ...] = (64, 128, 256, 384, 512, 768, 1024)
    num_layers: tuple[int, ...] = (4, 6, 8, 10, 12, 14, 16)
    num_heads: tuple[int, ...] = (4, 4, 8, 8, 8, 12, 16)
    output_sizes: tuple[int, ...] = (2, 4, 8, 12, 16, 24, 32)
    grid: int = 32  # latent side of the 256x256 LR image
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class TransformerConfig:
    """Infinity bitwise next-scale transformer (+ optional NSARM transformation network)."""

    depth: int = 40
    embed_dim: int = 3584
    num_heads: int = 28
    ffn_hidden: int = 14336
    text_channels: int = 2048
    text_maxlen: int = 512  # rows of cfg_uncond
    block_chunks: int = 8
    codebook_dim: int = 14  # VAE latent channels
    patchify: bool = True  # 2x2 spatial patchify of the VAE latent (8B); False for 2B
    pool_heads: int = 16  # heads of the text attention pool (text_channels // 128)
    num_lvl_embeds: int = 15
    norm_eps: float = 1e-6
    map_net: MapNetConfig | None = field(default_factory=MapNetConfig)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def d_vae(self) -> int:
        """Bits per token: the input width of `word_embed` (56 for 8B, 32 for 2B)."""
        return self.codebook_dim * (4 if self.patchify else 1)

    @property
    def blocks_per_chunk(self) -> int:
        return self.depth // self.block_chunks


@dataclass(frozen=True)
class ModelPreset:
    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    transformer_file: str
    vae_file: str


PRESETS: dict[str, ModelPreset] = {
    "nsarm-8b": ModelPreset(
        name="nsarm-8b",
        transformer=TransformerConfig(),
        vae=VAEConfig(),
        transformer_file="NSARM.pth",
        vae_file="infinity_vae_d56_f8_14_patchify.pth",
    ),
    "infinity-8b": ModelPreset(
        name="infinity-8b",
        transformer=TransformerConfig(map_net=None),
        vae=VAEConfig(),
        transformer_file="infinity_8b_weights",
        vae_file="infinity_vae_d56_f8_14_patchify.pth",
    ),
    "infinity-2b": ModelPreset(
        name="infinity-2b",
        transformer=TransformerConfig(
            depth=32, embed_dim=2048, num_heads=16, ffn_hidden=8192, codebook_dim=32,
            patchify=False, map_net=None,
        ),
        vae=VAEConfig(ch_mult=(1, 2, 4, 4, 4), codebook_dim=32, patch_size=16),
        transformer_file="infinity_2b_reg.pth",
        vae_file="infinity_vae_d32reg.pth",
    ),
    # The model of the reference vectors (tests/golden/README.md): same structure, tiny widths.
    "tiny": ModelPreset(
        name="tiny",
        transformer=TransformerConfig(
            depth=2, embed_dim=256, num_heads=2, ffn_hidden=256, text_channels=256, text_maxlen=32,
            block_chunks=2, pool_heads=2,
            map_net=MapNetConfig(
                trunk_channels=(16, 32), hidden_dims=(8, 8, 16, 16, 16, 24, 32),
                num_layers=(1, 1, 1, 2, 1, 1, 2),
            ),
        ),
        vae=VAEConfig(base_ch=32, ch_mult=(1, 1, 1, 2)),
        transformer_file="NSARM.safetensors",
        vae_file="infinity_vae_d56_f8_14_patchify.safetensors",
    ),
}
