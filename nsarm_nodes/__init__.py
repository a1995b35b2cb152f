"""NSARM super-resolution: the model library behind the ComfyUI nodes (imports torch, never ComfyUI).

Programmatic API (see DESIGN.md): load_transformer, load_vae, sample, NSARMPipeline, load_pipeline,
and the colour fix in `nsarm_nodes.colorfix`.
"""
from . import colorfix
from .config import DEFAULT_PROMPT, PRESETS
from .loading import CheckpointError
from .pipeline import MissingModelsError, NSARMPipeline, load_pipeline
from .sampler import SampleResult, sample
from .transformer import load_transformer
from .vae import load_vae

__all__ = [
    "DEFAULT_PROMPT", "PRESETS", "CheckpointError", "MissingModelsError", "NSARMPipeline", "SampleResult",
    "colorfix", "load_pipeline", "load_transformer", "load_vae", "sample",
]
