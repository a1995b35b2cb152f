"""Speed and memory: sync-free scale loop, flash-compatible attention calls, lazy loading, the
convert command, block swapping, the memory estimate and the bench command.

Everything runs on the CPU; GPU-only properties are checked through what decides them on a GPU
(SDPA argument dtypes / shapes / masks, no host reads in the loop) and by `bench` on a GPU.
"""
from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import GOLDEN, golden
from nsarm_nodes import CheckpointError
from nsarm_nodes.config import PRESETS, TransformerConfig
from nsarm_nodes.loading import LazyEntry, LazyStateDict, read_checkpoint, write_safetensors
from nsarm_nodes.lowvram import TensorMemoryTracker, estimate_for, memory_required, offload_text_and_map_for
from nsarm_nodes.placement import ModuleSwapper
from nsarm_nodes.sampler import sample
from nsarm_nodes.transformer import Infinity, load_transformer
from nsarm_nodes.vae import load_vae

ROOT = Path(__file__).resolve().parents[1]
TAU, TOP_P = 0.5, 0.97
ESTIMATE_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def model():
    return load_transformer(GOLDEN / "weights_transformer.safetensors")


def run_inputs():
    run = golden("nsarm_run_area")
    return (run["kv_compact"], run["cu_seqlens_k"]), golden("vae_encode")["h"], [run[f"bits_s{i}"] for i in range(13)]


# ---------------------------------------------------------------------------------------------
# 1. Fast path: no host-device syncs in the scale loop, flash-compatible SDPA calls

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
            "unique_consecutive", "equal", "is_nonzero", "repeat_interleave", "item"}


class SyncTrap(torch.utils._python_dispatch.TorchDispatchMode):
    """Records aten ops that read data back to the host (or have data-dependent output shapes,
    which sync on CUDA), while `armed`."""

    def __init__(self):
        super().__init__()
        self.armed = False
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.armed:
            name = func.overloadpacket.__name__
            bool_index = name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or ())
            if name in SYNC_OPS or bool_index:
                self.hits.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("prefill,cfg,weight_format", [(True, 1.0, "dense"), (False, 1.0, "dense"), (True, 3.0, "dense"),
                                                      (True, 1.0, "q5_1")])
def test_scale_loop_never_reads_tensors_back_to_the_host(model, monkeypatch, prefill, cfg, weight_format):
    if weight_format != "dense":  # block-quantised weights are dequantised in the loop: no sync either
        model = load_transformer(GOLDEN / "weights_transformer.safetensors", weight_format=weight_format)
    text, h, _ = run_inputs()
    trap = SyncTrap()
    py_hits: list[str] = []

    def forbid(name, original):
        def wrapper(*a, **k):
            if trap.armed:
                py_hits.append(name)
            return original(*a, **k)
        return wrapper

    for name in ("tolist", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbid(name, getattr(torch.Tensor, name)))
    for name in ("tensor", "as_tensor"):  # host -> device copies of Python data
        monkeypatch.setattr(torch, name, forbid(f"torch.{name}", getattr(torch, name)))
    calls = []

    def progress(si, n):  # armed from the first progress call (after the prefill / scale 0) to the last
        calls.append(si)
        trap.armed = si < n - 1

    with trap:
        res = sample(model, None, text, h, seed=3, cfg=cfg, prefill=prefill, progress=progress)
    assert calls == list(range(13)) and len(res.bits) == 13
    assert trap.hits == [] and py_hits == [], (trap.hits, py_hits)


def test_non_finite_logits_guard_reads_back_once_after_the_loop(model, monkeypatch):
    """The guard's per-scale flags stay on the device; after the last scale they are read once."""
    text, h, _ = run_inputs()
    trap = SyncTrap()
    reads: list[str] = []
    original = torch.Tensor.tolist

    def tolist(t):
        if trap.armed:
            reads.append(f"tolist {tuple(t.shape)} {t.dtype}")
        return original(t)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with trap:
        sample(model, None, text, h, seed=3, progress=lambda si, n: setattr(trap, "armed", si == n - 1))
    assert reads == ["tolist (13,) torch.bool"] and trap.hits == [], (reads, trap.hits)


def test_sdpa_calls_in_the_scale_loop_fit_the_flash_kernel(model, monkeypatch):
    """Flash attention needs q, k, v of one 16-bit dtype, head_dim <= 256 (128 here) and a
    multiple of 8, a contiguous last axis, and no attention mask."""
    bf = load_transformer(model.state_dict(), dtype=torch.bfloat16)
    text, h, _ = run_inputs()
    seen = []
    armed = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        if armed:
            seen.append((q.dtype, k.dtype, v.dtype, q.shape[-1], attn_mask is None,
                         q.stride(-1), k.stride(-1), v.stride(-1), q.shape[-2], k.shape[-2]))
        return original(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    sample(bf, None, text, h, seed=0, progress=lambda si, n: armed.append(si))
    assert len(seen) == 6 * 2 * 2  # scales 7..12, 2 blocks, self + cross attention
    for qd, kd, vd, hd, no_mask, *strides, lq, lk in seen:
        assert qd == kd == vd == torch.bfloat16
        assert hd == 128 and no_mask and strides == [1, 1, 1]
    # the last scale attends to every token: the full 10,521 (its own K/V are not stored)
    assert max(s[-1] for s in seen) == 10521


# ---------------------------------------------------------------------------------------------
# 2. Loading without memory spikes; the convert command


def counted(sd: LazyStateDict):
    """The same lazy state dict, counting how many tensors it handed out are alive at once."""
    stats = {"live": 0, "max": 0, "reads": 0}

    def wrap(load):
        def read():
            t = load()
            stats["live"] += 1
            stats["reads"] += 1
            stats["max"] = max(stats["max"], stats["live"])
            weakref.finalize(t, lambda: stats.__setitem__("live", stats["live"] - 1))
            return t
        return read

    return sd.with_entries({k: LazyEntry(wrap(sd.entry(k).load), sd.shape(k), sd.dtype(k)) for k in sd}), stats


def test_safetensors_load_reads_one_tensor_at_a_time(model):
    sd = read_checkpoint(GOLDEN / "weights_transformer.safetensors")
    assert isinstance(sd, LazyStateDict)
    assert sd.shape("head.weight") == (112, 256) and sd.dtype("head.weight") == torch.float32
    lazy, stats = counted(sd)
    loaded = load_transformer(lazy, dtype=torch.bfloat16)
    assert stats["max"] <= 2, stats  # one tensor being converted (+ one shape probe of the map net)
    assert stats["reads"] < len(sd) + 40
    ref = load_transformer(model.state_dict(), dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


@pytest.mark.parametrize("with_index", [True, False])
def test_sharded_safetensors_load_lazily(tmp_path: Path, model, with_index):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    if with_index:
        index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    lazy = read_checkpoint(tmp_path)
    assert isinstance(lazy, LazyStateDict) and set(lazy) == set(sd)
    loaded = load_transformer(tmp_path)
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())


def test_broken_safetensors_give_clear_errors(tmp_path: Path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.ones(3)}, str(good))
    data = good.read_bytes()
    cases = {"truncated.safetensors": data[:-100], "tiny.safetensors": data[:5],
             "garbage.safetensors": data[:8] + b"{not json" + data[17:]}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match=rf"{name}: not a readable \.safetensors file \(truncated or corrupt"):
            read_checkpoint(tmp_path / name)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    (shard_dir / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        read_checkpoint(shard_dir)


def test_loading_peak_rss_is_about_one_copy_of_the_loaded_model(tmp_path: Path):
    """A 200 MB fp32 file loaded as bf16 blocks: the process grows by the bf16 model (+ one tensor
    and allocator slack), not by the file (a whole-file read grows by file + model, ~3x more)."""
    cfg = TransformerConfig(depth=12, embed_dim=512, num_heads=4, ffn_hidden=2048, text_channels=128,
                            text_maxlen=16, block_chunks=4, pool_heads=1, map_net=None)
    torch.manual_seed(0)
    sd = {k: torch.randn(v.shape) * 0.02 for k, v in Infinity(cfg).state_dict().items()}
    path = tmp_path / "wide.safetensors"
    save_file(sd, str(path))
    size = path.stat().st_size
    script = f"""
import torch
from nsarm_nodes.transformer import load_transformer
from nsarm_nodes.bench import current_rss_bytes, peak_rss_bytes, reset_peak_rss
load_transformer({str(GOLDEN / "weights_transformer.safetensors")!r}, dtype=torch.bfloat16)  # warm: code pages
before = current_rss_bytes(); reset_peak_rss()
m = load_transformer({str(path)!r}, dtype=torch.bfloat16)
kept = sum(t.numel() * t.element_size() for t in m.state_dict().values())
print(peak_rss_bytes() - before, kept)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    grown, kept = map(int, out.stdout.split())
    assert kept < 0.6 * size
    assert grown < kept + 0.25 * size, (grown / 1e6, kept / 1e6, size / 1e6)


def test_write_safetensors_streams_and_round_trips(tmp_path: Path):
    tensors = {"f32": torch.randn(5, 7), "bf16": torch.randn(300).to(torch.bfloat16), "empty": torch.zeros(0, 4),
               "fp8": torch.randn(8, 8).to(torch.float8_e4m3fn), "i64": torch.arange(6), "u8": torch.ones(3, dtype=torch.uint8)}
    live = {"n": 0, "max": 0}

    def entry(t):
        def load():
            live["n"] += 1
            live["max"] = max(live["max"], live["n"])
            c = t.clone()
            weakref.finalize(c, lambda: live.__setitem__("n", live["n"] - 1))
            return c
        return LazyEntry(load, tuple(t.shape), t.dtype)

    path = tmp_path / "out.safetensors"
    write_safetensors(path, {k: entry(t) for k, t in tensors.items()}, {"who": "test"})
    assert live["max"] == 1
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["who"] == "test"
        for k, t in tensors.items():
            assert torch.equal(f.get_tensor(k).view(torch.uint8), t.view(torch.uint8)), k
    back = read_checkpoint(path)
    assert all(torch.equal(back[k].view(torch.uint8), t.view(torch.uint8)) for k, t in tensors.items())
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)
    with pytest.raises(FileExistsError):
        write_safetensors(path, {"a": entry(torch.ones(1))})
    bad = {"a": LazyEntry(lambda: torch.ones(2), (3,), torch.float32)}
    with pytest.raises(ValueError, match="declared"):
        write_safetensors(tmp_path / "bad.safetensors", bad)
    assert not (tmp_path / "bad.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_convert_cli_writes_bf16_blocks_fp32_rest(tmp_path: Path, model):
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("zero_k_bias")}  # as upstream
    src = tmp_path / "NSARM.pth"
    torch.save(sd, src)
    out = tmp_path / "NSARM_bf16.safetensors"
    cmd = [sys.executable, "-m", "nsarm_nodes", "convert", str(src), "--dtype", "bf16", "-o", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr
    assert "verified" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, cwd=ROOT).returncode == 0
    lazy = read_checkpoint(out)
    assert lazy.dtype("block_chunks.1.module.0.ffn.fc1.weight") == torch.bfloat16
    assert lazy.dtype("head.weight") == torch.float32 and lazy.dtype("map_transformer.feature_extractor.0.weight") == torch.float32
    assert "block_chunks.0.module.0.sa.zero_k_bias" in lazy
    a = load_transformer(src, dtype=torch.bfloat16).state_dict()
    b = load_transformer(out, dtype=torch.bfloat16).state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    bad = subprocess.run([sys.executable, "-m", "nsarm_nodes", "convert", str(GOLDEN / "weights_vae.safetensors"),
                          "-o", str(tmp_path / "x.safetensors")], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "not an Infinity/NSARM transformer" in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# 3. Low VRAM: block swapping (block-quantised weights: tests/test_weights.py)


@pytest.mark.parametrize("weight_format", ["dense", "q8_0"])
def test_block_swapping_gives_identical_results(model, weight_format):
    text, h, _ = run_inputs()
    plain = load_transformer(GOLDEN / "weights_transformer.safetensors", weight_format=weight_format)
    swapped = load_transformer(GOLDEN / "weights_transformer.safetensors", weight_format=weight_format,
                               blocks_on_cpu=2, offload_text_and_map=True)
    assert swapped.swapper is not None and len(swapped.swapper.modules) == 2
    for prefill in (True, False):
        a = sample(plain, None, text, h, seed=5, prefill=prefill)
        b = sample(swapped, None, text, h, seed=5, prefill=prefill)
        assert torch.equal(a.summed_codes, b.summed_codes)
        assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits))
    assert swapped.swapper.max_resident == 2 and swapped.swapper.loads > 0
    assert swapped.offloader.loads > 0
    key = "block_chunks.1.module.0.ffn.fc2." + ("weight" if weight_format == "dense" else "packed")
    assert torch.equal(swapped.state_dict()[key], plain.state_dict()[key])


def test_swapped_modules_are_only_used_while_resident(model):
    """Parked on the meta device between uses, any access outside residency would fail."""
    text, h, _ = run_inputs()
    ref = sample(model, None, text, h, seed=2, cfg=2.0)
    m = load_transformer(model.state_dict())
    m.swapper = ModuleSwapper(m.blocks, "cpu", park_on_meta=True)
    names = ("text_norm", "text_proj_for_sos", "text_proj_for_ca", "shared_ada_lin", "map_transformer")
    m.offloader = ModuleSwapper([getattr(m, n) for n in names], "cpu", hooks=False, prefetch=False, park_on_meta=True)
    m.offloader.add_hooks(m.map_transformer)
    assert m.blocks[1].ffn.fc1.weight.is_meta and m.map_transformer.feature_extractor[0].weight.is_meta
    got = sample(m, None, text, h, seed=2, cfg=2.0)
    assert torch.equal(ref.summed_codes, got.summed_codes)
    assert m.swapper.max_resident <= 2 and m.blocks[0].sa.mat_qkv.weight.is_meta
    m.swapper.remove()
    assert not m.blocks[0].sa.mat_qkv.weight.is_meta


def test_low_vram_options_are_validated():
    with pytest.raises(ValueError, match="weight_format"):
        load_transformer(GOLDEN / "weights_transformer.safetensors", weight_format="int4")
    with pytest.raises(ValueError, match="blocks_on_cpu"):
        load_transformer(GOLDEN / "weights_transformer.safetensors", blocks_on_cpu=3)


# ---------------------------------------------------------------------------------------------
# 5. Memory estimate vs measured tensor memory (CPU, tiny model)


def weight_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())


@pytest.mark.parametrize("dtype,batch,cfg", [(torch.float32, 1, 1.0), (torch.bfloat16, 1, 1.0), (torch.bfloat16, 2, 3.0)])
def test_memory_estimate_matches_measured_peak_within_15_percent(dtype, batch, cfg):
    text, h, _ = run_inputs()
    m = load_transformer(GOLDEN / "weights_transformer.safetensors", dtype=None if dtype == torch.float32 else dtype)
    feats = h.repeat(batch, 1, 1, 1)
    tracker = TensorMemoryTracker()
    with tracker:
        res = sample(m, None, text, feats, seed=1, cfg=cfg)
    est = estimate_for(m, None, batch, cfg_scale=cfg, text_tokens=text[0].shape[0])
    assert abs(est.sampling - tracker.peak) <= ESTIMATE_TOLERANCE * tracker.peak, (est.sampling, tracker.peak)
    if batch == 1 and dtype == torch.float32:  # the decode phase and the total, once
        vae = load_vae(GOLDEN / "weights_vae.safetensors")
        dec = TensorMemoryTracker()
        with dec, torch.no_grad():
            z = res.summed_codes.clone()
            vae.decode(z)
        full = estimate_for(m, vae, 1, text_tokens=text[0].shape[0])
        assert abs(full.decode - dec.peak) <= ESTIMATE_TOLERANCE * dec.peak, (full.decode, dec.peak)
        measured = weight_bytes(m, vae) + max(tracker.peak, dec.peak)
        assert abs(full.peak - measured) <= ESTIMATE_TOLERANCE * measured
        assert full.inference == full.peak - full.weights


def test_memory_estimate_of_nsarm_8b_matches_the_documented_figures():
    cfg = PRESETS["nsarm-8b"].transformer
    est = memory_required(cfg, 1, torch.bfloat16)
    assert est.kv_cache == 40 * 2 * 6425 * 3584 * 2  # bf16 K and V, last scale not stored
    blocks = 40 * est.details["block_bytes"]
    assert abs(blocks / 1e9 - 16.45) < 0.01  # 8,223,560,800 block parameters in bf16
    assert abs(est.transformer_weights - blocks - (509_929_200 + 27_409_008) * 4) < 1e6
    q8 = memory_required(cfg, 1, torch.bfloat16, weight_format="q8_0")
    assert q8.details["block_bytes"] < 0.54 * est.details["block_bytes"]  # 8.5 bits/weight
    swap = memory_required(cfg, 1, torch.bfloat16, blocks_on_cpu=30, offload_text_and_map=True)
    assert swap.details["resident_blocks"] == 12
    assert memory_required(cfg, 2, torch.bfloat16).kv_cache == 2 * est.kv_cache
    assert memory_required(cfg, 1, torch.bfloat16, cfg_scale=3.0).kv_cache == 2 * est.kv_cache


def test_offload_policy_and_the_8b_default_peak_for_one_tile():
    """One policy: offload the once-per-sample modules on an accelerator, never on the CPU, never
    when asked not to; with it the 8B default (bf16, all blocks resident, one 1024^2 tile) fits 22 GB."""
    assert offload_text_and_map_for("cuda") and offload_text_and_map_for("cuda:1", True)
    assert not offload_text_and_map_for("cuda", False)
    assert not offload_text_and_map_for("cpu") and not offload_text_and_map_for(torch.device("cpu"), True)
    cfg = PRESETS["nsarm-8b"].transformer
    default = memory_required(cfg, 1, torch.bfloat16, offload_text_and_map=offload_text_and_map_for("cuda"))
    resident = memory_required(cfg, 1, torch.bfloat16)
    assert default.peak <= 22e9 < resident.peak, (default.peak, resident.peak)
    assert resident.transformer_weights - default.transformer_weights == resident.details["once_bytes"]


# ---------------------------------------------------------------------------------------------
# 4. The bench command
# ---------------------------------------------------------------------------------------------
# 4. The bench command


def test_bench_cli_prints_stage_times_throughput_and_memory(tmp_path: Path):
    report = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "nsarm_nodes", "bench", "--preset", "tiny", "--pn", "0.25M", "--warmup", "0",
           "--repeats", "1", "--json", str(report)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("[single / fast]", "[single / reference]", "vae_encode", "map_network", "scales 0-6", "scale 7",
                   "scale 9", "vae_decode", "colour_fix", "tokens/s", "peak memory", "peak_rss_GB",
                   "estimate (lowvram.memory_required)", "reference / fast (single)"):
        assert needle in text, needle
    data = json.loads(report.read_text())
    assert {r["path"] for r in data["results"]} == {"fast", "reference"}
    for r in data["results"]:
        assert r["output"] == "512x512" and r["tokens_per_s"] > 0 and r["peak"]["peak_rss_GB"] > 0
        assert all(v >= 0 for v in r["stages_s"].values())


def test_bench_refuses_nsarm_8b_on_cpu():
    out = subprocess.run([sys.executable, "-m", "nsarm_nodes", "bench", "--preset", "nsarm-8b", "--random-weights",
                          "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr and "--allow-cpu" in out.stderr
    out = subprocess.run([sys.executable, "-m", "nsarm_nodes", "bench", "--preset", "nsarm-8b", "--random-weights",
                          "--device", "cpu", "--allow-cpu"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "reduced schedule" in out.stderr
