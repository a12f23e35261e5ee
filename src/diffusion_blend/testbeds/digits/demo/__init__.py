"""``dblend demo``: the embedded end-to-end Diffusion Blend run on handwritten digits (docs/demo.md)."""

from diffusion_blend.testbeds.digits.demo.adapters import ensure_demo_adapters
from diffusion_blend.testbeds.digits.demo.config import DemoConfig

__all__ = ["DemoConfig", "ensure_demo_adapters"]
