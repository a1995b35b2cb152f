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

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
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


TEST_MODEL_MARKER = "nsarm_test_model"  # safetensors metadata key / marker file of the T5 folder


def _marker_seed(path: Path) -> str | None:
    """The seed recorded in a test model written by `make_tiny_models`, or None for any other file."""
    from .loading import TORCH_SUFFIXES, CheckpointError, read_checkpoint

    try:
        if path.is_dir():
            return json.loads((path / f"{TEST_MODEL_MARKER}.json").read_text()).get("seed")
        if path.suffix.lower() in TORCH_SUFFIXES:
            value = read_checkpoint(path).get(TEST_MODEL_MARKER)  # weights_only, memory-mapped
            return value if isinstance(value, str) else None
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(TEST_MODEL_MARKER)
    except (OSError, ValueError, SafetensorError, AttributeError, CheckpointError):
        return None


def make_tiny_models(models_dir: str | os.PathLike, seed: int = 0, *, overwrite: bool = False) -> dict[str, Path]:
    """Write the tiny transformer, VAE and T5 under `models_dir` (ComfyUI models/ layout).

    Never replaces a file that is not ours: when the targets already hold the test models of the same
    seed nothing is written (when only some do, the rest are added); any other existing target is a
    FileExistsError unless `overwrite`. Each file (and the T5 folder) appears in one step, so an
    interrupted run leaves no partial model."""
    from .images import write_new_file
    from .transformer import Infinity
    from .vae import BSQVAE

    root = Path(models_dir)
    preset = PRESETS["tiny"]
    released = PRESETS["nsarm-8b"]
    paths = {
        "transformer": root / "nsarm" / preset.transformer_file,
        "vae": root / "nsarm" / preset.vae_file,
        "text encoder": root / "text_encoders" / "flan-t5-xl",
        "transformer (released name)": root / "nsarm" / released.transformer_file,
        "vae (released name)": root / "nsarm" / released.vae_file,
    }
    existing = [p for p in paths.values() if p.exists() or p.is_symlink()]
    foreign = [p for p in existing if _marker_seed(p) != str(seed)]
    if len(existing) == len(paths) and not foreign:
        return paths  # already there
    keep = set(existing) - set(foreign) if not overwrite else set()  # this seed's models: left as they are
    if foreign and not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists; pass --overwrite to replace it (the tiny random "
                              "models would take its place) or choose another folder", str(foreign[0]))
    gen = torch.Generator().manual_seed(seed)
    transformer = Infinity(preset.transformer)
    _randomize(transformer, gen)
    vae = BSQVAE(preset.vae)
    _randomize(vae, gen)
    (root / "nsarm").mkdir(parents=True, exist_ok=True)
    for key, module in (("transformer", transformer), ("vae", vae)):
        sd = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
        blob = save(sd, metadata={TEST_MODEL_MARKER: str(seed)})
        if paths[key] not in keep:
            write_new_file(paths[key], lambda fh, blob=blob: fh.write(blob), overwrite=True)
        # The released name: a torch.save dict whose one non-tensor entry (the marker, which loaders skip
        # as they skip the training state of the released files) says it is ours.
        marked = {**sd, TEST_MODEL_MARKER: str(seed)}
        if paths[f"{key} (released name)"] not in keep:
            write_new_file(paths[f"{key} (released name)"], lambda fh, marked=marked: torch.save(marked, fh),
                           overwrite=True)
    if paths["text encoder"] not in keep:
        _replace_folder(paths["text encoder"],
                        lambda tmp: build_tiny_t5(tmp, d_model=preset.transformer.text_channels, seed=seed), str(seed))
    return paths


def _replace_folder(dest: Path, build: Callable[[Path], object], seed: str) -> None:
    """Build a folder under a hidden temporary name beside `dest` (marked with `seed`), then swap it
    into place; an old `dest` is moved aside first and removed after."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    old = dest.parent / f"{tmp.name}.old"
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a folder the user makes honours the umask
        build(tmp)
        (tmp / f"{TEST_MODEL_MARKER}.json").write_text(json.dumps({"seed": seed}))
        for item in tmp.iterdir():
            os.chmod(item, 0o666 & ~umask)
        if dest.is_dir() and not dest.is_symlink():
            os.replace(dest, old)
        elif dest.exists() or dest.is_symlink():
            os.unlink(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
