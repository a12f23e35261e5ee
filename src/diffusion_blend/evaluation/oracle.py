"""The importance-weighted oracle of the exact target (no training).

For a preference (w, lambda) and the experts' KL weight alpha the target is
``p_target(x) ∝ p_pre(x) exp(lambda r_w(x) / alpha)`` (paper section 1). Given rewards of N samples from the base
model, self-normalised importance sampling with weights ``exp(lambda r_w / alpha)`` estimates any target
expectation, and ``alpha log E_pre[exp(r/alpha)]`` is the best achievable value of the KL-regularised objective
``E_p[r] - alpha KL(p || p_pre)`` (attained by the target; Donsker-Varadhan). The effective sample size
``(sum v)^2 / sum v^2`` tells when the estimate is unreliable (small ESS: the target lives where the base rarely goes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.preference import Preference


@dataclass(frozen=True)
class OracleEstimate:
    """Importance-weighted estimates of the exact target from base samples."""

    expected_rewards: dict[str, float]  # E_target[r_i]
    standard_errors: dict[str, float]  # delta-method standard errors of the self-normalised estimates
    effective_sample_size: float
    num_samples: int
    log_partition: float  # log E_pre[exp(lambda r_w / alpha)]

    @property
    def ess_fraction(self) -> float:
        return self.effective_sample_size / self.num_samples


def _check_rewards(base_rewards: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not base_rewards:
        raise DiffusionBlendError("the oracle needs the base samples' rewards")
    values = {name: torch.as_tensor(v, dtype=torch.float64).flatten() for name, v in base_rewards.items()}
    sizes = {v.numel() for v in values.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise DiffusionBlendError(f"every reward needs one value per base sample, got sizes {sorted(sizes)}")
    for name, v in values.items():
        if not torch.isfinite(v).all():
            raise DiffusionBlendError(f"reward {name!r} has NaN or infinite values on base samples")
    return values


def weighted_reward(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``r_w = sum_i w_i r_i`` per sample."""
    missing = [name for name in weights if name not in rewards]
    if missing:
        raise DiffusionBlendError(f"no rewards for {', '.join(missing)}; have {', '.join(rewards)}")
    return sum(float(w) * torch.as_tensor(rewards[name], dtype=torch.float64) for name, w in weights.items())


def importance_weighted_oracle(
    base_rewards: Mapping[str, torch.Tensor], preference: Preference, alpha: float
) -> OracleEstimate:
    """Estimate ``E_target[r_i]`` for every reward, with standard errors and the effective sample size."""
    if not (alpha > 0 and math.isfinite(alpha)):
        raise DiffusionBlendError(f"alpha must be a positive number, got {alpha}")
    rewards = _check_rewards(base_rewards)
    log_v = preference.kl_scale * weighted_reward(rewards, preference.weights) / alpha
    n = log_v.numel()
    log_partition = float(torch.logsumexp(log_v, 0) - math.log(n))
    v = torch.softmax(log_v, 0)  # normalised importance weights
    ess = float(1.0 / (v**2).sum())
    means, errors = {}, {}
    for name, r in rewards.items():
        mean = float((v * r).sum())
        means[name] = mean
        errors[name] = float(((v**2) * (r - mean) ** 2).sum().sqrt())
    return OracleEstimate(means, errors, ess, n, log_partition)


def best_objective(base_reward: torch.Tensor, alpha: float) -> float:
    """``alpha log E_pre[exp(r/alpha)]``: the optimum of ``E_p[r] - alpha KL(p || p_pre)`` (Donsker-Varadhan)."""
    r = _check_rewards({"r": base_reward})["r"]
    return alpha * float(torch.logsumexp(r / alpha, 0) - math.log(r.numel()))


def achieved_fraction(
    fine_tuned_mean_reward: float, path_kl: float, base_reward: torch.Tensor, alpha: float
) -> float:
    """``(J_ft - E_pre[r]) / (alpha log E_pre[exp(r/alpha)] - E_pre[r])`` with ``J_ft = E_ft[r] - alpha KL``."""
    base_mean = float(torch.as_tensor(base_reward, dtype=torch.float64).mean())
    gain = best_objective(base_reward, alpha) - base_mean
    if gain <= 0:
        raise DiffusionBlendError("the reward is constant on the base samples: no gain is achievable")
    return (fine_tuned_mean_reward - alpha * path_kl - base_mean) / gain
