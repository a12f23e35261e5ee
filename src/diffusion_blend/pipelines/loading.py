"""Load a base pipeline and named LoRA adapters into its denoiser (the UNet of SD/SDXL, the transformer of SD3 and
FLUX), with one-line errors for adapters that do not fit.

Accepted adapter sources:

- a diffusers LoRA file (``*.safetensors``, as written by ``save_lora_weights`` or the diffusers training
  scripts; kohya/A1111 layouts that diffusers converts also work), or a folder holding
  ``pytorch_lora_weights.safetensors``: loaded with ``pipe.load_lora_weights(path, adapter_name=name)``;
- a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, keys as written by
  ``get_peft_model_state_dict`` or ``PeftModel.save_pretrained``): injected into the UNet with peft.

Only denoiser adapters can be blended in output space: a LoRA that also changes a text encoder would make the
prompt embedding depend on the adapter, so such files are refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

from diffusion_blend.adapters import Fingerprint, architecture_config
from diffusion_blend.errors import AdapterMismatchError, DiffusionBlendError
from diffusion_blend.lora import PEFT_BASE, adapter_names
from diffusion_blend.pipelines.lora_files import unet_architecture
from diffusion_blend.quiet import no_loading_bars, quiet_third_party

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_PEFT_PREFIXES = ("base_model.model.", "unet.", "transformer.")


def blend_model(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser that adapters load into: ``pipe.transformer`` (SD3, FLUX) or ``pipe.unet``."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        return transformer
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise DiffusionBlendError(f"{type(pipe).__name__} has neither a UNet nor a transformer to load adapters into")
    return unet


def _component(pipe: Any) -> str:
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def _check_name(unet: torch.nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or name == PEFT_BASE:
        raise DiffusionBlendError(f"invalid adapter name {name!r}: use letters, digits, '_' or '-'")
    if name in adapter_names(unet):
        raise DiffusionBlendError(f"an adapter named {name!r} is already loaded")


def _count_adapter_tensors(unet: torch.nn.Module, name: str) -> int:
    return sum(1 for key, _ in unet.named_parameters() if f".lora_A.{name}." in key or f".lora_B.{name}." in key)


def _remove_partial(pipe: Any, name: str) -> None:
    """Best effort: drop a half-loaded adapter so the pipeline stays usable after a failed load."""
    if name in adapter_names(blend_model(pipe)):
        try:
            blend_model(pipe).delete_adapters(name)
        except Exception:  # noqa: BLE001 - cleanup must not mask the real error
            pass


def _short(err: BaseException, limit: int = 300) -> str:
    """The first line of a library's error, cut at a word boundary (never mid-word) when longer than ``limit``."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."


def _load_diffusers_lora(pipe: Any, path: Path, name: str) -> int:
    component = _component(pipe)
    try:
        state_dict = pipe.lora_state_dict(str(path))
        if isinstance(state_dict, tuple):  # UNet/FLUX loaders also return network alphas (and metadata)
            state_dict = state_dict[0]
    except Exception as err:  # noqa: BLE001 - any reader failure means "not a readable LoRA file"
        raise AdapterMismatchError(f"adapter {name!r}: cannot read LoRA weights from {path}: {_short(err)}") from None
    if not state_dict:
        raise AdapterMismatchError(f"adapter {name!r}: {path} holds no LoRA weights")
    other = sorted({key.split(".")[0] for key in state_dict if not key.startswith(component + ".")})
    if other:
        raise AdapterMismatchError(
            f"adapter {name!r}: {path} also holds LoRA weights for {', '.join(other)}; only {component} adapters "
            "can be blended (the prompt embedding must not depend on the adapter)"
        )
    for key, value in state_dict.items():
        if not torch.is_floating_point(value) or not torch.isfinite(value).all():
            raise AdapterMismatchError(f"adapter {name!r}: {path} has NaN/infinite or non-float values in {key}")
    try:
        pipe.load_lora_weights(str(path), adapter_name=name)
    except Exception as err:  # noqa: BLE001 - shape/key mismatches surface as several exception types
        _remove_partial(pipe, name)
        raise AdapterMismatchError(
            f"adapter {name!r} from {path} does not fit this base model's {component} (trained on another base or "
            f"with another layout?): {_short(err)}"
        ) from None
    return len(state_dict)


def _load_peft_folder(pipe: Any, folder: Path, name: str) -> int:
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise AdapterMismatchError(
            f"adapter {name!r}: {folder} has adapter_config.json but no adapter_model.safetensors"
        )
    try:
        config = LoraConfig(**{
            key: value
            for key, value in json.loads((folder / "adapter_config.json").read_text()).items()
            if key in LoraConfig.__dataclass_fields__ and key not in ("peft_type", "task_type")
        })
        state_dict = load_file(weights_file)
    except Exception as err:  # noqa: BLE001
        raise AdapterMismatchError(f"adapter {name!r}: cannot read peft adapter {folder}: {_short(err)}") from None
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in _PEFT_PREFIXES:
            key = key.removeprefix(prefix)
        if not torch.isfinite(value).all():
            raise AdapterMismatchError(f"adapter {name!r}: {folder} has NaN/infinite values in {key}")
        cleaned[key] = value
    try:
        inject_adapter_in_model(config, blend_model(pipe), adapter_name=name)
        result = set_peft_model_state_dict(blend_model(pipe), cleaned, adapter_name=name)
    except Exception as err:  # noqa: BLE001
        _remove_partial(pipe, name)
        raise AdapterMismatchError(
            f"adapter {name!r} from {folder} does not fit this base model's {_component(pipe)}: {_short(err)}"
        ) from None
    if getattr(result, "unexpected_keys", None):
        _remove_partial(pipe, name)
        raise AdapterMismatchError(
            f"adapter {name!r} from {folder} has weights for modules this {_component(pipe)} lacks, "
            f"e.g. {result.unexpected_keys[0]}"
        )
    blend_model(pipe).eval()
    return len(cleaned)


def load_adapter(pipe: Any, source: str | os.PathLike, name: str) -> None:
    """Load one LoRA adapter into the pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``) under ``name``.

    See the module docstring for the formats.

    Raises :class:`AdapterMismatchError` (one line) if the file is missing, unreadable or corrupted, holds
    non-UNet weights, or does not fit the UNet (modules it lacks, other shapes: another base or rank layout).
    """
    _check_name(blend_model(pipe), name)
    path = resolve_adapter_source(source)
    if not path.exists():
        raise AdapterMismatchError(f"adapter {name!r}: no such file or folder: {path}")
    with quiet_third_party():  # diffusers/peft notices that the tensor count below makes redundant
        if path.is_dir() and (path / "adapter_config.json").is_file():
            expected = _load_peft_folder(pipe, path, name)
        else:
            expected = _load_diffusers_lora(pipe, path, name)
    loaded = _count_adapter_tensors(blend_model(pipe), name)
    if loaded < expected:
        _remove_partial(pipe, name)
        raise AdapterMismatchError(
            f"adapter {name!r} from {path}: only {loaded} of its {expected} LoRA tensors match modules of this "
            f"{_component(pipe)} (trained on another base model?)"
        )


def load_adapters(pipe: Any, adapters: Mapping[str, str | os.PathLike]) -> None:
    """Load several named adapters (``{"aesthetic": "aesthetic.safetensors", ...}``)."""
    if not adapters:
        raise DiffusionBlendError("give at least one adapter, e.g. aesthetic=path/to/lora.safetensors")
    for name, source in adapters.items():
        load_adapter(pipe, source, name)


def load_base_pipeline(pipeline_class: type, base: str | os.PathLike, **from_pretrained_kwargs: Any) -> Any:
    """``pipeline_class.from_pretrained(base)`` with a one-line error when the base cannot be loaded."""
    try:
        with quiet_third_party(), no_loading_bars():
            return pipeline_class.from_pretrained(str(base), **from_pretrained_kwargs)
    except Exception as err:  # noqa: BLE001 - hub/offline/missing-file errors come in many types
        raise DiffusionBlendError(f"cannot load base model {str(base)!r}: {_short(err)}") from None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(:[\w./\-]+)?(@[\w.\-/]+)?$")
ADAPTER_PATTERNS = ("*.safetensors", "*.json")
LORA_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")
"""What is fetched of an adapter's hub repository: its weights and configs, never a whole pipeline."""


def resolve_adapter_source(source: str | os.PathLike) -> Path:
    """A local adapter file or folder for ``source``: a path as it is, or a hub id ``ORG/NAME[:SUBFOLDER][@REVISION]``
    (e.g. ``jieliu/SD3.5M-FlowGRPO-PickScore``) fetched through huggingface_hub, only its ``*.safetensors`` and
    ``*.json`` files (in ``SUBFOLDER``). With ``HF_HUB_OFFLINE=1`` only the local cache is read; an id that is neither
    a path nor fetchable gets one line naming it."""
    path = Path(source)
    text = str(source)
    if path.exists() or not _HUB_ID.match(text):
        return path
    if path.suffix in LORA_FILE_SUFFIXES:  # a mistyped file name, not a hub repository
        raise AdapterMismatchError(f"adapter {text!r}: no such file")
    repo, _, revision = text.partition("@")
    repo, _, subfolder = repo.partition(":")
    patterns = [f"{subfolder.strip('/')}/{p}" for p in ADAPTER_PATTERNS] if subfolder else list(ADAPTER_PATTERNS)
    try:
        from huggingface_hub import snapshot_download

        with quiet_third_party():
            folder = Path(snapshot_download(repo, revision=revision or None, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, network: one line naming the id
        from diffusion_blend.pipelines.kinds import hub_offline

        why = "not in the local hub cache and HF_HUB_OFFLINE=1 forbids downloads" if hub_offline() else _short(err)
        raise AdapterMismatchError(f"adapter {text!r} is not a local path, and as a hub id: {why}") from None
    folder = folder / subfolder if subfolder else folder
    if not folder.exists():
        raise AdapterMismatchError(f"adapter {text!r}: the hub repository has no folder {subfolder!r}")
    return folder


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def load_training_base(pipeline_class: type, base: str | os.PathLike, dtype: torch.dtype,
                       **from_pretrained_kwargs: Any) -> tuple[Any, str | None]:
    """The base pipeline for fine-tuning, its frozen weights loaded directly in ``dtype``, and the float32
    fingerprint of its denoiser (:func:`~diffusion_blend.adapters.base_fingerprint` of the base loaded in float32,
    which is what adapters are bound to and what ``dblend sample`` checks).

    ``from_pretrained`` maps a safetensors checkpoint and keeps the whole mapping until every tensor has been cast,
    so a float32 UNet loaded in bfloat16 is resident twice over (its float32 pages, then the bfloat16 copy: 5.2 GiB
    for SD 1.5's 3.4 GB UNet, benchmarks/README.md). Here the denoiser (``unet`` or ``transformer``) is built on the
    meta device and filled one tensor at a time, read with ``pread`` (no mapping: nothing stays resident but the
    tensor in hand), hashed in float32 and cast to ``dtype``; the text encoders and VAE load through
    ``from_pretrained`` in ``dtype`` (a ``force_upcast`` VAE stays float32 under float16, as the trainer keeps it).
    A denoiser without a single or sharded ``diffusion_pytorch_model.safetensors`` whose keys and shapes are exactly
    the model's (a ``.bin`` file, a variant, legacy key names) loads the stock way instead: in float32, fingerprint
    ``None`` (the trainer fingerprints it and casts it, as before).
    """
    folder = _pipeline_folder(pipeline_class, base)
    index = _read_json(folder / "model_index.json") if folder is not None else None
    component = "transformer" if index and "transformer" in index else "unet"
    streamed = None if index is None else _stream_denoiser(folder / component, dtype)
    if streamed is None:
        return load_base_pipeline(pipeline_class, base, **from_pretrained_kwargs), None
    model, fingerprint = streamed
    dtypes: dict[str, torch.dtype] = {"default": dtype}
    vae_config = _read_json(folder / "vae" / "config.json") or {}
    if dtype == torch.float16 and vae_config.get("force_upcast", True):  # AutoencoderKL's default is True
        dtypes["vae"] = torch.float32
    pipe = load_base_pipeline(pipeline_class, folder, **{component: model}, dtype=dtypes,
                              **from_pretrained_kwargs)
    return pipe, fingerprint


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pipeline_folder(pipeline_class: type, base: str | os.PathLike) -> Path | None:
    """The local folder of ``base``: itself, or the Hugging Face cache's snapshot (``download`` fetches it when the
    hub is reachable, as ``from_pretrained`` would); ``None`` when it cannot be had (the stock load then reports)."""
    if Path(base).is_dir():
        return Path(base)
    try:
        with quiet_third_party(), no_loading_bars():
            return Path(pipeline_class.download(str(base)))
    except Exception:  # noqa: BLE001 - the stock load that follows gives the one-line error
        return None


def _weight_files(folder: Path) -> dict[str, Path] | None:
    """Tensor name -> safetensors file of a diffusers model folder (single file or sharded with an index)."""
    from safetensors import safe_open

    single = folder / WEIGHTS_NAME
    if single.is_file():
        with safe_open(single, framework="pt", device="cpu", backend="pread") as handle:
            return {key: single for key in handle.keys()}
    sharded = _read_json(folder / (WEIGHTS_NAME + ".index.json"))
    if sharded is None or not isinstance(sharded.get("weight_map"), dict):
        return None
    return {key: folder / name for key, name in sharded["weight_map"].items()}


def _stream_denoiser(folder: Path, dtype: torch.dtype) -> tuple[torch.nn.Module, str] | None:
    """The diffusers model of ``folder`` in ``dtype`` and its float32 fingerprint, filled tensor by tensor (see
    :func:`load_training_base`); ``None`` when the folder's weights are not exactly the model's."""
    import diffusers
    from accelerate import init_empty_weights
    from safetensors import safe_open

    config, files = _read_json(folder / "config.json"), _weight_files(folder)
    model_class = getattr(diffusers, str((config or {}).get("_class_name")), None)
    if files is None or not (isinstance(model_class, type) and issubclass(model_class, diffusers.ModelMixin)):
        return None
    with quiet_third_party(), init_empty_weights(include_buffers=False):
        model = model_class.from_config(config)
    expected = model.state_dict()
    if set(files) != set(expected):
        return None
    keep_float32 = set(getattr(model_class, "_keep_in_fp32_modules", None) or ())
    handles = {path: safe_open(path, framework="pt", device="cpu", backend="pread") for path in set(files.values())}
    if any(tuple(handles[files[key]].get_slice(key).get_shape()) != tuple(expected[key].shape) for key in files):
        return None
    fingerprint = Fingerprint(architecture_config(model, unet_architecture(model)))
    for key in sorted(files):
        tensor = handles[files[key]].get_tensor(key)  # pread: only this tensor is resident
        if tensor.is_floating_point():
            fingerprint.add(key, tensor.to(torch.float32))
            wanted = torch.float32 if keep_float32 & set(key.split(".")) else dtype
            tensor = tensor.to(wanted)
        else:
            fingerprint.add(key, tensor)
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if name in module._parameters:
            module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
        else:
            module._buffers[name] = tensor
    model.register_to_config(_name_or_path=str(folder))
    return model.eval(), fingerprint.hexdigest()
