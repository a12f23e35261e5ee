"""Layer 7: diffusers integration. Diffusion Blend pipelines for Stable Diffusion (1.x/2.x, XL, 3/3.5) and FLUX.

The names below are imported on first use (PEP 562), so that reading the kinds' specs (:mod:`.kinds`) needs no
torch or diffusers, and importing this package changes nothing in diffusers, transformers or peft: the known-harmless
notice of that first import is silenced only while it runs (:func:`~diffusion_blend.quiet.quiet_third_party`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlendPipelineMixin": "stable_diffusion",
    "BlendStableDiffusionPipeline": "stable_diffusion",
    "BlendStableDiffusionXLPipeline": "stable_diffusion",
    "BlendTransformerPipelineMixin": "flow",
    "BlendStableDiffusion3Pipeline": "flow",
    "BlendFluxPipeline": "flow",
    "BlendSession": "session",
    "DenoiserBlend": "blend",
    "blended_denoiser": "blend",
    "load_adapter": "loading",
    "load_adapters": "loading",
    "load_base_pipeline": "loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from diffusion_blend.quiet import quiet_third_party

    with quiet_third_party():
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
