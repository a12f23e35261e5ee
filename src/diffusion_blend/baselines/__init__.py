"""Layer 8 baselines (paper section 5): Rewarded Soup, CoDe, reward-gradient guidance, MORL oracle.

Each takes the same :class:`~diffusion_blend.preference.Preference` as the blend. The importance-weighted oracle of
the exact target lives in :mod:`diffusion_blend.evaluation.oracle`.
"""

from diffusion_blend.baselines.code import BaselineOutput, code_sample
from diffusion_blend.baselines.guidance import guided_sample, tempering_schedule
from diffusion_blend.baselines.morl import (
    MorlOracle,
    dpok_adapter_trainer,
    morl_denoiser,
)
from diffusion_blend.baselines.rewarded_soup import (
    add_soup_adapter,
    rewarded_soup_denoiser,
)

__all__ = [
    "BaselineOutput",
    "MorlOracle",
    "add_soup_adapter",
    "code_sample",
    "dpok_adapter_trainer",
    "guided_sample",
    "morl_denoiser",
    "rewarded_soup_denoiser",
    "tempering_schedule",
]
