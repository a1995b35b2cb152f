"""Bad inputs through the node classes (as ComfyUI calls them) and the option table they share with
the command line and the runner; hypothesis fuzzing of Tile -> Untile for any geometry."""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nsarm_nodes import options, runner
from nsarm_nodes.__main__ import build_parser

NODES_PY = runner.pack_nodes_path()


@pytest.fixture(scope="module")
def nodes():
    spec = importlib.util.spec_from_file_location("nsarm_pack_nodes_under_test", NODES_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _arguments(cls) -> dict:
    """Valid-looking arguments for every input of a node: widget defaults, small images, None for
    model objects (validation happens before the node touches them)."""
    args = {}
    for section in ("required", "optional"):
        for name, entry in (cls.INPUT_TYPES().get(section) or {}).items():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
            if kind == "IMAGE":
                args[name] = torch.rand(1, 32, 32, 3)
            elif isinstance(kind, list):
                args[name] = opts.get("default", kind[0] if kind else "")
            elif kind in ("INT", "FLOAT", "BOOLEAN", "STRING"):
                args[name] = opts.get("default", "")
            else:
                args[name] = None
    return args


def _call(cls, **overrides):
    args = {**_arguments(cls), **overrides}
    return getattr(cls(), cls.FUNCTION)(**args)


def test_every_number_widget_refuses_nan_inf_out_of_range_and_wrong_types(nodes):
    checked = 0
    for class_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        title = nodes.NODE_DISPLAY_NAME_MAPPINGS[class_id]
        for section in ("required", "optional"):
            for name, entry in (cls.INPUT_TYPES().get(section) or {}).items():
                kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
                bad = []
                if kind in ("INT", "FLOAT"):
                    bad = [float("nan"), float("inf"), -float("inf"), "3", None, True, [1]]
                    bad += [opts["min"] - 1] if "min" in opts else []
                    bad += [opts["max"] + 1] if "max" in opts else []
                    bad += [0.5] if kind == "INT" else []
                elif kind == "BOOLEAN":
                    bad = ["true", 1, None]
                elif isinstance(kind, list) and name not in getattr(cls, "FILE_INPUTS", ()):
                    bad = ["no such choice", None, 3]
                for value in bad:
                    with pytest.raises(ValueError) as exc:
                        _call(cls, **{name: value})
                    assert str(exc.value).startswith(f"{title}: input {name!r}"), (class_id, name, value, exc.value)
                    checked += 1
    assert checked > 100


@pytest.mark.parametrize("bad, needle", [
    (torch.full((1, 32, 32, 3), float("nan")), "NaN or infinite"),
    (torch.rand(1, 32, 32, 3).index_put_((torch.tensor([0]), torch.tensor([3]), torch.tensor([4])),
                                         torch.tensor(float("inf"))), "NaN or infinite"),
    (torch.zeros(0, 32, 32, 3), "empty (0 images)"),
    (torch.zeros(1, 0, 32, 3), "pixels; nothing to process"),
    (torch.rand(32, 32, 3), "IMAGE batch [B, H, W, C]"),
    (torch.rand(1, 32, 32, 5), "5 channels"),
    ((torch.rand(1, 32, 32, 3) * 255).to(torch.uint8), "dtype torch.uint8"),
    ("an image", "expected an IMAGE tensor"),
])
def test_bad_image_tensors_name_the_node_input(nodes, bad, needle):
    for class_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        title = nodes.NODE_DISPLAY_NAME_MAPPINGS[class_id]
        for section in ("required", "optional"):
            for name, entry in (cls.INPUT_TYPES().get(section) or {}).items():
                if entry[0] != "IMAGE":
                    continue
                with pytest.raises(ValueError) as exc:
                    _call(cls, **{name: bad})
                assert str(exc.value).startswith(f"{title}: input {name!r}") and needle in str(exc.value), exc.value


def test_custom_typed_inputs_refuse_other_objects(nodes):
    """A value that is not the socket type's class (e.g. a string in an API prompt where NSARM Tile's
    tile_info belongs) is refused before any work, naming the node and the input."""
    checked = 0
    for class_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        title = nodes.NODE_DISPLAY_NAME_MAPPINGS[class_id]
        for section in ("required", "optional"):
            for name, entry in (cls.INPUT_TYPES().get(section) or {}).items():
                if not (isinstance(entry[0], str) and entry[0].startswith("NSARM_")):
                    continue
                for bad in ("tile_info", {"height": 1}, torch.zeros(1)):
                    with pytest.raises(ValueError) as exc:
                        _call(cls, **{name: bad})
                    assert str(exc.value).startswith(f"{title}: input {name!r} holds a "), exc.value
                    assert entry[0] in str(exc.value)
                    checked += 1
    assert checked >= 3 * 10


def test_rgba_gray_and_out_of_range_images_are_handled_as_documented(nodes):
    tile, untile, fix = nodes.NSARMTile(), nodes.NSARMUntile(), nodes.NSARMColorFix()
    rgb = torch.rand(2, 40, 56, 3)
    alpha = torch.rand(2, 40, 56, 1)
    tiles_rgba, grid = tile.tile(torch.cat([rgb, alpha], -1), 32, 8)
    tiles_rgb, _ = tile.tile(rgb, 32, 8)
    assert torch.equal(tiles_rgba, tiles_rgb)  # alpha dropped, colour untouched (as ComfyUI's LoadImage)
    gray = torch.rand(1, 40, 56, 1)
    assert torch.equal(tile.tile(gray, 32, 8)[0], tile.tile(gray.expand(-1, -1, -1, 3), 32, 8)[0])
    wild = rgb * 3 - 1  # values in [-1, 2]
    assert torch.equal(tile.tile(wild, 32, 8)[0], tile.tile(wild.clamp(0, 1), 32, 8)[0])
    (out,) = untile.untile(tiles_rgba * 2 - 0.5, grid, "linear")  # processed tiles out of range: clamped
    assert out.min() >= 0 and out.max() <= 1 and out.shape == (2, 40, 56, 3)
    (fixed,) = fix.fix(torch.cat([rgb, alpha], -1), rgb[:1], "adain")
    assert fixed.shape == (2, 40, 56, 3) and torch.isfinite(fixed).all()


def test_widgets_and_cli_come_from_one_table(nodes):
    """Defaults and bounds of every node widget that has an option-table entry equal the table's,
    and the command line's defaults are the same numbers."""
    node_to_option = {"tile_overlap": "tile_overlap", "method": "color_fix", "mode": "mode"}
    found = 0
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        for section in ("required", "optional"):
            for name, entry in (cls.INPUT_TYPES().get(section) or {}).items():
                key = node_to_option.get(name, name)
                if key not in options.TABLE or options.TABLE[key].kind == options.TEXT:
                    continue
                kind, spec = options.widget(key)
                got_kind, got = entry[0], dict(entry[1])
                assert got_kind == kind, name
                for field in ("default", "min", "max", "step"):
                    assert got.get(field) == spec.get(field), (cls.__name__, name, field)
                found += 1
    assert found >= 20
    args = build_parser().parse_args(["upscale", "x.png", "--models", "m"])
    for key in ("seed", "tau", "top_p", "cfg", "mode", "tile_overlap", "tile_batch_size", "color_fix",
                "output_scale", "blend", "dtype"):
        assert getattr(args, key) == options.TABLE[key].default, key


def test_option_checks():
    assert options.check("seed", options.MAX_SEED) == options.MAX_SEED
    assert options.check("tau", 1) == 1.0 and isinstance(options.check("tau", 1), float)
    assert options.check("tile_batch_size", 3.0) == 3
    for name, value, needle in (("seed", options.MAX_SEED + 1, "above the maximum"),
                                ("tau", 10**400, "too large"), ("tau", math.nan, "not a finite number"),
                                ("blend", "soft", "not one of cosine, linear, none"),
                                ("offload_text_and_map", 1, "not a boolean"),
                                ("server", "http://h:70000", "Port out of range"),
                                ("device", "cuda:0x", "not a device")):
        with pytest.raises(options.OptionError, match=needle):
            options.check(name, value, "here")
    assert options.parse_server_url(" 127.0.0.1:8188/ ") == "http://127.0.0.1:8188"


# --------------------------------------------------------------------------------------------
# Fuzzing Tile -> Untile through the nodes: any geometry either round-trips exactly (shape, values
# within float rounding) or is refused with a ValueError naming the input; nothing else.

BREAKS = ("height", "width", "batch", "channels", "tile_size", "overlap", "align", "blend")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(height=st.integers(1, 90), width=st.integers(1, 90), batch=st.integers(1, 2),
       channels=st.sampled_from([3, 1, 4]), tile_size=st.integers(16, 72), overlap_part=st.floats(0, 0.5),
       align=st.integers(1, 5), blend=st.sampled_from(["cosine", "linear", "none"]), scale=st.sampled_from([1, 2, 3]),
       broken=st.sampled_from((None,) * len(BREAKS) + BREAKS))
def test_tile_untile_fuzz(nodes, height, width, batch, channels, tile_size, overlap_part, align, blend, scale, broken):
    """Any valid geometry round-trips (shape exact, values within float rounding); one invalid
    value (`broken`) is refused with a ValueError naming the input; nothing else happens."""
    tile, untile = nodes.NSARMTile(), nodes.NSARMUntile()
    overlap = math.floor(overlap_part * tile_size)
    bad = {"height": 0, "width": 0, "batch": 0, "channels": 2, "tile_size": 15, "overlap": tile_size // 2 + 1,
           "align": 0, "blend": "COSINE"}
    if broken is not None:
        locals_ = {"height": height, "width": width, "batch": batch, "channels": channels, "tile_size": tile_size,
                   "overlap": overlap, "align": align, "blend": blend}
        locals_[broken] = bad[broken]
        height, width, batch, channels = (locals_[k] for k in ("height", "width", "batch", "channels"))
        tile_size, overlap, align, blend = (locals_[k] for k in ("tile_size", "overlap", "align", "blend"))
    image = torch.rand(batch, height, width, channels)
    try:
        tiles, grid = tile.tile(image, tile_size, overlap, align)
        upscaled = torch.nn.functional.interpolate(tiles.permute(0, 3, 1, 2), scale_factor=scale, mode="nearest")
        (out,) = untile.untile(upscaled.permute(0, 2, 3, 1), grid, blend)
    except ValueError as exc:
        assert broken is not None, exc
        message = str(exc)
        named = {"height": "'image'", "width": "'image'", "batch": "'image'", "channels": "'image'",
                 "tile_size": "'tile_size'", "overlap": "overlap", "align": "'align'", "blend": "'blend'"}[broken]
        assert named in message, (broken, message)
        return
    assert broken is None, f"{broken} = {bad[broken]!r} was accepted"
    expected = image[..., :3] if channels != 1 else image.expand(-1, -1, -1, 3)
    assert out.shape == (batch, height * scale, width * scale, 3)
    nearest = expected.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    assert (out - nearest).abs().max() <= 1e-5


def test_the_programmatic_api_checks_the_same_bounds():
    from types import SimpleNamespace

    from nsarm_nodes import NSARMPipeline

    pipe = NSARMPipeline(SimpleNamespace(map_net=object()), vae=None)  # checks come before any model use
    for kwargs, needle in ((dict(tau=float("nan")), "NSARMPipeline: tau: nan is not a finite number"),
                           (dict(tile_batch_size=0), "NSARMPipeline: tile_batch_size: 0 is below the minimum 1"),
                           (dict(output_scale=9.0), "NSARMPipeline: output_scale: 9 is above the maximum 4"),
                           (dict(blend="soft"), "NSARMPipeline: blend: 'soft' is not one of cosine, linear, none")):
        with pytest.raises(ValueError, match=needle):
            pipe(torch.rand(1, 8, 8, 3), **kwargs)
