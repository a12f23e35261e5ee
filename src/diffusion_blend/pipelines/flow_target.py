"""Fine-tuning basis adapters on SD3 / 3.5 and FLUX (paper section 4 on flow-matching models, as Flow-GRPO does).

:func:`flow_finetune_target` turns a diffusers ``StableDiffusion3Pipeline`` or ``FluxPipeline`` into a
:class:`~diffusion_blend.training.config.FinetuneTarget` for the same DPOK trainer as the UNet models
(``training.dpok.finetune``: score-function and pathwise estimators, exact per-step KL):

- the policy is the flow SDE's chain (:class:`~diffusion_blend.sampling.FlowMatchSDEScheduler`, noise level =
  the trainer's ``eta``), whose steps are Gaussian with explicit mean and std (``sampling.model_transition``), so
  the per-step KL ``||mu_theta - mu_ref||^2 / (2 std^2)`` and log-probabilities are exact, as in Flow-GRPO;
- SD3 rollouts use classifier-free guidance as the stock pipeline does (guided policy and guided reference, both
  from the one transformer; both CFG branches in one call, ``stacked_copies = 2``, so the policy, the reference
  and both branches of a minibatch are one network batch); FLUX uses its distilled guidance (an input of the
  transformer, no CFG branch);
- the memory controls of the SD targets apply unchanged: ``frozen_modules`` (VAE, text encoders) follow
  ``DPOKConfig.dtype``, the transformer checkpoints its blocks, and ``decode`` keeps gradients in grad mode so the
  pathwise estimator back-propagates a differentiable reward through the VAE;
- FLUX's dynamic timestep shift is resolved once for the training resolution into the equivalent static shift
  (``exp(mu)``: the exponential time shift and the static shift are the same map), so the trainer's
  ``set_timesteps(n)`` needs no ``mu``;
- adapters go on the attention projections Flow-GRPO trains;
:func:`~diffusion_blend.pipelines.sd_target.export_run_adapter`
  with the pipeline class writes a file stock diffusers loads with ``load_lora_weights``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.pipelines.conditioning import (
    check_guidance_scale,
    check_resolution,
    decode_latents,
    follow,
    freeze,
    target_rewards_and_prompts,
    transformer_conditioning,
    transformer_forward,
)
from diffusion_blend.pipelines.kinds import SPECS, TRANSFORMER_TARGETS
from diffusion_blend.pipelines.lora_files import unet_architecture
from diffusion_blend.sampling import FlowMatchSDEScheduler
from diffusion_blend.training.config import FinetuneTarget, RewardFn


def _flow_chain(pipe: Any, flux: bool, resolution: int) -> tuple[tuple[int, ...], Any, torch.Tensor | None]:
    """The policy's sample shape, its sampler (the flow SDE; FLUX's dynamic shift resolved once for this resolution
    into the equivalent static shift ``exp(mu)``) and FLUX's packed-latent position ids."""
    latent_side = resolution // int(pipe.vae_scale_factor)
    channels = int(pipe.vae.config.latent_channels)
    scheduler_config = dict(pipe.scheduler.config)
    if not flux:
        return (channels, latent_side, latent_side), FlowMatchSDEScheduler.from_config(scheduler_config), None
    tokens = (latent_side // 2) ** 2
    if scheduler_config.get("use_dynamic_shifting"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(tokens, scheduler_config.get("base_image_seq_len", 256),
                             scheduler_config.get("max_image_seq_len", 4096),
                             scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15))
        scheduler_config.update(use_dynamic_shifting=False, shift=math.exp(mu))
    image_ids = pipe._prepare_latent_image_ids(1, latent_side // 2, latent_side // 2, torch.device("cpu"),
                                               torch.float32)
    return (tokens, channels * 4), FlowMatchSDEScheduler.from_config(scheduler_config), image_ids


def flow_finetune_target(
    pipe: Any,
    prompts: Sequence[str],
    rewards: Mapping[str, RewardFn],
    *,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    max_sequence_length: int = 77,
    target_modules: Sequence[str] = TRANSFORMER_TARGETS,
) -> FinetuneTarget:
    """A :class:`FinetuneTarget` for the pipeline's transformer (SD3 or FLUX), rewards on decoded images.

    ``guidance_scale`` defaults to the kind's spec (the stock pipeline's: 7 for SD3, 3.5 for FLUX); ``resolution``
    (pixels, square) to the transformer's native size.
    """
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    flux = isinstance(pipe, FluxPipeline)
    if not (flux or isinstance(pipe, StableDiffusion3Pipeline)):
        raise DiffusionBlendError("flow fine-tuning needs a StableDiffusion3Pipeline or FluxPipeline")
    prompts = [str(p) for p in prompts]
    if not prompts or not all(p.strip() for p in prompts):
        raise DiffusionBlendError("give at least one non-empty training prompt")
    if not rewards:
        raise DiffusionBlendError("give at least one reward")
    spec = SPECS["flux" if flux else "sd3"]
    guidance_scale = check_guidance_scale(guidance_scale if guidance_scale is not None else spec.guidance_scale)
    transformer, vae = pipe.transformer, pipe.vae
    factor = int(pipe.vae_scale_factor) * (2 if flux else 1)  # FLUX packs 2 x 2 latent patches
    if resolution is None:
        resolution = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
        resolution -= resolution % factor
    check_resolution(resolution, factor)
    encoders = [module for module in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                                      getattr(pipe, "text_encoder_3", None)) if module is not None]
    freeze((vae, *encoders))
    use_cfg = (not flux) and guidance_scale > 1
    sample_shape, scheduler, image_ids = _flow_chain(pipe, flux, resolution)

    @torch.no_grad()
    def encode_prompts(batch: Sequence[str]) -> dict[str, torch.Tensor]:
        for module in encoders:
            follow(module, transformer)
        return transformer_conditioning(pipe, batch, transformer.device, use_cfg, max_sequence_length)

    forward = transformer_forward(flux, guidance_scale, use_cfg, image_ids)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]; differentiable when grad mode is on (the pathwise estimator)."""
        follow(vae, transformer)
        if flux:
            latents = pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)
        return decode_latents(vae, latents)

    return FinetuneTarget(
        name="flux" if flux else "sd3",
        model=transformer,
        forward=forward,
        scheduler=scheduler,
        sample_shape=sample_shape,
        rewards=dict(rewards),
        target_modules=list(target_modules),
        decode=decode,
        architecture=unet_architecture(transformer),
        prompts=prompts,
        encode_prompts=encode_prompts,
        frozen_modules=(vae, *encoders),
    )


def load_flow_target(
    kind: str,
    base: str | os.PathLike,
    prompts_file: str | os.PathLike,
    reward_names: Sequence[str],
    *,
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> FinetuneTarget:
    """The ``dblend finetune --kind sd3|flux`` target: rewards and prompts are checked before the base is loaded;
    the frozen weights load directly in ``dtype`` (:func:`~diffusion_blend.pipelines.loading.load_training_base`)."""
    from diffusion_blend.pipelines.classes import load_blend_training_base
    from diffusion_blend.pipelines.kinds import pipeline_kind

    rewards, prompts = target_rewards_and_prompts(reward_names, reward_options, prompts_file, guidance_scale)
    found = pipeline_kind(base)
    if os.path.isdir(base) and found != kind:
        raise DiffusionBlendError(f"{base} is a {found} pipeline, not {kind}")
    if kind not in ("sd3", "flux"):
        raise DiffusionBlendError(f"unknown flow target {kind!r}; choose sd3 or flux")
    # a subclass of the stock pipeline; without a preference it is stock
    pipe, fingerprint = load_blend_training_base(base, kind, dtype)
    target = flow_finetune_target(pipe, prompts, rewards, guidance_scale=guidance_scale, resolution=resolution)
    target.base_fingerprint = fingerprint
    return target
