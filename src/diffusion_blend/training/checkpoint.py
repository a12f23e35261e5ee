"""Atomic, resumable fine-tuning checkpoints in ONE safetensors file.

A checkpoint holds everything that determines the rest of a run: the LoRA adapter's tensors, the optimizer's
state (moments and step counts), every process's random-generator state, the iteration counter and the
curves logged so far. Restoring it and continuing gives bit-for-bit the run that was never interrupted
(``tests/test_dpok.py`` checks this). The file is written to a temporary name and moved into place with
``os.replace``, so a run killed while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from diffusion_blend.adapters import atomic_save_safetensors
from diffusion_blend.errors import DiffusionBlendError

CHECKPOINT_FORMAT = "diffusion-blend-dpok-checkpoint/1"


@dataclass
class CheckpointState:
    iteration: int
    generator_states: torch.Tensor  # (num_processes, state_bytes) uint8
    curves: list[dict[str, float]]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the float16 gradient scaler's state
    recipe: dict[str, Any] = field(default_factory=dict)  # what was fine-tuned: the target's name, base fingerprint


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    adapter_name: str,
    optimizer: torch.optim.Optimizer,
    state: CheckpointState,
) -> Path:
    """Write the checkpoint atomically (temporary file, then ``os.replace``)."""
    tensors: dict[str, torch.Tensor] = {
        f"adapter.{key}": value for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
    }
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["generators"] = state.generator_states.to(torch.uint8)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "iteration": str(int(state.iteration)),
        "curves": json.dumps(state.curves),
        "config": json.dumps(state.config, default=str),
        "extra": json.dumps(state.extra, default=str),
        "recipe": json.dumps(state.recipe, default=str),
        "optimizer_param_groups": json.dumps(optimizer_state["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
    }
    return atomic_save_safetensors(tensors, path, metadata)


def check_recipe(path: Path, written: dict[str, Any], expected: dict[str, Any] | None) -> None:
    """Refuse (one line) a checkpoint written while fine-tuning another target or base than ``expected``; a
    checkpoint of an earlier version carries no recipe (its config and layout are still checked)."""
    if not expected or not written:
        return
    if written.get("target") != expected.get("target"):
        raise DiffusionBlendError(f"checkpoint {path} was written while fine-tuning {written.get('target')!r}, not "
                                  f"{expected.get('target')!r}; use a fresh output folder (or --no-resume)")
    theirs, ours = written.get("base_fingerprint"), expected.get("base_fingerprint")
    if theirs and ours and theirs != ours:
        raise DiffusionBlendError(f"checkpoint {path} was written on another base model (fingerprint {theirs[:12]}..., "
                                  f"this base is {ours[:12]}...); use a fresh output folder (or --no-resume)")


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, adapter_name: str, optimizer: torch.optim.Optimizer,
    *, recipe: dict[str, Any] | None = None,
) -> CheckpointState:
    """Restore the adapter and optimizer in place; return the iteration, generator states and curves. With
    ``recipe`` a checkpoint of another target or base is refused before anything is restored
    (:func:`check_recipe`)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DiffusionBlendError(f"checkpoint {path} is corrupt or unreadable ({err}); a fresh output folder (or "
                                  "--no-resume) starts over") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise DiffusionBlendError(f"{path} is not a fine-tuning checkpoint of this version")
    try:
        written = json.loads(metadata.get("recipe", "{}"))
    except json.JSONDecodeError:
        raise DiffusionBlendError(f"checkpoint {path} has corrupt metadata (recipe)") from None
    check_recipe(path, written, recipe)
    adapter = {key[len("adapter."):]: value for key, value in tensors.items() if key.startswith("adapter.")}
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if set(adapter) != set(expected) or any(adapter[k].shape != expected[k].shape for k in expected):
        raise DiffusionBlendError(f"checkpoint {path} does not match the adapter layout of this run")
    set_peft_model_state_dict(model, adapter, adapter_name=adapter_name)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in json.loads(metadata["optimizer_scalars"]).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["optimizer_param_groups"])})
    return CheckpointState(
        iteration=int(metadata["iteration"]),
        generator_states=tensors["generators"],
        curves=json.loads(metadata["curves"]),
        config=json.loads(metadata["config"]),
        extra=json.loads(metadata.get("extra", "{}")),
        recipe=written,
    )
