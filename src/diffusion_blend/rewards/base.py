"""Layer 5: the reward contract (the registry is :mod:`.registry`).

A reward is a callable ``reward(images, prompts=None) -> Tensor[B]``:

- ``images``: float tensor ``(B, C, H, W)`` with values in ``[0, 1]`` (decoded pixels; digits are 1 channel);
- ``prompts``: a sequence of ``B`` strings for text-conditioned rewards, else ``None``;
- the result is one finite float per image; non-finite values raise :class:`RewardError` at the boundary.

Rewards carry ``name``, ``differentiable`` (gradients flow from the result to ``images``), ``needs_prompts``
and ``value_range`` (a documented ``(low, high)``; ``None`` for an open end).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from diffusion_blend.errors import RewardError, check_scores


class Reward(ABC):
    """Base class; subclasses implement :meth:`score`."""

    name: str = "reward"
    differentiable: bool = False
    needs_prompts: bool = False
    value_range: tuple[float | None, float | None] = (None, None)

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        """One value per image (validated by :meth:`__call__`)."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        check_images(images, self.name)
        if self.needs_prompts and (prompts is None or len(prompts) != images.shape[0]):
            raise RewardError(f"reward {self.name!r} needs one prompt per image ({images.shape[0]} images)")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            values = self.score(images, prompts)
        return check_values(values, self.name, images.shape[0])


class CallableReward(Reward):
    """Wrap any user callable ``fn(images, prompts) -> Tensor[B]`` as a reward."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor, Sequence[str] | None], torch.Tensor],
        name: str,
        *,
        differentiable: bool = False,
        needs_prompts: bool = False,
        value_range: tuple[float | None, float | None] = (None, None),
    ):
        self.fn, self.name = fn, name
        self.differentiable, self.needs_prompts, self.value_range = differentiable, needs_prompts, value_range

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        return torch.as_tensor(self.fn(images, prompts))


def check_images(images: torch.Tensor, name: str) -> None:
    if not torch.is_tensor(images) or images.ndim != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise RewardError(f"reward {name!r} expects images of shape (B, C, H, W), got {shape}")
    if not torch.isfinite(images).all():
        raise RewardError(f"reward {name!r} got images with NaN or infinite values")


def check_values(values: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    return check_scores(values, batch, f"reward {name!r}", RewardError)
