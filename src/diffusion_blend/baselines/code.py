"""CoDe: blockwise best-of-N sampling with a look-ahead reward (Singh et al. 2025; paper section 5.2).

The sampler is the scheduler's own reverse process with an unchanged denoiser (the pre-trained model in the paper).
At every selection step ``i`` (``i % block_size == 0`` and not the last step; with 50 steps and block 5:
``i = 0, 5, ..., 45``) each sample draws ``num_candidates`` next states ``x_{t-1}`` with the ordinary stochastic
step from the same noise prediction, runs the denoiser on every candidate at the next timestep, takes the Tweedie
estimate ``x0_hat = (x - sqrt(1 - abar) eps) / sqrt(abar)`` (the scheduler's ``pred_original_sample``), decodes it,
scores the weighted reward ``r_w = sum_i w_i r_i`` and keeps one candidate. The kept candidate's look-ahead
prediction is exactly the prediction the next step needs, so it is reused: a selection step costs
``num_candidates`` network evaluations per sample instead of 1, i.e. ``steps + n_selections (N - 1)`` in all.

The KL scale lambda: with ``selection="argmax"`` (the paper's CoDe) the argmax of ``r_w`` does not depend on
lambda, so lambda has no effect; the strength is set by ``num_candidates`` and ``block_size``. With
``selection="softmax"`` the candidate is drawn with probability ``∝ exp(lambda r_w / alpha)``: importance
resampling towards the paper's target ``p_pre exp(lambda r_w / alpha)``, so lambda acts as an inverse temperature
(``lambda = 0`` picks uniformly, i.e. plain sampling in distribution).

A reward is any callable ``reward(images)`` or ``reward(images, prompts)`` (with ``prompts`` given) returning one
value per row, e.g. a registered :class:`~diffusion_blend.rewards.base.Reward`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion_blend.denoisers import Denoiser, repeat_rows
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.preference import Preference
from diffusion_blend.rewards.weighted import active_rewards, weighted_reward_scores
from diffusion_blend.sampling import (
    as_generator,
    initial_latents,
    step_kwargs,
    tweedie_x0,
)

Decode = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BaselineOutput:
    """Samples and their cost: network and basis-reward evaluations per sample, averaged over the batch."""

    samples: torch.Tensor
    network_evaluations: float
    reward_evaluations: float
    selection_steps: int = 0



def selection_steps(num_inference_steps: int, block_size: int) -> list[int]:
    """Step indices where CoDe selects: ``i % block_size == 0`` except the last step (paper section 5.2)."""
    return [i for i in range(num_inference_steps - 1) if i % block_size == 0]



@torch.no_grad()
def code_sample(
    denoiser: Denoiser,
    scheduler: Any,
    *,
    rewards: Mapping[str, Callable[..., torch.Tensor]],
    preference: Preference,
    generator: torch.Generator | int,
    decode: Decode | None = None,
    shape: tuple[int, ...] | None = None,
    latents: torch.Tensor | None = None,
    num_inference_steps: int = 50,
    eta: float = 1.0,
    num_candidates: int = 20,
    block_size: int = 5,
    selection: str = "argmax",
    alpha: float | None = None,
    cond: Mapping[str, Any] | None = None,
    prompts: Sequence[str] | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BaselineOutput:
    """Sample with CoDe (module docstring). ``num_candidates = 1`` is plain sampling with the same seed."""
    if int(num_candidates) < 1 or int(block_size) < 1:
        raise DiffusionBlendError(f"num_candidates and block_size must be >= 1, got {num_candidates} and {block_size}")
    if selection not in ("argmax", "softmax"):
        raise DiffusionBlendError(f"unknown CoDe selection {selection!r}; choose 'argmax' or 'softmax'")
    if selection == "softmax" and not (alpha is not None and alpha > 0 and math.isfinite(alpha)):
        raise DiffusionBlendError(
            "softmax selection needs the experts' KL weight alpha > 0 (temperature alpha / lambda)"
        )
    active_rewards(rewards, preference)
    decode = decode or (lambda x: x)
    generator = as_generator(generator)
    cond = dict(cond or {})
    x = initial_latents(scheduler, generator, shape, latents, device, dtype)
    batch, n = x.shape[0], int(num_candidates)
    if prompts is not None and len(prompts) != batch:
        raise DiffusionBlendError(f"{len(prompts)} prompts for a batch of {batch}")
    scheduler.set_timesteps(num_inference_steps, device=x.device)
    scheduler_kwargs = step_kwargs(scheduler, eta, generator)
    selecting = set(selection_steps(len(scheduler.timesteps), int(block_size)))
    timesteps = list(scheduler.timesteps)
    network_rows = reward_rows = 0
    n_active = len(active_rewards(rewards, preference))
    cached: torch.Tensor | None = None
    rows = torch.arange(batch, device=x.device)
    for i, t in enumerate(tqdm(timesteps, desc="CoDe", disable=not progress, leave=False)):
        if cached is None:
            model_output = denoiser(scheduler.scale_model_input(x, t), t, **cond)
            network_rows += batch
        else:
            model_output, cached = cached, None
        if i not in selecting:
            x = scheduler.step(model_output, t, x, **scheduler_kwargs).prev_sample
            continue
        candidates = scheduler.step(
            model_output.repeat(n, *([1] * (x.ndim - 1))), t, x.repeat(n, *([1] * (x.ndim - 1))), **scheduler_kwargs
        ).prev_sample  # candidate-major rows: [c_0 b_0..b_B-1, c_1 ...]
        t_next = timesteps[i + 1]
        look_ahead = denoiser(scheduler.scale_model_input(candidates, t_next), t_next, **repeat_rows(cond, n, batch))
        network_rows += n * batch
        images = decode(tweedie_x0(scheduler, look_ahead, t_next, candidates))
        scores = weighted_reward_scores(rewards, preference, images, None if prompts is None else list(prompts) * n)
        reward_rows += n * batch * n_active
        scores = scores.view(n, batch)
        if selection == "argmax" or n == 1:
            chosen = scores.argmax(0)
        else:
            logits = (preference.kl_scale / alpha) * scores.T  # (batch, n)
            chosen = torch.multinomial(torch.softmax(logits, 1).cpu(), 1, generator=generator).flatten().to(x.device)
        x = candidates.view(n, batch, *x.shape[1:])[chosen, rows]
        cached = look_ahead.view(n, batch, *look_ahead.shape[1:])[chosen, rows]
    return BaselineOutput(
        samples=x,
        network_evaluations=network_rows / batch,
        reward_evaluations=reward_rows / batch,
        selection_steps=len(selecting),
    )
