"""Headless workflow runner (nsarm_nodes.runner) and `python -m nsarm_nodes run`.

Fast tests use the shipped workflows' structure, synthetic prompts and model-free nodes
(NSARMTile/NSARMUntile/NSARMColorFix + the LoadImage/SaveImage stand-ins). The end-to-end tests
run the three shipped workflows once each on the tiny models (shared with test_nodes_live.py
through :func:`e2e_outputs`).
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nsarm_nodes import runner
from nsarm_nodes.__main__ import main
from nsarm_nodes.runner import NodeExecutionError, WorkflowError

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
API_DIR = WORKFLOWS / "api"
NAMES = ("nsarm_upscale", "nsarm_composable", "nsarm_tiled_upscale")
# The shipped workflows name the released files, which make-test-models also writes: they run unchanged.
TINY_SETS: list[str] = []
# Extra overrides per workflow: NSARMUpscale sends both tiles through the transformer together, as
# the node chain does (NSARMEncodeLR/NSARMBitwiseDecode take the whole tile batch), so the two give
# identical pixels. With tile_batch_size=1 the sampled bits are the same but float sums differ in
# the last bits for the other batch shape (measured: max 5e-6, uint8 off by 1 for 0.006% of values).
EXTRA_SETS = {"nsarm_upscale": ["NSARMUpscale.tile_batch_size=2"]}
# workflow -> (test image, expected output (width, height))
CASES = {
    "nsarm_composable": ("lr256.png", (1024, 1024)),
    "nsarm_upscale": ("lr288x200.png", (1152, 800)),
    "nsarm_tiled_upscale": ("lr288x200.png", (1152, 800)),
}
OUR_NODES = ("NSARMModelLoader", "NSARMTextEncode", "NSARMEncodeLR", "NSARMBitwiseDecode", "NSARMDecode",
             "NSARMColorFix", "NSARMTile", "NSARMUntile", "NSARMUpscale")


def ui_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def api_workflow(name: str) -> dict:
    return json.loads((API_DIR / f"{name}_api.json").read_text())


def write_test_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """A deterministic structured image (gradients + a disc + a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (min(width, height) * 0.25) ** 2).astype(np.float32)
    img = np.stack([x / width, y / height, 0.3 + 0.5 * disc], -1) * 255 + rng.normal(0, 6, (height, width, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def write_test_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {"lr256.png": write_test_image(folder / "lr256.png", 256, 256, 1),
            "lr288x200.png": write_test_image(folder / "lr288x200.png", 288, 200, 2)}


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --------------------------------------------------------------------------------------------
# End-to-end outputs of the three shipped workflows on the tiny models (computed once per process)
# --------------------------------------------------------------------------------------------

_E2E: dict[str, object] = {}


def e2e_outputs() -> dict:
    """{"root", "models", "images", "outputs": {workflow: PNG path}, "tensors": {workflow: IMAGE}}.

    nsarm_composable runs through the CLI (UI file, output named as a .png), nsarm_upscale through
    run_workflow on the UI file, nsarm_tiled_upscale through run_workflow on the API twin."""
    if "error" in _E2E:
        pytest.fail(f"the end-to-end runner setup failed earlier: {_E2E['error']}", pytrace=False)
    if "result" in _E2E:
        return _E2E["result"]
    from nsarm_nodes.testing import make_tiny_models

    root = Path(tempfile.mkdtemp(prefix="nsarm-runner-e2e-"))
    try:
        models = root / "models"
        make_tiny_models(models)
        images = write_test_images(root / "in")
        outputs, tensors = {}, {}
        out = root / "out" / "nsarm_composable" / "composable.png"
        argv = ["run", str(WORKFLOWS / "nsarm_composable.json"), "--input", str(images["lr256.png"]),
                "--output", str(out), "--models", str(models)]
        for s in TINY_SETS:
            argv += ["--set", s]
        assert main(argv) == 0
        outputs["nsarm_composable"] = out
        for name, source in (("nsarm_upscale", WORKFLOWS / "nsarm_upscale.json"),
                             ("nsarm_tiled_upscale", API_DIR / "nsarm_tiled_upscale_api.json")):
            res = runner.run_workflow(source, inputs={"": images[CASES[name][0]]},
                                      sets=TINY_SETS + EXTRA_SETS.get(name, []),
                                      output_dir=root / "out" / name, models_dir=models)
            (save_id,) = [nid for nid in res.order if res.prompt[nid]["class_type"] == "SaveImage"]
            (outputs[name],) = res.files[save_id]
            tensors[name] = res.images[save_id]
        result = {"root": root, "models": models, "images": images, "outputs": outputs, "tensors": tensors}
    except BaseException as exc:
        _E2E["error"] = f"{type(exc).__name__}: {exc}"
        shutil.rmtree(root, ignore_errors=True)
        raise
    _E2E["result"] = result
    return result


@pytest.fixture(scope="module")
def e2e(request):
    result = e2e_outputs()
    request.config.add_cleanup(lambda: shutil.rmtree(result["root"], ignore_errors=True))
    return result


# --------------------------------------------------------------------------------------------
# Formats and the shipped workflows
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_format_detection(name):
    assert runner.workflow_format(ui_workflow(name)) == "ui"
    assert runner.workflow_format(api_workflow(name)) == "api"
    assert runner.workflow_format({"prompt": api_workflow(name)}) == "api"
    assert runner.api_prompt({"prompt": api_workflow(name)}) == api_workflow(name)


@pytest.mark.parametrize("bad", [{}, {"nodes": []}, {"1": {"inputs": {}}}, {"a": 1}])
def test_format_detection_rejects_other_json(bad):
    with pytest.raises(WorkflowError, match="not a ComfyUI workflow"):
        runner.workflow_format(bad)


def test_load_workflow_errors(tmp_path):
    with pytest.raises(WorkflowError, match="not found"):
        runner.load_workflow(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(WorkflowError, match="not valid JSON"):
        runner.load_workflow(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(WorkflowError, match="JSON object"):
        runner.load_workflow(tmp_path / "list.json")


@pytest.mark.parametrize("name", NAMES)
def test_ui_to_api_equals_the_api_twin(name):
    """The UI file's widget values, mapped positionally from INPUT_TYPES, and its links give exactly
    the API twin: the two shipped files agree (and the mapping is right)."""
    assert runner.ui_to_api(ui_workflow(name)) == api_workflow(name)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_ui_workflow_is_consistent(name):
    wf = ui_workflow(name)
    classes = runner.load_node_classes()
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(link[0] for link in wf["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[src]["outputs"][src_slot]["type"] == kind == nodes[dst]["inputs"][dst_slot]["type"]
        assert kind == classes[nodes[src]["type"]].RETURN_TYPES[src_slot]
    for node in wf["nodes"]:
        linked = [i["link"] for i in node["inputs"] if i["link"] is not None]
        assert all(any(link[0] == lid for link in wf["links"]) for lid in linked)
        props = node["properties"]
        assert props["Node name for S&R"] == node["type"]
        spec = classes[node["type"]].INPUT_TYPES()
        slots = runner.widget_slots(spec)
        extra = sum(1 for _, control in slots if control)
        if node["type"] == "LoadImage":
            extra += 1  # the upload button's value
        assert len(node["widgets_values"]) == len(slots) + extra, node["type"]
        sockets = [n for n, *_ in runner._input_specs(spec) if (n, False) not in slots and (n, True) not in slots]
        assert [i["name"] for i in node["inputs"]] == sockets
        if node["type"].startswith("NSARM"):
            assert props["cnr_id"] == "nsarm-comfyui"
            assert [o["type"] for o in node["outputs"]] == list(classes[node["type"]].RETURN_TYPES)
        else:
            assert props["cnr_id"] == "comfy-core"
    (loader,) = [n for n in wf["nodes"] if n["type"] == "NSARMModelLoader"]
    assert loader["widgets_values"][:3] == ["NSARM.pth", "infinity_vae_d56_f8_14_patchify.pth", "flan-t5-xl"]
    # No `properties.models`: the current frontend only downloads .safetensors from a few hosts, so
    # entries for NSARM.pth (Google Drive), the .pth VAE and the T5 folder would open a red
    # "missing models" dialog on every load. The README's weight table says where they come from.
    assert "models" not in loader["properties"]


def test_workflow_templates_folder_layout():
    """UI files directly in workflows/ (ComfyUI lists <pack>/workflows/*.json as templates); the API
    twins one level deeper (workflows/api/) so they are not listed as templates."""
    ui_names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert set(NAMES) <= set(ui_names)
    assert sorted(p.stem for p in API_DIR.glob("*.json")) == [f"{n}_api" for n in ui_names]  # one twin each
    for name in ui_names:
        assert runner.workflow_format(ui_workflow(name)) == "ui"
    for name in NAMES:
        types = {n["type"] for n in ui_workflow(name)["nodes"]}
        assert types <= set(OUR_NODES) | {"LoadImage", "SaveImage"}
    used = {n["type"] for name in NAMES for n in ui_workflow(name)["nodes"]}
    assert set(OUR_NODES) <= used


# --------------------------------------------------------------------------------------------
# Widget mapping and UI conversion details
# --------------------------------------------------------------------------------------------

def test_widget_slots_skip_sockets_and_mark_seed_controls():
    classes = runner.load_node_classes()
    slots = runner.widget_slots(classes["NSARMUpscale"].INPUT_TYPES())
    assert slots == [("prompt", False), ("seed", True), ("tile_overlap", False), ("tile_batch_size", False),
                     ("color_fix", False), ("output_scale", False), ("tau", False), ("top_p", False),
                     ("cfg", False), ("mode", False), ("blend", False), ("tiling", False)]
    spec = {"required": {"x": ("IMAGE",), "seed": ("INT", {}), "n": ("INT", {"forceInput": True}),
                         "c": (["a", "b"],), "v": ("COMBO", {"options": ["p"]})},
            "optional": {"s": ("STRING", {"multiline": True}), "m": ("NSARM_MODEL",)}}
    assert runner.widget_slots(spec) == [("seed", True), ("c", False), ("v", False), ("s", False)]


def _tiled_ui() -> dict:
    return ui_workflow("nsarm_tiled_upscale")


def _node(wf: dict, nid: int) -> dict:
    return next(n for n in wf["nodes"] if n["id"] == nid)


def test_ui_bypassed_node_passes_its_matching_input_through():
    wf = _tiled_ui()
    _node(wf, 8)["mode"] = 4  # NSARMColorFix bypassed: SaveImage gets the Untile output
    api = runner.ui_to_api(wf)
    assert "8" not in api
    assert api["9"]["inputs"]["images"] == ["7", 0]


def test_ui_bypass_chain_and_type_matching():
    wf = _tiled_ui()
    _node(wf, 7)["mode"] = 4  # NSARMUntile (image, tile_info) -> image: its IMAGE input is the Decode output
    _node(wf, 8)["mode"] = 4
    api = runner.ui_to_api(wf)
    assert api["9"]["inputs"]["images"] == ["6", 0]


def test_ui_muted_node_leaves_consumers_unconnected():
    wf = _tiled_ui()
    _node(wf, 8)["mode"] = 2
    api = runner.ui_to_api(wf)
    assert "8" not in api and "images" not in api["9"]["inputs"]
    with pytest.raises(WorkflowError, match=r"node 9 \(SaveImage.*required input 'images'.*missing"):
        runner.run_workflow(api)  # validation fails before anything runs
    _node(wf, 9)["mode"] = 2  # a muted output node simply does not run
    api = runner.ui_to_api(wf)
    with pytest.raises(WorkflowError, match="no output node"):
        runner.execution_order(api, runner.load_node_classes())


def test_ui_reroute_primitive_note_and_converted_widget():
    wf = _tiled_ui()
    links = wf["links"]
    # Reroute between LoadImage (1) and NSARMTile (3)
    link_1_3 = next(link for link in links if link[1] == 1 and link[3] == 3)
    wf["nodes"].append({"id": 20, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 50}],
                        "outputs": [{"name": "", "type": "IMAGE", "links": [link_1_3[0]]}], "properties": {}})
    links.append([50, 1, 0, 20, 0, "IMAGE"])
    link_1_3[1], link_1_3[2] = 20, 0
    # PrimitiveNode feeding NSARMBitwiseDecode.seed (a widget converted to an input)
    wf["nodes"].append({"id": 21, "type": "PrimitiveNode", "mode": 0, "inputs": [],
                        "outputs": [{"name": "INT", "type": "INT", "links": [51], "widget": {"name": "seed"}}],
                        "widgets_values": [77, "fixed"], "properties": {}})
    _node(wf, 5)["inputs"].append({"name": "seed", "type": "INT", "link": 51, "widget": {"name": "seed"}})
    links.append([51, 21, 0, 5, len(_node(wf, 5)["inputs"]) - 1, "INT"])
    wf["nodes"].append({"id": 22, "type": "Note", "mode": 0, "inputs": [], "outputs": [],
                        "widgets_values": ["a note"], "properties": {}})
    # A node storing its widget values as a dict
    _node(wf, 7)["widgets_values"] = {"blend": "linear"}
    api = runner.ui_to_api(wf)
    assert api["3"]["inputs"]["image"] == ["1", 0]
    assert api["5"]["inputs"]["seed"] == 77
    assert api["7"]["inputs"]["blend"] == "linear"
    assert not {"20", "21", "22"} & set(api)


def test_ui_widget_linked_from_another_node_uses_the_link():
    wf = ui_workflow("nsarm_upscale")
    up = _node(wf, 3)
    up["inputs"].append({"name": "prompt", "type": "STRING", "link": 60, "widget": {"name": "prompt"}})
    wf["links"].append([60, 1, 0, 3, len(up["inputs"]) - 1, "STRING"])
    api = runner.ui_to_api(wf)
    assert api["3"]["inputs"]["prompt"] == ["1", 0]
    assert api["3"]["inputs"]["seed"] == 1  # later widgets keep their slots


def test_ui_control_value_is_optional():
    """A workflow saved without the control_after_generate value still maps (the next value is no
    control word)."""
    wf = ui_workflow("nsarm_upscale")
    values = _node(wf, 3)["widgets_values"]
    assert values[2] == "fixed"
    del values[2]
    assert runner.ui_to_api(wf) == api_workflow("nsarm_upscale")


def test_ui_errors_name_the_node():
    wf = ui_workflow("nsarm_upscale")
    _node(wf, 3)["type"] = "NSARMMystery"
    with pytest.raises(WorkflowError, match=r"node 3 \(NSARMMystery\): unknown node type.*known node types: .*NSARMUpscale"):
        runner.ui_to_api(wf)
    wf = ui_workflow("nsarm_upscale")
    _node(wf, 3)["inputs"][0]["link"] = 99
    with pytest.raises(WorkflowError, match=r"node 3 \(NSARMUpscale\): input 'model' uses link 99"):
        runner.ui_to_api(wf)
    wf = ui_workflow("nsarm_upscale")
    wf["links"][0][1] = 42
    with pytest.raises(WorkflowError, match="linked to node 42, which does not exist"):
        runner.ui_to_api(wf)
    wf = ui_workflow("nsarm_upscale")
    wf["definitions"] = {"subgraphs": [{"id": "x"}]}
    with pytest.raises(WorkflowError, match="subgraphs"):
        runner.ui_to_api(wf)


def test_object_info_input_types_maps_like_the_classes():
    classes = runner.load_node_classes()
    info = {name: {"input": json.loads(json.dumps(cls.INPUT_TYPES())), "output": list(cls.RETURN_TYPES)}
            for name, cls in classes.items()}
    for name in NAMES:
        assert runner.ui_to_api(ui_workflow(name), runner.object_info_input_types(info)) == api_workflow(name)


# --------------------------------------------------------------------------------------------
# Order, validation and error cases (small fake nodes: no model needed)
# --------------------------------------------------------------------------------------------

CALLS: list[str] = []


class Source:
    CATEGORY = "test"
    RETURN_TYPES = ("THING",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": 0, "max": 10})},
                "hidden": {"uid": "UNIQUE_ID"}}

    def run(self, value, uid):
        CALLS.append(f"Source{uid}")
        return (value,)


class Add:
    CATEGORY = "test"
    RETURN_TYPES = ("THING",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("THING",), "b": ("THING",)}, "optional": {"scale": ("FLOAT", {"default": 1.0})}}

    def run(self, a, b, scale=1.0):
        CALLS.append("Add")
        return ((a + b) * scale,)


class Sink:
    CATEGORY = "test"
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    SEEN: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("THING",), "mode": (["keep", "drop"],)}}

    def run(self, x, mode):
        CALLS.append("Sink")
        Sink.SEEN.append(x)
        return {"ui": {"text": [str(x)]}}


class Boom(Source):
    def run(self, value, uid):
        raise RuntimeError("kaboom")


class Lister(Source):
    INPUT_IS_LIST = True


FAKE = {"Source": Source, "Add": Add, "Sink": Sink, "Boom": Boom, "Lister": Lister}


def fake_prompt() -> dict:
    return {
        "10": {"class_type": "Sink", "inputs": {"x": ["4", 0], "mode": "keep"}, "_meta": {"title": "Out"}},
        "4": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["3", 0], "scale": 2}},
        "2": {"class_type": "Source", "inputs": {"value": 1}, "_meta": {"title": "first"}},
        "3": {"class_type": "Source", "inputs": {"value": 2}, "_meta": {"title": "second"}},
        "7": {"class_type": "Source", "inputs": {"value": 3}},  # feeds no output: never runs
    }


def test_execution_order_is_topological_and_only_upstream_of_outputs():
    prompt = fake_prompt()
    order = runner.execution_order(prompt, FAKE)
    assert set(order) == {"2", "3", "4", "10"}
    for nid in order:
        for value in prompt[nid]["inputs"].values():
            if isinstance(value, list):
                assert order.index(value[0]) < order.index(nid)
    CALLS.clear()
    Sink.SEEN.clear()
    res = runner.run_workflow(prompt, classes=FAKE, output_dir="unused")
    assert Sink.SEEN == [6.0] and sorted(CALLS) == ["Add", "Sink", "Source2", "Source3"]
    assert res.outputs["4"] == (6.0,) and res.ui["10"] == {"text": ["6.0"]}
    assert res.files == {}


def test_outputs_are_computed_once_per_run():
    prompt = fake_prompt()
    prompt["4"]["inputs"]["b"] = ["2", 0]  # the same source twice
    prompt["11"] = {"class_type": "Sink", "inputs": {"x": ["2", 0], "mode": "drop"}}
    CALLS.clear()
    runner.run_workflow(prompt, classes=FAKE)
    assert CALLS.count("Source2") == 1


def test_runs_under_inference_mode():
    seen = []

    class Probe(Sink):
        def run(self, x, mode):
            seen.append(torch.is_inference_mode_enabled())
            return {}

    prompt = fake_prompt()
    prompt["10"]["class_type"] = "Probe"
    runner.run_workflow(prompt, classes={**FAKE, "Probe": Probe})
    assert seen == [True]


@pytest.mark.parametrize("edit, pattern", [
    (lambda p: p["4"].update(class_type="Mystery"),
     r"node 4 \(Mystery\): unknown node type 'Mystery'\nthe headless runner can run: Add, Boom, Lister, Sink, Source"),
    (lambda p: p["4"]["inputs"].pop("b"), r"node 4 \(Add\): required input 'b' \(THING\) is missing \(connect it\)"),
    (lambda p: p["10"]["inputs"].pop("mode"), r"node 10 \(Sink, 'Out'\): required input 'mode' \(COMBO\) is missing"),
    (lambda p: p["2"]["inputs"].update(value=["4", 0]), r"cycle .*: 4 \(Add\) -> 2 \(Source, 'first'\) -> 4 \(Add\)"),
    (lambda p: (p["2"]["inputs"].update(value=["3", 0]), p["3"]["inputs"].update(value=["4", 0])),
     r"cycle .*: 4 \(Add\) -> 3 \(Source, 'second'\) -> 2 \(Source, 'first'\) -> 4 "),
    (lambda p: p["4"]["inputs"].update(a=["99", 0]), r"node 4 \(Add\): input 'a' is linked to node 99, which does not exist"),
    (lambda p: p["4"]["inputs"].update(a=["2", 3]), r"node 4 \(Add\): input 'a' is linked to output 3 of node 2 .* 1 output"),
    (lambda p: (p.update({"11": {"class_type": "Sink", "inputs": {"x": ["2", 0], "mode": "keep"}}}),
                p["4"]["inputs"].update(a=["11", 0])), r"linked to output 0 of node 11 \(Sink\), which has 0 output"),
    (lambda p: p["4"]["inputs"].update(a=5), r"node 4 \(Add\): input 'a' takes THING from another node's output"),
    (lambda p: p["2"]["inputs"].update(value=11), r"input 'value': 11 is above the maximum 10"),
    (lambda p: p["2"]["inputs"].update(value=float("nan")), r"input 'value': nan is not a finite number"),
    (lambda p: p["2"]["inputs"].update(value="x"), r"value = 'x' is not a valid INT"),
    (lambda p: p["10"]["inputs"].update(mode="other"), r"mode = 'other' is not one of the choices \['keep', 'drop'\]"),
    (lambda p: p["2"].update(class_type="Lister"), r"node 2 \(Lister.*INPUT_IS_LIST"),
    (lambda p: p["10"].update(class_type="Add"), r"no output node"),
])
def test_errors_name_node_and_problem(edit, pattern):
    prompt = fake_prompt()
    edit(prompt)
    with pytest.raises(WorkflowError, match=pattern):
        runner.run_workflow(prompt, classes=FAKE)


def test_type_mismatch_is_reported():
    prompt = fake_prompt()
    classes = {**FAKE, "Other": type("Other", (Source,), {"RETURN_TYPES": ("IMAGE",)})}
    prompt["3"]["class_type"] = "Other"
    with pytest.raises(WorkflowError, match=r"input 'b' expects THING but is linked to output 0 \(IMAGE\) of node 3"):
        runner.run_workflow(prompt, classes=classes)


def test_all_validation_errors_are_reported_at_once():
    prompt = fake_prompt()
    prompt["2"]["inputs"]["value"] = 99
    prompt["10"]["inputs"]["mode"] = "nope"
    with pytest.raises(WorkflowError) as info:
        runner.run_workflow(prompt, classes=FAKE)
    assert "maximum 10" in str(info.value) and "'nope'" in str(info.value)


def test_node_exception_names_node_and_keeps_the_original():
    prompt = fake_prompt()
    prompt["3"]["class_type"] = "Boom"
    with pytest.raises(NodeExecutionError, match=r"node 3 \(Boom\) failed: RuntimeError: kaboom") as info:
        runner.run_workflow(prompt, classes=FAKE)
    assert isinstance(info.value.original, RuntimeError) and info.value.node_id == "3"


def test_coercion_matches_comfyui():
    prompt = fake_prompt()
    prompt["2"]["inputs"]["value"] = 2.0  # integral float -> int
    prompt["4"]["inputs"]["scale"] = 3  # int -> float
    Sink.SEEN.clear()
    runner.run_workflow(prompt, classes=FAKE)
    assert Sink.SEEN == [12.0]  # (2 + 2) * 3.0


# --------------------------------------------------------------------------------------------
# --set overrides, node references, input images
# --------------------------------------------------------------------------------------------

def test_parse_set_values():
    assert runner.parse_set("3.seed=42") == ("3", "seed", 42)
    assert runner.parse_set("NSARM Upscale.prompt=a cat, on grass") == ("NSARM Upscale", "prompt", "a cat, on grass")
    assert runner.parse_set('x.y="quoted"') == ("x", "y", "quoted")
    assert runner.parse_set("x.y=0.5") == ("x", "y", 0.5)
    assert runner.parse_set("x.y=true") == ("x", "y", True)
    assert runner.parse_set("a.b.c=1") == ("a.b", "c", 1)  # titles may contain dots
    for bad in ("seed=1", "3.seed", ".seed=1", "3.=1"):
        with pytest.raises(WorkflowError, match="NODE.INPUT=VALUE"):
            runner.parse_set(bad)
    with pytest.raises(WorkflowError, match="link"):
        runner.parse_set("3.image=[\"1\", 0]")


def test_apply_overrides_by_id_type_and_title():
    api = api_workflow("nsarm_composable")
    types = runner._class_input_types(runner.load_node_classes())
    out = runner.apply_overrides(api, ["5.seed=9", "NSARMTextEncode.prompt=a dog", "NSARM Color Fix.method=none",
                                       "NSARMBitwiseDecode.negative=null"], types)
    assert out["5"]["inputs"]["seed"] == 9 and out["3"]["inputs"]["prompt"] == "a dog"
    assert out["7"]["inputs"]["method"] == "none" and api["5"]["inputs"]["seed"] == 1  # the original is untouched
    with pytest.raises(WorkflowError, match=r"no input 'sed'.*inputs: model, scales, seed"):
        runner.apply_overrides(api, ["5.sed=1"], types)
    with pytest.raises(WorkflowError, match=r"no node 'Nope'.*1 \(LoadImage, 'Load Image'\)"):
        runner.apply_overrides(api, ["Nope.x=1"], types)
    api["9"] = copy.deepcopy(api["7"])
    with pytest.raises(WorkflowError, match="names several nodes by type"):
        runner.apply_overrides(api, ["NSARMColorFix.method=none"], types)
    # Without class information only existing inputs can be set.
    with pytest.raises(WorkflowError, match="no input 'negative'"):
        runner.apply_overrides(api, ["5.negative=1"])


def test_set_image_inputs(tmp_path):
    api = api_workflow("nsarm_upscale")
    img = write_test_image(tmp_path / "a.png", 8, 8)
    out = runner.set_image_inputs(api, {"": img})
    assert out["1"]["inputs"]["image"] == str(img.resolve())
    api["9"] = copy.deepcopy(api["1"])
    with pytest.raises(WorkflowError, match="2 LoadImage nodes"):
        runner.set_image_inputs(api, {"": img})
    assert runner.set_image_inputs(api, {"9": img})["9"]["inputs"]["image"] == str(img.resolve())


def test_parse_input_args(tmp_path):
    img = write_test_image(tmp_path / "a.png", 8, 8)
    assert runner.parse_input_args([str(img)]) == {"": img}
    assert runner.parse_input_args([f"4={img}"]) == {"4": img}
    with pytest.raises(WorkflowError, match="not found"):
        runner.parse_input_args([str(tmp_path / "missing.png")])
    with pytest.raises(WorkflowError, match="two images"):
        runner.parse_input_args([str(img), str(img)])


# --------------------------------------------------------------------------------------------
# Stand-ins and output files (model-free nodes)
# --------------------------------------------------------------------------------------------

def tile_prompt(image: str, overlap: int = 16, prefix: str = "tiles") -> dict:
    """LoadImage -> NSARMTile -> NSARMUntile -> NSARMColorFix -> SaveImage: no model needed."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "NSARMTile", "inputs": {"image": ["1", 0], "tile_size": 64, "overlap": overlap}},
        "3": {"class_type": "NSARMUntile", "inputs": {"image": ["2", 0], "tile_info": ["2", 1], "blend": "cosine"}},
        "4": {"class_type": "NSARMColorFix", "inputs": {"image": ["3", 0], "reference": ["1", 0], "method": "adain"}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
    }


def test_load_image_matches_comfyui_conventions(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image, mask = runner.LoadImage(runner._RunContext(tmp_path, tmp_path, None, {}, None)).load_image("a.png")
    assert image.shape == (1, 5, 7, 3) and image.dtype == torch.float32
    assert torch.equal(image[0], torch.from_numpy(rgba[..., :3].astype(np.float32) / 255.0))
    assert torch.allclose(mask[0], 1 - torch.from_numpy(rgba[..., 3].astype(np.float32) / 255.0))
    Image.fromarray(rgba[..., :3]).save(tmp_path / "b.png")
    _, mask = runner.LoadImage(runner._RunContext(tmp_path, tmp_path, None, {}, None)).load_image(str(tmp_path / "b.png"))
    assert mask.shape == (1, 64, 64) and not mask.any()
    with pytest.raises(WorkflowError, match="not found"):
        runner.LoadImage(runner._RunContext(tmp_path, tmp_path, None, {}, None)).load_image("nope.png")


def test_save_image_counter_never_overwrites(tmp_path):
    src = write_test_image(tmp_path / "in.png", 80, 48)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiles_00003_.png").write_bytes(b"keep me")
    (out / "tilesX_00009_.png").write_bytes(b"other prefix")
    res = runner.run_workflow(tile_prompt(str(src)), output_dir=out)
    assert res.files == {"5": [out / "tiles_00004_.png"]}
    assert res.ui["5"] == {"images": [{"filename": "tiles_00004_.png", "subfolder": "", "type": "output"}]}
    assert (out / "tiles_00003_.png").read_bytes() == b"keep me"
    res2 = runner.run_workflow(tile_prompt(str(src), prefix="sub/dir/tiles"), output_dir=out)
    assert res2.files["5"] == [out / "sub" / "dir" / "tiles_00001_.png"]
    assert res2.ui["5"]["images"][0]["subfolder"] == "sub/dir"
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]
    pixels = png_pixels(res.files["5"][0])
    assert pixels.shape == (48, 80, 3)
    expected = (res.images["5"][0].numpy() * 255.0).clip(0, 255).astype(np.uint8)
    assert np.array_equal(pixels, expected)
    with Image.open(res.files["5"][0]) as im:
        assert json.loads(im.text["prompt"])["5"]["class_type"] == "SaveImage"
    with pytest.raises(WorkflowError, match="outside the output folder"):
        runner.run_workflow(tile_prompt(str(src), prefix="../escape"), output_dir=out)


def test_failed_run_leaves_no_files(tmp_path):
    """A SaveImage that already ran keeps nothing when a later node fails."""
    src = write_test_image(tmp_path / "in.png", 80, 48)
    prompt = tile_prompt(str(src), overlap=48)  # overlap > tile/2: NSARMTile raises at run time
    prompt["0"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "early"}}
    out = tmp_path / "out"
    assert runner.execution_order(prompt, runner.load_node_classes())[:2] == ["1", "0"]  # the early save runs first
    with pytest.raises(NodeExecutionError, match=r"node 2 \(NSARMTile\) failed: ValueError"):
        runner.run_workflow(prompt, output_dir=out)
    assert files_under(out) == []


def test_preview_image_keeps_images_and_writes_only_with_a_temp_folder(tmp_path):
    src = write_test_image(tmp_path / "in.png", 40, 30)
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": str(src)}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    res = runner.run_workflow(prompt, output_dir=tmp_path / "out")
    assert res.images["2"].shape == (1, 30, 40, 3) and res.files == {} and files_under(tmp_path / "out") == []
    res = runner.run_workflow(prompt, output_dir=tmp_path / "out", temp_dir=tmp_path / "tmp")
    assert [p.name for p in res.files["2"]] == ["NSARM_preview_00001_.png"]
    assert res.ui["2"]["images"][0]["type"] == "temp"


# --------------------------------------------------------------------------------------------
# CLI (model-free workflow)
# --------------------------------------------------------------------------------------------

def test_cli_run_png_output_refuses_overwrite(tmp_path, capsys):
    src = write_test_image(tmp_path / "in.png", 80, 48)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(tile_prompt("placeholder.png")))
    out = tmp_path / "result.png"
    assert main(["run", str(wf), "--input", str(src), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    first = out.read_bytes()
    assert main(["run", str(wf), "--input", str(src), "--output", str(out), "--set", "4.method=none"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err and out.read_bytes() == first
    assert main(["run", str(wf), "--input", str(src), "--output", str(out), "--set", "4.method=none", "--overwrite"]) == 0
    assert out.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "result.png", "wf.json"]  # no staging left


def test_cli_run_folder_output_and_user_errors(tmp_path, capsys):
    write_test_image(tmp_path / "in.png", 80, 48)
    wf = tmp_path / "wf.json"
    prompt = tile_prompt("in.png")
    prompt["6"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "orig"}}
    wf.write_text(json.dumps(prompt))
    out = tmp_path / "out"
    assert main(["run", str(wf), "--input-dir", str(tmp_path), "--output", str(out)]) == 0
    assert files_under(out) == ["orig_00001_.png", "tiles_00001_.png"]
    assert main(["run", str(wf), "--input-dir", str(tmp_path), "--output", str(out)]) == 0
    assert len(files_under(out)) == 4
    capsys.readouterr()
    cases = [
        (["--output", str(tmp_path / "one.png")], "2 SaveImage nodes; give an output folder"),
        (["--output", str(out), "--set", "2.overlap=48"], "node 2 (NSARMTile) failed: ValueError"),
        (["--output", str(out), "--set", "2.tile_size=1"], "below the minimum"),
        (["--output", str(out), "--set", "2.bogus=1"], "no input 'bogus'"),
        (["--output", str(out), "--input", str(tmp_path / "nope.png")], "not found"),
    ]
    for extra, message in cases:
        assert main(["run", str(wf), "--input-dir", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "one.png").exists() and len(files_under(out)) == 4
    assert main(["run", str(tmp_path / "missing.json"), "--output", str(out)]) == 2
    assert "workflow file not found" in capsys.readouterr().err


def test_cli_run_unexpected_node_error_shows_traceback(tmp_path, capsys, monkeypatch):
    src = write_test_image(tmp_path / "in.png", 80, 48)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(tile_prompt(str(src))))
    classes = runner.load_node_classes()

    def broken(self, image, tile_info, blend):
        raise RuntimeError("internal bug")

    monkeypatch.setattr(classes["NSARMUntile"], "untile", broken)
    assert main(["run", str(wf), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "node 3 (NSARMUntile) failed: RuntimeError: internal bug" in err


def test_missing_model_files_are_explained(tmp_path):
    with pytest.raises(WorkflowError) as info:
        runner.run_workflow(API_DIR / "nsarm_upscale_api.json", models_dir=tmp_path / "none", output_dir=tmp_path)
    text = str(info.value)
    assert "checkpoint = 'NSARM.pth', but there is nothing to choose from" in text
    assert f"looked up in {(tmp_path / 'none' / 'nsarm').resolve()}" in text and "--models DIR" in text


# --------------------------------------------------------------------------------------------
# End to end: the three shipped workflows on the tiny models
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_shipped_workflow_runs_end_to_end(e2e, name):
    path = e2e["outputs"][name]
    pixels = png_pixels(path)
    width, height = CASES[name][1]
    assert pixels.shape == (height, width, 3)
    assert pixels.std() > 1.0  # an image, not a constant
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # nothing else, no staging files
    if name in e2e["tensors"]:
        image = e2e["tensors"][name]
        assert image.shape == (1, height, width, 3) and torch.isfinite(image).all()
        assert image.min() >= 0 and image.max() <= 1
        assert np.array_equal(pixels, (image[0].numpy() * 255.0).clip(0, 255).astype(np.uint8))


def test_one_node_upscale_equals_the_tiled_node_chain(e2e):
    """NSARMUpscale and Tile -> EncodeLR -> BitwiseDecode -> Decode -> Untile -> ColorFix give the same
    pixels for the same seed (tile i uses seed + i in both; see EXTRA_SETS for the tile batch)."""
    a = png_pixels(e2e["outputs"]["nsarm_upscale"])
    b = png_pixels(e2e["outputs"]["nsarm_tiled_upscale"])
    assert np.array_equal(a, b), f"max diff {np.abs(a.astype(int) - b.astype(int)).max()}"



def test_workflow_saved_before_optional_inputs_were_appended_still_converts():
    """Node inputs are only ever appended as optional: a workflow saved with fewer widget values
    (e.g. the loader before its low-VRAM options existed) keeps its values and gets defaults."""
    import json

    from nsarm_nodes.runner import ui_to_api

    wf = json.loads((ROOT / "workflows" / "nsarm_upscale.json").read_text())
    loader = next(n for n in wf["nodes"] if n["type"] == "NSARMModelLoader")
    loader["widgets_values"] = loader["widgets_values"][:5]
    api = ui_to_api(wf)
    inputs = next(v for v in api.values() if v["class_type"] == "NSARMModelLoader")["inputs"]
    assert inputs == {"checkpoint": "NSARM.pth", "vae": "infinity_vae_d56_f8_14_patchify.pth",
                      "text_encoder": "flan-t5-xl", "dtype": "auto", "attention": "auto"}
