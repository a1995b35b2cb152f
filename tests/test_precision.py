"""Numerics policy: one dtype policy at every entry point (precision.resolve_dtype), the sampler's
guard against non-finite logits, and an empty negative prompt meaning the learned unconditional rows.

GPUs with and without bf16 are simulated by replacing `precision.bf16_supported`, the one place
the hardware is asked; everything runs on the CPU.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GOLDEN, golden
from nsarm_nodes import load_pipeline, load_transformer, precision, sample
from nsarm_nodes.__main__ import main
from nsarm_nodes.pipeline import NSARMPipeline
from nsarm_nodes.sampler import NonFiniteLogitsError
from nsarm_nodes.schedule import scale_schedule
from nsarm_nodes.testing import make_tiny_models
from nsarm_nodes.text import PromptEmbeds, negative_or_none

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_models(root, seed=0)
    return root


def png(path: Path, size=(32, 24)) -> Path:
    arr = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def cli(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


# ---------------------------------------------------------------------------------------------
# 1. One dtype policy


@pytest.mark.parametrize("gpu_bf16", [True, False])
def test_resolve_dtype_policy(monkeypatch, gpu_bf16):
    monkeypatch.setattr(precision, "bf16_supported", lambda device: gpu_bf16 and device.type == "cuda")
    want = torch.bfloat16 if gpu_bf16 else torch.float32
    for choice in ("auto", None):
        assert precision.resolve_dtype(choice, "cuda") == want
        assert precision.resolve_dtype(choice, torch.device("cuda:1")) == want
        assert precision.resolve_dtype(choice, "cpu") == torch.float32
        assert precision.resolve_dtype(choice, "mps") == torch.float32
    # explicit choices are kept, fp16 only when asked for
    for choice, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32),
                          (torch.float16, torch.float16)):
        assert precision.resolve_dtype(choice, "cpu") == dtype
    for bad in ("float64", "half", torch.float64, torch.int8):
        with pytest.raises(ValueError, match="dtype"):
            precision.resolve_dtype(bad, "cpu")


def test_cpu_never_reports_bf16():
    assert precision.bf16_supported(torch.device("cpu")) is False


@pytest.mark.parametrize("capability,hip,native", [((7, 5), None, False), ((8, 0), None, True), ((9, 0), None, True),
                                                   ((6, 1), "6.2", True)])
def test_bf16_support_follows_the_gpu_generation(monkeypatch, capability, hip, native):
    """Turing and older (T4, V100, GTX 10xx) emulate bf16 slowly: auto picks fp32 there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    assert precision.bf16_supported(torch.device("cuda", 0)) is native
    assert precision.resolve_dtype("auto", "cuda") == (torch.bfloat16 if native else torch.float32)
    assert precision.bf16_supported(torch.device("cpu")) is False


@pytest.mark.parametrize("gpu_bf16", [True, False])
def test_every_entry_point_picks_the_same_auto_dtype(models, tmp_path, monkeypatch, gpu_bf16):
    """Python API (load_transformer, load_pipeline), CLI (upscale, upscale-dir, run: the loader node)
    with dtype auto on the same device load the same block dtype: the policy's. The device is the
    CPU, declared bf16-capable or not through the seam."""
    monkeypatch.setattr(precision, "bf16_supported", lambda device: gpu_bf16)
    want = precision.resolve_dtype("auto", "cpu")
    assert want == (torch.bfloat16 if gpu_bf16 else torch.float32)
    picked: dict[str, torch.dtype] = {}
    picked["load_transformer"] = load_transformer(models / "nsarm" / "NSARM.safetensors").block_dtype
    picked["load_pipeline"] = load_pipeline(models, device="cpu", text_encoder=False).transformer.block_dtype

    seen: list[torch.dtype] = []

    def record(self, images, *args, **kwargs):  # the loaded pipeline's block dtype; a black 4x image
        seen.append(self.transformer.block_dtype)
        b, h, w, c = images.shape
        return torch.zeros(b, 4 * h, 4 * w, c)

    monkeypatch.setattr(NSARMPipeline, "__call__", record)
    (tmp_path / "in").mkdir()
    src = png(tmp_path / "in" / "a.png")
    for name, argv in (
        ("upscale", ["upscale", src, "-o", tmp_path / "a.png", "--models", models, "--device", "cpu"]),
        ("upscale-dir", ["upscale-dir", tmp_path / "in", tmp_path / "out", "--models", models, "--device", "cpu"]),
        ("run (loader node)", ["run", ROOT / "workflows" / "api" / "nsarm_upscale_api.json", "--input", src,
                               "-o", tmp_path / "run", "--models", models]),
    ):
        code, err = cli(*argv, *(["--dtype", "auto"] if name != "run (loader node)" else []))
        assert code == 0, (name, err)
        picked[name] = seen.pop()
    assert json.loads((ROOT / "workflows" / "api" / "nsarm_upscale_api.json").read_text())["2"]["inputs"]["dtype"] \
        == "auto"
    assert picked == dict.fromkeys(picked, want), picked


# ---------------------------------------------------------------------------------------------
# 2. Sampler guard: non-finite logits stop before decoding, naming the dtype and the fix


def _run_inputs():
    run = golden("nsarm_run_area")
    return (run["kv_compact"], run["cu_seqlens_k"]), golden("vae_encode")["h"]


SHORT = scale_schedule(1.0, "0.25M")  # 10 scales: fast


def test_inf_in_the_head_stops_sampling_with_the_dtype_and_the_fix():
    text, h = _run_inputs()
    model = load_transformer(GOLDEN / "weights_transformer.safetensors")
    with torch.no_grad():
        model.head.weight[5, 3] = float("inf")
    for prefill in (True, False):
        with pytest.raises(NonFiniteLogitsError, match=r"NaN/inf logits from scale 7 .* in float32.*dtype fp32"):
            sample(model, None, text, h, seed=1, schedule=SHORT, prefill=prefill)


def test_fp16_overflow_is_caught_and_bf16_recommended():
    """Blocks in fp16 whose activations overflow (a weight scaled up, still a finite fp16 value):
    the guard names float16 and bf16; the same weights in fp32 sample normally."""
    text, h = _run_inputs()
    sd = load_transformer(GOLDEN / "weights_transformer.safetensors").state_dict()
    key = "block_chunks.0.module.0.ffn.fc2.weight"
    sd[key] = sd[key] * (30000 / sd[key].abs().max())  # |w| up to 3e4: finite in fp16, the block output is not
    assert sd[key].abs().max() < torch.finfo(torch.float16).max
    fp16 = load_transformer(sd, dtype="fp16")
    assert fp16.block_dtype == torch.float16
    with pytest.raises(NonFiniteLogitsError, match=r"in float16: float16 overflows.*dtype bf16"):
        sample(fp16, None, text, h, seed=1, schedule=SHORT)
    res = sample(load_transformer(sd, dtype="fp32"), None, text, h, seed=1, schedule=SHORT)
    assert torch.isfinite(res.summed_codes).all()


# ---------------------------------------------------------------------------------------------
# 3. Empty negative prompt = the learned unconditional rows


def test_blank_negative_prompts_are_none():
    assert negative_or_none("") is None and negative_or_none(" \n\t") is None and negative_or_none(None) is None
    assert negative_or_none("blurry") == "blurry"
    kv = torch.zeros(2, 8)
    assert negative_or_none(PromptEmbeds.from_lengths(kv, [1, 1], ["", "  "])) is None
    some = PromptEmbeds.from_lengths(kv, [1, 1], ["", "noise"])
    assert negative_or_none(some) is some


def test_pipeline_samples_a_blank_negative_prompt_as_none(models, monkeypatch):
    """NSARMPipeline (the CLI's and folder jobs' path) hands the sampler exactly what it hands it
    without a negative prompt, so the output is the same bits; a real negative is encoded."""
    from nsarm_nodes import pipeline as pipeline_mod

    pipe = load_pipeline(models, device="cpu")
    seen = []

    class Stop(Exception):
        pass

    def spy(*args, negative_text=None, **kwargs):
        seen.append(negative_text)
        raise Stop

    monkeypatch.setattr(pipeline_mod, "sample", spy)
    img = torch.rand(1, 24, 32, 3, generator=torch.Generator().manual_seed(0))
    for negative in (None, "", "   ", "\n", "blurry, noisy"):
        with pytest.raises(Stop):
            pipe(img, seed=3, cfg=3.0, negative_prompt=negative)
    assert seen[:4] == [None] * 4
    assert isinstance(seen[4], PromptEmbeds) and seen[4].prompts == ("blurry, noisy",)


def test_empty_negative_cond_in_the_node_chain_is_no_negative(models, monkeypatch):
    """NSARM Bitwise Decode with a negative NSARM_COND encoded from "" samples as without one."""
    from nsarm_nodes import runner

    monkeypatch.setenv("NSARM_MODELS_DIR", str(models))
    classes = runner.load_node_classes()
    (model,) = classes["NSARMModelLoader"]().load(checkpoint="NSARM.safetensors",
                                                  vae="infinity_vae_d56_f8_14_patchify.safetensors",
                                                  text_encoder="flan-t5-xl", dtype="auto", attention="auto")
    img = torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(1))
    (scales,) = classes["NSARMEncodeLR"]().encode(model=model, image=img)
    (empty,) = classes["NSARMTextEncode"]().encode(model=model, prompt="")
    assert empty.prompts == ("",) and empty.batch_size == 1  # T5 features of "" (its EOS token)
    decode = classes["NSARMBitwiseDecode"]()
    kw = dict(model=model, scales=scales, seed=2, tau=0.5, top_p=0.97, cfg=4.0, mode="area")
    (plain,) = decode.decode(**kw)
    (with_empty,) = decode.decode(**kw, negative=empty)
    assert torch.equal(plain.summed_codes, with_empty.summed_codes)


def test_folder_job_key_treats_a_blank_negative_as_none(tmp_path):
    from nsarm_nodes.folder_job import job_key, job_params

    files = {"transformer": png(tmp_path / "t.png"), "vae": png(tmp_path / "v.png")}
    key = {neg: job_key(job_params({"cfg": 3.0, "negative_prompt": neg}, 1, "auto", files)) for neg in (None, "", " ")}
    assert len(set(key.values())) == 1
    assert job_key(job_params({"cfg": 3.0, "negative_prompt": "x"}, 1, "auto", files)) != key[None]
