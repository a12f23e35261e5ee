"""RGG: reward-gradient guidance, DPS style (Chung et al. 2023; paper section 5.3), for differentiable rewards.

Every step takes the ordinary stochastic sampler step with the unchanged denoiser and adds a reward-gradient term:

    x_{t-1} = step(eps, x_t) + lambda_i * s * sigma_t^2 * g,
    g = kl_scale * sum_i w_i normalize?( grad_{x_t} r_i(decode(x0_hat(x_t))) / alpha ),

with ``sigma_t`` the step's noise standard deviation (``eta * sqrt(variance)`` for DDIM, so ``sigma_t^2`` is the
paper's ``eta^2 sigma_t^2``), ``s`` a guidance scale (``do_guidance`` in the reference, default 1) and
``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (Tweedie). The noise prediction is detached: gradients
flow only through the explicit ``x_t`` dependence, so ``dx0_hat / dx_t = 1 / sqrt(abar_t)`` (no backpropagation
through the network). Adding ``sigma_t^2 grad log h`` to the transition mean is the Doob transform towards
``p_pre exp(kl_scale r_w / alpha)``, with ``log h ≈ kl_scale r_w(x0_hat) / alpha`` (Jensen / DPS approximation).
On flow-matching models the same term is added to the flow SDE's step (``sigma_t``: its standard deviation,
``x0_hat = x_s - s v``; :func:`~diffusion_blend.sampling.model_transition`).

Options as in the reference: ``normalize_gradient`` L2-normalises each reward's gradient along dim 1 (the latent
channels per pixel for images; the whole vector for ``(B, d)`` data); ``tempering`` multiplies step ``i`` by
``lambda_i = min((1 + gamma)^i - 1, 1)``, ``gamma = 0.024`` (0 at step 0, 1 from step 30 on).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusion_blend.baselines.code import BaselineOutput, Decode
from diffusion_blend.denoisers import Denoiser
from diffusion_blend.errors import DiffusionBlendError, RewardError
from diffusion_blend.preference import Preference
from diffusion_blend.rewards.weighted import active_rewards, call_reward
from diffusion_blend.sampling import (
    as_generator,
    initial_latents,
    model_transition,
    step_kwargs,
    tweedie_x0,
)


def tempering_schedule(step_index: int, gamma: float = 0.024) -> float:
    """``lambda_i = min((1 + gamma)^i - 1, 1)`` (paper section 5.3)."""
    return min((1.0 + gamma) ** step_index - 1.0, 1.0)


def check_differentiable(rewards: Mapping[str, Callable[..., torch.Tensor]], names: Sequence[str]) -> None:
    """Refuse rewards that declare ``differentiable = False`` (e.g. JPEG compressibility)."""
    flat = [name for name in names if getattr(rewards[name], "differentiable", True) is False]
    if flat:
        raise RewardError(
            f"reward-gradient guidance needs differentiable rewards; {', '.join(map(repr, flat))} "
            "is not (Reward.differentiable is False): use CoDe or the blend instead"
        )


def reward_gradient(
    reward: Callable[..., torch.Tensor],
    name: str,
    scheduler: Any,
    model_output: torch.Tensor,
    t: Any,
    x_t: torch.Tensor,
    decode: Decode,
    prompts: Sequence[str] | None,
) -> torch.Tensor:
    """``grad_{x_t} sum_b r(decode(x0_hat(x_t)))_b`` through the explicit ``x_t`` dependence only (the network's
    output detached); ``x0_hat`` is Tweedie's estimate, or ``x_s - s v`` on flow-matching schedulers."""
    with torch.enable_grad():
        x_req = x_t.detach().requires_grad_(True)
        values = call_reward(reward, decode(tweedie_x0(scheduler, model_output.detach(), t, x_req)), prompts)
        if not values.requires_grad:
            raise RewardError(f"reward {name!r} returned values without a gradient: it is not differentiable")
        (gradient,) = torch.autograd.grad(values.sum(), x_req)
    return gradient


@torch.no_grad()
def guided_sample(
    denoiser: Denoiser,
    scheduler: Any,
    *,
    rewards: Mapping[str, Callable[..., torch.Tensor]],
    preference: Preference,
    alpha: float,
    generator: torch.Generator | int,
    decode: Decode | None = None,
    shape: tuple[int, ...] | None = None,
    latents: torch.Tensor | None = None,
    num_inference_steps: int = 50,
    eta: float = 1.0,
    guidance_scale: float = 1.0,
    normalize_gradient: bool = False,
    tempering: bool = True,
    tempering_gamma: float = 0.024,
    cond: Mapping[str, Any] | None = None,
    prompts: Sequence[str] | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BaselineOutput:
    """Sample with reward-gradient guidance (module docstring). Zero scale (or ``kl_scale = 0``) is plain sampling."""
    if not (alpha > 0 and math.isfinite(alpha)):
        raise DiffusionBlendError(f"alpha (the KL weight) must be > 0, got {alpha}")
    if not math.isfinite(guidance_scale):
        raise DiffusionBlendError(f"guidance_scale must be finite, got {guidance_scale}")
    active = active_rewards(rewards, preference)
    check_differentiable(rewards, [name for name, _ in active])
    decode = decode or (lambda x: x)
    generator = as_generator(generator)
    cond = dict(cond or {})
    x = initial_latents(scheduler, generator, shape, latents, device, dtype)
    if prompts is not None and len(prompts) != x.shape[0]:
        raise DiffusionBlendError(f"{len(prompts)} prompts for a batch of {x.shape[0]}")
    scheduler.set_timesteps(num_inference_steps, device=x.device)
    scheduler_kwargs = step_kwargs(scheduler, eta, generator)
    network_steps = reward_calls = 0
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="RGG", disable=not progress, leave=False)):
        model_output = denoiser(scheduler.scale_model_input(x, t), t, **cond)
        network_steps += 1
        scale = guidance_scale * preference.kl_scale * (tempering_schedule(i, tempering_gamma) if tempering else 1.0)
        x_prev = scheduler.step(model_output, t, x, **scheduler_kwargs).prev_sample
        if scale == 0.0:
            x = x_prev
            continue
        _, std = model_transition(scheduler, model_output, t, x, eta)
        if float(std) == 0.0:
            x = x_prev
            continue
        guidance = torch.zeros_like(x)
        for name, weight in active:
            gradient = reward_gradient(rewards[name], name, scheduler, model_output, t, x, decode, prompts) / alpha
            if normalize_gradient:
                gradient = F.normalize(gradient, dim=1)
            guidance = guidance + weight * gradient
            reward_calls += 1
        x = x_prev + scale * std**2 * guidance
    return BaselineOutput(samples=x, network_evaluations=float(network_steps), reward_evaluations=float(reward_calls))
