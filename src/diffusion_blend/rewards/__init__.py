"""Rewards: ``(images in [0,1], prompts) -> Tensor[B]`` callables in a registry (see ``base``)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import CallableReward, Reward, RewardSpec, available_rewards, get_reward, register_reward

__all__ = ["CallableReward", "Reward", "RewardSpec", "available_rewards", "get_reward", "register_reward"]

_LOADED = False


def load_builtin_rewards() -> None:
    """Import every module of this package so its ``@register_reward`` factories are registered.

    Modules must import heavy optional dependencies lazily (inside factories), so this stays cheap.
    """
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
