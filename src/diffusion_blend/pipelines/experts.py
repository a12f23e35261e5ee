"""The LoRA experts of a diffusers pipeline: which basis reward each serves and its KL weight, resolved once.

Each adapter becomes an :class:`~diffusion_blend.adapters.Expert` with its effective KL weight ``alpha / v``
(:func:`~diffusion_blend.adapters.effective_alpha`). :func:`read_experts` reads each file's
metadata once (before any model loads), takes the reward and alpha a user gives for files without our metadata
(foreign LoRAs), and returns one :class:`Expert` per adapter; ``dblend sample``, the UI, ``evaluate --setting sd``
and SMC all use it (:class:`~diffusion_blend.pipelines.session.BlendSession`). :func:`check_fingerprints` then checks
our files against the loaded base.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from diffusion_blend.adapters import AdapterMetadata, Expert, effective_alpha
from diffusion_blend.errors import (
    AdapterMismatchError,
    DiffusionBlendError,
    positive_number,
)
from diffusion_blend.pipelines.loading import resolve_adapter_source
from diffusion_blend.pipelines.lora_files import (
    DIFFUSERS_LORA_NAME,
    read_diffusers_lora_metadata,
)


def expert_metadata(source: str | os.PathLike) -> AdapterMetadata | None:
    """Our metadata of an adapter source (diffusers LoRA file or folder); ``None`` for a foreign file or a peft
    folder. A missing path is refused in one line."""
    path = resolve_adapter_source(source)
    if not path.exists():
        raise AdapterMismatchError(f"adapter file or folder {path} does not exist")
    if path.is_dir() and not (path / DIFFUSERS_LORA_NAME).is_file():
        return None  # a peft folder (adapter_config.json): no metadata of ours
    return read_diffusers_lora_metadata(path)


def read_experts(
    adapters: Mapping[str, str | os.PathLike],
    rewards: Mapping[str, str] | None = None,
    alphas: Mapping[str, float] | None = None,
    default_alpha: float | None = None,
) -> dict[str, Expert]:
    """Each adapter as an :class:`Expert` (module docstring), from one read of its file.

    ``rewards[name]``: the basis reward of adapter ``name`` (needed for files without our metadata; for ours it must
    agree with the file). ``alphas[name]`` / ``default_alpha``: the KL weight of files without our metadata (ours
    carry it; a contradicting value is refused)."""
    rewards, alphas = dict(rewards or {}), dict(alphas or {})
    for what, given in (("reward", rewards), ("alpha", alphas)):
        unknown = sorted(set(given) - set(adapters))
        if unknown:
            raise DiffusionBlendError(f"--{what} names adapter(s) {', '.join(unknown)} that are not given "
                                      f"(adapters: {', '.join(adapters)})")
    if default_alpha is not None:
        default_alpha = positive_number(default_alpha, "--alpha")
    experts = {}
    for name, source in adapters.items():
        source = resolve_adapter_source(source)  # a hub id: fetched (or found in the cache) once, here
        metadata = expert_metadata(source)
        given = alphas.get(name)
        if given is not None:
            given = positive_number(given, f"--alpha of {name}")
        experts[name] = _resolve(name, str(source), metadata, rewards.get(name), given, default_alpha)
    fingerprints = {name: e.metadata.base_fingerprint for name, e in experts.items() if e.metadata is not None}
    if len(set(fingerprints.values())) > 1:  # before any model loads: experts of different bases cannot blend
        listed = ", ".join(f"{name}: {value[:12]}" for name, value in fingerprints.items())
        raise AdapterMismatchError(f"the adapters were fine-tuned on different base models (fingerprints {listed})")
    return experts


def _resolve(name: str, source: str, metadata: AdapterMetadata | None, reward: str | None, given_alpha: float | None,
             default_alpha: float | None) -> Expert:
    """One expert: a file without our metadata takes the given reward and alpha (its own, else the default); ours
    carries both (a per-expert alpha that contradicts it is refused; the default applies to foreign files only)."""
    if metadata is None:
        return Expert(name, source, reward, given_alpha if given_alpha is not None else default_alpha, None)
    if reward is None and len(metadata.rewards) == 1:
        reward = next(iter(metadata.rewards))
    alpha = None if reward is None else effective_alpha(name, reward, metadata)
    if alpha is not None and given_alpha is not None and not math.isclose(alpha, given_alpha, rel_tol=1e-9):
        raise DiffusionBlendError(f"--alpha {given_alpha:g} for {name!r} contradicts its metadata (effective alpha "
                                  f"{alpha:g}); drop it")
    return Expert(name, source, reward, alpha if alpha is not None else given_alpha, metadata)


def check_fingerprints(experts: Mapping[str, Expert], denoiser: Any) -> str | None:
    """Refuse experts of our format that were fine-tuned on another base than ``denoiser`` (one line). The base's
    fingerprint is computed in float32 only (experts are trained and fingerprinted in float32); returns it, or
    ``None`` when there is nothing to check or the denoiser is in another dtype."""
    import torch

    from diffusion_blend.adapters import base_fingerprint
    from diffusion_blend.pipelines.lora_files import unet_architecture

    ours = {name: expert for name, expert in experts.items() if expert.metadata is not None}
    if not ours or denoiser.dtype != torch.float32:
        return None
    fingerprint = base_fingerprint(denoiser, unet_architecture(denoiser))
    for name, expert in ours.items():
        if expert.metadata.base_fingerprint != fingerprint:  # type: ignore[union-attr]
            raise AdapterMismatchError(
                f"adapter {name!r} ({expert.source}) was fine-tuned on another base model (fingerprint "
                f"{expert.metadata.base_fingerprint[:12]}..., this base is {fingerprint[:12]}...)")  # type: ignore[union-attr]
    return fingerprint
