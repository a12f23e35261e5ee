"""Layer 2: the denoiser contract and blended denoisers.

A *denoiser* is any callable ``(x_t, t, **cond) -> eps`` (k-diffusion style): ``x_t`` is a batch, ``t`` the
scheduler's integer timestep shared by the batch, ``cond`` keyword conditioning (tensors with a leading
batch dimension are split and repeated with the batch; anything else is passed through unchanged).

A *denoiser family* is a base model and named experts that can be evaluated together. Its one primitive is
:meth:`DenoiserFamily.route`: row ``b`` of the output is member ``members[b]``'s prediction for row ``b``.
Families over a single network with several LoRA adapters (:class:`diffusion_blend.lora.LoraFamily`) cost one
network's weights for m experts; their ``routing`` (:data:`ROUTINGS`) decides whether the DB-MPA blend of m
experts is ONE forward of batch ``m * B`` (``"batched"``) or m forwards of batch ``B`` (``"sequential"``), and
``"auto"`` picks per device (:func:`device_routing`). :class:`GuidedFamily` makes the same choice for the two
classifier-free-guidance branches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from diffusion_blend.devices import ROUTINGS  # noqa: F401 (re-exported)
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.preference import (
    BASE,
    Preference,
    PreferenceError,
    PreferenceSchedule,
    blend_predictions,
)

Member = str | None
Progress = Callable[[Any], float]
"""A step's progress in ``[0, 1]`` from its timestep (:func:`diffusion_blend.sampling.timestep_progress`)."""

# ROUTINGS: how a family evaluates several members (or CFG branches): "batched" in one forward of the stacked rows,
# "sequential" in one forward per member, "auto" by device (device_routing).


def check_routing(routing: Any) -> str:
    """``routing`` if it is one of :data:`ROUTINGS`, else one clear :class:`DiffusionBlendError`."""
    if not isinstance(routing, str) or routing not in ROUTINGS:
        raise DiffusionBlendError(f"unknown routing {routing!r}; choose one of {', '.join(ROUTINGS)}")
    return routing


def device_routing(routing: str, device: torch.device | str) -> str:
    """``routing`` with ``"auto"`` resolved by device type: batched on CUDA, sequential elsewhere.

    On CPU one forward per member is measured as fast as the batched forward and smaller (the stacked batch's
    activations; benchmarks/README.md); on a GPU a small batch underuses the device. ``LoraFamily`` further
    checks CUDA memory before batching.
    """
    if check_routing(routing) != "auto":
        return routing
    return "batched" if torch.device(device).type == "cuda" else "sequential"


class Denoiser(Protocol):
    def __call__(self, x_t: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor: ...


def select_rows(cond: Mapping[str, Any], index: torch.Tensor | slice, batch_size: int) -> dict[str, Any]:
    """Rows ``index`` (an index tensor, or a slice: a view, no copy) of every batched tensor in ``cond`` (tensors
    whose first dim is ``batch_size``)."""

    def rows(value: torch.Tensor) -> torch.Tensor:
        return value[index] if isinstance(index, slice) else value.index_select(0, index.to(value.device))

    return {
        key: rows(value) if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch_size else value
        for key, value in cond.items()
    }


def repeat_rows(cond: Mapping[str, Any], times: int, batch_size: int) -> dict[str, Any]:
    """Every batched tensor in ``cond`` tiled ``times`` along the batch (``[c; c; ...]``)."""
    return {
        key: value.repeat(times, *([1] * (value.ndim - 1)))
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch_size
        else value
        for key, value in cond.items()
    }


class DenoiserFamily(ABC):
    """A base model and named experts sharing one input space."""

    expert_names: tuple[str, ...]

    @abstractmethod
    def route(self, x_t: torch.Tensor, t: Any, members: Sequence[Member], **cond: Any) -> torch.Tensor:
        """Row ``b`` is the prediction of ``members[b]`` (``BASE`` or an expert name) for ``x_t[b]``."""

    def predict_all(self, x_t: torch.Tensor, t: Any, members: Sequence[Member], **cond: Any) -> list[torch.Tensor]:
        """Each member's prediction for the whole batch, from one :meth:`route` call on a stacked batch."""
        self.check_members(members)
        batch = x_t.shape[0]
        stacked = x_t.repeat(len(members), *([1] * (x_t.ndim - 1)))
        routes = [member for member in members for _ in range(batch)]
        out = self.route(stacked, t, routes, **repeat_rows(cond, len(members), batch))
        return list(out.split(batch))

    def member(self, name: Member) -> Denoiser:
        """The denoiser of one member (``BASE`` or an expert)."""
        self.check_members([name])

        def denoise(x_t: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
            return self.route(x_t, t, [name] * x_t.shape[0], **cond)

        return denoise

    def check_members(self, members: Sequence[Member]) -> None:
        unknown = sorted({m for m in members if m is not BASE and m not in self.expert_names})
        if unknown:
            raise PreferenceError(
                f"no expert named {', '.join(map(repr, unknown))}; available: {', '.join(self.expert_names)}"
            )


class CallableFamily(DenoiserFamily):
    """A family of independent denoiser callables (e.g. closed-form experts, or separate networks).

    ``route`` calls each member once on the rows routed to it, so every row costs exactly one evaluation.
    """

    def __init__(self, base: Denoiser | None, experts: Mapping[str, Denoiser]):
        if not experts:
            raise PreferenceError("a denoiser family needs at least one expert")
        self.base = base
        self.experts = dict(experts)
        self.expert_names = tuple(self.experts)

    def _callable(self, member: Member) -> Denoiser:
        if member is BASE:
            if self.base is None:
                raise PreferenceError("this preference needs the base model, but the family has none")
            return self.base
        return self.experts[member]

    def route(self, x_t: torch.Tensor, t: Any, members: Sequence[Member], **cond: Any) -> torch.Tensor:
        self.check_members(members)
        if len(members) != x_t.shape[0]:
            raise ValueError(f"{len(members)} routes for a batch of {x_t.shape[0]}")
        out: torch.Tensor | None = None
        for member in dict.fromkeys(members):  # unique, in order of first appearance
            rows = torch.tensor([i for i, m in enumerate(members) if m == member], device=x_t.device)
            if len(rows) == x_t.shape[0]:
                return self._callable(member)(x_t, t, **cond)
            pred = self._callable(member)(x_t.index_select(0, rows), t, **select_rows(cond, rows, x_t.shape[0]))
            if out is None:
                out = torch.empty((x_t.shape[0], *pred.shape[1:]), dtype=pred.dtype, device=pred.device)
            out[rows] = pred
        assert out is not None
        return out


class BlendedDenoiser:
    """DB-MPA / DB-KLA / combined: ``eps = sum_j c_j eps_j`` (paper Lemma 2, sections 2.4-2.6).

    Only members with a non-zero coefficient are evaluated, all in one :meth:`DenoiserFamily.predict_all`. With a
    :class:`~diffusion_blend.preference.PreferenceSchedule` the coefficients are those of the step's preference;
    ``progress(t)`` gives the step's progress in ``[0, 1]`` (:func:`~diffusion_blend.sampling.timestep_progress`).
    """

    def __init__(self, family: DenoiserFamily, preference: Preference | PreferenceSchedule,
                 progress: Progress | None = None):
        self.family = family
        self.preference = preference
        self.progress = _check_progress(preference, progress)
        if isinstance(preference, Preference):
            self.coefficients = preference.coefficients(family.expert_names)
            self._active = self.coefficients.active()
        else:
            for point in preference.preferences():  # every name checked once, before sampling
                point.coefficients(family.expert_names)

    def __call__(self, x_t: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        active = self._active if self.progress is None else self.preference.at(self.progress(t)).coefficients(
            self.family.expert_names).active()
        predictions = self.family.predict_all(x_t, t, [member for member, _ in active], **cond)
        return blend_predictions([coef for _, coef in active], predictions)


def _check_progress(preference: Preference | PreferenceSchedule, progress: Progress | None) -> Progress | None:
    """A schedule needs the step's progress; a fixed preference ignores it."""
    if isinstance(preference, Preference):
        return None
    if progress is None:
        raise PreferenceError("a weight schedule needs the sampler's progress: pass progress=timestep_progress("
                              "scheduler)")
    return progress


class SwitchingDenoiser:
    """DB-MPA-LS (paper Proposition 2): at every call each sample draws ONE member ``j ~ Categorical(c)``.

    One network evaluation per sample per step. The randomly switched drift has the same marginals as the
    blended drift in the continuous-time limit; each discrete step has the blended mean and a little extra
    variance (paper section 2.7). Refuses negative coefficients (use :class:`BlendedDenoiser`).

    ``copies > 1``: the batch is ``copies`` stacked copies of the same samples (classifier-free guidance's
    ``[uncond; cond]`` layout); each sample draws once and all its copies use the drawn member.
    """

    def __init__(
        self, family: DenoiserFamily, preference: Preference | PreferenceSchedule, generator: torch.Generator | int,
        copies: int = 1, progress: Progress | None = None,
    ):
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        self.copies = int(copies)
        self.family = family
        self.preference = preference
        self.progress = _check_progress(preference, progress)
        if isinstance(preference, Preference):
            self.members, self.probabilities = preference.coefficients(family.expert_names).probabilities()
        else:
            for point in preference.preferences():  # LS's non-negative coefficients, checked at every key point
                point.coefficients(family.expert_names).probabilities()
            self.members = [BASE, *family.expert_names]
        self.generator = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
        self.selection_counts = torch.zeros(len(self.members), dtype=torch.long)  # draws per member of ``members``

    def __call__(self, x_t: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        if x_t.shape[0] % self.copies:
            raise ValueError(f"a batch of {x_t.shape[0]} rows is not {self.copies} copies of the same samples")
        if self.progress is None:
            members, probabilities = self.members, self.probabilities
        else:  # this step's probabilities (paper Proposition 2, step by step)
            members, probabilities = self.preference.at(self.progress(t)).coefficients(
                self.family.expert_names).probabilities()
        samples = x_t.shape[0] // self.copies
        choice = torch.multinomial(probabilities, samples, replacement=True, generator=self.generator)
        drawn = [members[i] for i in choice.tolist()]
        for member in drawn:
            self.selection_counts[self.members.index(member)] += 1
        return self.family.route(x_t, t, drawn * self.copies, **cond)


class GuidedDenoiser:
    """Classifier-free guidance: ``eps_u + s (eps_c - eps_u)`` with ``cond`` given per call and ``uncond`` fixed.

    CFG is affine with coefficients (1 - s, s) and the blend is affine with coefficients summing to one, so
    the two commute: guiding the blend equals blending the guided members (paper section 3.2, fact 5 of
    section 8). :class:`GuidedFamily` is the second form.
    """

    def __init__(self, denoiser: Denoiser, guidance_scale: float, uncond: Mapping[str, Any]):
        self.denoiser = denoiser
        self.guidance_scale = float(guidance_scale)
        self.uncond = dict(uncond)

    def __call__(self, x_t: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        eps_uncond = self.denoiser(x_t, t, **self.uncond)
        eps_cond = self.denoiser(x_t, t, **cond)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)


def stack_conditions(first: Mapping[str, Any], second: Mapping[str, Any], batch_size: int) -> dict[str, Any] | None:
    """``[first; second]`` row-stacked for a batch of ``2 * batch_size`` (batched tensors concatenated, shared values
    kept), or ``None`` when they cannot share one call (different keys, or a shared value that differs)."""
    if set(first) != set(second):
        return None
    stacked: dict[str, Any] = {}
    for key, a in first.items():
        b = second[key]
        if all(torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == batch_size for v in (a, b)):
            stacked[key] = torch.cat([a, b])
        elif a is b or (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)):
            stacked[key] = a
        elif not torch.is_tensor(a) and not torch.is_tensor(b) and a == b:
            stacked[key] = a
        else:
            return None
    return stacked


class GuidedFamily(DenoiserFamily):
    """A family whose every member is classifier-free guided (each member uses its own two predictions).

    ``routing``: ``"batched"`` evaluates the unconditional and conditional branches in one :meth:`route` call of
    the row-stacked batch (when their conditioning can be stacked), ``"sequential"`` in two calls, ``"auto"`` by
    device (:func:`device_routing`). ``last_routing`` is the one the last call used.
    """

    def __init__(self, family: DenoiserFamily, guidance_scale: float, uncond: Mapping[str, Any], routing: str = "auto"):
        self.family = family
        self.expert_names = family.expert_names
        self.guidance_scale = float(guidance_scale)
        self.uncond = dict(uncond)
        self.routing = check_routing(routing)
        self.last_routing: str | None = None

    def route(self, x_t: torch.Tensor, t: Any, members: Sequence[Member], **cond: Any) -> torch.Tensor:
        batch = x_t.shape[0]
        stacked = None
        if device_routing(self.routing, x_t.device) == "batched":
            stacked = stack_conditions(self.uncond, cond, batch)
        if stacked is not None:
            self.last_routing = "batched"
            both = self.family.route(torch.cat([x_t, x_t]), _tile_t(t, batch), [*members, *members], **stacked)
            eps_uncond, eps_cond = both.split(batch)
        else:
            self.last_routing = "sequential"
            eps_uncond = self.family.route(x_t, t, members, **self.uncond)
            eps_cond = self.family.route(x_t, t, members, **cond)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)


def _tile_t(t: Any, batch: int) -> Any:
    """A per-row timestep vector repeated for the stacked ``[uncond; cond]`` batch; a shared timestep unchanged."""
    if torch.is_tensor(t) and t.ndim == 1 and t.shape[0] == batch and batch > 1:
        return torch.cat([t, t])
    return t


def make_denoiser(
    family: DenoiserFamily, preference: Preference | PreferenceSchedule, method: str = "mpa",
    generator: torch.Generator | int | None = None, copies: int = 1, progress: Progress | None = None,
) -> Callable[..., torch.Tensor]:
    """``method="mpa"``: deterministic blend; ``method="ls"``: stochastic switching (needs ``generator``; ``copies``:
    the batch stacks that many copies of each sample, e.g. CFG's two branches, which share one draw); a schedule
    needs the step's ``progress``."""
    if method == "mpa":
        return BlendedDenoiser(family, preference, progress)
    if method == "ls":
        if generator is None:
            raise PreferenceError("method 'ls' draws a model per step: pass a seed or torch.Generator")
        return SwitchingDenoiser(family, preference, generator, copies=copies, progress=progress)
    raise PreferenceError(f"unknown blend method {method!r}; choose 'mpa' (DB-MPA) or 'ls' (DB-MPA-LS)")
