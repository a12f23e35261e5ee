"""The default studio: the embedded digits model with one fine-tuned adapter per basis reward."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from diffusion_blend.adapters import (
    Expert,
    basis_reward,
    common_alpha,
    effective_alpha,
    load_adapter,
)
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.rewards import get_reward
from diffusion_blend.smc import SMCOptions
from diffusion_blend.testbeds.digits.data import IMAGE_SHAPE, to_image_space
from diffusion_blend.testbeds.digits.model import digits_forward, digits_scheduler
from diffusion_blend.testbeds.digits.train import load_default_digits_model
from diffusion_blend.ui.studio import LoraStudio


def digits_studio(
    adapters: Mapping[str, str | os.PathLike], *, num_images: int = 16, num_inference_steps: int = 50,
    smc: SMCOptions | None = None,
) -> LoraStudio:
    """Load the committed digits base, put every adapter on it, and score with each adapter's basis reward."""
    if not adapters:
        raise DiffusionBlendError("no adapters: run `make demo` first, or pass --adapter NAME=PATH")
    model = load_default_digits_model(progress=False)
    experts = {}
    for name, path in adapters.items():
        metadata = load_adapter(model, path, name)
        reward = basis_reward(name, metadata)
        experts[name] = Expert(name, str(path), reward, effective_alpha(name, reward, metadata), metadata)
    try:
        alpha = common_alpha(experts, "SMC")
    except DiffusionBlendError:
        alpha = None  # SMC needs one common alpha: the studio then offers none
    return LoraStudio(
        model, digits_forward, digits_scheduler("ddim"), IMAGE_SHAPE,
        {name: get_reward(expert.reward) for name, expert in experts.items()}, decode=to_image_space,
        num_images=num_images, num_inference_steps=num_inference_steps, alpha=alpha, smc=smc,
        description=f"Embedded 8x8 handwritten-digits model; experts: {', '.join(adapters)}. "
        f"{num_images} samples, DDIM eta=1, {num_inference_steps} steps; same seed = same initial noise.",
    )


def adapters_in(directory: str | os.PathLike) -> dict[str, Path]:
    """``NAME.safetensors`` files of a folder, by name."""
    return {path.stem: path for path in sorted(Path(directory).glob("*.safetensors"))}
