"""``r_w = sum_i w_i r_i``: a preference's weighted reward over named basis rewards (paper section 1).

Used wherever ``r_w`` is scored: the sweep, the baselines (CoDe, reward-gradient guidance), SMC's particles in the
CLI, the UI and the pipelines. A reward is any callable ``reward(images)`` or ``reward(images, prompts)`` (with
``prompts`` given) returning one finite value per row, e.g. a registered :class:`~diffusion_blend.rewards.base.Reward`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from diffusion_blend.errors import DiffusionBlendError, check_scores
from diffusion_blend.preference import Preference


def call_reward(
    reward: Callable[..., torch.Tensor], images: torch.Tensor, prompts: Sequence[str] | None
) -> torch.Tensor:
    """``reward(images, prompts)`` (or ``reward(images)`` without prompts), checked: one finite value per row."""
    values = reward(images) if prompts is None else reward(images, list(prompts))
    return check_scores(values, images.shape[0], "a reward")


def active_rewards(
    rewards: Mapping[str, Callable[..., torch.Tensor]], preference: Preference
) -> list[tuple[str, float]]:
    """``(name, w_i)`` for every reward with a non-zero weight; unknown names raise."""
    unknown = [name for name in preference.weights if name not in rewards]
    if unknown:
        raise DiffusionBlendError(f"no reward named {', '.join(map(repr, unknown))}; have {', '.join(rewards)}")
    return [(name, weight) for name, weight in preference.weights.items() if weight != 0.0]


def weighted_reward_scores(
    rewards: Mapping[str, Callable[..., torch.Tensor]],
    preference: Preference,
    images: torch.Tensor,
    prompts: Sequence[str] | None = None,
) -> torch.Tensor:
    """``r_w(images) = sum_i w_i r_i(images)`` (float64), evaluating only rewards with ``w_i != 0``."""
    total = torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
    for name, weight in active_rewards(rewards, preference):
        total = total + weight * call_reward(rewards[name], images, prompts).to(torch.float64)
    return total
