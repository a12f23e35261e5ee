"""``dblend demo``: the embedded end-to-end Diffusion Blend run on handwritten digits (docs/demo.md)."""

from .adapters import ensure_demo_adapters
from .config import DemoConfig

__all__ = ["DemoConfig", "ensure_demo_adapters"]
