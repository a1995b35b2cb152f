"""Shared test fixtures: the golden reference vectors in ../shared/golden.

The golden folder is required (CI always has ../shared beside the checkout); a missing folder is
an error, never a skip. NSARM_SHARED overrides its location.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NSARM_SHARED", ROOT.parent / "shared"))
GOLDEN = SHARED / "golden"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@lru_cache(maxsize=None)
def golden(name: str) -> dict[str, torch.Tensor]:
    """Tensors of ../shared/golden/<name>.safetensors."""
    path = GOLDEN / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"golden fixture {path} missing: put the shared folder beside the repo or set NSARM_SHARED")
    return load_file(str(path))


@lru_cache(maxsize=None)
def golden_json(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def u8_to_unit(img_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [1, 3, H, W] in [-1, 1], computed as upstream (divide, double, subtract)."""
    return (img_u8.float() / 255 * 2 - 1).permute(2, 0, 1).unsqueeze(0).contiguous()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    assert GOLDEN.is_dir(), f"golden fixtures not found at {GOLDEN}"
    return GOLDEN


@pytest.fixture(scope="session")
def testsets_dir() -> Path:
    path = SHARED / "testsets"
    assert path.is_dir(), f"test images not found at {path}"
    return path
