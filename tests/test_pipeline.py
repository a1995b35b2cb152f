"""End to end: golden image parity, NSARMPipeline on tiny models, and the CLI."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GOLDEN, golden, golden_json
from nsarm_nodes import NSARMPipeline, load_pipeline, load_transformer, load_vae, sample
from nsarm_nodes.colorfix import color_adjust_u8
from nsarm_nodes.pipeline import MissingModelsError, to_uint8, unit_to_images
from nsarm_nodes.testing import make_tiny_models

ROOT = Path(__file__).resolve().parents[1]


def crops(img_u8: torch.Tensor) -> list[torch.Tensor]:
    cfg = golden_json("config.json")["crops"]
    s = cfg["size"]
    return [img_u8[y:y + s, x:x + s] for y, x in cfg["origins_yx"]]


def assert_u8_close(ours: torch.Tensor, ref: torch.Tensor, max_diff: int, max_frac: float) -> None:
    diff = (ours.int() - ref.int()).abs()
    assert diff.max().item() <= max_diff, diff.max().item()
    assert (diff > 0).float().mean().item() <= max_frac


@pytest.fixture(scope="module")
def golden_image():
    """The golden NSARM run (teacher-forced bits) decoded to uint8 [1024, 1024, 3]."""
    run = golden("nsarm_run_area")
    transformer = load_transformer(GOLDEN / "weights_transformer.safetensors")
    vae = load_vae(GOLDEN / "weights_vae.safetensors")
    forced = [run[f"bits_s{i}"] for i in range(13)]
    res = sample(transformer, vae, (run["kv_compact"], run["cu_seqlens_k"]), golden("vae_encode")["h"],
                 seed=1, forced_bits=forced)
    with torch.no_grad():
        return to_uint8(unit_to_images(vae.decode(res.summed_codes)))[0]


def test_end_to_end_image_matches_golden_before_and_after_colour_fix(golden_image):
    run = golden("nsarm_run_area")
    for k, crop in enumerate(crops(golden_image)):
        assert_u8_close(crop, run[f"sr_u8_crop{k}"], max_diff=1, max_frac=0.03)
    pooled = torch.nn.functional.avg_pool2d(golden_image.permute(2, 0, 1)[None].float(), 16)
    assert torch.allclose(pooled, run["sr_u8_pool16"], atol=0.1)
    fixed = color_adjust_u8(golden_image, run["lr_u8"])
    for k, crop in enumerate(crops(fixed)):
        assert_u8_close(crop, run[f"sr_colorfix_u8_crop{k}"], max_diff=2, max_frac=0.04)
    adain_only = color_adjust_u8(golden_image, run["lr_u8"], wavelet=False)
    for k, crop in enumerate(crops(adain_only)):
        assert_u8_close(crop, run[f"sr_adain_only_u8_crop{k}"], max_diff=2, max_frac=0.04)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_models(root, seed=0)
    return root


@pytest.fixture(scope="module")
def pipe(models_dir) -> NSARMPipeline:
    return load_pipeline(models_dir, device="cpu")


def lr_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, max(h // 8, 1), max(w // 8, 1), generator=g)
    img = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    return img.permute(0, 2, 3, 1).contiguous()


def test_pipeline_256_gives_1024_and_is_deterministic(pipe):
    img = lr_image(256, 256)
    a = pipe(img, seed=3)
    b = pipe(img, seed=3)
    assert a.shape == (1, 1024, 1024, 3) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    c = pipe(img, seed=4)
    assert not torch.equal(a, c)


def test_pipeline_any_size_batch_and_output_scale(pipe):
    imgs = torch.cat([lr_image(120, 300, 1), lr_image(120, 300, 2)])
    both = pipe(imgs, seed=5, tile_batch_size=2, output_scale=2.0, tiling="independent")
    assert both.shape == (2, 240, 600, 3)
    from nsarm_nodes.tiling import estimate_tiles
    alone = pipe(imgs[1:], seed=5 + estimate_tiles(120, 300), output_scale=2.0, tiling="independent")
    # batched kernels round differently (measured max 5e-4 after the deep decoder); same bits
    assert torch.allclose(both[1], alone[0], atol=2e-3)
    # colour fix once against the whole LR: the result's mean colour follows the LR's
    fixed = pipe(imgs[:1], seed=5, color_fix="adain", tiling="independent")
    assert (fixed.mean(dim=(1, 2)) - imgs[:1].mean(dim=(1, 2))).abs().max() < 0.02


def test_pipeline_bad_inputs(pipe):
    img = lr_image(64, 64)
    with pytest.raises(ValueError, match="NaN"):
        pipe(img * float("nan"))
    with pytest.raises(ValueError, match=r"need \d+ tiles"):
        pipe(lr_image(1024, 1024), max_tiles=4)
    with pytest.raises(ValueError, match="prompts for 1 images"):
        pipe(img, prompt=["a", "b"])
    with pytest.raises(ValueError, match="IMAGE batch"):
        pipe(img[0])


def test_pipeline_cached_prompts_only(models_dir, pipe):
    pipe.encode_prompts(["a cat"])  # fills the cache through the encoder
    cached = load_pipeline(models_dir, device="cpu", text_encoder=False)
    assert torch.equal(cached.encode_prompts(["a cat"]).kv_compact, pipe.encode_prompts(["a cat"]).kv_compact)
    with pytest.raises(LookupError, match="not in the prompt cache|not cached"):
        cached.encode_prompts(["a dog on grass"])


def test_load_pipeline_follows_the_offload_policy(models_dir, pipe):
    assert pipe.transformer.offloader is None  # on the CPU the once-per-sample modules stay put
    forced = load_pipeline(models_dir, device="cpu", text_encoder=False, offload_text_and_map=True)
    assert forced.transformer.offloader is None  # the policy: offloading to the same memory only costs time


def test_load_pipeline_reports_missing_files(tmp_path):
    with pytest.raises(MissingModelsError) as e:
        load_pipeline(tmp_path)
    msg = str(e.value)
    assert "NSARM.safetensors" in msg and "16905db52d64fd44c365b6a963a6598d" in msg
    assert "infinity_vae_d56_f8_14_patchify" in msg and "google/flan-t5-xl" in msg


def cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nsarm_nodes", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_cli_upscale_end_to_end(models_dir, tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray((lr_image(256, 256).numpy()[0] * 255).astype(np.uint8)).save(src)
    out = tmp_path / "out.png"
    r = cli("upscale", src, "-o", out, "--models", models_dir, "--seed", 2, "--report")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (1024, 1024)
    assert "15/15 steps" in r.stderr and "seam score" in r.stdout  # 13 scales, the decode, the colour fix
    before = out.read_bytes()
    r = cli("upscale", src, "-o", out, "--models", models_dir)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert out.read_bytes() == before


def test_cli_fails_fast_without_weights(tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (256, 256)).save(src)
    r = cli("upscale", src, "-o", tmp_path / "out.png", "--models", tmp_path / "empty")
    assert r.returncode == 2
    assert "NSARM weights missing" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.png").exists()
    r = cli("check-models", "--models", tmp_path / "empty")
    assert r.returncode == 2 and "flan-t5-xl" in r.stdout
    r = cli("upscale", tmp_path / "nope.png", "--models", tmp_path)
    assert r.returncode == 2 and "not found" in r.stderr


def test_model_pair_is_checked_from_the_headers(models_dir, tmp_path):
    """Swapped files, a VAE as the checkpoint and a VAE of another latent width are refused naming the
    files, before the transformer is read (shapes come from the headers)."""
    from nsarm_nodes.loading import CheckpointError
    from nsarm_nodes.pipeline import check_model_pair

    model, vae = models_dir / "nsarm" / "NSARM.safetensors", models_dir / "nsarm" / "infinity_vae_d56_f8_14_patchify.pth"
    check_model_pair(model, vae)
    with pytest.raises(CheckpointError, match="swapped"):
        check_model_pair(vae, model)
    with pytest.raises(CheckpointError, match="is a VAE, not the NSARM transformer"):
        check_model_pair(vae, vae)
    with pytest.raises(CheckpointError, match="not the VAE"):
        check_model_pair(model, model)
    wide = {k: v for k, v in load_vae(vae).state_dict().items()}
    wide["encoder.conv_out.conv.weight"] = torch.zeros(32, *wide["encoder.conv_out.conv.weight"].shape[1:])
    with pytest.raises(CheckpointError, match="wrong model pair.*56-bit tokens.*32 latent channels"):
        check_model_pair(model, wide)
