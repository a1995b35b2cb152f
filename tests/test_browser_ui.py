"""The ComfyUI web UI in headless Chromium sees the server's nodes (proves the browser test path).

Needs NSARM_COMFYUI_DIR (skipped only when it is unset), Debian's chromium (/usr/bin/chromium, or
NSARM_CHROMIUM) and the `playwright` Python package (no `playwright install`: the system Chromium
is used). A missing browser is a failure, not a skip.
"""
from __future__ import annotations

import pytest

from comfy_server import browser_available, comfy_server, open_comfy_ui  # noqa: F401  (fixture)


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
