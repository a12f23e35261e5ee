"""Diffusers LoRA files of our experts: writing them (:func:`export_diffusers_lora`) and reading our metadata back.

:func:`export_diffusers_lora` writes an adapter in diffusers' LoRA format (``unet.``- or ``transformer.``-prefixed
peft keys plus diffusers' ``lora_adapter_metadata``, written by the pipeline class's own ``save_lora_weights``),
loadable by the stock ``load_lora_weights`` and by the blend pipelines. Our
:class:`~diffusion_blend.adapters.AdapterMetadata` (rewards, ``alpha``, base fingerprint, training config) rides
along in the safetensors header under ``diffusion_blend.*`` keys; diffusers ignores them and keeps its own
``format: pt``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open

from diffusion_blend.adapters import (
    AdapterMetadata,
    atomic_save_safetensors,
    read_adapter,
)
from diffusion_blend.errors import DiffusionBlendError

DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default weight name: a run folder loads as is


METADATA_PREFIX = "diffusion_blend."


def unet_architecture(unet: torch.nn.Module) -> dict[str, Any]:
    """The UNet's architecture config for the adapter fingerprint, without load-time entries (``_name_or_path``)."""
    config = {key: value for key, value in dict(unet.config).items() if not key.startswith("_")}
    return json.loads(json.dumps({"class": type(unet).__name__, **config}, sort_keys=True, default=str))


def lora_pipeline_class(unet: torch.nn.Module) -> type:
    """The diffusers pipeline class whose LoRA format fits ``unet``: SDXL for a ``text_time`` UNet, else SD."""
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return StableDiffusionXLPipeline
    return StableDiffusionPipeline


def export_diffusers_lora(
    unet: torch.nn.Module, adapter_name: str, path: str | os.PathLike, metadata: AdapterMetadata | None = None,
    pipeline_class: type | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of a UNet (or of an SD3/FLUX transformer, with that ``pipeline_class``) as a
    diffusers LoRA file (``save_lora_weights``' layout and header); ``pipeline_class`` defaults to
    :func:`lora_pipeline_class` (SD or SDXL).

    diffusers writes the file (``unet.``- or ``transformer.``-prefixed keys, its ``lora_adapter_metadata`` with
    rank and ``lora_alpha``, ``format: pt``); we add ``metadata`` under ``diffusion_blend.*`` header keys and move
    the result into place atomically.
    """
    path = Path(path)
    config = getattr(unet, "peft_config", {}).get(adapter_name)
    if config is None:
        raise DiffusionBlendError(f"the UNet has no LoRA adapter named {adapter_name!r}")
    layers = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    adapter_config = config.to_dict()
    if isinstance(adapter_config.get("target_modules"), list | set | frozenset):  # a set: its order changes per process
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    path.parent.mkdir(parents=True, exist_ok=True)
    # named like files.atomic_path's temporaries, so the next run removes what a killed one left
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.partial-export-") as scratch:
        if pipeline_class is None:
            pipeline_class = lora_pipeline_class(unet)
        component = "transformer" if hasattr(pipeline_class, "transformer_name") else "unet"
        pipeline_class.save_lora_weights(
            scratch, **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": adapter_config},
            weight_name=path.name, safe_serialization=True,
        )
        written = Path(scratch) / path.name
        with safe_open(str(written), framework="pt") as handle:
            header = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if metadata is not None:
        header.update({METADATA_PREFIX + key: value for key, value in metadata.to_header().items()})
    return atomic_save_safetensors(tensors, path, header)


def lora_file(source: str | os.PathLike) -> Path:
    """The weights file of a diffusers LoRA source: a file, or a folder holding
    ``pytorch_lora_weights.safetensors``."""
    path = Path(source)
    return path / DIFFUSERS_LORA_NAME if path.is_dir() else path


def read_diffusers_lora_metadata(source: str | os.PathLike) -> AdapterMetadata | None:
    """Our metadata from a diffusers LoRA file's header, or ``None`` for a LoRA without it (a foreign file)."""
    path = lora_file(source)
    if not path.is_file():
        raise DiffusionBlendError(f"adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DiffusionBlendError(f"adapter file {path} is corrupt or not a safetensors file ({err})") from None
    ours = {key[len(METADATA_PREFIX):]: value for key, value in header.items() if key.startswith(METADATA_PREFIX)}
    if not ours:
        return None
    return AdapterMetadata.from_header(ours, path)


def export_run_adapter(unet: torch.nn.Module, adapter_name: str, run_dir: str | os.PathLike,
                       trainer_adapter: str | os.PathLike, pipeline_class: type | None = None) -> Path:
    """After ``finetune``: ``RUN/pytorch_lora_weights.safetensors`` with the metadata of the trainer's adapter file."""
    _, metadata = read_adapter(trainer_adapter)
    return export_diffusers_lora(unet, adapter_name, Path(run_dir) / DIFFUSERS_LORA_NAME, metadata, pipeline_class)
