"""The flow SDE sampler (Flow-GRPO's marginal-preserving SDE) against closed forms and the reference formula.

Independent truths: Gaussian data ``x_0 ~ N(m, S)`` has the exact rectified-flow velocity in closed form
(``x_s ~ N((1 - s) m, (1 - s)^2 S + s^2 I)``); the SDE step is Flow-GRPO's ``sde_step_with_logprob`` written out
by hand below; diffusers' own ``FlowMatchEulerDiscreteScheduler.step``.
"""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.sampling import (
    FlowMatchSDEScheduler,
    flow_transition,
    gaussian_log_prob,
    make_scheduler,
    model_transition,
    sample,
    score_estimate,
    to_epsilon,
    transition_distribution,
)

MEAN = torch.tensor([1.0, -0.5], dtype=torch.float64)
COV = torch.tensor([[2.0, 0.8], [0.8, 0.5]], dtype=torch.float64)


def gaussian_velocity(x, t):
    """Exact ``E[eps - x_0 | x_s]`` for ``x_0 ~ N(MEAN, COV)``, ``x_s = (1 - s) x_0 + s eps`` (s = t / 1000)."""
    s = float(t) / 1000
    cov_s = (1 - s) ** 2 * COV + s**2 * torch.eye(2, dtype=torch.float64)
    solved = torch.linalg.solve(cov_s, (x.double() - (1 - s) * MEAN).T).T  # C^-1 (x - (1 - s) m)
    x0 = MEAN + (1 - s) * solved @ COV.T
    eps = s * solved
    return (eps - x0).to(x.dtype)


def moments(x):
    x = x.double()
    return x.mean(0), torch.cov(x.T)


def reference_sde_step(scheduler, v, t, x, noise_level):
    """Flow-GRPO ``sde_step_with_logprob`` (sde_type='sde'), transcribed: returns (mean, std of the step)."""
    index = int((scheduler.timesteps == t).nonzero()[0])
    sigma, sigma_prev = scheduler.sigmas[index].double(), scheduler.sigmas[index + 1].double()
    sigma_max = scheduler.sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t * torch.sqrt(-1 * dt)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("noise_level", [0.0, 0.7, 1.0])
def test_sde_step_matches_flow_grpo_formula_and_scheduler_step(shift, noise_level):
    scheduler = FlowMatchSDEScheduler(shift=shift, noise_level=noise_level)
    scheduler.set_timesteps(12)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for k, t in enumerate(scheduler.timesteps):
        v = torch.sin(3 * x) + 0.1 * k
        mean, std = flow_transition(scheduler, v, t, x, noise_level)
        ref_mean, ref_std = reference_sde_step(scheduler, v, t, x, noise_level)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(std.double(), ref_std, rtol=1e-12, atol=1e-12)
        assert math.isfinite(float(std))  # sigma = 1 uses sigmas[1] in the denominator, as Flow-GRPO
        stepped = scheduler.step(v, t, x, generator=torch.Generator().manual_seed(k)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float32)
        torch.testing.assert_close(stepped, (mean + std * noise.double()), rtol=1e-5, atol=1e-5)
        x = stepped


def test_sde_at_noise_level_zero_is_diffusers_euler_ode():
    ode, sde = FlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchSDEScheduler(shift=3.0, noise_level=0.0)
    out_ode = sample(gaussian_velocity, ode, generator=1, shape=(64, 2), num_inference_steps=20, progress=False)
    out_sde = sample(gaussian_velocity, sde, generator=1, shape=(64, 2), num_inference_steps=20, eta=0.0,
                     progress=False)
    torch.testing.assert_close(out_sde.samples, out_ode.samples, rtol=1e-5, atol=1e-5)


def test_sde_keeps_the_flow_marginals_at_noise_levels_0_and_0_7():
    """Bar of issue 12: with the exact velocity, eta = 0 (ODE) and eta = 0.7 give the data's mean and covariance.

    N = 20,000 samples, 400 steps (shift 3, as SD3): standard errors are about 0.01 on the means and 0.02 on the
    largest covariance entry; the tolerance is 5 standard errors plus the Euler discretisation error."""
    n = 20_000
    results = {}
    for eta in (0.0, 0.7):
        scheduler = FlowMatchSDEScheduler(shift=3.0)
        out = sample(gaussian_velocity, scheduler, generator=7, shape=(n, 2), num_inference_steps=400, eta=eta,
                     progress=False, dtype=torch.float64)
        results[eta] = moments(out.samples)
    se_mean = (torch.diagonal(COV) / n).sqrt()
    se_cov = ((COV**2 + torch.outer(torch.diagonal(COV), torch.diagonal(COV))) / n).sqrt()
    for mean, cov in results.values():
        assert ((mean - MEAN).abs() <= 5 * se_mean).all(), mean
        assert ((cov - COV).abs() <= 5 * se_cov + 0.02).all(), cov
    (mean0, cov0), (mean7, cov7) = results[0.0], results[0.7]
    assert ((mean0 - mean7).abs() <= 5 * math.sqrt(2) * se_mean).all()
    assert ((cov0 - cov7).abs() <= 5 * math.sqrt(2) * se_cov + 0.02).all()


def test_diffusers_stochastic_sampling_does_not_keep_the_marginals():
    """diffusers' ``stochastic_sampling=True`` re-noises the posterior MEAN ``x0_hat``: the data variance is lost
    (measured: about half of it remains, docs/method.md), so DB-MPA-LS must not run on it."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    out = sample(gaussian_velocity, scheduler, generator=3, shape=(20_000, 2), num_inference_steps=200,
                 progress=False, dtype=torch.float64)
    _, cov = moments(out.samples)
    assert cov[0, 0] < 0.7 * COV[0, 0] and cov[1, 1] < 0.7 * COV[1, 1]


def test_model_transition_dispatches_to_each_sampler():
    ddim = make_scheduler("ddim", prediction_type="v_prediction")
    ddim.set_timesteps(10)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    out = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    t = ddim.timesteps[3]
    for got, want in zip(model_transition(ddim, out, t, x, 0.6),
                         transition_distribution(ddim, to_epsilon(ddim, out, t, x), t, x, 0.6)):
        torch.testing.assert_close(got, want)
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(6)
    t = euler.timesteps[2]
    mean, std = model_transition(euler, out, t, x)
    assert float(std) == 0.0
    torch.testing.assert_close(mean, euler.step(out, t, x).prev_sample)
    stochastic = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    stochastic.set_timesteps(6)
    t = stochastic.timesteps[2]
    mean, std = model_transition(stochastic, out, t, x)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    expected = stochastic.step(out, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
    torch.testing.assert_close(mean + std * noise, expected)


def test_flow_trajectory_log_probs_are_the_gaussian_steps():
    scheduler = FlowMatchSDEScheduler(shift=3.0)
    out = sample(gaussian_velocity, scheduler, generator=2, shape=(4, 2), num_inference_steps=8, eta=0.7,
                 record_trajectory=True, progress=False)
    traj = out.trajectory
    assert (traj.stds > 0).all()  # every step is stochastic, the last one included
    for k, t in enumerate(traj.timesteps):
        mean, std = reference_sde_step(scheduler, gaussian_velocity(traj.latents[k], t), t, traj.latents[k], 0.7)
        normal = torch.distributions.Normal(mean, std)
        expected = normal.log_prob(traj.latents[k + 1].double()).sum(1)
        torch.testing.assert_close(traj.log_probs[k].double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gaussian_log_prob(traj.latents[1], traj.latents[1], traj.stds[0]),
                               torch.full((4,), -2 * (math.log(float(traj.stds[0])) + 0.5 * math.log(2 * math.pi))))


def test_sde_scheduler_config_round_trip_and_refusals(tmp_path):
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    sde = FlowMatchSDEScheduler.from_config(stock.config, noise_level=0.5)
    assert sde.config.shift == 3.0 and sde.config.noise_level == 0.5
    sde.save_config(tmp_path)
    again = FlowMatchSDEScheduler.from_pretrained(tmp_path)
    assert again.config.noise_level == 0.5 and again.config.shift == 3.0
    stock.set_timesteps(7)
    again.set_timesteps(7)
    torch.testing.assert_close(again.sigmas, stock.sigmas)
    with pytest.raises(DiffusionBlendError, match="noise_level"):
        FlowMatchSDEScheduler(noise_level=-1)
    with pytest.raises(DiffusionBlendError, match="stochastic"):
        FlowMatchSDEScheduler(stochastic_sampling=True)
    with pytest.raises(DiffusionBlendError, match="eta"):
        flow_transition(again, torch.zeros(1, 2), again.timesteps[0], torch.zeros(1, 2), float("nan"))


def test_score_estimate_of_the_exact_velocity_is_the_exact_score():
    """``x_s ~ N((1 - s) m, (1 - s)^2 S + s^2 I)`` has the score ``-C_s^-1 (x - (1 - s) m)``; the exact velocity of
    the same data must give it back through the rectified-flow relation."""
    scheduler = FlowMatchSDEScheduler()
    scheduler.set_timesteps(10)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in scheduler.timesteps:
        s = float(t) / 1000
        cov_s = (1 - s) ** 2 * COV + s**2 * torch.eye(2, dtype=torch.float64)
        score = -torch.linalg.solve(cov_s, (x - (1 - s) * MEAN).T).T
        torch.testing.assert_close(score_estimate(scheduler, gaussian_velocity(x, t), t, x), score)
