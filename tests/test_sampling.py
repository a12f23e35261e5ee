"""Sampling loop and per-step Gaussian transitions against diffusers' own scheduler.step."""

import pytest
import torch
from torch.distributions import Normal

from diffusion_blend.sampling import (
    as_generator,
    gaussian_log_prob,
    make_scheduler,
    sample,
    score_estimate,
    to_epsilon,
    transition_distribution,
)


def denoiser(x, t):
    return torch.sin(x) * 0.5 + 0.001 * int(t)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_transition_matches_scheduler_step(eta, set_alpha_to_one):
    scheduler = make_scheduler("ddim", set_alpha_to_one=set_alpha_to_one)
    scheduler.set_timesteps(25)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=gen)
    for t in scheduler.timesteps:
        eps = denoiser(x, t)
        noise = torch.randn(x.shape, generator=gen)
        mean, std = transition_distribution(scheduler, eps, t, x, eta)
        expected = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(mean + std * noise, expected, rtol=1e-5, atol=1e-5)
        x = expected


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_transition_matches_scheduler_step(variance_type):
    scheduler = make_scheduler("ddpm", variance_type=variance_type)
    scheduler.set_timesteps(40)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    for t in scheduler.timesteps:
        eps = denoiser(x, t)
        mean, std = transition_distribution(scheduler, eps, t, x)
        expected = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))
        torch.testing.assert_close(mean + std * noise, expected, rtol=1e-5, atol=1e-5)
        x = expected


def test_clip_sample_is_mirrored():
    scheduler = make_scheduler("ddim", clip_sample=True)
    scheduler.set_timesteps(10)
    x, noise = torch.full((2, 2), 5.0), torch.zeros(2, 2)
    t = scheduler.timesteps[-2]
    mean, std = transition_distribution(scheduler, torch.zeros(2, 2), t, x, 1.0)
    torch.testing.assert_close(mean, scheduler.step(torch.zeros(2, 2), t, x, eta=1.0, variance_noise=noise).prev_sample)


def test_default_scheduler_does_not_clip():
    assert make_scheduler("ddim").config.clip_sample is False
    assert make_scheduler("ddpm").config.clip_sample is False


def test_gaussian_log_prob_matches_torch_distributions():
    gen = torch.Generator().manual_seed(2)
    x, mean = torch.randn(5, 2, 3, generator=gen), torch.randn(5, 2, 3, generator=gen)
    std = torch.tensor(0.37)
    expected = Normal(mean, std).log_prob(x).sum(dim=(1, 2))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)
    assert torch.equal(gaussian_log_prob(x, mean, torch.tensor(0.0)), torch.zeros(5))


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_same_seed_same_samples_and_trajectory_does_not_change_them(kind):
    scheduler = make_scheduler(kind)
    runs = [sample(denoiser, scheduler, generator=5, shape=(6, 2), num_inference_steps=30, progress=False,
                   record_trajectory=record) for record in (False, True, True)]
    torch.testing.assert_close(runs[0].samples, runs[1].samples, rtol=1e-5, atol=1e-5)
    assert torch.equal(runs[1].samples, runs[2].samples)
    other = sample(denoiser, scheduler, generator=6, shape=(6, 2), num_inference_steps=30, progress=False)
    assert not torch.allclose(other.samples, runs[0].samples)


def test_trajectory_log_probs_are_those_of_the_recorded_transitions():
    scheduler = make_scheduler("ddim")
    out = sample(denoiser, scheduler, generator=0, shape=(3, 2), num_inference_steps=12, progress=False,
                 record_trajectory=True)
    traj = out.trajectory
    assert traj.latents.shape == (13, 3, 2) and traj.log_probs.shape == (12, 3)
    assert torch.equal(traj.latents[-1], out.samples)
    for k, t in enumerate(traj.timesteps):
        mean, std = transition_distribution(scheduler, denoiser(traj.latents[k], t), t, traj.latents[k], 1.0)
        assert torch.equal(std, traj.stds[k])
        torch.testing.assert_close(traj.log_probs[k], gaussian_log_prob(traj.latents[k + 1], mean, std))


def test_v_prediction_is_converted_to_epsilon():
    scheduler = make_scheduler("ddim", prediction_type="v_prediction")
    abar = scheduler.alphas_cumprod[700]
    x0, eps = torch.randn(4, 2), torch.randn(4, 2)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    v = abar.sqrt() * eps - (1 - abar).sqrt() * x0
    torch.testing.assert_close(to_epsilon(scheduler, v, 700, x_t), eps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_score_estimate_is_the_exact_score_of_gaussian_data(prediction_type):
    """``x_0 ~ N(m, S)``: ``x_t ~ N(sqrt(abar) m, abar S + (1 - abar) I)`` has the score ``-C^-1 (x - sqrt(abar) m)``;
    the exact prediction of each type (eps, v, x0 from the posterior) must give it back."""
    scheduler = make_scheduler("ddim", prediction_type=prediction_type)
    mean = torch.tensor([1.0, -0.5], dtype=torch.float64)
    cov = torch.tensor([[2.0, 0.8], [0.8, 0.5]], dtype=torch.float64)
    x_t = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (999, 600, 150, 3):
        abar = scheduler.alphas_cumprod[t].double()
        cov_t = abar * cov + (1 - abar) * torch.eye(2, dtype=torch.float64)
        score = -torch.linalg.solve(cov_t, (x_t - abar.sqrt() * mean).T).T
        eps = -(1 - abar).sqrt() * score
        x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        output = {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0, "sample": x0}
        torch.testing.assert_close(score_estimate(scheduler, output[prediction_type], t, x_t), score)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape or the initial latents"):
        sample(denoiser, make_scheduler(), generator=0)
    with pytest.raises(ValueError, match="NaN"):
        sample(denoiser, make_scheduler(), generator=0, latents=torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("euler-ish")
    with pytest.raises(TypeError, match="seed"):
        as_generator(1.5)
