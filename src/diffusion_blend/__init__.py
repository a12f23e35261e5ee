"""Diffusion Blend: inference-time multi-preference alignment for diffusion models (Cheng et al., ICLR 2026).

The blend rule lives in :mod:`diffusion_blend.preference`, denoisers in :mod:`diffusion_blend.denoisers`, LoRA
families in :mod:`diffusion_blend.lora`, sampling in :mod:`diffusion_blend.sampling`; see docs/design.md.
"""

from diffusion_blend.errors import (
    AdapterMismatchError,
    DiffusionBlendError,
    RewardError,
)
from diffusion_blend.preference import (
    BASE,
    BlendCoefficients,
    Preference,
    PreferenceError,
    blend_predictions,
)

__version__ = "0.1.0"
__all__ = [
    "BASE",
    "AdapterMismatchError",
    "BlendCoefficients",
    "DiffusionBlendError",
    "Preference",
    "PreferenceError",
    "RewardError",
    "blend_predictions",
]
