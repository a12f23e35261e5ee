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


Points = tuple[tuple[float, float], ...]
"""Key points ``((u, value), ...)`` of a piecewise-linear function of the sampler's progress ``u`` in ``[0, 1]``."""


def _points(spec: str, what: str) -> Points:
    """``"0.8"`` (constant), ``"0.8:0.2"`` (start to end) or ``"1@0:1@0.5:0@0.5:0@1"`` (key points ``value@u``)."""
    items = [item.strip() for item in spec.split(":")]
    if not all(items):
        raise PreferenceError(f"cannot parse {what} {spec!r}: expected V, START:END or V@U:V@U:... with U in [0, 1]")
    positioned = ["@" in item for item in items]
    if any(positioned) and not all(positioned):
        raise PreferenceError(f"cannot parse {what} {spec!r}: give every key point its position (V@U) or none")
    if not any(positioned):
        values = [finite_number(item, what, error=PreferenceError) for item in items]
        if len(values) > 2:
            raise PreferenceError(f"cannot parse {what} {spec!r}: more than START:END needs positions (V@U:...)")
        return tuple(zip((0.0, 1.0), values * 2 if len(values) == 1 else values))
    points = []
    for item in items:
        value, _, position = item.partition("@")
        u = finite_number(position, f"the position in {what}", error=PreferenceError)
        if not 0.0 <= u <= 1.0 or (points and u < points[-1][0]):
            raise PreferenceError(f"cannot parse {what} {spec!r}: positions run from 0 to 1, non-decreasing")
        points.append((u, finite_number(value, what, error=PreferenceError)))
    return tuple(points)


def _interpolate(points: Points, u: float) -> float:
    """The piecewise-linear value at ``u`` (constant beyond the ends; at a jump, the value after it)."""
    if u <= points[0][0]:
        return points[0][1] if u < points[0][0] or len(points) == 1 or points[1][0] != u else points[1][1]
    for (u0, v0), (u1, v1) in zip(points, points[1:]):
        if u < u1:
            return v0 + (v1 - v0) * (u - u0) / (u1 - u0) if u1 > u0 else v1
    return points[-1][1]


@dataclass(frozen=True)
class PreferenceSchedule:
    """Weights and KL scale that change with the sampler's progress ``u`` (0 at the first step, 1 at the last):
    piecewise-linear through key points (docs/method.md, "Schedules over the steps").

    At step ``k`` of ``K`` the blend uses :meth:`at` ``(k / (K - 1))``, a :class:`Preference`. A schedule is not a
    tilt of the base in general: its sampler's output distribution has no closed form; constant schedules are the
    plain blend.
    """

    weights: Mapping[str, Points]
    kl_scale: Points = ((0.0, 1.0), (1.0, 1.0))

    def __post_init__(self) -> None:
        if not self.weights:
            raise PreferenceError("a schedule needs at least one reward weight")
        for what, points in [*self.weights.items(), ("kl_scale", self.kl_scale)]:
            if not points or any(not 0.0 <= u <= 1.0 for u, _ in points):
                raise PreferenceError(f"schedule of {what}: key points need positions in [0, 1]")
        object.__setattr__(self, "weights", {name: tuple(points) for name, points in self.weights.items()})
        self.preferences()  # every key point is a valid preference (finite weights, lambda >= 0)

    @classmethod
    def parse(cls, text: str, kl_scale: str | float = 1.0) -> Preference | PreferenceSchedule:
        """``"a=0.8:0.2,b=0.2:0.8"`` (start to end), ``"a=1@0:1@0.5:0@0.5:0@1,b=..."`` (key points) or plain
        ``"a=0.3,b=0.7"``; a schedule whose every value is constant is the plain :class:`Preference`."""
        weights: dict[str, Points] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, spec = item.partition("=")
            if not sep or not name.strip():
                raise PreferenceError(f"cannot parse weight {item!r}: expected name=value, e.g. aesthetic=0.3")
            if name.strip() in weights:
                raise PreferenceError(f"weight for {name.strip()!r} given twice")
            weights[name.strip()] = _points(spec, f"the weight of {name.strip()!r}")
        if not weights:
            raise PreferenceError("a preference needs at least one reward weight, e.g. aesthetic=1")
        scale = _points(str(kl_scale), "kl_scale (lambda)")
        schedule = cls(weights, scale)
        return schedule.at(0.0) if schedule.is_constant else schedule

    @property
    def is_constant(self) -> bool:
        return all(len({v for _, v in points}) == 1 for points in (*self.weights.values(), self.kl_scale))

    def at(self, progress: float) -> Preference:
        """The preference at progress ``u`` in ``[0, 1]``."""
        u = min(1.0, max(0.0, float(progress)))
        return Preference({name: _interpolate(points, u) for name, points in self.weights.items()},
                          _interpolate(self.kl_scale, u))

    def positions(self) -> list[float]:
        """Every key point's position (where the schedule's slope changes)."""
        return sorted({u for points in (*self.weights.values(), self.kl_scale) for u, _ in points})

    def preferences(self) -> list[Preference]:
        """The preferences arriving at and leaving every key point (they differ at a jump): the extremes a step
        can see, for checks such as DB-MPA-LS's non-negative coefficients."""
        def value(points: Points, u: float, side: int) -> float:
            exact = [v for w, v in points if w == u]
            return exact[side] if exact else _interpolate(points, u)

        return [Preference({n: value(p, u, side) for n, p in self.weights.items()}, value(self.kl_scale, u, side))
                for u in self.positions() for side in (0, -1)]

    def rescaled(self, factors: Mapping[str, float]) -> PreferenceSchedule:
        """The schedule with reward ``i``'s weights times ``factors[i]`` at every key point (e.g. ``alpha_i / A``)."""
        weights = {n: tuple((u, v * factors[n]) for u, v in points) for n, points in self.weights.items()}
        return PreferenceSchedule(weights, self.kl_scale)

    def __str__(self) -> str:
        parts = [f"{n}=" + ":".join(f"{v:g}@{u:g}" for u, v in points) for n, points in self.weights.items()]
        return ",".join(parts) + ";kl_scale=" + ":".join(f"{v:g}@{u:g}" for u, v in self.kl_scale)


def step_progress(step: int, steps: int) -> float:
    """The progress ``u`` of step ``step`` (0-based) of ``steps``: 0 at the first, 1 at the last."""
    return step / (steps - 1) if steps > 1 else 0.0


@dataclass(frozen=True)
class BlendTarget:
    """What a blend serves when its experts were fine-tuned with different KL weights (docs/method.md, "Experts with
    different KL weights").

    Expert ``i`` fine-tuned with KL weight ``alpha_i`` on ``r_i`` tilts the base by ``exp(r_i / alpha_i)``, so the blend
    with coefficients ``c_i = lambda v_i`` targets ``p_pre exp(lambda sum_i v_i r_i / alpha_i)`` (paper Lemma 2 with
    one alpha per expert). For a preference ``(w, lambda)``:

    - no ``target_alpha``: ``v_i = w_i``; the target weights reward ``i`` by ``w_i / alpha_i``;
    - ``target_alpha = A``: ``v_i = w_i alpha_i / A``; the target is ``p_pre exp(lambda sum_i w_i r_i / A)``, the one
      every expert would serve had it been fine-tuned at ``A``.

    With one common alpha and no target alpha this is the paper's blend unchanged. :meth:`blend` is the preference the
    sampler blends with; :meth:`tilt` the target as ``(Preference(u, lambda), a)`` with ``p_pre exp(lambda sum_i u_i
    r_i / a)``, the form SMC's weights and the importance-weighted oracle take.
    """

    preference: Preference
    alphas: Mapping[str, float]
    target_alpha: float | None = None

    def __post_init__(self) -> None:
        alphas = {}
        for name, alpha in dict(self.alphas).items():
            value = finite_number(alpha, f"the KL weight alpha of {name!r}", error=PreferenceError)
            if value <= 0:
                raise PreferenceError(f"expert {name!r} has KL weight alpha {value:g}: an expert fine-tuned without a "
                                      "KL term has an unbounded tilt exp(r / alpha), so no blend targets it")
            alphas[name] = value
        missing = sorted(set(self.preference.weights) - set(alphas))
        if missing:
            raise PreferenceError(f"no KL weight alpha for {', '.join(map(repr, missing))}")
        object.__setattr__(self, "alphas", alphas)
        if self.target_alpha is not None:
            target = finite_number(self.target_alpha, "the target alpha", error=PreferenceError)
            if target <= 0:
                raise PreferenceError(f"the target alpha must be > 0, got {target:g}")
            object.__setattr__(self, "target_alpha", target)

    @property
    def common_alpha(self) -> float | None:
        """The experts' one alpha, or ``None`` when the weighted experts' alphas differ."""
        values = {self.alphas[name] for name in self.preference.weights}
        return values.pop() if len(values) == 1 else None

    def blend(self) -> Preference:
        """The preference whose coefficients ``c_i = lambda v_i`` the sampler blends with (class docstring)."""
        if self.target_alpha is None:
            return self.preference
        weights = {name: w * self.alphas[name] / self.target_alpha for name, w in self.preference.weights.items()}
        return Preference(weights, self.preference.kl_scale)

    def tilt(self) -> tuple[Preference, float]:
        """``(Preference(u, lambda), a)``: the target is ``p_pre exp(lambda sum_i u_i r_i / a)``."""
        if self.target_alpha is not None:
            return self.preference, self.target_alpha
        common = self.common_alpha
        if common is not None:
            return self.preference, common
        weights = {name: w / self.alphas[name] for name, w in self.preference.weights.items()}
        return Preference(weights, self.preference.kl_scale), 1.0

    def implied_weights(self) -> dict[str, float]:
        """Each reward's weight in the target's exponent per unit lambda: ``w_i / alpha_i``, or ``w_i / A``."""
        preference, alpha = self.tilt()
        return {name: u / alpha for name, u in preference.weights.items()}

    def describe(self) -> dict[str, object]:
        """The target in words and numbers, for settings.json, the UI's status line and reports."""
        implied = self.implied_weights()
        terms = " + ".join(f"{u:.4g} {name}" for name, u in implied.items())
        return {"alphas": {name: self.alphas[name] for name in self.preference.weights},
                "target_alpha": self.target_alpha, "blend_weights": self.blend().weights, "implied_weights": implied,
                "target": f"p_pre exp({self.preference.kl_scale:g} x ({terms}))"}


def blend_predictions(coefficients: Sequence[float], predictions: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_j c_j eps_j``: the blended noise (or velocity, or drift) prediction."""
    if len(coefficients) != len(predictions) or not predictions:
        raise PreferenceError(f"{len(coefficients)} coefficients for {len(predictions)} predictions")
    out = coefficients[0] * predictions[0]
    for coef, pred in zip(coefficients[1:], predictions[1:]):
        out = out + coef * pred
    return out
