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
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

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
        """Refuse a blend call this pipeline cannot run faithfully (hook for subclasses; UNet pipelines accept all)."""

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
