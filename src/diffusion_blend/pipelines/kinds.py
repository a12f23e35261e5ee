"""The model kinds the blend pipelines serve and their one spec each (light: no torch, no diffusers).

:data:`SPECS` maps ``sd`` (Stable Diffusion 1.x/2.x), ``sdxl``, ``sd3`` (SD3 / 3.5) and ``flux`` to their
:class:`~diffusion_blend.spec.ModelSpec`: ``dblend sample``, ``finetune``, ``ui``, ``evaluate --setting sd`` and the
blend pipelines' own defaults all read these values (tests/test_specs.py checks that they agree). The reasons:

- **Guidance and steps are the stock diffusers pipelines' defaults** (SD 7.5 / 50, SDXL 5.0 / 50, SD3 7.0 / 28,
  FLUX 3.5 / 28), so that a blend pipeline called without arguments, the CLI and the UI give the same images. SDXL's
  5.0 (its pipeline's and model card's value) replaces the 7.5 ``dblend sample`` used to take from SD; FLUX's 3.5 is
  its distilled guidance (an input of the transformer, no CFG batch), never a CFG scale of 7.5.
- **The sampler is the paper's**: DDIM with ``eta = 1`` for SD / SDXL (every step stochastic: DB-MPA-LS and SMC need
  it); for SD3 / FLUX the marginal-preserving flow SDE of Flow-GRPO at its noise level 0.7 (their Euler ODE is
  deterministic; ``stochastic_sampling`` does not keep the marginals, docs/method.md). One sampler for every method,
  so DB-MPA, DB-MPA-LS and SMC results are comparable.
- **Experts**: SD / SDXL LoRA rank 4 on the attention projections (diffusers' LoRA scripts); SD3 / FLUX rank 32,
  alpha 64 on the eight joint-attention projections (Flow-GRPO's ``scripts/train_sd3.py``, and its public experts).
- **Fine-tuning recipes**: SD / SDXL the DPOK / DDPO range (a few to tens of trajectories per process, minibatches of
  1-4, 50 DDIM steps at eta 1, LoRA learning rate 1e-4), memory-bounded by default; SD3 / FLUX Flow-GRPO's SD3.5-M
  recipe (``config/base.py`` noise level 0.7 and learning rate 3e-4; ``config/grpo.py`` 10 sampling steps in
  training). Flow-GRPO's KL weight (``train.beta`` 0.01-0.04) is a loss coefficient, not our alpha.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.spec import ModelSpec

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The UNet's attention projections, as diffusers' LoRA training scripts adapt them."""
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
"""The joint-attention projections of SD3 / FLUX that Flow-GRPO (and diffusers' SD3/FLUX LoRA scripts) adapt."""

_UNET_RECIPE = dict(batch_size=8, minibatch_size=2, updates_per_batch=1, num_inference_steps=50, learning_rate=1e-4,
                    iterations=100, checkpoint_every=5, gradient_checkpointing=True)
_FLOW_RECIPE = dict(batch_size=8, minibatch_size=2, updates_per_batch=1, num_inference_steps=10, learning_rate=3e-4,
                    iterations=100, checkpoint_every=5, gradient_checkpointing=True)
_DDIM_NOTE = "DDIM eta 1, as the paper samples: every step stochastic (DB-MPA-LS and SMC need it)"
_SDE_NOTE = ("the flow SDE of Flow-GRPO at its noise level 0.7: stochastic, keeps the flow's marginals "
             "(the stock Euler ODE is deterministic)")

SPECS: dict[str, ModelSpec] = {
    "sd": ModelSpec(
        kind="sd", label="Stable Diffusion 1.x/2.x", scheduler="ddim", noise_level=1.0, steps=50,
        guidance_scale=7.5, lora_rank=4, lora_alpha=4.0, lora_targets=UNET_TARGETS, recipe=_UNET_RECIPE,
        pipeline_class="BlendStableDiffusionPipeline", stock_class="StableDiffusionPipeline", denoiser="unet",
        notes={"sampler": _DDIM_NOTE, "guidance": "the stock pipeline's 7.5 (the paper's SD 1.5 setting)",
               "steps": "the stock pipeline's 50 (the paper's)"},
    ),
    "sdxl": ModelSpec(
        kind="sdxl", label="Stable Diffusion XL", scheduler="ddim", noise_level=1.0, steps=50, guidance_scale=5.0,
        lora_rank=4, lora_alpha=4.0, lora_targets=UNET_TARGETS, recipe={**_UNET_RECIPE, "minibatch_size": 1},
        pipeline_class="BlendStableDiffusionXLPipeline", stock_class="StableDiffusionXLPipeline", denoiser="unet",
        notes={"sampler": _DDIM_NOTE, "guidance": "the stock SDXL pipeline's 5.0 (its model card's value)",
               "steps": "the stock pipeline's 50", "recipe": "minibatch 1 at 1024 px"},
    ),
    "sd3": ModelSpec(
        kind="sd3", label="Stable Diffusion 3 / 3.5", scheduler="sde", noise_level=0.7, steps=28, guidance_scale=7.0,
        lora_rank=32, lora_alpha=64.0, lora_targets=TRANSFORMER_TARGETS, recipe=_FLOW_RECIPE,
        pipeline_class="BlendStableDiffusion3Pipeline", stock_class="StableDiffusion3Pipeline", denoiser="transformer",
        notes={"sampler": _SDE_NOTE, "guidance": "the stock SD3 pipeline's 7.0 (classifier-free guidance)",
               "steps": "the stock pipeline's 28", "recipe": "Flow-GRPO's SD3.5-M recipe: 10 SDE steps, lr 3e-4"},
    ),
    "flux": ModelSpec(
        kind="flux", label="FLUX.1", scheduler="sde", noise_level=0.7, steps=28, guidance_scale=3.5,
        lora_rank=32, lora_alpha=64.0, lora_targets=TRANSFORMER_TARGETS, recipe={**_FLOW_RECIPE, "minibatch_size": 1},
        pipeline_class="BlendFluxPipeline", stock_class="FluxPipeline", denoiser="transformer",
        notes={"sampler": _SDE_NOTE, "guidance": "FLUX.1-dev's distilled guidance 3.5 (a transformer input, no CFG "
               "batch; the stock pipeline's default)", "steps": "the stock pipeline's 28",
               "recipe": "Flow-GRPO's recipe as for SD3, minibatch 1"},
    ),
}

FLOW_KINDS = tuple(kind for kind, spec in SPECS.items() if spec.flow)

SCHEDULER_CHOICES = ("ddim", "sde", "pipeline")
"""``ddim`` (SD / SDXL) and ``sde`` (SD3 / FLUX) are the kinds' samplers; ``pipeline`` keeps the base's own."""


def spec_of(kind: str) -> ModelSpec:
    """The spec of a pipeline kind (one-line error for an unknown one)."""
    if kind not in SPECS:
        raise DiffusionBlendError(f"unknown model kind {kind!r}; choose one of {', '.join(SPECS)}")
    return SPECS[kind]


def check_base(base: str | os.PathLike) -> None:
    """Refuse, in one line naming it, a ``--base`` that is neither a diffusers pipeline folder nor a hub id that can
    be had: a folder without ``model_index.json``, a file, a path that does not exist (and is not of the form
    ``ORG/NAME``), or, with ``HF_HUB_OFFLINE=1``, a hub id missing from the local cache. No model loads."""
    path, text = Path(base), str(base)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise DiffusionBlendError(f"--base {text}: the folder has no model_index.json (not a diffusers pipeline "
                                      "folder; save one with save_pretrained)")
        return
    if path.exists():
        raise DiffusionBlendError(f"--base {text} is a file; give a diffusers pipeline folder or a hub id ORG/NAME")
    if os.path.isabs(text) or text.count("/") != 1 or text.startswith((".", "~")):
        raise DiffusionBlendError(f"--base {text}: no such folder (and not a hub id of the form ORG/NAME)")
    if hub_offline() and _cached_model_index(text) is None:
        raise DiffusionBlendError(f"--base {text}: no such folder, and not a hub id in the local cache "
                                  "(HF_HUB_OFFLINE=1 "
                                  "forbids downloads)")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (huggingface_hub's truthy spellings)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _model_index(base: str | os.PathLike) -> dict[str, Any] | None:
    """The ``model_index.json`` of a local pipeline folder, or of a hub id already in the Hugging Face cache."""
    index = Path(base) / "model_index.json"
    if not index.is_file():
        index = _cached_model_index(str(base))
        if index is None:
            return None
    try:
        return json.loads(Path(index).read_text())
    except (OSError, ValueError) as err:
        raise DiffusionBlendError(f"cannot read {index}: {' '.join(str(err).split())}") from None


def _cached_model_index(repo_id: str) -> str | None:
    """The cached ``model_index.json`` of a hub id (no download), or ``None``."""
    if os.path.isabs(repo_id) or repo_id.count("/") != 1 or repo_id.startswith("."):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # noqa: BLE001 - an id the hub library rejects is simply not cached
        return None
    return found if isinstance(found, str) else None


def is_sdxl_folder(base: str | os.PathLike) -> bool:
    """Whether a local pipeline folder is an SDXL pipeline (``model_index.json`` names an XL class)."""
    try:
        index = _model_index(base)
    except DiffusionBlendError:
        return False
    return index is not None and "XL" in str(index.get("_class_name", ""))


def pipeline_kind(base: str | os.PathLike, requested: str = "auto") -> str:
    """The base's kind: from the ``model_index.json`` of a local folder or of a cached hub id (``_class_name``), which
    a ``requested`` kind (not ``"auto"``) must agree with; an uncached hub id counts as ``"sd"`` unless ``requested``
    says. A base that is neither is refused first (:func:`check_base`)."""
    check_base(base)
    if requested != "auto":
        spec_of(requested)
    index = _model_index(base)
    if index is None:
        return "sd" if requested == "auto" else requested
    name = str(index.get("_class_name", ""))
    found = next((kind for marker, kind in (("StableDiffusion3", "sd3"), ("Flux", "flux"), ("XL", "sdxl"),
                                             ("StableDiffusion", "sd")) if marker in name), None)
    if requested != "auto":
        if found is not None and found != requested:
            raise DiffusionBlendError(f"--kind {requested}, but {base} holds a {name} ({found}): drop --kind or give "
                                      f"--kind {found}")
        return requested
    if found is None:
        raise DiffusionBlendError(f"{base} holds a {name or 'unnamed'} pipeline; Diffusion Blend supports Stable "
                                  "Diffusion 1.x/2.x, SDXL, SD3/3.5 and FLUX (name the kind with --kind if the folder "
                                  "is one of these)")
    return found
