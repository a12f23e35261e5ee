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
- With a :class:`~diffusion_blend.sampling.FlowMatchSDEScheduler` and a ``generator``, the SDE noise is drawn
  from a stream derived from that generator (the stock loop calls ``scheduler.step`` without one), so a seeded
  call is reproducible, with or without a preference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import FluxPipeline, StableDiffusion3Pipeline

from ..errors import DiffusionBlendError
from ..sampling import FlowMatchSDEScheduler
from .stable_diffusion import BlendPipelineMixin, _derived_switch_generator

SDE_NOISE_SALT = 0x5DE  # separates the SDE noise stream from the initial noise and the DB-MPA-LS draws


class BlendTransformerPipelineMixin(BlendPipelineMixin):
    """:class:`BlendPipelineMixin` for pipelines whose denoiser is ``self.transformer`` (flow matching)."""

    blend_component = "transformer"

    def _check_blend_call(self, method: str, kwargs: Mapping[str, Any]) -> None:
        if method != "ls":
            return
        scheduler = self.scheduler
        if not isinstance(scheduler, FlowMatchSDEScheduler) or scheduler.config.noise_level <= 0:
            raise DiffusionBlendError(
                "method 'ls' (DB-MPA-LS) needs a stochastic sampler that keeps the flow's marginals, not "
                f"{type(scheduler).__name__}{' (noise_level 0)' if isinstance(scheduler, FlowMatchSDEScheduler) else ''}"
                ": set pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config), or use method 'mpa'"
            )
        if float(kwargs.get("true_cfg_scale") or 1.0) > 1.0:
            raise DiffusionBlendError("method 'ls' with true CFG (true_cfg_scale > 1) would draw members twice per "
                                      "step; use method 'mpa' or true_cfg_scale 1")
        if kwargs.get("skip_guidance_layers"):
            raise DiffusionBlendError("method 'ls' with skip-layer guidance would draw members twice per step; "
                                      "use method 'mpa'")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        scheduler = self.scheduler
        if not isinstance(scheduler, FlowMatchSDEScheduler) or kwargs.get("generator") is None:
            return super().__call__(*args, **kwargs)
        saved = scheduler.noise_generator
        scheduler.set_noise_generator(_derived_switch_generator(kwargs["generator"], salt=SDE_NOISE_SALT))
        try:
            return super().__call__(*args, **kwargs)
        finally:
            scheduler.noise_generator = saved


class BlendStableDiffusion3Pipeline(BlendTransformerPipelineMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` (SD3, SD3.5) with Diffusion Blend (see :class:`BlendPipelineMixin`)."""


class BlendFluxPipeline(BlendTransformerPipelineMixin, FluxPipeline):
    """``FluxPipeline`` with Diffusion Blend; FLUX's distilled guidance is a transformer input, tiled with the
    member batch like the prompt embeddings; its position ids (``txt_ids``, ``img_ids``) pass through unbatched."""
