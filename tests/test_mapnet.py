"""Transformation network: golden parity (tiny model), batching, released layout and size."""
from __future__ import annotations

import re

import pytest
import torch

from nsarm_nodes.config import PRESETS, MapNetConfig
from nsarm_nodes.loading import CheckpointError
from nsarm_nodes.mapnet import MapTransformer, infer_mapnet_config
from nsarm_nodes.quantizer import map_outputs_to_bits

from conftest import KEYS, golden

PREFIX = "map_transformer."
RELEASED_PARAMS = 385_103_600
ATOL = RTOL = 1e-4  # tests/golden/README.md, tolerances
BATCH_ATOL = 1e-5
KEYS_FILE = KEYS / "nsarm_8b_keys.txt"


def _map_subset(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def tiny() -> MapTransformer:
    sd = golden("weights_transformer")
    model = MapTransformer(infer_mapnet_config(sd)).eval()
    model.load_state_dict(_map_subset(sd), strict=True)  # every key consumed, none missing
    return model


@pytest.fixture(scope="module")
def tiny_run(tiny):
    """(features, outputs) of the tiny model on the golden input; features via a forward hook."""
    captured = {}
    handle = tiny.feature_extractor.register_forward_hook(lambda m, i, o: captured.update(f=o))
    try:
        with torch.no_grad():
            outs = tiny(golden("map_network")["h"])
    finally:
        handle.remove()
    return captured["f"], outs


def _released_shapes() -> dict[str, tuple[int, ...]]:
    """map_transformer.* keys of the released NSARM checkpoint, prefix stripped, with shapes."""
    shapes = {}
    for line in KEYS_FILE.read_text().splitlines():
        name, shape, _ = line.split("\t")
        if name.startswith(PREFIX):
            shapes[name[len(PREFIX):]] = tuple(int(n) for n in re.findall(r"\d+", shape))
    return shapes


def test_inferred_config_is_tiny_preset():
    assert infer_mapnet_config(golden("weights_transformer")) == PRESETS["tiny"].transformer.map_net


def test_features_match_golden(tiny_run):
    features, _ = tiny_run
    torch.testing.assert_close(features, golden("map_network")["features"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("i", range(7))
def test_outputs_and_bits_match_golden(tiny_run, i):
    g = golden("map_network")
    out = tiny_run[1][i]
    side = MapNetConfig().output_sizes[i]
    assert out.shape == (1, side * side, 14)
    torch.testing.assert_close(out, g[f"out_{i}"], atol=ATOL, rtol=RTOL)
    # golden quantizer layout [B, T=1, s, s, d] -> our latent-bit layout [B, d, s, s]
    expected = g[f"bits_{i}"][:, 0].permute(0, 3, 1, 2)
    assert torch.equal(map_outputs_to_bits(out, side), expected)


def test_batch_items_are_independent(tiny):
    h = golden("map_network")["h"]
    other = h + 0.1 * torch.randn(h.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batched = tiny(torch.cat([h, other]))
        singles = [tiny(h), tiny(other)]
    for i, out in enumerate(batched):
        for b in range(2):
            torch.testing.assert_close(out[b : b + 1], singles[b][i], atol=BATCH_ATOL, rtol=0)


def test_released_parameter_count():
    with torch.device("meta"):
        model = MapTransformer(MapNetConfig())
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS


def test_released_key_names_and_shapes():
    with torch.device("meta"):
        model = MapTransformer(MapNetConfig())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _released_shapes()


def test_infer_released_config_from_shapes():
    sd = {PREFIX + k: torch.empty(s, device="meta") for k, s in _released_shapes().items()}
    assert infer_mapnet_config(sd) == MapNetConfig()
    assert infer_mapnet_config({k[len(PREFIX):]: v for k, v in sd.items()}, prefix="") == MapNetConfig()


def test_infer_without_map_network_is_none():
    assert infer_mapnet_config({"word_embed.weight": torch.zeros(2, 2)}) is None


def test_infer_rejects_unsupported_layouts():
    sd = {PREFIX + k: torch.empty(s, device="meta") for k, s in _released_shapes().items()}
    last_branch = re.compile(rf"{re.escape(PREFIX)}(feature_transforms|transformers|output_projs)\.6\.")
    six = {k: v for k, v in sd.items() if not last_branch.match(k)}
    assert len(six) < len(sd)
    with pytest.raises(CheckpointError, match="7"):
        infer_mapnet_config(six)
    odd = dict(sd)
    odd[PREFIX + "feature_transforms.0.3.weight"] = torch.empty(66, 32, 3, 3, device="meta")
    odd[PREFIX + "transformers.0.layers.0.linear1.weight"] = torch.empty(4 * 66, 66, device="meta")
    with pytest.raises(CheckpointError, match="head"):
        infer_mapnet_config(odd)


@pytest.mark.parametrize("shape", [(1, 14, 64, 64), (1, 14, 16, 16), (1, 3, 32, 32), (14, 32, 32)])
def test_wrong_input_size_is_explained(tiny, shape):
    with pytest.raises(ValueError, match=r"256x256 LR image is required.*32x32 latent"):
        tiny(torch.zeros(shape))
