"""The reward registry: names -> factories, filled by this package's modules and by plugins.

A module registers its factories with :func:`register_reward` when imported. :func:`load_rewards` imports every
module of :mod:`diffusion_blend.rewards` (they import heavy optional dependencies lazily, inside their factories,
so this stays cheap) and every module named in the ``diffusion_blend.rewards`` entry-point group: how a testbed
(the digits' ``ink``, ``digit_prob_3``, ...) or another package adds rewards without this layer importing it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from diffusion_blend.errors import RewardError
from diffusion_blend.rewards.base import Reward

ENTRY_POINT_GROUP = "diffusion_blend.rewards"


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: its factory, a one-line description, the :class:`Reward` class the factory builds (whose
    ``differentiable`` and ``needs_prompts`` describe it) and the weights it loads (``None``: weight-free)."""

    factory: Callable[..., Reward]
    description: str
    returns: type[Reward] | None = None
    weights: str | None = None

    def info(self, name: str) -> dict[str, Any]:
        """What ``dblend rewards`` shows: description, differentiable, needs prompts, weights, the factory's options
        (``--reward-options``) with their defaults."""
        import inspect

        options = {}
        for parameter in inspect.signature(self.factory).parameters.values():
            default = parameter.default
            options[parameter.name] = "required" if default is inspect.Parameter.empty else (
                default if isinstance(default, int | float | str | bool | type(None)) else str(default))
        return {"name": name, "description": self.description,
                "differentiable": getattr(self.returns, "differentiable", None),
                "needs_prompts": getattr(self.returns, "needs_prompts", None),
                "weights": self.weights, "options": options}


_REGISTRY: dict[str, RewardSpec] = {}
_LOADED = False


def register_reward(name: str, description: str, *, returns: type[Reward] | None = None, weights: str | None = None
                    ) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator registering a reward factory under ``name``: ``returns`` is the :class:`Reward` class it builds,
    ``weights`` what it loads (hub ids or files; ``None``: weight-free)."""

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered")
        _REGISTRY[name] = RewardSpec(factory, description, returns, weights)
        return factory

    return decorate


def load_rewards() -> None:
    """Import this package's reward modules and the ``diffusion_blend.rewards`` entry points (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    package = importlib.import_module("diffusion_blend.rewards")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in ("base", "registry", "weighted", "preprocess"):
            importlib.import_module(f"diffusion_blend.rewards.{info.name}")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def get_reward(name: str, **options: Any) -> Reward:
    """Build the registered reward ``name`` (options go to its factory)."""
    load_rewards()
    if name not in _REGISTRY:
        raise RewardError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name].factory(**options)


def available_rewards() -> Mapping[str, str]:
    """Registered reward names and their one-line descriptions."""
    load_rewards()
    return {name: spec.description for name, spec in sorted(_REGISTRY.items())}


def reward_infos() -> list[dict[str, Any]]:
    """Every registered reward's :meth:`RewardSpec.info`, by name."""
    load_rewards()
    return [spec.info(name) for name, spec in sorted(_REGISTRY.items())]
