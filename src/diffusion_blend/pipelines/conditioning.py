"""Conditioning and guided forwards shared by inference and fine-tuning: how the stock SD / SDXL / SD3 / FLUX
pipelines encode prompts and guide the denoiser, as plain functions.

- :func:`unet_conditioning` / :func:`guided_forward`: SD 1.x/2.x and SDXL (classifier-free guidance on one
  ``[uncond; cond]`` UNet batch; SDXL's pooled text embeddings and time ids as added conditioning);
- :func:`transformer_conditioning` / :func:`transformer_forward`: SD3 (CFG in one call) and FLUX (distilled guidance
  as an input, packed latents' position ids).

The SMC loop of the blend pipelines (:mod:`.stable_diffusion`, :mod:`.flow`) and the fine-tuning targets
(:mod:`.sd_target`, :mod:`.flow_target`) use the same functions, so a trained expert and a blended sample see the
same guided prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from diffusion_blend.errors import DiffusionBlendError

DECODE_CHUNK = 8




def target_rewards_and_prompts(reward_names: Sequence[str], reward_options: Any, prompts_file: Any,
                               guidance_scale: Any) -> tuple[dict[str, Any], list[str]]:
    """A pipeline fine-tuning target's rewards (``reward_options`` per trained reward) and prompts, and its guidance
    scale, checked before the base is loaded (one line each)."""
    from diffusion_blend.pipelines.prompts import read_prompts
    from diffusion_blend.rewards import get_reward

    options = dict(reward_options or {})
    unused = sorted(set(options) - set(reward_names))
    if unused:
        raise DiffusionBlendError(f"reward options given for {', '.join(unused)}, which are not trained rewards")
    rewards = {name: get_reward(name, **dict(options.get(name, {}))) for name in reward_names}
    prompts = read_prompts(prompts_file)
    if guidance_scale is not None:
        check_guidance_scale(guidance_scale)
    return rewards, prompts

def check_resolution(resolution: Any, factor: int) -> int:
    """A fine-tuning resolution: a positive multiple of ``factor`` (the latent grid's pixel size), one line if not."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < factor or resolution % factor:
        raise DiffusionBlendError(f"resolution must be a positive multiple of {factor} (the VAE's downsampling), "
                                  f"got {resolution!r}")
    return resolution


def freeze(modules: Sequence[torch.nn.Module]) -> None:
    """No gradients and eval mode for the frozen parts of a fine-tuning target (VAE, text encoders)."""
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def follow(module: torch.nn.Module, leader: torch.nn.Module) -> torch.device:
    """Move ``module`` to ``leader``'s device (where the trainer put the denoiser) if it is elsewhere."""
    device = leader.device
    if module.device != device:
        module.to(device)
    return device


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in ``[0, 1]``, ``DECODE_CHUNK`` at a time, the stock pipelines' scaling (and SD3 / FLUX's
    shift); differentiable when grad mode is on (the pathwise estimator)."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    images = [vae.decode(chunk, return_dict=False)[0] for chunk in latents.split(DECODE_CHUNK)]
    return (torch.cat(images).float() / 2 + 0.5).clamp(0, 1)

def check_guidance_scale(guidance_scale: Any) -> float:
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, int | float)
        or not math.isfinite(guidance_scale)
    ):
        raise DiffusionBlendError(f"guidance scale must be a finite number, got {guidance_scale!r}")
    if guidance_scale < 1:
        raise DiffusionBlendError(
            f"guidance scale must be >= 1 (1 = no classifier-free guidance), got {guidance_scale}"
        )
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
def unet_conditioning(
    pipe: Any,
    prompts: Sequence[str],
    device: torch.device,
    use_cfg: bool,
    height: int,
    width: int,
    negative_prompt: str | list[str] | None = None,
    sdxl: bool | None = None,
) -> dict[str, torch.Tensor]:
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


def _timestep_vector(t: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t, device=x.device).to(x.dtype).reshape(-1).expand(x.shape[0])


@torch.no_grad()
def transformer_conditioning(pipe: Any, prompts: Sequence[str], device: torch.device, use_cfg: bool,
                             max_sequence_length: int, negative_prompt: str | list[str] | None = None
                             ) -> dict[str, torch.Tensor]:
    """The keyword conditioning of :func:`transformer_forward` for ``prompts`` (one row each), encoded by the stock
    SD3 / FLUX ``encode_prompt`` (every text encoder gets the prompt), in the transformer's dtype."""
    from diffusers import FluxPipeline

    dtype = pipe.transformer.dtype
    prompts = list(prompts)
    if isinstance(pipe, FluxPipeline):
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, device=device, max_sequence_length=max_sequence_length)
        return {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype)}
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, prompts, prompts, device=device, do_classifier_free_guidance=use_cfg,
        negative_prompt=negative_prompt, max_sequence_length=max_sequence_length)
    cond = {"encoder_hidden_states": embeds.to(dtype), "pooled_projections": pooled.to(dtype)}
    if use_cfg:
        cond.update(negative_encoder_hidden_states=negative.to(dtype),
                    negative_pooled_projections=negative_pooled.to(dtype))
    return cond


def transformer_forward(flux: bool, guidance_scale: float, use_cfg: bool, image_ids: torch.Tensor | None = None):
    """``forward(transformer, x_t, t, **conditioning) -> velocity``: the velocity the stock pipeline steps with (in
    float32). SD3: classifier-free guided with ONE transformer call on ``[uncond; cond]`` as the stock pipeline makes
    it (``stacked_copies = 2``, :func:`diffusion_blend.lora.stacked_copies`); FLUX: its distilled guidance as an input
    (when the transformer embeds guidance; FLUX-schnell does not), no CFG branch, the packed latents' position ids
    ``image_ids`` (tokens x 3, no batch dimension) and zero text ids as the stock pipeline builds them."""

    def forward(model: torch.nn.Module, x_t: torch.Tensor, t: Any, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, negative_encoder_hidden_states: torch.Tensor | None = None,
                negative_pooled_projections: torch.Tensor | None = None) -> torch.Tensor:
        timestep = _timestep_vector(t, x_t)
        if flux:
            text_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
            guidance = None
            if getattr(model.config, "guidance_embeds", True):
                guidance = torch.full((x_t.shape[0],), guidance_scale, device=x_t.device, dtype=torch.float32)
            return model(hidden_states=x_t, timestep=timestep / 1000, guidance=guidance,
                         pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                         txt_ids=text_ids, img_ids=image_ids.to(x_t.device, x_t.dtype), return_dict=False)[0].float()
        if not use_cfg:
            return model(hidden_states=x_t, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                         pooled_projections=pooled_projections, return_dict=False)[0].float()
        both = model(hidden_states=torch.cat([x_t, x_t]), timestep=torch.cat([timestep, timestep]),
                     encoder_hidden_states=torch.cat([negative_encoder_hidden_states, encoder_hidden_states]),
                     pooled_projections=torch.cat([negative_pooled_projections, pooled_projections]),
                     return_dict=False)[0].float()
        uncond, cond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    forward.stacked_copies = 2 if use_cfg else 1  # type: ignore[attr-defined]  (lora.stacked_copies)
    return forward
