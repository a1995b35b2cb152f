"""The memory estimate (block weight formats: weights.py; block swapping: placement.py).

- `memory_required`: analytic peak-memory estimate of an NSARM run (weights + KV cache +
  activations of the largest scale, then the VAE decode), for ComfyUI's
  `load_models_gpu(memory_required=...)`, for choosing a tile batch, and for BENCHMARKS.md.

"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from . import weights
from .config import NUM_REPLACED_SCALES, TransformerConfig, VAEConfig
from .placement import ONCE_PER_SAMPLE_MODULES
from .schedule import scale_schedule, token_counts, vae_scales

GB = 1e9


def offload_text_and_map_for(device, requested: bool | None = None) -> bool:
    """The one policy for offloading the once-per-sample modules (transformation network + text
    path, ~2 GB for NSARM-8B), used by the CLI, `load_pipeline` and the loader node.

    Default (`requested` None or True): offload on an accelerator, where it takes them out of the
    sampling loop's device memory (the 8B default then fits <= 22 GB for one 1024^2 tile, see
    `memory_required`) for one ~2 GB host-to-device copy per sampling call; never on the CPU, where
    the "device" and the offload home are the same memory and the copy would only cost time.
    `requested=False` keeps them resident (what old saved workflows ask for)."""
    if requested is False:
        return False
    return torch.device(device).type != "cpu"


# ---------------------------------------------------------------------------------------------
# Memory estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the compute device. `peak` = resident weights + max(sampling, decode) phases;
    `inference` = peak - resident weights (what ComfyUI's load_models_gpu(memory_required=) wants,
    since it accounts for the loaded model's own size)."""

    transformer_weights: int
    vae_weights: int
    kv_cache: int
    text_kv: int
    sampling_activations: int  # transient tensors of the largest scale (incl. its K/V concatenation)
    sampling_other: int  # rope tables, conditioning, running latent, bits of the call
    decode: int  # VAE decoder live tensors at the output size, whole batch
    details: dict = field(default_factory=dict, compare=False)

    @property
    def weights(self) -> int:
        return self.transformer_weights + self.vae_weights

    @property
    def sampling(self) -> int:
        return self.kv_cache + self.text_kv + self.sampling_activations + self.sampling_other

    @property
    def inference(self) -> int:
        return max(self.sampling, self.decode)

    @property
    def peak(self) -> int:
        return self.weights + self.inference

    def summary(self) -> str:
        rows = [("transformer weights", self.transformer_weights), ("VAE weights", self.vae_weights),
                ("KV cache", self.kv_cache), ("text K/V", self.text_kv),
                ("largest-scale activations", self.sampling_activations), ("other sampling", self.sampling_other),
                ("sampling phase (beyond weights)", self.sampling), ("VAE decode phase", self.decode),
                ("peak", self.peak)]
        return "\n".join(f"  {name:<32} {b / GB:9.3f} GB" for name, b in rows)


def _dtype_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size() if not isinstance(dtype, int) else dtype


def transformer_param_counts(cfg: TransformerConfig) -> dict[str, int]:
    """Parameter (+ buffer) element counts: {'block_linear', 'block_other', 'once', 'other'} where
    'once' are the modules used once per call (text path + transformation network)."""
    from .transformer import Infinity

    with torch.device("meta"):
        model = Infinity(cfg)
    counts = dict.fromkeys(("block_linear", "block_other", "once", "other"), 0)
    for name, t in model.state_dict().items():
        if name.startswith("block_chunks."):
            counts["block_linear" if weights.is_block_linear(name) else "block_other"] += t.numel()
        elif name.split(".")[0] in ONCE_PER_SAMPLE_MODULES:
            counts["once"] += t.numel()
        else:
            counts["other"] += t.numel()
    return counts


@lru_cache(maxsize=64)
def block_linear_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, int]]:
    """{block linear (weights.BLOCK_LINEARS): weight shape [out, in]} of one block."""
    from .transformer import CrossAttnBlock

    with torch.device("meta"):
        block = CrossAttnBlock(cfg)
    return {n: tuple(block.get_submodule(n).weight.shape) for n in weights.BLOCK_LINEARS}


@lru_cache(maxsize=64)
def _param_counts_cached(cfg: TransformerConfig) -> tuple[tuple[str, int], ...]:
    return tuple(transformer_param_counts(cfg).items())


@lru_cache(maxsize=64)
def vae_decode_bytes(vae: VAEConfig, batch: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Peak bytes of live tensors while decoding a [batch, d, height, width] latent, obtained by
    running the decoder on the `meta` device (no memory, no compute) and tracking every tensor
    storage it creates: exact for this code's tensor allocations; convolution workspaces (cuDNN)
    are not included."""
    from .vae import BSQVAE

    with torch.device("meta"):
        model = BSQVAE(vae)
    model.decoder.to(dtype)
    tracker = TensorMemoryTracker()
    z = torch.empty(batch, vae.codebook_dim, height, width, device="meta")
    with tracker, torch.no_grad():
        model.decode(z)
    return tracker.peak


@lru_cache(maxsize=8)
def vae_param_count(vae: VAEConfig) -> tuple[int, int]:
    """(encoder + quantizer, decoder) element counts."""
    from .vae import BSQVAE

    with torch.device("meta"):
        model = BSQVAE(vae)
    dec = sum(t.numel() for t in model.decoder.state_dict().values())
    return sum(t.numel() for t in model.state_dict().values()) - dec, dec


def memory_required(
    cfg: TransformerConfig,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    *,
    vae: VAEConfig | None = VAEConfig(),
    vae_dtype: torch.dtype | None = None,
    schedule: list[tuple[int, int]] | None = None,
    cfg_scale: float = 1.0,
    text_tokens: int = 512,
    weight_format: str | weights.WeightFormat = "dense",
    blocks_on_cpu: int = 0,
    offload_text_and_map: bool = False,
    prefill: bool = True,
) -> MemoryEstimate:
    """Analytic device-memory estimate of one NSARM sampling call on `batch` tiles + their decode.

    cfg: the transformer config (e.g. `model.cfg` or PRESETS['nsarm-8b'].transformer); dtype: the
    blocks' compute dtype (bf16 as released; also the KV cache dtype); vae / vae_dtype: the VAE
    (None: not counted) and its decoder dtype (default `dtype`; the encoder is float32);
    cfg_scale != 1 doubles the transformer batch; text_tokens: prompt length (512 = the cap);
    weight_format / blocks_on_cpu / offload_text_and_map: as in `load_transformer` (a block-quantised
    format stores its packed blocks and adds one dequantised weight, float32 + dtype, to the peak).

    Terms (see BENCHMARKS.md): weights resident on the device; KV cache = depth x 2 x bs x (all
    tokens but the last scale's) x C x dtype; the text K/V of every block; the live tensors of
    one block at the largest scale (residual stream and modulated input in float32, qkv, rotated
    q / k, the concatenated K/V of the last scale, attention / projection outputs, or the two FFN
    hidden tensors, whichever is larger); the decoder's live tensors at the output resolution
    (measured on the meta device). Not included: CUDA context, kernel workspaces, allocator
    fragmentation, T5 (freed after encoding in the nodes).
    """
    fmt = weights.weight_format(weight_format)
    schedule = schedule or scale_schedule(1.0, "1M")
    counts = token_counts(schedule)
    e = _dtype_bytes(dtype)
    kv = e
    f32 = 4
    bs = batch * (2 if cfg_scale != 1.0 else 1)
    C, F, D = cfg.embed_dim, cfg.ffn_hidden, cfg.depth

    # weights
    pc = dict(_param_counts_cached(cfg))
    per_block_other = pc["block_other"] // D
    shapes = block_linear_shapes(cfg)
    block_bytes = fmt.bytes_per_block(shapes, e) + per_block_other * e
    resident_blocks = D - blocks_on_cpu + min(blocks_on_cpu, 2)  # + in use + prefetched
    once = pc["once"] * f32
    t_weights = resident_blocks * block_bytes + pc["other"] * f32 + (0 if offload_text_and_map else once)
    vae_w = 0
    if vae is not None:
        enc, dec = vae_param_count(vae)
        vae_w = enc * f32 + dec * _dtype_bytes(vae_dtype or dtype)

    # KV cache: all scales but the last (and at least the K prefilled ones)
    n_total, L = sum(counts), counts[-1]
    K = min(NUM_REPLACED_SCALES, len(counts)) if cfg.map_net is not None and prefill else 0
    cap = max(sum(counts[:K]), n_total - L)
    kv_cache = D * 2 * bs * cap * C * kv
    text_kv = D * 2 * bs * text_tokens * C * e

    # one block at the largest scale (L tokens attending to all n_total). Live at the attention
    # output projection (the peak of the attention half): the sampler's scale input, the block
    # input and its modulated copy (float32), qkv, the rotated q (float32), the concatenated K/V of
    # the last scale, and attention output / its head-merged copy / the projection (dtype).
    LC, NC, LF = bs * L * C, bs * n_total * C, bs * L * F
    held = 2 * LC * f32
    cat_kv = 2 * NC * kv if n_total > cap else 0  # the last scale's K, V are concatenated, not stored
    conv = 0 if e == f32 else 1  # a cast copy of the input of a linear in dtype
    attention = held + LC * f32 + LC * 3 * e + LC * f32 + cat_kv + LC * e * max(3, 1 + conv)
    # FFN half: block input, updated residual, modulated input (+ its cast), fc1 and GELU outputs
    ffn = held + LC * f32 * 2 + LC * e * conv + 2 * LF * e
    # a block-quantised linear dequantises its weight on each call: float32 + dtype copies, transient
    def dequantized(linears: tuple[str, ...]) -> int:
        return max((math.prod(shapes[n]) * (f32 + e) for n in linears if fmt.types.get(n)), default=0)

    attention += dequantized(("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.proj"))
    ffn += dequantized(("ffn.fc1", "ffn.fc2"))
    activations = max(attention, ffn)

    # prefill pass (block-causal over the K known scales): smaller than the last scale for 1M
    if K:
        nK = sum(counts[:K])
        kc = bs * nK * C
        prefill_act = (2 * kc * f32 + kc * (2 * f32 + 3 * e) + 2 * bs * cfg.num_heads * nK * nK * f32
                       + nK * nK + 2 * kc * e)
        activations = max(activations, prefill_act)

    # other sampling state: rope tables (cached on the model), the previous scale's hidden states
    # and tempered logits (alive until reassigned), the running latent (+ one upsampled update)
    # and the bits of every scale
    d = cfg.codebook_dim
    full = vae_scales(schedule, cfg.patchify)[-1]
    L_prev = counts[-2] if len(counts) > 1 else 0
    other = (2 * n_total * (cfg.head_dim // 2) * f32 + bs * L_prev * C * f32 + batch * L_prev * 2 * cfg.d_vae * f32
             + 2 * batch * d * full[0] * full[1] * f32 + batch * n_total * cfg.d_vae)

    decode = 0
    if vae is not None:
        decode = vae_decode_bytes(vae, batch, full[0], full[1], vae_dtype or dtype)
        decode += 2 * batch * d * full[0] * full[1] * f32  # the summed codes (and their cast)
    return MemoryEstimate(
        transformer_weights=t_weights, vae_weights=vae_w, kv_cache=kv_cache, text_kv=text_kv,
        sampling_activations=activations, sampling_other=other, decode=decode,
        details={"block_bytes": block_bytes, "resident_blocks": resident_blocks, "once_bytes": once,
                 "kv_tokens": cap, "batch": bs},
    )


def estimate_for(transformer, vae=None, batch: int = 1, *, cfg_scale: float = 1.0, text_tokens: int = 512,
                 schedule: list[tuple[int, int]] | None = None, prefill: bool = True) -> MemoryEstimate:
    """`memory_required` for loaded models: dtype, weight format, swapped blocks and offloading are
    read from them. For ComfyUI: `load_models_gpu([patcher], memory_required=estimate_for(...).inference)`."""
    vae_dtype = None
    if vae is not None:
        vae_dtype = next(vae.decoder.parameters()).dtype
    return memory_required(
        transformer.cfg, batch, transformer.block_dtype, vae=None if vae is None else vae.config,
        vae_dtype=vae_dtype, schedule=schedule, cfg_scale=cfg_scale, text_tokens=text_tokens,
        weight_format=getattr(transformer, "weight_format", "dense"),
        blocks_on_cpu=len(transformer.swapper.modules) if getattr(transformer, "swapper", None) else 0,
        offload_text_and_map=getattr(transformer, "offloader", None) is not None, prefill=prefill,
    )


def max_tile_batch(cfg: TransformerConfig, budget_bytes: int, dtype=torch.bfloat16, limit: int = 64, **kw) -> int:
    """Largest tile batch whose estimated peak fits `budget_bytes` (at least 1)."""
    best = 1
    for b in range(1, limit + 1):
        if memory_required(cfg, b, dtype, **kw).peak > budget_bytes:
            break
        best = b
    return best


# ---------------------------------------------------------------------------------------------
# Measuring live tensor memory (CPU or meta): exact tensor-allocation accounting


class TensorMemoryTracker(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the context and still alive, via a
    dispatch mode (every op's new output storages) and weakref finalizers (storage freed). `peak`
    is the high-water mark of those bytes; storages that existed before (weights) are not counted.
    Invisible: scratch memory an op allocates and frees internally (e.g. attention kernels)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for a in pytree.tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                inputs.add(id(a.untyped_storage()))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in inputs or key in self._seen:
                continue
            n = st.nbytes()
            self._seen.add(key)
            self.live += n
            weakref.finalize(st, self._freed, key, n)
        self.peak = max(self.peak, self.live)
        return out

