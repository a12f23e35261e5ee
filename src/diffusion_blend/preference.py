"""Layer 1: the blend rule.

A :class:`Preference` is what a user chooses at inference time: one weight per basis reward ``w`` and a
KL scale ``lambda`` (``kl_scale``). Its target distribution is (paper section 1)

    p_target(x) ∝ p_pre(x) exp(lambda * sum_i w_i r_i(x) / alpha),

where ``alpha`` is the KL weight every expert was fine-tuned with. Because the approximate optimal control is
linear in the reward (paper Lemma 1-2, section 2.3-2.6), the target's noise prediction is the affine blend

    eps = eps_pre + lambda * sum_i w_i (eps_i - eps_pre) = c_0 eps_pre + sum_i c_i eps_i,
    c_i = lambda w_i,   c_0 = 1 - lambda sum_i w_i.

The coefficients always sum to one, so blending noise predictions equals blending reverse-SDE drifts and
DDIM/DDPM transition means (paper section 2.8).

Special cases:

- DB-MPA (paper Lemma 2): ``lambda = 1`` and ``sum w = 1`` give ``c_0 = 0``: the base model is not evaluated.
- DB-KLA (paper section 2.5): one expert, ``c = (1 - lambda, lambda)``; ``lambda > 1`` extrapolates
  (negative base coefficient), ``lambda = 0`` is the base model.
- Combined MPA + KLA (paper section 2.6): the general formula.
- Weights need not sum to one: ``c_0`` absorbs the difference, and the target is still the tilt by
  ``lambda * r_w / alpha``. Negative weights are allowed (they push *away* from a reward: extrapolation).
  Both are outside the regime the paper evaluates; see docs/method.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from diffusion_blend.errors import DiffusionBlendError, finite_number

if TYPE_CHECKING:  # torch is imported where a tensor is made, so `dblend coefficients` starts without it
    import torch

BASE = None
"""Member key of the pre-trained (base) model in a coefficient vector; experts are keyed by name."""


class PreferenceError(DiffusionBlendError):
    """A preference, or its pairing with a set of experts, is invalid."""



@dataclass(frozen=True)
class Preference:
    """Reward weights ``w`` (by basis-reward name) and KL scale ``lambda`` chosen at inference time."""

    weights: Mapping[str, float]
    kl_scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping) or len(self.weights) == 0:
            raise PreferenceError("a preference needs at least one reward weight, e.g. {'aesthetic': 1.0}")
        clean = {}
        for name, weight in self.weights.items():
            if not isinstance(name, str) or not name:
                raise PreferenceError(f"reward names must be non-empty strings, got {name!r}")
            clean[name] = finite_number(weight, f"weight of {name!r}", error=PreferenceError)
        kl_scale = finite_number(self.kl_scale, "kl_scale (lambda)", error=PreferenceError)
        if kl_scale < 0:
            raise PreferenceError(f"kl_scale (lambda) must be >= 0, got {kl_scale}")
        object.__setattr__(self, "weights", dict(clean))
        object.__setattr__(self, "kl_scale", kl_scale)

    @classmethod
    def parse(cls, text: str, kl_scale: float = 1.0) -> Preference:
        """Parse ``"aesthetic=0.3,align=0.7"``."""
        weights = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise PreferenceError(f"cannot parse weight {item!r}: expected name=value, e.g. aesthetic=0.3")
            if name.strip() in weights:
                raise PreferenceError(f"weight for {name.strip()!r} given twice")
            weights[name.strip()] = finite_number(value.strip(), f"weight of {name.strip()!r}", error=PreferenceError)
        return cls(weights, kl_scale)

    @classmethod
    def kl_only(cls, expert: str, kl_scale: float) -> Preference:
        """DB-KLA: a single expert at KL scale ``lambda`` (paper section 2.5)."""
        return cls({expert: 1.0}, kl_scale)

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.weights.items())), self.kl_scale))

    def __str__(self) -> str:
        weights = ",".join(f"{name}={weight:g}" for name, weight in self.weights.items())
        return f"{weights};kl_scale={self.kl_scale:g}"

    def coefficients(self, expert_names: Iterable[str] | None = None) -> BlendCoefficients:
        """The coefficient vector over (base, experts...) of the blend rule (module docstring).

        ``expert_names`` are the experts available; a weight naming anything else is an error, and experts
        without a weight get weight 0.
        """
        names = tuple(self.weights) if expert_names is None else tuple(expert_names)
        unknown = [name for name in self.weights if name not in names]
        if unknown:
            raise PreferenceError(
                f"no expert named {', '.join(map(repr, unknown))}; available: {', '.join(names) or '(none)'}"
            )
        experts = {name: self.kl_scale * self.weights.get(name, 0.0) for name in names}
        base = 1.0 - self.kl_scale * sum(self.weights.values())
        return BlendCoefficients(base=base, experts=experts)


@dataclass(frozen=True)
class BlendCoefficients:
    """``c_0`` (base) and ``c_i`` (experts) of the blend rule; they sum to one."""

    base: float
    experts: Mapping[str, float] = field(default_factory=dict)

    def items(self) -> list[tuple[str | None, float]]:
        """All (member, coefficient) pairs, base first (member ``BASE``)."""
        return [(BASE, self.base), *self.experts.items()]

    def active(self) -> list[tuple[str | None, float]]:
        """Members with a non-zero coefficient: the only ones that need evaluating."""
        return [(member, coef) for member, coef in self.items() if coef != 0.0]

    @property
    def is_convex(self) -> bool:
        """All coefficients are >= 0, so they form a probability vector (DB-MPA-LS is valid)."""
        return all(coef >= 0.0 for _, coef in self.items())

    def probabilities(self) -> tuple[list[str | None], torch.Tensor]:
        """Members and their selection probabilities for DB-MPA-LS (paper Proposition 2).

        Raises :class:`PreferenceError` if a coefficient is negative (lambda > 1 or a negative weight):
        a negative coefficient cannot be a probability, and the deterministic blend (DB-MPA) must be used.
        """
        negative = [("base" if m is BASE else repr(m), c) for m, c in self.items() if c < 0]
        if negative:
            listed = ", ".join(f"{m}: {c:g}" for m, c in negative)
            raise PreferenceError(
                f"DB-MPA-LS needs non-negative coefficients, got {listed} (kl_scale > 1 or a negative weight "
                "extrapolates); use the deterministic blend, method 'mpa' (DB-MPA), instead"
            )
        import torch

        members = [member for member, coef in self.active()]
        probs = torch.tensor([coef for _, coef in self.active()], dtype=torch.float64)
        return members, probs / probs.sum()


def blend_predictions(coefficients: Sequence[float], predictions: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_j c_j eps_j``: the blended noise (or velocity, or drift) prediction."""
    if len(coefficients) != len(predictions) or not predictions:
        raise PreferenceError(f"{len(coefficients)} coefficients for {len(predictions)} predictions")
    out = coefficients[0] * predictions[0]
    for coef, pred in zip(coefficients[1:], predictions[1:]):
        out = out + coef * pred
    return out
