"""Lazy reader of torch.save zip checkpoints: each tensor is read from the file when it is used.

`torch.load(mmap=True)` maps the whole file, so every page a conversion touches stays in the
process's RSS until it ends (a 35 GB fp32 NSARM.pth shows ~35 GB resident, file-backed but
counted, e.g. against a container's memory limit). This reader parses the archive's `data.pkl`
with a restricted unpickler that only knows how to describe tensors (the rebuild functions of
torch.save, OrderedDict and the storage classes; every other global is refused, so no code in the
file ever runs) and reads each tensor's bytes with plain file reads from its stored (uncompressed)
zip member when the tensor is accessed. Mappings holding only tensors come back as
`loading.LazyStateDict`s (shape and dtype without reading); other values as unpickled.

`read_torch_zip(path)` returns None for anything it does not handle (a legacy non-zip pickle, a
compressed member, another byte order, a global outside its list): the caller then uses
torch.load(weights_only=True), which also refuses code execution and owns the error messages.
"""
from __future__ import annotations

import collections
import math
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .loading import LazyEntry, LazyStateDict

LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header: fixed 30 bytes
LOCAL_HEADER_MAGIC = b"PK\x03\x04"


class _Unsupported(Exception):
    """Something this reader does not handle; torch.load takes over."""


# Anything a damaged or unusual archive / pickle raises while it is parsed: torch.load takes over
# (and gives its own error, or reads the file), never a traceback from here.
NOT_HANDLED = (_Unsupported, zipfile.BadZipFile, KeyError, pickle.UnpicklingError, EOFError, ValueError, TypeError,
               AttributeError, IndexError, OSError, UnicodeDecodeError, struct.error, RecursionError, OverflowError)


class _Storage:
    """A storage of the archive: member `data/<key>`, element dtype."""

    def __init__(self, key: str, dtype: torch.dtype):
        self.key, self.dtype = key, dtype


class _StorageClass:
    """What a pickled torch storage class name (e.g. torch.FloatStorage) resolves to: its dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Tensor:
    """A tensor descriptor: its storage, offset (elements), size and stride (none negative)."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        if self.offset < 0 or any(n < 0 for n in self.size + self.stride) or len(self.size) != len(self.stride):
            raise _Unsupported("negative tensor geometry")


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise _Unsupported("tensor without an archive storage")
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data  # a Parameter is read as its tensor


def _storage_classes() -> dict[str, torch.dtype]:
    """Storage class name (as torch.save pickles it, e.g. FloatStorage) -> element dtype."""
    return {name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()}


_ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch", "Size"): torch.Size}


class _DescriptorUnpickler(pickle.Unpickler):
    """Builds tensor descriptors; refuses every global not in `_ALLOWED` or a torch storage class."""

    def __init__(self, file, storage_dtypes: dict[str, torch.dtype]):
        super().__init__(file)
        self._storage_dtypes = storage_dtypes
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in self._storage_dtypes:
            return _StorageClass(self._storage_dtypes[name])
        raise _Unsupported(f"global {module}.{name}")

    def persistent_load(self, pid):
        # torch.save: ("storage", storage class, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Unsupported(f"persistent id {pid!r}")
        kind, key = pid[1], str(pid[2])
        if not isinstance(kind, _StorageClass):  # only find_class makes these: a pickle cannot forge one
            raise _Unsupported("untyped storage")
        return self._storages.setdefault(key, _Storage(key, kind.dtype))


def _data_offset(f, info: zipfile.ZipInfo) -> int:
    """Offset in the file of a stored member's first data byte (after its local header)."""
    f.seek(info.header_offset)
    fields = LOCAL_HEADER.unpack(f.read(LOCAL_HEADER.size))
    if fields[0] != LOCAL_HEADER_MAGIC:
        raise _Unsupported("bad local header")
    name_len, extra_len = fields[9], fields[10]
    return info.header_offset + LOCAL_HEADER.size + name_len + extra_len


def _reader(path: Path, offset: int, nbytes: int, t: _Tensor):
    def load() -> torch.Tensor:
        buf = bytearray(nbytes)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(buf) != nbytes:
                raise OSError(f"{path}: truncated tensor data")
        if not nbytes:
            return torch.empty(t.size, dtype=t.storage.dtype)
        flat = torch.frombuffer(buf, dtype=t.storage.dtype)  # [offset + span] elements
        if _contiguous_from_start(t):
            return flat.view(t.size)
        return flat.as_strided(t.size, t.stride, t.offset).clone()  # only the viewed elements are kept
    return load


def _contiguous_from_start(t: _Tensor) -> bool:
    expected = tuple(math.prod(t.size[i + 1:]) for i in range(len(t.size)))
    return t.offset == 0 and all(s == e for s, e, n in zip(t.stride, expected, t.size) if n > 1)


def read_torch_zip(path: str | os.PathLike) -> object | None:
    """The checkpoint with lazy tensors (see the module docstring), or None when not handled."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                return None
            prefix = pkl[: -len("data.pkl")]
            order = f"{prefix}byteorder"
            if order in names and zf.read(order).decode().strip() != sys.byteorder:
                return None
            unpickler = _DescriptorUnpickler(zf.open(pkl), _storage_classes())
            obj = unpickler.load()
            members = {}
            with open(path, "rb") as f:
                for key, st in unpickler._storages.items():
                    info = zf.getinfo(f"{prefix}data/{key}")
                    if info.compress_type != zipfile.ZIP_STORED:
                        return None
                    members[key] = (_data_offset(f, info), info.file_size)
    except NOT_HANDLED:
        return None

    def entry(t: _Tensor) -> LazyEntry:
        start, size = members[t.storage.key]
        span = 0 if any(n == 0 for n in t.size) else 1 + sum((n - 1) * s for n, s in zip(t.size, t.stride))
        nbytes = (t.offset + span) * t.storage.dtype.itemsize if span else 0
        if nbytes > size:
            raise _Unsupported("tensor beyond its storage")
        return LazyEntry(_reader(path, start, nbytes, t), t.size, t.storage.dtype)

    def convert(x):
        if isinstance(x, _Tensor):
            return entry(x).load()
        if isinstance(x, Mapping):
            if x and all(isinstance(v, _Tensor) for v in x.values()):
                return LazyStateDict({k: entry(v) for k, v in x.items()}, str(path))
            return type(x)((k, convert(v)) for k, v in x.items()) if isinstance(x, dict) else x
        if isinstance(x, (list, tuple)):
            return type(x)(convert(v) for v in x)
        return x

    try:
        return convert(obj)
    except NOT_HANDLED:
        return None
