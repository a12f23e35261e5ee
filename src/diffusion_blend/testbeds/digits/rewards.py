"""Rewards for the digits testbed (8x8 grayscale images; the contract of rewards/base.py: images in [0, 1]).

All four rewards lie in ``[0, 1]`` so their magnitudes are comparable (docs/digits.md gives their spread on
base-model samples):

- ``ink``: boldness, the mean pixel intensity. Blank image 0, full image 1. Differentiable.
- ``symmetry``: left-right mirror agreement ``1 - mean |x - flip_lr(x)|``. Any mirror-symmetric image
  (blank and full included) scores 1; the image that is 1 on its left half and 0 on its right half scores 0.
  Differentiable.
- ``compressibility``: a run-length code length, not differentiable. Each image is quantised to ``levels``
  gray levels (``round(x * (levels - 1))``), scanned in raster order (channel, row, column), and the number of
  runs of equal values counted: ``1 - (runs - 1) / (pixels - 1)``. A constant image (one run) scores 1, an
  image whose every pixel differs from the previous one scores 0. For 8x8 images a PNG/JPEG file size is
  dominated by headers (the JPEG reward of rewards/image.py is built for large images), a run count is the
  size of the simplest lossless code and has an exact range.
- ``digit_prob``: the probability the trained digit classifier (digits/classifier.py, committed weights)
  gives to digit ``digit``. Differentiable (gradients flow through the frozen classifier). Also registered as
  ``digit_prob_0`` ... ``digit_prob_9`` (no options), the names adapter files and the demo use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

import torch

from diffusion_blend.errors import RewardError
from diffusion_blend.rewards.base import Reward
from diffusion_blend.rewards.registry import register_reward


class InkReward(Reward):
    name = "ink"
    differentiable = True
    value_range = (0.0, 1.0)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        return images.flatten(1).mean(1)


class SymmetryReward(Reward):
    name = "symmetry"
    differentiable = True
    value_range = (0.0, 1.0)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        return 1.0 - (images - images.flip(-1)).abs().flatten(1).mean(1)


def run_count(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Number of runs of equal quantised values in each image's raster scan (channel, row, column)."""
    quantised = torch.round(images.detach().clamp(0, 1) * (levels - 1)).flatten(1)
    return 1 + (quantised[:, 1:] != quantised[:, :-1]).sum(1)


class RunLengthCompressibility(Reward):
    name = "compressibility"
    differentiable = False
    value_range = (0.0, 1.0)

    def __init__(self, levels: int = 4):
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise RewardError(f"compressibility levels must be an integer >= 2, got {levels!r}")
        self.levels = levels

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        pixels = images[0].numel()
        if pixels < 2:
            raise RewardError("compressibility needs images with at least 2 pixels")
        runs = run_count(images, self.levels).to(images.dtype)
        return 1.0 - (runs - 1) / (pixels - 1)


@lru_cache(maxsize=4)
def _classifier(directory: str | None):
    from diffusion_blend.testbeds.digits.classifier import load_classifier

    return load_classifier(directory)


class DigitProbability(Reward):
    differentiable = True
    value_range = (0.0, 1.0)

    def __init__(self, digit: int, classifier_dir: str | os.PathLike | None = None):
        if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
            raise RewardError(f"digit_prob needs digit= an integer 0..9, got {digit!r}")
        self.digit = digit
        self.name = f"digit_prob_{digit}"
        self.classifier = _classifier(None if classifier_dir is None else str(classifier_dir))

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise RewardError(f"digit_prob expects (B, 1, 8, 8) images, got {tuple(images.shape)}")
        return self.classifier(images).softmax(1)[:, self.digit]


@register_reward("ink", "digits: boldness, mean pixel intensity in [0, 1]", returns=InkReward)
def ink() -> Reward:
    return InkReward()


@register_reward("symmetry", "digits: left-right mirror agreement 1 - mean|x - flip(x)| in [0, 1]",
                 returns=SymmetryReward)
def symmetry() -> Reward:
    return SymmetryReward()


@register_reward("compressibility", "digits: 1 - (runs - 1)/(pixels - 1) of the quantised raster scan",
                 returns=RunLengthCompressibility)
def compressibility(levels: int = 4) -> Reward:
    return RunLengthCompressibility(levels)


@register_reward("digit_prob", "digits: classifier probability of digit=d (trained CNN) in [0, 1]",
                 returns=DigitProbability, weights="the committed digits classifier (package data)")
def digit_prob(digit: int, classifier_dir: str | os.PathLike | None = None) -> Reward:
    return DigitProbability(digit, classifier_dir)


def _register_digit(digit: int) -> None:
    @register_reward(
        f"digit_prob_{digit}", f"digits: classifier probability of a {digit} (digit_prob with digit={digit})",
        returns=DigitProbability, weights="the committed digits classifier (package data)",
    )
    def factory(classifier_dir: str | os.PathLike | None = None) -> Reward:
        return DigitProbability(digit, classifier_dir)


for _digit in range(10):  # one self-describing name per digit: adapter metadata names the reward completely
    _register_digit(_digit)
