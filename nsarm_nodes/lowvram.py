"""Low-VRAM machinery and the memory estimate.

- `quantize_fp8`: per-tensor e4m3 storage of block linear weights (see transformer.linear).
- `ModuleSwapper`: keeps modules (transformer blocks, or the once-per-sample text path and
  transformation network) in CPU memory and puts them on the compute device only while they run.
  Blocks are prefetched one ahead on a side CUDA stream with non-blocking copies from pinned
  memory, so at most two swapped blocks are on the device at a time. On a CPU-only machine the
  same code path runs with CPU -> CPU copies, which is how the tests check it.
- `memory_required`: analytic peak-memory estimate of an NSARM run (weights + KV cache +
  activations of the largest scale, then the VAE decode), for ComfyUI's
  `load_models_gpu(memory_required=...)`, for choosing a tile batch, and for BENCHMARKS.md.

None of this changes the numerics of a model, except fp8 storage (documented bound in
BENCHMARKS.md / tests/test_speed_memory.py).
"""
from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .config import NUM_REPLACED_SCALES, TransformerConfig, VAEConfig
from .schedule import scale_schedule, token_counts, vae_scales

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# Root modules used once per sampling call (the text path) or once per LR image (map network).
ONCE_PER_SAMPLE_MODULES = ("text_norm", "text_proj_for_sos", "text_proj_for_ca", "shared_ada_lin", "map_transformer")
GB = 1e9


# ---------------------------------------------------------------------------------------------
# fp8 weights


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """w (any float dtype) -> (e4m3 tensor of w / s, s) with s = amax(|w|) / 448 (1 for all-zero w).

    Runs where `w` is (at load time; the one .item() here is a load-time sync)."""
    amax = float(w.abs().amax().float().item())
    if not math.isfinite(amax):
        raise ValueError("cannot store non-finite weights as fp8")
    scale = amax / FP8_MAX if amax > 0 else 1.0
    q = (w.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: float, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale


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


def spread(n: int, depth: int) -> list[int]:
    """n block indices spread evenly over 0..depth-1 (so swapped blocks alternate with resident
    ones and each copy can overlap the compute of resident blocks)."""
    if n <= 0:
        return []
    return sorted({(k * depth) // n for k in range(n)})


def to_offload(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    """Move a tensor to its home (offload) device; pinned when it will be copied to a GPU."""
    t = t.to(device)
    return t.pin_memory() if pin and t.device.type == "cpu" else t


# ---------------------------------------------------------------------------------------------
# Module swapping


class ModuleSwapper:
    """Modules whose tensors live on an offload device and visit `device` only while in use.

    `acquire(i)` / `release(i)` (or the `resident(module)` context, or forward hooks when
    `hooks=True`) put module i's parameters and buffers on the device and back. With
    `prefetch=True`, acquiring module i starts the copy of module i+1 (cyclically, so the first
    block of the next scale is prefetched during the last one) on a side CUDA stream; the compute
    stream waits on an event before using it, and `record_stream` keeps the caching allocator
    from reusing the memory early. Tensors keep their dtype (fp8 weights move as fp8).

    While a module is not resident its tensors are its offload copies (CPU), so `state_dict()`
    keeps working; `park_on_meta=True` (tests) parks them as meta tensors instead, so that any
    use outside residency fails loudly.

    Counters: `loads` (copies made), `bytes_moved`, `max_resident` (modules on the device at once,
    in use or prefetched).
    """

    def __init__(self, modules: Iterable[nn.Module], device, *, hooks: bool = True, prefetch: bool = True,
                 park_on_meta: bool = False):
        self.modules = list(modules)
        self.device = torch.device(device)
        self.prefetch = prefetch
        self._index = {id(m): i for i, m in enumerate(self.modules)}
        self._slots = [self._find_slots(m) for m in self.modules]
        self._home = [{name: self._get(slot) for name, slot in slots.items()} for slots in self._slots]
        self._parked = self._home
        if park_on_meta:
            self._parked = [{n: torch.empty_like(t, device="meta") for n, t in home.items()} for home in self._home]
            for i in range(len(self.modules)):
                self._assign(i, self._parked[i])
        self._users = [0] * len(self.modules)
        self._ready: dict[int, tuple[dict[str, torch.Tensor], object]] = {}
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.loads = 0
        self.bytes_moved = 0
        self.max_resident = 0
        self._handles = []
        if hooks:
            for m in self.modules:
                self.add_hooks(m)

    # -- bookkeeping ---------------------------------------------------------------------------

    @staticmethod
    def _find_slots(module: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
        slots = {}
        for prefix, mod in module.named_modules():
            for attr, p in mod._parameters.items():
                if p is not None:
                    slots[f"{prefix}.{attr}" if prefix else attr] = (mod, attr, True)
            for attr, b in mod._buffers.items():
                if b is not None:
                    slots[f"{prefix}.{attr}" if prefix else attr] = (mod, attr, False)
        return slots

    @staticmethod
    def _get(slot) -> torch.Tensor:
        mod, attr, is_param = slot
        t = mod._parameters[attr] if is_param else mod._buffers[attr]
        return t.detach()

    def _assign(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        for name, (mod, attr, is_param) in self._slots[i].items():
            if is_param:
                param, t = mod._parameters[attr], tensors[name]
                if param.is_meta or t.is_meta:  # meta <-> real cannot share a Parameter object
                    mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
                else:
                    param.data = t
            else:
                mod._buffers[attr] = tensors[name]

    def manages(self, module: nn.Module) -> bool:
        return id(module) in self._index

    def module_bytes(self, i: int) -> int:
        return sum(t.numel() * t.element_size() for t in self._home[i].values())

    @property
    def offloaded_bytes(self) -> int:
        return sum(self.module_bytes(i) for i in range(len(self.modules)))

    def resident_count(self) -> int:
        return sum(1 for u in self._users if u > 0) + len(self._ready)

    # -- moving --------------------------------------------------------------------------------

    def _fetch(self, i: int) -> None:
        if i in self._ready or self._users[i] > 0:
            return
        home = self._home[i]
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                copies = {n: t.to(self.device, non_blocking=True) for n, t in home.items()}
                event = torch.cuda.Event()
                event.record(self._stream)
        else:
            copies = {n: t.to(self.device, copy=True) for n, t in home.items()}
            event = None
        self._ready[i] = (copies, event)
        self.loads += 1
        self.bytes_moved += self.module_bytes(i)
        self.max_resident = max(self.max_resident, self.resident_count())

    def acquire(self, i: int) -> None:
        if self._users[i] > 0:
            self._users[i] += 1
            return
        self._fetch(i)  # no-op when prefetched
        copies, event = self._ready.pop(i)
        self._users[i] = 1
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in copies.values():
                t.record_stream(stream)
        self._assign(i, copies)
        if self.prefetch and len(self.modules) > 1:
            self._fetch((i + 1) % len(self.modules))

    def release(self, i: int) -> None:
        if self._users[i] == 0:
            return
        self._users[i] -= 1
        if self._users[i] == 0:
            self._assign(i, self._parked[i])  # the device copies are freed here

    @contextlib.contextmanager
    def resident(self, module: nn.Module | Iterable[nn.Module] | None = None):
        """Context with `module` (a module, several, or default all managed modules) on the device."""
        if module is None:
            idx = list(range(len(self.modules)))
        elif isinstance(module, nn.Module):
            idx = [self._index[id(module)]]
        else:
            idx = [self._index[id(m)] for m in module if self.manages(m)]
        for i in idx:
            self.acquire(i)
        try:
            yield
        finally:
            for i in idx:
                self.release(i)

    def add_hooks(self, module: nn.Module) -> None:
        i = self._index[id(module)]
        self._handles.append(module.register_forward_pre_hook(lambda _m, _a: self.acquire(i)))
        self._handles.append(module.register_forward_hook(lambda _m, _a, _o: self.release(i), always_call=True))

    def remove(self) -> None:
        """Detach: hooks removed, every module back on its offload copies."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._ready.clear()
        for i in range(len(self.modules)):
            self._users[i] = 0
            self._assign(i, self._home[i])


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
    from .transformer import Infinity, is_fp8_target

    with torch.device("meta"):
        model = Infinity(cfg)
    counts = dict.fromkeys(("block_linear", "block_other", "once", "other"), 0)
    for name, t in model.state_dict().items():
        if name.startswith("block_chunks."):
            counts["block_linear" if is_fp8_target(name) else "block_other"] += t.numel()
        elif name.split(".")[0] in ONCE_PER_SAMPLE_MODULES:
            counts["once"] += t.numel()
        else:
            counts["other"] += t.numel()
    return counts


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
    weight_format: str = "dense",
    blocks_on_cpu: int = 0,
    offload_text_and_map: bool = False,
    prefill: bool = True,
) -> MemoryEstimate:
    """Analytic device-memory estimate of one NSARM sampling call on `batch` tiles + their decode.

    cfg: the transformer config (e.g. `model.cfg` or PRESETS['nsarm-8b'].transformer); dtype: the
    blocks' compute dtype (bf16 as released; also the KV cache dtype); vae / vae_dtype: the VAE
    (None: not counted) and its decoder dtype (default `dtype`; the encoder is float32);
    cfg_scale != 1 doubles the transformer batch; text_tokens: prompt length (512 = the cap);
    weight_format / blocks_on_cpu / offload_text_and_map: as in `load_transformer`.

    Terms (see BENCHMARKS.md): weights resident on the device; KV cache = depth x 2 x bs x (all
    tokens but the last scale's) x C x dtype; the text K/V of every block; the live tensors of
    one block at the largest scale (residual stream and modulated input in float32, qkv, rotated
    q / k, the concatenated K/V of the last scale, attention / projection outputs, or the two FFN
    hidden tensors, whichever is larger); the decoder's live tensors at the output resolution
    (measured on the meta device). Not included: CUDA context, kernel workspaces, allocator
    fragmentation, T5 (freed after encoding in the nodes).
    """
    if weight_format not in ("dense", "fp8"):
        raise ValueError(f"weight_format must be 'dense' or 'fp8', got {weight_format!r}")
    schedule = schedule or scale_schedule(1.0, "1M")
    counts = token_counts(schedule)
    e = _dtype_bytes(dtype)
    kv = e
    f32 = 4
    bs = batch * (2 if cfg_scale != 1.0 else 1)
    C, F, D = cfg.embed_dim, cfg.ffn_hidden, cfg.depth

    # weights
    pc = dict(_param_counts_cached(cfg))
    per_block_linear = pc["block_linear"] // D
    per_block_other = pc["block_other"] // D
    block_bytes = per_block_linear * (1 if weight_format == "fp8" else e) + per_block_other * e
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

