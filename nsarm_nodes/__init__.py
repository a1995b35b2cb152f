"""NSARM super-resolution: the model library behind the ComfyUI nodes (imports torch, never ComfyUI)."""
from .config import DEFAULT_PROMPT, PRESETS
from .loading import CheckpointError

__all__ = ["DEFAULT_PROMPT", "PRESETS", "CheckpointError"]
