"""The digits model as a fine-tuning target (paper section 4): what ``training.dpok.finetune`` needs.

Used by ``dblend finetune --kind digits`` and by the end-to-end demo (``diffusion_blend.testbeds.digits.demo``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from diffusion_blend.rewards import get_reward
from diffusion_blend.testbeds.digits.data import IMAGE_SHAPE, to_image_space
from diffusion_blend.testbeds.digits.model import (
    DigitsDenoiser,
    digits_forward,
    digits_scheduler,
    lora_target_modules,
)
from diffusion_blend.testbeds.digits.train import load_default_digits_model
from diffusion_blend.training.config import FinetuneTarget


def digits_finetune_target(
    reward_names: Sequence[str],
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    model: DigitsDenoiser | None = None,
    model_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> FinetuneTarget:
    """A :class:`FinetuneTarget` over the digits denoiser with rewards from the registry.

    ``model`` (else the committed base from ``model_dir`` / the package assets) carries the adapter; samples
    are decoded to image space ``[0, 1]`` before the rewards read them. ``reward_options`` maps a reward
    name to its factory options, e.g. ``{"digit_prob": {"digit": 3}}``.
    """
    options = dict(reward_options or {})
    rewards = {name: get_reward(name, **dict(options.get(name, {}))) for name in reward_names}
    if model is None:
        model = load_default_digits_model(model_dir, progress=progress)
    return FinetuneTarget(
        name="digits", model=model, forward=digits_forward, scheduler=digits_scheduler("ddim"),
        sample_shape=tuple(IMAGE_SHAPE), rewards=rewards, target_modules=list(lora_target_modules()),
        decode=to_image_space,
    )
