"""Fine-tuning basis adapters on a Stable Diffusion pipeline (paper section 4 on the SD 1.5 setting of section 5).

:func:`sd_finetune_target` turns a diffusers ``StableDiffusionPipeline`` into a
:class:`~diffusion_blend.training.config.FinetuneTarget` for the DPOK trainer (``training.dpok.finetune``):

- the policy is the sampler's chain on the VAE latents with the **classifier-free-guided** transition
  (``eps = eps_uncond + g (eps_cond - eps_uncond)``, as the stock pipeline samples), so the trainer's exact
  per-step KL compares the guided policy with the guided base, both evaluated by the same UNet (the base with
  the adapter disabled, in the trainer's one mixed-adapter forward);
- prompts are drawn uniformly from a list (:func:`read_prompts`: one per line, or a JSON list) and encoded
  with the pipeline's own ``encode_prompt`` (negative prompt ``""``, as the stock pipeline does);
- rewards score decoded images: ``VAE decode -> [0, 1] images -> reward(images, prompts)`` (registry rewards).

SDXL bases (``StableDiffusionXLPipeline``) work the same way: both text encoders through the stock
``encode_prompt``, the pooled text embeddings and micro-conditioning ``time_ids`` as added conditioning in the
same ``[uncond; cond]`` CFG batch as the stock pipeline.

:func:`export_diffusers_lora` writes the adapter in diffusers' LoRA format (``unet.``-prefixed peft keys plus
diffusers' ``lora_adapter_metadata``, written by the SD or SDXL pipeline class's own ``save_lora_weights``),
loadable by ``StableDiffusionPipeline.load_lora_weights`` / ``StableDiffusionXLPipeline.load_lora_weights`` and by
:class:`~diffusion_blend.pipelines.BlendStableDiffusionPipeline` / ``BlendStableDiffusionXLPipeline``. Our :class:`~diffusion_blend.adapters.AdapterMetadata`
(reward, ``alpha``, base fingerprint, training config) rides along in the safetensors header under
``diffusion_blend.*`` keys; diffusers ignores them and keeps its own ``format: pt``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open

from ..adapters import AdapterMetadata, atomic_save_safetensors, read_adapter
from ..errors import DiffusionBlendError
from ..training.config import FinetuneTarget, RewardFn

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections, as diffusers' LoRA scripts
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default weight name: a run folder loads as is
METADATA_PREFIX = "diffusion_blend."
DECODE_CHUNK = 8


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Training prompts from a file: a JSON list of strings, or one prompt per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DiffusionBlendError(f"prompts file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DiffusionBlendError(f"cannot read prompts file {path} ({err})") from None
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise DiffusionBlendError(f"prompts file {path} looks like JSON but does not parse ({err})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise DiffusionBlendError(f"prompts file {path}: the JSON list must hold non-empty strings only")
        prompts = [p.strip() for p in prompts]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DiffusionBlendError(f"prompts file {path} holds no prompt")
    return prompts


def unet_architecture(unet: torch.nn.Module) -> dict[str, Any]:
    """The UNet's architecture config for the adapter fingerprint, without load-time entries (``_name_or_path``)."""
    config = {key: value for key, value in dict(unet.config).items() if not key.startswith("_")}
    return json.loads(json.dumps({"class": type(unet).__name__, **config}, sort_keys=True, default=str))


def check_guidance_scale(guidance_scale: Any) -> float:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float) or not math.isfinite(guidance_scale):
        raise DiffusionBlendError(f"guidance scale must be a finite number, got {guidance_scale!r}")
    if guidance_scale < 1:
        raise DiffusionBlendError(f"guidance scale must be >= 1 (1 = no classifier-free guidance), got {guidance_scale}")
    return float(guidance_scale)


def guided_forward(guidance_scale: float):
    """``forward(unet, x_t, t, encoder_hidden_states, negative_encoder_hidden_states) -> guided prediction``.

    Classifier-free guidance (Ho & Salimans 2022) exactly as diffusers' pipelines do it: ONE UNet call on the
    batch ``[uncond; cond]``, then ``uncond + g (cond - uncond)`` (in float32, whatever the UNet's dtype); with
    ``guidance_scale == 1`` only the conditional branch runs (the stock pipeline's rule, CFG iff ``g > 1``).
    The forward declares ``stacked_copies = 2`` (:func:`diffusion_blend.lora.stacked_copies`), so in a peft
    mixed-adapter batch both CFG copies of a row go through that row's adapter: the trainer's policy rows, base
    rows and both CFG branches are one network batch of ``2 x members x rows``.

    SDXL's added conditioning (pooled ``text_embeds`` and ``time_ids``, with their ``negative_`` counterparts)
    arrives as flat per-row keyword tensors, so the trainer chunks and indexes it with the batch, and is passed
    as diffusers' ``added_cond_kwargs`` in the same ``[uncond; cond]`` layout as the stock SDXL pipeline.
    """

    def forward(unet: torch.nn.Module, x_t: torch.Tensor, t: Any, encoder_hidden_states: torch.Tensor,
                negative_encoder_hidden_states: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
                negative_text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                negative_time_ids: torch.Tensor | None = None) -> torch.Tensor:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        if guidance_scale <= 1:
            return unet(x_t, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                        return_dict=False)[0].float()
        if added is not None:
            added = {"text_embeds": torch.cat([negative_text_embeds, text_embeds]),
                     "time_ids": torch.cat([negative_time_ids, time_ids])}
        both = unet(torch.cat([x_t, x_t]), t,
                    encoder_hidden_states=torch.cat([negative_encoder_hidden_states, encoder_hidden_states]),
                    added_cond_kwargs=added, return_dict=False)[0].float()
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    forward.stacked_copies = 2 if guidance_scale > 1 else 1  # type: ignore[attr-defined]
    return forward


@torch.no_grad()
def unet_conditioning(pipe: Any, prompts: Sequence[str], device: torch.device, use_cfg: bool, height: int, width: int,
                      negative_prompt: str | list[str] | None = None, sdxl: bool | None = None) -> dict[str, torch.Tensor]:
    """The keyword conditioning of :func:`guided_forward` for ``prompts`` (one row each), encoded as the stock SD / SDXL
    pipeline encodes it, in the UNet's dtype (the trainer's prompts and ``method="smc"``'s).

    SD: ``encode_prompt`` (negative prompt ``""`` unless given). SDXL (``sdxl``; default: the pipeline has a second
    text encoder): both text encoders, pooled embeds (an empty negative prompt is zeros when
    ``force_zeros_for_empty_prompt``) and the micro-conditioning time ids for an uncropped ``height x width`` image,
    shared by both CFG branches as in the stock pipeline."""
    dtype = pipe.unet.dtype
    prompts = list(prompts)
    if sdxl is None:
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if not sdxl:
        positive, negative = pipe.encode_prompt(prompts, device, 1, use_cfg, negative_prompt)
        cond = {"encoder_hidden_states": positive.to(dtype)}
        if use_cfg:
            cond["negative_encoder_hidden_states"] = negative.to(dtype)
        return cond
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=use_cfg,
        negative_prompt=negative_prompt)
    if pipe.text_encoder_2 is None:
        projection_dim = int(pooled.shape[-1])
    else:
        projection_dim = int(pipe.text_encoder_2.config.projection_dim)
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=positive.dtype,
                                      text_encoder_projection_dim=projection_dim)
    time_ids = time_ids.to(device).repeat(len(prompts), 1).to(dtype)
    cond = {"encoder_hidden_states": positive.to(dtype), "text_embeds": pooled.to(dtype), "time_ids": time_ids}
    if use_cfg:
        cond.update(negative_encoder_hidden_states=negative.to(dtype), negative_text_embeds=negative_pooled.to(dtype),
                    negative_time_ids=time_ids)
    return cond


def sd_finetune_target(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    rewards: Mapping[str, RewardFn],
    *,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    name: str = "sd",
) -> FinetuneTarget:
    """A :class:`FinetuneTarget` for the pipeline's UNet: CFG-guided DDIM policy on latents, rewards on decoded images.

    The scheduler is DDIM built from the pipeline's scheduler config (the paper samples DDIM with ``eta = 1``).
    ``resolution`` (pixels, square) defaults to the UNet's ``sample_size * vae_scale_factor``. The text encoder
    and VAE are frozen (``frozen_modules``: the trainer moves them to its device and ``DPOKConfig.dtype``).
    ``decode`` keeps gradients when grad mode is on, so the pathwise estimator back-propagates a differentiable
    reward through the VAE decode into the chain.
    """
    if isinstance(pipe, type) or not all(hasattr(pipe, part) for part in ("unet", "vae", "text_encoder", "encode_prompt")):
        raise DiffusionBlendError("fine-tuning needs a Stable Diffusion pipeline (unet, vae, text encoder)")
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    prompts = [str(p) for p in prompts]
    if not prompts or not all(p.strip() for p in prompts):
        raise DiffusionBlendError("give at least one non-empty training prompt")
    if not rewards:
        raise DiffusionBlendError("give at least one reward")
    guidance_scale = check_guidance_scale(guidance_scale)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    factor = int(pipe.vae_scale_factor)
    if resolution is None:
        resolution = int(unet.config.sample_size) * factor
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < factor or resolution % factor:
        raise DiffusionBlendError(f"resolution must be a positive multiple of {factor} (the VAE's downsampling), "
                                  f"got {resolution!r}")
    text_encoders = [module for module in (text_encoder, getattr(pipe, "text_encoder_2", None)) if module is not None]
    for module in (vae, *text_encoders):
        module.requires_grad_(False)
        module.eval()
    use_cfg = guidance_scale > 1

    def follow_unet(module: torch.nn.Module) -> torch.device:
        device = unet.device
        if module.device != device:
            module.to(device)
        return device

    @torch.no_grad()
    def encode_prompts(batch: Sequence[str]) -> dict[str, torch.Tensor]:
        for module in text_encoders:
            device = follow_unet(module)
        return unet_conditioning(pipe, batch, device, use_cfg, resolution, resolution, sdxl=sdxl)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]; differentiable when grad mode is on (the pathwise estimator)."""
        follow_unet(vae)
        images = [vae.decode(chunk.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
                  for chunk in latents.split(DECODE_CHUNK)]
        return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)

    latent_size = resolution // factor
    return FinetuneTarget(
        name=name,
        model=unet,
        forward=guided_forward(guidance_scale),
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        sample_shape=(int(unet.config.in_channels), latent_size, latent_size),
        rewards=dict(rewards),
        target_modules=list(target_modules),
        decode=decode,
        architecture=unet_architecture(unet),
        prompts=prompts,
        encode_prompts=encode_prompts,
        frozen_modules=(vae, *text_encoders),
    )


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
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lora-export-") as scratch:
        if pipeline_class is None:
            pipeline_class = lora_pipeline_class(unet)
        component = "transformer" if hasattr(pipeline_class, "transformer_name") else "unet"
        pipeline_class.save_lora_weights(
            scratch, **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": config.to_dict()},
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
    """The weights file of a diffusers LoRA source (a file, or a folder holding ``pytorch_lora_weights.safetensors``)."""
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


def load_sd_pipeline(base: str | os.PathLike, sdxl: bool | None = None) -> StableDiffusionPipeline:
    """The stock SD (no safety checker) or SDXL pipeline of ``base`` (``sdxl=None``: SDXL when the local folder's
    ``model_index.json`` names an XL class); one-line error when it cannot be loaded."""
    from .loading import is_sdxl_folder, load_base_pipeline

    if sdxl or (sdxl is None and is_sdxl_folder(base)):
        return load_base_pipeline(StableDiffusionXLPipeline, base)
    return load_base_pipeline(StableDiffusionPipeline, base, safety_checker=None, requires_safety_checker=False)


def load_sd_target(
    base: str | os.PathLike,
    prompts_file: str | os.PathLike,
    reward_names: Sequence[str],
    *,
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    sdxl: bool | None = None,
) -> FinetuneTarget:
    """The ``dblend finetune --target sd|sdxl`` target: rewards and prompts are checked before the base is loaded.

    ``sdxl``: load the base as ``StableDiffusionXLPipeline`` (``None``: when the local folder's
    ``model_index.json`` names an XL class)."""
    from ..rewards import get_reward

    options = dict(reward_options or {})
    unused = sorted(set(options) - set(reward_names))
    if unused:
        raise DiffusionBlendError(f"reward options given for {', '.join(unused)}, which are not trained rewards")
    rewards = {name: get_reward(name, **dict(options.get(name, {}))) for name in reward_names}
    prompts = read_prompts(prompts_file)
    guidance_scale = check_guidance_scale(guidance_scale)
    pipe = load_sd_pipeline(base, sdxl)
    return sd_finetune_target(pipe, prompts, rewards, guidance_scale=guidance_scale, resolution=resolution,
                              name="sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd")
