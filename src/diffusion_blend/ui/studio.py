"""What the UI drives: a model with one LoRA adapter per basis reward, and those rewards.

A :class:`Studio` turns (preference, method, seed, prompt) into images and each basis reward's mean score. The UI
knows nothing else about models, so the digits default and Stable Diffusion bases plug in the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

from diffusion_blend.denoisers import make_denoiser
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.evaluation.stats import mean_and_standard_error
from diffusion_blend.lora import Forward, LoraFamily
from diffusion_blend.preference import Preference, PreferenceSchedule
from diffusion_blend.sampling import sample, timestep_progress
from diffusion_blend.smc import SMCOptions, smc_sample

RewardFn = Callable[[torch.Tensor, Sequence[str] | None], torch.Tensor]


@dataclass
class Generation:
    images: np.ndarray  # one uint8 grid image (H, W, 3) for display
    scores: dict[str, float]  # mean reward per basis reward
    seconds: float  # generation wall time (sampling + scoring)
    standard_errors: dict[str, float] | None = None  # standard error of each mean (over the generated images)



class Studio(Protocol):
    reward_names: tuple[str, ...]
    text_conditioned: bool
    description: str

    def generate(self, preference: Preference, method: str, seed: int, prompt: str | None) -> Generation:
        """Samples for ``preference``; a studio with ``supports_smc`` also takes ``particles=N`` and
        ``proposal_tilt`` (SMC on the blend)."""


def image_grid(images: torch.Tensor, columns: int | None = None, cell: int = 64) -> np.ndarray:
    """``(B, C, H, W)`` in ``[0, 1]`` -> one uint8 RGB grid, each image upscaled (nearest) to ``cell`` pixels."""
    images = images.detach().float().clamp(0, 1).cpu()
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    images = torch.nn.functional.interpolate(images[:, :3], size=(cell, cell), mode="nearest")
    count = images.shape[0]
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    pad = 2
    grid = torch.ones(3, rows * (cell + pad) + pad, columns * (cell + pad) + pad)
    for index in range(count):
        r, c = divmod(index, columns)
        top, left = pad + r * (cell + pad), pad + c * (cell + pad)
        grid[:, top : top + cell, left : left + cell] = images[index]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class LoraStudio:
    """Unconditional (or fixed-conditioning) models carrying LoRA experts: the digits default.

    Every generation uses the same seeds for the same ``seed`` value, so moving a slider shows the same samples
    changing, not new ones.
    """

    text_conditioned = False

    def __init__(
        self,
        model: torch.nn.Module,
        forward: Forward,
        scheduler: Any,
        sample_shape: tuple[int, ...],
        rewards: Mapping[str, RewardFn],
        *,
        decode: Callable[[torch.Tensor], torch.Tensor],
        num_images: int = 16,
        num_inference_steps: int = 50,
        eta: float = 1.0,
        description: str = "",
        alpha: float | None = None,
        smc: SMCOptions | None = None,
    ):
        self.family = LoraFamily(model.eval(), forward, expert_names=list(rewards))
        self.reward_names = tuple(rewards)
        self.rewards = dict(rewards)
        self.scheduler = scheduler
        self.sample_shape = tuple(sample_shape)
        self.decode = decode
        self.num_images = num_images
        self.num_inference_steps = num_inference_steps
        self.eta = eta
        self.description = description
        self.alpha = alpha  # the experts' KL weight: needed by SMC's target p_pre exp(lambda r_w / alpha)
        self.smc = smc or SMCOptions()  # the page's sliders set particles and the proposal tilt

    @property
    def supports_smc(self) -> bool:
        return self.alpha is not None

    @property
    def smc_unavailable(self) -> str | None:
        """Why SMC is off (the experts' KL weight alpha unknown), or ``None`` when it runs."""
        if self.supports_smc:
            return None
        return "SMC needs the experts' KL weight alpha, which these adapters do not state"

    @torch.no_grad()
    def generate(self, preference: Preference | PreferenceSchedule, method: str, seed: int, prompt: str | None = None,
                 particles: int = 1, proposal_tilt: float | str = "auto") -> Generation:
        """``particles > 1``: SMC on the blend (``diffusion_blend.smc``; DB-MPA proposal, ``proposal_tilt``:
        ``"auto"`` or ``t`` for the blend at ``t x lambda``) instead of plain sampling."""
        start = time.perf_counter()
        if particles > 1:
            if method != "mpa" or not self.supports_smc:
                raise DiffusionBlendError("SMC particles > 1 need method DB-MPA (its proposal) and the experts' alpha")

            def r_w(x: torch.Tensor) -> torch.Tensor:
                images = self.decode(x)
                return sum(w * self.rewards[n](images, None).double() for n, w in preference.weights.items() if w)

            samples = smc_sample(
                self.family,
                preference,
                self.scheduler,
                reward=r_w,
                alpha=self.alpha,
                options=replace(self.smc, particles=int(particles), proposal_tilt=proposal_tilt),
                generator=seed,
                shape=(self.num_images, *self.sample_shape),
                num_inference_steps=self.num_inference_steps,
                eta=self.eta,
                progress=False,
            ).samples
        else:
            denoiser = make_denoiser(self.family, preference, method, generator=seed + 1_000_003,
                                     progress=timestep_progress(self.scheduler))
            samples = sample(
                denoiser, self.scheduler, generator=seed, shape=(self.num_images, *self.sample_shape),
                num_inference_steps=self.num_inference_steps, eta=self.eta, progress=False,
            ).samples
        images = self.decode(samples)
        stats = {name: mean_and_standard_error(fn(images, None).detach()) for name, fn in self.rewards.items()}
        return Generation(image_grid(images), {name: m for name, (m, _) in stats.items()}, time.perf_counter() - start,
                          {name: se for name, (_, se) in stats.items()})
