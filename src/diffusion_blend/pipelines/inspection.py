"""What a LoRA file or folder is, read from its header and key names before anything loads (``dblend inspect``).

:func:`inspect_adapter` reports, for a diffusers LoRA file (``save_lora_weights``' layout), a peft folder
(``adapter_config.json`` + ``adapter_model.safetensors``, e.g. Flow-GRPO's experts) or a kohya / A1111 file
(``lora_unet_...`` keys): its format, the denoiser it fits (SD 1.x/2.x UNet, SDXL UNet, SD3 transformer, FLUX
transformer; read off the module names and the attention widths), whether it also adapts a text encoder, its ranks,
LoRA alpha, target modules, parameter count and size, and our metadata when present (rewards and weights, the KL weight
and the effective one, base fingerprint, training recipe). Only headers and shapes are read (``safe_open``), so a
file of any size inspects in milliseconds. :func:`check_loads` asks the loader itself whether it fits a given base.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.pipelines.lora_files import DIFFUSERS_LORA_NAME, METADATA_PREFIX

_CROSS_ATTENTION = {768: "Stable Diffusion 1.x UNet", 1024: "Stable Diffusion 2.x UNet", 2048: "SDXL UNet"}
_TRANSFORMER_WIDTH = {1536: "SD3 / SD3.5-Medium", 2432: "SD3.5-Large", 3072: "FLUX.1"}
_TEXT_PREFIXES = ("text_encoder", "lora_te", "te_", "te1_", "te2_")


@dataclass
class AdapterReport:
    """What :func:`inspect_adapter` found (module docstring)."""

    source: str
    format: str
    denoiser: str
    text_encoder: bool
    ranks: list[int]
    lora_alpha: list[float] | None
    target_modules: list[str]
    parameters: int
    bytes: int
    ours: dict[str, Any] | None = None
    loads: str | None = None  # with a base: "yes" or the loader's reason
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The report as a few readable lines."""
        alpha = "-" if not self.lora_alpha else "/".join(f"{a:g}" for a in self.lora_alpha)
        out = [f"{self.source}", f"  format: {self.format}", f"  fits: {self.denoiser}"
               + (" and a text encoder" if self.text_encoder else ""),
               f"  rank: {'/'.join(map(str, self.ranks))}, LoRA alpha: {alpha}, modules: "
               f"{', '.join(self.target_modules)}",
               f"  parameters: {self.parameters:,} ({self.bytes / 2**20:.1f} MiB)"]
        if self.ours is not None:
            effective = self.ours.get("effective_alpha")
            out.append(f"  diffusion-blend expert: rewards {self.ours['rewards']}, alpha {self.ours['alpha']:g}"
                       + (f" (effective {effective:g} for its reward)" if effective is not None else "")
                       + f", base {self.ours['base_fingerprint'][:12]}..., {self.ours['steps']} iterations")
        else:
            out.append("  no diffusion-blend metadata: give its reward and alpha (--reward NAME=R --alpha NAME=A)")
        out += [f"  note: {note}" for note in self.notes]
        if self.loads is not None:
            out.append(f"  loads into the base: {self.loads}")
        return out


def _weights_file(source: Path) -> tuple[Path, str, dict[str, Any] | None]:
    """The safetensors file of a source, its format, and a peft folder's config."""
    if source.is_dir():
        if (source / "adapter_config.json").is_file():
            weights = source / "adapter_model.safetensors"
            if not weights.is_file():
                raise DiffusionBlendError(f"{source} has adapter_config.json but no adapter_model.safetensors")
            try:
                config = json.loads((source / "adapter_config.json").read_text())
            except (OSError, ValueError) as err:
                raise DiffusionBlendError(f"{source}/adapter_config.json does not parse ({err})") from None
            return weights, "peft folder", config
        if (source / DIFFUSERS_LORA_NAME).is_file():
            return source / DIFFUSERS_LORA_NAME, "diffusers LoRA file", None
        raise DiffusionBlendError(f"{source} is a folder without a LoRA (no adapter_config.json or "
                                  f"{DIFFUSERS_LORA_NAME})")
    if not source.is_file():
        raise DiffusionBlendError(f"{source} does not exist")
    return source, "", None


def _read(path: Path) -> tuple[dict[str, str], dict[str, tuple[int, ...]], Any]:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        with handle:
            header = dict(handle.metadata() or {})
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DiffusionBlendError(f"{path} is not a readable safetensors file ({' '.join(str(err).split())})") from None
    return header, shapes, safe_open


def _lora_format(keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        return "kohya / A1111 LoRA file"
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or ".lora_down." in k for k in keys):
        return "diffusers LoRA file"
    raise DiffusionBlendError("no LoRA weights in it (no lora_A / lora_B or lora_down / lora_up keys)")


def _down_keys(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {k: s for k, s in shapes.items() if re.search(r"(lora_A|lora_down|lora\.down)\.", k)}


def _denoiser(keys: list[str], downs: dict[str, tuple[int, ...]]) -> tuple[str, list[str]]:
    """The denoiser the keys and widths point to, and notes."""
    text = " ".join(keys)
    if re.search(r"single_transformer_blocks|single_blocks|double_blocks", text):
        family = "FLUX transformer"
    elif "transformer_blocks" in text and re.search(r"add_[qkv]_proj|context", text) and "down_blocks" not in text:
        family = "SD3 transformer"
    elif re.search(r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block", text):
        family = "UNet"
    else:
        return "unknown denoiser", ["its module names match no UNet or transformer Diffusion Blend serves"]
    notes = []
    if family == "UNet":
        widths = Counter(s[-1] for k, s in downs.items() if re.search(r"attn2[._](to_k|to_v)", k) and len(s) == 2)
        if widths:
            width = widths.most_common(1)[0][0]
            name = _CROSS_ATTENTION.get(width)
            return (name or f"UNet with cross-attention width {width} (no released SD)"), notes
        return "UNet (no cross-attention LoRA to tell SD 1.x/2.x from SDXL)", notes
    widths = Counter(s[-1] for k, s in downs.items() if re.search(r"to_q|attn\.qkv|img_attn", k) and len(s) == 2)
    if widths:
        width = widths.most_common(1)[0][0]
        if family == "SD3 transformer" and width in _TRANSFORMER_WIDTH and width != 3072:
            return f"SD3 transformer ({_TRANSFORMER_WIDTH[width]}, width {width})", notes
        if family == "FLUX transformer" and width == 3072:
            return "FLUX transformer (FLUX.1, width 3072)", notes
        return f"{family} of width {width}", notes
    return family, notes


def _lora_alphas(header: dict[str, str], config: dict[str, Any] | None, shapes: dict[str, tuple[int, ...]],
                 path: Path, safe_open: Any) -> list[float] | None:
    if config is not None and config.get("lora_alpha") is not None:
        return [float(config["lora_alpha"])]
    values = set()
    for key, value in header.items():
        if key.endswith("lora_adapter_metadata"):
            try:  # diffusers prefixes the peft config's fields with the component ("transformer.lora_alpha")
                found = json.loads(value)
                values |= {float(v) for k, v in found.items() if k.split(".")[-1] == "lora_alpha" and v is not None}
            except (ValueError, TypeError, AttributeError):
                pass
    alpha_keys = [k for k in shapes if k.endswith(".alpha")]
    if alpha_keys:
        with safe_open(str(path), framework="pt") as handle:
            values |= {float(handle.get_tensor(k)) for k in alpha_keys[:256]}
    return sorted(values) or None


def _ours(header: dict[str, str], path: Path) -> dict[str, Any] | None:
    from diffusion_blend.adapters import AdapterMetadata

    fields = {key[len(METADATA_PREFIX):]: value for key, value in header.items() if key.startswith(METADATA_PREFIX)}
    if not fields:
        return None
    metadata = AdapterMetadata.from_header(fields, path)
    rewards = dict(metadata.rewards)
    effective = float(metadata.alpha) / next(iter(rewards.values())) if len(rewards) == 1 else None
    return {"rewards": rewards, "alpha": float(metadata.alpha), "effective_alpha": effective,
            "base_fingerprint": metadata.base_fingerprint, "steps": metadata.steps,
            "training_config": metadata.training_config}


def inspect_adapter(source: str | os.PathLike) -> AdapterReport:
    """Read what a LoRA file or folder is (module docstring); one-line error for an unreadable or foreign file."""
    path = Path(source)
    weights, kind, config = _weights_file(path)
    header, shapes, safe_open = _read(weights)
    keys = list(shapes)
    try:
        kind = kind or _lora_format(keys)
    except DiffusionBlendError as err:
        raise DiffusionBlendError(f"{path}: {err}") from None
    downs = _down_keys(shapes)
    if not downs:
        raise DiffusionBlendError(f"{path}: no LoRA weights in it (no lora_A / lora_down keys)")
    denoiser, notes = _denoiser(keys, downs)
    text = any(k.split(".")[0].startswith(_TEXT_PREFIXES) for k in keys)
    modules = sorted({_target_name(key) for key in downs})
    if config is not None and config.get("target_modules"):
        modules = sorted(config["target_modules"]) if isinstance(config["target_modules"], list) else [
            str(config["target_modules"])]
    parameters = sum(_numel(shape) for key, shape in shapes.items() if not key.endswith(".alpha"))
    return AdapterReport(
        source=str(path), format=kind, denoiser=denoiser, text_encoder=text,
        ranks=sorted({shape[0] for shape in downs.values()}), lora_alpha=_lora_alphas(header, config, shapes, weights,
                                                                                      safe_open),
        target_modules=modules, parameters=parameters, bytes=weights.stat().st_size, ours=_ours(header, weights),
        notes=notes + (["it also adapts a text encoder: blending needs denoiser-only experts"] if text else []))


def _target_name(key: str) -> str:
    """The adapted module's own name: ``to_q``, ``to_out.0``, ``add_k_proj`` (kohya: after its attention block)."""
    module = re.sub(r"\.(lora_A|lora_down|lora\.down)(\.[^.]+)?\.weight$", "", key)
    if module.startswith("lora_"):  # kohya: underscores instead of dots
        tail = re.split(r"_attn\d?_|_attn_|_ff_", module)[-1]
        return tail if tail != module else "_".join(module.split("_")[-2:])
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def check_loads(pipe: Any, source: str | os.PathLike) -> str:
    """``"yes"``, or the loader's own one-line reason why ``source`` does not fit ``pipe`` (loaded, then removed)."""
    from diffusion_blend.lora import adapter_names
    from diffusion_blend.pipelines.loading import blend_model, load_adapter

    name = "inspected"
    try:
        load_adapter(pipe, source, name)
    except DiffusionBlendError as err:
        return f"no: {err}"
    if name in adapter_names(blend_model(pipe)):
        blend_model(pipe).delete_adapters(name)
    return "yes"
