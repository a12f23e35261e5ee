"""The UI's Stable Diffusion studio: a base pipeline with one LoRA expert per basis reward (paper section 5).

:class:`StableDiffusionStudio` implements the :class:`~diffusion_blend.ui.studio.Studio` protocol with
:class:`~diffusion_blend.pipelines.BlendStableDiffusionPipeline`: ``generate(preference, method, seed, prompt)``
samples ``num_images`` images for the prompt (DB-MPA or DB-MPA-LS, DDIM ``eta = 1`` by default, one generator
seeded with ``seed``: the same seed gives the same initial noise whatever the sliders say) and scores them with
each adapter's basis reward. An adapter's reward comes from an explicit mapping (``--reward NAME=REWARD``) or
else from our metadata in the LoRA file's header (written by ``dblend finetune --target sd``); when that
metadata is present its base fingerprint must match the loaded UNet (checked when the base is loaded in
float32, the dtype adapters are trained and fingerprinted in).

SMC on the blend (the UI's particles control, ``generate(..., particles=N)``; ``diffusion_blend.smc`` through the
pipeline's ``method="smc"``) needs the experts' KL weight ``alpha`` for its target ``p_pre exp(lambda r_w / alpha)``:
it is read from every adapter's metadata (the effective ``alpha / v`` of an expert fine-tuned on ``v x`` its reward,
as ``dblend evaluate --setting sd`` reads it), or for files without it from ``alpha`` (``dblend ui --alpha``); when
one is unknown or the experts' alphas differ, the studio has no SMC (the control then refuses with one line).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from ..baselines.code import weighted_reward_scores
from ..errors import DiffusionBlendError
from ..evaluation.stats import mean_and_standard_error
from ..pipelines import BlendStableDiffusionPipeline
from ..pipelines.experts import expert_rewards_and_alpha
from ..preference import Preference
from ..rewards import get_reward
from .studio import Generation, RewardFn, image_grid


class StableDiffusionStudio:
    """Text-to-image studio over one SD base and its LoRA experts (see the module docstring)."""

    text_conditioned = True

    def __init__(
        self,
        pipe: BlendStableDiffusionPipeline,
        rewards: Mapping[str, RewardFn],
        *,
        num_images: int = 4,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 1.0,
        resolution: int | None = None,
        description: str = "",
        alpha: float | None = None,
    ):
        missing = sorted(set(rewards) - set(pipe.adapter_names))
        if missing:
            raise DiffusionBlendError(f"no adapter loaded for reward slider(s) {', '.join(missing)}")
        if not rewards:
            raise DiffusionBlendError("the studio needs at least one adapter with its reward")
        for value, what in ((num_images, "number of images"), (num_inference_steps, "number of steps")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffusionBlendError(f"{what} must be a positive integer, got {value!r}")
        self.pipe = pipe
        self.rewards = dict(rewards)
        self.reward_names = tuple(rewards)
        self.num_images = num_images
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        self.eta = float(eta)
        self.resolution = resolution
        self.alpha = alpha  # the experts' common KL weight (SMC's target); None: no SMC
        self.description = description or (
            f"Stable Diffusion base with experts {', '.join(self.reward_names)}; {num_images} images per prompt, "
            f"DDIM eta={eta:g}, {num_inference_steps} steps, guidance {guidance_scale:g}; same seed = same noise.")

    @property
    def supports_smc(self) -> bool:
        return self.alpha is not None

    @torch.no_grad()
    def generate(self, preference: Preference, method: str, seed: int, prompt: str | None = None,
                 particles: int = 1, proposal_tilt: float = 1.0) -> Generation:
        """Images for ``prompt`` under ``preference`` (paper eq. for DB-MPA / DB-MPA-LS) and each reward's mean;
        ``particles > 1``: SMC on the blend (DB-MPA proposal at ``proposal_tilt x lambda``, Tweedie potential) with
        that many particles per image."""
        if not prompt or not prompt.strip():
            raise DiffusionBlendError("enter a prompt")
        start = time.perf_counter()
        device = self.pipe.blend_model.device
        eta = {"eta": self.eta} if self.pipe.blend_component == "unet" else {}  # flow: the SDE scheduler's level
        common = dict(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                      height=self.resolution, width=self.resolution, output_type="pt", preference=preference, **eta)
        if particles > 1:
            if method != "mpa" or not self.supports_smc:
                raise DiffusionBlendError("SMC particles > 1 need method DB-MPA (its proposal) and the experts' alpha "
                                          "(from their metadata)")

            def r_w(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
                return weighted_reward_scores(self.rewards, preference, images, prompts)

            output = self.pipe([prompt.strip()] * self.num_images, method="smc", reward=r_w, alpha=self.alpha,
                               particles=int(particles), proposal_tilt=float(proposal_tilt), generator=int(seed),
                               **common)
        else:
            output = self.pipe(prompt.strip(), num_images_per_prompt=self.num_images, method=method,
                               generator=torch.Generator(device).manual_seed(int(seed)), **common)
        images = output.images.float().cpu()
        prompts = [prompt.strip()] * images.shape[0]
        stats = {name: mean_and_standard_error(fn(images, prompts).detach()) for name, fn in self.rewards.items()}
        cell = max(64, min(256, images.shape[-1]))
        return Generation(image_grid(images, cell=cell), {name: m for name, (m, _) in stats.items()},
                          time.perf_counter() - start, {name: se for name, (_, se) in stats.items()})


def stable_diffusion_studio(
    base: str | os.PathLike,
    adapters: Mapping[str, str | os.PathLike],
    *,
    reward_names: Mapping[str, str] | None = None,
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    num_images: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 1.0,
    resolution: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    alpha: float | None = None,
) -> StableDiffusionStudio:
    """Load the base, every adapter, and each adapter's basis reward.

    The pipeline class comes from the base folder's ``model_index.json`` (Stable Diffusion 1.x/2.x, SD3/3.5 or
    FLUX). SD samples with DDIM (``eta``) from its scheduler config; SD3/FLUX with the Flow-GRPO SDE
    (:class:`~diffusion_blend.sampling.FlowMatchSDEScheduler`, noise level ``eta``), which DB-MPA-LS needs.
    """
    from diffusers import DDIMScheduler

    from ..pipelines.loading import FLOW_KINDS, load_blend_pipeline, pipeline_kind
    from ..sampling import FlowMatchSDEScheduler

    if not adapters:
        raise DiffusionBlendError("give the experts to blend with --adapter NAME=PATH (one per basis reward)")
    kind = pipeline_kind(base)
    if kind == "sdxl":
        raise DiffusionBlendError(f"{base} is an SDXL pipeline; the UI's studio serves Stable Diffusion 1.x/2.x, "
                                  "SD3/3.5 and FLUX")
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "sd" else {}
    pipe = load_blend_pipeline(base, kind, dtype=dtype, **extra)
    chosen, alpha = expert_rewards_and_alpha(pipe, adapters, reward_names, alpha)  # ``alpha``: foreign files
    options = dict(reward_options or {})
    rewards = {name: get_reward(reward, **dict(options.get(reward, {}))) for name, reward in chosen.items()}
    pipe.load_adapters(adapters)
    if kind in FLOW_KINDS:
        pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=eta)
    else:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    return StableDiffusionStudio(pipe, rewards, num_images=num_images, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, eta=eta, resolution=resolution, alpha=alpha)
