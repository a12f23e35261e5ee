"""SMC on top of the blend (smc.py) against closed forms and hand-written references (docs/method.md, "SMC")."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from diffusion_blend.denoisers import BlendedDenoiser, CallableFamily
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.evaluation.sweep import CountingFamily
from diffusion_blend.preference import BASE, Preference, PreferenceSchedule
from diffusion_blend.sampling import make_scheduler, sample, timestep_progress, transition_distribution
from diffusion_blend.smc import (
    MIN_TILT,
    SMCOptions,
    TiltAdapter,
    effective_sample_size,
    smc_sample,
    systematic_resample,
    twisted_mean,
)
from diffusion_blend.testbeds.gmm import (
    GaussianMixture,
    QuadraticForm,
    combined_reward,
    ideal_family,
    tilted_target,
)
from diffusion_blend.testbeds.gmm.setting import gmm_setting

F64 = torch.float64
ALPHA = 0.25
PREFERENCE = Preference({"right": 0.5, "bump": 0.5}, 1.0)


def stochastic_ddim():
    """Stable Diffusion's DDIM settings: every step (the last one included) has std > 0."""
    return make_scheduler("ddim", steps_offset=1, set_alpha_to_one=False)


def bimodal():
    """1-D two-component mixture; a linear and a quadratic reward pull the target between the modes (the blend of
    the two ideal experts misses it by ~1.0 in the mean: a large Jensen gap at alpha = 0.25)."""
    base = GaussianMixture([0.6, 0.4], [[-1.5], [1.5]], [[[0.3]], [[0.5]]])
    rewards = {"right": QuadraticForm.linear_reward([1.0]), "bump": QuadraticForm.quadratic_reward([-1.0], [[1.0]])}
    return base, rewards


def moments(mixture: GaussianMixture) -> tuple[float, float]:
    mean = mixture.mean()
    second = sum(w * (c + torch.outer(m, m)) for w, m, c in zip(mixture.weights, mixture.means, mixture.covariances))
    return float(mean), float(second - torch.outer(mean, mean))


@pytest.mark.parametrize("proposal, potential, tilt", [("blend", "tweedie", 1.0), ("blend", "experts", 1.0),
                                                       ("twisted", "tweedie", 1.0), ("blend", "tweedie", 1.25)])
def test_smc_converges_to_the_exact_tilted_target(proposal, potential, tilt) -> None:
    """As N grows the output's mean and variance approach the closed-form target p_pre exp(lambda r_w / alpha).

    Tolerance at N = 64 (400 outputs, 50 steps): |mean error| < 0.15 and |variance error| < 0.2 (target variance
    0.92; measured <= 0.06 / 0.09); the 50-step base chain's own discretisation is part of that budget. N = 1 is the
    proposal alone (the blend: its Jensen gap; the twisted step: 0.9 in the mean). ``proposal_tilt = 1.25`` (the
    proposal blends at 1.25 lambda, overshooting further) converges to the same target (error 0.05 at N = 64).
    """
    base, rewards = bimodal()
    family = ideal_family(base, rewards, ALPHA, stochastic_ddim())
    reward = combined_reward(rewards, PREFERENCE)
    target_mean, target_variance = moments(tilted_target(base, rewards, PREFERENCE, ALPHA))
    errors = {}
    for n in (1, 8, 64):
        out = smc_sample(
            family,
            PREFERENCE,
            stochastic_ddim(),
            reward=reward,
            alpha=ALPHA,
            generator=0,
            options=SMCOptions(particles=n, proposal=proposal, potential=potential, proposal_tilt=tilt),
            shape=(400, 1),
            num_inference_steps=50,
            progress=False,
            dtype=F64,
        )
        samples = out.samples.flatten()
        errors[n] = (abs(float(samples.mean()) - target_mean), abs(float(samples.var()) - target_variance))
    assert errors[1][0] > 0.7  # the proposal alone misses the target by far here
    assert errors[64][0] < errors[8][0] < errors[1][0], errors
    assert errors[64][0] < 0.15 and errors[64][1] < 0.2, errors


# the blended proposal switches from expert "right" alone to expert "bump" alone half way (issue 22, point 4)
SWITCH = PreferenceSchedule({"right": ((0.0, 1.0), (0.5, 1.0), (0.5, 0.0), (1.0, 0.0)),
                             "bump": ((0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (1.0, 1.0))})
# ... or slides linearly from (0.2, 0.8) at the first step to (0.8, 0.2) at the last
SLIDE = PreferenceSchedule({"right": ((0.0, 0.2), (1.0, 0.8)), "bump": ((0.0, 0.8), (1.0, 0.2))})


@pytest.mark.parametrize("proposal, schedule", [("twisted", SWITCH), ("blend", SLIDE)])
def test_smc_with_a_scheduled_proposal_converges_to_the_fixed_target(proposal, schedule) -> None:
    """A weight schedule as SMC's proposal: the target stays the fixed preference (0.5, 0.5), and the weights correct
    the schedule's chain to it, as for any proposal. Same tolerance as the fixed-proposal test at N = 64 (400 outputs,
    50 steps): the scheduled chain alone (N = 1) misses the target's mean by far (measured 0.96 / 1.79), N = 64 comes
    within 0.15 of the mean and 0.2 of the variance of the closed form (measured 0.09 / 0.04 in the mean). Measured
    and left out: the hard switch on the blend proposal converges more slowly (0.44 at N = 64: these experts are
    continuous-time tilts, for which the twisted proposal is the mixture's own; docs/evaluation.md)."""
    base, rewards = bimodal()
    family = ideal_family(base, rewards, ALPHA, stochastic_ddim())
    target_mean, target_variance = moments(tilted_target(base, rewards, PREFERENCE, ALPHA))
    errors = {}
    for n in (1, 64):
        options = SMCOptions(particles=n, proposal=proposal, proposal_schedule=schedule)
        out = smc_sample(family, PREFERENCE, stochastic_ddim(), reward=combined_reward(rewards, PREFERENCE),
                         alpha=ALPHA, generator=0, options=options, shape=(400, 1), num_inference_steps=50,
                         progress=False, dtype=F64)
        samples = out.samples.flatten()
        errors[n] = (abs(float(samples.mean()) - target_mean), abs(float(samples.var()) - target_variance))
        assert torch.equal(out.tilts, torch.ones(50, dtype=F64))  # the schedule is the proposal: no tilt on top
    assert errors[1][0] > 0.5, errors
    assert errors[64][0] < 0.15 and errors[64][1] < 0.2, errors


def test_one_particle_with_a_proposal_schedule_is_the_scheduled_blend_sampler() -> None:
    """N = 1: SMC's draws are the scheduled blend's (BlendedDenoiser over the schedule, the same generator), whatever
    fixed target the weights would correct toward; constant schedules are the fixed blend."""
    base, rewards = bimodal()
    family = ideal_family(base, rewards, ALPHA, stochastic_ddim())
    common = dict(reward=combined_reward(rewards, PREFERENCE), alpha=ALPHA, generator=4, shape=(16, 1),
                  num_inference_steps=6, progress=False, dtype=F64)
    out = smc_sample(family, PREFERENCE, stochastic_ddim(), options=SMCOptions(particles=1, proposal_schedule=SWITCH),
                     **common)
    scheduler = stochastic_ddim()
    blend = sample(BlendedDenoiser(family, SWITCH, progress=timestep_progress(scheduler)), scheduler, generator=4,
                   shape=(16, 1), num_inference_steps=6, record_trajectory=True, progress=False, dtype=F64).samples
    assert torch.allclose(out.samples, blend, rtol=0, atol=1e-12)
    constant = PreferenceSchedule({name: ((0.0, 0.5), (1.0, 0.5)) for name in PREFERENCE.weights})
    fixed = smc_sample(family, PREFERENCE, stochastic_ddim(), options=SMCOptions(particles=1), **common)
    scheduled = smc_sample(family, PREFERENCE, stochastic_ddim(),
                           options=SMCOptions(particles=1, proposal_schedule=constant), **common)
    assert torch.allclose(scheduled.samples, fixed.samples, rtol=0, atol=1e-12)


def gaussian_chain(steps: int):
    """A Gaussian base and a linear reward: the base chain is linear-Gaussian, so the tilted path measure has a
    closed form. With ``mu_pre(x) = A_k x + b_k`` and ``log V_K(x) = s a.x``, ``V_k(x) = E[V_{k+1}(x_{k+1}) | x_k]`` is
    ``exp(c_k.x + const)`` with ``c_k = A_k^T c_{k+1}``, and the tilted chain's step is ``N(mu_pre + s_k^2 c_{k+1},
    s_k^2)`` (Doob's h-transform). Returns the family, reward, and that exact proposal as a denoiser."""
    base = GaussianMixture([1.0], [[0.5, -0.3]], [[[0.6, 0.2], [0.2, 0.4]]])
    rewards = {"right": QuadraticForm.linear_reward([1.0, 0.5]), "other": QuadraticForm.linear_reward([0.0, 1.0])}
    preference = Preference({"right": 1.0}, 1.0)
    scheduler = stochastic_ddim()
    family = ideal_family(base, rewards, ALPHA, scheduler)
    scheduler.set_timesteps(steps)
    base_denoiser = family.member(BASE)
    eye, zero = torch.eye(2, dtype=F64), torch.zeros(1, 2, dtype=F64)
    linear, offsets, slopes, stds = [], [], [], []
    for t in scheduler.timesteps:
        mean0, std = transition_distribution(scheduler, base_denoiser(zero, t), t, zero)
        columns = [transition_distribution(scheduler, base_denoiser(e[None], t), t, e[None])[0] - mean0 for e in eye]
        linear.append(torch.cat(columns).T)  # A_k (mean is affine in x: the score of a Gaussian is affine)
        slopes.append(float(transition_distribution(scheduler, torch.ones(1, 1, dtype=F64), t, zero[:, :1])[0]))
        offsets.append(mean0)
        stds.append(float(std))
    c = [None] * (steps + 1)
    c[steps] = (PREFERENCE_SCALE := preference.kl_scale / ALPHA) * rewards["right"].linear
    for k in reversed(range(steps)):
        c[k] = linear[k].T @ c[k + 1]
    index = {int(t): k for k, t in enumerate(scheduler.timesteps)}

    def exact_proposal(x, t, **cond):
        k = index[int(t)]  # eps shift that moves the DDIM mean by s_k^2 c_{k+1} (the mean is affine in eps)
        return base_denoiser(x, t) + stds[k] ** 2 * c[k + 1] / slopes[k]

    assert PREFERENCE_SCALE == 4.0
    return family, preference, combined_reward(rewards, preference), exact_proposal


@pytest.mark.parametrize("steps, tolerance", [(20, 0.4), (50, 0.2)])
def test_twisted_step_approaches_the_exact_tilted_chain_step(steps, tolerance) -> None:
    """Against Doob's h-transform in closed form (``gaussian_chain``: the tilted step moves the base's mean by
    ``s_k^2 c_{k+1}``): the twisted step ``s_k^2 (score_q - score_pre)(x_k)`` of the ideal continuous-time expert is
    within 37 % (20 steps) / 18 % (50 steps) of it at every step, shrinking with the step count, whereas the expert's
    own step is exact early and off by over 10x near x_0 (its shift is ``b_k sqrt(1 - abar_k) grad V``)."""
    family, _, _, exact = gaussian_chain(steps)
    scheduler = stochastic_ddim()
    scheduler.set_timesteps(steps)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    twisted_errors, expert_errors = [], []
    for t in scheduler.timesteps:
        out_pre, out_expert = family.member(BASE)(x, t), family.member("right")(x, t)
        mean_pre, std = transition_distribution(scheduler, out_pre, t, x)
        exact_shift = transition_distribution(scheduler, exact(x, t), t, x)[0] - mean_pre
        twisted_shift = twisted_mean(scheduler, out_expert, out_pre, t, x, mean_pre, std) - mean_pre
        expert_shift = transition_distribution(scheduler, out_expert, t, x)[0] - mean_pre
        twisted_errors.append(float((twisted_shift - exact_shift).norm() / exact_shift.norm()))
        expert_errors.append(float((expert_shift - exact_shift).norm() / exact_shift.norm()))
    assert max(twisted_errors) < tolerance, twisted_errors
    assert max(expert_errors) > 10 and expert_errors[0] < 0.01, expert_errors


def test_twisted_proposal_evens_the_path_weights_of_continuous_time_experts() -> None:
    """The Gaussian-mixture setting at 20 DDIM steps (exact experts): plain importance sampling of 2,000 paths
    (``h = 0``, no resampling) keeps 13 % of its ESS with the blend's steps and 52 % with the twisted ones (the
    measurement docs/evaluation.md reports); asserted with margin: twisted > 0.4 and > 3x the blend's."""
    setting = gmm_setting(20)
    preference = Preference({"right": 0.5, "corner": 0.5}, 1.0)
    reward = combined_reward(setting.rewards, preference)
    ess = {}
    for proposal in ("blend", "twisted"):
        out = smc_sample(
            setting.family,
            preference,
            setting.scheduler_factory(),
            reward=reward,
            alpha=setting.alpha,
            generator=0,
            options=SMCOptions(particles=2000, proposal=proposal, potential="none", ess_threshold=0.0),
            shape=(1, 2),
            num_inference_steps=20,
            progress=False,
        )
        ess[proposal] = float(out.final_ess[0]) / 2000
    assert ess["twisted"] > 0.4 and ess["twisted"] > 3 * ess["blend"], ess


def test_exact_target_as_proposal_gives_uniform_weights() -> None:
    steps = 12
    family, preference, reward, exact = gaussian_chain(steps)
    latents = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    common = dict(reward=reward, alpha=ALPHA, generator=0, latents=latents, num_inference_steps=steps,
                  progress=False, dtype=F64)
    for potential in ("tweedie", "none"):
        out = smc_sample(family, preference, stochastic_ddim(), **common,
                         options=SMCOptions(particles=16, proposal=exact, potential=potential, ess_threshold=0.0))
        assert (out.log_weights + math.log(16)).abs().max() < 1e-8  # uniform final weights in every group
        assert torch.allclose(out.final_ess, torch.full((50,), 16.0, dtype=F64))
    blend = smc_sample(family, preference, stochastic_ddim(), options=SMCOptions(particles=16, ess_threshold=0.0),
                       **common)
    assert float(blend.final_ess.mean()) < 15.0  # the discrete blend is not the exact tilted chain: weights differ


def test_experts_potential_with_the_exact_tilted_chain_as_expert_keeps_every_weight_uniform() -> None:
    """One expert that IS the tilted chain (Doob's h-transform, closed form): its log-ratio to the base is the value
    increment exactly, so with ``potential="experts"`` the weights are uniform at every state, not only at the end
    (with ``h = 0`` the intermediate weights are the path ratios p_pre / q, far from uniform)."""
    steps, n = 12, 16
    family, preference, reward, exact = gaussian_chain(steps)
    exact_family = CallableFamily(family.member(BASE), {"right": exact})
    latents = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    common = dict(reward=reward, alpha=ALPHA, generator=0, latents=latents, num_inference_steps=steps,
                  progress=False, dtype=F64)
    experts = smc_sample(exact_family, preference, stochastic_ddim(), **common,
                         options=SMCOptions(particles=n, potential="experts", ess_threshold=0.0))
    assert torch.allclose(experts.ess_history, torch.full_like(experts.ess_history, float(n)), atol=1e-6)
    assert experts.reward_evaluations == n  # r_w once per particle, at x_0 only
    plain = smc_sample(exact_family, preference, stochastic_ddim(), **common,
                       options=SMCOptions(particles=n, potential="none", ess_threshold=0.0))
    assert float(plain.ess_history[steps // 2].mean()) < 0.5 * n  # path ratios alone: uneven halfway
    assert torch.allclose(plain.final_ess, torch.full((50,), float(n), dtype=F64))  # ... uniform at the end


def test_experts_potential_step_weight_is_the_jensen_gap_of_the_blend() -> None:
    """After the first step the log-weight of a particle is ``-(sum_i c_i |d_i|^2 - |sum_i c_i d_i|^2) / (2 s^2)``
    at its ``x_T`` (``d_i = mu_i - mu_pre``: the experts' step means against the base's), computed here by hand from
    the members' DDIM means, independently of the sampler's log-density differences; at lambda < 1 too."""
    base, rewards = bimodal()
    n, batch, steps = 6, 4, 5
    particle_latents = torch.randn(n * batch, 1, generator=torch.Generator().manual_seed(5), dtype=F64) * 1.5
    for preference in (PREFERENCE, Preference({"right": 0.3, "bump": 0.7}, 0.6)):
        family = ideal_family(base, rewards, ALPHA, stochastic_ddim())
        out = smc_sample(
            family,
            preference,
            stochastic_ddim(),
            reward=combined_reward(rewards, preference),
            alpha=ALPHA,
            generator=2,
            options=SMCOptions(particles=n, potential="experts", ess_threshold=0.0),
            particle_latents=particle_latents,
            num_inference_steps=steps,
            progress=False,
            dtype=F64,
        )
        scheduler = stochastic_ddim()
        scheduler.set_timesteps(steps)
        t = scheduler.timesteps[0]
        x = particle_latents
        mean_pre, std = transition_distribution(scheduler, family.member(BASE)(x, t), t, x)
        coefficients = preference.coefficients(family.expert_names).experts
        deviations = {name: transition_distribution(scheduler, family.member(name)(x, t), t, x)[0] - mean_pre
                      for name in coefficients}
        blended = sum(c * deviations[name] for name, c in coefficients.items())
        gap = (sum(c * (deviations[name] ** 2).sum(-1) for name, c in coefficients.items())
               - (blended**2).sum(-1)) / (2 * float(std) ** 2)
        assert float(gap.min()) > 0.0  # Jensen: the blend's step is never better than its experts on average
        expected = effective_sample_size(-gap.view(n, batch))
        assert torch.allclose(out.ess_history[1], expected, rtol=1e-9, atol=1e-9)


def doob_family(steps: int, scale: float = 1.0):
    """Perfect experts on a single Gaussian: for each of two linear rewards ``r_i``, the base chain tilted by
    ``exp(scale r_i / ALPHA)`` exactly (Doob's h-transform in closed form, as in ``gaussian_chain``). Their blend is
    exact for every preference (the tilted steps' mean shifts are linear in the reward), so with ``scale = 1`` the
    blend IS the target chain; with ``scale = 0.5`` the experts are half as strong as their KL weight says and the
    exact proposal is the blend at tilt 2. Returns the family and the rewards."""
    base = GaussianMixture([1.0], [[0.5, -0.3]], [[[0.6, 0.2], [0.2, 0.4]]])
    rewards = {"right": QuadraticForm.linear_reward([1.0, 0.5]), "up": QuadraticForm.linear_reward([-0.5, 1.0])}
    scheduler = stochastic_ddim()
    base_denoiser = ideal_family(base, rewards, ALPHA, scheduler).member(BASE)
    scheduler.set_timesteps(steps)
    eye, zero = torch.eye(2, dtype=F64), torch.zeros(1, 2, dtype=F64)
    linear, stds, slopes = [], [], []
    for t in scheduler.timesteps:
        mean0, std = transition_distribution(scheduler, base_denoiser(zero, t), t, zero)
        linear.append(torch.cat([transition_distribution(scheduler, base_denoiser(e[None], t), t, e[None])[0] - mean0
                                 for e in eye]).T)
        slopes.append(float(transition_distribution(scheduler, torch.ones(1, 1, dtype=F64), t, zero[:, :1])[0]))
        stds.append(float(std))
    index = {int(t): k for k, t in enumerate(scheduler.timesteps)}

    def doob(reward: QuadraticForm):
        c = [None] * (steps + 1)
        c[steps] = scale * reward.linear / ALPHA
        for k in reversed(range(steps)):
            c[k] = linear[k].T @ c[k + 1]

        def expert(x, t, **cond):
            k = index[int(t)]
            return base_denoiser(x, t) + stds[k] ** 2 * c[k + 1] / slopes[k]
        return expert

    return CallableFamily(base_denoiser, {name: doob(r) for name, r in rewards.items()}), rewards


@pytest.mark.parametrize("proposal", ["blend", "twisted"])
@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_where_the_blend_is_the_target_smc_returns_the_blend_samples_at_lambda_zero(proposal, threshold) -> None:
    """Do no harm, lambda = 0: the target is the base chain and the blend is the base, so every weight is exactly
    equal at every state, nothing is resampled (not even at ESS threshold 1), the tilt stays 1, and each output is
    its group's first particle: the blend sampler's own sample (bit for bit, the same generator stream). The
    mixture's experts are not exact; at lambda = 0 they are not evaluated."""
    setting = gmm_setting(8)
    preference = Preference({"right": 0.3, "corner": 0.7}, 0.0)
    n, batch = 6, 20
    out = smc_sample(setting.family, preference, setting.scheduler_factory(), reward=combined_reward(
        setting.rewards, preference), alpha=1.0, generator=3, shape=(batch, 2), num_inference_steps=8, progress=False,
        options=SMCOptions(particles=n, proposal=proposal, ess_threshold=threshold))
    assert torch.equal(out.log_weights, torch.full_like(out.log_weights, float(out.log_weights[0, 0])))
    assert torch.allclose(out.ess_history, torch.full_like(out.ess_history, float(n)), rtol=0, atol=1e-12)
    assert int(out.resampling_steps.sum()) == 0 and torch.equal(out.tilts, torch.ones(8, dtype=F64))
    blend = sample(BlendedDenoiser(setting.family, preference), setting.scheduler_factory(), generator=3,
                   shape=(n * batch, 2), num_inference_steps=8, record_trajectory=True, progress=False).samples
    assert torch.equal(out.particles.reshape(n * batch, 2), blend)
    assert torch.equal(out.samples, blend[:batch])


@pytest.mark.parametrize("preference", [Preference({"right": 1.0}, 1.0), Preference({"right": 0.3, "up": 0.7}, 1.0),
                                        Preference({"right": 0.3, "up": 0.7}, 0.6)], ids=str)
def test_with_perfect_experts_on_a_gaussian_smc_returns_the_blend_samples(preference) -> None:
    """Do no harm, perfect experts: on a Gaussian base with linear rewards the blend of exact tilted-chain experts
    is the target chain (one active expert at lambda = 1, two experts, lambda < 1). With the default options
    (Tweedie potential, adaptive tilt, ESS threshold N/2) and ``x_T`` shared by each group: the final weights are
    equal (to 1e-9; the Tweedie look-ahead is the value up to ~1e-4, so intermediate ESS stays within 1e-5 of N),
    nothing is resampled, the tilt never moves, and every output is the blend sampler's own sample."""
    steps, n, batch = 12, 16, 30
    family, rewards = doob_family(steps)
    latents = torch.randn(batch, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    out = smc_sample(family, preference, stochastic_ddim(), reward=combined_reward(rewards, preference), alpha=ALPHA,
                     generator=0, latents=latents, num_inference_steps=steps, progress=False, dtype=F64,
                     options=SMCOptions(particles=n))
    spread = out.log_weights.max(0).values - out.log_weights.min(0).values
    assert float(spread.max()) < 1e-9
    assert float(out.ess_history.min()) > n * (1 - 1e-5)
    assert int(out.resampling_steps.sum()) == 0 and torch.equal(out.tilts, torch.ones(steps, dtype=F64))
    blend = sample(BlendedDenoiser(family, preference), stochastic_ddim(), generator=0, latents=latents.repeat(n, 1),
                   num_inference_steps=steps, record_trajectory=True, progress=False, dtype=F64).samples
    assert torch.allclose(out.samples, blend[:batch], rtol=0, atol=1e-12)


def test_adaptive_tilt_finds_the_tilt_of_half_strength_experts() -> None:
    """Experts tilted by half their reward (``doob_family(scale=0.5)``): the exact proposal is the blend at tilt 2.
    The adaptive tilt starts at 1 and reaches 2 within 0.05 after two steps (the Tweedie look-ahead is the value
    here, so the per-step regression is unbiased); its final weights are far more even than the blend's at tilt 1
    (mean final ESS > 0.95 N against < 0.8 N), and equal to a fixed tilt 2's within 0.02 N. The target's moment
    match (``target_tilts``, median over the steps) says 2 as well (from the tilt-1 run: above 1.5, finite N pulls it
    toward the proposal)."""
    steps, n, batch = 12, 8, 200
    family, rewards = doob_family(steps, scale=0.5)
    preference = Preference({"right": 0.3, "up": 0.7}, 1.0)
    common = dict(reward=combined_reward(rewards, preference), alpha=ALPHA, generator=1, shape=(batch, 2),
                  num_inference_steps=steps, progress=False, dtype=F64)
    runs = {tilt: smc_sample(family, preference, stochastic_ddim(), **common,
                             options=SMCOptions(particles=n, proposal_tilt=tilt)) for tilt in ("auto", 1.0, 2.0)}
    assert float(runs["auto"].tilts[0]) == 1.0
    assert (runs["auto"].tilts[2:] - 2.0).abs().max() < 0.05, runs["auto"].tilts
    ess = {tilt: float(run.final_ess.mean()) / n for tilt, run in runs.items()}
    assert ess["auto"] > 0.95 and ess[1.0] < 0.8 and abs(ess["auto"] - ess[2.0]) < 0.02, ess
    # per step it is noisy (a few hundred groups): its median; from the blend at tilt 1 it still points past 1.5
    assert abs(float(runs["auto"].target_tilts.median()) - 2.0) < 0.2, runs["auto"].target_tilts
    assert float(runs[1.0].target_tilts.median()) > 1.5, runs[1.0].target_tilts


def test_tilt_adapter_moves_by_the_regression_slope_and_stays_put_without_evidence() -> None:
    """The adapter's update on synthetic increments ``L = (t* - t) a + noise``: it moves to ``t*``; it never goes
    below the blend (``MIN_TILT``); equal increments or an insignificant slope leave it where it is."""
    generator = torch.Generator().manual_seed(0)
    n, batch = 4, 500
    a = torch.randn(n * batch, generator=generator, dtype=F64) * 0.3
    noise = torch.randn(n * batch, generator=generator, dtype=F64) * 0.05
    flat = torch.zeros(n, batch, dtype=F64)
    cases = {2.5: 2.5, 0.3: MIN_TILT}  # the slope's optimum -> where the tilt goes
    for optimum, expected in cases.items():
        adapter = TiltAdapter(1.0)
        adapter.observe_move(a)
        adapter.observe_increment((optimum - 1.0) * a + noise)
        adapter.update(flat)
        assert adapter.tilt == pytest.approx(expected, abs=0.05)
    # equal increments (the blend is exact), or a blend that moves nothing (lambda = 0): no evidence, no move
    for projection, increment in ((a, torch.full_like(a, 0.7)), (torch.zeros_like(a), a)):
        adapter = TiltAdapter(1.0)
        adapter.observe_move(projection)
        adapter.observe_increment(increment)
        adapter.update(flat)
        assert adapter.tilt == 1.0
    # a slope well inside its own standard error (pure noise, few particles): shrunk to no move
    small = torch.tensor([0.1, -0.2, 0.15, -0.05], dtype=F64)
    adapter = TiltAdapter(1.0)
    adapter.observe_move(small)
    adapter.observe_increment(torch.tensor([0.3, 0.2, -0.4, 0.1], dtype=F64))
    adapter.update(torch.zeros(2, 2, dtype=F64))
    assert adapter.tilt == 1.0


def test_on_the_mixture_default_smc_corrects_the_blend_toward_the_oracle(tmp_path) -> None:
    """Do no harm where the blend is not exact (docs/evaluation.md, issue 25): the gmm sweep at its 20 steps, default
    SMC options (the setting's twisted proposal, adaptive tilt, Tweedie potential) at N = 16 against DB-MPA, both
    against the setting's IS oracle (the 20-step chain's tilt, SMC's target). At w = 0.5 (DB-MPA's Jensen gap)
    and w = 1 (one continuous-time expert, off the chain's tilt) SMC's error is under a third of DB-MPA's and within
    3 standard errors of 0 (1,024 samples, seed 7; measured: DB-MPA -0.21 / +0.24, SMC -0.03 / -0.05, se 0.03)."""
    from diffusion_blend.evaluation.sweep import SweepConfig, run_sweep

    setting = gmm_setting(20)
    preferences = [Preference({"right": w, "corner": 1.0 - w}, 1.0) for w in (0.5, 1.0)]
    config = SweepConfig(methods=("is-oracle", "mpa", "smc"), preferences=preferences, seeds=[7],
                         samples_per_seed=1024, oracle_samples=40_000, particles=16)
    rows = run_sweep(setting, config, tmp_path, progress=False)["rows"]
    for w in (0.5, 1.0):
        found = {r["method"]: r for r in rows if r["weights"]["right"] == w}
        oracle = found["is-oracle"]["weighted_reward"]
        mpa, smc = (found[m]["weighted_reward"] - oracle for m in ("mpa", "smc"))
        assert abs(smc) < abs(mpa) / 3 and abs(smc) < 3 * found["smc"]["se_weighted_reward"], (w, mpa, smc)


def test_base_proposal_without_potential_is_importance_resampling() -> None:
    """proposal='base', h = 0, no intermediate resampling: the particles are the base sampler's samples (same
    generator stream) and the final weights are softmax(lambda r_w / alpha) of their rewards."""
    base, rewards = bimodal()
    family = ideal_family(base, rewards, ALPHA, stochastic_ddim())
    reward = combined_reward(rewards, PREFERENCE)
    n, batch, steps = 8, 30, 10
    out = smc_sample(
        family,
        PREFERENCE,
        stochastic_ddim(),
        reward=reward,
        alpha=ALPHA,
        generator=7,
        options=SMCOptions(particles=n, proposal="base", potential="none", ess_threshold=0.0),
        shape=(batch, 1),
        num_inference_steps=steps,
        progress=False,
        dtype=F64,
    )
    reference = sample(family.member(BASE), stochastic_ddim(), generator=7, shape=(n * batch, 1),
                       num_inference_steps=steps, record_trajectory=True, progress=False, dtype=F64).samples
    assert torch.equal(out.particles.reshape(n * batch, 1), reference)
    expected = torch.log_softmax((PREFERENCE.kl_scale / ALPHA) * reward(reference).view(n, batch), dim=0)
    assert torch.allclose(out.log_weights, expected, atol=1e-10)
    assert int(out.resampling_steps.sum()) == 0
    for b in range(batch):  # each output is one of its own group's particles
        assert (out.particles[:, b] == out.samples[b]).all(-1).any()


def test_potential_choice_does_not_change_the_final_weights() -> None:
    """Telescoping: without intermediate resampling the final weight is dP*/dQ for any potential h."""
    base, rewards = bimodal()
    family = ideal_family(base, rewards, ALPHA, stochastic_ddim())
    common = dict(reward=combined_reward(rewards, PREFERENCE), alpha=ALPHA, generator=1, shape=(20, 1),
                  num_inference_steps=8, progress=False, dtype=F64)
    runs = [smc_sample(family, PREFERENCE, stochastic_ddim(), **common,
                       options=SMCOptions(particles=6, potential=p, potential_every=e, ess_threshold=0.0))
            for p, e in (("none", 1), ("tweedie", 1), ("tweedie", 3), ("experts", 1))]
    for other in runs[1:]:
        assert torch.equal(other.particles, runs[0].particles)
        assert torch.allclose(other.log_weights, runs[0].log_weights, atol=1e-9)


@pytest.mark.parametrize("tilt", [1.0, 2.0])
def test_one_particle_is_the_blend_sampler(tilt) -> None:
    """N = 1 is the blend sampler at KL scale ``proposal_tilt x lambda`` (same generator stream)."""
    base, rewards = bimodal()
    family = ideal_family(base, rewards, ALPHA, stochastic_ddim())
    out = smc_sample(
        family,
        PREFERENCE,
        stochastic_ddim(),
        reward=combined_reward(rewards, PREFERENCE),
        alpha=ALPHA,
        generator=4,
        options=SMCOptions(particles=1, proposal_tilt=tilt),
        shape=(16, 1),
        num_inference_steps=6,
        progress=False,
        dtype=F64,
    )
    tilted = Preference(PREFERENCE.weights, tilt * PREFERENCE.kl_scale)
    blend = sample(BlendedDenoiser(family, tilted), stochastic_ddim(), generator=4, shape=(16, 1),
                   num_inference_steps=6, record_trajectory=True, progress=False, dtype=F64).samples
    assert torch.allclose(out.samples, blend, rtol=0, atol=1e-12)
    assert torch.equal(out.final_ess, torch.ones(16, dtype=F64))


@pytest.mark.parametrize("proposal, members", [("blend", 3), ("base", 1)])
@pytest.mark.parametrize("potential, every, reward_calls", [("tweedie", 1, 7), ("tweedie", 3, 3), ("none", 1, 1)])
def test_cost_accounting(proposal, members, potential, every, reward_calls) -> None:
    """DB-MPA (c_0 = 0) over two experts adds the base as a third member; reward calls: potential steps + the end."""
    base, rewards = bimodal()
    counting = CountingFamily(ideal_family(base, rewards, ALPHA, stochastic_ddim()))
    rw = combined_reward(rewards, PREFERENCE)
    calls = []

    def reward(x):
        calls.append(x.shape[0])
        return rw(x)

    n, batch, steps = 4, 5, 6
    out = smc_sample(
        counting,
        PREFERENCE,
        stochastic_ddim(),
        reward=reward,
        alpha=ALPHA,
        generator=0,
        options=SMCOptions(particles=n, proposal=proposal, potential=potential, potential_every=every),
        shape=(batch, 1),
        num_inference_steps=steps,
        progress=False,
    )
    assert counting.rows == members * n * batch * steps
    assert out.network_evaluations == members * n * steps
    assert calls == [n * batch] * reward_calls
    assert out.reward_evaluations == n * reward_calls
    assert out.ess_history.shape == (steps + 1, batch)
    assert ((out.final_ess >= 1 - 1e-9) & (out.final_ess <= n + 1e-9)).all()


def test_systematic_resampling_copies_each_particle_floor_or_ceil_times() -> None:
    generator = torch.Generator().manual_seed(0)
    log_weights = torch.randn(10, 200, generator=generator, dtype=F64) * 2
    ancestors = systematic_resample(log_weights, generator)
    expected = 10 * torch.softmax(log_weights, 0)
    counts = torch.zeros_like(expected)
    counts.scatter_add_(0, ancestors, torch.ones_like(expected))
    assert ((counts >= expected.floor() - 1e-9) & (counts <= expected.ceil() + 1e-9)).all()
    for _ in range(5):  # weights (1/2, 0, 1/2) over 3 slots: particle 1 never, the others once or twice
        ancestors = systematic_resample(torch.tensor([[0.0], [-math.inf], [0.0]]), generator).flatten().tolist()
        assert ancestors in ([0, 0, 2], [0, 2, 2])
    assert torch.allclose(effective_sample_size(torch.zeros(5, 3)), torch.full((3,), 5.0))
    assert torch.allclose(effective_sample_size(torch.tensor([[0.0], [-math.inf]])), torch.ones(1))


def test_refusals_are_one_line() -> None:
    base, rewards = bimodal()
    family = ideal_family(base, rewards, ALPHA, stochastic_ddim())
    common = dict(reward=combined_reward(rewards, PREFERENCE), alpha=ALPHA, generator=0, shape=(2, 1),
                  num_inference_steps=4, progress=False)
    with pytest.raises(DiffusionBlendError, match="deterministic"):
        smc_sample(family, PREFERENCE, make_scheduler("ddim"), **common)  # set_alpha_to_one: last step std 0
    with pytest.raises(DiffusionBlendError, match="deterministic"):
        smc_sample(family, PREFERENCE, stochastic_ddim(), eta=0.0, **common)
    for bad in (dict(particles=0), dict(proposal="expert"), dict(potential="max"), dict(ess_threshold=1.5),
                dict(potential_every=0), dict(proposal="base", potential="experts"), dict(proposal_tilt=0.0),
                dict(proposal_tilt=float("nan")), dict(proposal="base", proposal_tilt=2.0), dict(proposal_tilt="on"),
                dict(proposal_schedule=SWITCH, proposal="base"), dict(proposal_schedule=SWITCH, proposal_tilt=2.0),
                dict(proposal_schedule=PREFERENCE)):
        with pytest.raises(DiffusionBlendError) as info:
            SMCOptions(**bad)  # refused where the options enter, once
        assert "\n" not in str(info.value)
    with pytest.raises(DiffusionBlendError, match="alpha"):
        smc_sample(family, PREFERENCE, stochastic_ddim(), **{**common, "alpha": 0.0})
    with pytest.raises(DiffusionBlendError, match="shape"):
        smc_sample(family, PREFERENCE, stochastic_ddim(), **{**common, "reward": lambda x: x})


def test_sweep_cells_report_cost_and_ess(tmp_path) -> None:
    """`dblend evaluate --methods smc,fk`: NFE (blend over two experts + the base: 3 members), basis-reward
    evaluations (2 rewards x N x (steps + 1)) and one final ESS per sample, through the shared sweep and the CLI."""
    from diffusion_blend.cli import main
    from diffusion_blend.evaluation.sweep import (
        Cell,
        SweepConfig,
        fingerprint,
        run_cell,
    )

    setting = gmm_setting(num_inference_steps=4)
    preference = Preference({"right": 0.5, "corner": 0.5}, 1.0)
    config = SweepConfig(methods=("smc", "fk"), preferences=[preference], seeds=[0], samples_per_seed=6,
                         particles=3, fk_particles=9)
    smc = run_cell(setting, config, Cell("smc", preference, 0))
    fk = run_cell(setting, config, Cell("fk", preference, 0))
    assert smc["network_evaluations_per_sample"] == 3 * 3 * 4 == fk["network_evaluations_per_sample"]
    assert smc["reward_evaluations_per_sample"] == 2 * 3 * 5 and fk["reward_evaluations_per_sample"] == 2 * 9 * 5
    assert len(smc["final_ess"]) == 6 and all(1 - 1e-9 <= e <= 3 + 1e-9 for e in smc["final_ess"])
    assert SweepConfig(methods=("mpa",), preferences=[preference]).hyperparameters().get("particles") is None
    # the gmm setting's experts are exact scores: its SMC cells propose with the twisted step unless told otherwise
    chosen = {proposal: replace(config, smc_proposal=proposal) for proposal in ("twisted", "blend")}
    assert run_cell(setting, chosen["twisted"], Cell("smc", preference, 0))["rewards"] == smc["rewards"]
    assert run_cell(setting, chosen["blend"], Cell("smc", preference, 0))["rewards"] != smc["rewards"]
    assert fingerprint(setting, chosen["twisted"]) == fingerprint(setting, config)
    assert fingerprint(setting, chosen["blend"]) != fingerprint(setting, config)
    with pytest.raises(DiffusionBlendError, match="smc_proposal") as info:
        SweepConfig(methods=("smc",), preferences=[preference], smc_proposal="base")
    assert "\n" not in str(info.value)
    args = ["evaluate", "--setting", "gmm", "--out", str(tmp_path), "--methods", "mpa,smc,fk", "--grid", "2",
            "--seeds", "0", "--samples-per-seed", "4", "--steps", "3", "--particles", "2", "--no-progress"]
    assert main(args) == 0
    import csv

    with open(tmp_path / "results.csv") as handle:
        rows = {(r["method"], r["w_right"]): r for r in csv.DictReader(handle)}
    assert float(rows[("smc", "1.0")]["network_evaluations_per_sample"]) == 2 * 2 * 3  # expert + base
    assert float(rows[("fk", "1.0")]["network_evaluations_per_sample"]) == 2 * 3
    assert 1 <= float(rows[("smc", "0.0")]["final_ess_mean"]) <= 2
    assert main([*args[:-1], "--particles", "0"]) == 2
    assert main([*args, "--smc-proposal", "blend", "--out", str(tmp_path / "blend")]) == 0
    assert main([*args, "--smc-proposal-tilt", "0", "--out", str(tmp_path / "bad-tilt")]) == 2
    assert main([*args, "--smc-proposal-tilt", "auto", "--out", str(tmp_path / "auto")]) == 0
    with pytest.raises(SystemExit):  # neither 'auto' nor a number: argparse's own refusal
        main([*args, "--smc-proposal-tilt", "sometimes", "--out", str(tmp_path / "bad-word")])
    assert SMCOptions().proposal_tilt == "auto" and SweepConfig(methods=("smc",), preferences=[preference]
                                                                ).smc_options("blend").adaptive_tilt


def test_smc_study_writes_rows_and_plot(tmp_path) -> None:
    """The oracle-fraction study: one row per method, w and N; FK at equal NFE gets 3N particles (2 experts + base)."""
    from diffusion_blend.evaluation.smc_study import SMCStudyConfig, run_smc_study

    config = SMCStudyConfig(weights=(0.5,), particles=(2,), seeds=(0,), samples_per_seed=4)
    from diffusion_blend.testbeds.gmm.setting import smc_study_inputs

    setting, preferences, base_reward, gains, first = smc_study_inputs(config, steps=3, alpha=1.0)
    rows = run_smc_study(setting, preferences, base_reward, gains, first, tmp_path, config, progress=False)
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"mpa", "ls", "smc", "fk", "fk-equal"}
    assert by_method["smc"]["network_evaluations_per_sample"] == by_method["fk-equal"]["network_evaluations_per_sample"]
    assert by_method["fk-equal"]["particles"] == 6 and by_method["smc"]["particles"] == 2
    for row in rows:  # gains from the setting's base estimate (the chain's 200,000 draws), like the oracle's
        assert row["gain"] == pytest.approx(row["weighted_reward"] - base_reward[0.5])
        assert row["oracle_fraction"] == pytest.approx(row["gain"] / row["oracle_gain"])
    assert all((tmp_path / name).exists() for name in ("smc_study.csv", "smc_study.md", "oracle_fraction.png"))
