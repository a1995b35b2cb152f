"""The ComfyUI web UI in headless Chromium sees the server's nodes (proves the browser test path).

Needs NSARM_COMFYUI_DIR (skipped only when it is unset), Debian's chromium (/usr/bin/chromium, or
NSARM_CHROMIUM) and the `playwright` Python package (no `playwright install`: the system Chromium
is used). A missing browser is a failure, not a skip.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from comfy_server import browser_available, comfy_server, open_comfy_ui  # noqa: F401  (fixture)

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
SHIPPED = ("nsarm_upscale", "nsarm_composable", "nsarm_tiled_upscale")


def test_ui_lists_core_and_custom_nodes(comfy_server):
    missing = browser_available()
    if missing:
        pytest.fail(f"browser test cannot run: {missing}", pytrace=False)
    with open_comfy_ui(comfy_server.url) as page:
        types = page.evaluate("() => Object.keys(LiteGraph.registered_node_types)")
        assert "SaveImage" in types and "LoadImage" in types
        assert "ClientTestSleep" in types  # a custom node of a pack loaded through the symlink folder
        # The UI can build a node of a registered type in its graph.
        count = page.evaluate("""() => {
            const node = LiteGraph.createNode("SaveImage");
            app.graph.add(node);
            return app.graph._nodes.filter(n => n.type === "SaveImage").length;
        }""")
        assert count >= 1


# Loads a UI workflow with the page's own loader and reports what the frontend made of it. Missing
# node types are caught two ways: an extension hook (afterConfigureGraph receives them, in the 2024
# and in current frontends) and the text of the "missing nodes" dialog. Dialogs left open by the
# previous load are closed first: the 2024 frontend has one modal (app.ui.dialog); current (Vue)
# frontends stack PrimeVue dialogs ("Some Nodes Are Missing", and "Missing Models" for the
# properties.models entries of files not on the server), which app.ui.dialog.close() does not close.
LOAD_JS = """async (wf) => {
    const closeDialogs = async () => {
        if (app.ui && app.ui.dialog && app.ui.dialog.close) app.ui.dialog.close();
        for (let i = 0; i < 50 && document.querySelector(".p-dialog"); i++) {
            document.querySelectorAll(".p-dialog .p-dialog-close-button").forEach(b => b.click());
            await new Promise(r => setTimeout(r, 100));
        }
    };
    if (!window.__nsarmMissing) {
        window.__nsarmMissing = [];
        app.registerExtension({name: "nsarm.test.missingNodes",
                               afterConfigureGraph(missing) { window.__nsarmMissing.push(...(missing || [])); }});
    }
    await closeDialogs();
    window.__nsarmMissing.length = 0;
    await app.loadGraphData(wf);
    await new Promise(r => setTimeout(r, 100));
    const text = document.body.innerText;
    const dialog = /node types were not found|Missing Node Types|Some Nodes Are Missing/i.test(text);
    const missing = window.__nsarmMissing.map(t => (typeof t === "string" ? t : (t && t.type) || String(t)));
    await closeDialogs();
    app.canvas.draw(true, true);  // the frontend grows nodes to fit their widgets when it lays them out
    await new Promise(r => setTimeout(r, 100));
    const nodes = app.graph._nodes.map(n => ({
        id: n.id, type: n.type, has_errors: !!n.has_errors,
        rect: [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT, n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT],
        widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value})),
        inputs: (n.inputs || []).map(i => ({name: i.name, type: i.type, link: i.link, widget: !!i.widget})),
    }));
    const prompt = (await app.graphToPrompt()).output;
    return {registered: Object.keys(LiteGraph.registered_node_types), missing, dialog, nodes, prompt};
}"""


def _overlaps(a, b) -> bool:
    """Node rectangles [x, y, w, h] (title bar included) that share any area."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def test_ui_loads_shipped_workflows(comfy_server):
    """Every shipped UI workflow loads in the ComfyUI frontend with no missing node type, every widget
    holds its saved value, and the frontend's own UI->API conversion gives the API twin."""
    missing = browser_available()
    if missing:
        pytest.fail(f"browser test cannot run: {missing}", pytrace=False)
    with open_comfy_ui(comfy_server.url) as page:
        # Negative control: a workflow with an unknown node type is detected by both checks.
        bogus = json.loads((WORKFLOWS / "nsarm_upscale.json").read_text())
        bogus["nodes"][2]["type"] = "NSARMBogus"
        res = page.evaluate(LOAD_JS, bogus)
        assert "NSARMBogus" in res["missing"] and res["dialog"], res["missing"]

        for name in SHIPPED:
            wf = json.loads((WORKFLOWS / f"{name}.json").read_text())
            res = page.evaluate(LOAD_JS, wf)
            types = {n["type"] for n in wf["nodes"]}
            assert types <= set(res["registered"]), (name, types - set(res["registered"]))
            assert res["missing"] == [] and not res["dialog"], (name, res["missing"])
            loaded = {n["id"]: n for n in res["nodes"]}
            assert set(loaded) == {n["id"] for n in wf["nodes"]}, name
            # As drawn by this frontend (which may grow a node beyond its saved size), no node covers another.
            drawn = sorted(loaded.values(), key=lambda n: n["id"])
            clashes = [(a["type"], b["type"]) for i, a in enumerate(drawn) for b in drawn[i + 1:]
                       if _overlaps(a["rect"], b["rect"])]
            assert not clashes, (name, clashes, {n["type"]: n["rect"] for n in drawn})
            for node in wf["nodes"]:
                got = loaded[node["id"]]
                assert got["type"] == node["type"] and not got["has_errors"], (name, node["id"])
                values = [w["value"] for w in got["widgets"]]
                assert len(values) == len(node["widgets_values"]), (name, node["type"], got["widgets"])
                for w, want in zip(got["widgets"], node["widgets_values"]):
                    assert _same(w["value"], want), (name, node["type"], w["name"], w["value"], want)
                # Current frontends give every widget an input socket too (i.widget set, unlinked);
                # the 2024 one only a widget converted to an input. Compare the sockets proper.
                sockets = [(i["name"], i["type"], i["link"]) for i in got["inputs"]
                           if not (i["widget"] and i["link"] is None)]
                assert sockets == [(i["name"], i["type"], i["link"]) for i in node["inputs"]], \
                    (name, node["type"], got["inputs"])
            api = json.loads((WORKFLOWS / "api" / f"{name}_api.json").read_text())
            assert set(res["prompt"]) == set(api), name
            for nid, entry in api.items():
                got = res["prompt"][nid]
                assert got["class_type"] == entry["class_type"]
                inputs = {k: v for k, v in got["inputs"].items() if k != "upload"}  # LoadImage's upload button
                assert set(inputs) == set(entry["inputs"]), (name, nid, inputs)
                for key, want in entry["inputs"].items():
                    assert _same(inputs[key], want), (name, nid, key, inputs[key], want)


def test_fresh_model_loader_defaults_to_the_installed_nsarm_files(comfy_server):
    """A Model Loader added from the node library picks the NSARM checkpoint, the file that looks like a
    VAE (not the alphabetically first file) and the Flan-T5 folder, in the frontend itself."""
    missing = browser_available()
    if missing:
        pytest.fail(f"browser test cannot run: {missing}", pytrace=False)
    for name in ("NSARM.pth", "infinity_vae_d56_f8_14_patchify.pth"):  # placeholders unless installed
        if not (comfy_server.models_dir / name).exists():
            (comfy_server.models_dir / name).write_bytes(b"")
    t5 = comfy_server.text_encoders_dir / "flan-t5-xl"
    t5.mkdir(exist_ok=True)
    if not (t5 / "config.json").exists():
        (t5 / "config.json").write_text("{}")
    with open_comfy_ui(comfy_server.url) as page:
        values = page.evaluate("""() => {
            const node = LiteGraph.createNode("NSARMModelLoader");
            return Object.fromEntries(node.widgets.map(w => [w.name, w.value]));
        }""")
    assert values["checkpoint"] == "NSARM.pth"
    assert values["vae"] == "infinity_vae_d56_f8_14_patchify.pth"
    assert values["text_encoder"] == "flan-t5-xl"
