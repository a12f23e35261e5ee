"""The default studio: the embedded digits model with one fine-tuned adapter per basis reward."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..adapters import load_adapter
from ..digits.data import IMAGE_SHAPE, to_image_space
from ..digits.model import digits_forward, digits_scheduler
from ..digits.train import load_default_digits_model
from ..errors import DiffusionBlendError
from ..pipelines.experts import basis_reward_name
from ..rewards import get_reward
from .studio import LoraStudio


def digits_studio(
    adapters: Mapping[str, str | os.PathLike], *, num_images: int = 16, num_inference_steps: int = 50
) -> LoraStudio:
    """Load the committed digits base, put every adapter on it, and score with each adapter's basis reward."""
    if not adapters:
        raise DiffusionBlendError("no adapters: run `make demo` first, or pass --adapter NAME=PATH")
    model = load_default_digits_model(progress=False)
    rewards, alphas = {}, set()
    for name, path in adapters.items():
        metadata = load_adapter(model, path, name)
        rewards[name] = get_reward(basis_reward_name(metadata.rewards, path))
        alphas.add((metadata.training_config or {}).get("alpha"))
    return LoraStudio(
        model, digits_forward, digits_scheduler("ddim"), IMAGE_SHAPE, rewards, decode=to_image_space,
        num_images=num_images, num_inference_steps=num_inference_steps,
        alpha=alphas.pop() if len(alphas) == 1 and None not in alphas else None,  # SMC needs one common alpha
        description=f"Embedded 8x8 handwritten-digits model; experts: {', '.join(adapters)}. "
        f"{num_images} samples, DDIM eta=1, {num_inference_steps} steps; same seed = same initial noise.",
    )


def adapters_in(directory: str | os.PathLike) -> dict[str, Path]:
    """``NAME.safetensors`` files of a folder, by name."""
    return {path.stem: path for path in sorted(Path(directory).glob("*.safetensors"))}
