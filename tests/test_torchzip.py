"""The lazy torch-zip reader: same tensors as torch.load, nothing unpickled beyond tensor descriptors."""
from __future__ import annotations

import pickle

import torch

from nsarm_nodes.loading import LazyStateDict, read_checkpoint
from nsarm_nodes.torchzip import read_torch_zip


class _Opaque:
    """Unpickling this needs code execution."""


def test_lazy_reader_returns_what_torch_load_returns(tmp_path):
    base = torch.randn(6, 8)
    sd = {"a": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "view": base[2:4], "t": base.t(),
          "p": torch.nn.Parameter(torch.randn(2)), "empty": torch.zeros(0, 3), "scalar": torch.tensor(3.5),
          "int": torch.arange(4), "half": torch.randn(2, 2).half()}
    path = tmp_path / "ck.pth"
    torch.save({"gpt_fsdp": sd, "epoch": 3, "args": {"lr": [1, 2]}}, path)
    obj = read_torch_zip(path)
    assert obj["epoch"] == 3 and obj["args"] == {"lr": [1, 2]}
    lazy = obj["gpt_fsdp"]
    assert isinstance(lazy, LazyStateDict) and list(lazy) == list(sd)
    assert lazy.shape("view") == (2, 8) and lazy.dtype("b") == torch.bfloat16  # from the pickle, no data read
    for k, v in sd.items():
        got = lazy[k]
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v.detach()), k
    assert isinstance(read_checkpoint(path)["gpt_fsdp"], LazyStateDict)  # the loader's dispatch


def test_anything_unusual_is_left_to_torch_load(tmp_path):
    code = tmp_path / "code.pth"
    torch.save({"w": torch.ones(2), "x": _Opaque()}, code)
    assert read_torch_zip(code) is None  # a global outside the list: never constructed here
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert read_torch_zip(legacy) is None
    junk = tmp_path / "junk.pth"
    junk.write_bytes(pickle.dumps({"w": 1}))
    assert read_torch_zip(junk) is None
    truncated = tmp_path / "cut.pth"
    torch.save({"w": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    assert read_torch_zip(truncated) is None


def test_forged_storage_kinds_and_negative_geometry_are_left_to_torch_load(tmp_path):
    """A pickle can build any tuple, but only find_class makes a storage class; negative sizes,
    strides or offsets are refused before any read. Both fall back to torch.load (None here)."""
    import io
    import zipfile

    def archive(name: str, pkl: bytes) -> object:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("ck/data.pkl", pkl)
            zf.writestr("ck/data/0", bytes(64))
        return read_torch_zip(path)

    class Forged:  # persistent id whose "storage class" is a plain tuple
        def __reduce__(self):
            return (tuple, ((("storage-class", "not a dtype")),))

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", ("storage-class", "float"), "0", "cpu", 4) if isinstance(obj, Forged) else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": Forged()})
    assert archive("forged.pth", buf.getvalue()) is None
    class Neg:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (Storage(), 0, (-4,), (1,), False, None))

    class Storage:
        pass

    class PN(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    PN(buf, protocol=2).dump({"w": Neg()})
    assert archive("negative.pth", buf.getvalue()) is None

    class Pos(Neg):  # control: the same archive with a valid size is read (so the Nones above are the checks)
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (Storage(), 0, (4,), (1,), False, None))

    buf = io.BytesIO()
    PN(buf, protocol=2).dump({"w": Pos()})
    read = archive("valid.pth", buf.getvalue())
    assert isinstance(read, LazyStateDict) and torch.equal(read["w"], torch.zeros(4))
