"""The UI's pipeline studio: a Stable Diffusion (1.x/2.x, XL), SD3 or FLUX base with one LoRA expert per basis reward.

:class:`PipelineStudio` implements the :class:`~diffusion_blend.ui.studio.Studio` protocol over a
:class:`~diffusion_blend.pipelines.session.BlendSession` (the same session ``dblend sample`` opens, so the same
preference and seed give the same images as the command line): ``generate(preference, method, seed, prompt)``
samples ``num_images`` images with the kind's spec (sampler, steps, guidance) and scores them with each expert's
basis reward, from the session (our metadata in the LoRA file, or ``--reward NAME=REWARD``).

SMC on the blend (``generate(..., particles=N)``) needs the experts' KL weight ``alpha`` (their metadata, or
``dblend ui --alpha`` for files without it); when it is unknown or the experts' alphas differ, the studio has no SMC
and says why (:attr:`PipelineStudio.smc_unavailable`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.evaluation.stats import mean_and_standard_error
from diffusion_blend.pipelines.session import BlendSession
from diffusion_blend.preference import Preference
from diffusion_blend.ui.studio import Generation, image_grid


class PipelineStudio:
    """Text-to-image studio over one :class:`BlendSession` (see the module docstring)."""

    text_conditioned = True

    def __init__(self, session: BlendSession, *, num_images: int = 4, steps: int | None = None,
                 guidance_scale: float | None = None, resolution: int | None = None):
        for value, what in ((num_images, "number of images"), (steps or 1, "number of steps")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffusionBlendError(f"{what} must be a positive integer, got {value!r}")
        self.session = session
        self.rewards = session.reward_functions("the UI's reward scores")
        self.reward_names = tuple(self.rewards)
        self.num_images = num_images
        self.steps = session.spec.steps if steps is None else steps
        self.guidance_scale = session.spec.guidance_scale if guidance_scale is None else float(guidance_scale)
        self.resolution = resolution
        labels = ", ".join(f"{name} ({session.experts[name].reward})" for name in self.reward_names)
        self.description = (
            f"{session.spec.label} base with experts {labels}; {num_images} images per prompt, "
            f"{session.spec.sampler_line(self.steps, self.guidance_scale, session.noise_level)}; "
            "same seed = same noise.")

    @property
    def smc_unavailable(self) -> str | None:
        """Why SMC is off (the experts' alpha unknown or differing), or ``None`` when it runs."""
        try:
            self.session.alpha("SMC")
        except DiffusionBlendError as err:
            return str(err)
        return None

    @property
    def alpha(self) -> float | None:
        """The experts' common effective KL weight (SMC's target), or ``None`` when SMC is off."""
        return None if self.smc_unavailable else self.session.alpha("SMC")

    @property
    def supports_smc(self) -> bool:
        return self.smc_unavailable is None

    @torch.no_grad()
    def generate(self, preference: Preference, method: str, seed: int, prompt: str | None = None,
                 particles: int = 1, proposal_tilt: float | str = "auto") -> Generation:
        """Images for ``prompt`` under ``preference`` (DB-MPA / DB-MPA-LS) and each reward's mean; ``particles > 1``:
        SMC on the blend (DB-MPA proposal; ``proposal_tilt``: ``"auto"`` or ``t``, the blend at ``t x lambda``) with
        that many particles per image."""
        if not prompt or not prompt.strip():
            raise DiffusionBlendError("enter a prompt")
        start = time.perf_counter()
        options: dict[str, Any] = {}
        if particles > 1:
            if method != "mpa" or not self.supports_smc:
                raise DiffusionBlendError("SMC particles > 1 need method DB-MPA (its proposal) and the experts' alpha: "
                                          f"{self.smc_unavailable or 'choose DB-MPA'}")
            from diffusion_blend.smc import SMCOptions

            method = "smc"
            options["smc"] = SMCOptions(particles=int(particles), proposal_tilt=proposal_tilt)
        result = self.session.generate(
            prompt.strip(), preference, method=method, num_images=self.num_images, seed=int(seed), steps=self.steps,
            guidance_scale=self.guidance_scale, height=self.resolution, width=self.resolution, output_type="pt",
            **options)
        images = result.images.float().cpu()
        prompts = [prompt.strip()] * images.shape[0]
        stats = {name: mean_and_standard_error(fn(images, prompts).detach()) for name, fn in self.rewards.items()}
        cell = max(64, min(256, images.shape[-1]))
        return Generation(image_grid(images, cell=cell), {name: m for name, (m, _) in stats.items()},
                          time.perf_counter() - start, {name: se for name, (_, se) in stats.items()})
