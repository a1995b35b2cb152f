"""Block-quantised storage of the transformer's block linear weights (GGUF-compatible blocks).

A weight W [out, in] is cut into blocks of 32 consecutive input channels of one output row (so
the q, k and v rows of the stacked qkv matrix never share a block). Each block stores 32 small
integers and an fp16 scale d (and, for the `_1` types, an fp16 minimum m), byte for byte as
GGUF / ggml lay them out, so a layer's storage is exactly the tensor data of a `.gguf` file:

    type   bytes/block  bits/weight  block value
    q8_0   34           8.5          d * q,        q int8 in -127..127,    d = amax / 127
    q5_1   24           6.0          d * q + m,    q in 0..31,             d = (max - min) / 31
    q5_0   22           5.5          d * (q - 16), q in 0..31,             d = -absmax_signed / 16
    q4_1   20           5.0          d * q + m,    q in 0..15,             d = (max - min) / 15
    q4_0   18           4.5          d * (q - 8),  q in 0..15,             d = -absmax_signed / 8

The quantisers here are vectorised torch code (CPU or CUDA, at load time) written to give the
same bytes as the `gguf` package's numpy reference (`gguf.quants.quantize`; tests check it bit
for bit), and the dequantiser the same float32 values as `gguf.quants.dequantize`.

A *weight format* (`WeightFormat`) says which block tensors get which block type; `FORMATS` lists
them. The transformer is given one by `load_transformer(weight_format=...)` and swaps each chosen
`nn.Linear` for a `BlockQuantLinear`, which dequantises its weight on every call (float32, then one
rounding to the compute dtype) and runs a dense matmul. Cost per call: reading the packed bytes and
writing a float32 and a compute-dtype copy of the weight (~7 bytes of memory traffic per weight,
about 1.4 GB per forward pass of one NSARM-8B block; a few ms per block on a current GPU, seconds
per block on a CPU) plus that transient copy (at most 0.3 GB, the FFN matrices).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 32  # weights per block (GGUF QK8_0 / QK4_0 / QK5_0 ...)
HALF = BLOCK // 2


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type: `ggml_type` is its GGMLQuantizationType value, `bits` the width of q,
    `affine` whether it stores a minimum (the `_1` types)."""

    name: str
    ggml_type: int
    bits: int
    affine: bool

    @property
    def type_size(self) -> int:
        """Bytes per block of 32 weights."""
        if self.bits == 8:
            return 2 + BLOCK
        return 2 + (2 if self.affine else 0) + (4 if self.bits == 5 else 0) + HALF

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / BLOCK


# GGMLQuantizationType values (gguf.constants): Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7, Q8_0=8.
BLOCK_TYPES = {t.name: t for t in (
    BlockType("q8_0", 8, 8, False),
    BlockType("q5_1", 7, 5, True),
    BlockType("q5_0", 6, 5, False),
    BlockType("q4_1", 3, 4, True),
    BlockType("q4_0", 2, 4, False),
)}
BLOCK_TYPE_BY_GGML = {t.ggml_type: t for t in BLOCK_TYPES.values()}


class QuantError(ValueError):
    """A tensor that cannot be block-quantised (shape or non-finite values)."""


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """Round half away from zero exactly as ggml's reference (and gguf's `np_roundf`) does."""
    a = v.abs()
    fl = a.floor()
    return torch.sign(v) * (fl + (2 * (a - fl)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d, 0 where d == 0 (float32)."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [..., 32] -> [..., 16]: low nibble = element j, high nibble = element j + 16."""
    return (q[..., :HALF] & 0x0F) | (q[..., HALF:] << 4)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] uint8 -> [..., 32] uint8 (inverse of `_pack_nibbles`, low 4 bits only)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bit_shifts(device) -> torch.Tensor:
    """0..7 as uint8 on `device` (made there: no host-to-device copy inside a forward pass)."""
    return torch.arange(8, dtype=torch.uint8, device=device)


def _pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of 32 values -> 4 bytes, little bit order (bit k of byte j = element 8j + k)."""
    bits = ((q >> 4) & 1).view(*q.shape[:-1], 4, 8)
    return (bits << _bit_shifts(q.device)).sum(-1, dtype=torch.uint8)


def _unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[..., 4] uint8 -> [..., 32] uint8 of 0/1 (inverse of `_pack_high_bits`)."""
    bits = (qh.unsqueeze(-1) >> _bit_shifts(qh.device)) & 1
    return bits.flatten(-2)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., 1] -> its fp16 value as 2 little-endian bytes [..., 2]."""
    return x.to(torch.float16).view(torch.uint8)


def quantize(w: torch.Tensor, block_type: str | BlockType) -> torch.Tensor:
    """w [out, in] (any float dtype, in % 32 == 0; CPU or CUDA) -> packed GGUF blocks, uint8
    [out, in / 32 * type_size] on w's device (the `gguf.quants.quantize` bytes for the same values)."""
    bt = BLOCK_TYPES[block_type] if isinstance(block_type, str) else block_type
    if w.dim() != 2 or w.shape[1] % BLOCK:
        raise QuantError(f"{bt.name} needs a 2-D weight whose input width is a multiple of {BLOCK}, "
                         f"got shape {list(w.shape)}")
    out, width = w.shape
    x = w.float().reshape(out, width // BLOCK, BLOCK)  # [out, nb, 32]
    if not bool(torch.isfinite(x).all()):  # load-time check (one host sync per tensor)
        raise QuantError("cannot quantise non-finite weights")
    if bt.bits == 8:
        d = x.abs().amax(-1, keepdim=True) / 127
        q = _roundf(x * _inverse(d)).to(torch.int8).view(torch.uint8)
        parts = [_f16_bytes(d), q]
    elif not bt.affine:
        levels = 1 << (bt.bits - 1)  # 8 or 16
        peak = torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))  # signed value of largest |x|
        d = peak / -levels
        q = (x * _inverse(d) + (levels + 0.5)).trunc().clamp_(0, 2 * levels - 1).to(torch.uint8)
        parts = [_f16_bytes(d)]
    else:
        top = (1 << bt.bits) - 1  # 15 or 31
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        d = (hi - lo) / top
        q = ((x - lo) * _inverse(d) + 0.5).trunc().clamp_(0, top).to(torch.uint8)
        parts = [_f16_bytes(d), _f16_bytes(lo)]
    if bt.bits == 5:
        parts.append(_pack_high_bits(q))
    if bt.bits != 8:
        parts.append(_pack_nibbles(q))
    return torch.cat(parts, dim=-1).reshape(out, -1)


def dequantize(packed: torch.Tensor, block_type: str | BlockType, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed uint8 [out, nb * type_size] -> weight [out, nb * 32], computed in float32 (the same
    values as `gguf.quants.dequantize`) and rounded once to `dtype`."""
    bt = BLOCK_TYPES[block_type] if isinstance(block_type, str) else block_type
    out = packed.shape[0]
    b = packed.view(out, -1, bt.type_size)  # [out, nb, type_size]
    d = b[..., :2].contiguous().view(torch.float16).float()  # [out, nb, 1]
    if bt.bits == 8:
        w = b[..., 2:].view(torch.int8).float() * d
    else:
        pos = 4 if bt.affine else 2
        q = _unpack_nibbles(b[..., -HALF:])
        if bt.bits == 5:
            q = q | (_unpack_high_bits(b[..., pos:pos + 4]) << 4)
        if bt.affine:
            w = d * q.float() + b[..., 2:4].contiguous().view(torch.float16).float()
        else:
            w = d * (q.to(torch.int8) - (1 << (bt.bits - 1))).float()
    return w.reshape(out, -1).to(dtype)


def packed_shape(shape: tuple[int, int], block_type: str | BlockType) -> tuple[int, int]:
    """Shape of the packed bytes of a weight of `shape` [out, in]."""
    bt = BLOCK_TYPES[block_type] if isinstance(block_type, str) else block_type
    return shape[0], shape[1] // BLOCK * bt.type_size


class BlockQuantLinear(nn.Module):
    """A linear layer whose weight is stored as packed GGUF blocks (buffer `packed`, uint8
    [out, in / 32 * type_size]) and dequantised to `compute_dtype` on every call."""

    def __init__(self, packed: torch.Tensor, block_type: str, in_features: int,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.block_type = BLOCK_TYPES[block_type]
        self.in_features, self.out_features = in_features, packed.shape[0]
        self.compute_dtype = compute_dtype
        self.register_buffer("packed", packed)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] in `compute_dtype` (a new tensor per call)."""
        return dequantize(self.packed, self.block_type, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.dequantized_weight(), b)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.block_type.name}, compute={self.compute_dtype}"


# ---------------------------------------------------------------------------------------------
# Weight formats: which block linear gets which block type

# The block linears (8 C^2 + 2 C F weights per block: 99.98% of the block parameters), by the
# module path inside a block.
BLOCK_LINEARS = ("sa.mat_qkv", "sa.proj", "ca.mat_q", "ca.mat_kv", "ca.proj", "ffn.fc1", "ffn.fc2")


def is_block_linear(key: str) -> bool:
    """Whether a checkpoint key is a block linear's weight (`block_chunks.*.<linear>.weight`)."""
    return key.startswith("block_chunks.") and any(key.endswith(f".{n}.weight") for n in BLOCK_LINEARS)


@dataclass(frozen=True)
class WeightFormat:
    """How block linear weights are stored: `types` maps a block linear (see BLOCK_LINEARS) to a
    block type name, or to None = kept dense in the compute dtype. `note` is the user-facing line."""

    name: str
    types: dict
    note: str

    @property
    def quantized(self) -> bool:
        return any(self.types.values())

    def block_type_for(self, key: str) -> BlockType | None:
        """The block type of a block linear's weight key (`...<linear>.weight`, e.g.
        `block_chunks.0.module.3.sa.mat_qkv.weight` or `sa.mat_qkv.weight`), None if kept dense."""
        for linear, t in self.types.items():
            if t is not None and (key == f"{linear}.weight" or key.endswith(f".{linear}.weight")):
                return BLOCK_TYPES[t]
        return None

    def bytes_per_block(self, shapes: dict[str, tuple[int, int]], dense_bytes: int) -> int:
        """Bytes of one block's linear weights, `shapes` = {linear: (out, in)}."""
        total = 0
        for linear, (o, i) in shapes.items():
            t = self.types.get(linear)
            total += o * i * dense_bytes if t is None else o * (i // BLOCK) * BLOCK_TYPES[t].type_size
        return total


def swap_in_quantized(module: nn.Module, fmt: WeightFormat, compute_dtype: torch.dtype) -> list[str]:
    """Replace each nn.Linear of `module` that `fmt` quantises by a BlockQuantLinear computing in
    `compute_dtype`; returns the replaced names (relative to `module`). A layer on the `meta`
    device gets a meta `packed` buffer (for the loader to fill); a real one is quantised now."""
    names = []
    for name, sub in list(module.named_modules()):
        bt = fmt.block_type_for(f"{name}.weight")
        if bt is None or not isinstance(sub, nn.Linear):
            continue
        w = sub.weight.detach()
        packed = (torch.empty(packed_shape(tuple(w.shape), bt), dtype=torch.uint8, device="meta") if w.is_meta
                  else quantize(w, bt))
        bias = None if sub.bias is None else sub.bias.detach()
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr,
                BlockQuantLinear(packed, bt.name, w.shape[1], bias, compute_dtype))
        names.append(name)
    return names


def _all(block_type: str | None) -> dict:
    return dict.fromkeys(BLOCK_LINEARS, block_type)


FORMATS = {f.name: f for f in (
    WeightFormat("dense", _all(None), "weights in the compute dtype (bf16 / fp16 / fp32)"),
    WeightFormat("q8_0_mixed", dict(_all("q8_0"), **{"sa.mat_qkv": None}),
                 "GGUF Q8_0 blocks for the block linears except the self-attention q/k/v projection, which stays "
                 "in the compute dtype (bf16): 9.9 bits/weight for NSARM-8B"),
    WeightFormat("q8_0", _all("q8_0"), "8.5 bits/weight GGUF Q8_0 blocks for every block linear"),
    WeightFormat("q5_1_mixed", dict(_all("q5_1"), **{"sa.mat_qkv": "q8_0"}),
                 "GGUF Q5_1 blocks, the self-attention q/k/v projection Q8_0: 6.5 bits/weight for NSARM-8B"),
    WeightFormat("q5_1", _all("q5_1"), "6 bits/weight GGUF Q5_1 blocks for every block linear"),
    WeightFormat("q4_1", _all("q4_1"), "5 bits/weight GGUF Q4_1 blocks for every block linear"),
)}
# Old saved values that still load: per-tensor fp8 was replaced by per-block q8_0.
FORMAT_ALIASES = {"fp8": "q8_0"}


def weight_format(name: str | WeightFormat) -> WeightFormat:
    """The WeightFormat called `name` (aliases resolved), or ValueError listing the choices."""
    if isinstance(name, WeightFormat):
        return name
    fmt = FORMATS.get(FORMAT_ALIASES.get(name, name))
    if fmt is None:
        raise ValueError(f"weight_format must be one of {tuple(FORMATS) + tuple(FORMAT_ALIASES)}, got {name!r}")
    return fmt


def bits_per_weight(fmt: str | WeightFormat, shapes: dict[str, tuple[int, int]], dense_bits: int = 16) -> float:
    """Average stored bits per block-linear weight of `fmt` for one block of `shapes`."""
    fmt = weight_format(fmt)
    n = sum(math.prod(s) for s in shapes.values())
    return fmt.bytes_per_block(shapes, dense_bits // 8) * 8 / n
