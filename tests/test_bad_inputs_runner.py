"""Bad workflows through the headless runner (and `python -m nsarm_nodes run`): structure errors
name the node and field, no recursion a file can exhaust, NaN widget values refused, PNG metadata
without local folders, and hypothesis mutations of the shipped workflows that either run or stop
with a WorkflowError -- never another exception."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from nsarm_nodes import runner
from nsarm_nodes.__main__ import main
from nsarm_nodes.runner import WorkflowError

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
NAMES = ("nsarm_upscale", "nsarm_composable", "nsarm_tiled_upscale")
TINY_SETS = ["NSARMModelLoader.checkpoint=NSARM.safetensors",
             "NSARMModelLoader.vae=infinity_vae_d56_f8_14_patchify.safetensors"]


class WouldRun(Exception):
    """Raised by before_run: the workflow passed every check and would now execute."""


def stop_before_running(prompt, order):
    raise WouldRun


def ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def api(name: str) -> dict:
    return json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text())


def image(path: Path, size=(24, 16)) -> Path:
    Image.fromarray((np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from nsarm_nodes.testing import make_tiny_models

    root = tmp_path_factory.mktemp("models")
    make_tiny_models(root, seed=0)
    return root


def validate(workflow, models: Path | None = None, sets=()) -> None:
    """Convert and check `workflow` as `run` does; WouldRun if it would execute."""
    runner.run_workflow(workflow, sets=sets, models_dir=models, before_run=stop_before_running,
                        output_dir=Path("/nonexistent-never-written"))


# --------------------------------------------------------------------------------------------
# Structure errors name the node and the field

API_CASES = [
    (lambda p: p["3"].update(inputs=[1, 2]), 'node 3 (NSARMUpscale): "inputs" must be an object'),
    (lambda p: p["3"].update(class_type=["NSARMUpscale"]), 'node 3: "class_type" must be a node class name'),
    (lambda p: p.update({"3": "NSARMUpscale"}), 'node 3: must be an object'),
    (lambda p: p["3"]["inputs"].update(image=["1", 0, 1]), "node 3 (NSARMUpscale): input 'image' is the list"),
    (lambda p: p["3"]["inputs"].update(image=[["1"], 0]), "node 3 (NSARMUpscale): input 'image' is the list"),
    (lambda p: p["3"]["inputs"].update(image=["1", -1]), "input 'image' links to output -1"),
    (lambda p: p["3"].update(_meta="title"), 'node 3 (NSARMUpscale): "_meta" must be an object'),
    (lambda p: p["3"]["inputs"].update(tau=float("nan")), "node 3 (NSARMUpscale, 'NSARM Upscale'): input 'tau': nan is not a finite number"),
    (lambda p: p["3"]["inputs"].update(seed=-5), "input 'seed': -5 is below the minimum 0"),
    (lambda p: p["3"]["inputs"].update(tile_batch_size="many"), "tile_batch_size = 'many' is not a valid INT"),
]


@pytest.mark.parametrize("edit, needle", API_CASES)
def test_api_structure_errors(models, edit, needle):
    prompt = api("nsarm_upscale")
    edit(prompt)
    with pytest.raises(WorkflowError) as exc:
        validate(prompt, models, TINY_SETS)
    assert needle in str(exc.value), exc.value


def _ui_node(wf: dict, type_: str) -> dict:
    return next(n for n in wf["nodes"] if n["type"] == type_)


UI_CASES = [
    (lambda w: w.update(nodes={"1": {}}), 'the workflow\'s "nodes" must be a list'),
    (lambda w: w.update(links="1,2"), 'the workflow\'s "links" must be a list'),
    (lambda w: w["nodes"][0].update(id=[1]), 'nodes[0]: "id" must be a number or a string'),
    (lambda w: w["nodes"][0].pop("type"), 'node 1: "type" must be a node class name'),
    (lambda w: w["nodes"].append(copy.deepcopy(w["nodes"][0])), "node 1: the id is used by two nodes"),
    (lambda w: _ui_node(w, "NSARMUpscale").update(inputs="model,image"),
     'node 3 (NSARMUpscale): "inputs" must be a list'),
    (lambda w: _ui_node(w, "NSARMUpscale")["inputs"].__setitem__(0, "model"),
     "node 3 (NSARMUpscale): inputs[0] must be an object"),
    (lambda w: _ui_node(w, "NSARMUpscale")["inputs"][0].update(link=[1]),
     "node 3 (NSARMUpscale): input 'model': \"link\" must be a link id or null"),
    (lambda w: _ui_node(w, "NSARMUpscale").update(widgets_values="a prompt"),
     'node 3 (NSARMUpscale): "widgets_values" must be a list'),
    (lambda w: _ui_node(w, "NSARMUpscale").update(mode="bypass"), 'node 3 (NSARMUpscale): "mode" must be an integer'),
    (lambda w: w["links"].__setitem__(0, [1, 2]), "links[0] must be [id, origin, slot, target, target_slot, type]"),
    (lambda w: w["links"][0].__setitem__(2, "0"), "links[0]: id and origin must be ids and the origin slot"),
    (lambda w: w["links"][0].__setitem__(0, [1]), "links[0]: id and origin must be ids"),
    (lambda w: w["links"].append(list(w["links"][0])), "links[3]: link id 1 is used twice"),
    (lambda w: w.update(definitions=[]), 'the workflow\'s "definitions" must be an object'),
]


@pytest.mark.parametrize("edit, needle", UI_CASES)
def test_ui_structure_errors(edit, needle):
    wf = ui("nsarm_upscale")
    edit(wf)
    with pytest.raises(WorkflowError) as exc:
        validate(wf)
    assert needle in str(exc.value), exc.value


def test_cli_run_reports_structure_errors_in_one_message(tmp_path):
    wf = api("nsarm_upscale")
    wf["3"]["inputs"]["image"] = ["1", 0, "x"]
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    (tmp_path / "nan.json").write_text(json.dumps(api("nsarm_upscale")).replace('"tau": 0.5', '"tau": NaN'))
    for name, needle in (("wf.json", "input 'image' is the list"), ("nan.json", "input 'tau': nan is not a finite")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["run", str(tmp_path / name), "-o", str(tmp_path / "out"), "--models", str(tmp_path)])
        assert code == 2 and err.getvalue().startswith("error: ") and needle in err.getvalue(), err.getvalue()
        assert "Traceback" not in err.getvalue()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------------------------
# No recursion a file can exhaust

def test_a_3000_node_chain_runs(tmp_path):
    """LoadImage -> (NSARMTile -> NSARMUntile) x 1500 -> PreviewImage: validated, ordered and run."""
    prompt = {"0": {"class_type": "LoadImage", "inputs": {"image": str(image(tmp_path / "in.png"))}}}
    last = "0"
    for i in range(1, 1501):
        t, u = f"t{i}", f"u{i}"
        prompt[t] = {"class_type": "NSARMTile", "inputs": {"image": [last, 0], "tile_size": 16, "overlap": 0}}
        prompt[u] = {"class_type": "NSARMUntile", "inputs": {"image": [t, 0], "tile_info": [t, 1], "blend": "none"}}
        last = u
    prompt["out"] = {"class_type": "PreviewImage", "inputs": {"images": [last, 0]}}
    result = runner.run_workflow(prompt, output_dir=tmp_path / "o")
    assert len(result.order) == 3002
    np.testing.assert_array_equal(result.images["out"][0].numpy(),
                                  np.asarray(Image.open(tmp_path / "in.png"), dtype=np.float32) / 255)


def test_a_3000_reroute_chain_in_the_ui_format(tmp_path):
    wf = ui("nsarm_upscale")
    load = _ui_node(wf, "LoadImage")
    up = _ui_node(wf, "NSARMUpscale")
    link_id = next(i["link"] for i in up["inputs"] if i["name"] == "image")
    n = 3000
    for k in range(n):
        rid = 1000 + k
        wf["nodes"].append({"id": rid, "type": "Reroute", "mode": 0,
                            "inputs": [{"name": "", "type": "*", "link": 5000 + k}], "outputs": []})
        origin = load["id"] if k == 0 else rid - 1
        wf["links"].append([5000 + k, origin, 0, rid, 0, "IMAGE"])
    for link in wf["links"]:
        if link[0] == link_id:
            link[1] = 1000 + n - 1
    prompt = runner.ui_to_api(wf)
    assert prompt[str(up["id"])]["inputs"]["image"] == [str(load["id"]), 0]


@pytest.mark.parametrize("depth, needle", [(100_000, "nested too deeply"), (500, "nested more than 64 levels")])
def test_deep_nesting_is_refused(tmp_path, depth, needle):
    path = tmp_path / "deep.json"
    path.write_text('{"1": {"class_type": "LoadImage", "inputs": {"image": ' + "[" * depth + "]" * depth + "}}}")
    with pytest.raises(WorkflowError, match=needle):
        runner.load_workflow(path)
    nested: list = []
    for _ in range(200):
        nested = [nested]
    with pytest.raises(WorkflowError, match="nested more than 64"):
        runner.run_workflow({"1": {"class_type": "LoadImage", "inputs": {"image": nested}}})


# --------------------------------------------------------------------------------------------
# Files: LoadImage refuses special files; PNG metadata keeps file names only

@contextlib.contextmanager
def hang_guard(seconds: int):
    def fail(signum, frame):
        raise TimeoutError("hung")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _load_save(prefix="out") -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}


def test_load_image_refuses_special_files_and_bombs(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with hang_guard(20), pytest.raises(WorkflowError, match="pipe.png: a FIFO"):
        runner.run_workflow(_load_save(), inputs={"": tmp_path / "pipe.png"}, output_dir=tmp_path / "o")
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(WorkflowError, match=r"300x200 = 60,000 pixels, more than the limit of 50,000"):
        runner.run_workflow(_load_save(), inputs={"": tmp_path / "big.png"}, output_dir=tmp_path / "o",
                            max_pixels=50_000)
    for prefix in ("../escape", "/abs/path", "a\0b"):
        with pytest.raises(WorkflowError):
            runner.run_workflow(_load_save(prefix), inputs={"": image(tmp_path / "in.png")}, output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.png"))


def test_png_metadata_names_files_not_local_folders(tmp_path):
    (tmp_path / "private").mkdir()
    src = image(tmp_path / "private" / "holiday.png")
    wf = {"nodes": [
        {"id": 1, "type": "LoadImage", "mode": 0, "inputs": [], "widgets_values": [str(src), "image"]},
        {"id": 2, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
         "widgets_values": ["meta"]}],
          "links": [[1, 1, 0, 2, 0, "IMAGE"]]}
    out = tmp_path / "out"
    for kwargs in ({}, {"inputs": {"": src}}):  # the path in the workflow, and one given with --input
        result = runner.run_workflow(wf, output_dir=out, **kwargs)
        with Image.open(result.saved[0]) as im:
            text = dict(im.text)
        assert set(text) == {"prompt", "workflow"}
        assert str(tmp_path) not in text["prompt"] + text["workflow"]
        assert json.loads(text["prompt"])["1"]["inputs"]["image"] == "holiday.png"
        assert json.loads(text["workflow"])["nodes"][0]["widgets_values"][0] == "holiday.png"


# --------------------------------------------------------------------------------------------
# Fuzzing: random mutations of the shipped workflows run or stop with a WorkflowError

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8) | st.sampled_from(["1", "2", "3", "NSARMUpscale", "LoadImage", "IMAGE", "*", ""]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


def _paths(obj) -> list[tuple]:
    """Every key path in a JSON value (iteratively)."""
    out, stack = [], [((), obj)]
    while stack:
        path, value = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, child in items:
            out.append(path + (key,))
            stack.append((path + (key,), child))
    return out


def _mutate(wf, path, op, value):
    parent = wf
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = copy.deepcopy(value)  # (a shared object could be put inside itself: JSON has no cycles)
    elif op == "wrap":
        parent[key] = [parent[key]]
    elif op == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
    elif op == "stringify":
        parent[key] = json.dumps(parent[key])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), name=st.sampled_from(NAMES), fmt=st.sampled_from(["ui", "api"]),
       op=st.sampled_from(["delete", "replace", "replace", "wrap", "duplicate", "stringify"]), value=JSON_VALUES)
def test_workflow_mutations_run_or_stop_with_a_workflow_error(models, data, name, fmt, op, value):
    wf = ui(name) if fmt == "ui" else api(name)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = _paths(wf)
        if not paths:
            break
        _mutate(wf, data.draw(st.sampled_from(paths), label="path"), op, value)
    try:
        validate(wf, models, TINY_SETS)
    except WouldRun:
        event("would run")
    except WorkflowError as exc:
        assert str(exc).strip()
        event("WorkflowError")
