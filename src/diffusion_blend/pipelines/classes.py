"""The blend pipeline class of each model kind, and loading a base as it."""

from __future__ import annotations

import os
from typing import Any

from diffusion_blend.pipelines.flow import (
    BlendFluxPipeline,
    BlendStableDiffusion3Pipeline,
)
from diffusion_blend.pipelines.kinds import _model_index, spec_of
from diffusion_blend.pipelines.loading import load_base_pipeline, load_training_base
from diffusion_blend.pipelines.stable_diffusion import (
    BlendStableDiffusionPipeline,
    BlendStableDiffusionXLPipeline,
)

BLEND_CLASSES = {"sd": BlendStableDiffusionPipeline, "sdxl": BlendStableDiffusionXLPipeline,
                 "sd3": BlendStableDiffusion3Pipeline, "flux": BlendFluxPipeline}


def blend_pipeline_class(kind: str) -> type:
    """The Diffusion Blend pipeline class of a model kind (:data:`~.kinds.SPECS`)."""
    return BLEND_CLASSES[spec_of(kind).kind]


def load_blend_pipeline(base: str | os.PathLike, kind: str, **from_pretrained_kwargs: Any) -> Any:
    """Load ``base`` as the blend pipeline of ``kind``; an SD3 folder saved without its T5 encoder loads without it."""
    return load_base_pipeline(blend_pipeline_class(kind), base, **blend_pipeline_kwargs(base, kind,
                                                                                        from_pretrained_kwargs))


def load_blend_training_base(base: str | os.PathLike, kind: str, dtype: Any) -> tuple[Any, str | None]:
    """``base`` as the blend pipeline of ``kind`` for fine-tuning: frozen weights loaded in ``dtype``, and the
    denoiser's float32 fingerprint (:func:`~diffusion_blend.pipelines.loading.load_training_base`)."""
    return load_training_base(blend_pipeline_class(kind), base, dtype, **blend_pipeline_kwargs(base, kind, {}))


def blend_pipeline_kwargs(base: str | os.PathLike, kind: str, from_pretrained_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``base`` as ``kind``: SD without its safety checker, SD3 without
    the T5 parts a folder was saved without."""
    from_pretrained_kwargs = dict(from_pretrained_kwargs)
    index = _model_index(base) or {}
    if kind == "sd3":
        for part in ("text_encoder_3", "tokenizer_3"):
            if part in index and not any(index[part] or []):
                from_pretrained_kwargs.setdefault(part, None)
    if kind == "sd":
        from_pretrained_kwargs.setdefault("safety_checker", None)
        from_pretrained_kwargs.setdefault("requires_safety_checker", False)
    return from_pretrained_kwargs
