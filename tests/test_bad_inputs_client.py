"""The queue client against a misbehaving server: a small threaded fake ComfyUI on 127.0.0.1 sends
non-JSON bodies, answers without the fields the client needs, numeric prompt ids, odd history and
status payloads, hostile file names and answers that trickle in byte by byte. Every case ends in
one clear error (or a correct download) within --timeout, and nothing is written outside --out.
The parsing of every answer is fuzzed with hypothesis."""
from __future__ import annotations

import contextlib
import io
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nsarm_nodes import client
from nsarm_nodes.__main__ import main
from nsarm_nodes.client import ComfyClientError

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"fake image data"
WORKFLOW = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "t"}}}


class FakeComfy:
    """A scripted HTTP server. `routes` maps "METHOD /path" (no query) to a function
    (handler, query dict, body bytes) -> (status, body bytes | str | JSON value) or None when the
    function wrote the answer itself. Unrouted requests get 404 (so the websocket is refused)."""

    def __init__(self):
        self.routes: dict = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self, method):
                url = urllib.parse.urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append(f"{method} {url.path}")
                route = outer.routes.get(f"{method} {url.path}")
                if route is None and url.path.startswith("/history/"):
                    route = outer.routes.get(f"{method} /history/*")
                answer = route(self, dict(urllib.parse.parse_qsl(url.query)), body) if route else (404, "not found")
                if answer is not None:
                    status, payload = answer
                    if not isinstance(payload, (bytes, str)):
                        payload = json.dumps(payload)
                    data = payload.encode() if isinstance(payload, str) else payload
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # the client hanging up early (e.g. on its deadline) is expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def happy(self, *, prompt_id="abc", outputs=None, upload=None):
        """Routes of a server that runs the job and offers `outputs` (filename, subfolder, type dicts)."""
        outputs = outputs if outputs is not None else [{"filename": "t_00001_.png", "subfolder": "", "type": "output"}]
        self.routes.update({
            "POST /upload/image": lambda h, q, b: (200, upload if upload is not None else {"name": "x.png"}),
            "POST /prompt": lambda h, q, b: (200, {"prompt_id": prompt_id, "number": 1, "node_errors": {}}),
            "GET /history/*": lambda h, q, b: (200, {str(prompt_id): {
                "outputs": {"2": {"images": outputs}}, "status": {"status_str": "success", "messages": []}}}),
            "GET /view": lambda h, q, b: (200, PNG_BYTES),
            "GET /queue": lambda h, q, b: (200, {"queue_running": [], "queue_pending": []}),
        })
        return self


def trickle(payload: bytes, every: float = 0.5):
    """A route that sends headers, then one byte every `every` seconds."""
    def route(handler, query, body):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        for byte in payload:
            try:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
            except OSError:
                return None
            time.sleep(every)
        return None
    return route


@pytest.fixture
def server():
    with FakeComfy() as fake:
        yield fake


@pytest.fixture
def job(tmp_path) -> dict:
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(WORKFLOW))
    img = tmp_path / "in.png"
    img.write_bytes(PNG_BYTES)
    return {"wf": wf, "img": img, "out": tmp_path / "out"}


def queue(server, job, *extra) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["queue", str(job["wf"]), "--server", server.url, "--input", str(job["img"]),
                     "--out", str(job["out"]), *extra])
    return code, out.getvalue(), err.getvalue()


def error_line(result) -> str:
    """The one error message (its first line, and the indented detail lines that follow it)."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    assert err.count("error: ") == 1, err
    message = err[err.index("error: "):]
    assert all(ln.startswith("  ") for ln in message.splitlines()[1:]), message
    return message


def test_a_well_behaved_server_works(server, job):
    server.happy(prompt_id=12345)  # a numeric prompt id is accepted (as text)
    code, out, err = queue(server, job, "--timeout", "30")
    assert code == 0, err
    assert out.strip() == str(job["out"] / "t_00001_.png")
    assert (job["out"] / "t_00001_.png").read_bytes() == PNG_BYTES
    assert "GET /history/12345" in server.requests


@pytest.mark.parametrize("route, answer, needle", [
    ("POST /upload/image", (200, "<html>not json</html>"), "answered the image upload with something unexpected"),
    ("POST /upload/image", (200, {"subfolder": "x"}), "answered the image upload with something unexpected"),
    ("POST /upload/image", (200, {"name": 7}), "answered the image upload with something unexpected"),
    ("POST /prompt", (200, "ok"), "rejected the workflow (HTTP 200)"),
    ("POST /prompt", (200, {"prompt_id": None}), "rejected the workflow (HTTP 200)"),
    ("POST /prompt", (200, {"prompt_id": ["a"]}), "rejected the workflow"),
    ("POST /prompt", (400, {"error": "bad", "node_errors": ["not", "a", "dict"]}), "rejected the workflow (HTTP 400): bad"),
    ("POST /prompt", (400, {"error": {"message": "x"}, "node_errors": {"2": "broken"}}), "node 2: broken"),
    ("GET /history/*", (200, {"abc": ["a", "list"]}), "answered GET /history/abc with something unexpected"),
    ("GET /history/*", (200, ["abc"]), "answered GET /history/abc with something unexpected"),
    ("GET /history/*", (200, {"abc": {"outputs": {"2": {"images": [{"filename": 5}]}}, "status": {}}}),
     "answered GET /history (an output file) with something unexpected"),
    ("GET /history/*", (200, {"abc": {"outputs": [], "status": {"messages": [["execution_error", "oops"]]}}}),
     "failed in node None (None): error"),
    ("GET /history/*", (200, {"abc": {"outputs": {}, "status": {"messages": [["execution_error", {
        "node_id": "2", "node_type": "SaveImage", "exception_type": "OSError", "exception_message": "disk",
        "traceback": "not a list"}]]}}}), "failed in node 2 (SaveImage): OSError: disk"),
    ("GET /history/*", (200, {"abc": {"outputs": {}, "status": {"status_str": "error", "messages": "x"}}}),
     "ended with status 'error'"),
    ("GET /view", (500, "boom"), "downloading 't_00001_.png'"),
])
def test_misbehaving_answers_are_one_clear_error(server, job, route, answer, needle):
    server.happy()
    server.routes[route] = lambda h, q, b: answer
    line = error_line(queue(server, job, "--timeout", "20"))
    assert needle in line, line
    assert not job["out"].exists() or list(job["out"].iterdir()) == []


def test_odd_queue_answers_while_polling(server, job):
    """The history entry is missing for a while; /queue answers nonsense, then the entry appears."""
    server.happy()
    first: list[float] = []
    good = server.routes["GET /history/*"]

    def history(h, q, b):  # the entry appears after 2.5 s (the client checks /queue every 2 s)
        first.append(first[0] if first else time.monotonic())
        return good(h, q, b) if time.monotonic() - first[0] > 2.5 else (200, {})

    server.routes["GET /history/*"] = history
    server.routes["GET /queue"] = lambda h, q, b: (200, {"queue_running": [5, ["x"]], "queue_pending": "?"})
    code, out, err = queue(server, job, "--timeout", "60")
    assert code == 0, err
    assert (job["out"] / "t_00001_.png").exists() and "GET /queue" in server.requests


def test_a_trickling_server_cannot_stretch_the_timeout(server, job):
    server.happy()
    server.routes["POST /prompt"] = trickle(json.dumps({"prompt_id": "abc"}).encode() * 10)
    t0 = time.monotonic()
    line = error_line(queue(server, job, "--timeout", "2"))
    assert time.monotonic() - t0 < 6
    assert "timed out after 2 s" in line and "--timeout" in line


def test_a_slow_download_is_cut_off_and_leaves_nothing(server, job):
    server.happy()
    server.routes["GET /view"] = trickle(PNG_BYTES * 4, every=0.2)
    t0 = time.monotonic()
    line = error_line(queue(server, job, "--timeout", "3"))
    assert time.monotonic() - t0 < 8 and "timed out" in line
    assert not job["out"].exists() or list(job["out"].iterdir()) == []


HOSTILE_NAMES = ["../../escape.png", "/etc/passwd", "..", ".", ".bashrc", "a\\..\\..\\win.png", "sub/../../up.png",
                 "x" * 600 + ".png", "bell\x07\x1b[31m.png", "nul\u0000byte.png", "..\\..", "ok.png"]


def test_hostile_file_names_stay_inside_out(server, job, tmp_path):
    outputs = [{"filename": name, "subfolder": "../..", "type": "output"} for name in HOSTILE_NAMES]
    server.happy(outputs=outputs)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = queue(server, job, "--timeout", "30")
    assert code == 0, err
    written = [Path(line) for line in out.splitlines()]
    assert len(written) == len(HOSTILE_NAMES)
    for path in written:
        assert path.parent == job["out"] and path.read_bytes() == PNG_BYTES
        assert not path.name.startswith(".") and "/" not in path.name and "\\" not in path.name
        assert len(path.name) <= 160 and path.name.isprintable()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["out"])
    assert not Path("/etc/passwd.png").exists()


def test_server_down_and_bad_urls(job, tmp_path):
    with FakeComfy() as fake:
        url = fake.url
    line = error_line(queue(type("S", (), {"url": url}), job, "--timeout", "5"))
    assert "cannot reach ComfyUI" in line and "Is the server running?" in line
    with pytest.raises(ComfyClientError, match="not a ComfyUI server URL"):
        client.queue_workflow("http://[::1", WORKFLOW, {}, out_dir=tmp_path)


def _websocket_over(sock) -> client._WebSocket:
    ws = client._WebSocket.__new__(client._WebSocket)  # past the handshake: frames only
    ws.sock, ws.buf = sock, bytearray()
    return ws


def test_websocket_frames_are_bounded():
    import socket
    import struct

    a, b = socket.socketpair()
    try:
        ws = _websocket_over(a)
        b.sendall(bytes([0x81, 127]) + struct.pack(">Q", 2**62))  # a text frame claiming 4 EiB
        with pytest.raises(client._WSClosed, match="message"):
            ws.recv(2)
        ws = _websocket_over(a)
        b.sendall(bytes([0x01, 3]) + b"abc")  # first fragment of a message that never ends
        t0 = time.monotonic()
        with pytest.raises(client._WSClosed, match="never completed"):
            ws.recv(0.2, limit=1.0)
        assert time.monotonic() - t0 < 2  # the 10 s grace for fragments stops at the overall limit
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------------------------------
# Fuzzing the parsing of answers: a ComfyClientError or a value of the right kind, nothing else

ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["prompt_id", "name", "subfolder", "outputs", "status", "messages", "images", "filename",
                         "type", "abc", "queue_running", "queue_pending", "node_errors", "error", "data", "node"])
        | st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)
BASE = "http://127.0.0.1:9"


@settings(max_examples=200, deadline=None)
@given(body=ANY_JSON, raw=st.binary(max_size=40))
def test_answer_parsing_fuzz(body, raw):
    for payload in (json.dumps(body).encode(), raw):
        try:
            name = client.parse_upload_answer(BASE, 200, payload)
            assert isinstance(name, str) and name and "\0" not in name
        except ComfyClientError as exc:
            assert "ComfyUI at" in str(exc)
        event = client.parse_ws_event(payload)
        assert event is None or (isinstance(event[0], str) and isinstance(event[1], dict))
    pid = client.parse_queued_answer(body)
    assert pid is None or (isinstance(pid, str) and pid)
    ids = client.parse_queue_answer(body)
    assert ids is None or all(isinstance(i, str) for i in ids)
    try:
        entry = client.parse_history_answer(BASE, body, "abc")
    except ComfyClientError:
        entry = None
    for candidate in (entry, body):
        if isinstance(candidate, dict):
            try:
                files = client._output_files(BASE, candidate, ("output", "temp"))
                assert all(isinstance(f["filename"], str) and f["filename"] for f in files)
            except ComfyClientError:
                pass
            failure = client._history_error(candidate)
            if failure is not None:
                assert str(client._execution_failed(BASE, failure))
            client._format_node_errors(candidate.get("node_errors"), WORKFLOW)
            client._prompt_rejected(BASE, 400, candidate, WORKFLOW, 0.5)


@settings(max_examples=200, deadline=None)
@given(name=st.text(max_size=300))
def test_server_file_names_become_plain_names(name):
    safe = client._safe_name(name)
    assert safe and safe == Path(safe).name and "/" not in safe and "\\" not in safe
    assert not safe.startswith(".") and safe.isprintable() and len(safe) <= client.MAX_NAME_CHARS + 1


def _frame(event: int, field: int, rest: bytes) -> bytes:
    return event.to_bytes(4, "big") + field.to_bytes(4, "big") + rest


def test_preview_frames_are_reported_not_kept():
    jpeg = b"\xff\xd8\xff" + b"x" * 100
    assert client.parse_preview_frame(_frame(1, 1, jpeg)) == {"type": "preview", "format": "jpeg", "bytes": 103,
                                                              "node": None}
    meta = json.dumps({"image_type": "image/png", "node_id": "12", "prompt_id": "abc"}).encode()
    assert client.parse_preview_frame(_frame(4, len(meta), meta + b"png")) == {
        "type": "preview", "format": "png", "bytes": 3, "node": "12"}
    assert client.parse_preview_frame(_frame(4, 10**6, meta)) is None  # metadata longer than the frame
    assert client.parse_preview_frame(_frame(4, 2, b"[]img"))["format"] == "unknown"  # metadata not a dict
    hostile = json.dumps({"image_type": "image/../../x\n" + "a" * 500, "node_id": ["7"]}).encode()
    event = client.parse_preview_frame(_frame(4, len(hostile), hostile))
    assert event["node"] is None and len(event["format"]) <= client.MAX_FIELD_CHARS and event["format"].isprintable()
    assert client.parse_preview_frame(_frame(3, 0, b"text")) is None  # other binary events
    assert client.parse_preview_frame(b"\x00\x00\x00\x01") is None
    assert client.format_progress(client.parse_preview_frame(_frame(1, 1, jpeg))) is None  # no line printed


@settings(max_examples=300, deadline=None)
@given(event=st.sampled_from([1, 2, 3, 4, 0, 2**32 - 1]), field=st.integers(0, 2**32 - 1) | st.integers(0, 64),
       meta=ANY_JSON, raw=st.binary(max_size=40), image=st.binary(max_size=20), use_json=st.booleans())
def test_preview_frame_parsing_fuzz(event, field, meta, raw, image, use_json):
    body = json.dumps(meta).encode() if use_json else raw
    for payload in (_frame(event, field, body + image), _frame(event, len(body), body + image), raw):
        parsed = client.parse_preview_frame(payload)
        if parsed is None:
            continue
        assert set(parsed) == {"type", "format", "bytes", "node"} and parsed["type"] == "preview"
        assert isinstance(parsed["format"], str) and parsed["format"].isprintable()
        assert 0 < len(parsed["format"]) <= client.MAX_FIELD_CHARS
        assert isinstance(parsed["bytes"], int) and 0 <= parsed["bytes"] <= len(payload) - 8
        assert parsed["node"] is None or (isinstance(parsed["node"], str) and parsed["node"].isprintable()
                                          and len(parsed["node"]) <= client.MAX_FIELD_CHARS)
