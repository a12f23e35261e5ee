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
from dataclasses import replace
from typing import Any

import torch

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.evaluation.stats import mean_and_standard_error
from diffusion_blend.pipelines.session import BlendSession
from diffusion_blend.preference import Preference, PreferenceSchedule
from diffusion_blend.smc import SMCOptions
from diffusion_blend.ui.studio import Generation, image_grid


def score_label(name: str, reward: str | None) -> str:
    """How a score is labelled: by the reward it measures (``"bright (brightness)"``; the reward alone when the
    expert is named after it)."""
    return name if reward in (None, name) else f"{name} ({reward})"


def sampler_line(session: BlendSession, steps: int, guidance_scale: float) -> str:
    """The sampler a session runs, in words: the kind's (``flow SDE noise level 0.7, 28 steps, guidance 7``) or the
    base's own scheduler."""
    if session.noise_level is None:
        return f"the base's own {type(session.pipe.scheduler).__name__}, {steps} steps, guidance {guidance_scale:g}"
    return session.spec.sampler_line(steps, guidance_scale, session.noise_level)


class PipelineStudio:
    """Text-to-image studio over one :class:`BlendSession` (see the module docstring)."""

    text_conditioned = True

    def __init__(self, session: BlendSession, *, num_images: int = 4, steps: int | None = None,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 target_alpha: float | None = None, smc: SMCOptions | None = None, routing: str = "auto"):
        for value, what in ((num_images, "number of images"), (steps or 1, "number of steps")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffusionBlendError(f"{what} must be a positive integer, got {value!r}")
        self.session = session
        self.rewards = session.reward_functions("the UI's reward scores")
        self.reward_names = tuple(self.rewards)
        self.num_images = num_images
        self.steps = session.spec.steps if steps is None else steps
        self.guidance_scale = session.spec.guidance_scale if guidance_scale is None else float(guidance_scale)
        self.height, self.width = height, width
        self.target_alpha = target_alpha
        self.smc = smc or SMCOptions()  # the page's sliders set particles and the proposal tilt
        self.routing = routing
        self.score_labels = {name: score_label(name, session.experts[name].reward) for name in self.reward_names}
        self.description = (
            f"{session.spec.label} base with experts {', '.join(self.score_labels.values())}; {num_images} images per "
            f"prompt, {sampler_line(session, self.steps, self.guidance_scale)}; same seed = same noise.")

    @property
    def smc_unavailable(self) -> str | None:
        """Why SMC is off (an expert's alpha unknown), or ``None`` when it runs."""
        missing = [name for name in self.reward_names if self.session.experts[name].alpha is None]
        if missing:
            return (f"SMC needs each expert's KL weight alpha; {', '.join(missing)} carry none in their metadata "
                    "(start the UI with --alpha NAME=A)")
        return None

    def target_line(self, preference: Preference) -> str:
        """The distribution ``preference`` serves, in words (the status line's; :class:`BlendTarget`)."""
        target = self.session.target(preference, self.target_alpha)
        if target is None:
            return "target unknown (an expert's KL weight alpha is unknown)"
        alphas = ", ".join(f"{name} {alpha:g}" for name, alpha in target.alphas.items())
        return f"target {target.describe()['target']} (experts' alpha: {alphas})"

    @property
    def alpha(self) -> float | None:
        """The experts' common effective KL weight, or ``None`` when unknown or when they differ."""
        try:
            return self.session.alpha("SMC")
        except DiffusionBlendError:
            return None

    @property
    def supports_smc(self) -> bool:
        return self.smc_unavailable is None

    @torch.no_grad()
    def generate(self, preference: Preference | PreferenceSchedule, method: str, seed: int, prompt: str | None = None,
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
            method = "smc"
            options["smc"] = replace(self.smc, particles=int(particles), proposal_tilt=proposal_tilt)
        result = self.session.generate(
            prompt.strip(), preference, method=method, num_images=self.num_images, seed=int(seed), steps=self.steps,
            guidance_scale=self.guidance_scale, height=self.height, width=self.width, output_type="pt",
            target_alpha=self.target_alpha, routing=self.routing, **options)
        images = result.images.float().cpu()
        prompts = [prompt.strip()] * images.shape[0]
        stats = {name: mean_and_standard_error(fn(images, prompts).detach()) for name, fn in self.rewards.items()}
        cell = max(64, min(256, images.shape[-1]))
        return Generation(image_grid(images, cell=cell), {name: m for name, (m, _) in stats.items()},
                          time.perf_counter() - start, {name: se for name, (_, se) in stats.items()})
