"""Rewards: ``(images in [0,1], prompts) -> Tensor[B]`` callables in a registry (:mod:`.base`, :mod:`.registry`)."""

from diffusion_blend.rewards.base import CallableReward, Reward
from diffusion_blend.rewards.registry import (
    RewardSpec,
    available_rewards,
    get_reward,
    register_reward,
)

__all__ = ["CallableReward", "Reward", "RewardSpec", "available_rewards", "get_reward", "register_reward"]
