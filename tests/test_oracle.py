"""Importance-weighted oracle against closed forms for a Gaussian base and a linear reward."""

import math

import pytest
import torch

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.evaluation.oracle import (
    achieved_fraction,
    best_objective,
    importance_weighted_oracle,
)
from diffusion_blend.evaluation.stats import mean_and_standard_error
from diffusion_blend.preference import Preference

# base N(0, I) in 2-D, r1 = x_1, r2 = x_2: target N(lambda w / alpha, I), log E[exp(lambda r_w/alpha)] = |lambda
# w/alpha|^2/2
X = torch.randn(400_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
REWARDS = {"r1": X[:, 0], "r2": X[:, 1]}


@pytest.mark.parametrize("w1, kl_scale, alpha", [(0.3, 1.0, 1.0), (0.8, 2.0, 2.0), (-0.5, 0.5, 1.0)])
def test_oracle_matches_the_tilted_gaussian(w1, kl_scale, alpha):
    est = importance_weighted_oracle(REWARDS, Preference({"r1": w1, "r2": 1 - w1}, kl_scale), alpha)
    shift = [kl_scale * w1 / alpha, kl_scale * (1 - w1) / alpha]
    for name, expected in zip(["r1", "r2"], shift):
        assert abs(est.expected_rewards[name] - expected) < 5 * est.standard_errors[name] + 1e-3
    assert est.log_partition == pytest.approx(sum(s * s for s in shift) / 2, abs=0.01)
    # ESS of a Gaussian tilt: N exp(-|shift|^2)
    assert est.ess_fraction == pytest.approx(math.exp(-sum(s * s for s in shift)), rel=0.05)


def test_best_objective_and_fraction_closed_form():
    alpha = 0.5
    assert best_objective(X[:, 0], alpha) == pytest.approx(1 / (2 * alpha), rel=0.02)
    # the exact target N(1/alpha, 1) has E[r] = 1/alpha and KL = 1/(2 alpha^2): fraction 1
    assert achieved_fraction(1 / alpha, 1 / (2 * alpha**2), X[:, 0], alpha) == pytest.approx(1.0, abs=0.03)
    assert achieved_fraction(0.0, 0.0, X[:, 0], alpha) == pytest.approx(0.0, abs=0.01)


def test_bad_inputs():
    with pytest.raises(DiffusionBlendError, match="alpha"):
        importance_weighted_oracle(REWARDS, Preference({"r1": 1.0}), 0.0)
    with pytest.raises(DiffusionBlendError, match="NaN"):
        importance_weighted_oracle({"r1": torch.tensor([1.0, float("nan")])}, Preference({"r1": 1.0}), 1.0)
    with pytest.raises(DiffusionBlendError, match="sizes"):
        importance_weighted_oracle({"r1": torch.ones(3), "r2": torch.ones(4)}, Preference({"r1": 1.0}), 1.0)
    with pytest.raises(DiffusionBlendError, match="no rewards for r3"):
        importance_weighted_oracle(REWARDS, Preference({"r3": 1.0}), 1.0)
    with pytest.raises(DiffusionBlendError, match="constant"):
        achieved_fraction(1.0, 0.0, torch.ones(10), 1.0)


def test_mean_and_standard_error():
    mean, se = mean_and_standard_error(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert mean_and_standard_error(torch.tensor([7.0])) == (7.0, 0.0)
