"""Diffusion Blend pipelines for the Stable Diffusion family (paper section 3: SD 1.5 with LoRA experts).

:class:`BlendPipelineMixin` adds ``preference=`` / ``method=`` to any diffusers pipeline whose denoiser is
``self.unet`` (see :mod:`.blend` for how the stock loop is reused). Two ready classes:

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

``method="smc"`` (beyond the paper, :mod:`diffusion_blend.smc`) runs N particles per image with the blend (or its
twisted step, ``proposal="twisted"``; ``proposal_tilt``, learned from the run by default) as proposal, reweighted to
the exact target ``p_pre exp(lambda r_w / alpha)``; it needs its own loop (the stock loop has one chain), shared by
every pipeline (:meth:`BlendPipelineMixin._smc_call`), and one small hook per pipeline
(``_smc_setup`` -> :class:`SMCSetup`: stock prompt encoding as a conditioning dict, the guided forward, the particles'
initial latents from ``prepare_latents``, sampler settings, output class). SD 1.x/2.x and SDXL (pooled text embeds and
time ids in both CFG branches) here; SD3 and FLUX in :mod:`.flow`:

    out = pipe("a cat", preference=pref, method="smc", reward=my_r_w, alpha=0.1, smc=SMCOptions(particles=4), eta=1.0,
               generator=torch.Generator().manual_seed(0))
    pipe.last_smc.final_ess, pipe.last_smc.network_evaluations
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.lora import LoraFamily, adapter_names
from diffusion_blend.pipelines.blend import DenoiserBlend, blended_denoiser
from diffusion_blend.pipelines.conditioning import (
    DECODE_CHUNK,
    guided_forward,
    unet_conditioning,
)
from diffusion_blend.pipelines.kinds import spec_of
from diffusion_blend.pipelines.loading import load_adapter, load_adapters
from diffusion_blend.preference import Preference, PreferenceSchedule
from diffusion_blend.sampling import as_generator, timestep_progress
from diffusion_blend.smc import SMCOptions, SMCOutput, smc_sample
from diffusion_blend.spec import ModelSpec


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
    """Whether every step of ``scheduler`` (at ``eta``) draws fresh noise: what DB-MPA-LS needs (paper
    Proposition 2)."""
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


def stock_pipeline_class(cls: type) -> type | None:
    """The stock diffusers pipeline under a Blend class: the first class in its MRO that defines ``__call__`` and is
    not a Blend mixin (``StableDiffusionPipeline`` for :class:`BlendStableDiffusionPipeline`); ``None`` for a mixin."""
    for klass in cls.__mro__[1:]:
        if "__call__" in vars(klass) and not issubclass(klass, BlendPipelineMixin):
            return klass
    return None


def blend_keywords(stock: inspect.Signature) -> list[inspect.Parameter]:
    """Our keyword-only call arguments that the stock signature lacks, in a fixed order: the blend's
    (``preference``, ``method``, ``switch_generator``, ``routing``), then ``method="smc"``'s (``reward``, ``alpha``,
    ``particles``, ...; ``eta`` on pipelines whose stock call has none: the flow SDE's noise level). Each with the
    default of the method that takes it (``None`` where that method requires it: ``reward``, ``alpha``)."""
    seen = set(stock.parameters) | {"self"}
    extras = []
    for method in (BlendPipelineMixin._blend_call, BlendPipelineMixin._smc_call):
        for parameter in inspect.signature(method, eval_str=True).parameters.values():
            if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or parameter.name in seen:
                continue
            seen.add(parameter.name)
            default = None if parameter.default is inspect.Parameter.empty else parameter.default
            extras.append(parameter.replace(default=default))
    return extras


def blend_call_signature(stock_call: Callable[..., Any]) -> inspect.Signature:
    """The stock ``__call__`` signature (same parameters, defaults, order, annotations, return annotation) with
    :func:`blend_keywords` appended as keyword-only parameters (before the stock ``**kwargs``, where it has one)."""
    stock = inspect.signature(stock_call)
    parameters = list(stock.parameters.values())
    var_keyword = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    parameters = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return stock.replace(parameters=parameters + blend_keywords(stock) + var_keyword)


def _signed_call(cls: type, stock: type) -> Callable[..., Any]:
    """A ``__call__`` for ``cls`` that runs the Blend dispatch (``super(cls, self).__call__``) and declares
    :func:`blend_call_signature` of ``stock.__call__``: what ``inspect.signature`` and every tool reading it
    (diffusers' own tests and LoRA helpers, UIs, serving wrappers) see."""

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return super(cls, self).__call__(*args, **kwargs)

    signature = blend_call_signature(stock.__call__)
    __call__.__signature__ = signature  # type: ignore[attr-defined]
    __call__.__annotations__ = {name: p.annotation for name, p in signature.parameters.items()
                                if p.annotation is not inspect.Parameter.empty}
    if signature.return_annotation is not inspect.Signature.empty:
        __call__.__annotations__["return"] = signature.return_annotation
    __call__.__qualname__ = f"{cls.__qualname__}.__call__"
    __call__.__module__ = cls.__module__
    __call__.__doc__ = ((stock.__call__.__doc__ or "") + "\n\n    Diffusion Blend (keyword-only): ``preference``, "
                        "``method``, ``switch_generator``, ``routing`` and ``method='smc'``'s options; see "
                        f"{BlendPipelineMixin.__qualname__}.")
    return __call__


@dataclass
class SMCSetup:
    """What a pipeline's :meth:`BlendPipelineMixin._smc_setup` hook gives the shared ``method="smc"`` loop.

    ``forward(model, x_t, t, **cond) -> prediction``: the guided prediction the stock loop steps with (classifier-free
    guidance inside, ``stacked_copies`` declared; routed per member by :class:`~diffusion_blend.lora.LoraFamily`);
    ``cond``: its per-prompt conditioning tensors (one row per prompt); ``latents``: ``x_T`` of all ``N x B``
    particles, particle-major, drawn by the pipeline's own ``prepare_latents`` from the call's generator (so ``N = 1``
    is the stock loop's noise); ``eta``: DDIM's stochasticity or the flow SDE's noise level; ``noise_generator``: the
    step noise stream (``None``: the call's generator, as the stock UNet loop); ``timestep_kwargs``: the stock loop's
    extra ``set_timesteps`` arguments; ``unpack``: sampler space -> VAE latents (FLUX's packed tokens), applied
    before decoding; ``output``: wraps the images (or latents) in the stock pipeline's output class.
    """

    forward: Callable[..., torch.Tensor]
    cond: dict[str, torch.Tensor]
    latents: torch.Tensor
    eta: float
    output: Callable[[Any], Any]
    noise_generator: torch.Generator | None = None
    timestep_kwargs: dict[str, Any] = field(default_factory=dict)
    unpack: Callable[[torch.Tensor], torch.Tensor] | None = None


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
    model_kind = "sd"  # the kind whose spec (:mod:`.kinds`) gives this class's defaults

    @property
    def spec(self) -> ModelSpec:
        """The model kind's spec (:data:`diffusion_blend.pipelines.kinds.SPECS`): defaults of steps and guidance."""
        return spec_of(self.model_kind)

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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every concrete Blend class gets its own ``__call__`` whose signature is its stock pipeline's plus our
        keyword-only arguments (:func:`blend_call_signature`); a class that writes its own ``__call__`` keeps it."""
        super().__init_subclass__(**kwargs)
        stock = None if "__call__" in vars(cls) else stock_pipeline_class(cls)
        if stock is not None:
            cls._stock_call_signature = inspect.signature(stock.__call__)
            cls.__call__ = _signed_call(cls, stock)

    _stock_call_signature: inspect.Signature | None = None

    def _as_keywords(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """Positional call arguments named by the stock signature (``pipe("a cat", 512, 512)`` is ``prompt=``,
        ``height=``, ``width=``), so the checks below see ``generator`` / ``eta`` however they were passed."""
        if not args:
            return kwargs
        parameters = self._stock_call_signature.parameters.values() if self._stock_call_signature else ()
        names = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}.__call__() takes {len(names) + 1} positional arguments but "
                            f"{len(args) + 1} were given")
        named = dict(zip(names, args))
        twice = sorted(set(named) & set(kwargs))
        if twice:
            raise TypeError(f"{type(self).__name__}.__call__() got multiple values for argument {twice[0]!r}")
        return {**named, **kwargs}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._blend_call(**self._as_keywords(args, kwargs))

    @torch.no_grad()
    def _blend_call(
        self,
        *,
        preference: Preference | PreferenceSchedule | None = None,
        method: str = "mpa",
        switch_generator: torch.Generator | int | None = None,
        routing: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """The dispatch behind every Blend ``__call__`` (all arguments by keyword): without ``preference`` the stock
        call, unchanged; with one, DB-MPA / DB-MPA-LS on the stock loop, or SMC."""
        if method == "smc":
            if preference is None:
                raise DiffusionBlendError("method 'smc' needs a preference (and reward=, alpha=)")
            return self._smc_call(preference=preference, routing=routing, **kwargs)
        if preference is None:
            return self._stock_call(**kwargs)
        self._check_blend_call(method, kwargs)
        if method == "ls" and switch_generator is None:
            switch_generator = _derived_switch_generator(kwargs.get("generator"))
        blend = DenoiserBlend(self.blend_model, preference, method, switch_generator,
                              guided_copies=self._guided_copies, routing=self.routing if routing is None else routing,
                              progress=timestep_progress(self.scheduler))
        self.last_blend = blend
        with blended_denoiser(self.blend_model, blend):
            return self._stock_call(**kwargs)

    def _stock_call(self, **kwargs: Any) -> Any:
        """The stock pipeline's ``__call__`` (the next one after the Blend classes in the MRO)."""
        return super().__call__(**kwargs)

    def _smc_call(
        self,
        prompt: str | list[str] | None = None,
        *,
        preference: Preference,
        reward: Callable[[torch.Tensor, list[str]], torch.Tensor] | None = None,
        alpha: float | None = None,
        smc: SMCOptions | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | int | None = None,
        output_type: str = "pil",
        routing: str | None = None,
        **options: Any,
    ) -> Any:
        """SMC on the blend (:mod:`diffusion_blend.smc`), shared by every pipeline: the pipeline-specific parts
        (prompt encoding, guided forward, initial latents, sampler settings, output class) come from
        :meth:`_smc_setup`. ``reward(images in [0, 1], prompts) -> r_w`` per image; ``smc``: the
        :class:`~diffusion_blend.smc.SMCOptions` (default ``SMCOptions()``); ``options``: the hook's own arguments
        (``max_sequence_length`` for SD3 / FLUX). Unset steps and guidance are the kind's spec's (the stock
        defaults)."""
        smc = SMCOptions() if smc is None else smc
        if not isinstance(smc, SMCOptions):
            raise DiffusionBlendError(f"smc= takes SMCOptions(...), got {type(smc).__name__}")
        num_inference_steps = self.spec.steps if num_inference_steps is None else num_inference_steps
        if not callable(reward):
            raise DiffusionBlendError("method 'smc' needs reward=, a callable (images in [0, 1], prompts) -> r_w")
        if not adapter_names(self.blend_model):
            raise DiffusionBlendError(f"the pipeline's {self.blend_component} carries no LoRA adapter; load some with "
                                      "load_adapter()")
        accepted = set(inspect.signature(self._smc_setup).parameters) - set(SMC_SETUP_ARGUMENTS)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise DiffusionBlendError(f"method 'smc' of {type(self).__name__} does not take {', '.join(unknown)}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise DiffusionBlendError("method 'smc' needs a prompt (a string or a list of strings)")
        if isinstance(generator, list):
            raise DiffusionBlendError("method 'smc' takes one generator (or seed), not a list")
        if guidance_scale is not None:  # the stock rule: classifier-free guidance iff > 1 (FLUX: an input, any value)
            if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float) or not (
                    math.isfinite(guidance_scale) and guidance_scale >= 0):
                raise DiffusionBlendError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
            guidance_scale = float(guidance_scale)
        generator = as_generator(generator if generator is not None else int(torch.randint(0, 2**62, (1,)).item()))
        device = self._execution_device
        setup = self._smc_setup(prompts, particles=smc.particles, guidance_scale=guidance_scale, eta=eta,
                                negative_prompt=negative_prompt, height=height, width=width, generator=generator,
                                device=device, num_inference_steps=num_inference_steps, **options)
        family = LoraFamily(self.blend_model, setup.forward, routing=self.routing if routing is None else routing)

        def r_w(latents: torch.Tensor) -> torch.Tensor:  # particle-major rows: row i is prompt i % len(prompts)
            images = (self._smc_decode(setup, latents).float() / 2 + 0.5).clamp(0, 1)
            return reward(images, [prompts[i % len(prompts)] for i in range(latents.shape[0])])

        out = smc_sample(
            family, preference, self.scheduler, reward=r_w, alpha=alpha, options=smc, generator=generator,
            particle_latents=setup.latents, num_inference_steps=num_inference_steps, eta=setup.eta, cond=setup.cond,
            noise_generator=setup.noise_generator, timestep_kwargs=setup.timestep_kwargs,
            progress=not getattr(self, "_progress_bar_config", {}).get("disable", False), device=device,
        )
        self.last_smc = out
        if output_type == "latent":
            return setup.output(out.samples)
        images = self.image_processor.postprocess(self._smc_decode(setup, out.samples), output_type=output_type)
        return setup.output(images)

    def _smc_setup(self, prompts: list[str], *, particles: int, guidance_scale: float | None, eta: float | None,
                   negative_prompt: str | list[str] | None, height: int | None, width: int | None,
                   generator: torch.Generator, device: torch.device, num_inference_steps: int) -> SMCSetup:
        """The per-pipeline part of ``method="smc"`` (:class:`SMCSetup`); pipelines without one refuse SMC."""
        raise DiffusionBlendError(f"method 'smc' has no setup for {type(self).__name__} (it runs on the Stable "
                                  "Diffusion 1.x/2.x, SDXL, SD3 and FLUX blend pipelines)")

    def _smc_decode(self, setup: SMCSetup, latents: torch.Tensor) -> torch.Tensor:
        """Sampler-space latents -> VAE images in [-1, 1] as the stock pipelines decode (``unpack``, the VAE's
        ``latents_mean`` / ``latents_std`` or ``scaling_factor`` and ``shift_factor``; a float16 VAE with
        ``force_upcast`` decodes in float32), in chunks of :data:`DECODE_CHUNK` rows."""
        vae = self.vae
        if setup.unpack is not None:
            latents = setup.unpack(latents)
        config = vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            channels = latents.shape[1]
            mean = torch.tensor(config.latents_mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        dtype = torch.float32 if vae.dtype == torch.float16 and getattr(config, "force_upcast", False) else vae.dtype
        original = vae.dtype
        if dtype != original:
            vae.to(dtype)
        try:
            return torch.cat([vae.decode(chunk.to(dtype), return_dict=False)[0]
                              for chunk in latents.split(DECODE_CHUNK)])
        finally:
            if dtype != original:
                vae.to(original)


SMC_SETUP_ARGUMENTS = ("self", "prompts", "particles", "guidance_scale", "eta", "negative_prompt", "height", "width",
                       "generator", "device", "num_inference_steps")


class _UNetSMCSetup:
    """The SD 1.x/2.x and SDXL hook: stock prompt encoding (:func:`~.finetune.unet_conditioning`), the CFG-guided
    UNet forward (:func:`~.finetune.guided_forward`: both branches in one call) and ``prepare_latents``."""

    def _smc_setup(self, prompts: list[str], *, particles: int, guidance_scale: float | None, eta: float | None,
                   negative_prompt: str | list[str] | None, height: int | None, width: int | None,
                   generator: torch.Generator, device: torch.device, num_inference_steps: int) -> SMCSetup:
        guidance_scale = self.spec.guidance_scale if guidance_scale is None else guidance_scale
        size = getattr(self, "default_sample_size", None) or self.unet.config.sample_size
        height = height or size * self.vae_scale_factor
        width = width or size * self.vae_scale_factor
        cond = unet_conditioning(self, prompts, device, guidance_scale > 1, height, width, negative_prompt,
                                 sdxl=isinstance(self, StableDiffusionXLPipeline))
        latents = self.prepare_latents(particles * len(prompts), self.unet.config.in_channels, height, width,
                                       cond["encoder_hidden_states"].dtype, device, generator)
        if isinstance(self, StableDiffusionXLPipeline):
            def output(images: Any) -> Any:
                return StableDiffusionXLPipelineOutput(images=images)
        else:
            def output(images: Any) -> Any:
                return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
        return SMCSetup(forward=guided_forward(guidance_scale), cond=cond, latents=latents,
                        eta=1.0 if eta is None else float(eta), output=output)


class BlendStableDiffusionPipeline(_UNetSMCSetup, BlendPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with Diffusion Blend (see :class:`BlendPipelineMixin`)."""

    model_kind = "sd"


class BlendStableDiffusionXLPipeline(_UNetSMCSetup, BlendPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with Diffusion Blend; SDXL's ``added_cond_kwargs`` (pooled text embeddings,
    time ids) are tiled with the member batch like the prompt embeddings."""

    model_kind = "sdxl"
