"""nsarm_nodes.client against a real ComfyUI server (core nodes + a generated test-node pack).

The live tests need NSARM_COMFYUI_DIR (see tests/comfy_server.py; skipped only when it is unset).
The tests at the top (API-prompt helpers, websocket framing against a fake peer, file commits, a
server that is down) need no ComfyUI and always run.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_server import ComfyServer, comfy_server, free_port  # noqa: F401  (fixture)
from nsarm_nodes import client
from nsarm_nodes.client import ComfyClientError, queue_workflow, set_input_image


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------
# No server needed
# ------------------------------------------------------------------------------------------

def test_set_input_image_single_loadimage_copy():
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "old.png"}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    out = set_input_image(prompt, "new.png")
    assert out["1"]["inputs"]["image"] == "new.png"
    assert prompt["1"]["inputs"]["image"] == "old.png"  # the argument is not modified


def test_set_input_image_targets_and_errors():
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
              "4": {"class_type": "LoadImage", "inputs": {"image": "b.png"}},
              "7": {"class_type": "MyLoader", "inputs": {}}}
    with pytest.raises(ComfyClientError, match=r"several LoadImage nodes \(ids 1, 4\)"):
        set_input_image(prompt, "x.png")
    assert set_input_image(prompt, "x.png", "4")["4"]["inputs"]["image"] == "x.png"
    assert set_input_image(prompt, "x.png", 7, input_name="pixels")["7"]["inputs"] == {"pixels": "x.png"}
    with pytest.raises(ComfyClientError, match="no node with id '9'"):
        set_input_image(prompt, "x.png", "9")
    with pytest.raises(ComfyClientError, match="no LoadImage node"):
        set_input_image({"2": {"class_type": "SaveImage", "inputs": {}}}, "x.png")


def test_server_down_names_url_and_how_to_start(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ComfyClientError) as info:
        queue_workflow(url, {"1": {"class_type": "SaveImage", "inputs": {}}}, out_dir=tmp_path / "out", timeout=10)
    msg = str(info.value)
    assert url in msg and "refused" in msg.lower() and "main.py" in msg
    assert files_in(tmp_path) == []


def test_commit_never_clobbers(tmp_path):
    (tmp_path / "a.png").write_bytes(b"old")
    for content in (b"new1", b"new2"):
        tmp = tmp_path / f".t{content.decode()}.part"
        tmp.write_bytes(content)
        client._commit(tmp, tmp_path / "a.png", overwrite=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"a.png": b"old", "a_1.png": b"new1", "a_2.png": b"new2"}
    tmp = tmp_path / ".x.part"
    tmp.write_bytes(b"over")
    assert client._commit(tmp, tmp_path / "a.png", overwrite=True) == tmp_path / "a.png"
    assert (tmp_path / "a.png").read_bytes() == b"over" and not tmp.exists()


def test_format_progress():
    assert client.format_progress({"type": "progress", "node": "5", "class_type": "NSARMUpscale", "value": 3, "max": 8}) \
        == "  node 5 (NSARMUpscale): 3/8"
    assert client.format_progress({"type": "executing", "node": "5", "class_type": None}) == "running node 5"
    assert client.format_progress({"type": "executed", "node": "5"}) is None


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + n.to_bytes(2, "big")
    else:
        head += bytes([127]) + n.to_bytes(8, "big")
    return head + payload


def _read_client_frame(conn: socket.socket) -> tuple[int, bytes]:
    def exact(n):
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            assert chunk, "client closed early"
            data += chunk
        return data
    b0, b1 = exact(2)
    assert b1 & 0x80, "client frames must be masked"
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(exact(2), "big")
    elif n == 127:
        n = int.from_bytes(exact(8), "big")
    mask = exact(4)
    return b0 & 0x0F, bytes(c ^ mask[i % 4] for i, c in enumerate(exact(n)))


def test_websocket_client_against_fake_peer():
    """Handshake, leftover bytes after the 101, ping/pong, fragments, 16/64-bit lengths, close."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: dict = {}
    may_close = threading.Event()
    big = b"x" * 70000

    def peer():
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            seen["request"] = request.decode()
            key = [ln.split(":", 1)[1].strip() for ln in seen["request"].split("\r\n") if ln.lower().startswith("sec-websocket-key")][0]
            accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + _frame(1, b'{"first": 1}'))
            conn.sendall(_frame(9, b"p1") + _frame(1, b"hel", fin=False) + _frame(0, b"lo")
                         + _frame(2, bytes(300)) + _frame(1, big))
            seen["pong"] = _read_client_frame(conn)
            may_close.wait(10)
            conn.sendall(_frame(8, (1001).to_bytes(2, "big")))
            seen["close_reply"] = _read_client_frame(conn)

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    ws = client._WebSocket(f"http://127.0.0.1:{port}", "/ws?clientId=abc", timeout=5)
    try:
        assert ws.recv(5) == (1, b'{"first": 1}')
        assert ws.recv(5) == (1, b"hello")
        assert ws.recv(5) == (2, bytes(300))
        assert ws.recv(5) == (1, big)
        assert ws.recv(0.2) is None  # nothing more yet: a timeout, not an error
        may_close.set()
        with pytest.raises(client._WSClosed, match="1001"):
            ws.recv(5)
    finally:
        ws.sock.close()
        thread.join(5)
        listener.close()
    assert seen["request"].startswith("GET /ws?clientId=abc HTTP/1.1\r\n")
    assert seen["pong"] == (0xA, b"p1")
    assert seen["close_reply"][0] == 0x8


# ------------------------------------------------------------------------------------------
# Live ComfyUI
# ------------------------------------------------------------------------------------------

def empty_scale_save(prefix: str, color: int = 0xFF8000) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 2, "color": color}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                     "width": 128, "height": 96, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def load_scale_save(prefix: str, node: str = "1") -> dict:
    return {
        node: {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": [node, 0], "upscale_method": "nearest-exact", "scale_by": 2.0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def sleep_prompt(prefix: str, seconds: float, steps: int) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ClientTestSleep", "inputs": {"image": ["1", 0], "seconds": seconds, "steps": steps}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def random_png(path: Path, seed: int, size=(40, 30)) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def wait_idle(server: ComfyServer, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        queue = server.get_json("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"server still busy: {queue}")


def test_packs_load_through_symlinks_only(comfy_server):
    """custom_nodes: in the yaml points at a folder of symlinks; ComfyUI follows them, loads nothing else."""
    info = comfy_server.get_json("/object_info")
    assert "ClientTestFail" in info and "SaveImage" in info
    log = comfy_server.log()
    assert str(comfy_server.custom_nodes_dir / "nsarm-comfyui") in log  # the repo was scanned
    scanned = [ln.split(":", 1)[1].strip() for ln in log.splitlines() if " seconds" in ln and ": /" in ln]
    assert scanned, log
    allowed = (str(comfy_server.custom_nodes_dir), str(Path(os.environ["NSARM_COMFYUI_DIR"]).resolve() / "custom_nodes"))
    assert [p for p in scanned if not p.startswith(allowed)] == []  # nothing from beside the repo
    assert not [p for p in comfy_server.import_failures() if p.endswith("nsarm_client_test_nodes")]


def test_empty_image_scale_save(comfy_server, tmp_path):
    events = []
    out = queue_workflow(comfy_server.url, empty_scale_save("live_empty"), out_dir=tmp_path, timeout=60,
                         on_progress=events.append)
    assert [p.name for p in out] == ["live_empty_00001_.png", "live_empty_00002_.png"]
    for path in out:
        with Image.open(path) as img:
            assert img.size == (128, 96) and img.mode == "RGB"
            px = np.asarray(img).astype(int)
        assert np.abs(px - np.array([255, 128, 0])).max() <= 1
    assert files_in(tmp_path) == [p.name for p in out]  # no temp files left
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "done"
    assert [(e["node"], e["class_type"]) for e in events if e["type"] == "executing"] == \
        [("1", "EmptyImage"), ("2", "ImageScale"), ("3", "SaveImage")]


def test_upload_loadimage_scale_by(comfy_server, tmp_path):
    src = random_png(tmp_path / "src.png", seed=1)
    out = queue_workflow(comfy_server.url, load_scale_save("live_load"), {"": tmp_path / "src.png"}, tmp_path / "out",
                         timeout=60)
    assert len(out) == 1
    got = np.asarray(Image.open(out[0]).convert("RGB"))
    np.testing.assert_array_equal(got, src.repeat(2, axis=0).repeat(2, axis=1))
    assert (comfy_server.input_dir / "src.png").is_file()


def test_inputs_target_node_ids(comfy_server, tmp_path):
    a = random_png(tmp_path / "a.png", seed=2, size=(16, 12))
    b = random_png(tmp_path / "b.png", seed=3, size=(10, 14))
    prompt = {**load_scale_save("live_a", "1"),
              "4": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
              "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "live_b"}}}
    out = queue_workflow(comfy_server.url, prompt, {"1": tmp_path / "a.png", "4": tmp_path / "b.png"},
                         tmp_path / "out", timeout=60)
    by_name = {p.name.split("_0")[0]: np.asarray(Image.open(p).convert("RGB")) for p in out}
    np.testing.assert_array_equal(by_name["live_a"], a.repeat(2, 0).repeat(2, 1))
    np.testing.assert_array_equal(by_name["live_b"], b)


def test_unknown_node_type_is_named(comfy_server, tmp_path):
    prompt = empty_scale_save("live_unknown")
    prompt["2"] = {"class_type": "NoSuchNSARMNode", "inputs": {"image": ["1", 0]}}
    with pytest.raises(ComfyClientError) as info:
        queue_workflow(comfy_server.url, prompt, out_dir=tmp_path / "out", timeout=60)
    msg = str(info.value)
    assert "NoSuchNSARMNode" in msg and "node 2" in msg and comfy_server.url in msg
    assert files_in(tmp_path / "out") == []


def test_validation_error_lists_node_errors(comfy_server, tmp_path):
    prompt = empty_scale_save("live_invalid")
    prompt["1"]["inputs"]["width"] = 0
    with pytest.raises(ComfyClientError) as info:
        queue_workflow(comfy_server.url, prompt, out_dir=tmp_path / "out", timeout=60)
    msg = str(info.value)
    assert "HTTP 400" in msg and "node 1 (EmptyImage)" in msg and "value_smaller_than_min" in msg and "width" in msg


def test_execution_error_and_no_files(comfy_server, tmp_path):
    prompt = empty_scale_save("live_fail")
    prompt["2"] = {"class_type": "ClientTestFail", "inputs": {"image": ["1", 0], "message": "boom-1234"}}
    prompt["4"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "live_fail_ok"}}
    with pytest.raises(ComfyClientError) as info:
        queue_workflow(comfy_server.url, prompt, out_dir=tmp_path / "out", timeout=60)
    msg = str(info.value)
    assert "node 2 (ClientTestFail)" in msg and "ValueError" in msg and "boom-1234" in msg
    assert "\n  at " in msg and "raise ValueError(message)" in msg  # last traceback line
    assert files_in(tmp_path / "out") == []


def test_progress_events(comfy_server, tmp_path):
    events = []
    out = queue_workflow(comfy_server.url, sleep_prompt("live_progress", 0.4, 4), out_dir=tmp_path, timeout=60,
                         on_progress=events.append)
    assert len(out) == 1
    progress = [(e["node"], e["class_type"], e["value"], e["max"]) for e in events if e["type"] == "progress"]
    assert progress == [("2", "ClientTestSleep", i, 4) for i in range(1, 5)]


def test_timeout_cancels_prompt(comfy_server, tmp_path):
    events = []
    start = time.monotonic()
    with pytest.raises(ComfyClientError, match=r"timed out after 3 s.*cancelled.*--timeout"):
        queue_workflow(comfy_server.url, sleep_prompt("live_timeout", 120, 1200), out_dir=tmp_path / "out",
                       timeout=3, on_progress=events.append)
    assert time.monotonic() - start < 10
    wait_idle(comfy_server)  # interrupted, not left running for two minutes
    prompt_id = next(e["prompt_id"] for e in events if e["type"] == "queued")
    status = comfy_server.get_json(f"/history/{prompt_id}")[prompt_id]["status"]
    assert status["status_str"] == "error"
    assert "execution_interrupted" in [m[0] for m in status["messages"]]
    assert files_in(tmp_path / "out") == []


def test_keyboard_interrupt_interrupts_server(comfy_server, tmp_path):
    events = []

    def on_progress(event):
        events.append(event)
        if event["type"] == "progress":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        queue_workflow(comfy_server.url, sleep_prompt("live_ctrlc", 120, 1200), out_dir=tmp_path / "out",
                       timeout=60, on_progress=on_progress)
    wait_idle(comfy_server)
    prompt_id = next(e["prompt_id"] for e in events if e["type"] == "queued")
    messages = comfy_server.get_json(f"/history/{prompt_id}")[prompt_id]["status"]["messages"]
    assert "execution_interrupted" in [m[0] for m in messages]
    assert files_in(tmp_path / "out") == []


def test_interrupted_elsewhere_is_an_error(comfy_server, tmp_path):
    """Someone else interrupts the prompt (UI button, POST /interrupt): a readable ComfyClientError."""
    sent = []

    def on_progress(event):
        if event["type"] == "progress" and not sent:
            sent.append(urllib.request.urlopen(urllib.request.Request(comfy_server.url + "/interrupt", data=b"",
                                                                      method="POST"), timeout=10).status)

    with pytest.raises(ComfyClientError, match=r"interrupted in node 2 \(ClientTestSleep\)"):
        queue_workflow(comfy_server.url, sleep_prompt("live_intr", 120, 1200), out_dir=tmp_path / "out",
                       timeout=60, on_progress=on_progress)
    assert sent == [200]
    wait_idle(comfy_server)
    assert files_in(tmp_path / "out") == []


def test_download_failure_leaves_no_partial_files(comfy_server, tmp_path, monkeypatch):
    real = client._request
    views = []

    def flaky(base, path, **kw):
        if path.startswith("/view?"):
            views.append(path)
            if len(views) == 2:
                return 500, b"disk on fire"
        return real(base, path, **kw)

    monkeypatch.setattr(client, "_request", flaky)
    out_dir = tmp_path / "out"
    with pytest.raises(ComfyClientError, match="HTTP 500"):
        queue_workflow(comfy_server.url, empty_scale_save("live_partial"), out_dir=out_dir, timeout=60)
    assert len(views) == 2
    assert files_in(out_dir) == []  # the first, complete download was not committed either


def test_existing_files_kept_unless_overwrite(comfy_server, tmp_path):
    keep = tmp_path / "live_keep_00001_.png"
    keep.write_bytes(b"mine")
    out = queue_workflow(comfy_server.url, load_scale_save("live_keep"), {"": _png(tmp_path)}, tmp_path, timeout=60)
    assert [p.name for p in out] == ["live_keep_00001__1.png"] and keep.read_bytes() == b"mine"
    over = tmp_path / "live_over_00001_.png"
    over.write_bytes(b"mine")
    out = queue_workflow(comfy_server.url, load_scale_save("live_over"), {"": _png(tmp_path)}, tmp_path, timeout=60,
                         overwrite=True)
    assert out == [over] and over.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _png(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    if not path.exists():
        random_png(path, seed=4, size=(8, 6))
    return path


def test_polling_fallback_without_websocket(comfy_server, tmp_path, monkeypatch):
    def no_ws(*args, **kwargs):
        raise OSError("websocket disabled by the test")

    monkeypatch.setattr(client, "_WebSocket", no_ws)
    events = []
    out = queue_workflow(comfy_server.url, empty_scale_save("live_poll"), out_dir=tmp_path, timeout=60,
                         on_progress=events.append)
    assert len(out) == 2
    assert any(e["type"] == "info" and "polling" in e["message"] for e in events)


def test_client_id_routes_messages(comfy_server, tmp_path):
    """A caller-chosen client_id is used for the websocket (execution messages are per client)."""
    events = []
    queue_workflow(comfy_server.url, empty_scale_save("live_cid"), out_dir=tmp_path, timeout=60,
                   client_id="nsarm-test-client", on_progress=events.append)
    assert any(e["type"] == "executing" for e in events)
    assert json.dumps(events)  # events are plain JSON-able dicts
