"""Saving and loading fine-tuned LoRA adapters (safetensors + metadata), bound to their base model.

An adapter is one reward's fine-tuned expert (paper section 4; DB-MPA blends several of them, section 2.4).
It only makes sense on the base weights it was trained on, so the file records a *fingerprint* of the base:
a SHA-256 over the architecture config and every non-LoRA weight (names, dtypes, shapes, bytes). Loading
refuses an adapter whose fingerprint differs (:class:`~diffusion_blend.errors.AdapterMismatchError`). The
metadata also records the reward name(s) and weights, the KL weight ``alpha`` (the ``alpha`` DB-KLA rescales,
section 2.5), the LoRA layout (rank, scaling, target modules), the training config and the number of steps.

Keys are peft's adapter-name-free keys (``layers.0.lora_A.weight``), so an adapter can be loaded under any
name. Files are written atomically (temporary file, then ``os.replace``).

An adapter used in a blend is an :class:`Expert`: the basis reward it serves and its **effective** KL weight. An
expert fine-tuned on ``v r_i`` with KL weight ``alpha`` targets ``p_pre exp(v r_i / alpha) = p_pre exp(r_i / (alpha /
v))``, so its effective alpha for ``r_i`` is ``alpha / v`` (:func:`effective_alpha`): the one resolution every caller
uses (the digits UI, and for diffusers LoRA files :mod:`diffusion_blend.pipelines.experts`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion_blend import lora
from diffusion_blend.errors import AdapterMismatchError, DiffusionBlendError
from diffusion_blend.files import atomic_path

FORMAT = "diffusion-blend-lora/1"


def architecture_config(model: nn.Module, architecture: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The architecture part of the fingerprint: ``architecture`` if given, else ``model.config`` (if any)."""
    config = architecture if architecture is not None else getattr(model, "config", None)
    if config is None:
        return {"class": type(model).__name__}
    if is_dataclass(config) and not isinstance(config, type):
        config = {"class": type(model).__name__, **asdict(config)}
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor of ``model`` under the name it has without LoRA layers (``.base_layer`` removed)."""
    state = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer", "")] = value
    return state


class Fingerprint:
    """The running SHA-256 of :func:`base_fingerprint`: the architecture config, then ``add(key, tensor)`` for every
    non-LoRA tensor in sorted key order. A loader that streams the weights tensor by tensor
    (:func:`diffusion_blend.pipelines.loading.load_training_base`) computes the same digest without holding them."""

    def __init__(self, architecture: Mapping[str, Any]) -> None:
        self._digest = hashlib.sha256(json.dumps(dict(architecture), sort_keys=True).encode())

    def add(self, key: str, value: torch.Tensor) -> None:
        tensor = value.detach().to("cpu").contiguous()
        self._digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        self._digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no bytes copy

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def base_fingerprint(model: nn.Module, architecture: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of the base model: architecture config plus every non-LoRA weight (unchanged by adding LoRA)."""
    fingerprint = Fingerprint(architecture_config(model, architecture))
    for key, value in sorted(_base_state(model).items()):
        fingerprint.add(key, value)
    return fingerprint.hexdigest()


@dataclass
class AdapterMetadata:
    """What an adapter file says about itself (paper section 4's fine-tuning run that produced it)."""

    rewards: dict[str, float]  # basis reward name(s) -> weight in r_w = sum_i w_i r_i
    alpha: float  # KL weight of the objective E[r] - alpha KL
    base_fingerprint: str
    rank: int
    lora_alpha: float
    target_modules: Any
    steps: int = 0
    training_config: dict[str, Any] = field(default_factory=dict)
    architecture: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def to_header(self) -> dict[str, str]:
        return {key: json.dumps(value, sort_keys=True) for key, value in asdict(self).items()}

    @classmethod
    def from_header(cls, header: Mapping[str, str] | None, path: Path) -> AdapterMetadata:
        if not header or header.get("format") is None:
            raise DiffusionBlendError(f"{path} is not a diffusion-blend adapter (no adapter metadata in the file)")
        try:
            values = {key: json.loads(value) for key, value in header.items()}
            if values["format"] != FORMAT:
                raise DiffusionBlendError(
                    f"{path} has adapter format {values['format']!r}; this version reads {FORMAT!r}"
                )
            known = cls.__dataclass_fields__
            return cls(**{key: value for key, value in values.items() if key in known})
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DiffusionBlendError(f"{path} has corrupt adapter metadata ({err})") from None


def _lora_config(model: nn.Module, name: str) -> tuple[int, float, Any]:
    config = getattr(model, "peft_config", {}).get(name)
    if config is None:
        raise DiffusionBlendError(f"the model has no LoRA adapter named {name!r}")
    targets = config.target_modules
    if isinstance(targets, set):
        targets = sorted(targets)
    return int(config.r), float(config.lora_alpha), targets


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> Path:
    """``safetensors.torch.save_file``, atomically (:func:`~diffusion_blend.files.atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as temporary:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, temporary, metadata=metadata)
    return path


def save_adapter(
    model: nn.Module,
    name: str,
    path: str | os.PathLike,
    *,
    rewards: Mapping[str, float],
    alpha: float,
    steps: int = 0,
    training_config: Mapping[str, Any] | None = None,
    architecture: Mapping[str, Any] | None = None,
    fingerprint: str | None = None,
) -> Path:
    """Write adapter ``name`` of ``model`` to ``path`` (safetensors) with its :class:`AdapterMetadata`.

    ``fingerprint``: the base's :func:`base_fingerprint` taken before training cast its frozen weights to a lower
    precision (default: computed from ``model`` now)."""
    rank, lora_alpha, targets = _lora_config(model, name)
    metadata = AdapterMetadata(
        rewards={str(k): float(v) for k, v in rewards.items()},
        alpha=float(alpha),
        base_fingerprint=fingerprint if fingerprint is not None else base_fingerprint(model, architecture),
        rank=rank,
        lora_alpha=lora_alpha,
        target_modules=targets,
        steps=int(steps),
        training_config=json.loads(json.dumps(dict(training_config or {}), default=str)),
        architecture=architecture_config(model, architecture),
    )
    tensors = get_peft_model_state_dict(model, adapter_name=name)
    return atomic_save_safetensors(tensors, path, metadata.to_header())


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterMetadata]:
    """The adapter's tensors and metadata; clear errors for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise DiffusionBlendError(f"adapter file {path} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DiffusionBlendError(f"adapter file {path} is corrupt or not a safetensors file ({err})") from None
    return tensors, AdapterMetadata.from_header(header, path)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str,
    *,
    architecture: Mapping[str, Any] | None = None,
) -> AdapterMetadata:
    """Load the adapter file into ``model`` as adapter ``name`` (created with the file's LoRA layout if absent).

    Raises :class:`AdapterMismatchError` when the file was trained on other base weights or architecture, or
    when its rank or layer layout does not match an existing adapter ``name`` / the model's layers.
    """
    tensors, metadata = read_adapter(path)
    fingerprint = base_fingerprint(model, architecture)
    if metadata.base_fingerprint != fingerprint:
        raise AdapterMismatchError(
            f"adapter {path} was trained on a different base model (fingerprint {metadata.base_fingerprint[:12]}..., "
            f"this model is {fingerprint[:12]}...); load it into the base it was fine-tuned from"
        )
    if name in lora.adapter_names(model):
        rank, _, _ = _lora_config(model, name)
        if rank != metadata.rank:
            raise AdapterMismatchError(
                f"adapter {path} has rank {metadata.rank} but the model's {name!r} has rank {rank}"
            )
    else:
        try:
            lora.add_lora(
                model, name, rank=metadata.rank, alpha=metadata.lora_alpha, target_modules=metadata.target_modules
            )
        except ValueError as err:
            raise AdapterMismatchError(f"adapter {path} does not fit this model's layers ({err})") from None
    expected = get_peft_model_state_dict(model, adapter_name=name)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"adapter {path} does not match the model's LoRA layout: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise AdapterMismatchError(
                f"adapter {path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)} "
                f"(rank {metadata.rank} in the file)"
            )
        if not torch.isfinite(value).all():
            raise DiffusionBlendError(f"adapter {path}: {key} contains NaN or infinite values")
    set_peft_model_state_dict(model, tensors, adapter_name=name)
    return metadata


@dataclass(frozen=True)
class Expert:
    """One LoRA expert: ``reward`` is the basis reward it serves and ``alpha`` its effective KL weight for it
    (``None`` where neither its file nor the user says)."""

    name: str
    source: str
    reward: str | None
    alpha: float | None
    metadata: AdapterMetadata | None = None

    def describe(self) -> dict[str, Any]:
        """What settings.json and reports record of the expert."""
        out: dict[str, Any] = {"source": self.source, "reward": self.reward, "alpha": self.alpha}
        if self.metadata is not None:
            out["trained_on"] = dict(self.metadata.rewards)
            out["trained_alpha"] = float(self.metadata.alpha)
        return out


def effective_alpha(name: str, reward: str, metadata: AdapterMetadata) -> float | None:
    """``alpha / v`` for an expert fine-tuned on ``v x reward`` alone; ``None`` for a reward mix (not one reward's
    expert); one line when the file was trained on another reward than ``reward``."""
    trained = dict(metadata.rewards)
    if len(trained) != 1:
        return None
    if reward not in trained:
        raise DiffusionBlendError(f"adapter {name!r} was fine-tuned on {next(iter(trained))!r}, not on {reward!r}")
    weight = float(trained[reward])
    if not weight > 0:
        raise DiffusionBlendError(f"adapter {name!r} was fine-tuned on {weight:g} x {reward}: not an expert for it")
    return float(metadata.alpha) / weight


def require_rewards(experts: Mapping[str, Expert], why: str) -> dict[str, str]:
    """``{expert: basis reward}``; one line naming the experts whose reward is unknown."""
    missing = [name for name, expert in experts.items() if expert.reward is None]
    if missing:
        flags = " ".join(f"--reward {name}=REWARD" for name in missing)
        raise DiffusionBlendError(f"{why} needs each expert's basis reward; {', '.join(missing)} carry no reward "
                                  f"metadata (give {flags})")
    return {name: str(expert.reward) for name, expert in experts.items()}


def common_alpha(experts: Mapping[str, Expert], why: str) -> float:
    """The experts' one effective KL weight; one line when one is unknown or they differ."""
    missing = [name for name, expert in experts.items() if expert.alpha is None]
    if missing:
        raise DiffusionBlendError(f"{why} needs the experts' KL weight alpha; {', '.join(missing)} carry none in "
                                  "their metadata (give --alpha)")
    values = {name: float(expert.alpha) for name, expert in experts.items()}  # type: ignore[arg-type]
    first = next(iter(values.values()))
    if any(not math.isclose(value, first, rel_tol=1e-6) for value in values.values()):
        listed = ", ".join(f"{name}: {value:g}" for name, value in values.items())
        raise DiffusionBlendError(f"the experts have different effective KL weights alpha ({listed}); {why} assumes "
                                  "one alpha for all experts")
    return first


def basis_reward(name: str, metadata: AdapterMetadata) -> str:
    """The single basis reward an adapter was fine-tuned on (blending needs one expert per basis reward)."""
    if len(metadata.rewards) != 1:
        raise DiffusionBlendError(f"adapter {name!r} was trained on a reward mix {dict(metadata.rewards)}; a blend "
                                  "needs one expert per basis reward")
    return next(iter(metadata.rewards))
