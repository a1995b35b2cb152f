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
released setup), which is what upstream gets from its bf16 autocast.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import MapNetConfig, TransformerConfig
from .loading import CheckpointError, describe, materialize, read_checkpoint, unwrap
from .schedule import rope_cos_sin

MAX_LOG_SCALE_MUL = math.log(100.0)  # cosine-attention temperature clamp
POOL_HEAD_DIM = 128  # text attention-pool head width rule: heads = text_channels // 128
CHECKPOINT_WRAPPERS = ("gpt_fsdp", "model", "state_dict", "module")
BLOCK_KEY = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.")


def linear(x: torch.Tensor, layer: nn.Linear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Linear layer computed in the layer's weight dtype (the input is cast to it)."""
    w = layer.weight
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


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[T, ...] packed rows -> [B, Tmax, ...] zero padded + key mask [B, Tmax] (None if equal lengths)."""
    bounds = cu_seqlens.tolist()
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

    def text_kv(self, kv_compact: torch.Tensor, cu_seqlens: torch.Tensor) -> TextKV:
        """kv_compact [T, kv_dim] packed prompts -> per-sample padded heads."""
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

    @property
    def map_net(self):
        """The NSARM transformation network (None for plain Infinity checkpoints)."""
        return self.map_transformer

    @property
    def blocks(self) -> list[CrossAttnBlock]:
        return [b for chunk in self.block_chunks for b in chunk.module]

    @property
    def block_dtype(self) -> torch.dtype:
        return self.block_chunks[0].module[0].sa.mat_qkv.weight.dtype

    def rope(self, schedule: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N_total, hd/2] float32 for the whole schedule (cached per schedule/device)."""
        key = (tuple(schedule), str(device))
        if key not in self._rope:
            cos, sin = rope_cos_sin(schedule, self.cfg.head_dim)
            self._rope[key] = (cos.to(device), sin.to(device))
        return self._rope[key]

    def condition(self, kv_compact: torch.Tensor, cu_seqlens: torch.Tensor) -> Conditioning:
        """Text path. kv_compact [T, Ct] float32 packed T5 features, cu_seqlens int32 [B + 1]."""
        kv = self.text_norm(kv_compact.float())  # [T, Ct]
        pool = self.text_proj_for_sos.ca
        sos = pool(None, pool.text_kv(kv, cu_seqlens)).float().squeeze(1)  # [B, C]
        ca_kv = self.text_proj_for_ca(kv)  # [T, C]
        gss = self.shared_ada_lin(sos).view(-1, 1, 6, self.cfg.embed_dim)  # [B, 1, 6, C]
        x_sos = sos.unsqueeze(1) + self.pos_start  # [B, 1, C]
        text_kv = [b.ca.text_kv(ca_kv, cu_seqlens) for b in self.blocks]
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


def _normalise_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tolerate upstream variations: unchunked `blocks.{i}.`, `(1,1,H,1)` scale_mul."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", k)
        if m:
            k = f"block_chunks.0.module.{m.group(1)}.{m.group(2)}"
        if k.endswith("sa.scale_mul_1H11"):
            v = v.reshape(1, -1, 1, 1)
        out[k] = v
    return out


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
    C = sd["pos_start"].shape[-1]
    d_vae = sd["word_embed.weight"].shape[1]
    heads = sd["block_chunks.0.module.0.sa.scale_mul_1H11"].numel()
    Ct = sd["text_norm.weight"].shape[0]

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
        ffn_hidden=sd["block_chunks.0.module.0.ffn.fc1.weight"].shape[0],
        text_channels=Ct,
        text_maxlen=sd["cfg_uncond"].shape[0] if "cfg_uncond" in sd else 512,
        block_chunks=chunks,
        codebook_dim=codebook,
        patchify=patchify,
        pool_heads=sd["text_proj_for_sos.ca.mat_q"].shape[1],
        num_lvl_embeds=sd["lvl_embed.weight"].shape[0],
        map_net=map_cfg,
    )


def load_transformer(src, device="cpu", dtype: torch.dtype | None = None) -> Infinity:
    """Load NSARM.pth / Infinity weights (path, sharded folder or state dict) strictly.

    `dtype` applies to the transformer blocks (e.g. torch.bfloat16 as upstream); everything else
    (text path, embeddings, AdaLN projections, head, transformation network) stays float32.
    Absent `zero_k_bias` buffers are filled with zeros; `cfg_uncond` longer than 512 rows is cut.
    """
    source = describe(src)
    obj = read_checkpoint(src)
    if isinstance(obj.get("trainer"), Mapping):  # upstream training checkpoints (`ar-*.pth`)
        obj = obj["trainer"]
    sd = _normalise_keys(unwrap(obj, CHECKPOINT_WRAPPERS, source))
    if "cfg_uncond" in sd and sd["cfg_uncond"].shape[0] > 512:
        sd["cfg_uncond"] = sd["cfg_uncond"][:512]
    cfg = infer_config(sd, source)
    with torch.device("meta"):
        model = Infinity(cfg)
    zero_bias = {
        name: torch.zeros(buf.shape) for name, buf in model.named_buffers() if name.endswith("zero_k_bias")
    }
    block_dtype = dtype or torch.float32

    def dtype_for(name: str, _t: torch.Tensor) -> torch.dtype:
        return block_dtype if name.startswith("block_chunks.") else torch.float32

    materialize(model, sd, source=source, kind="transformer", device=device, dtype_for=dtype_for,
                defaults=zero_bias)
    return model.eval().requires_grad_(False)
