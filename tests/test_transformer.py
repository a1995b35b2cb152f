"""Infinity transformer + NSARM sampler: golden parity, cache equivalence, batching, loading."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GOLDEN, KEYS, golden
from nsarm_nodes import CheckpointError
from nsarm_nodes.config import MapNetConfig, TransformerConfig
from nsarm_nodes.sampler import sample, sample_bits
from nsarm_nodes.schedule import scale_schedule, token_counts, token_offsets
from nsarm_nodes.transformer import Infinity, load_transformer

ATOL, RTOL = 1e-4, 1e-4  # hidden states, text path
LOGIT_ATOL, CHECKSUM_ATOL = 2e-4, 2e-3
TAU, TOP_P = 0.5, 0.97


@pytest.fixture(scope="module")
def model():
    return load_transformer(GOLDEN / "weights_transformer.safetensors")


def text_of(run):
    return run["kv_compact"], run["cu_seqlens_k"]


def lr_features():
    return golden("vae_encode")["h"]


def forced_of(run):
    return [run[f"bits_s{i}"] for i in range(13)]


class Recorder:
    """Forward hooks collecting inputs / outputs of modules, one entry per call."""

    def __init__(self):
        self.calls: dict[str, list] = {}
        self.handles = []

    def watch(self, name, module, what="out"):
        def hook(_m, args, out):
            self.calls.setdefault(name, []).append(args[0] if what == "in" else out)

        self.handles.append(module.register_forward_hook(hook))

    def close(self):
        for h in self.handles:
            h.remove()


def run_recorded(model, run, mode):
    rec = Recorder()
    rec.watch("inp", model.word_embed, "in")
    for j, block in enumerate(model.blocks):
        rec.watch(f"block_in_b{j}", block, "in")
        rec.watch(f"block_out_b{j}", block)
    b0 = model.blocks[0]
    for sub in ("sa", "ca", "ffn"):
        rec.watch(f"b0_{sub}_in", getattr(b0, sub), "in")
        rec.watch(f"b0_{sub}_out", getattr(b0, sub))
    try:
        area = golden("nsarm_run_area")  # the trilinear run reuses its text and bits
        res = sample(model, None, text_of(area), lr_features(), seed=1, forced_bits=forced_of(area),
                     return_logits=True, prefill=False, next_scale_mode=mode)
    finally:
        rec.close()
    return res, rec.calls


@pytest.fixture(scope="module")
def area_run(model):
    return run_recorded(model, golden("nsarm_run_area"), "area")


@pytest.fixture(scope="module")
def trilinear_run(model):
    return run_recorded(model, golden("nsarm_run_trilinear_tf"), "trilinear")


def test_loads_golden_checkpoint_with_inferred_config(model):
    c = model.cfg
    assert (c.depth, c.embed_dim, c.num_heads, c.block_chunks, c.ffn_hidden) == (2, 256, 2, 2, 256)
    assert (c.text_channels, c.pool_heads, c.codebook_dim, c.patchify, c.d_vae) == (256, 2, 14, True, 56)
    assert c.map_net is not None and c.map_net.hidden_dims == (8, 8, 16, 16, 16, 24, 32)
    sd = load_file(str(GOLDEN / "weights_transformer.safetensors"))
    ours = model.state_dict()
    assert set(ours) == set(sd)
    assert all(torch.equal(ours[k], sd[k]) for k in sd)


def test_text_path_matches_golden(model):
    t = golden("text_path")
    c = model.condition(t["kv_compact"], t["cu_seqlens_k"])
    assert torch.allclose(model.text_norm(t["kv_compact"]), t["kv_normed"], atol=ATOL, rtol=RTOL)
    assert torch.allclose(model.text_proj_for_ca(t["kv_normed"]), t["ca_kv"], atol=ATOL, rtol=RTOL)
    for name, ours in (("sos", c.sos), ("x_sos", c.x_sos), ("gss", c.gss)):
        assert torch.allclose(ours, t[name], atol=ATOL, rtol=RTOL), name
    for j, block in enumerate(model.blocks):
        assert torch.allclose(block.ada_gss + c.gss, t[f"ada_b{j}"], atol=ATOL, rtol=RTOL)
        kv = c.text_kv[j]
        assert kv.mask is None
        assert torch.allclose(kv.k[0].transpose(0, 1), t[f"ca_k_b{j}"], atol=ATOL, rtol=RTOL)
        assert torch.allclose(kv.v[0].transpose(0, 1), t[f"ca_v_b{j}"], atol=ATOL, rtol=RTOL)
    scale, shift = model.head_nm.ada_lin(c.sos).view(-1, 1, 2, 256).unbind(2)
    assert torch.allclose(scale, t["head_scale"], atol=ATOL) and torch.allclose(shift, t["head_shift"], atol=ATOL)


def test_two_prompts_attend_only_to_their_own_tokens(model):
    t = golden("text_path")
    c = model.condition(t["two_kv_compact"], t["two_cu_seqlens_k"])
    assert torch.allclose(c.sos, t["two_sos"], atol=ATOL, rtol=RTOL)
    assert c.text_kv[0].mask is not None and c.text_kv[0].mask.sum().item() == 11
    out = model.blocks[0].ca(t["two_q"], c.text_kv[0])
    assert torch.allclose(out, t["two_ca_out_b0"], atol=ATOL, rtol=RTOL)


def check_run(res, calls, run, n_full_rows_scales=range(13)):
    w112, w56 = run["checksum_w112"], run["checksum_w56"]
    for si in n_full_rows_scales:
        rows, lg = run[f"rows_s{si}"], res.logits[si][0]
        assert torch.allclose(lg[rows], run[f"logits_s{si}"][0], atol=LOGIT_ATOL, rtol=RTOL), si
        assert torch.allclose(lg.sum(-1), run[f"logits_rowsum_s{si}"][0], atol=CHECKSUM_ATOL), si
        assert torch.allclose(lg @ w112, run[f"logits_roww_s{si}"][0], atol=CHECKSUM_ATOL), si
        if si >= 1:
            inp = calls["inp"][si - 1][0]
            assert torch.allclose(inp[rows], run[f"inp_s{si}"][0], atol=LOGIT_ATOL, rtol=RTOL), si
            assert torch.allclose(inp.sum(-1), run[f"inp_rowsum_s{si}"][0], atol=CHECKSUM_ATOL)
            assert torch.allclose(inp @ w56, run[f"inp_roww_s{si}"][0], atol=CHECKSUM_ATOL)
    for si in range(3):
        assert torch.allclose(calls["block_in_b0"][si], run[f"block_in_s{si}"], atol=ATOL, rtol=RTOL)
        for j in range(2):
            assert torch.allclose(calls[f"block_out_b{j}"][si], run[f"block_out_s{si}_b{j}"], atol=ATOL, rtol=RTOL)
    for si in range(2):
        for sub in ("sa", "ca", "ffn"):
            for io in ("in", "out"):
                ours = calls[f"b0_{sub}_{io}"][si]
                assert torch.allclose(ours, run[f"b0_{sub}_{io}_s{si}"], atol=ATOL, rtol=RTOL), (sub, io, si)


def test_area_run_teacher_forced_matches_golden(area_run):
    run = golden("nsarm_run_area")
    res, calls = area_run
    check_run(res, calls, run)
    for si in range(13):
        assert torch.equal(res.bits[si], run[f"bits_s{si}"]), si
    assert torch.allclose(res.summed_codes, run["summed_codes"], atol=2e-4)


def test_trilinear_run_teacher_forced_matches_golden(trilinear_run):
    run = golden("nsarm_run_trilinear_tf")
    res, calls = trilinear_run
    check_run(res, calls, run)
    assert torch.allclose(res.summed_codes, golden("nsarm_run_area")["summed_codes"], atol=2e-4)


def test_replaced_scales_come_from_the_transformation_network(model):
    run = golden("nsarm_run_area")
    res = sample(model, None, text_of(run), lr_features(), seed=123, schedule=scale_schedule(1.0, "0.06M"))
    assert len(res.bits) == 7
    for si in range(7):
        assert torch.equal(res.bits[si], run[f"bits_s{si}"]), si


def test_top_p_decided_bits_match_golden_whatever_the_random_numbers(area_run):
    run = golden("nsarm_run_area")
    res, _ = area_run
    decided_total = 0
    for si in range(7, 13):
        lg = res.logits[si] / TAU  # [1, L, 112]
        l0, l1 = lg[..., 0::2], lg[..., 1::2]
        decided = (l1 - l0).abs() > math.log(TOP_P / (1 - TOP_P)) + 1e-3
        for seed in (0, 1):
            bits = sample_bits(lg, TOP_P, [torch.Generator().manual_seed(seed)])
            assert torch.equal(bits[decided], run[f"bits_s{si}"][decided]), si
        decided_total += decided.sum().item()
    n = sum(token_counts(scale_schedule())[7:]) * 56
    assert 0.3 < decided_total / n < 0.7  # the fixture's design: about half are decided


def test_sample_bits_follows_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(1, 20000, 2)
    logits[..., 1] = math.log(0.8 / 0.2)  # p1 = 0.8, not decided by top-p 0.97
    bits = sample_bits(logits, TOP_P, [g])
    assert abs(bits.float().mean().item() - 0.8) < 0.02


def test_prefill_path_equals_step_by_step_path(model, area_run):
    run = golden("nsarm_run_area")
    ref, _ = area_run
    fast = sample(model, None, text_of(run), lr_features(), seed=1, forced_bits=forced_of(run),
                  return_logits=True, prefill=True)
    for a, b in zip(ref.logits, fast.logits):
        assert torch.allclose(a, b, atol=LOGIT_ATOL, rtol=RTOL)
    assert torch.allclose(ref.summed_codes, fast.summed_codes, atol=1e-6)
    unforced = [sample(model, None, text_of(run), lr_features(), seed=7, prefill=p,
                       schedule=scale_schedule(1.0, "0.25M")) for p in (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(unforced[0].bits, unforced[1].bits))


def test_kv_cached_loop_equals_full_block_causal_forward(model):
    run = golden("nsarm_run_area")
    schedule = scale_schedule(1.0, "0.25M")  # 10 scales, 2137 tokens: the full pass stays cheap
    rec = Recorder()
    rec.watch("x", model.blocks[0], "in")
    try:
        res = sample(model, None, text_of(run), lr_features(), seed=3, schedule=schedule,
                     return_logits=True, prefill=False)
    finally:
        rec.close()
    x = torch.cat(rec.calls["x"], dim=1)  # block-0 inputs of every scale, [1, N, C]
    counts, n = token_counts(schedule), sum(token_counts(schedule))
    scale_id = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    mask = scale_id[:, None] >= scale_id[None, :]
    cond = model.condition(*text_of(run))
    cos, sin = model.rope(schedule, "cpu")
    hidden = model.forward_blocks(x, cond, cos[:n], sin[:n], caches=None, mask=mask)
    logits = model.logits(hidden, cond.sos)
    for si, o in enumerate(token_offsets(schedule)):
        assert torch.allclose(logits[:, o:o + counts[si]], res.logits[si], atol=LOGIT_ATOL, rtol=RTOL), si


def test_batch_items_are_independent(model):
    run = golden("nsarm_run_area")
    h = lr_features()
    h2 = h.flip(-1) + 0.05 * torch.randn(h.shape, generator=torch.Generator().manual_seed(0))
    t = golden("text_path")
    two = (t["two_kv_compact"], t["two_cu_seqlens_k"])
    one_a = (t["two_kv_compact"][:7], torch.tensor([0, 7], dtype=torch.int32))
    one_b = (t["two_kv_compact"][7:], torch.tensor([0, 4], dtype=torch.int32))
    schedule = scale_schedule(1.0, "0.25M")
    both = sample(model, None, two, torch.cat([h, h2]), seed=11, schedule=schedule)
    alone = [sample(model, None, txt, f, seed=11, schedule=schedule) for txt, f in ((one_a, h), (one_b, h2))]
    for b in range(2):
        assert torch.allclose(both.summed_codes[b], alone[b].summed_codes[0], atol=1e-6)
        assert all(torch.equal(x[b], y[0]) for x, y in zip(both.bits, alone[b].bits))
    # one prompt broadcast over two LR images, per-item seeds
    bc = sample(model, None, text_of(run), torch.cat([h, h2]), seed=[11, 12], schedule=schedule)
    assert not torch.equal(bc.bits[-1][0], bc.bits[-1][1])


def test_cfg_mixes_tempered_logits_of_cond_and_uncond(model):
    run = golden("nsarm_run_area")
    forced = forced_of(run)[:10]
    schedule = scale_schedule(1.0, "0.25M")
    kw = dict(seed=0, forced_bits=forced, return_logits=True, schedule=schedule)
    mixed = sample(model, None, text_of(run), lr_features(), cfg=3.0, **kw)
    cond = sample(model, None, text_of(run), lr_features(), **kw)
    unc_text = (model.cfg_uncond[:7].detach().clone(), run["cu_seqlens_k"])
    uncond = sample(model, None, unc_text, lr_features(), **kw)
    for si in range(10):
        want = 3.0 * cond.logits[si] - 2.0 * uncond.logits[si]
        assert torch.allclose(mixed.logits[si], want, atol=1e-3, rtol=1e-4), si
    neg = sample(model, None, text_of(run), lr_features(), cfg=3.0, negative_text=unc_text, **kw)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(neg.logits, mixed.logits))


def keys_of(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (KEYS / name).read_text().splitlines():
        key, shape, _ = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def tiny_real_layout(map_net: bool, d: int = 14, patchify: bool = True) -> Infinity:
    """Real 8B/2B structure (40/32 blocks in 8 chunks, 7-branch map net with the real layer counts)
    at tiny widths."""
    map_cfg = MapNetConfig(trunk_channels=(4, 4), hidden_dims=(8, 8, 8, 8, 8, 12, 16),
                           num_layers=(4, 6, 8, 10, 12, 14, 16), num_heads=(4, 4, 8, 8, 8, 12, 16))
    cfg = TransformerConfig(depth=40 if map_net or patchify else 32, embed_dim=128, num_heads=1,
                            ffn_hidden=128, text_channels=128, text_maxlen=512, block_chunks=8,
                            codebook_dim=d, patchify=patchify, pool_heads=1,
                            map_net=map_cfg if map_net else None)
    torch.manual_seed(0)
    return Infinity(cfg)


@pytest.mark.parametrize("keyfile,map_net,d,patchify", [
    ("nsarm_8b_keys.txt", True, 14, True),
    ("infinity_8b_keys.txt", False, 14, True),
    ("infinity_2b_keys.txt", False, 32, False),
])
def test_real_key_layouts_load_strictly(tmp_path: Path, keyfile, map_net, d, patchify):
    real = keys_of(keyfile)
    model = tiny_real_layout(map_net, d, patchify)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert set(sd) == set(real)
    for k, shape in real.items():  # same rank everywhere; the head/word_embed widths are exact
        assert len(sd[k].shape) == len(shape), k
    assert sd["word_embed.weight"].shape[1] == real["word_embed.weight"][1]
    assert sd["head.weight"].shape[0] == real["head.weight"][0]
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    loaded = load_transformer(path)
    assert loaded.cfg == model.cfg
    assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd)


def test_pth_checkpoint_without_zero_k_bias_and_long_cfg_uncond(tmp_path: Path, model):
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("zero_k_bias")}
    sd["cfg_uncond"] = torch.cat([sd["cfg_uncond"], torch.randn(600, 256)])
    path = tmp_path / "NSARM.pth"
    torch.save(sd, path)
    loaded = load_transformer(path, dtype=torch.bfloat16)
    assert loaded.cfg_uncond.shape[0] == 512
    assert loaded.blocks[0].sa.mat_qkv.weight.dtype == torch.bfloat16
    assert loaded.head.weight.dtype == torch.float32 and loaded.map_net.output_projs[0][0].weight.dtype == torch.float32
    assert torch.count_nonzero(loaded.blocks[1].sa.zero_k_bias) == 0


def test_bf16_blocks_stay_close_to_float32(model):
    run = golden("nsarm_run_area")
    sd = model.state_dict()
    bf = load_transformer(sd, dtype=torch.bfloat16)
    kw = dict(seed=1, forced_bits=forced_of(run)[:10], return_logits=True, schedule=scale_schedule(1.0, "0.25M"))
    a = sample(model, None, text_of(run), lr_features(), **kw)
    b = sample(bf, None, text_of(run), lr_features(), **kw)
    for x, y in zip(a.logits, b.logits):
        assert (x - y).abs().max() < 0.05 * x.abs().max()


def test_bad_inputs_give_clear_errors(tmp_path: Path, model):
    with pytest.raises(CheckpointError, match="weights_vae.*not an Infinity/NSARM transformer"):
        load_transformer(GOLDEN / "weights_vae.safetensors")
    sd = dict(model.state_dict())
    sd["head.weight"] = torch.zeros(10, 256)
    with pytest.raises(CheckpointError, match="head.weight"):
        load_transformer(sd)
    plain = {k: v for k, v in model.state_dict().items() if not k.startswith("map_transformer.")}
    infinity = load_transformer(plain)
    assert infinity.map_net is None
    run = golden("nsarm_run_area")
    with pytest.raises(ValueError, match="no transformation network"):
        sample(infinity, None, text_of(run), lr_features(), seed=0)

    class FakeVAE:
        class quantizer:
            codebook_dim = 32

    with pytest.raises(ValueError, match="wrong model pair"):
        sample(model, FakeVAE(), text_of(run), lr_features(), seed=0)
    with pytest.raises(ValueError, match="next_scale_mode"):
        sample(model, None, text_of(run), lr_features(), seed=0, next_scale_mode="bicubic")


def test_seeds_past_2_64_wrap_instead_of_overflowing(model):
    """Tile i uses seed + i, so a seed at the widget maximum (2^64 - 1) must not overflow."""
    run = golden("nsarm_run_area")
    schedule = scale_schedule(1.0, "0.25M")
    two = torch.cat([lr_features(), lr_features()])
    big = sample(model, None, text_of(run), two, seed=[2**64 - 1, 2**64 + 4], schedule=schedule)
    wrapped = sample(model, None, text_of(run), two, seed=[2**64 - 1, 4], schedule=schedule)
    assert all(torch.equal(a, b) for a, b in zip(big.bits, wrapped.bits))
