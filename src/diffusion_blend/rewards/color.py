"""Weight-free, differentiable image rewards: ``brightness`` and ``saturation``.

They need no download, so Stable Diffusion fine-tuning (both estimators, including the pathwise one, which
back-propagates the reward through the VAE decode) can be tried and tested anywhere. On images in ``[0, 1]``:

- ``brightness`` = mean luma ``0.2126 R + 0.7152 G + 0.0722 B`` over pixels (ITU-R BT.709 weights applied to the
  pixel values as given; a 1-channel image is its own luma), range ``[0, 1]``;
- ``saturation`` = mean chroma ``max(R, G, B) - min(R, G, B)`` over pixels (the HSV/HSL chroma; 0 for grey,
  1 for a pure primary or secondary colour), range ``[0, 1]``; needs 3 channels. Chroma rather than HSV's
  ``chroma / value`` keeps the gradient bounded near black.

Both are smooth (saturation piecewise linear) functions of the pixels, so gradients flow to the images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffusion_blend.errors import RewardError
from diffusion_blend.rewards.base import Reward
from diffusion_blend.rewards.registry import register_reward

BT709_LUMA = (0.2126, 0.7152, 0.0722)


class BrightnessReward(Reward):
    name = "brightness"
    differentiable = True
    needs_prompts = False
    value_range = (0.0, 1.0)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        if images.shape[1] == 1:
            return images.mean(dim=(1, 2, 3))
        if images.shape[1] != 3:
            raise RewardError(f"reward 'brightness' needs 1 or 3 channels, got {images.shape[1]}")
        weights = torch.tensor(BT709_LUMA, dtype=images.dtype, device=images.device)
        return (images * weights[None, :, None, None]).sum(1).mean(dim=(1, 2))


class SaturationReward(Reward):
    name = "saturation"
    differentiable = True
    needs_prompts = False
    value_range = (0.0, 1.0)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        if images.shape[1] != 3:
            raise RewardError(f"reward 'saturation' needs RGB images (3 channels), got {images.shape[1]}")
        chroma = images.amax(dim=1) - images.amin(dim=1)
        return chroma.mean(dim=(1, 2))


@register_reward("brightness", "mean BT.709 luma of the image in [0, 1]", returns=BrightnessReward)
def brightness() -> Reward:
    return BrightnessReward()


@register_reward("saturation", "mean chroma max(RGB) - min(RGB) in [0, 1]", returns=SaturationReward)
def saturation() -> Reward:
    return SaturationReward()
