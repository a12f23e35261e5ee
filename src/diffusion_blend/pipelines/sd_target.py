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
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.pipelines.conditioning import (
    check_guidance_scale,
    check_resolution,
    decode_latents,
    follow,
    freeze,
    guided_forward,
    target_rewards_and_prompts,
    unet_conditioning,
)
from diffusion_blend.pipelines.kinds import SPECS, UNET_TARGETS
from diffusion_blend.pipelines.lora_files import unet_architecture
from diffusion_blend.training.config import FinetuneTarget, RewardFn


def sd_finetune_target(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    rewards: Mapping[str, RewardFn],
    *,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    target_modules: Sequence[str] = UNET_TARGETS,
    name: str = "sd",
) -> FinetuneTarget:
    """A :class:`FinetuneTarget` for the pipeline's UNet: CFG-guided DDIM policy on latents, rewards on decoded images.

    The scheduler is DDIM built from the pipeline's scheduler config (the paper samples DDIM with ``eta = 1``).
    ``resolution`` (pixels, square) defaults to the UNet's ``sample_size * vae_scale_factor``. The text encoder
    and VAE are frozen (``frozen_modules``: the trainer moves them to its device and ``DPOKConfig.dtype``).
    ``decode`` keeps gradients when grad mode is on, so the pathwise estimator back-propagates a differentiable
    reward through the VAE decode into the chain.
    """
    if isinstance(pipe, type) or not all(
        hasattr(pipe, part) for part in ("unet", "vae", "text_encoder", "encode_prompt")
    ):
        raise DiffusionBlendError("fine-tuning needs a Stable Diffusion pipeline (unet, vae, text encoder)")
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    prompts = [str(p) for p in prompts]
    if not prompts or not all(p.strip() for p in prompts):
        raise DiffusionBlendError("give at least one non-empty training prompt")
    if not rewards:
        raise DiffusionBlendError("give at least one reward")
    kind = "sdxl" if sdxl else "sd"
    guidance_scale = check_guidance_scale(SPECS[kind].guidance_scale if guidance_scale is None else guidance_scale)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    factor = int(pipe.vae_scale_factor)
    if resolution is None:
        resolution = int(unet.config.sample_size) * factor
    check_resolution(resolution, factor)
    text_encoders = [module for module in (text_encoder, getattr(pipe, "text_encoder_2", None)) if module is not None]
    freeze((vae, *text_encoders))
    use_cfg = guidance_scale > 1

    @torch.no_grad()
    def encode_prompts(batch: Sequence[str]) -> dict[str, torch.Tensor]:
        for module in text_encoders:
            follow(module, unet)
        return unet_conditioning(pipe, batch, unet.device, use_cfg, resolution, resolution, sdxl=sdxl)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]; differentiable when grad mode is on (the pathwise estimator)."""
        follow(vae, unet)
        return decode_latents(vae, latents)

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


def _sd_pipeline_class(base: str | os.PathLike, sdxl: bool | None) -> tuple[type, dict[str, Any]]:
    from diffusion_blend.pipelines.kinds import is_sdxl_folder

    if sdxl or (sdxl is None and is_sdxl_folder(base)):
        return StableDiffusionXLPipeline, {}
    return StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}


def load_sd_target(
    base: str | os.PathLike,
    prompts_file: str | os.PathLike,
    reward_names: Sequence[str],
    *,
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    sdxl: bool | None = None,
    dtype: torch.dtype = torch.float32,
) -> FinetuneTarget:
    """The ``dblend finetune --kind sd|sdxl`` target: rewards and prompts are checked before the base is loaded.

    ``sdxl``: load the base as ``StableDiffusionXLPipeline`` (``None``: when the local folder's
    ``model_index.json`` names an XL class). ``dtype``: the frozen weights are loaded directly in it, the target
    carrying the base's float32 fingerprint (:func:`~diffusion_blend.pipelines.loading.load_training_base`)."""
    from diffusion_blend.pipelines.loading import load_training_base

    rewards, prompts = target_rewards_and_prompts(reward_names, reward_options, prompts_file, guidance_scale)
    pipeline_class, kwargs = _sd_pipeline_class(base, sdxl)
    pipe, fingerprint = load_training_base(pipeline_class, base, dtype, **kwargs)
    target = sd_finetune_target(pipe, prompts, rewards, guidance_scale=guidance_scale, resolution=resolution,
                                name="sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd")
    target.base_fingerprint = fingerprint
    return target
