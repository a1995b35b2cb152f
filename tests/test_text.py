"""Text path: Flan-T5 wrapper, packed prompt features, on-disk prompt cache.

A tiny random T5 (d_model 32) and a tiny Unigram T5 tokenizer are built at test time and saved
in the Hugging Face folder layout, so no download is ever needed.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from nsarm_nodes import text as text_mod
from nsarm_nodes.config import DEFAULT_PROMPT
from nsarm_nodes.testing import build_tiny_t5
from nsarm_nodes.text import (
    MAX_TEXT_TOKENS,
    PromptCache,
    PromptEmbeds,
    PromptNotCachedError,
    T5TextEncoder,
    TextEncoderError,
    encode_prompts,
)

PROMPTS = [DEFAULT_PROMPT, "a cat", "", "A sharp photo of a dog on the grass, rich colors!"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-flan-t5")
    build_tiny_t5(folder, d_model=32)
    return folder


@pytest.fixture(scope="module")
def encoder(t5_dir) -> T5TextEncoder:
    return T5TextEncoder(t5_dir, device="cpu")


@pytest.fixture(scope="module")
def reference(t5_dir):
    """Upstream-style encoding: padding='max_length' (512), attention mask, first len_i rows."""
    from transformers import AutoTokenizer, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(str(t5_dir), legacy=True, local_files_only=True)
    model = T5EncoderModel.from_pretrained(str(t5_dir), local_files_only=True).eval()

    def run(prompts: list[str]) -> list[torch.Tensor]:
        t = tok(prompts, max_length=512, padding="max_length", truncation=True, return_tensors="pt")
        with torch.no_grad():
            h = model(input_ids=t.input_ids, attention_mask=t.attention_mask).last_hidden_state.float()
        return [h[i, : int(n)] for i, n in enumerate(t.attention_mask.sum(-1))]

    run.tokenizer = tok
    return run


class CountingEncoder:
    """Wraps an encoder and records every encode call."""

    def __init__(self, inner, identity: str | None = None):
        self.inner = inner
        self.identity = identity or inner.identity
        self.calls: list[list[str]] = []

    def encode(self, prompts):
        self.calls.append(list(prompts))
        return self.inner.encode(prompts)


def _files(d: Path) -> list[str]:
    return sorted(os.listdir(d)) if d.exists() else []


# ------------------------------------------------------------------------------------------------
# Encoder
# ------------------------------------------------------------------------------------------------
def test_lazy_and_fp32_on_cpu(t5_dir):
    enc = T5TextEncoder(t5_dir, device="cpu")
    assert not enc.loaded and enc.dtype == torch.float32 and enc.d_model == 32
    assert enc.identity.startswith(t5_dir.name + ":")
    assert enc.identity == T5TextEncoder(t5_dir, device="cpu").identity
    enc.encode(["a"])
    assert enc.loaded
    enc.unload()
    assert not enc.loaded


def test_fp16_keeps_t5_fp32_modules(t5_dir, encoder):
    """Like the reference's from_pretrained(torch_dtype=float16): T5's `wo` layers stay fp32."""
    enc = T5TextEncoder(t5_dir, device="cpu", dtype=torch.float16)
    emb = enc.encode([DEFAULT_PROMPT])
    dtypes = {n: p.dtype for n, p in enc._model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if n.endswith(".wo.weight"))
    assert dtypes["shared.weight"] == torch.float16
    assert emb.kv_compact.dtype == torch.float32
    torch.testing.assert_close(emb.kv_compact, encoder.encode([DEFAULT_PROMPT]).kv_compact, atol=2e-2, rtol=2e-2)


def test_eos_kept_padding_dropped(encoder, reference):
    emb = encoder.encode(PROMPTS)
    tok = reference.tokenizer
    n_tokens = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert all(tok(p)["input_ids"][-1] == tok.eos_token_id for p in PROMPTS)
    # lengths = tokens + EOS, i.e. the attention-mask sum, no padding rows
    assert emb.lengths == tuple(n_tokens)
    assert emb.kv_compact.shape == (sum(n_tokens), 32) and emb.kv_compact.dtype == torch.float32
    for i, ref in enumerate(reference(PROMPTS)):
        torch.testing.assert_close(emb.prompt_features(i), ref, atol=1e-5, rtol=1e-5)


def test_batch_packing(encoder):
    emb = encoder.encode(PROMPTS)
    assert emb.batch_size == len(PROMPTS) and emb.prompts == tuple(PROMPTS)
    assert emb.cu_seqlens.dtype == torch.int32
    lengths = emb.lengths
    assert emb.cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert emb.max_seqlen == max(lengths)
    start = 0
    for p, n in zip(PROMPTS, lengths):
        alone = encoder.encode([p])
        assert alone.lengths == (n,)
        torch.testing.assert_close(emb.kv_compact[start : start + n], alone.kv_compact, atol=1e-5, rtol=1e-5)
        start += n


def test_empty_prompt_is_eos_only(encoder, reference):
    emb = encoder.encode([""])
    assert emb.lengths == (1,)
    torch.testing.assert_close(emb.kv_compact, reference([""])[0], atol=1e-5, rtol=1e-5)


def test_long_prompt_truncated_with_warning(encoder, reference):
    long_prompt = "rich details " * 400  # ~800 tokens
    n_full = len(reference.tokenizer(long_prompt, verbose=False)["input_ids"])
    assert n_full > MAX_TEXT_TOKENS
    with pytest.warns(UserWarning, match=rf"'rich details rich.*{n_full} tokens"):
        emb = encoder.encode([long_prompt, "a cat"])
    assert emb.lengths[0] == MAX_TEXT_TOKENS
    torch.testing.assert_close(emb.prompt_features(0), reference([long_prompt])[0], atol=1e-5, rtol=1e-5)
    ids = encoder.tokenize("a cat")
    assert ids[-1] == reference.tokenizer.eos_token_id


def test_no_warning_at_exactly_512(encoder, reference):
    tok = reference.tokenizer
    prompt = " ".join(["cat"] * (MAX_TEXT_TOKENS - 1))  # 511 word tokens + EOS
    assert len(tok(prompt, verbose=False)["input_ids"]) == MAX_TEXT_TOKENS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert encoder.encode([prompt]).lengths == (MAX_TEXT_TOKENS,)


def test_sharded_weights(tmp_path, encoder):
    build_tiny_t5(tmp_path, d_model=32, shard=True)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded = T5TextEncoder(tmp_path, device="cpu")
    torch.testing.assert_close(sharded.encode(PROMPTS).kv_compact, encoder.encode(PROMPTS).kv_compact, atol=1e-6, rtol=0)
    # a missing shard is named in the error
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(TextEncoderError, match=shard.name):
        T5TextEncoder(tmp_path, device="cpu")


@pytest.mark.parametrize(
    "remove, needle",
    [
        (["config.json"], "config.json"),
        (["tokenizer.json"], "tokenizer"),
        (["model.safetensors"], "weights"),
    ],
)
def test_missing_folder_contents(t5_dir, tmp_path, remove, needle):
    folder = tmp_path / "flan-t5-xl"
    shutil.copytree(t5_dir, folder)
    for name in remove:
        (folder / name).unlink()
    with pytest.raises(TextEncoderError) as e:
        T5TextEncoder(folder)
    msg = str(e.value)
    assert str(folder) in msg and needle in msg and "google/flan-t5-xl" in msg


def test_missing_folder(tmp_path):
    with pytest.raises(TextEncoderError, match="does not exist.*google/flan-t5-xl"):
        T5TextEncoder(tmp_path / "nope")


def test_wrong_model_type(t5_dir, tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(t5_dir, folder)
    cfg = (folder / "config.json").read_text().replace('"model_type": "t5"', '"model_type": "clip_text_model"')
    (folder / "config.json").write_text(cfg)
    with pytest.raises(TextEncoderError, match="model_type"):
        T5TextEncoder(folder)


def test_identity_follows_files(t5_dir, tmp_path):
    folder = tmp_path / "t5"
    shutil.copytree(t5_dir, folder)
    before = T5TextEncoder(folder).identity
    w = folder / "model.safetensors"
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert T5TextEncoder(folder).identity != before


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------
def test_cache_hit_skips_encoder(t5_dir, encoder, tmp_path):
    cache = PromptCache(tmp_path / "cache")
    counting = CountingEncoder(encoder)
    first = encode_prompts(PROMPTS, counting, cache)
    assert counting.calls == [PROMPTS]
    assert len(_files(cache.directory)) == len(PROMPTS)
    second = encode_prompts(PROMPTS, counting, cache)
    assert len(counting.calls) == 1
    assert torch.equal(first.kv_compact, second.kv_compact) and torch.equal(first.cu_seqlens, second.cu_seqlens)
    assert second.prompts == tuple(PROMPTS)
    # duplicates and a partly cached batch: only the new prompt is encoded, once
    third = encode_prompts(["a cat", "a new dog", "a cat", "a new dog"], counting, cache)
    assert counting.calls[-1] == ["a new dog"]
    assert third.lengths[0] == third.lengths[2] and third.lengths[1] == third.lengths[3]
    ref = encoder.encode(["a cat", "a new dog", "a cat", "a new dog"])
    assert torch.equal(third.kv_compact, ref.kv_compact)
    # a fully cached run never loads the model
    lazy = T5TextEncoder(t5_dir, device="cpu")
    out = encode_prompts(PROMPTS, lazy, cache)
    assert not lazy.loaded and torch.equal(out.kv_compact, first.kv_compact)


def test_cache_other_identity_misses(encoder, tmp_path):
    cache = PromptCache(tmp_path)
    encode_prompts(["a cat"], encoder, cache)
    assert cache.get(["a cat"], encoder.identity)[0] is not None
    assert cache.get(["a cat"], "other-encoder") == [None]
    other = CountingEncoder(encoder, identity="other-encoder")
    encode_prompts(["a cat"], other, cache)
    assert other.calls == [["a cat"]]
    with pytest.raises(ValueError, match="differs"):
        encode_prompts(["a cat"], encoder, cache, encoder_identity="other-encoder")


def test_cached_only_mode(encoder, tmp_path):
    cache = PromptCache(tmp_path / "c")
    with pytest.raises(PromptNotCachedError) as e:
        encode_prompts(["a cat"], None, cache)
    assert "'a cat'" in str(e.value)
    fresh = encode_prompts(["a cat", DEFAULT_PROMPT], encoder, cache)
    for ident in (None, encoder.identity):
        got = encode_prompts([DEFAULT_PROMPT, "a cat"], None, cache, encoder_identity=ident)
        assert torch.equal(got.kv_compact, fresh.select([1, 0]).kv_compact)
    with pytest.raises(PromptNotCachedError) as e:
        encode_prompts(["a cat", "a dog on grass", "photo"], None, cache)
    msg = str(e.value)
    assert "2 prompt(s)" in msg and "'a dog on grass'" in msg and "'photo'" in msg and "'a cat'" not in msg
    assert "cached prompts only" in msg and str(cache.directory) in msg and "flan-t5-xl" in msg
    with pytest.raises(PromptNotCachedError):
        encode_prompts(["a cat"], None, cache, encoder_identity="other-encoder")
    with pytest.raises(ValueError, match="neither"):
        encode_prompts(["a cat"], None, None)


def test_cached_only_prefers_newest_of_several_encoders(tmp_path):
    cache = PromptCache(tmp_path)
    a = PromptEmbeds.from_features(torch.ones(2, 4), [0, 2], ["x"])
    b = PromptEmbeds.from_features(torch.zeros(3, 4), [0, 3], ["x"])
    pa = cache.put(a, "enc-a")[0]
    pb = cache.put(b, "enc-b")[0]
    st = pa.stat()
    os.utime(pb, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.warns(UserWarning, match="2 text encoders"):
        got = cache.get(["x"], None)[0]
    assert got.lengths == (3,)


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    cache = PromptCache(tmp_path / "cache")
    emb = PromptEmbeds.from_features(torch.randn(5, 8), [0, 2, 5], ["p0", "p1"])

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 17)  # a partial file...
        raise OSError("disk full")  # ...then the failure

    monkeypatch.setattr(text_mod, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cache.put(emb, "enc")
    assert _files(cache.directory) == []  # neither the target nor a temp file
    assert cache.get(["p0", "p1"], "enc") == [None, None]
    # inside encode_prompts a failing cache write only warns, the features are still returned
    counting = CountingEncoder(type("E", (), {"identity": "enc", "encode": lambda self, p: emb.select([0] * len(p))})())
    with pytest.warns(UserWarning, match="could not write"):
        out = encode_prompts(["p0"], counting, cache)
    assert out.lengths == (2,) and _files(cache.directory) == []

    monkeypatch.undo()
    paths = cache.put(emb, "enc")
    assert _files(cache.directory) == sorted(p.name for p in paths) and all(p.suffix == ".safetensors" for p in paths)
    got = cache.get(["p1", "p0"], "enc")
    assert torch.equal(got[0].kv_compact, emb.prompt_features(1)) and torch.equal(got[1].kv_compact, emb.prompt_features(0))


def test_cache_ignores_damaged_file(tmp_path):
    cache = PromptCache(tmp_path)
    path = cache.put(PromptEmbeds.from_features(torch.randn(3, 4), [0, 3], ["p"]), "enc")[0]
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.get(["p"], "enc") == [None]


# ------------------------------------------------------------------------------------------------
# PromptEmbeds
# ------------------------------------------------------------------------------------------------
def _toy() -> PromptEmbeds:
    kv = torch.arange(6 * 3, dtype=torch.float32).reshape(6, 3)
    return PromptEmbeds.from_features(kv, torch.tensor([0, 1, 4, 6]), ["a", "b", "c"])


def test_embeds_repeat():
    e = _toy()
    r = e.repeat(2)
    assert r.prompts == ("a", "a", "b", "b", "c", "c")
    assert r.lengths == (1, 1, 3, 3, 2, 2)
    assert r.cu_seqlens.tolist() == [0, 1, 2, 5, 8, 10, 12] and r.cu_seqlens.dtype == torch.int32
    for i in range(6):
        assert torch.equal(r.prompt_features(i), e.prompt_features(i // 2))
    assert e.repeat(1) is e
    with pytest.raises(ValueError):
        e.repeat(0)


def test_embeds_cat_select_to():
    e = _toy()
    before = e.kv_compact.clone()
    c = PromptEmbeds.cat([e, e.select([1])])
    assert c.prompts == ("a", "b", "c", "b") and c.lengths == (1, 3, 2, 3)
    assert torch.equal(c.kv_compact, torch.cat([e.kv_compact, e.prompt_features(1)]))
    assert c.cu_seqlens.tolist() == [0, 1, 4, 6, 9]
    s = e.select([2, 0, -1])
    assert s.prompts == ("c", "a", "c") and torch.equal(s.prompt_features(1), e.prompt_features(0))
    assert [u.prompts for u in e.unbind()] == [("a",), ("b",), ("c",)]
    h = e.to(dtype=torch.float16)
    assert h.kv_compact.dtype == torch.float16 and h.cu_seqlens.dtype == torch.int32 and e.to("cpu") is e
    assert torch.equal(e.kv_compact, before)  # nothing was modified in place
    with pytest.raises(Exception):
        e.kv_compact = torch.zeros(1)  # frozen
    with pytest.raises(ValueError):
        PromptEmbeds.cat([e, PromptEmbeds.from_features(torch.zeros(1, 5), [0, 1])])


def test_embeds_validation():
    kv = torch.zeros(4, 2)
    assert PromptEmbeds.from_features(kv, [0, 4]).prompts == ("",)
    for bad in ([0, 3], [1, 4], [0, 0, 4], [0]):
        with pytest.raises(ValueError):
            PromptEmbeds.from_features(kv, bad)
    with pytest.raises(ValueError):
        PromptEmbeds(kv, torch.tensor([0, 4], dtype=torch.int64), ("a",))
    with pytest.raises(ValueError):
        PromptEmbeds.from_features(kv, [0, 4], ["a", "b"])
    with pytest.raises(ValueError):
        PromptEmbeds.from_features(torch.zeros(4, 2, 1), [0, 4])
