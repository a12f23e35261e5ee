"""Testbeds with closed-form answers (layer 4): exact targets to measure the blend against."""

from .gmm import (
    GaussianMixture,
    MixtureDenoiser,
    MixtureVelocity,
    QuadraticForm,
    combined_reward,
    expected_rewards,
    ideal_expert,
    ideal_family,
    tilted_target,
)

__all__ = [
    "GaussianMixture",
    "MixtureDenoiser",
    "MixtureVelocity",
    "QuadraticForm",
    "combined_reward",
    "expected_rewards",
    "ideal_expert",
    "ideal_family",
    "tilted_target",
]
