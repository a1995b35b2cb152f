"""Render the template thumbnails: workflows/<name>.jpg, a card for each shipped UI workflow.

ComfyUI's template browser (frontend 1.27) shows `<pack>/workflows/<name>.jpg` beside `<name>.json`
and takes the title and the caption from the file name only, so the card carries the one-line
description (DESCRIPTIONS) above a drawing of the graph made from the workflow file alone (node
boxes at their saved positions and sizes, titles, links). `python scripts/render_thumbnails.py`
rewrites every thumbnail; tests/test_workflow_files.py checks that the committed ones are current.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
SIZE = (512, 512)
HEADER = 150  # pixels of the card above the drawing
DESCRIPTIONS = {
    "nsarm_upscale": ("NSARM 4x upscale", "One node: any size to 4x, the tiles share one latent canvas"),
    "nsarm_tiled_upscale": ("NSARM tiled chain", "Tile, encode, sample and decode one shared canvas, node by node"),
    "nsarm_composable": ("NSARM step by step", "A 256x256 image: prompt, the 13 scales, decode and colour fix"),
}
MARGIN = 24
TITLE_HEIGHT = 30  # LiteGraph's title bar, above a node's saved position
BACKGROUND = (32, 32, 36)
BODY = (53, 53, 58)
OUTLINE = (90, 90, 98)
TEXT = (230, 230, 230)
OUR_TITLE = (46, 86, 130)  # NSARM nodes
CORE_TITLE = (70, 70, 76)  # ComfyUI core nodes
LINK_COLOURS = {"IMAGE": (100, 181, 246), "NSARM_MODEL": (186, 104, 200), "NSARM_COND": (255, 183, 77),
                "NSARM_SCALES": (129, 199, 132), "NSARM_LATENT": (240, 98, 146), "NSARM_TILES": (77, 208, 225)}
JPEG_QUALITY = 90


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """`text`, shortened with an ellipsis to fit `width` pixels."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "\u2026" if len(text) > 1 else ""
    return text


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def render(name: str, workflow: dict) -> bytes:
    """JPEG bytes of the card (deterministic for a given Pillow version)."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    x0 = min(n["pos"][0] for n in nodes.values())
    y0 = min(n["pos"][1] - TITLE_HEIGHT for n in nodes.values())
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    scale = min((SIZE[0] - 2 * MARGIN) / (x1 - x0), (SIZE[1] - HEADER - 2 * MARGIN) / (y1 - y0))
    off_x = (SIZE[0] - (x1 - x0) * scale) / 2
    off_y = HEADER + (SIZE[1] - HEADER - (y1 - y0) * scale) / 2

    def at(x: float, y: float) -> tuple[float, float]:
        return off_x + (x - x0) * scale, off_y + (y - y0) * scale

    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    title, description = DESCRIPTIONS[name]
    draw.text((MARGIN, MARGIN), title, fill=TEXT, font=ImageFont.load_default(size=38))
    body = ImageFont.load_default(size=24)
    for i, line in enumerate(_wrap(draw, description, body, SIZE[0] - 2 * MARGIN)):
        draw.text((MARGIN, MARGIN + 56 + 30 * i), line, fill=(200, 200, 200), font=body)
    font = ImageFont.load_default(size=max(8, round(16 * scale)))
    for _, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        a, b = nodes[src], nodes[dst]
        start = at(a["pos"][0] + a["size"][0], a["pos"][1] + 14 + 22 * src_slot)
        end = at(b["pos"][0], b["pos"][1] + 14 + 22 * dst_slot)
        mid = (start[0] + end[0]) / 2
        draw.line([start, (mid, start[1]), (mid, end[1]), end], fill=LINK_COLOURS.get(kind, TEXT), width=2)
    for node in nodes.values():
        x, y = node["pos"]
        w, h = node["size"]
        top_left, bottom_right = at(x, y - TITLE_HEIGHT), at(x + w, y + h)
        draw.rounded_rectangle([top_left, bottom_right], radius=6, fill=BODY, outline=OUTLINE)
        title_bottom = at(x + w, y)
        colour = OUR_TITLE if node["type"].startswith("NSARM") else CORE_TITLE
        draw.rounded_rectangle([top_left, title_bottom], radius=6, fill=colour)
        label = _fit(draw, node.get("title") or node["type"], font, bottom_right[0] - top_left[0] - 6)
        draw.text((top_left[0] + 3, (top_left[1] + title_bottom[1]) / 2), label, fill=TEXT, font=font, anchor="lm")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def main(argv: list[str]) -> int:
    for path in sorted(WORKFLOWS.glob("*.json")):
        thumb = path.with_suffix(".jpg")
        thumb.write_bytes(render(path.stem, json.loads(path.read_text())))
        print(thumb)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
