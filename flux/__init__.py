"""FLUX.1, checkpoint-exact, with tools to capture and decode what every block knows at every step."""

from flux.configs import CONFIGS, ModelSpec, get_spec
from flux.store import load_capture

__all__ = ["CONFIGS", "ModelSpec", "get_spec", "load_capture"]
