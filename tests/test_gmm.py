"""Closed forms of the Gaussian-mixture testbed against independent truth (paper sections 1-2, section 8)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from diffusion_blend.denoisers import BlendedDenoiser, SwitchingDenoiser
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.preference import Preference
from diffusion_blend.sampling import make_scheduler, sample
from diffusion_blend.testbeds.gmm import (
    GaussianMixture,
    MixtureDenoiser,
    QuadraticForm,
    combined_reward,
    expected_rewards,
    ideal_family,
    tilted_target,
)

F64 = torch.float64




def mixture() -> GaussianMixture:
    return GaussianMixture(
        weights=[0.5, 0.3, 0.2],
        means=[[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]],
        covariances=[[[0.5, 0.2], [0.2, 0.4]], [[0.3, 0.0], [0.0, 0.6]], [[0.4, -0.1], [-0.1, 0.3]]],
    )


def reference(m: GaussianMixture) -> MixtureSameFamily:
    """torch.distributions' own mixture: an independent implementation of the density."""
    return MixtureSameFamily(Categorical(probs=m.weights), MultivariateNormal(m.means, covariance_matrix=m.covariances))


def grid(half_width: float = 7.0, points: int = 401) -> tuple[torch.Tensor, float]:
    axis = torch.linspace(-half_width, half_width, points, dtype=F64)
    xs, ys = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1), float(axis[1] - axis[0]) ** 2


REWARD_TILTS = [
    (QuadraticForm.linear_reward([1.0, -0.5]), 1.5),
    (QuadraticForm.quadratic_reward([1.0, 1.0], [[1.0, 0.3], [0.3, 0.5]]), 2.0),
    (QuadraticForm(torch.tensor([[-0.8, 0.0], [0.0, 0.5]]), torch.tensor([0.3, 0.2]), 0.7), 1.0),  # indefinite
]


def test_log_prob_matches_torch_distributions() -> None:
    m = mixture()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2
    torch.testing.assert_close(m.log_prob(x), reference(m).log_prob(x))
    noised = m.noised(0.3)
    torch.testing.assert_close(m.log_prob(x, 0.3), reference(noised).log_prob(x))


@pytest.mark.parametrize("reward,scale", REWARD_TILTS)
def test_tilted_density_matches_numerical_integration(reward: QuadraticForm, scale: float) -> None:
    m = mixture()
    points, cell = grid()
    unnormalized = reference(m).log_prob(points) + scale * reward(points)
    log_z = torch.logsumexp(unnormalized, 0) + math.log(cell)
    tilted = m.tilt(reward, scale)
    assert m.log_partition(reward, scale) == pytest.approx(float(log_z), abs=1e-6)
    torch.testing.assert_close(reference(tilted).log_prob(points), unnormalized - log_z, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("reward,scale", REWARD_TILTS)
def test_tilted_expectation_matches_importance_weighting(reward: QuadraticForm, scale: float) -> None:
    m = mixture()
    probe = QuadraticForm.quadratic_reward([0.5, -0.5], [[1.0, 0.0], [0.0, 2.0]])
    samples = m.sample(400_000, torch.Generator().manual_seed(1))
    log_weights = scale * reward(samples)
    weights = torch.softmax(log_weights, 0)
    estimate = float((weights * probe(samples)).sum())
    effective = 1.0 / float((weights**2).sum())
    spread = float(probe(samples).std())
    assert m.tilt(reward, scale).expectation(probe) == pytest.approx(estimate, abs=5 * spread / math.sqrt(effective))


def test_expectation_matches_monte_carlo() -> None:
    m = mixture().tilt(QuadraticForm.linear_reward([0.5, 1.0]), 2.0)
    reward = QuadraticForm.quadratic_reward([1.0, -1.0], [[2.0, 0.5], [0.5, 1.0]]) + QuadraticForm.linear_reward(
        [1.0, 2.0], 3.0
    )
    values = reward(m.sample(200_000, torch.Generator().manual_seed(2)))
    standard_error = float(values.std()) / math.sqrt(len(values))
    assert m.expectation(reward) == pytest.approx(float(values.mean()), abs=4 * standard_error)
    moments = m.sample(200_000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(moments.mean(0), m.mean(), atol=0.01, rtol=0)


@pytest.mark.parametrize("timestep", [0, 10, 250, 600, 999])
def test_exact_eps_matches_autograd_of_noised_log_density(timestep: int) -> None:
    m = mixture()
    scheduler = make_scheduler("ddim")
    abar = float(scheduler.alphas_cumprod[timestep].double())
    x = (torch.randn(32, 2, generator=torch.Generator().manual_seed(timestep), dtype=F64) * 1.5).requires_grad_(True)
    log_density = reference(m.noised(abar)).log_prob(x).sum()
    (score,) = torch.autograd.grad(log_density, x)
    eps = MixtureDenoiser(m, scheduler.alphas_cumprod)(x.detach(), torch.tensor(timestep))
    torch.testing.assert_close(eps, -math.sqrt(1 - abar) * score, atol=1e-8, rtol=1e-6)


def test_rewards_are_callables_on_batches() -> None:
    reward = QuadraticForm.quadratic_reward([1.0, 2.0], [[2.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[1.0, 2.0], [2.0, 2.0], [1.0, 0.0]])
    torch.testing.assert_close(reward(x), torch.tensor([0.0, -1.0, -2.0]))
    torch.testing.assert_close(QuadraticForm.linear_reward([2.0, -1.0], 0.5)(x), torch.tensor([0.5, 2.5, 2.5]))
    with pytest.raises(DiffusionBlendError, match=r"\(B, 2\)"):
        reward(torch.zeros(3))
    with pytest.raises(DiffusionBlendError, match="NaN"):
        reward(torch.tensor([[float("nan"), 0.0]]))


def test_non_normalizable_tilt_raises() -> None:
    bump = QuadraticForm.quadratic_reward([0.0, 0.0], torch.eye(2))
    with pytest.raises(DiffusionBlendError, match="not normalizable"):
        mixture().tilt(bump, -10.0)  # a negative weight on a bump: exp(+5 |x|^2) outgrows every component
    family_rewards = {"bump": bump}
    with pytest.raises(DiffusionBlendError, match="not normalizable"):
        tilted_target(mixture(), family_rewards, Preference({"bump": -1.0}, 1.0), alpha=0.1)


def test_invalid_mixtures_are_rejected() -> None:
    with pytest.raises(DiffusionBlendError, match="positive definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(DiffusionBlendError, match="shapes disagree"):
        GaussianMixture([0.5, 0.5], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]])
    with pytest.raises(DiffusionBlendError, match="alpha"):
        ideal_family(mixture(), {"r": QuadraticForm.zero(2)}, 0.0, make_scheduler("ddim"))


quadratic_forms = st.builds(
    lambda a, b, c, d, e, f: QuadraticForm(torch.tensor([[a, b], [b, c]]) * 0.5, torch.tensor([d, e]), f),
    *([st.floats(-1.0, 1.0)] * 3),
    *([st.floats(-2.0, 2.0)] * 2),
    st.floats(-3.0, 3.0),
)


def assert_same_mixture(left: GaussianMixture, right: GaussianMixture) -> None:
    torch.testing.assert_close(left.weights, right.weights, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(left.means, right.means, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(left.covariances, right.covariances, atol=1e-9, rtol=1e-7)


@settings(max_examples=40, deadline=None)
@given(quadratic_forms, quadratic_forms)
def test_tilting_twice_equals_tilting_by_the_sum(first: QuadraticForm, second: QuadraticForm) -> None:
    m = mixture()
    try:
        once = m.tilt(first)
    except DiffusionBlendError:
        assume(False)  # the intermediate tilt itself is not normalizable: nothing to compose
    try:
        combined = m.tilt(first + second)
    except DiffusionBlendError:
        with pytest.raises(DiffusionBlendError, match="not normalizable"):
            once.tilt(second)  # same tilted precision: both must refuse
        return
    assert_same_mixture(once.tilt(second), combined)


@settings(max_examples=40, deadline=None)
@given(quadratic_forms, st.floats(-3.0, 3.0))
def test_scale_zero_is_identity_and_scaling_commutes(reward: QuadraticForm, scale: float) -> None:
    m = mixture()
    assert_same_mixture(m.tilt(reward, 0.0), m)
    assert_same_mixture(m.tilt(reward, 0.5 * scale), m.tilt(0.5 * reward, scale))


# --- the zero-Jensen-gap case: a single Gaussian with linear rewards (paper section 2.9, section 8 fact 10) ---

GAUSSIAN = GaussianMixture([1.0], [[0.5, -1.0]], [[[0.6, 0.2], [0.2, 0.4]]])
LINEAR = {"r1": QuadraticForm.linear_reward([1.0, 0.0]), "r2": QuadraticForm.linear_reward([-0.5, 1.0])}
ALPHA = 0.5


def test_single_gaussian_linear_target_is_the_shifted_gaussian() -> None:
    preference = Preference({"r1": 0.3, "r2": 0.7}, 1.5)
    target = tilted_target(GAUSSIAN, LINEAR, preference, ALPHA)
    direction = combined_reward(LINEAR, preference).linear
    expected_mean = GAUSSIAN.means[0] + GAUSSIAN.covariances[0] @ direction * preference.kl_scale / ALPHA
    torch.testing.assert_close(target.means[0], expected_mean)
    torch.testing.assert_close(target.covariances[0], GAUSSIAN.covariances[0])
    exact = expected_rewards(target, LINEAR)
    assert exact["r1"] == pytest.approx(float(expected_mean[0]))


def sample_mean(denoiser, seed: int, num_samples: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    scheduler = make_scheduler("ddim")
    out = sample(denoiser, scheduler, generator=seed, shape=(num_samples, 2), num_inference_steps=50, eta=1.0,
                 progress=False, dtype=F64).samples
    return out.mean(0), out.std(0) / math.sqrt(num_samples)


@pytest.mark.parametrize(
    "weights,kl_scale",
    [({"r1": 0.5, "r2": 0.5}, 1.0), ({"r1": 1.0}, 2.0), ({"r1": 1.4, "r2": -0.4}, 1.0), ({"r1": 0.3, "r2": 0.7}, 0.5)],
)
def test_blended_ideal_experts_reproduce_exact_target_mean(weights: dict, kl_scale: float) -> None:
    preference = Preference(weights, kl_scale)
    scheduler = make_scheduler("ddim")
    family = ideal_family(GAUSSIAN, LINEAR, ALPHA, scheduler)
    target = tilted_target(GAUSSIAN, LINEAR, preference, ALPHA)
    mean, standard_error = sample_mean(BlendedDenoiser(family, preference), seed=11)
    # the initial noise is N(0, I), not the exact x_T marginal: a bias of sqrt(abar_T) |mean| ~ 0.01 at most
    bias = math.sqrt(float(scheduler.alphas_cumprod[-1])) * float(target.mean().abs().max())
    assert (mean - target.mean()).abs().max() <= 4 * standard_error.max() + bias
    # and the target really moved away from the base mean, so the check has teeth
    assert (target.mean() - GAUSSIAN.mean()).abs().max() > 10 * standard_error.max()


def test_switching_blend_matches_deterministic_blend_mean() -> None:
    preference = Preference({"r1": 0.3, "r2": 0.7}, 0.8)  # coefficients (0.2, 0.24, 0.56): all >= 0
    family = ideal_family(GAUSSIAN, LINEAR, ALPHA, make_scheduler("ddim"))
    blended_mean, blended_error = sample_mean(BlendedDenoiser(family, preference), seed=21)
    switching = SwitchingDenoiser(family, preference, generator=5)
    switched_mean, switched_error = sample_mean(switching, seed=22)
    tolerance = 4 * float(torch.sqrt(blended_error**2 + switched_error**2).max())
    assert (blended_mean - switched_mean).abs().max() <= tolerance
    assert (switching.selection_counts > 0).all()  # every member was actually used
