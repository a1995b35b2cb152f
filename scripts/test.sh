#!/usr/bin/env bash
# Set up a virtual environment (first run only) and run the whole test suite.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NSARM_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# torch first, from the exact CPU build, so that no dependency pulls a CUDA torch.
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"
exec "$VENV/bin/python" -m pytest -q "$@"
