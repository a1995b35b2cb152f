"""The dtype policy of the transformer blocks: one function for every entry point.

`resolve_dtype(choice, device)` is what the command line (`--dtype`, for `upscale`, `upscale-dir`
and `bench`), the Python API (`load_pipeline(dtype=None)`, `load_transformer(dtype=None)`) and the
NSARM Model Loader node (`dtype` widget) call, so that "auto" means the same everywhere:

  auto  = bfloat16 on a CUDA GPU that supports it (as upstream, which casts the blocks to bf16
          before loading: half the memory of fp32, the published numerics), float32 on the CPU,
          on Apple MPS and on GPUs without bf16 (fp16 overflows in this model's activations, so it
          is never picked for you);
  bf16 / fp16 / fp32 (or a torch dtype) = that dtype. fp16 is only used when asked for; the
          sampler then stops with a clear error if it overflows (`sampler.NonFiniteLogitsError`).

Only the blocks follow the choice; the text path, embeddings, AdaLN projections, head and the
transformation network always stay float32. `bf16_supported` is the one place the hardware is
asked (tests replace it to simulate GPUs with and without bf16).
"""
from __future__ import annotations

import torch

from .options import DTYPES, TORCH_DTYPE_NAMES

BLOCK_DTYPES = tuple(getattr(torch, name) for name in TORCH_DTYPE_NAMES.values())  # bf16, fp16, fp32
AUTO = "auto"
AMPERE_MAJOR = 8  # CUDA compute capability from which bf16 is native (A100, RTX 30xx, H100, ...)


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU with native bfloat16 (Ampere or newer; ROCm GPUs that report
    it). Emulated bf16 on older GPUs does not count: it is slow."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.version.hip:  # AMD GPUs that run PyTorch support bf16
        return True
    return torch.cuda.get_device_capability(device)[0] >= AMPERE_MAJOR


def resolve_dtype(choice: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The block dtype for `choice` ("auto" or None, "bf16", "fp16", "fp32", or a torch dtype) on the
    device the blocks compute on (see the module docstring). Raises ValueError for anything else."""
    if isinstance(choice, torch.dtype):
        if choice not in BLOCK_DTYPES:
            raise ValueError(f"dtype {choice} is not supported for the transformer blocks; use one of "
                             f"{', '.join(map(str, BLOCK_DTYPES))}")
        return choice
    if choice is None or choice == AUTO:
        return torch.bfloat16 if bf16_supported(torch.device(device)) else torch.float32
    if choice in TORCH_DTYPE_NAMES:
        return getattr(torch, TORCH_DTYPE_NAMES[choice])
    raise ValueError(f"dtype {choice!r} is not one of {', '.join(DTYPES)}")
