"""Infinity bitwise next-scale transformer (Infinity-8B / NSARM), checkpoint compatible.

Shapes use B batch, L tokens of the current scale, N cached tokens, C = embed_dim, H heads,
hd = head_dim = C / H (128), Ct = text channels (T5 width), T = packed text tokens of a batch.

A block (shared AdaLN, pre-norm):
    g1, g2, s1, s2, b1, b2 = (ada_gss + gss).unbind(2)           # gss = shared_ada_lin(sos)
    x = x + SA(LN(x) * (1 + s1) + b1) * g1                       # cosine attention + RoPE-2D
    x = x + CA(ca_norm(x), text)                                 # no gate, affine LayerNorm
    x = x + FFN(LN(x) * (1 + s2) + b2) * g2                      # GELU(tanh)

Precision: the residual stream, AdaLN modulation, LayerNorms, RoPE, the text path outside the
blocks and the head run in float32; block linears run in the blocks' weight dtype (bf16 for the
released setup), which is what upstream gets from its bf16 autocast. With a block-quantised
weight format (`load_transformer(weight_format="q8_0")`, weights.py) a block linear keeps GGUF
blocks and computes in bf16 on its weight dequantised per call (see `linear`).

Host/device synchronisation: nothing in a block forward or in the per-scale work reads a tensor
back to the host (no .item() / .tolist() / tensor-valued Python conditions); per-sample text
lengths are read once in `condition`, the block-causal prefill mask is cached per schedule.
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import placement, weights
from .config import MapNetConfig, TransformerConfig
from .loading import (
    CheckpointError,
    Coverage,
    LazyEntry,
    LazyStateDict,
    check_finite,
    coverage,
    describe,
    dtype_of,
    materialize,
    read_checkpoint,
    replace_entry,
    shape_of,
    unwrap,
)
from .precision import resolve_dtype
from .schedule import rope_cos_sin

MAX_LOG_SCALE_MUL = math.log(100.0)  # cosine-attention temperature clamp
POOL_HEAD_DIM = 128  # text attention-pool head width rule: heads = text_channels // 128
CHECKPOINT_WRAPPERS = ("gpt_fsdp", "model", "state_dict", "module")
BLOCK_KEY = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.")
GGUF_FORMAT_KEY = "nsarm.weight_format"  # .gguf metadata: the weight format the file was written for


def linear(x: torch.Tensor, layer: nn.Module, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Linear layer computed in the layer's weight dtype (the input is cast to it).

    `layer` is an nn.Linear, or a block-quantised layer given by the weight format
    (weights.BlockQuantLinear: `dequantized_weight()` returns its weight in its compute dtype,
    dequantised on this call).
    """
    w = layer.weight if isinstance(layer, nn.Linear) else layer.dequantized_weight()
    b = layer.bias if bias is None else bias
    return F.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype))


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """float32 LayerNorm over the last axis (affine parameters optional)."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2m, 2m+1). x [B, H, L, hd] float32, cos/sin [L, hd/2]."""
    pairs = x.unflatten(-1, (-1, 2))  # [B, H, L, hd/2, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


class KVCache:
    """Preallocated keys/values of one self-attention layer: [B, H, capacity, hd] each."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, dtype, device):
        self.k = torch.empty(batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor, store: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, H, L, hd]; return all keys/values so far. With store=False (the last
        scale, which no later scale reads) the new tokens are attended to but not kept."""
        n, L = self.length, k.shape[2]
        if not store:
            return (torch.cat((self.k[:, :, :n], k.to(self.k.dtype)), dim=2),
                    torch.cat((self.v[:, :, :n], v.to(self.v.dtype)), dim=2))
        self.k[:, :, n:n + L] = k
        self.v[:, :, n:n + L] = v
        self.length = n + L
        return self.k[:, :, : n + L], self.v[:, :, : n + L]


class SelfAttention(nn.Module):
    """Cosine self-attention: unit q, k; q scaled per head by exp(min(scale_mul, ln 100)); SDPA
    with scale 1; RoPE-2D after the normalisation and before caching."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, cache: KVCache | None = None, store: bool = True, mask=None):
        """x [B, L, C] -> [B, L, C]. `mask` [L, N] (True = visible) for block-causal passes."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = linear(x, self.mat_qkv, bias).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, hd]
        scale = self.scale_mul_1H11.float().clamp_max(MAX_LOG_SCALE_MUL).exp()  # [1, H, 1, 1]
        q = apply_rope(F.normalize(q.float(), dim=-1, eps=1e-12) * scale, cos, sin)
        k = apply_rope(F.normalize(k.float(), dim=-1, eps=1e-12), cos, sin)
        if cache is not None:
            k, v = cache.extend(k, v, store)  # [B, H, N, hd]
        dtype = v.dtype
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v, attn_mask=mask, scale=1.0)
        return linear(out.transpose(1, 2).reshape(B, L, C), self.proj)


class TextKV:
    """Per-block cross-attention keys/values of a packed text batch, padded per sample.

    k, v [B, H, Tmax, hd]; mask [B, 1, 1, Tmax] (True = a real token) or None when unpadded.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        self.k, self.v, self.mask = k, v, mask


def pad_packed(x: torch.Tensor, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[T, ...] packed rows -> [B, Tmax, ...] zero padded + key mask [B, Tmax] (None if equal lengths).

    cu_seqlens: int tensor [B + 1] or the same as a list of ints (no device read-back then)."""
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    if len(set(lengths)) == 1:
        return x.view(len(lengths), lengths[0], *x.shape[1:]), None
    out = x.new_zeros(len(lengths), max(lengths), *x.shape[1:])
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool, device=x.device)
    for i, (s, n) in enumerate(zip(bounds[:-1], lengths)):
        out[i, :n] = x[s:s + n]
        mask[i, :n] = True
    return out, mask


class CrossAttention(nn.Module):
    """Standard attention (scale 1/sqrt(hd)) from image tokens to the tokens of their own prompt.

    With `pool=True` it is the text attention pool: one learned query per head (`mat_q`) instead
    of a query projection, which turns each prompt into a single vector (the SOS / condition).
    """

    def __init__(self, dim: int, kv_dim: int, heads: int, pool: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.pool = pool
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def text_kv(self, kv_compact: torch.Tensor, cu_seqlens) -> TextKV:
        """kv_compact [T, kv_dim] packed prompts -> per-sample padded heads (cu_seqlens: tensor or
        list of ints)."""
        T = kv_compact.shape[0]
        kv = linear(kv_compact, self.mat_kv, torch.cat((self.zero_k_bias, self.v_bias)))
        kv, mask = pad_packed(kv.view(T, 2, self.heads, self.head_dim), cu_seqlens)  # [B, Tm, 2, H, hd]
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, Tm, hd]
        return TextKV(k, v, None if mask is None else mask[:, None, None, :])

    def forward(self, x: torch.Tensor | None, text: TextKV) -> torch.Tensor:
        """x [B, L, C] (ignored for the pool) -> [B, L, C] (pool: [B, 1, C])."""
        B = text.k.shape[0]
        if self.pool:
            q = self.mat_q.to(text.k.dtype).expand(B, -1, -1).unsqueeze(2)  # [B, H, 1, hd]
        else:
            q = linear(x, self.mat_q).view(B, x.shape[1], self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.to(text.v.dtype), text.k, text.v, attn_mask=text.mask)
        return linear(out.transpose(1, 2).flatten(2), self.proj)


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.gelu(linear(x, self.fc1), approximate="tanh"), self.fc2)


class CrossAttnBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        C = cfg.embed_dim
        self.eps = cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.ffn = FFN(C, cfg.ffn_hidden)

    def forward(self, x, gss, text: TextKV, cos, sin, cache=None, store=True, mask=None):
        """x [B, L, C] float32, gss [B, 1, 6, C] float32 -> [B, L, C] float32."""
        g1, g2, s1, s2, b1, b2 = (self.ada_gss.float() + gss).unbind(2)  # each [B, 1, C]
        h = layer_norm(x, self.eps) * (1 + s1) + b1
        x = x + self.sa(h, cos, sin, cache, store, mask).float() * g1
        x = x + self.ca(layer_norm(x, self.eps, self.ca_norm.weight, self.ca_norm.bias), text).float()
        h = layer_norm(x, self.eps) * (1 + s2) + b2
        return x + self.ffn(h).float() * g2


class BlockChunk(nn.Module):
    """Upstream groups blocks in chunks; only the key names (`block_chunks.{c}.module.{j}`) matter."""

    def __init__(self, blocks: list[CrossAttnBlock]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class TextAttentivePool(nn.Module):
    def __init__(self, text_channels: int, dim: int, heads: int):
        super().__init__()
        self.ca = CrossAttention(dim, text_channels, heads, pool=True)


class SharedAdaLin(nn.Sequential):
    """SiLU -> Linear(C, 6C): the condition of every block's AdaLN, [B, 1, 6, C]."""

    def __init__(self, dim: int):
        super().__init__(nn.SiLU(), nn.Linear(dim, 6 * dim))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x [B, L, C], cond [B, C] (the SOS vector) -> LN(x) * (1 + scale) + shift, float32."""
        scale, shift = self.ada_lin(cond.float()).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return layer_norm(x, self.eps) * (1 + scale) + shift


class Conditioning:
    """Everything the blocks need from the text, computed once per sampling call.

    sos [B, C] (pooled prompt = head condition), x_sos [B, 1, C] (scale-0 token before lvl_embed),
    gss [B, 1, 6, C] (shared AdaLN), text_kv: per block cross-attention keys/values.
    """

    def __init__(self, sos, x_sos, gss, text_kv: list[TextKV]):
        self.sos, self.x_sos, self.gss, self.text_kv = sos, x_sos, gss, text_kv


class Infinity(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        C, Ct = cfg.embed_dim, cfg.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, Ct))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.text_norm = RMSNorm(Ct, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(Ct, C, cfg.pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(cfg.num_lvl_embeds, C)
        self.word_embed = nn.Linear(cfg.d_vae, C)
        self.shared_ada_lin = SharedAdaLin(C)
        per = cfg.blocks_per_chunk
        self.block_chunks = nn.ModuleList(
            BlockChunk([CrossAttnBlock(cfg) for _ in range(per)]) for _ in range(cfg.block_chunks)
        )
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * cfg.d_vae)
        if cfg.map_net is not None:
            from .mapnet import MapTransformer

            self.map_transformer = MapTransformer(cfg.map_net)
        else:
            self.map_transformer = None
        self._rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        self.weight_format = "dense"  # a weights.FORMATS name (see load_transformer)
        self.swapper = None  # placement.ModuleSwapper of blocks kept off the device, or None
        self.offloader = None  # placement.ModuleSwapper of the text path + map network, or None

    @property
    def map_net(self):
        """The NSARM transformation network (None for plain Infinity checkpoints)."""
        return self.map_transformer

    @property
    def blocks(self) -> list[CrossAttnBlock]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    @property
    def block_dtype(self) -> torch.dtype:
        """The dtype blocks compute in (and the KV cache is kept in)."""
        proj = self.block_chunks[0].module[0].sa.proj
        return proj.weight.dtype if isinstance(proj, nn.Linear) else proj.compute_dtype

    def block_causal_mask(self, counts: list[int], device) -> torch.Tensor:
        """[n, n] bool, True where token i may attend to token j (scale(i) >= scale(j)), for scales
        of `counts` tokens; built on the host once per (counts, device) and cached."""
        key = (tuple(counts), str(device))
        if key not in self._masks:
            scale_id = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
            self._masks[key] = (scale_id[:, None] >= scale_id[None, :]).to(device)
        return self._masks[key]

    def rope(self, schedule: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N_total, hd/2] float32 for the whole schedule (cached per schedule/device)."""
        key = (tuple(schedule), str(device))
        if key not in self._rope:
            cos, sin = rope_cos_sin(schedule, self.cfg.head_dim)
            self._rope[key] = (cos.to(device), sin.to(device))
        return self._rope[key]

    def condition(self, kv_compact: torch.Tensor, cu_seqlens: torch.Tensor) -> Conditioning:
        """Text path. kv_compact [T, Ct] float32 packed T5 features, cu_seqlens int32 [B + 1]."""
        bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)  # once
        text_path = (self.text_norm, self.text_proj_for_sos, self.text_proj_for_ca, self.shared_ada_lin)
        with _resident(self.offloader, text_path):  # low VRAM: the text path visits the device for this call
            kv = self.text_norm(kv_compact.float())  # [T, Ct]
            pool = self.text_proj_for_sos.ca
            sos = pool(None, pool.text_kv(kv, bounds)).float().squeeze(1)  # [B, C]
            ca_kv = self.text_proj_for_ca(kv)  # [T, C]
            gss = self.shared_ada_lin(sos).view(-1, 1, 6, self.cfg.embed_dim)  # [B, 1, 6, C]
        x_sos = sos.unsqueeze(1) + self.pos_start  # [B, 1, C]
        text_kv = []
        for b in self.blocks:
            with _resident(self.swapper, b):
                text_kv.append(b.ca.text_kv(ca_kv, bounds))
        return Conditioning(sos, x_sos, gss, text_kv)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scale input [B, L, d_vae] (downsampled running latent, pixel-unshuffled) -> [B, L, C]."""
        return self.word_embed(tokens.float())

    def forward_blocks(self, x, cond: Conditioning, cos, sin, caches=None, store=True, mask=None):
        """x [B, L, C] (with lvl_embed added) through every block -> [B, L, C] float32."""
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x = block(x, cond.gss, cond.text_kv[i], cos, sin, cache, store, mask)
        return x

    def logits(self, x: torch.Tensor, sos: torch.Tensor) -> torch.Tensor:
        """Bitwise head: x [B, L, C] -> [B, L, 2 * d_vae] float32; pair (2k, 2k+1) = bit k is 0 / 1."""
        h = self.head_nm(x, sos)
        return F.linear(h, self.head.weight.float(), self.head.bias.float())

    def new_caches(self, batch: int, capacity: int, device, dtype=None) -> list[KVCache]:
        dtype = dtype or self.block_dtype
        return [KVCache(batch, self.cfg.num_heads, capacity, self.cfg.head_dim, dtype, device)
                for _ in self.blocks]


def _resident(swapper, module=None):
    """Context in which `module` (a module or a tuple of them; default: everything `swapper`
    manages) is on the device; a no-op without a swapper or for modules it does not manage."""
    if swapper is None or (isinstance(module, nn.Module) and not swapper.manages(module)):
        return contextlib.nullcontext()
    return swapper.resident(module)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


# ---------------------------------------------------------------------------------------------
# Loading


def _normalise_keys(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Tolerate upstream variations: unchunked `blocks.{i}.`, `(1,1,H,1)` scale_mul. A lazy state
    dict stays lazy (renames and reshapes are applied when a tensor is read)."""
    renamed: dict[str, str] = {}  # new key -> key in sd
    for k in sd:
        m = re.match(r"^blocks\.(\d+)\.(.*)$", k)
        renamed[f"block_chunks.0.module.{m.group(1)}.{m.group(2)}" if m else k] = k

    def fix(key: str, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, -1, 1, 1) if key.endswith("sa.scale_mul_1H11") else t

    if isinstance(sd, LazyStateDict):
        entries = {}
        for new, old in renamed.items():
            e = sd.entry(old)
            if new.endswith("sa.scale_mul_1H11"):
                e = e.map(lambda t: t.reshape(1, -1, 1, 1), (1, math.prod(e.shape), 1, 1))
            entries[new] = e
        return sd.with_entries(entries)
    return {new: fix(new, sd[old]) for new, old in renamed.items()}


def infer_config(sd: Mapping[str, torch.Tensor], source: str) -> TransformerConfig:
    """Read depth, width, heads, text channels, patchify, chunking and the map network from shapes."""
    if "pos_start" not in sd or "word_embed.weight" not in sd:
        raise CheckpointError(
            f"{source}: not an Infinity/NSARM transformer checkpoint (no `pos_start` / `word_embed`); "
            f"expected NSARM.pth or an Infinity weights file. Found keys like {list(sd)[:5]}"
        )
    blocks = sorted({(int(m.group(1)), int(m.group(2))) for k in sd if (m := BLOCK_KEY.match(k))})
    if not blocks:
        raise CheckpointError(f"{source}: no transformer blocks (`block_chunks.*`) found")
    chunks = max(c for c, _ in blocks) + 1
    per = max(j for _, j in blocks) + 1
    if len(blocks) != chunks * per:
        raise CheckpointError(f"{source}: block numbering has gaps ({len(blocks)} blocks in {chunks} chunks)")
    def dims(key: str, rank: int, what: str) -> tuple[int, ...]:
        """Shape of `key`, which must exist with `rank` dimensions of size >= 1 (the configuration is read
        from it: a missing or damaged tensor must not become a bare KeyError or a wrongly sized model)."""
        if key not in sd:
            raise CheckpointError(f"{source}: tensor {key} is missing (the model's {what} is read from it); the "
                                  "file is incomplete or not an Infinity/NSARM checkpoint: download it again")
        shape = tuple(shape_of(sd, key))
        if len(shape) != rank or min(shape, default=0) < 1:
            raise CheckpointError(f"{source}: tensor {key} has shape {list(shape)}, expected {rank} dimensions of "
                                  f"size >= 1 (the model's {what} is read from it); the file is damaged: download "
                                  "it again")
        return shape

    C = dims("pos_start", 3, "width")[-1]
    d_vae = dims("word_embed.weight", 2, "bits per token")[1]
    heads = math.prod(dims("block_chunks.0.module.0.sa.scale_mul_1H11", 4, "number of heads"))
    Ct = dims("text_norm.weight", 1, "text width")[0]

    map_cfg: MapNetConfig | None = None
    if any(k.startswith("map_transformer.") for k in sd):
        from .mapnet import infer_mapnet_config

        map_cfg = infer_mapnet_config(sd, prefix="map_transformer.")
    # Patchify (2x2 latent patches per token) is what makes 4 * codebook_dim bits per token. The
    # map network's width gives the codebook dim; without it only the 8B layout (56 = 4 x 14) is
    # patchified among released models.
    codebook = map_cfg.input_channels if map_cfg is not None else (14 if d_vae == 56 else d_vae)
    patchify = d_vae == 4 * codebook
    if not patchify and d_vae != codebook:
        raise CheckpointError(f"{source}: word_embed width {d_vae} fits neither d nor 4d for d={codebook}")
    return TransformerConfig(
        depth=chunks * per,
        embed_dim=C,
        num_heads=heads,
        ffn_hidden=dims("block_chunks.0.module.0.ffn.fc1.weight", 2, "feed-forward width")[0],
        text_channels=Ct,
        text_maxlen=dims("cfg_uncond", 2, "text length")[0] if "cfg_uncond" in sd else 512,
        block_chunks=chunks,
        codebook_dim=codebook,
        patchify=patchify,
        pool_heads=dims("text_proj_for_sos.ca.mat_q", 3, "text pooling heads")[1],
        num_lvl_embeds=dims("lvl_embed.weight", 2, "number of scale embeddings")[0],
        map_net=map_cfg,
    )


def _block_index(name: str, per_chunk: int) -> int | None:
    m = BLOCK_KEY.match(name)
    return None if m is None else int(m.group(1)) * per_chunk + int(m.group(2))


def _checkpoint_state(src) -> tuple[Mapping[str, torch.Tensor], str]:
    """Read + unwrap + normalise a transformer checkpoint (lazy / memory-mapped, nothing copied)."""
    source = describe(src)
    obj = read_checkpoint(src)
    if not isinstance(obj, LazyStateDict) and isinstance(obj.get("trainer"), Mapping):
        obj = obj["trainer"]  # upstream training checkpoints (`ar-*.pth`)
    sd = _normalise_keys(unwrap(obj, CHECKPOINT_WRAPPERS, source))
    if "cfg_uncond" in sd and shape_of(sd, "cfg_uncond")[0] > 512:
        sd = replace_entry(sd, "cfg_uncond", lambda t: t[:512], (512, *shape_of(sd, "cfg_uncond")[1:]))
    return sd, source


def checkpoint_config(src) -> TransformerConfig:
    """The config `load_transformer` would build for `src`, from its keys and shapes only (the
    loader node sizes the device memory it frees with it before reading the weights)."""
    return infer_config(*_checkpoint_state(src))


def checkpoint_coverage(src) -> Coverage:
    """Which keys of `src` the transformer uses, lacks or finds mis-shaped, as `load_transformer`
    would see them (keys normalised, absent `zero_k_bias` filled), from the checkpoint's keys and
    shapes only (`check-models`)."""
    sd, source = _checkpoint_state(src)
    with torch.device("meta"):
        model = Infinity(infer_config(sd, source))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return coverage(expected, sd, {k: v for k, v in model.state_dict().items() if k.endswith("zero_k_bias")})

def quantized_entry(sd: Mapping[str, torch.Tensor], key: str, bt, source: str, device: torch.device) -> torch.Tensor:
    """Checkpoint tensor `key` read, checked for NaN / inf as `materialize` checks every tensor
    (naming the file and key), and quantised to block type `bt` on `device`."""
    w = sd[key].to(device)
    check_finite(w, source=source, kind="transformer", name=key)
    return weights.quantize(w, bt)


def _packed_state(sd: Mapping[str, torch.Tensor], layers: list[str], fmt: weights.WeightFormat, source: str,
                  device: torch.device) -> LazyStateDict:
    """`sd` (lazy) with `<layer>.weight` of each block-quantised layer replaced by `<layer>.packed`: the
    blocks read from a .gguf file as they are, or quantised when read (on `device`) from any other
    checkpoint. A .gguf whose stored block types differ from `fmt` is refused, naming the key."""
    gguf = hasattr(sd, "block_types")  # loading.GGUFStateDict
    stored = sd.block_types if gguf else {}  # {key: BlockType}
    for key in sorted(set(stored) | {f"{layer}.weight" for layer in layers}) if gguf else ():
        want = fmt.block_type_for(key) if weights.is_block_linear(key) else None
        have = stored.get(key)
        if key in sd and want != have:
            made = sd.metadata.get(GGUF_FORMAT_KEY, "unknown")
            raise CheckpointError(
                f"{source}: tensor {key} is stored as {have.name if have else 'dense weights'} but weight_format "
                f"{fmt.name!r} expects {want.name if want else 'dense weights'} there; this file was written for "
                f"weight_format {made!r}: load it with that format, or convert the original checkpoint again with "
                f"--format {fmt.name if fmt.quantized else 'bf16'}")
    if isinstance(sd, LazyStateDict):
        entries = {k: sd.entry(k) for k in sd}
    else:
        entries = {k: LazyEntry(lambda k=k: sd[k], shape_of(sd, k), dtype_of(sd, k)) for k in sd}
    for layer in layers:
        key = f"{layer}.weight"
        if key not in entries:
            continue  # reported as missing (`.packed`) by the coverage check
        bt = fmt.block_type_for(key)
        shape = entries.pop(key).shape
        if len(shape) != 2 or shape[1] % weights.BLOCK:
            raise CheckpointError(f"{source}: tensor {key} has shape {list(shape)}, which cannot be stored as "
                                  f"{bt.name} (2-D, input width a multiple of {weights.BLOCK}); load it dense")
        if key in stored:
            load = (lambda key=key: sd.packed(key))
        else:
            load = functools.partial(quantized_entry, sd, key, bt, source, device)
        entries[f"{layer}.packed"] = LazyEntry(load, weights.packed_shape(shape, bt), torch.uint8)
    return LazyStateDict(entries, source)


def load_transformer(
    src,
    device="cpu",
    dtype: torch.dtype | None = None,
    *,
    weight_format: str | weights.WeightFormat = "dense",
    blocks_on_cpu: int = 0,
    offload_text_and_map: bool = False,
    strict: bool = False,
) -> Infinity:
    """Load NSARM.pth / Infinity weights (path, sharded folder, .gguf, or state dict).

    `dtype` applies to the transformer blocks: None / "auto" is the one policy of
    `precision.resolve_dtype` for `device` (bf16 on CUDA GPUs with bf16, else fp32), or "bf16",
    "fp16", "fp32", or a torch dtype; everything else (text path, embeddings, AdaLN projections,
    head, transformation network) stays float32. Missing or mis-shaped tensors are an error;
    tensors the model does not use are ignored with one warning, or refused with `strict=True`;
    NaN / inf in any tensor is an error naming it (see `loading.materialize`).
    Absent `zero_k_bias` buffers are filled with zeros; `cfg_uncond` longer than 512 rows is cut.
    The checkpoint is read one tensor at a time (safetensors, .gguf and .pth lazily; torchzip.py).

    The transformer is given its weight format and its placement:
    - weight_format (weights.FORMATS, or a weights.WeightFormat): "dense" keeps block weights in
      `dtype`; "q8_0" / "q5_1" / "q4_1" store the block linear weights (99.98% of the block
      parameters) as GGUF blocks of 32 weights with their own scale (per output row and block, so
      q, k and v are scaled separately), quantised here tensor by tensor (on `device`) from any
      checkpoint, or read as they are from a .gguf written by `convert --format`; they compute in
      `dtype` (the same policy), dequantised on each call (see weights.py for the cost). "fp8" (old
      saved workflows) means q8_0.
    - blocks_on_cpu=N: N blocks (spread evenly over the depth) live in (pinned) CPU memory and are
      copied to `device` just before they run, the next one prefetched on a side CUDA stream
      (at most two of them on the device at a time). Saves ~(N - 2) blocks of device memory; each
      forward pass then moves N blocks over PCIe (placement.ModuleSwapper).
    - offload_text_and_map=True: the transformation network and the text path (text_norm,
      text_proj_for_sos, text_proj_for_ca, shared_ada_lin), which run once per sampling call, stay
      on the CPU and visit the device only for that call (~2 GB less resident for NSARM-8B).
    """
    fmt = weights.weight_format(weight_format)
    sd, source = _checkpoint_state(src)
    cfg = infer_config(sd, source)
    if not 0 <= blocks_on_cpu <= cfg.depth:
        raise ValueError(f"blocks_on_cpu must be in 0..{cfg.depth} (the model's depth), got {blocks_on_cpu}")
    device = torch.device(device)
    block_dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = Infinity(cfg)
    layers = [f"block_chunks.{n}" for n in weights.swap_in_quantized(model.block_chunks, fmt, block_dtype)]
    sd = _packed_state(sd, layers, fmt, source, device)
    zero_bias = {
        name: torch.zeros(buf.shape) for name, buf in model.named_buffers() if name.endswith("zero_k_bias")
    }
    swapped = set(placement.spread(blocks_on_cpu, cfg.depth))
    offload = torch.device("cpu")
    pin = device.type == "cuda"

    def dtype_for(name: str, t: torch.Tensor) -> torch.dtype:
        return block_dtype if name.startswith("block_chunks.") else torch.float32

    def transform(name: str, t: torch.Tensor) -> torch.Tensor:
        if _block_index(name, cfg.blocks_per_chunk) in swapped or (
                offload_text_and_map and name.split(".")[0] in placement.ONCE_PER_SAMPLE_MODULES):
            t = placement.to_offload(t, offload, pin)
        return t

    materialize(model, sd, source=source, kind="transformer", device=device, dtype_for=dtype_for,
                defaults=zero_bias, transform=transform, strict=strict)
    model.eval().requires_grad_(False)
    model.weight_format = fmt.name
    if swapped:
        model.swapper = placement.ModuleSwapper([model.blocks[i] for i in sorted(swapped)], device,
                                                hooks=True, prefetch=True)
    if offload_text_and_map:
        parts = [getattr(model, n) for n in placement.ONCE_PER_SAMPLE_MODULES if getattr(model, n, None) is not None]
        model.offloader = placement.ModuleSwapper(parts, device, hooks=False, prefetch=False)
        if model.map_transformer is not None:
            model.offloader.add_hooks(model.map_transformer)
    return model
