"""Diffusion Blend pipelines for flow-matching transformers: Stable Diffusion 3 / 3.5 and FLUX.

The same mixin as the UNet pipelines (:class:`~diffusion_blend.pipelines.stable_diffusion.BlendPipelineMixin`),
pointed at ``self.transformer``; the stock diffusers loop is untouched (docs/method.md, "Flow-matching models":
velocities blend like noise predictions). Any other transformer pipeline is one line:
``class X(BlendTransformerPipelineMixin, SomeTransformerPipeline): pass``.

    pipe = BlendStableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
    pipe.load_adapter("geneval.safetensors", "geneval")
    pipe.load_adapter("pickscore.safetensors", "pickscore")
    pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config)   # needed for method="ls"
    image = pipe("a cat", preference=Preference({"geneval": 0.3, "pickscore": 0.7}), method="mpa",
                 generator=torch.Generator().manual_seed(0)).images[0]

- SD3: classifier-free guidance runs on the ``[uncond; cond]`` batch, so DB-MPA evaluates every member and both
  CFG branches in ONE mixed-adapter transformer forward.
- FLUX (guidance-distilled): guidance is an input of the transformer (``guidance=``), there is no CFG batch;
  DB-MPA is one forward of ``members x batch`` rows. FLUX's optional true CFG (``true_cfg_scale > 1`` with a
  negative prompt) makes two transformer calls per step: DB-MPA blends each (affine, so it commutes); DB-MPA-LS
  is refused there, since the two calls would draw their members independently.
- DB-MPA-LS needs a stochastic sampler that keeps the flow's marginals (Proposition 2 is about diffusions):
  it runs with :class:`~diffusion_blend.sampling.FlowMatchSDEScheduler` (noise level > 0) and is refused with
  the Euler ODE and with diffusers' ``stochastic_sampling`` (which does not keep the marginals: measured in
  docs/method.md).
- ``method="smc"`` (SMC on the blend) needs :class:`~diffusion_blend.sampling.FlowMatchSDEScheduler` with noise
  level > 0 (its steps are Gaussian; the Euler ODE is refused); the shared loop of
  :class:`~diffusion_blend.pipelines.stable_diffusion.BlendPipelineMixin` with this module's ``_smc_setup`` hook
  (SD3 with CFG, FLUX with distilled guidance and packed latents); ``N = 1`` is the DB-MPA stock loop.
- With a :class:`~diffusion_blend.sampling.FlowMatchSDEScheduler` and a ``generator``, the SDE noise is drawn
  from a stream derived from that generator (the stock loop calls ``scheduler.step`` without one), so a seeded
  call is reproducible, with or without a preference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_output import (
    StableDiffusion3PipelineOutput,
)

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.pipelines.conditioning import (
    transformer_conditioning,
    transformer_forward,
)
from diffusion_blend.pipelines.stable_diffusion import (
    BlendPipelineMixin,
    SMCSetup,
    _derived_switch_generator,
)
from diffusion_blend.sampling import FlowMatchSDEScheduler

SDE_NOISE_SALT = 0x5DE  # separates the SDE noise stream from the initial noise and the DB-MPA-LS draws


class BlendTransformerPipelineMixin(BlendPipelineMixin):
    """:class:`BlendPipelineMixin` for pipelines whose denoiser is ``self.transformer`` (flow matching)."""

    blend_component = "transformer"

    def _check_blend_call(self, method: str, kwargs: Mapping[str, Any]) -> None:
        if method != "ls":
            return
        scheduler = self.scheduler
        if not isinstance(scheduler, FlowMatchSDEScheduler) or scheduler.config.noise_level <= 0:
            level = " (noise_level 0)" if isinstance(scheduler, FlowMatchSDEScheduler) else ""
            raise DiffusionBlendError(
                "method 'ls' (DB-MPA-LS) needs a stochastic sampler that keeps the flow's marginals, not "
                f"{type(scheduler).__name__}{level}: set pipe.scheduler = "
                "FlowMatchSDEScheduler.from_config(pipe.scheduler.config), or use method 'mpa'"
            )
        if float(kwargs.get("true_cfg_scale") or 1.0) > 1.0:
            raise DiffusionBlendError("method 'ls' with true CFG (true_cfg_scale > 1) would draw members twice per "
                                      "step; use method 'mpa' or true_cfg_scale 1")
        if kwargs.get("skip_guidance_layers"):
            raise DiffusionBlendError("method 'ls' with skip-layer guidance would draw members twice per step; "
                                      "use method 'mpa'")

    def _blend_call(self, **kwargs: Any) -> Any:
        """The Blend dispatch with the SDE noise stream derived from ``generator`` (module docstring)."""
        scheduler = self.scheduler
        if not isinstance(scheduler, FlowMatchSDEScheduler) or kwargs.get("generator") is None:
            return super()._blend_call(**kwargs)
        saved = scheduler.noise_generator
        scheduler.set_noise_generator(_derived_switch_generator(kwargs["generator"], salt=SDE_NOISE_SALT))
        try:
            return super()._blend_call(**kwargs)
        finally:
            scheduler.noise_generator = saved

    def _smc_setup(self, prompts: list[str], *, particles: int, guidance_scale: float | None, eta: float | None,
                   negative_prompt: str | list[str] | None, height: int | None, width: int | None,
                   generator: torch.Generator, device: torch.device, num_inference_steps: int,
                   max_sequence_length: int | None = None) -> SMCSetup:
        """SD3 / FLUX hook of ``method="smc"``: the stock ``encode_prompt``
        (:func:`~.conditioning.transformer_conditioning`),
        the guided velocity (:func:`~.conditioning.transformer_forward`: SD3 with both CFG branches in one call,
        FLUX with its distilled guidance input and no CFG batch), ``prepare_latents`` (FLUX: packed tokens and their
        position ids) and the stock loop's timesteps (FLUX: ``sigmas = linspace(1, 1/n, n)`` and the resolution's
        ``mu``; SD3: ``mu`` under dynamic shifting). The sampler must be :class:`FlowMatchSDEScheduler` (the Euler
        ODE is refused by the SMC sampler); its noise level is ``eta`` (default: the scheduler's ``noise_level``) and
        its noise comes from the stream the stock loop derives from the generator (module docstring), so ``N = 1``
        is the stock loop with the DB-MPA blend."""
        flux = isinstance(self, FluxPipeline)
        if flux and negative_prompt is not None:
            raise DiffusionBlendError("method 'smc' on FLUX uses its distilled guidance (no CFG batch): a negative "
                                      "prompt would need true CFG, which SMC does not run; drop negative_prompt")
        if guidance_scale is None:
            guidance_scale = self.spec.guidance_scale  # the stock pipelines' defaults (kinds.SPECS)
        use_cfg = (not flux) and guidance_scale > 1
        if max_sequence_length is None:
            max_sequence_length = 512 if flux else 256  # the stock pipelines' defaults
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        cond = transformer_conditioning(self, prompts, device, use_cfg, max_sequence_length, negative_prompt)
        dtype = cond["encoder_hidden_states"].dtype
        rows = particles * len(prompts)
        config = self.scheduler.config
        if flux:
            latents, image_ids = self.prepare_latents(rows, self.transformer.config.in_channels // 4, height, width,
                                                      dtype, device, generator)
            steps = int(num_inference_steps)
            sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
            mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15))
            timestep_kwargs = {"sigmas": sigmas, "mu": mu}

            def unpack(packed: torch.Tensor) -> torch.Tensor:
                return self._unpack_latents(packed, height, width, self.vae_scale_factor)

            def output(images: Any) -> Any:
                return FluxPipelineOutput(images=images)
        else:
            latents = self.prepare_latents(rows, self.transformer.config.in_channels, height, width, dtype, device,
                                           generator)
            image_ids, unpack, timestep_kwargs = None, None, {}
            if config.get("use_dynamic_shifting", None):
                patch = self.transformer.config.patch_size
                timestep_kwargs["mu"] = calculate_shift(
                    (latents.shape[2] // patch) * (latents.shape[3] // patch), config.get("base_image_seq_len", 256),
                    config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5), config.get("max_shift", 1.16))

            def output(images: Any) -> Any:
                return StableDiffusion3PipelineOutput(images=images)
        if eta is None:
            eta = config.noise_level if isinstance(self.scheduler, FlowMatchSDEScheduler) else 0.0
        return SMCSetup(forward=transformer_forward(flux, guidance_scale, use_cfg, image_ids), cond=cond,
                        latents=latents, eta=float(eta), output=output, unpack=unpack,
                        noise_generator=_derived_switch_generator(generator, salt=SDE_NOISE_SALT),
                        timestep_kwargs=timestep_kwargs)


class BlendStableDiffusion3Pipeline(BlendTransformerPipelineMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` (SD3, SD3.5) with Diffusion Blend (see :class:`BlendPipelineMixin`)."""

    model_kind = "sd3"


class BlendFluxPipeline(BlendTransformerPipelineMixin, FluxPipeline):
    """``FluxPipeline`` with Diffusion Blend; FLUX's distilled guidance is a transformer input, tiled with the
    member batch like the prompt embeddings; its position ids (``txt_ids``, ``img_ids``) pass through unbatched."""

    model_kind = "flux"
