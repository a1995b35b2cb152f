"""NSARM super-resolution: the model library behind the ComfyUI nodes (imports torch, never ComfyUI).

Programmatic API (see docs/ARCHITECTURE.md): load_transformer, load_vae, sample, NSARMPipeline,
load_pipeline, and the colour fix in `nsarm_nodes.colorfix`.

The names are imported on first use, so that `import nsarm_nodes` (and the command line's start,
its `--help` and its option errors) does not wait for torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "colorfix": ("colorfix", None),
    "DEFAULT_PROMPT": ("config", "DEFAULT_PROMPT"),
    "PRESETS": ("config", "PRESETS"),
    "CheckpointError": ("loading", "CheckpointError"),
    "MissingModelsError": ("pipeline", "MissingModelsError"),
    "NSARMPipeline": ("pipeline", "NSARMPipeline"),
    "load_pipeline": ("pipeline", "load_pipeline"),
    "SampleResult": ("sampler", "SampleResult"),
    "sample": ("sampler", "sample"),
    "load_transformer": ("transformer", "load_transformer"),
    "load_vae": ("vae", "load_vae"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attr = _EXPORTS[name]
    module = importlib.import_module(f".{module_name}", __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
