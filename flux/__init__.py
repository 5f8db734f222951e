"""FLUX.1, checkpoint-exact, with tools to capture and decode what every block knows at every step."""

import importlib

from flux.configs import CONFIGS, ModelSpec, get_spec
from flux.store import load_capture

__all__ = ["CONFIGS", "ModelSpec", "get_spec", "load_capture"]

# Submodules a notebook reaches for as `flux.decode.…` after a bare `import flux`, imported on first use
# (flux.analysis needs the analysis extra, so nothing is imported up front).
_SUBMODULES = {"analysis", "decode", "interventions", "loading", "pipeline", "sampling", "sweep", "capture"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"flux.{name}")
    raise AttributeError(f"module 'flux' has no attribute {name!r}")
