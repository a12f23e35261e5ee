"""Layer 4 testbed: Gaussian mixtures with exact tilted targets and exact noise predictions.

The paper's target for a preference ``(w, lambda)`` (section 1) is

    p_target(x) ∝ p_pre(x) exp(lambda * r_w(x) / alpha),   r_w = sum_i w_i r_i.

When ``p_pre`` is a Gaussian mixture and every reward is a quadratic form
``r(x) = -x^T A x / 2 + b^T x + c`` (linear rewards ``a.x`` and quadratic rewards ``-(x-c)^T Q (x-c)/2``
included), the target is again a Gaussian mixture: tilting component ``N(mu, Sigma)`` by ``exp(s r)`` gives
precision ``Sigma^-1 + s A``, mean ``(Sigma^-1 + s A)^-1 (Sigma^-1 mu + s b)`` and a new weight proportional
to the old one times the component's partition function. Under the VP forward process every component
``k`` becomes ``N(sqrt(abar) mu_k, abar Sigma_k + (1 - abar) I)``, so the exact score and noise prediction
``eps = -sqrt(1 - abar) * score`` (paper section 2.8) of every noised marginal is available in closed form.
The ideal fine-tuned expert for reward ``r_i`` at KL weight ``alpha`` is the tilt by ``r_i / alpha``
(Proposition 1's exact control); the paper's sanity cases (section 2.9, section 8 fact 10) follow.

Flow matching (rectified flow ``x_s = (1 - s) x_0 + s eps``, SD3 / FLUX) has the same closed forms: every component
becomes ``N((1 - s) mu_k, (1 - s)^2 Sigma_k + s^2 I)`` and the exact velocity is
``v = E[eps - x_0 | x_s] = -(x_s + s score_s(x_s)) / (1 - s)`` (:class:`MixtureVelocity`).

Everything is computed in float64; denoisers return the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffusion_blend.denoisers import CallableFamily
from diffusion_blend.errors import DiffusionBlendError, finite_number
from diffusion_blend.preference import Preference

DTYPE = torch.float64


def _tensor(value: Any, what: str, ndim: int) -> torch.Tensor:
    try:
        out = torch.as_tensor(value, dtype=DTYPE).clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise DiffusionBlendError(f"{what} must be numeric, got {value!r}") from err
    if out.ndim != ndim:
        raise DiffusionBlendError(f"{what} must have {ndim} dimension(s), got shape {tuple(out.shape)}")
    if not torch.isfinite(out).all():
        raise DiffusionBlendError(f"{what} contains NaN or infinite values")
    return out


def _check_points(x: torch.Tensor, dim: int, what: str = "points") -> torch.Tensor:
    if not torch.is_tensor(x) or x.ndim != 2 or x.shape[1] != dim:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise DiffusionBlendError(f"{what} must have shape (B, {dim}), got {shape}")
    if not torch.isfinite(x).all():
        raise DiffusionBlendError(f"{what} contain NaN or infinite values")
    return x.to(DTYPE)



def check_alpha(alpha: Any) -> float:
    """The reference KL weight ``alpha`` (paper section 1) must be a positive finite number."""
    alpha = finite_number(alpha, "alpha (KL weight)")
    if alpha <= 0:
        raise DiffusionBlendError(f"alpha (KL weight) must be > 0, got {alpha}")
    return alpha


@dataclass(frozen=True)
class QuadraticForm:
    """A reward ``r(x) = -x^T A x / 2 + b^T x + c`` on ``R^d`` (``A`` = ``curvature``, symmetric).

    A plain callable on ``(B, d)`` tensors returning ``(B,)``. Sums and scalar multiples are again quadratic
    forms, so any weighted sum of basis rewards ``r_w = sum_i w_i r_i`` (paper section 1) is one.
    """

    curvature: torch.Tensor
    linear: torch.Tensor
    offset: float = 0.0

    def __post_init__(self) -> None:
        linear = _tensor(self.linear, "linear coefficient b", 1)
        curvature = _tensor(self.curvature, "curvature A", 2)
        if curvature.shape != (linear.shape[0], linear.shape[0]):
            raise DiffusionBlendError(
                f"curvature A must be ({linear.shape[0]}, {linear.shape[0]}) to match b, got {tuple(curvature.shape)}"
            )
        object.__setattr__(self, "linear", linear)
        object.__setattr__(self, "curvature", (curvature + curvature.T) / 2)
        object.__setattr__(self, "offset", finite_number(self.offset, "offset c"))

    @classmethod
    def linear_reward(cls, direction: Any, offset: float = 0.0) -> QuadraticForm:
        """``r(x) = a.x + offset``."""
        direction = _tensor(direction, "direction a", 1)
        return cls(torch.zeros(len(direction), len(direction), dtype=DTYPE), direction, offset)

    @classmethod
    def quadratic_reward(cls, center: Any, curvature: Any) -> QuadraticForm:
        """``r(x) = -(x - center)^T Q (x - center) / 2`` (a bump at ``center`` when ``Q`` is positive definite)."""
        center = _tensor(center, "center", 1)
        curvature = _tensor(curvature, "curvature Q", 2)
        if curvature.shape != (len(center), len(center)):
            raise DiffusionBlendError(
                f"curvature Q must be ({len(center)}, {len(center)}), got {tuple(curvature.shape)}"
            )
        curvature = (curvature + curvature.T) / 2
        return cls(curvature, curvature @ center, float(-0.5 * center @ curvature @ center))

    @classmethod
    def zero(cls, dim: int) -> QuadraticForm:
        return cls(torch.zeros(dim, dim, dtype=DTYPE), torch.zeros(dim, dtype=DTYPE), 0.0)

    @staticmethod
    def weighted_sum(rewards: Sequence[QuadraticForm], weights: Sequence[float]) -> QuadraticForm:
        """``sum_i w_i r_i`` (the combined reward ``r(w)`` of paper section 1)."""
        if len(rewards) != len(weights) or not rewards:
            raise DiffusionBlendError(f"{len(weights)} weights for {len(rewards)} rewards")
        total = QuadraticForm.zero(rewards[0].dim)
        for reward, weight in zip(rewards, weights):
            total = total + finite_number(weight, "reward weight") * reward
        return total

    @property
    def dim(self) -> int:
        return self.linear.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        points = _check_points(x, self.dim)
        values = -0.5 * ((points @ self.curvature) * points).sum(1) + points @ self.linear + self.offset
        return values.to(x.dtype)

    def gradient(self, x: torch.Tensor) -> torch.Tensor:
        """``grad r(x) = -A x + b``, shape ``(B, d)``."""
        points = _check_points(x, self.dim)
        return (-points @ self.curvature + self.linear).to(x.dtype)

    def __add__(self, other: QuadraticForm) -> QuadraticForm:
        if not isinstance(other, QuadraticForm):
            return NotImplemented
        if other.dim != self.dim:
            raise DiffusionBlendError(f"cannot add rewards on R^{self.dim} and R^{other.dim}")
        return QuadraticForm(self.curvature + other.curvature, self.linear + other.linear, self.offset + other.offset)

    def __mul__(self, scale: float) -> QuadraticForm:
        scale = finite_number(scale, "reward scale")
        return QuadraticForm(scale * self.curvature, scale * self.linear, scale * self.offset)

    __rmul__ = __mul__


@dataclass(frozen=True)
class GaussianMixture:
    """``sum_k weights[k] N(means[k], covariances[k])`` on ``R^d``.

    ``weights`` must be positive (they are normalized to sum to one); covariances symmetric positive definite.
    """

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor

    def __post_init__(self) -> None:
        weights = _tensor(self.weights, "mixture weights", 1)
        means = _tensor(self.means, "mixture means", 2)
        covariances = _tensor(self.covariances, "mixture covariances", 3)
        k, d = means.shape
        if weights.shape != (k,) or covariances.shape != (k, d, d):
            raise DiffusionBlendError(
                f"mixture shapes disagree: weights {tuple(weights.shape)}, means {tuple(means.shape)}, "
                f"covariances {tuple(covariances.shape)} (expected ({k},), ({k}, {d}), ({k}, {d}, {d}))"
            )
        if (weights <= 0).any():
            raise DiffusionBlendError("mixture weights must be > 0")
        covariances = (covariances + covariances.transpose(1, 2)) / 2
        eigvals, eigvecs = torch.linalg.eigh(covariances)
        if (eigvals <= 0).any():
            raise DiffusionBlendError("mixture covariances must be positive definite")
        object.__setattr__(self, "weights", weights / weights.sum())
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "covariances", covariances)
        object.__setattr__(self, "_eigvals", eigvals)
        object.__setattr__(self, "_eigvecs", eigvecs)

    @classmethod
    def isotropic(cls, weights: Any, means: Any, std: float) -> GaussianMixture:
        means = _tensor(means, "mixture means", 2)
        eye = torch.eye(means.shape[1], dtype=DTYPE)
        return cls(weights, means, (float(std) ** 2) * eye.expand(means.shape[0], -1, -1).clone())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def _component_terms(self, x: torch.Tensor, abar: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-component ``log(w_k N_k(x))`` and ``grad log N_k(x)`` of the marginal noised to ``abar``.

        Uses ``abar Sigma_k + (1 - abar) I = U_k (abar Lambda_k + (1 - abar)) U_k^T``: one eigendecomposition
        serves every noise level. ``abar`` is a scalar or one value per row of ``x``.
        """
        abar = torch.as_tensor(abar, dtype=DTYPE)
        abar = abar.reshape(-1, 1) if abar.ndim == 1 else abar  # (B, 1) or scalar
        log_terms, gradients = [], []
        for k in range(self.num_components):  # K is small; per-component matmuls beat batched einsums here
            projected = (x - abar.sqrt() * self.means[k]) @ self._eigvecs[k]  # U_k^T (x - m_k), (B, d)
            variances = abar * self._eigvals[k] + (1 - abar)  # eigenvalues of the noised covariance
            scaled = projected / variances
            log_terms.append(-0.5 * ((projected * scaled).sum(1) + variances.log().sum(-1)) + self.weights[k].log())
            gradients.append(-scaled @ self._eigvecs[k].T)
        log_terms = torch.stack(log_terms, 1) - 0.5 * self.dim * math.log(2 * math.pi)
        return log_terms, torch.stack(gradients, 1)

    def log_prob(self, x: torch.Tensor, abar: torch.Tensor | float = 1.0) -> torch.Tensor:
        """``log p(x)``; with ``abar < 1`` the log density of the forward-noised marginal."""
        terms, _ = self._component_terms(_check_points(x, self.dim), abar)
        return torch.logsumexp(terms, dim=1)

    def score(self, x: torch.Tensor, abar: torch.Tensor | float = 1.0) -> torch.Tensor:
        """``grad_x log p_abar(x)`` of the marginal noised to ``abar`` (scalar or one per row), float64."""
        terms, gradients = self._component_terms(_check_points(x, self.dim), abar)
        responsibilities = torch.softmax(terms, dim=1)
        return torch.einsum("bk,bkd->bd", responsibilities, gradients)

    def noised(self, abar: float) -> GaussianMixture:
        """The VP forward marginal: component ``k -> N(sqrt(abar) mu_k, abar Sigma_k + (1 - abar) I)``."""
        abar = finite_number(abar, "abar")
        if not 0.0 < abar <= 1.0:
            raise DiffusionBlendError(f"abar must be in (0, 1], got {abar}")
        eye = torch.eye(self.dim, dtype=DTYPE)
        return GaussianMixture(self.weights, math.sqrt(abar) * self.means, abar * self.covariances + (1 - abar) * eye)

    def sample(self, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        """``num_samples`` draws, shape ``(num_samples, d)``, float64, reproducible from ``generator``."""
        if int(num_samples) < 1:
            raise DiffusionBlendError(f"num_samples must be >= 1, got {num_samples}")
        components = torch.multinomial(self.weights, int(num_samples), replacement=True, generator=generator)
        noise = torch.randn(int(num_samples), self.dim, generator=generator, dtype=DTYPE)
        scales = self._eigvecs * self._eigvals.sqrt()[:, None, :]  # U sqrt(Lambda): a square root of Sigma
        return self.means[components] + torch.einsum("bde,be->bd", scales[components], noise)

    def _tilted_components(self, reward: QuadraticForm, scale: float) -> tuple[torch.Tensor, ...]:
        if reward.dim != self.dim:
            raise DiffusionBlendError(f"reward is on R^{reward.dim} but the mixture on R^{self.dim}")
        scale = finite_number(scale, "tilt scale")
        precisions = torch.linalg.inv(self.covariances)
        tilted_precisions = precisions + scale * reward.curvature
        tilted_precisions = (tilted_precisions + tilted_precisions.transpose(1, 2)) / 2
        eigvals = torch.linalg.eigvalsh(tilted_precisions)
        if (eigvals <= 1e-12 * eigvals.abs().amax(-1, keepdim=True).clamp(min=1.0)).any():
            raise DiffusionBlendError(
                f"the tilt exp({scale:g} * r) of this mixture is not normalizable: Sigma^-1 + {scale:g} A is not "
                "positive definite for some component (a reward that grows quadratically, e.g. a negative weight "
                "on a quadratic reward, outweighs the Gaussian tails)"
            )
        tilted_covariances = torch.linalg.inv(tilted_precisions)
        natural = torch.einsum("kde,ke->kd", precisions, self.means) + scale * reward.linear
        tilted_means = torch.einsum("kde,ke->kd", tilted_covariances, natural)
        # log of  int N(x; mu, Sigma) exp(s r(x)) dx  per component
        log_partition = (
            0.5 * (torch.logdet(tilted_covariances) - torch.logdet(self.covariances))
            + 0.5 * (natural * tilted_means).sum(1)
            - 0.5 * (self.means * torch.einsum("kde,ke->kd", precisions, self.means)).sum(1)
            + scale * reward.offset
        )
        return tilted_means, tilted_covariances, log_partition

    def log_partition(self, reward: QuadraticForm, scale: float = 1.0) -> float:
        """``log Z = log E_p[exp(scale * r(x))]``."""
        _, _, log_partition = self._tilted_components(reward, scale)
        return float(torch.logsumexp(self.weights.log() + log_partition, 0))

    def tilt(self, reward: QuadraticForm, scale: float = 1.0) -> GaussianMixture:
        """The exact mixture ``p(x) exp(scale * r(x)) / Z`` (paper section 1's target with ``scale = lambda/alpha``).

        Raises :class:`DiffusionBlendError` when the tilt is not normalizable.
        """
        means, covariances, log_partition = self._tilted_components(reward, scale)
        log_weights = self.weights.log() + log_partition
        return GaussianMixture(torch.softmax(log_weights, 0), means, covariances)

    def expectation(self, reward: QuadraticForm) -> float:
        """Exact ``E_p[r(x)] = sum_k w_k (-(tr(A Sigma_k) + mu_k^T A mu_k)/2 + b^T mu_k + c)``."""
        if reward.dim != self.dim:
            raise DiffusionBlendError(f"reward is on R^{reward.dim} but the mixture on R^{self.dim}")
        trace = torch.einsum("de,ked->k", reward.curvature, self.covariances)
        quadratic = (self.means @ reward.curvature * self.means).sum(1)
        per_component = -0.5 * (trace + quadratic) + self.means @ reward.linear + reward.offset
        return float(self.weights @ per_component)


class MixtureDenoiser:
    """Exact noise prediction of a mixture's forward-noised marginals (denoiser contract ``(x_t, t) -> eps``).

    ``eps(x_t, t) = -sqrt(1 - abar_t) * grad log p_t(x_t)`` (paper section 2.8) with ``abar_t`` read from the
    scheduler's ``alphas_cumprod``: the ideal denoiser trained to convergence on ``mixture``.
    """

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor):
        self.mixture = mixture
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).to(DTYPE)

    def __call__(self, x_t: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        if torch.is_tensor(t) and t.numel() != 1:
            raise DiffusionBlendError(f"the timestep must be shared by the batch, got shape {tuple(t.shape)}")
        step = int(t)
        if not 0 <= step < len(self.alphas_cumprod):
            raise DiffusionBlendError(f"timestep {step} outside [0, {len(self.alphas_cumprod)})")
        abar = self.alphas_cumprod[step]
        eps = -(1 - abar).sqrt() * self.mixture.score(x_t, abar)
        return eps.to(x_t.dtype)


class MixtureVelocity:
    """Exact rectified-flow velocity ``E[eps - x_0 | x_s]`` of a mixture (denoiser contract ``(x_s, t) -> v``).

    ``x_s = (1 - s) x_0 + s eps`` with ``s = t / num_train_timesteps`` (diffusers' flow-matching timesteps are
    ``sigma * num_train_timesteps``): the marginal is the mixture with components ``N((1 - s) mu_k, (1 - s)^2
    Sigma_k + s^2 I)``, Tweedie gives ``E[eps | x_s] = -s score`` and ``E[x_0 | x_s] = (x_s + s^2 score) / (1 - s)``,
    so ``v = -(x_s + s score) / (1 - s)``; at ``s = 1`` (pure noise) ``v = x_1 - E[x_0]``. The ideal velocity model
    trained to convergence on ``mixture``.
    """

    def __init__(self, mixture: GaussianMixture, num_train_timesteps: int = 1000):
        self.mixture = mixture
        self.num_train_timesteps = int(num_train_timesteps)

    def __call__(self, x_s: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        if torch.is_tensor(t) and t.numel() != 1:
            raise DiffusionBlendError(f"the timestep must be shared by the batch, got shape {tuple(t.shape)}")
        s = float(t) / self.num_train_timesteps
        if not 0.0 < s <= 1.0:
            raise DiffusionBlendError(f"flow time s = {s:g} outside (0, 1]")
        x = _check_points(x_s, self.mixture.dim).to(DTYPE)
        if s == 1.0:
            return (x - self.mixture.mean()).to(x_s.dtype)
        mixture = self.mixture
        eye = torch.eye(mixture.dim, dtype=DTYPE)
        marginal = GaussianMixture(
            mixture.weights, (1 - s) * mixture.means, (1 - s) ** 2 * mixture.covariances + s**2 * eye
        )
        return (-(x + s * marginal.score(x)) / (1 - s)).to(x_s.dtype)


def _is_flow_scheduler(scheduler: Any) -> bool:
    return not hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "sigmas")


def _alphas_cumprod(scheduler_or_alphas: Any) -> torch.Tensor:
    return torch.as_tensor(getattr(scheduler_or_alphas, "alphas_cumprod", scheduler_or_alphas))


def ideal_expert(base: GaussianMixture, reward: QuadraticForm, alpha: float) -> GaussianMixture:
    """The optimum of ``E[r] - alpha KL(p || p_pre)``: ``p_pre exp(r / alpha) / Z`` (paper section 1)."""
    return base.tilt(reward, 1.0 / check_alpha(alpha))


def combined_reward(rewards: Mapping[str, QuadraticForm], preference: Preference) -> QuadraticForm:
    """``r_w = sum_i w_i r_i`` over the preference's weights (unknown names raise)."""
    preference.coefficients(tuple(rewards))  # validates the names
    names = list(preference.weights)
    return QuadraticForm.weighted_sum([rewards[name] for name in names], [preference.weights[n] for n in names])


def tilted_target(
    base: GaussianMixture, rewards: Mapping[str, QuadraticForm], preference: Preference, alpha: float
) -> GaussianMixture:
    """The exact target ``p_pre exp(lambda r_w / alpha) / Z`` of a preference (paper section 1)."""
    return base.tilt(combined_reward(rewards, preference), preference.kl_scale / check_alpha(alpha))


def ideal_family(
    base: GaussianMixture, rewards: Mapping[str, QuadraticForm], alpha: float | Mapping[str, float],
    scheduler_or_alphas_cumprod: Any,
) -> CallableFamily:
    """Base and one ideal fine-tuned expert per basis reward at KL weight ``alpha`` (one for all, or one per reward:
    experts fine-tuned with different KL weights), as exact denoisers.

    A flow-matching scheduler (diffusers' ``FlowMatchEulerDiscreteScheduler`` or our ``FlowMatchSDEScheduler``) gives
    exact velocities (:class:`MixtureVelocity`) instead of noise predictions."""
    alphas = dict(alpha) if isinstance(alpha, Mapping) else {name: alpha for name in rewards}
    if _is_flow_scheduler(scheduler_or_alphas_cumprod):
        steps = int(scheduler_or_alphas_cumprod.config.num_train_timesteps)
        experts = {name: MixtureVelocity(ideal_expert(base, reward, alphas[name]), steps)
                   for name, reward in rewards.items()}
        return CallableFamily(MixtureVelocity(base, steps), experts)
    alphas_cumprod = _alphas_cumprod(scheduler_or_alphas_cumprod)
    experts = {name: MixtureDenoiser(ideal_expert(base, reward, alphas[name]), alphas_cumprod)
               for name, reward in rewards.items()}
    return CallableFamily(MixtureDenoiser(base, alphas_cumprod), experts)


def expected_rewards(mixture: GaussianMixture, rewards: Mapping[str, QuadraticForm]) -> dict[str, float]:
    """Exact ``E[r_i]`` under ``mixture`` for each named reward."""
    return {name: mixture.expectation(reward) for name, reward in rewards.items()}
