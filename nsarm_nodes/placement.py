"""Where block weights live: modules kept in CPU memory that visit the compute device only while
they run (block swapping, and the once-per-sample text path / transformation network).

`ModuleSwapper` keeps modules (transformer blocks, or the text path and transformation network)
in CPU memory and puts them on the compute device only while they run. Blocks are prefetched one
ahead on a side CUDA stream with non-blocking copies from pinned memory, so at most two swapped
blocks are on the device at a time. On a CPU-only machine the same code path runs with CPU -> CPU
copies, which is how the tests check it. None of this changes a model's numerics.

`load_transformer` is given the placement (`blocks_on_cpu`, `offload_text_and_map`) and uses
`spread` / `to_offload` / `ONCE_PER_SAMPLE_MODULES` from here; this module imports nothing of the
model.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

# Root modules used once per sampling call (the text path) or once per LR image (map network).
ONCE_PER_SAMPLE_MODULES = ("text_norm", "text_proj_for_sos", "text_proj_for_ca", "shared_ada_lin", "map_transformer")


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


class ModuleSwapper:
    """Modules whose tensors live on an offload device and visit `device` only while in use.

    `acquire(i)` / `release(i)` (or the `resident(module)` context, or forward hooks when
    `hooks=True`) put module i's parameters and buffers on the device and back. With
    `prefetch=True`, acquiring module i starts the copy of module i+1 (cyclically, so the first
    block of the next scale is prefetched during the last one) on a side CUDA stream; the compute
    stream waits on an event before using it, and `record_stream` keeps the caching allocator
    from reusing the memory early. Tensors keep their dtype (block-quantised weights move as their packed bytes).

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
