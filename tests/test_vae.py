"""BSQ-VAE: strict loading in every accepted form, the released key layouts, golden parity of the
encoder and decoder, and clear errors for files that are not (usable) VAE checkpoints."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import GOLDEN, KEYS, golden, golden_json, u8_to_unit
from nsarm_nodes.loading import CheckpointError
from nsarm_nodes.vae import BSQVAE, load_vae

WEIGHTS = GOLDEN / "weights_vae.safetensors"

MASK_KEYS = ("quantizer.lfq.mask", "quantize.lfq.mask")
# Tolerances of tests/golden/README.md.
ENC_TOL = dict(atol=1e-4, rtol=1e-4)
DEC_TOL = dict(atol=1e-4, rtol=0)
DEC1024_TOL = dict(atol=3e-3, rtol=0)
# Tiny stand-ins for the released widths: same names and structure, GroupNorm-legal widths
# (24 -> 24 groups, 48 -> 24 groups, 96 -> 32 groups).
TINY_WIDTHS = {128: 24, 256: 48, 512: 96}


def _golden_sd() -> dict[str, torch.Tensor]:
    return load_file(str(WEIGHTS))


def _unwrapped(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the inner `.conv` / `.norm` level: `encoder.conv_in.conv.weight` -> `encoder.conv_in.weight`."""
    return {re.sub(r"\.(conv|norm)\.(weight|bias)$", r".\2", k): v for k, v in sd.items()}


def _assert_same_weights(a: BSQVAE, b: BSQVAE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _tiny_from_key_file(name: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    """A state dict with exactly the key names of a released VAE, widths shrunk by TINY_WIDTHS."""
    gen = torch.Generator().manual_seed(0)
    names, sd = [], {}
    for line in (KEYS / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        dims = [int(x) for x in re.findall(r"\d+", shape)]
        names.append(key)
        if dtype == "torch.int64":  # lfq.mask: 2^(d-1) ... 2^0
            sd[key] = 2 ** torch.arange(dims[0] - 1, -1, -1)
            continue
        # Only the channel axes (0, 1) carry widths; kernel sizes, RGB and codebook dims stay.
        dims = [TINY_WIDTHS.get(d, d) if axis < 2 else d for axis, d in enumerate(dims)]
        sd[key] = torch.randn(dims, generator=gen) * 0.05
    return names, sd


class _Opaque:
    """A custom class: unpickling it needs code execution, which the loader must refuse."""


@pytest.fixture(scope="module")
def vae() -> BSQVAE:
    return load_vae(WEIGHTS)


@pytest.fixture(scope="module")
def decoded_1024(vae) -> torch.Tensor:
    """decode(nsarm_run_area:summed_codes) from a contiguous tensor: [1, 3, 1024, 1024]."""
    with torch.no_grad():
        return vae.decode(golden("nsarm_run_area")["summed_codes"].contiguous())


# ----------------------------------------------------------------------------------- loading


def test_golden_weights_load_strictly_and_config_is_inferred(vae):
    sd = _golden_sd()
    cfg = vae.config
    assert (cfg.base_ch, cfg.ch_mult, cfg.num_res_blocks) == (32, (1, 1, 1, 2), 2)
    assert (cfg.codebook_dim, cfg.patch_size, cfg.in_channels) == (14, 8, 3)
    # Every key of the file is a module tensor with the file's value, and nothing else exists.
    own = vae.state_dict()
    assert own.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    assert not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    assert vae.quantize is vae.quantizer
    assert vae.quantizer.codebook_dim == 14


def test_wrapped_pth_and_unwrapped_spelling_load_identically(vae, tmp_path):
    sd = _golden_sd()
    path = tmp_path / "infinity_vae_tiny.pth"
    torch.save({"vae": sd, "epoch": 3}, path)
    _assert_same_weights(vae, load_vae(path))
    _assert_same_weights(vae, load_vae(_unwrapped(sd)))
    _assert_same_weights(vae, load_vae({"vae": _unwrapped(sd)}))
    # 'ema' is used only when 'vae' is absent.
    _assert_same_weights(vae, load_vae({"ema": sd}))
    noise = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}
    _assert_same_weights(vae, load_vae({"vae": sd, "ema": noise}))


@pytest.mark.parametrize("drop", [(), MASK_KEYS, MASK_KEYS[:1], MASK_KEYS[1:]])
def test_quantizer_mask_buffers_are_optional(vae, drop):
    sd = {k: v for k, v in _golden_sd().items() if k not in drop}
    _assert_same_weights(vae, load_vae(sd))


def test_both_spellings_of_one_key_is_an_error():
    sd = _golden_sd()
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.conv.weight"]
    with pytest.raises(CheckpointError, match=r"encoder\.conv_in\.conv\.weight appears twice"):
        load_vae(sd)


def test_decoder_dtype_policy(vae):
    half = load_vae(_golden_sd(), dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in half.encoder.parameters())
    assert all(p.dtype == torch.bfloat16 for p in half.decoder.parameters())
    assert half.quantizer.lfq.mask.dtype == torch.int64
    x = u8_to_unit(golden("vae_encode")["lr_u8"])
    torch.testing.assert_close(half.encode_features(x), vae.encode_features(x), atol=0, rtol=0)
    z = golden("vae_decode")["z_small"]
    img = half.decode(z)
    assert img.dtype == torch.float32
    assert (img - vae.decode(z)).abs().mean() < 0.05  # bf16 decoder: close, not equal


@pytest.mark.parametrize(
    "key_file, cfg",
    [
        ("vae_d56_f8_14_patchify_keys.txt", dict(ch_mult=(1, 2, 4, 4), codebook_dim=14, patch_size=8)),
        ("vae_d32reg_keys.txt", dict(ch_mult=(1, 2, 4, 4, 4), codebook_dim=32, patch_size=16)),
    ],
)
def test_released_key_layouts_load(key_file, cfg):
    names, sd = _tiny_from_key_file(key_file)
    model = load_vae(sd)
    assert set(model.state_dict()) == set(names)
    got = model.config
    assert (got.base_ch, got.num_res_blocks) == (TINY_WIDTHS[128], 2)
    assert dict(ch_mult=got.ch_mult, codebook_dim=got.codebook_dim, patch_size=got.patch_size) == cfg
    # GroupNorm group rule: 24 groups for 24 / 48 channels, 32 for 96.
    assert model.encoder.down[0].block[0].norm1.norm.num_groups == 24
    assert model.encoder.down[1].block[0].norm2.norm.num_groups == 24
    assert model.encoder.norm_out.norm.num_groups == 32
    # The unwrapped spelling of the same file is accepted too.
    _assert_same_weights(model, load_vae(_unwrapped(sd)))
    side = 32
    x = torch.rand(1, 3, side, side) * 2 - 1
    z = model.encode_features(x)
    latent = side // cfg["patch_size"]
    assert z.shape == (1, cfg["codebook_dim"], latent, latent)
    img = model.decode(z)
    assert img.shape == (1, 3, side, side)
    assert img.abs().max() <= 1.0


# ----------------------------------------------------------------------------------- parity


def test_encoder_matches_golden(vae):
    g = golden("vae_encode")
    h = vae.encode_features(u8_to_unit(g["lr_u8"]))
    assert h.shape == (1, 14, 32, 32) and h.dtype == torch.float32
    torch.testing.assert_close(h, g["h"], **ENC_TOL)


def test_decoder_matches_golden_small(vae):
    g = golden("vae_decode")
    img = vae.decode(g["z_small"])
    assert img.shape == (1, 3, 128, 128)
    torch.testing.assert_close(img, g["img_small"], **DEC_TOL)


def test_decoder_matches_golden_1024(decoded_1024):
    g = golden("vae_decode")
    crops = golden_json("config.json")["crops"]
    size = crops["size"]
    img = decoded_1024
    assert img.shape == (1, 3, 1024, 1024)
    assert img.min() >= -1 and img.max() <= 1
    for k, (y, x) in enumerate(crops["origins_yx"]):
        torch.testing.assert_close(img[..., y:y + size, x:x + size], g[f"dec1024_crop{k}"], **DEC1024_TOL)
    torch.testing.assert_close(F.avg_pool2d(img, 8), g["dec1024_pool8"], **DEC1024_TOL)
    torch.testing.assert_close(img.mean(dim=(0, 2, 3)), g["dec1024_mean"], **DEC1024_TOL)
    torch.testing.assert_close(img.std(dim=(0, 2, 3)), g["dec1024_std"], **DEC1024_TOL)


def test_decoder_holds_at_most_three_full_resolution_activations(vae):
    """Intermediates are freed as soon as they are used: decoding a 1024^2 image keeps at most the
    block input and two activations of the finest width alive (the tensor peak on the meta device)."""
    from nsarm_nodes.lowvram import vae_decode_bytes

    activation = vae.config.base_ch * 1024 * 1024 * 4  # [1, base_ch, 1024, 1024] float32
    peak = vae_decode_bytes(vae.config, 1, 128, 128, torch.float32)
    assert 2 * activation < peak <= 3 * activation * 1.01, (peak, activation)


def test_channels_last_decoder_is_opt_in_and_matches(vae):
    g = golden("vae_decode")
    contiguous = vae.decode(g["z_small"])
    other = load_vae(WEIGHTS)
    assert other.decoder.memory_format == torch.contiguous_format  # the default
    other.decoder.set_memory_format(torch.channels_last)
    assert other.decoder.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(other.decode(g["z_small"]), contiguous, **DEC_TOL)


# ----------------------------------------------------------------------------------- bad input


def test_transformer_checkpoint_is_rejected():
    path = GOLDEN / "weights_transformer.safetensors"
    with pytest.raises(CheckpointError) as err:
        load_vae(path)
    msg = str(err.value)
    assert str(path) in msg and "VAE was expected" in msg and "transformer" in msg


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_truncated_safetensors_is_rejected(tmp_path):
    path = _truncate(WEIGHTS, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_vae(path)


def test_truncated_pth_is_rejected(tmp_path):
    full = tmp_path / "full.pth"
    torch.save({"vae": _golden_sd()}, full)
    path = _truncate(full, tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_vae(path)


def test_pickle_needing_code_execution_is_rejected(tmp_path):
    path = tmp_path / "vae.pth"
    torch.save({"vae": _golden_sd(), "extra": _Opaque()}, path)
    with pytest.raises(CheckpointError, match="code execution") as err:
        load_vae(path)
    assert str(path) in str(err.value)


def test_shape_mismatch_names_the_key():
    sd = _golden_sd()
    key = "decoder.up.0.block.1.conv1.conv.weight"
    sd[key] = sd[key][:, :, :1, :1].contiguous()
    with pytest.raises(CheckpointError, match=re.escape(key)):
        load_vae(sd)


def test_missing_and_unexpected_keys_are_named():
    sd = _golden_sd()
    del sd["decoder.norm_out.norm.bias"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_vae(sd)
    assert "decoder.norm_out.norm.bias" in str(err.value) and "decoder.extra.weight" in str(err.value)
