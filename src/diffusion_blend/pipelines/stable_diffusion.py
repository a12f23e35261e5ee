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
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from ..errors import DiffusionBlendError
from ..lora import adapter_names
from ..preference import Preference
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


class BlendStableDiffusionPipeline(BlendPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` with Diffusion Blend (see :class:`BlendPipelineMixin`)."""


class BlendStableDiffusionXLPipeline(BlendPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with Diffusion Blend; SDXL's ``added_cond_kwargs`` (pooled text embeddings,
    time ids) are tiled with the member batch like the prompt embeddings."""
