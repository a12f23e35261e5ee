"""Diffusion Blend pipelines for the Stable Diffusion family (paper section 3: SD 1.5 with LoRA experts).

:class:`BlendPipelineMixin` adds ``preference=`` / ``method=`` to any diffusers pipeline whose denoiser is
``self.unet`` (see :mod:`.unet_blend` for how the stock loop is reused). Two ready classes:

    pipe = BlendStableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5")
    pipe.load_adapter("aesthetic.safetensors", "aesthetic")
    pipe.load_adapter("align.safetensors", "align")
    image = pipe("a cat", preference=Preference({"aesthetic": 0.3, "align": 0.7}), method="mpa",
                 eta=1.0, generator=torch.Generator().manual_seed(0)).images[0]

Any other UNet pipeline follows with one line: ``class X(BlendPipelineMixin, SomeUNetPipeline): pass``.
Without ``preference`` the call is the stock pipeline with whatever adapters diffusers has active.

Samplers (checked at every blended call, one-line :class:`~diffusion_blend.errors.DiffusionBlendError`):

- ``eta`` is honoured only by DDIM-type schedulers (their ``step`` takes ``eta``). A non-zero ``eta`` with any
  other scheduler is an error, not silently ignored: SD 1.5 ships ``PNDMScheduler``, where ``eta=0`` and
  ``eta=1`` give identical images. Set ``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``
  (what ``dblend sample`` does by default).
- ``method="mpa"`` works with any scheduler: the blend is a noise prediction like any other.
- ``method="ls"`` (DB-MPA-LS) needs a stochastic sampler: Proposition 2 (switching experts matches the blend in
  distribution) holds for a sampler that draws fresh noise at each step. Accepted: DDIM with ``eta > 0`` (the
  paper: ``eta = 1``), DDPM, ancestral (``*AncestralDiscreteScheduler``), ``DPMSolverSDEScheduler`` and DPM-Solver
  with an ``sde-*`` algorithm type; deterministic samplers (DDIM ``eta = 0``, PNDM, Euler, Heun, LMS, UniPC,
  ODE DPM-Solver) are refused.

``method="smc"`` (Stable Diffusion 1.x/2.x; beyond the paper, :mod:`diffusion_blend.smc`) runs N particles per image
with the blend as proposal, reweighted to the exact target ``p_pre exp(lambda r_w / alpha)``; it needs its own loop
(the stock loop has one chain) and reuses the pipeline's ``encode_prompt``, ``prepare_latents``-style noise, VAE and
image processor:

    out = pipe("a cat", preference=pref, method="smc", reward=my_r_w, alpha=0.1, particles=4, eta=1.0,
               generator=torch.Generator().manual_seed(0))
    pipe.last_smc.final_ess, pipe.last_smc.network_evaluations
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from ..denoisers import DenoiserFamily, Member
from ..errors import DiffusionBlendError
from ..lora import LoraFamily, adapter_names
from ..preference import Preference
from ..smc import SMCOutput, smc_sample
from .loading import load_adapter, load_adapters
from .unet_blend import DenoiserBlend, blended_denoiser


def _derived_switch_generator(generator: Any, salt: int = 0x5EED) -> torch.Generator:
    """The DB-MPA-LS draw generator when none is given: seeded from the pipeline's ``generator`` (a separate
    stream, so the initial noise and the ``eta`` noise are the same as with ``method="mpa"``), else from the
    global torch RNG (``torch.manual_seed`` makes it reproducible)."""
    if isinstance(generator, list) and generator:
        generator = generator[0]
    if isinstance(generator, torch.Generator):
        seed = generator.initial_seed()
    else:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed((seed * 0x9E3779B1 + salt) % 2**63)


def takes_eta(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` honours ``eta`` (DDIM-type schedulers; diffusers' pipelines drop it otherwise)."""
    return "eta" in inspect.signature(scheduler.step).parameters


def is_stochastic_sampler(scheduler: Any, eta: float | None) -> bool:
    """Whether every step of ``scheduler`` (at ``eta``) draws fresh noise: what DB-MPA-LS needs (paper Proposition 2)."""
    name = type(scheduler).__name__
    if takes_eta(scheduler):
        return bool(eta)
    if name.startswith("DDPM") or "Ancestral" in name or name == "DPMSolverSDEScheduler":
        return True
    return str(getattr(scheduler.config, "algorithm_type", "")).startswith("sde")


def check_sampler(scheduler: Any, method: str, eta: float | None) -> None:
    """Refuse an ``eta`` the scheduler ignores and DB-MPA-LS on a deterministic sampler (module docstring)."""
    name = type(scheduler).__name__
    if eta and not takes_eta(scheduler):
        raise DiffusionBlendError(
            f"eta={eta:g} has no effect with {name} (only DDIM-type schedulers take eta); set "
            "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config) for the paper's sampler, or drop eta"
        )
    if method == "ls" and not is_stochastic_sampler(scheduler, eta):
        what = f"{name} with eta={eta or 0:g}" if takes_eta(scheduler) else name
        raise DiffusionBlendError(
            f"method='ls' (DB-MPA-LS) needs a stochastic sampler (paper Proposition 2), got {what}; use DDIM with "
            "eta=1.0 (or DDPM, an ancestral or SDE scheduler), or method='mpa'"
        )


class _GuidedUNetFamily(DenoiserFamily):
    """The UNet's base and LoRA experts with classifier-free guidance: every member is guided with its own two
    predictions, and both CFG halves of all rows go through one routed evaluation (:class:`LoraFamily`)."""

    def __init__(self, unet: Any, guidance_scale: float):
        self.guidance_scale = float(guidance_scale)
        self.lora = LoraFamily(unet, self._forward, adapter_names(unet))
        self.expert_names = self.lora.expert_names

    @staticmethod
    def _forward(model: Any, x: torch.Tensor, t: Any, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return model(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    def route(self, x_t: torch.Tensor, t: Any, members: Sequence[Member], *, encoder_hidden_states: torch.Tensor,
              negative_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if negative_embeds is None:
            return self.lora.route(x_t, t, members, encoder_hidden_states=encoder_hidden_states)
        out = self.lora.route(torch.cat([x_t, x_t]), t, [*members, *members],
                              encoder_hidden_states=torch.cat([negative_embeds, encoder_hidden_states]))
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)


class BlendPipelineMixin:
    """Output-space blending of the UNet's LoRA adapters for a diffusers UNet pipeline.

    ``__call__(..., preference=Preference(...), method="mpa" | "ls", switch_generator=None)``:

    - ``method="mpa"``: DB-MPA / DB-KLA / combined (paper Lemma 2, sections 2.4-2.6): every UNet call returns
      ``sum_j c_j eps_j`` with all needed members x both CFG branches in ONE batched forward;
    - ``method="ls"``: DB-MPA-LS (paper Proposition 2): each sample draws one member per step from
      ``Categorical(c)`` (shared by its two CFG rows) from ``switch_generator`` (seed or generator; by default
      derived from ``generator``); one UNet forward of the CFG batch per step.

    ``routing="auto" | "batched" | "sequential"`` (call argument, default: the ``routing`` attribute, ``"auto"``):
    how the members are evaluated on the CFG batch, one batched forward or one forward per member; ``"auto"`` is
    sequential on CPU and batched on CUDA when the batch fits (:class:`diffusion_blend.lora.LoraFamily`). Every
    routing gives the same images up to float32 rounding.

    After a call, ``self.last_blend`` holds the :class:`DenoiserBlend` used (its ``calls``, ``forwards``,
    ``routing`` and ``routing_used`` and, for ``ls``, the denoiser's ``selection_counts``).

    ``blend_component`` names the pipeline's denoiser attribute (``"unet"`` here; ``"transformer"`` in
    :class:`~diffusion_blend.pipelines.flow.BlendTransformerPipelineMixin`).
    """

    last_blend: DenoiserBlend | None = None
    last_smc: SMCOutput | None = None
    routing: str = "auto"
    blend_component = "unet"

    @property
    def blend_model(self) -> torch.nn.Module:
        """The denoiser whose LoRA adapters are blended (``self.unet`` or ``self.transformer``)."""
        return getattr(self, self.blend_component)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Names of the LoRA adapters on the denoiser (the experts that a preference can weight)."""
        return adapter_names(self.blend_model)

    def load_adapter(self, source: str | os.PathLike, name: str) -> None:
        """Load a LoRA adapter (diffusers LoRA file/folder or peft folder) into the denoiser as expert ``name``."""
        load_adapter(self, source, name)

    def load_adapters(self, adapters: Mapping[str, str | os.PathLike]) -> None:
        load_adapters(self, adapters)

    def _guided_copies(self) -> int:
        return 2 if getattr(self, "do_classifier_free_guidance", False) else 1

    def _check_blend_call(self, method: str, kwargs: Mapping[str, Any]) -> None:
        """Refuse a blend call this pipeline cannot run faithfully (:func:`check_sampler` for UNet pipelines)."""
        check_sampler(self.scheduler, method, kwargs.get("eta"))

    @torch.no_grad()
    def __call__(
        self,
        *args: Any,
        preference: Preference | None = None,
        method: str = "mpa",
        switch_generator: torch.Generator | int | None = None,
        routing: str | None = None,
        **kwargs: Any,
    ) -> Any:
        if method == "smc":
            if preference is None:
                raise DiffusionBlendError("method 'smc' needs a preference (and reward=, alpha=)")
            return self._smc_call(*args, preference=preference, **kwargs)
        if preference is None:
            return super().__call__(*args, **kwargs)
        self._check_blend_call(method, kwargs)
        if method == "ls" and switch_generator is None:
            switch_generator = _derived_switch_generator(kwargs.get("generator"))
        blend = DenoiserBlend(self.blend_model, preference, method, switch_generator,
                              guided_copies=self._guided_copies, routing=self.routing if routing is None else routing)
        self.last_blend = blend
        with blended_denoiser(self.blend_model, blend):
            return super().__call__(*args, **kwargs)

    def _smc_call(
        self,
        prompt: str | list[str],
        *,
        preference: Preference,
        reward: Callable[[torch.Tensor, list[str]], torch.Tensor],
        alpha: float,
        particles: int = 4,
        proposal: str = "blend",
        potential: str = "tweedie",
        ess_threshold: float = 0.5,
        potential_every: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | int | None = None,
        output_type: str = "pil",
    ) -> Any:
        """SMC on the blend (module docstring). ``reward(images in [0, 1], prompts) -> r_w`` per image."""
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

        if isinstance(self, StableDiffusionXLPipeline) or self.blend_component != "unet":
            raise DiffusionBlendError(f"method 'smc' supports Stable Diffusion 1.x/2.x pipelines so far, not "
                                      f"{type(self).__name__}")
        if not adapter_names(self.unet):
            raise DiffusionBlendError("the pipeline's UNet carries no LoRA adapter; load some with load_adapter()")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self._execution_device
        guided = guidance_scale > 1.0
        cond_embeds, negative_embeds = self.encode_prompt(prompts, device, 1, guided, negative_prompt)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        shape = (len(prompts), self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        family = _GuidedUNetFamily(self.unet, guidance_scale)
        cond = {"encoder_hidden_states": cond_embeds}
        if guided:
            cond["negative_embeds"] = negative_embeds

        def decode(latents: torch.Tensor) -> torch.Tensor:
            images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            return (images / 2 + 0.5).clamp(0, 1)

        def r_w(latents: torch.Tensor) -> torch.Tensor:  # particle-major rows: row i is prompt i % len(prompts)
            return reward(decode(latents), [prompts[i % len(prompts)] for i in range(latents.shape[0])])

        out = smc_sample(
            family, preference, self.scheduler, reward=r_w, alpha=alpha, particles=particles, proposal=proposal,
            potential=potential, ess_threshold=ess_threshold, potential_every=potential_every,
            generator=generator if generator is not None else int(torch.randint(0, 2**62, (1,)).item()),
            shape=shape, num_inference_steps=num_inference_steps, eta=eta, cond=cond,
            progress=not getattr(self, "_progress_bar_config", {}).get("disable", False), device=device,
            dtype=cond_embeds.dtype,
        )
        self.last_smc = out
        if output_type == "latent":
            return StableDiffusionPipelineOutput(images=out.samples, nsfw_content_detected=None)
        images = self.vae.decode(out.samples / self.vae.config.scaling_factor, return_dict=False)[0]
        images = self.image_processor.postprocess(images, output_type=output_type)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)


class BlendStableDiffusionPipeline(BlendPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with Diffusion Blend (see :class:`BlendPipelineMixin`)."""


class BlendStableDiffusionXLPipeline(BlendPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with Diffusion Blend; SDXL's ``added_cond_kwargs`` (pooled text embeddings,
    time ids) are tiled with the member batch like the prompt embeddings."""
