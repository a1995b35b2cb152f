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


@pytest.mark.parametrize("name", NAMES)
def test_saved_layout_has_no_overlapping_nodes(name):
    nodes = json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"]
    rects = [(n["type"], n["pos"][0], n["pos"][1] - 30, n["size"][0], n["size"][1] + 30) for n in nodes]
    for i, (ta, xa, ya, wa, ha) in enumerate(rects):
        for tb, xb, yb, wb, hb in rects[i + 1:]:
            assert not (xa < xb + wb and xb < xa + wa and ya < yb + hb and yb < ya + ha), (name, ta, tb)
