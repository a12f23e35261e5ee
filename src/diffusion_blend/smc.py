"""Layer 3: sequential Monte Carlo on top of the blend, an exactness knob (beyond the paper; docs/method.md).

The blend (paper Lemma 1-2) is an approximation of the target: the Jensen gap. This sampler corrects it. The
target is the base sampler's chain tilted at the end,

    P*(x_T .. x_0) ∝ p_pre(x_T .. x_0) exp(lambda r_w(x_0) / alpha),

whose ``x_0`` marginal is the target ``p_pre exp(lambda r_w / alpha)`` of paper section 1 (for the base sampler's
own chain). The proposal ``q`` is the blended chain (:class:`~diffusion_blend.denoisers.BlendedDenoiser`, any
preference) with the base's Gaussian step std ``s_k`` (the same scheduler step), the twisted step
(``proposal="twisted"``, below), or the base chain itself (``proposal="base"``: FK steering, Singhal et al. 2025).
``N`` particles per output sample are propagated with
``q``; at every step the weight of a particle is multiplied by

    G_k = N(x_{k+1}; mu_pre(x_k), s_k^2) / N(x_{k+1}; mu_q(x_k), s_k^2) * exp(lambda / alpha * (h_{k+1} - h_k))

with a look-ahead potential ``h_k``: ``r_w`` of the Tweedie estimate ``x0_hat(x_k)`` of the proposal's prediction
(``potential="tweedie"``, FK steering's choice) or 0 (``potential="none"``); the initial weight is
``exp(lambda h_0(x_T) / alpha)`` and ``h_K = r_w(x_0)`` exactly, so the product telescopes to the exact importance
weight ``dP* / dQ`` (up to a constant) for ANY choice of ``h``; ``h`` only decides when the weights become
informative. ``potential="experts"`` (blend or twisted proposal) takes the potential from the experts themselves: an
expert trained with KL weight ``alpha`` on ``r_i`` has ``log q_i / p_pre (x_{k+1} | x_k) = V_i(x_{k+1}) - V_i(x_k)``
with ``V_i = log E_pre[exp(r_i / alpha) | x]`` (its soft value), so the blend's own value estimate
``sum_i c_i V_i`` (``c_i = lambda w_i``) has the increments ``sum_i c_i log q_i / p_pre``, known from the means
already computed. As a path function ``H_k = sum_{j<k} sum_i c_i log q_i / p_pre (x_{j+1} | x_j)``, ``H_K =
lambda r_w(x_0) / alpha``, the step weight becomes, for Gaussian steps of one std ``s_k`` and ``d_i = mu_i - mu_pre``,

    G_k = exp(-(sum_i c_i |d_i|^2 - |sum_i c_i d_i|^2) / (2 s_k^2))

a function of ``x_k`` alone (blend proposal, tilt 1): the per-step Jensen gap of the blend (paper Lemma 1-2), zero
where the experts agree; it needs no reward evaluation before ``x_0`` and no decoding, and the final weight
``exp(lambda r_w / alpha - H_{K-1}) p_pre / q (last step)`` closes the telescope, so the output is exact for any
experts (docs/method.md, "The experts' potential"). Groups whose effective sample size falls below
``ess_threshold * N`` are resampled (systematic resampling, per output sample), and the output is one particle per
group drawn by the final weights.

The twisted proposal (twisted SMC, Wu et al. 2023) moves the base's step by its variance times the blend's score
deviation, ``mu_q = mu_pre + s_k^2 (score_q(x_k) - score_pre(x_k))`` (:func:`~diffusion_blend.sampling.score_estimate`):
for the tilted chain ``p_pre(x' | x) exp(V(x') - V(x))`` with Gaussian steps this is the optimal step to first order in
``s_k^2`` when the experts' score deviations are ``grad V``. Experts that are continuous-time tilts (exact scores;
plausibly also experts sampled far from the step count they were trained at, not measured) move the mean by
``b_k sqrt(1 - abar_k) grad V`` instead (``b_k``: the step's coefficient on the noise prediction), which at 20 DDIM
steps is several times ``s_k^2 grad V``; the Gaussian-mixture testbed's exact experts are such, and there the twisted
proposal raises the path weights' ESS from 6-26 % to 52-77 % (docs/evaluation.md). Experts trained on the sampler's own
chain (the exact-KL trainer; Flow-GRPO at its own step count, by its objective) already move the mean by the chain's
tilt: the blend proposal is theirs (on the digits experts twisted is worse: docs/evaluation.md).

``proposal_tilt = t`` blends the proposal at KL scale ``t lambda`` while the target keeps ``lambda`` (any proposal
leaves the weights exact): ``t > 1`` where the blend falls short of the target (the demo's digits experts at w = 0.8:
DB-MPA reaches 0.24 of the oracle's gain), ``t < 1`` where it overshoots; a tilt too strong leaves the target's mass
in the proposal's tail (docs/method.md, "Proposal tilt"; measured in docs/evaluation.md). ``proposal_tilt="auto"``
(the default) learns the tilt step by step from the run's own incremental weights (:class:`TiltAdapter`: a
regression of the increments on the proposal noise along the blend's shift, no extra network evaluation), never
below the blend's own step.

Where the blend is exact for the target the weights stay equal (``lambda = 0``; experts that are the exact tilted
chain); a group whose weights are equal (to ``CONSTANT_SPREAD``) is never resampled and returns its first particle,
so SMC then returns the blend sampler's own samples (tested).

The base's mean is needed at every step: when its blend coefficient is 0 (DB-MPA) the base is added to the one
batched :meth:`~diffusion_blend.denoisers.DenoiserFamily.predict_all` (one more member, still one forward).

Any sampler whose steps are Gaussian with an explicit mean and std runs
(:func:`~diffusion_blend.sampling.model_transition`):
DDIM (``eta > 0``) and DDPM on noise / v / sample predictions, and flow-matching models (SD3, FLUX: velocity
predictions) on :class:`~diffusion_blend.sampling.FlowMatchSDEScheduler`, the marginal-preserving SDE whose step is
affine in the velocity (:func:`~diffusion_blend.sampling.flow_transition`); the Tweedie look-ahead of a flow model
is ``x0_hat = x_s - s v`` (:func:`~diffusion_blend.sampling.tweedie_x0`). Steps with std 0 (deterministic: DDIM
``eta = 0``, DDIM's last step with ``set_alpha_to_one=True``, DDPM's last step, the flow SDE at noise level 0 and
diffusers' Euler ODE ``FlowMatchEulerDiscreteScheduler``) make the ratio undefined; such samplers are refused
before any work.

The reward is a callable on the sampler's space (the caller composes decoding and the weighted sum of basis
rewards): ``reward(x) -> Tensor[rows]`` gives ``r_w``; this layer knows nothing of reward models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from diffusion_blend.denoisers import Denoiser, DenoiserFamily, Member, repeat_rows
from diffusion_blend.errors import DiffusionBlendError, check_scores, positive_number
from diffusion_blend.preference import BASE, Preference, PreferenceSchedule, blend_predictions
from diffusion_blend.sampling import (
    FlowMatchSDEScheduler,
    as_generator,
    gaussian_log_prob,
    initial_latents,
    model_transition,
    scale_input,
    score_estimate,
    timestep_progress,
    tweedie_x0,
)

PROPOSALS = ("blend", "twisted", "base")
BLENDED = ("blend", "twisted")  # proposals built from the blended experts
POTENTIALS = ("tweedie", "none", "experts")
AUTO = "auto"  # proposal_tilt learned from the run (TiltAdapter)
MIN_TILT, MAX_TILT = 1.0, 10.0  # the adaptive tilt's range: never below the blend's own step (TiltAdapter)
CONSTANT_SPREAD = 1e-9  # log-weights of a group closer than this count as equal (float round-off of exact weights)
Reward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SMCOutput:
    """One output sample per group of ``N`` particles, and what it cost.

    ``network_evaluations``: rows routed through the family per output sample (``N x members x steps``);
    ``reward_evaluations``: calls of ``r_w`` on one particle per output sample (potential steps and the end);
    ``final_ess``: per output sample, the effective sample size of the final weights (1 .. N);
    ``resampling_steps``: per output sample, how many times its group was resampled; ``ess_history[k, b]``: the
    ESS of group ``b`` after the weights of state ``k`` (``K + 1`` rows: states ``x_T .. x_0``);
    ``particles`` ``(N, B, ...)`` and ``log_weights`` ``(N, B)`` (normalised per group): the final particle system.
    ``tilts`` ``(K,)``: the proposal tilt of every move (the adaptive tilt's path; constant for a fixed tilt).
    ``target_tilts`` ``(K,)`` (blended proposals; NaN otherwise): per move, the tilt whose Gaussian step matches the
    final weighted particles' ancestral paths along the blend's direction, ``t_k + E_W[a_k] / E_W[b_k]`` (moment
    matching, i.e. the cross-entropy / forward-KL choice against the target as the run estimates it; ``a_k``,
    ``b_k`` as in :class:`TiltAdapter`): a diagnostic of which tilts the target wanted, known only at the end.
    """

    samples: torch.Tensor
    network_evaluations: float
    reward_evaluations: float
    final_ess: torch.Tensor
    resampling_steps: torch.Tensor
    ess_history: torch.Tensor
    particles: torch.Tensor
    log_weights: torch.Tensor
    tilts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    target_tilts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))


def constant_groups(log_weights: torch.Tensor) -> torch.Tensor:
    """Per column of ``log_weights`` ``(N, B)``: whether its weights are equal (spread below ``CONSTANT_SPREAD``)."""
    spread = log_weights.max(0).values - log_weights.min(0).values
    return spread.nan_to_num(0.0) <= CONSTANT_SPREAD


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """``(sum w)^2 / sum w^2`` per column of ``log_weights`` ``(N, B)`` (unnormalised log-weights)."""
    probabilities = torch.softmax(log_weights, dim=0)
    return 1.0 / (probabilities**2).sum(0)


def systematic_resample(log_weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Systematic resampling per column of ``log_weights`` ``(N, B)``: ``(N, B)`` ancestor indices.

    One uniform ``u_b`` per column; ancestor of slot ``n`` is the first ``i`` with ``cdf_i > (u_b + n) / N``, so
    particle ``i`` is copied ``floor(N p_i)`` or ``ceil(N p_i)`` times (Douc, Cappé and Moulines 2005).
    """
    n, batch = log_weights.shape
    cdf = torch.softmax(log_weights.to(torch.float64), dim=0).cumsum(0).T.contiguous()  # (B, N)
    uniforms = torch.rand(batch, 1, generator=generator, dtype=torch.float64, device=torch.device("cpu"))
    positions = (uniforms.to(cdf.device) + torch.arange(n, dtype=torch.float64, device=cdf.device)) / n
    return torch.searchsorted(cdf, positions, right=True).clamp(max=n - 1).T


def twisted_mean(scheduler: Any, out_q: torch.Tensor, out_pre: torch.Tensor, t: Any, x: torch.Tensor,
                 mean_pre: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The twisted proposal's step mean ``mu_pre + s_k^2 (score_q(x_k) - score_pre(x_k))`` (module docstring; twisted
    SMC, Wu et al. 2023): the base's step moved by its variance times the score deviation of the blended output."""
    deviation = score_estimate(scheduler, out_q, t, x) - score_estimate(scheduler, out_pre, t, x)
    return mean_pre + std.to(mean_pre.dtype) ** 2 * deviation.to(mean_pre.dtype)


def check_stochastic_steps(scheduler: Any, eta: float) -> None:
    """Refuse (one line) schedulers without Gaussian transitions or with a deterministic step (std 0).

    Call after ``scheduler.set_timesteps``. Accepted: DDIM, DDPM and :class:`FlowMatchSDEScheduler` (``eta``: DDIM's
    stochasticity or the flow SDE's noise level) whose every step has std > 0."""
    if not isinstance(scheduler, DDIMScheduler | DDPMScheduler | FlowMatchEulerDiscreteScheduler):
        raise DiffusionBlendError(
            f"SMC needs Gaussian sampler steps (DDIM with eta > 0, DDPM, or FlowMatchSDEScheduler for flow models), "
            f"not {type(scheduler).__name__}")
    flow = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    if flow and not isinstance(scheduler, FlowMatchSDEScheduler):
        raise DiffusionBlendError(
            f"SMC needs every sampler step to be stochastic, but {type(scheduler).__name__} is deterministic (the "
            "Euler ODE: std 0, the weight ratio is undefined); set pipe.scheduler = "
            "FlowMatchSDEScheduler.from_config(pipe.scheduler.config) (noise level > 0)")
    probe = torch.zeros(1, 1)
    for t in scheduler.timesteps:
        _, std = model_transition(scheduler, probe, t, probe, eta)
        if float(std) == 0.0:
            hint = ("the flow SDE at noise level 0 is the Euler ODE; use a noise level > 0 (eta, or "
                    "FlowMatchSDEScheduler(noise_level=...))" if flow else
                    "use eta > 0 and DDIM with steps_offset=1, set_alpha_to_one=False (Stable Diffusion's settings; "
                    "DDPM's last step is deterministic too)")
            raise DiffusionBlendError(
                f"SMC needs every sampler step to be stochastic, but step t={float(t):g} is deterministic (std 0: the "
                f"weight ratio is undefined); {hint}")


def _check_values(values: Any, rows: int) -> torch.Tensor:
    return check_scores(values, rows, "the SMC reward").detach().to(torch.float64)


@dataclass(frozen=True)
class SMCOptions:
    """The options of SMC on the blend, validated once where they enter (module docstring).

    ``particles``: ``N`` per output sample. ``proposal``: ``"blend"`` (the preference's blend), ``"twisted"`` (the
    base's step moved by ``s_k^2`` times the blend's score deviation), ``"base"`` (FK steering) or any denoiser (e.g.
    an exact target, for tests). ``potential``: ``"tweedie"`` (``r_w`` of the Tweedie estimate), ``"none"`` or
    ``"experts"`` (the experts' value increments; blended proposals). ``proposal_tilt``: ``"auto"`` (default: the
    tilt is learned step by step from the run's own incremental weights, :class:`TiltAdapter`; with the Tweedie
    potential only, the others give it no signal before ``x_0``, so there it is 1) or a number ``t``: the blended
    proposal's KL scale is ``t x lambda`` (the target keeps ``lambda``). ``ess_threshold``: resample a group when its
    ESS falls below ``ess_threshold x N``. ``potential_every = k`` evaluates ``h`` only every ``k`` steps (held in
    between), bounding the reward cost. ``proposal_schedule``: a
    :class:`~diffusion_blend.preference.PreferenceSchedule` the blended proposal follows over the steps (step ``k``
    blends at ``schedule.at(u_k)``) while the target stays the fixed preference given to :func:`smc_sample`: the
    weights correct the proposal to it as for any proposal (docs/method.md, "Schedules over the steps"); the tilt
    then stays 1. Bad values raise one-line :class:`DiffusionBlendError`.
    """

    particles: int = 4
    proposal: str | Denoiser = "blend"
    potential: str = "tweedie"
    proposal_tilt: float | str = AUTO
    ess_threshold: float = 0.5
    potential_every: int = 1
    proposal_schedule: PreferenceSchedule | None = None

    def __post_init__(self) -> None:
        if isinstance(self.particles, bool) or not isinstance(self.particles, int) or self.particles < 1:
            raise DiffusionBlendError(f"particles must be an integer >= 1, got {self.particles!r}")
        if not (callable(self.proposal) or self.proposal in PROPOSALS):
            raise DiffusionBlendError(f"unknown SMC proposal {self.proposal!r}; choose 'blend' or 'twisted' (ours) or "
                                      "'base' (FK steering)")
        if self.potential not in POTENTIALS:
            raise DiffusionBlendError(f"unknown SMC potential {self.potential!r}; choose from {', '.join(POTENTIALS)}")
        if self.potential == "experts" and self.proposal not in BLENDED:
            raise DiffusionBlendError("potential 'experts' takes its values from the blended experts: it needs "
                                      "proposal='blend' or 'twisted'")
        if isinstance(self.ess_threshold, bool) or not (
                isinstance(self.ess_threshold, int | float) and 0.0 <= self.ess_threshold <= 1.0):
            raise DiffusionBlendError(f"ess_threshold must be in [0, 1] (a fraction of N), got {self.ess_threshold!r}")
        every = self.potential_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise DiffusionBlendError(f"potential_every must be an integer >= 1, got {every!r}")
        self._check_schedule()
        if isinstance(self.proposal_tilt, str):
            if self.proposal_tilt != AUTO:
                raise DiffusionBlendError(f"proposal_tilt must be 'auto' or a number > 0, got {self.proposal_tilt!r}")
            return
        tilt = positive_number(self.proposal_tilt, "proposal_tilt (the proposal's lambda / the target's)")
        object.__setattr__(self, "proposal_tilt", tilt)
        if tilt != 1 and self.proposal not in BLENDED:
            raise DiffusionBlendError("proposal_tilt scales the blended proposal's lambda: it needs proposal='blend' "
                                      "or 'twisted'")
        if tilt != 1 and self.proposal_schedule is not None:
            raise DiffusionBlendError("proposal_schedule sets the proposal's weights and lambda at every step: "
                                      "proposal_tilt must stay 1 or 'auto' with it")

    def _check_schedule(self) -> None:
        schedule = self.proposal_schedule
        if schedule is None:
            return
        if not isinstance(schedule, PreferenceSchedule):
            raise DiffusionBlendError(f"proposal_schedule must be a PreferenceSchedule, got {type(schedule).__name__}")
        if self.proposal not in BLENDED:
            raise DiffusionBlendError("proposal_schedule is the blended proposal's schedule: it needs "
                                      "proposal='blend' or 'twisted'")

    @property
    def adaptive_tilt(self) -> bool:
        """Whether the tilt is learned from the run: ``"auto"`` on a blended proposal with the Tweedie potential and
        ``N > 1`` (one particle is never reweighted: ``N = 1`` stays the blend sampler itself)."""
        return (self.proposal_tilt == AUTO and self.proposal in BLENDED and self.potential == "tweedie"
                and self.particles > 1 and self.proposal_schedule is None)

    @property
    def initial_tilt(self) -> float:
        """The tilt of the first move (``"auto"``: 1, the blend itself)."""
        return 1.0 if self.proposal_tilt == AUTO else float(self.proposal_tilt)

    def describe(self) -> dict[str, Any]:
        """The options as settings.json and reports record them."""
        proposal = self.proposal if isinstance(self.proposal, str) else type(self.proposal).__name__
        described = {"particles": self.particles, "proposal": proposal, "potential": self.potential,
                     "proposal_tilt": self.proposal_tilt, "ess_threshold": self.ess_threshold,
                     "potential_every": self.potential_every}
        if self.proposal_schedule is not None:
            described["proposal_schedule"] = str(self.proposal_schedule)
        return described


def check_alpha(alpha: Any) -> float:
    """The experts' KL weight ``alpha`` of SMC's target, checked (one line)."""
    if isinstance(alpha, bool) or not (isinstance(alpha, int | float) and alpha > 0 and math.isfinite(alpha)):
        raise DiffusionBlendError(f"alpha (the experts' KL weight) must be a positive number, got {alpha!r}")
    return float(alpha)


def step_projections(x: torch.Tensor, mean_q: torch.Tensor, shift: torch.Tensor,
                     std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, ``a = (x' - mu_q).D / s^2`` and ``b = |D|^2 / s^2`` of a move (float64; :class:`TiltAdapter`)."""
    dims = tuple(range(1, x.ndim))
    shift64, variance = shift.to(torch.float64), float(std) ** 2
    a = ((x.to(torch.float64) - mean_q.to(torch.float64)) * shift64).sum(dims) / variance
    return a, (shift64**2).sum(dims) / variance


class TiltAdapter:
    """The adaptive proposal tilt of ``proposal_tilt="auto"``, learned step by step from the run's own weights.

    A move with tilt ``t`` draws ``x' = mu_pre + t D + s z`` (``D``: the blended proposal's shift of the base's step
    mean, the blend's or the twisted one; ``z ~ N(0, I)``). Had the move used ``t + delta``, the same ``x'`` would carry
    the incremental log-weight ``L - delta a + delta^2 b / 2`` with ``a = (x' - mu_q).D / s^2`` and ``b = |D|^2 / s^2``
    (only ``log q`` changes; the potential is a function of ``x'``). So the tilt that makes a step's incremental weights
    most even is, to first order, ``t + Cov(L, a) / Var(a)``: the weighted regression slope of the increments on the
    proposal noise along ``D``, over all particles of the batch (one tilt for all groups: they share the preference).
    With the ratio's part worked out, ``Cov(L, a) / Var(a) + t`` is the slope of the potential's increment along
    ``D``: the tilt at which the proposal moves as far along the blend's direction as the potential rises there (the
    twisted-SMC step, Wu et al. 2023, with the gradient replaced by a regression over the particles). The estimate of
    step ``k`` sets the tilt of step ``k + 1``; it is shrunk toward the current tilt by its own sampling error
    (positive-part James-Stein: no move when the slope is within one standard error of it) and kept in
    ``[MIN_TILT, MAX_TILT] = [1, 10]``. The floor: the slope is that of the look-ahead potential, not of the target's
    value; where the look-ahead is flat while the value is not (the Gaussian mixture's exact experts at early, noisy
    steps: slope 0.1-0.3 of the experts' step, while the final particles' moment match says 1.5-2;
    docs/evaluation.md) it would pull the proposal back toward the base, so the tilt never drops below the experts'
    own step. Where the increments are already equal (the blend is exact for the target: ``lambda = 0``, an exact
    expert) nothing moves: the slope is 0. No network evaluation: it reuses the increments and means the filter
    computes anyway. With ``potential_every = k`` the slope is taken over the ``k`` steps between two evaluations of
    the potential.
    """

    def __init__(self, tilt: float = 1.0):
        self.tilt = float(tilt)
        self.projection: torch.Tensor | None = None  # a, summed over the moves since the last update (rows)
        self.increment: torch.Tensor | None = None  # L, summed likewise

    def observe_move(self, a: torch.Tensor) -> None:
        """Record ``a = (x' - mu_q).D / s^2`` of the move just drawn (:func:`step_projections`)."""
        self.projection = a if self.projection is None else self.projection + a

    def observe_increment(self, increment: torch.Tensor) -> None:
        self.increment = increment if self.increment is None else self.increment + increment

    def gather(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Follow the rows through resampling."""
        if self.projection is not None:
            self.projection = gather(self.projection)
        if self.increment is not None:
            self.increment = gather(self.increment)

    def update(self, log_weights: torch.Tensor) -> None:
        """Move the tilt by the shrunk regression slope; ``log_weights`` ``(N, B)``: the weights the increments
        multiply (pooled over groups, each group's weights normalised to ``1 / B``)."""
        a, increment, self.projection, self.increment = self.projection, self.increment, None, None
        if a is None or increment is None:
            return
        weights = (torch.softmax(log_weights.to(torch.float64), dim=0) / log_weights.shape[1]).reshape(-1)
        weights = weights.to(a.device)
        da = a - (weights * a).sum()
        dl = increment - (weights * increment).sum()
        variance = float((weights * da**2).sum())
        if not variance > 0 or float((weights * dl**2).sum()) <= CONSTANT_SPREAD**2:
            return  # the blend moves nothing, or the increments are equal: nothing to learn
        delta = float((weights * da * dl).sum()) / variance
        residual = dl - delta * da
        error2 = float((weights**2 * residual**2 * da**2).sum()) / variance**2
        if not math.isfinite(delta) or delta == 0.0:
            return
        shrink = max(0.0, 1.0 - error2 / delta**2)
        self.tilt = min(max(self.tilt + shrink * delta, MIN_TILT), MAX_TILT)


@dataclass
class _Members:
    """Which family members a step evaluates: the proposal's blend (at ``tilt x lambda``, or the proposal schedule's
    preference of the step) and the base."""

    members: list[Member]
    base_index: int
    blend_coefficients: list[float]  # over members[:len(blend_coefficients)]; with a schedule: per step (blend_at)
    value_coefficients: dict[Member, float]  # the TARGET's c_i = lambda w_i (the experts' potential)
    schedule: PreferenceSchedule | None = None
    expert_names: tuple[str, ...] = ()

    def blend_at(self, progress: float) -> list[float]:
        """The proposal schedule's coefficients over ``members`` at the step of progress ``u``."""
        coefficients = dict(self.schedule.at(progress).coefficients(self.expert_names).items())
        return [coefficients.get(member, 0.0) for member in self.members]

    @classmethod
    def of(cls, family: DenoiserFamily, preference: Preference, options: SMCOptions) -> _Members:
        coefficients = preference.coefficients(family.expert_names)  # validates the names for every proposal
        if options.proposal not in BLENDED:
            family.check_members([BASE])
            return cls([BASE], 0, [], {})
        if options.proposal_schedule is not None:
            return cls._scheduled(family, options.proposal_schedule, dict(coefficients.active()))
        tilted = Preference(preference.weights, preference.kl_scale * options.initial_tilt)
        active = tilted.coefficients(family.expert_names).active()
        members = [member for member, _ in active]
        if BASE not in members:
            members.append(BASE)
        family.check_members(members)
        return cls(members, members.index(BASE), [coef for _, coef in active], dict(coefficients.active()))

    @classmethod
    def _scheduled(cls, family: DenoiserFamily, schedule: PreferenceSchedule,
                   value_coefficients: dict[Member, float]) -> _Members:
        """The base and every expert that the schedule or the target's potential weighs at some step."""
        names = tuple(family.expert_names)
        used = set(value_coefficients)
        for preference in schedule.preferences():  # validates the schedule's names against the family
            used |= {member for member, _ in preference.coefficients(names).active()}
        members = [BASE, *(name for name in names if name in used)]
        family.check_members(members)
        return cls(members, 0, [], value_coefficients, schedule, names)


def _initial_particles(
    scheduler: Any, generator: torch.Generator, n: int, shape: tuple[int, ...] | None, latents: torch.Tensor | None,
    particle_latents: torch.Tensor | None, device: torch.device | str, dtype: torch.dtype,
) -> tuple[torch.Tensor, int]:
    """``x_T`` of all ``N x B`` particles, particle-major (row ``n B + b``: particle ``n`` of output ``b``), and
    ``B``."""
    if sum(given is not None for given in (shape, latents, particle_latents)) > 1:
        raise DiffusionBlendError("give one of the sample shape, the shared latents or the particle latents")
    if particle_latents is not None:
        if particle_latents.ndim < 1 or particle_latents.shape[0] % n:
            raise DiffusionBlendError(f"particle latents need N x B rows (N = {n}), got shape "
                                      f"{tuple(particle_latents.shape)}")
        x = initial_latents(scheduler, generator, latents=particle_latents, device=device, dtype=dtype)
        return x, x.shape[0] // n
    if latents is not None:
        x = initial_latents(scheduler, generator, latents=latents, device=device, dtype=dtype)
        return x.repeat(n, *([1] * (x.ndim - 1))), x.shape[0]
    if shape is None:
        raise DiffusionBlendError("give the sample shape or the initial latents")
    return initial_latents(scheduler, generator, (n * shape[0], *shape[1:]), None, device, dtype), shape[0]


class _ParticleFilter:
    """The particle system of :func:`smc_sample` and one step of it (module docstring's weights and resampling)."""

    def __init__(self, family: DenoiserFamily, members: _Members, options: SMCOptions, scheduler: Any,
                 reward: Reward, scale: float, x: torch.Tensor, batch: int, eta: float, cond: Mapping[str, Any],
                 generator: torch.Generator, noise_generator: torch.Generator):
        self.family, self.m, self.options, self.scheduler = family, members, options, scheduler
        self.reward, self.scale, self.eta, self.cond = reward, scale, eta, cond
        self.generator, self.noise_generator = generator, noise_generator
        self.progress = timestep_progress(scheduler)
        self.n, self.batch, self.rows = options.particles, batch, options.particles * batch
        self.x, self.state_dtype = x, x.dtype
        zeros = torch.zeros(self.rows, dtype=torch.float64, device=x.device)
        self.groups = torch.arange(batch, device=x.device)
        self.log_weights = torch.zeros(self.n, batch, dtype=torch.float64, device=x.device)
        # the potential in log-weight units (lambda h / alpha, or H of the experts' potential); 0 before x_T
        self.potential_prev = zeros
        self.pending = zeros  # log p_pre / q of the last transition
        self.pending_value = zeros  # sum_i c_i log q_i / p_pre of it
        self.resampled = torch.zeros(batch, dtype=torch.long)
        self.adapter = TiltAdapter(options.initial_tilt) if options.adaptive_tilt else None
        self.tilts: list[float] = []
        self.lineage: list[tuple[torch.Tensor, torch.Tensor]] = []  # (a_k, b_k) along each row's ancestry
        self.ess_history: list[torch.Tensor] = []
        self.network_rows = self.reward_rows = 0

    def gather(self, tensor: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
        grouped = tensor.view(self.n, self.batch, *tensor.shape[1:])
        return grouped[ancestors, self.groups].reshape(tensor.shape)

    def predict(self, t: Any) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The members' outputs at ``x_k``, the base's, the proposal's, and the model input."""
        model_input = scale_input(self.scheduler, self.x, t)
        predictions = self.family.predict_all(model_input, t, self.m.members, **self.cond)
        self.network_rows += len(self.m.members) * self.rows
        out_pre = predictions[self.m.base_index]
        proposal = self.options.proposal
        if proposal in BLENDED:
            coefficients = self.m.blend_coefficients if self.m.schedule is None else self.m.blend_at(self.progress(t))
            out_q = blend_predictions(coefficients, predictions[: len(coefficients)])
        elif proposal == "base":
            out_q = out_pre
        else:
            out_q = proposal(model_input, t, **self.cond)
        return predictions, out_pre, out_q, model_input

    def reweight(self, k: int, t: Any, out_q: torch.Tensor) -> None:
        """Multiply in the last transition's ratio and the potential's increment; record the ESS."""
        increment = self.pending
        potential = self.options.potential
        evaluated = potential == "tweedie" and k % self.options.potential_every == 0
        if evaluated:
            value = self.scale * _check_values(self.reward(tweedie_x0(self.scheduler, out_q, t, self.x)), self.rows)
            value = value.to(self.x.device)
            self.reward_rows += self.rows
            increment = increment + value - self.potential_prev
            self.potential_prev = value
        elif potential == "experts":
            increment = increment + self.pending_value
            self.potential_prev = self.potential_prev + self.pending_value
        before, self.log_weights = self.log_weights, self.log_weights + increment.view(self.n, self.batch)
        if self.adapter is not None and k > 0:
            self.adapter.observe_increment(increment)
            if evaluated:
                self.adapter.update(before)
        self.ess_history.append(effective_sample_size(self.log_weights).cpu())

    def resample(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Systematic resampling of the groups whose ESS fell below the threshold; ``tensors`` follow their rows."""
        needed = self.ess_history[-1].to(self.x.device) < self.options.ess_threshold * self.n
        needed &= ~constant_groups(self.log_weights)  # equal weights: resampling could only drop particles
        if self.n == 1 or not bool(needed.any()):
            return tensors
        identity = torch.arange(self.n, device=self.x.device).unsqueeze(1).expand(self.n, self.batch)
        ancestors = torch.where(needed.unsqueeze(0), systematic_resample(self.log_weights, self.generator).to(
            self.x.device), identity)
        self.x, self.potential_prev = self.gather(self.x, ancestors), self.gather(self.potential_prev, ancestors)
        self.log_weights = torch.where(needed.unsqueeze(0), torch.zeros_like(self.log_weights), self.log_weights)
        self.resampled += needed.cpu().long()
        self.lineage = [(self.gather(a, ancestors), self.gather(b, ancestors)) for a, b in self.lineage]
        if self.adapter is not None:
            self.adapter.gather(lambda tensor: self.gather(tensor, ancestors))
        return [self.gather(tensor, ancestors) for tensor in tensors]

    def move(self, t: Any, predictions: list[torch.Tensor], out_pre: torch.Tensor, out_q: torch.Tensor) -> None:
        """Draw ``x_{k+1}`` from the proposal; keep ``log p_pre / q`` (and the experts' value increment) of it."""
        scheduler, eta, x = self.scheduler, self.eta, self.x
        mean_pre, std = model_transition(scheduler, out_pre, t, x, eta)
        if self.options.proposal == "twisted":
            mean_q = twisted_mean(scheduler, out_q, out_pre, t, x, mean_pre, std)
        elif out_q is out_pre:  # FK steering: the proposal is the base
            mean_q = mean_pre
        else:
            mean_q, _ = model_transition(scheduler, out_q, t, x, eta)
        tilt = self.options.initial_tilt if self.adapter is None else self.adapter.tilt
        shift = None  # the blended proposal's shift of the base's step at tilt 1
        if self.options.proposal in BLENDED:
            shift = mean_q - mean_pre
            if self.adapter is None:
                shift = shift / tilt
            elif tilt != 1.0:
                mean_q = mean_pre + tilt * shift
        self.tilts.append(tilt)
        noise = randn_tensor(x.shape, generator=self.noise_generator, device=x.device, dtype=mean_q.dtype)
        self.x = (mean_q + std * noise).to(self.state_dtype)
        if shift is not None:
            a, b = step_projections(self.x, mean_q, shift, std)
            self.lineage.append((a, b))
            if self.adapter is not None:
                self.adapter.observe_move(a)
        x64, std64 = self.x.to(torch.float64), std.to(torch.float64)
        log_prob_pre = gaussian_log_prob(x64, mean_pre.to(torch.float64), std64)
        self.pending = log_prob_pre - gaussian_log_prob(x64, mean_q.to(torch.float64), std64)
        if self.options.potential == "experts":
            self.pending_value = torch.zeros_like(self.pending)
            for index, member in enumerate(self.m.members):
                if member is not BASE and self.m.value_coefficients.get(member, 0.0):
                    mean_i, _ = model_transition(scheduler, predictions[index], t, x, eta)
                    self.pending_value += self.m.value_coefficients[member] * (
                        gaussian_log_prob(x64, mean_i.to(torch.float64), std64) - log_prob_pre)

    def finish(self) -> SMCOutput:
        """The final weights ``p_pre / q`` of the last step times ``exp(lambda r_w(x_0) / alpha - h)``; one particle
        per group drawn by them."""
        final = _check_values(self.reward(self.x), self.rows).to(self.x.device)
        self.reward_rows += self.rows
        self.log_weights = self.log_weights + (self.pending + self.scale * final - self.potential_prev).view(
            self.n, self.batch)
        final_ess = effective_sample_size(self.log_weights)
        self.ess_history.append(final_ess.cpu())
        probabilities = torch.softmax(self.log_weights, dim=0).T.cpu()  # (B, N)
        chosen = torch.multinomial(probabilities, 1, generator=self.generator).flatten()
        # a group whose weights stayed equal and were never resampled returns its first particle: the blend's own
        # sample of that row (exact where the blend is exact; any fixed choice among equal weights is unbiased)
        untouched = constant_groups(self.log_weights).cpu() & (self.resampled == 0)
        chosen = torch.where(untouched, torch.zeros_like(chosen), chosen).to(self.x.device)
        grouped = self.x.view(self.n, self.batch, *self.x.shape[1:])
        return SMCOutput(
            samples=grouped[chosen, self.groups], network_evaluations=self.network_rows / self.batch,
            reward_evaluations=self.reward_rows / self.batch, final_ess=final_ess.cpu(),
            resampling_steps=self.resampled, ess_history=torch.stack(self.ess_history), particles=grouped,
            log_weights=torch.log_softmax(self.log_weights, dim=0),
            tilts=torch.tensor(self.tilts, dtype=torch.float64), target_tilts=self.target_tilts(),
        )

    def target_tilts(self) -> torch.Tensor:
        """:attr:`SMCOutput.target_tilts` from the final weights and the rows' ancestral ``(a_k, b_k)``."""
        if not self.lineage:
            return torch.full((len(self.tilts),), math.nan, dtype=torch.float64)
        weights = (torch.softmax(self.log_weights, dim=0) / self.batch).reshape(-1)
        return torch.tensor([tilt + float((weights * a).sum() / (weights * b).sum()) if float((weights * b).sum()) > 0
                             else math.nan for tilt, (a, b) in zip(self.tilts, self.lineage)], dtype=torch.float64)


@torch.no_grad()
def smc_sample(
    family: DenoiserFamily,
    preference: Preference,
    scheduler: Any,
    *,
    reward: Reward,
    alpha: float,
    generator: torch.Generator | int,
    options: SMCOptions = SMCOptions(),
    shape: tuple[int, ...] | None = None,
    latents: torch.Tensor | None = None,
    particle_latents: torch.Tensor | None = None,
    num_inference_steps: int = 50,
    eta: float = 1.0,
    cond: Mapping[str, Any] | None = None,
    noise_generator: torch.Generator | None = None,
    timestep_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SMCOutput:
    """Sample ``B`` outputs from the tilted base chain with ``options.particles`` particles each (module docstring;
    :class:`SMCOptions`). The same generator seed gives the same samples.

    ``shape = (B, ...)`` draws independent ``x_T`` for all ``N x B`` particles; ``latents`` ``(B, ...)`` are shared
    by the ``N`` particles of each output (the output then targets ``P*`` given ``x_T``; under the VP process
    ``E[exp(lambda r / alpha) | x_T]`` is nearly constant, so this changes little); ``particle_latents``
    ``(N x B, ...)``, particle-major (row ``n B + b`` is particle ``n`` of output ``b``): one ``x_T`` per particle
    drawn by the caller (a pipeline's own ``prepare_latents``, so that ``N = 1`` is its stock loop).
    ``noise_generator``: the stream of the step noise (default ``generator``, which also draws ``x_T``, the resampling
    and the final selection). ``timestep_kwargs``: extra ``scheduler.set_timesteps`` arguments (FLUX's ``sigmas`` and
    ``mu``). ``eta``: DDIM's stochasticity or the flow SDE's noise level (as in
    :func:`~diffusion_blend.sampling.sample`).
    """
    scale = preference.kl_scale / check_alpha(alpha)
    if not callable(reward):
        raise DiffusionBlendError("the SMC reward must be a callable x -> r_w(x), one value per row")
    generator = as_generator(generator)
    members = _Members.of(family, preference, options)
    x, batch = _initial_particles(scheduler, generator, options.particles, shape, latents, particle_latents, device,
                                  dtype)
    scheduler.set_timesteps(num_inference_steps, device=x.device, **dict(timestep_kwargs or {}))
    check_stochastic_steps(scheduler, eta)
    system = _ParticleFilter(family, members, options, scheduler, reward, scale, x, batch, eta,
                             repeat_rows(dict(cond or {}), options.particles, batch), generator,
                             generator if noise_generator is None else noise_generator)
    for k, t in enumerate(tqdm(list(scheduler.timesteps), desc="SMC", disable=not progress, leave=False)):
        predictions, out_pre, out_q, _ = system.predict(t)
        system.reweight(k, t, out_q)
        kept = [out_q, out_pre, *(predictions if options.potential == "experts" else [])]
        out_q, out_pre, *rest = system.resample(kept)
        if options.potential == "experts":
            predictions = rest
        system.move(t, predictions, out_pre, out_q)
    return system.finish()
