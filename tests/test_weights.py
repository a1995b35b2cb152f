"""Block-quantised weight formats (nsarm_nodes/weights.py): bit-exact GGUF blocks, loading at any
checkpoint and from .gguf files written by `convert`, refusal of mismatched files, old "fp8" values,
and the memory estimate per format."""
from __future__ import annotations

import math
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from conftest import GOLDEN, golden
from nsarm_nodes import CheckpointError, options, weights
from nsarm_nodes.config import PRESETS
from nsarm_nodes.convert import convert_checkpoint
from nsarm_nodes.loading import read_checkpoint
from nsarm_nodes.lowvram import block_linear_shapes, memory_required
from nsarm_nodes.precision import resolve_dtype
from nsarm_nodes.sampler import sample
from nsarm_nodes.schedule import scale_schedule
from nsarm_nodes.transformer import load_transformer

ROOT = Path(__file__).resolve().parents[1]
CKPT = GOLDEN / "weights_transformer.safetensors"
TYPES = tuple(weights.BLOCK_TYPES)


def awkward_weights(seed: int) -> torch.Tensor:
    """[96, 256] float32 with the cases a block quantiser can get wrong: all-zero and constant blocks,
    ties of |max| between signs, values at the rounding midpoints, tiny and huge magnitudes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 256, generator=g)
    w[0, :32] = 0
    w[1, :32] = 1.5
    w[2, :32] = torch.tensor([1.0, -1.0] * 16)  # |max| tie: the first one wins
    w[3, :32] = torch.arange(32) - 15.5  # many exact half steps
    w[4] *= 1e-6
    w[5] *= 1e4
    w[6, :32] = -w[6, :32].abs()  # one-signed blocks (the _1 types' minimum)
    w[7:40] = (w[7:40] * 16).round() / 16  # bf16-like coarse values
    return w


@pytest.mark.parametrize("name", TYPES)
def test_quantize_is_bit_identical_to_the_gguf_package(name):
    bt = weights.BLOCK_TYPES[name]
    qtype = GGMLQuantizationType(bt.ggml_type)
    for seed in range(3):
        w = awkward_weights(seed)
        ref = gguf_quantize(w.numpy(), qtype)
        mine = weights.quantize(w, name)
        assert mine.dtype == torch.uint8 and tuple(mine.shape) == ref.shape == weights.packed_shape((96, 256), bt)
        assert np.array_equal(mine.numpy(), ref), name
        # bf16 input (as a converted checkpoint holds it) gives the bytes of its float32 values
        wb = w.to(torch.bfloat16)
        assert np.array_equal(weights.quantize(wb, name).numpy(), gguf_quantize(wb.float().numpy(), qtype))
        # dequantisation: the same float32 bits
        back = weights.dequantize(torch.from_numpy(ref), name)
        assert np.array_equal(back.numpy().view(np.uint32), gguf_dequantize(ref, qtype).view(np.uint32))


@pytest.mark.parametrize("name", TYPES)
def test_dequantize_round_trip_stays_within_half_a_step(name):
    bt = weights.BLOCK_TYPES[name]
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    packed = weights.quantize(w, name)
    back = weights.dequantize(packed, name)
    blocks = w.view(64, -1, 32)
    if bt.affine:  # levels min + d * (0..2^bits - 1)
        step, bound = (blocks.amax(-1) - blocks.amin(-1)) / ((1 << bt.bits) - 1), 0.5
    elif bt.bits == 8:  # levels d * (-127..127), d = amax / 127
        step, bound = blocks.abs().amax(-1) / 127, 0.5
    else:  # levels d * (-2^(bits-1)..2^(bits-1) - 1): the extreme opposite the largest |x| is clipped
        step, bound = blocks.abs().amax(-1) / (1 << (bt.bits - 1)), 1.0
    err = (back - w).view(64, -1, 32).abs().amax(-1)
    slack = 127 * 2.0 ** -11 if bt.bits == 8 else 0.02  # fp16 rounding of the scale (and minimum)
    assert (err <= (bound + slack) * step + 1e-7).all()
    assert (err >= 0.3 * bound * step).any()  # the bound is not vacuous
    # dequantised values quantise to the same bytes again
    assert torch.equal(weights.quantize(back, name), packed)
    assert weights.dequantize(packed, name, torch.bfloat16).dtype == torch.bfloat16
    assert bt.bits_per_weight == bt.type_size * 8 / 32


def test_quantize_refuses_bad_shapes_and_non_finite_values():
    with pytest.raises(weights.QuantError, match="multiple of 32"):
        weights.quantize(torch.randn(4, 40), "q8_0")
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(weights.QuantError, match="non-finite"):
        weights.quantize(w, "q4_1")


def test_block_quant_linear_matches_a_dense_linear_on_the_dequantised_weight():
    w, b, x = torch.randn(96, 64), torch.randn(96), torch.randn(3, 5, 64)
    layer = weights.BlockQuantLinear(weights.quantize(w, "q5_1"), "q5_1", 64, b, torch.float32)
    dense = weights.dequantize(layer.packed, "q5_1")
    assert torch.equal(layer(x), torch.nn.functional.linear(x, dense, b))


# ---------------------------------------------------------------------------------------------
# Loading


def blocks_state(m) -> dict[str, torch.Tensor]:
    return {k: v for k, v in m.state_dict().items() if k.startswith("block_chunks.")}


def test_quantise_at_load_stores_the_checkpoint_weights_as_blocks():
    m = load_transformer(CKPT, weight_format="q8_0", dtype=torch.bfloat16)
    sd = read_checkpoint(CKPT)
    layer = m.blocks[1].ffn.fc2
    assert isinstance(layer, weights.BlockQuantLinear) and m.block_dtype == torch.bfloat16
    assert torch.equal(layer.packed, weights.quantize(sd["block_chunks.1.module.0.ffn.fc2.weight"], "q8_0"))
    assert m.blocks[0].sa.q_bias.dtype == torch.bfloat16 and m.head.weight.dtype == torch.float32
    dense = load_transformer(CKPT, dtype=torch.bfloat16)
    size = lambda model: sum(t.numel() * t.element_size() for t in blocks_state(model).values())  # noqa: E731
    assert size(m) < 0.56 * size(dense)  # 8.5 of 16 bits for the linears
    # without a dtype, block formats compute in the one dtype policy's choice, like dense weights
    assert load_transformer(CKPT, weight_format="q8_0").block_dtype == resolve_dtype(None, "cpu") == torch.float32


def test_8_bit_logits_stay_near_bf16_and_the_old_fp8_value_loads_q8_0():
    """Teacher-forced logits of the first 10 scales vs float32, per generated scale (7..9): the
    distance of q8_0 / q8_0_mixed is a small multiple of bf16's (measured 1.4x / 1.2x here)."""
    run = golden("nsarm_run_area")
    text, h = (run["kv_compact"], run["cu_seqlens_k"]), golden("vae_encode")["h"]
    n = 10
    kw = dict(seed=1, forced_bits=[run[f"bits_s{i}"] for i in range(n)], return_logits=True,
              schedule=scale_schedule(1.0, "1M")[:n])
    q8 = load_transformer(CKPT, weight_format="q8_0", dtype=torch.bfloat16)
    old = load_transformer(CKPT, weight_format="fp8", dtype=torch.bfloat16)  # saved workflows from before q8_0
    assert old.weight_format == "q8_0"
    assert all(torch.equal(a, b) for a, b in zip(blocks_state(q8).values(), blocks_state(old).values()))
    ref = sample(load_transformer(CKPT), None, text, h, **kw).logits
    bf = sample(load_transformer(CKPT, dtype=torch.bfloat16), None, text, h, **kw).logits
    for model, bound in ((q8, 2.0), (load_transformer(CKPT, weight_format="q8_0_mixed", dtype=torch.bfloat16), 1.5)):
        got = sample(model, None, text, h, **kw).logits
        for s in range(7, n):
            assert (got[s] - ref[s]).norm() <= bound * (bf[s] - ref[s]).norm(), (model.weight_format, s)


def test_gguf_from_convert_loads_exactly_as_quantise_at_load(tmp_path: Path):
    out = tmp_path / "NSARM_q4_1.gguf"
    info = convert_checkpoint(CKPT, out, "q4_1")
    assert info["path"] == out and out.stat().st_size < 0.7 * CKPT.stat().st_size
    sd = read_checkpoint(out)
    assert sd.metadata["nsarm.weight_format"] == "q4_1"
    assert set(sd.block_types) == {k for k in sd if weights.is_block_linear(k)}
    # the .gguf keeps the blocks' other tensors in bf16, so compare at that compute dtype
    a = load_transformer(CKPT, weight_format="q4_1", dtype=torch.bfloat16)
    b = load_transformer(out, weight_format="q4_1", dtype=torch.bfloat16)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_dense_convert_writes_safetensors_and_block_formats_need_gguf(tmp_path: Path):
    with pytest.raises(ValueError, match=r"\.gguf"):
        convert_checkpoint(CKPT, tmp_path / "x.safetensors", "q8_0")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        convert_checkpoint(CKPT, tmp_path / "x.gguf", "bf16")
    out = convert_checkpoint(CKPT, tmp_path / "x.gguf", "q8_0")["path"]
    with pytest.raises(FileExistsError):
        convert_checkpoint(CKPT, out, "q8_0")
    convert_checkpoint(CKPT, out, "q5_1", overwrite=True)
    assert read_checkpoint(out).metadata["nsarm.weight_format"] == "q5_1"
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"]  # no temporary files left


def test_gguf_of_another_format_or_shape_or_type_is_refused_naming_file_and_key(tmp_path: Path):
    out = convert_checkpoint(CKPT, tmp_path / "m.gguf", "q8_0")["path"]
    for fmt in ("q4_1", "dense"):
        with pytest.raises(CheckpointError, match=r"m\.gguf: tensor block_chunks\.0\.module\.0\..*q8_0.*'q8_0'"):
            load_transformer(out, weight_format=fmt)
    mixed = convert_checkpoint(CKPT, tmp_path / "mixed.gguf", "q8_0_mixed")["path"]  # q/k/v kept bf16
    assert isinstance(load_transformer(mixed, weight_format="q8_0_mixed").blocks[0].sa.mat_qkv, torch.nn.Linear)
    with pytest.raises(CheckpointError, match=r"mixed\.gguf: tensor .*sa\.mat_qkv\.weight is stored as dense"):
        load_transformer(mixed, weight_format="q8_0")  # would otherwise re-quantise the bf16 copy silently
    # a hand-made file: one block weight with the wrong width, one tensor in a type we do not read
    good = read_checkpoint(out)

    def write(path: Path, change):
        w = GGUFWriter(str(path), "nsarm")
        for k in good:
            arr, qtype = change(k)
            w.add_tensor(k, arr, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    key = "block_chunks.1.module.0.ffn.fc1.weight"

    def plain(k):
        if k in good.block_types:
            return good.packed(k).numpy(), GGMLQuantizationType.Q8_0
        return good[k].float().numpy(), None

    def narrow(k):
        if k == key:
            t = good[k][:, :224].contiguous()
            return gguf_quantize(t.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
        return plain(k)

    with pytest.raises(CheckpointError, match=rf"narrow\.gguf.*{key.removesuffix('.weight')}"):
        load_transformer(write(tmp_path / "narrow.gguf", narrow), weight_format="q8_0")

    def k_quant(k):
        if k == key:
            return np.zeros((good.shape(k)[0], good.shape(k)[1] // 256 * 144), np.uint8), GGMLQuantizationType.Q4_K
        return plain(k)

    with pytest.raises(CheckpointError, match=rf"kquant\.gguf: tensor {key} is stored as GGUF type Q4_K"):
        load_transformer(write(tmp_path / "kquant.gguf", k_quant), weight_format="q8_0")
    (tmp_path / "cut.gguf").write_bytes(out.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: not a readable \.gguf"):
        load_transformer(tmp_path / "cut.gguf", weight_format="q8_0")


def test_convert_cli_writes_gguf_and_checks_the_extension(tmp_path: Path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "nsarm_nodes", "convert", str(CKPT), *args],
                              capture_output=True, text=True, cwd=ROOT)

    bad = run("--format", "q8_0", "-o", str(tmp_path / "x.safetensors"))
    assert bad.returncode != 0 and ".gguf" in bad.stderr and not (tmp_path / "x.safetensors").exists()
    ok = run("--format", "q8_0", "-o", str(tmp_path / "x.gguf"))
    assert ok.returncode == 0, ok.stderr
    assert "q8_0" in ok.stdout and "verified" in ok.stdout
    assert read_checkpoint(tmp_path / "x.gguf").metadata["nsarm.weight_format"] == "q8_0"


def test_full_disk_while_writing_a_gguf_leaves_no_partial_file(tmp_path: Path):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    out = tmp_path / "x.gguf"
    r = subprocess.run([sys.executable, "-m", "nsarm_nodes", "convert", str(CKPT), "--format", "q8_0", "-o", str(out)],
                       capture_output=True, text=True, cwd=ROOT, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"error: {out}: File too large"
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Options and the memory estimate


def test_every_offered_weight_format_loads_and_old_values_stay_offered():
    assert options.WEIGHT_FORMATS[:2] == ("dense", "fp8")  # saved workflows hold these values
    assert set(options.WEIGHT_FORMATS) == set(weights.FORMATS) | set(weights.FORMAT_ALIASES)
    for name in options.WEIGHT_FORMATS:
        assert weights.weight_format(name).name in weights.FORMATS
    with pytest.raises(ValueError, match="weight_format"):
        weights.weight_format("int4")


def test_memory_required_counts_block_bytes_per_format():
    cfg = PRESETS["nsarm-8b"].transformer
    dense = memory_required(cfg, 1, torch.bfloat16)
    per_block_linear = 8 * cfg.embed_dim ** 2 + 2 * cfg.embed_dim * cfg.ffn_hidden
    other = dense.details["block_bytes"] - 2 * per_block_linear
    for name, f in weights.FORMATS.items():
        est = memory_required(cfg, 1, torch.bfloat16, weight_format=name)
        bits = weights.bits_per_weight(f, block_linear_shapes(cfg))
        assert est.details["block_bytes"] == other + round(per_block_linear * bits / 8)
        if f.quantized:  # the transient dequantised weight is part of the activations
            assert est.sampling_activations > dense.sampling_activations
    q8 = memory_required(cfg, 1, torch.bfloat16, weight_format="q8_0")
    assert math.isclose((q8.details["block_bytes"] - other) / (2 * per_block_linear), 8.5 / 16)
    assert memory_required(cfg, 1, torch.bfloat16, weight_format="fp8") == q8


def test_loader_node_offers_the_formats_and_loads_a_saved_fp8_value(tmp_path: Path, monkeypatch):
    """A workflow saved with weight_format "fp8" (per-tensor fp8, since removed) still loads: as q8_0."""
    from nsarm_nodes import runner
    from nsarm_nodes.testing import make_tiny_models

    files = make_tiny_models(tmp_path)
    monkeypatch.setenv("NSARM_MODELS_DIR", str(tmp_path))
    loader = runner.load_node_classes()["NSARMModelLoader"]
    offered = loader.INPUT_TYPES()["optional"]["weight_format"][0]
    assert list(offered) == list(options.WEIGHT_FORMATS)
    (model,) = loader().load(files["transformer"].name, files["vae"].name, "cached prompts only", "auto", "auto",
                             weight_format="fp8")
    transformer = model.pipeline.transformer
    assert transformer.weight_format == "q8_0"
    assert isinstance(transformer.blocks[0].ffn.fc1, weights.BlockQuantLinear)


def test_the_transformer_imports_neither_the_memory_estimate_nor_anything_importing_it():
    """The transformer is given its weight format (weights.py) and placement (placement.py); the
    memory estimate (lowvram.py) imports the transformer, never the other way round."""
    code = ("import sys, nsarm_nodes.transformer as t, nsarm_nodes.convert; "
            "m = nsarm_nodes.transformer.load_transformer; "
            "print(sorted(k for k in sys.modules if k.startswith('nsarm_nodes.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "nsarm_nodes.lowvram" not in out and "nsarm_nodes.bench" not in out
    assert "nsarm_nodes.weights" in out and "nsarm_nodes.placement" in out
    for module in ("weights", "placement"):
        source = (ROOT / "nsarm_nodes" / f"{module}.py").read_text()
        assert "from ." not in source and "import nsarm_nodes" not in source  # leaves of the import graph


def test_cli_and_folder_job_pick_the_formats_gguf_and_key_the_job_by_format(tmp_path: Path):
    """`upscale` / `upscale-dir --weight-format F` load models/nsarm/NSARM_F.gguf when it exists (no
    quantising at load), else the checkpoint; the folder job's key counts the format ("fp8" = q8_0)."""
    from nsarm_nodes.__main__ import build_parser
    from nsarm_nodes.folder_job import job_key, job_params
    from nsarm_nodes.pipeline import WEIGHTS, find_weight

    (tmp_path / "nsarm").mkdir()
    for name in ("NSARM.safetensors", "NSARM_q8_0.gguf"):
        (tmp_path / "nsarm" / name).write_bytes(b"x")
    (spec,) = [s for s in WEIGHTS if s.role == "transformer"]
    picked = {fmt: find_weight(tmp_path, spec, fmt).name for fmt in ("dense", "q8_0", "fp8", "q4_1")}
    assert picked == {"dense": "NSARM.safetensors", "q8_0": "NSARM_q8_0.gguf", "fp8": "NSARM_q8_0.gguf",
                      "q4_1": "NSARM.safetensors"}
    for command in (["upscale", "in.png", "-o", "out.png"], ["upscale-dir", "in", "out"]):
        args = build_parser().parse_args(command + ["--models", str(tmp_path), "--weight-format", "q8_0_mixed"])
        assert args.weight_format == "q8_0_mixed", command
    files = {"transformer": tmp_path / "nsarm" / "NSARM.safetensors"}
    keys = {fmt: job_key(job_params({}, 1, "auto", files, fmt)) for fmt in ("dense", "q8_0", "fp8", "q8_0_mixed")}
    assert keys["fp8"] == keys["q8_0"] and len({keys["dense"], keys["q8_0"], keys["q8_0_mixed"]}) == 3


def test_convert_refuses_non_finite_weights_naming_the_key(tmp_path: Path):
    """convert checks every tensor it writes as loading does: NaN in a weight it quantises, or in one
    it writes dense, is a CheckpointError naming the file and the key, and no output is left."""
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in read_checkpoint(CKPT).items()}
    for key, fmt, suffix in (("block_chunks.0.module.0.ffn.fc1.weight", "q8_0", ".gguf"),
                             ("block_chunks.0.module.0.ffn.fc1.weight", "bf16", ".safetensors"),
                             ("head.weight", "q8_0", ".gguf")):
        bad = dict(sd)
        bad[key] = sd[key].clone()
        bad[key].view(-1)[3] = float("nan")
        src = tmp_path / f"bad_{fmt}.safetensors"
        save_file(bad, str(src))
        out = tmp_path / f"out_{fmt}{suffix}"
        with pytest.raises(CheckpointError, match=rf"bad_{fmt}.safetensors: tensor {key} of the transformer holds 1 NaN"):
            convert_checkpoint(src, out, fmt)
        assert not out.exists() and not list(tmp_path.glob(f".out_{fmt}*"))
