"""Tiny NSARM models in the real file layout, for tests, demos and CI (no downloads).

`python -m nsarm_nodes make-test-models DIR` writes
    DIR/nsarm/NSARM.safetensors                               tiny transformer + map network
    DIR/nsarm/infinity_vae_d56_f8_14_patchify.safetensors     tiny BSQ-VAE (14 channels, f8)
    DIR/nsarm/NSARM.pth, DIR/nsarm/infinity_vae_d56_f8_14_patchify.pth
                                                              the same tensors under the released file
                                                              names, which the shipped workflows use
    DIR/text_encoders/flan-t5-xl/                             tiny random T5 + tokenizer
with the released key names and structure at tiny widths (the `tiny` preset). The weights are
random (seeded), so the images are noise: these models check plumbing, not quality.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import PRESETS

# A small T5 vocabulary: enough words for the default prompt plus single characters.
T5_WORDS = ("a high quality image with harmonious colors and rich details the of photo sharp "
            "cat dog on grass").split()
T5_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-")
WEIGHT_STD = 0.02


def build_tiny_t5(folder: str | os.PathLike, d_model: int = 32, *, shard: bool = False, seed: int = 0) -> Path:
    """Save a random T5 (encoder-decoder, as released checkpoints are) and a Unigram T5 tokenizer
    into `folder` in the Hugging Face layout. Returns the folder."""
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    folder = Path(folder)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in T5_WORDS]
    vocab += [(c, -5.0) for c in T5_CHARS] + [("\u2581" + c, -6.0) for c in T5_CHARS]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(folder))
    heads = 4
    config = T5Config(
        vocab_size=len(vocab), d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model, num_layers=2,
        num_decoder_layers=1, num_heads=heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )
    gen = torch.Generator().manual_seed(seed)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():  # deterministic, non-trivial weights
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(str(folder), max_shard_size="20KB" if shard else "5GB")
    return folder


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    """Seeded weights: matrices ~ N(0, 1/fan_in), norm gains ~ 1, other vectors small."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + WEIGHT_STD * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(WEIGHT_STD * torch.randn(p.shape, generator=gen))


def make_tiny_models(models_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Write the tiny transformer, VAE and T5 under `models_dir` (ComfyUI models/ layout)."""
    from .transformer import Infinity
    from .vae import BSQVAE

    root = Path(models_dir)
    preset = PRESETS["tiny"]
    gen = torch.Generator().manual_seed(seed)
    (root / "nsarm").mkdir(parents=True, exist_ok=True)
    paths = {
        "transformer": root / "nsarm" / preset.transformer_file,
        "vae": root / "nsarm" / preset.vae_file,
        "text encoder": root / "text_encoders" / "flan-t5-xl",
    }
    transformer = Infinity(preset.transformer)
    _randomize(transformer, gen)
    vae = BSQVAE(preset.vae)
    _randomize(vae, gen)
    released = PRESETS["nsarm-8b"]
    paths["transformer (released name)"] = root / "nsarm" / released.transformer_file
    paths["vae (released name)"] = root / "nsarm" / released.vae_file
    for key, module in (("transformer", transformer), ("vae", vae)):
        sd = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
        tmp = paths[key].with_suffix(".tmp")
        save_file(sd, str(tmp))
        os.replace(tmp, paths[key])
        pth = paths[f"{key} (released name)"]
        tmp = pth.with_suffix(".tmp")
        torch.save(sd, tmp)
        os.replace(tmp, pth)
    build_tiny_t5(paths["text encoder"], d_model=preset.transformer.text_channels, seed=seed)
    return paths
