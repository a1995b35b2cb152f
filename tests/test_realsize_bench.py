"""The real-size benchmark's checkpoint writers (the benchmark itself is run by hand: BENCHMARKS.md)."""
from __future__ import annotations

import pytest
import torch

from conftest import GOLDEN
from nsarm_nodes.loading import LazyEntry, read_checkpoint, write_safetensors
from nsarm_nodes.realsize_bench import transformer_entries, write_torch_pth
from nsarm_nodes.transformer import load_transformer


def test_streamed_pth_is_a_torch_checkpoint_with_aligned_records(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "c": torch.randn(2, 3, 4),
               "empty": torch.zeros(0, 7)}
    entries = {k: LazyEntry(lambda t=t: t, tuple(t.shape), t.dtype) for k, t in tensors.items()}
    path = write_torch_pth(tmp_path / "x.pth", entries, wrapper="gpt_fsdp")
    for mmap in (False, True):
        back = torch.load(path, weights_only=True, mmap=mmap)["gpt_fsdp"]
        assert list(back) == list(tensors)
        for k, t in tensors.items():
            assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    reader = torch._C.PyTorchFileReader(str(path))
    assert all(reader.get_record_offset(f"data/{i}") % 64 == 0 for i in range(3))


@pytest.mark.parametrize("pth", [False, True])
def test_random_checkpoint_loads_through_the_real_loader(tmp_path, pth):
    cfg = load_transformer(GOLDEN / "weights_transformer.safetensors").cfg  # the tiny golden shapes
    if pth:
        path = write_torch_pth(tmp_path / "NSARM.pth", transformer_entries(cfg, torch.float32), "gpt_fsdp")
    else:
        path = write_safetensors(tmp_path / "NSARM.safetensors", transformer_entries(cfg, torch.bfloat16))
    model = load_transformer(path, dtype=torch.bfloat16)
    assert model.cfg == cfg
    sd = read_checkpoint(path)
    name = next(k for k in model.state_dict() if k.startswith("block_chunks.") and k.endswith("weight"))
    source = sd["gpt_fsdp"][name] if pth else sd[name]
    assert torch.equal(model.state_dict()[name], source.to(torch.bfloat16))
