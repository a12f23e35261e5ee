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
        "optimizer_param_groups": json.dumps(optimizer_state["param_groups"]),
        "optimizer_scalars": json.dumps(scalars),
    }
    return atomic_save_safetensors(tensors, path, metadata)


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, adapter_name: str, optimizer: torch.optim.Optimizer
) -> CheckpointState:
    """Restore the adapter and optimizer in place; return the iteration, generator states and curves."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DiffusionBlendError(f"checkpoint {path} is corrupt or unreadable ({err})") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise DiffusionBlendError(f"{path} is not a fine-tuning checkpoint of this version")
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
    )
