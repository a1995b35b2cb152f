"""Shipped workflow files: template thumbnails are present and current, saved layouts do not overlap.

(The browser test checks the layout as a frontend actually draws it, tests/test_browser_ui.py.)
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def _renderer():
    spec = importlib.util.spec_from_file_location("render_thumbnails", ROOT / "scripts" / "render_thumbnails.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_every_template_has_a_current_thumbnail_and_description(name):
    render = _renderer()
    thumb = WORKFLOWS / f"{name}.jpg"
    assert thumb.is_file(), f"{thumb} missing: run python scripts/render_thumbnails.py"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.size == render.SIZE
    title, description = render.DESCRIPTIONS[name]
    assert title and 20 <= len(description) <= 80
    assert thumb.read_bytes() == render.render(name, json.loads((WORKFLOWS / f"{name}.json").read_text())), \
        f"{thumb} is stale: run python scripts/render_thumbnails.py"


def test_workflows_is_the_only_template_folder():
    """ComfyUI (0.3.6x) serves a pack's templates from the first of these folders that exists (one static
    route per folder, all at /api/workflow_templates/<pack>/): another one, even without workflows in
    it, would hide workflows/ from the templates browser."""
    others = [name for name in ("example_workflows", "example", "examples", "workflow") if (ROOT / name).exists()]
    assert not others, f"{others}: ComfyUI would serve templates from there instead of workflows/"


@pytest.mark.parametrize("name", NAMES)
def test_saved_layout_has_no_overlapping_nodes(name):
    nodes = json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"]
    rects = [(n["type"], n["pos"][0], n["pos"][1] - 30, n["size"][0], n["size"][1] + 30) for n in nodes]
    for i, (ta, xa, ya, wa, ha) in enumerate(rects):
        for tb, xb, yb, wb, hb in rects[i + 1:]:
            assert not (xa < xb + wb and xb < xa + wa and ya < yb + hb and yb < ya + ha), (name, ta, tb)


def test_fresh_loader_defaults_pick_the_nsarm_files(tmp_path, monkeypatch):
    """Outside ComfyUI too: checkpoint = the NSARM file, vae = the file that looks like a VAE (not the
    alphabetically first file), text encoder = the Flan-T5 folder, else 'cached prompts only'."""
    from nsarm_nodes import runner

    monkeypatch.setenv("NSARM_MODELS_DIR", str(tmp_path))
    (tmp_path / "nsarm").mkdir()
    for name in ("NSARM.pth", "infinity_vae_d56_f8_14_patchify.pth", "Another.safetensors"):
        (tmp_path / "nsarm" / name).write_bytes(b"")
    loader = runner.load_node_classes()["NSARMModelLoader"]
    spec = loader.INPUT_TYPES()["required"]
    assert spec["checkpoint"][1]["default"] == "NSARM.pth"
    assert spec["vae"][1]["default"] == "infinity_vae_d56_f8_14_patchify.pth"
    assert spec["text_encoder"][1]["default"] == "cached prompts only"
    (tmp_path / "text_encoders" / "flan-t5-xl").mkdir(parents=True)
    (tmp_path / "text_encoders" / "flan-t5-xl" / "config.json").write_text("{}")
    assert loader.INPUT_TYPES()["required"]["text_encoder"][1]["default"] == "flan-t5-xl"
