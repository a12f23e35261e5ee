"""Which basis reward each LoRA expert serves, and its KL weight ``alpha``, from our metadata in the file.

Used wherever a blend is scored or corrected at inference time (the UI's studio, ``dblend sample --method smc``):
SMC's target ``p_pre exp(lambda r_w / alpha)`` needs ``r_w = sum_i w_i r_i`` (so each expert's reward) and ``alpha``.
An expert fine-tuned on ``v x r_i`` with KL weight ``alpha`` targets ``p_pre exp(r_i / (alpha / v))``: its effective
``alpha`` is ``alpha / v`` (as ``dblend evaluate --setting sd`` reads it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..adapters import base_fingerprint
from ..errors import AdapterMismatchError, DiffusionBlendError, positive_number
from .finetune import read_diffusers_lora_metadata, unet_architecture


def basis_reward_name(metadata_rewards: Mapping[str, float], path: str | os.PathLike) -> str:
    """The single basis reward an adapter was fine-tuned on (blending needs one expert per basis reward)."""
    if len(metadata_rewards) != 1:
        raise DiffusionBlendError(f"adapter {path} was trained on a reward mix {dict(metadata_rewards)}; a blend "
                                  "needs one expert per basis reward")
    return next(iter(metadata_rewards))


def expert_alpha(name: str, metadata: Any) -> float:
    """The effective KL weight of an expert for its basis reward ``name``: ``alpha / v`` (module docstring)."""
    rewards = dict(metadata.rewards)
    if set(rewards) != {name}:
        trained = " + ".join(f"{w:g} {r}" for r, w in rewards.items())
        raise DiffusionBlendError(f"adapter {name!r} was fine-tuned on r = {trained}; the expert of reward {name!r} "
                                  f"must be fine-tuned on {name!r} alone (name each --adapter after its reward)")
    weight = float(rewards[name])
    if not weight > 0:
        raise DiffusionBlendError(f"adapter {name!r} was fine-tuned on {weight:g} x {name}: not an expert for it")
    return float(metadata.alpha) / weight


def expert_rewards_and_alpha(
    pipe: Any, adapters: Mapping[str, str | os.PathLike], reward_names: Mapping[str, str] | None = None,
    default_alpha: float | None = None,
) -> tuple[dict[str, str], float | None]:
    """Each adapter's basis reward name and the experts' common effective ``alpha``, from one read of each file.

    The reward is ``reward_names[name]`` if given, else the file's metadata; a foreign LoRA without metadata needs
    an explicit reward name. Files with our metadata must have been trained on this UNet (fingerprint check, one-line
    :class:`AdapterMismatchError` otherwise). The alpha is each file's effective ``alpha / v``, ``default_alpha``
    for files without metadata; None when one is unknown, an expert was fine-tuned on a reward mix, or they differ
    (then SMC has no target).
    """
    reward_names = dict(reward_names or {})
    unknown = sorted(set(reward_names) - set(adapters))
    if unknown:
        raise DiffusionBlendError(f"--reward names adapter(s) {', '.join(unknown)} that are not loaded "
                                  f"(adapters: {', '.join(adapters)})")
    if default_alpha is not None:
        default_alpha = positive_number(default_alpha, "--alpha")
    fingerprint = None
    chosen: dict[str, str] = {}
    alphas: list[float | None] = []
    for name, path in adapters.items():
        metadata = read_diffusers_lora_metadata(path)
        if metadata is not None and pipe.blend_model.dtype == torch.float32:  # trained (and fingerprinted) in float32
            if fingerprint is None:
                fingerprint = base_fingerprint(pipe.blend_model, unet_architecture(pipe.blend_model))
            if metadata.base_fingerprint != fingerprint:
                raise AdapterMismatchError(
                    f"adapter {name!r} ({path}) was fine-tuned on another base model (fingerprint "
                    f"{metadata.base_fingerprint[:12]}..., this base is {fingerprint[:12]}...)")
        if name in reward_names:
            chosen[name] = reward_names[name]
        elif metadata is not None:
            chosen[name] = basis_reward_name(metadata.rewards, path)
        else:
            raise DiffusionBlendError(f"adapter {name!r} ({path}) carries no reward metadata; "
                                      f"say which reward it serves with --reward {name}=REWARD")
        if metadata is None:
            alphas.append(default_alpha)
            continue
        try:
            alphas.append(expert_alpha(chosen[name], metadata))
        except DiffusionBlendError:  # fine-tuned on a mix of rewards: not one reward's expert
            alphas.append(None)
    common = alphas[0] if alphas else None
    if common is None or any(a is None or not math.isclose(a, common, rel_tol=1e-6) for a in alphas):
        return chosen, None
    return chosen, common
