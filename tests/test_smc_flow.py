"""SMC on the blend for flow-matching models (smc.py on FlowMatchSDEScheduler) against closed forms.

Independent truths: the exact rectified-flow velocity of a Gaussian (tests/test_flow_sampling.py's formula) checks
the mixture velocity testbed; a Gaussian base with a linear reward makes the flow SDE's base chain linear-Gaussian, so
the exactly tilted chain (Doob's h-transform) is available in closed form and must get uniform weights; the bimodal
mixture's tilted target is a closed-form mixture whose moments SMC must approach as N grows.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusion_blend.denoisers import BlendedDenoiser
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.preference import BASE, Preference
from diffusion_blend.sampling import FlowMatchSDEScheduler, model_transition, sample
from diffusion_blend.smc import SMCOptions, smc_sample
from diffusion_blend.testbeds.gmm import (
    GaussianMixture,
    MixtureVelocity,
    QuadraticForm,
    combined_reward,
    ideal_family,
    tilted_target,
)
from test_flow_sampling import COV, MEAN, gaussian_velocity
from test_smc import ALPHA, F64, PREFERENCE, bimodal, moments

LEVEL = 1.0  # the flow SDE's noise level (Flow-GRPO's eta)


def sde(shift: float = 1.0) -> FlowMatchSDEScheduler:
    return FlowMatchSDEScheduler(shift=shift, noise_level=LEVEL)


def test_mixture_velocity_is_the_exact_gaussian_velocity() -> None:
    x = torch.randn(9, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    velocity = MixtureVelocity(GaussianMixture([1.0], [MEAN.tolist()], [COV.tolist()]))
    for t in (1000.0, 999.0, 700.0, 250.0, 10.0):
        torch.testing.assert_close(velocity(x, torch.tensor(t)), gaussian_velocity(x, torch.tensor(t)),
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("proposal", ["blend", "twisted"])
def test_smc_on_the_flow_sde_converges_to_the_exact_tilted_target(proposal) -> None:
    """As N grows the output's mean and variance approach p_pre exp(lambda r_w / alpha) (closed form), sampling the
    flow SDE (noise level 1, 50 steps) with exact mixture velocities for the base and the ideal experts.

    Tolerance at N = 64 (400 outputs): |mean error| < 0.15 and |variance error| < 0.2 (target variance 0.92; seeds
    0-3 measured <= 0.06 and <= 0.08 with the blend, 0.06 / 0.01 twisted at seed 0). N = 1 is the proposal alone,
    ~0.9 (blend: its Jensen gap) or ~0.7 (twisted) off in the mean.
    """
    base, rewards = bimodal()
    family = ideal_family(base, rewards, ALPHA, sde())
    reward = combined_reward(rewards, PREFERENCE)
    target_mean, target_variance = moments(tilted_target(base, rewards, PREFERENCE, ALPHA))
    errors = {}
    for n in (1, 8, 64):
        out = smc_sample(
            family,
            PREFERENCE,
            sde(),
            reward=reward,
            alpha=ALPHA,
            generator=0,
            options=SMCOptions(particles=n, proposal=proposal),
            shape=(400, 1),
            num_inference_steps=50,
            eta=LEVEL,
            progress=False,
            dtype=F64,
        )
        samples = out.samples.flatten()
        errors[n] = (abs(float(samples.mean()) - target_mean), abs(float(samples.var()) - target_variance))
    assert errors[1][0] > 0.6  # the proposal alone misses the target by far here
    assert errors[64][0] < errors[8][0] < errors[1][0]
    assert errors[64][0] < 0.15 and errors[64][1] < 0.2, errors


def tilted_flow_chain(steps: int):
    """Gaussian base, linear reward: the flow SDE's base step is ``N(A_k x + b_k, s_k^2)`` (the exact velocity of
    Gaussian data is affine in x, the SDE mean is affine in x and v), so the tilted chain's step is
    ``N(A_k x + b_k + s_k^2 c_{k+1}, s_k^2)`` with ``c_K = (lambda / alpha) a``, ``c_k = A_k^T c_{k+1}`` (Doob's
    h-transform). The mean is affine in the velocity with slope ``m_k`` (shared by all models), so the exact proposal
    is the base velocity plus ``s_k^2 c_{k+1} / m_k``."""
    base = GaussianMixture([1.0], [[0.5, -0.3]], [[[0.6, 0.2], [0.2, 0.4]]])
    rewards = {"right": QuadraticForm.linear_reward([1.0, 0.5]), "other": QuadraticForm.linear_reward([0.0, 1.0])}
    preference = Preference({"right": 1.0}, 1.0)
    scheduler = sde()
    family = ideal_family(base, rewards, ALPHA, scheduler)
    scheduler.set_timesteps(steps)
    base_velocity = family.member(BASE)
    eye, zero = torch.eye(2, dtype=F64), torch.zeros(1, 2, dtype=F64)
    linear, slopes, stds = [], [], []
    for t in scheduler.timesteps:
        mean0, std = model_transition(scheduler, base_velocity(zero, t), t, zero, LEVEL)
        columns = [model_transition(scheduler, base_velocity(e[None], t), t, e[None], LEVEL)[0] - mean0 for e in eye]
        linear.append(torch.cat(columns).T)
        slopes.append(float(model_transition(scheduler, torch.ones(1, 1, dtype=F64), t, zero[:, :1], LEVEL)[0]))
        stds.append(float(std))
    c = [None] * (steps + 1)
    c[steps] = (preference.kl_scale / ALPHA) * rewards["right"].linear
    for k in reversed(range(steps)):
        c[k] = linear[k].T @ c[k + 1]
    index = {float(t): k for k, t in enumerate(scheduler.timesteps)}

    def exact_proposal(x, t, **cond):
        k = index[float(t)]
        return base_velocity(x, t) + stds[k] ** 2 * c[k + 1] / slopes[k]

    assert all(s > 0 for s in stds)
    return family, preference, combined_reward(rewards, preference), exact_proposal


def test_exact_tilted_flow_chain_as_proposal_gives_uniform_weights() -> None:
    steps = 12
    family, preference, reward, exact = tilted_flow_chain(steps)
    latents = torch.randn(40, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    common = dict(reward=reward, alpha=ALPHA, generator=0, latents=latents, num_inference_steps=steps,
                  eta=LEVEL, progress=False, dtype=F64)
    for potential in ("tweedie", "none"):
        out = smc_sample(family, preference, sde(), **common,
                         options=SMCOptions(particles=16, proposal=exact, potential=potential, ess_threshold=0.0))
        assert (out.log_weights + math.log(16)).abs().max() < 1e-8  # uniform final weights in every group
    blend = smc_sample(family, preference, sde(), options=SMCOptions(particles=16, ess_threshold=0.0), **common)
    assert float(blend.final_ess.mean()) < 15.0  # the discrete blend is not the exact tilted chain: weights differ


def test_one_particle_is_the_blend_on_the_flow_sde() -> None:
    base, rewards = bimodal()
    family = ideal_family(base, rewards, ALPHA, sde())
    common = dict(reward=combined_reward(rewards, PREFERENCE), alpha=ALPHA, generator=4,
                  options=SMCOptions(particles=1), shape=(16, 1), num_inference_steps=6, eta=LEVEL, progress=False,
                  dtype=F64)
    out = smc_sample(family, PREFERENCE, sde(), **common)
    blend = sample(BlendedDenoiser(family, PREFERENCE), sde(), generator=4, shape=(16, 1), num_inference_steps=6,
                   eta=LEVEL, record_trajectory=True, progress=False, dtype=F64).samples
    assert torch.equal(out.samples, blend)
    # a separate step-noise stream: x_T still from the generator, the steps from noise_generator
    split = smc_sample(family, PREFERENCE, sde(), **common, noise_generator=torch.Generator().manual_seed(99))
    assert not torch.equal(split.samples, blend)


def test_deterministic_flow_samplers_are_refused_in_one_line() -> None:
    base, rewards = bimodal()
    family = ideal_family(base, rewards, ALPHA, sde())
    common = dict(reward=combined_reward(rewards, PREFERENCE), alpha=ALPHA, generator=0, shape=(2, 1),
                  num_inference_steps=4, progress=False)
    with pytest.raises(DiffusionBlendError, match="Euler ODE.*FlowMatchSDEScheduler") as info:
        smc_sample(family, PREFERENCE, FlowMatchEulerDiscreteScheduler(), **common)
    assert "\n" not in str(info.value)
    with pytest.raises(DiffusionBlendError, match="noise level 0"):
        smc_sample(family, PREFERENCE, sde(), eta=0.0, **common)
