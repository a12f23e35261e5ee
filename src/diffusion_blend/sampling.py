"""Layer 3: sampling loops over diffusers schedulers, for any denoiser.

The loop is the scheduler's own (``set_timesteps``, ``scale_model_input``, ``step``). For DDPM and DDIM we
also expose each step's Gaussian transition ``p(x_{t-1} | x_t) = N(mean, std^2 I)``
(:func:`transition_distribution`), which diffusers does not: RL fine-tuning needs the per-step log-probability
of a trajectory and the exact per-step KL between two models' transitions (DPOK; paper section 4). Tests
check that ``mean + std * noise`` is exactly what ``scheduler.step`` returns for the same noise.

Flow-matching models (SD3, FLUX: rectified flow ``x_s = (1 - s) x_0 + s eps``, the network predicts the velocity
``v = eps - x_0``) sample with :class:`FlowMatchSDEScheduler`, the marginal-preserving SDE of Flow-GRPO
(:func:`flow_transition`), whose steps are Gaussian with an explicit mean and std. :func:`model_transition` is the
one entry point from a network's raw output to the step's Gaussian, for every scheduler the package samples with.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteSchedulerOutput,
)
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from diffusion_blend.denoisers import Denoiser
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.preference import step_progress


def as_generator(
    generator: torch.Generator | int | list[torch.Generator], device: torch.device | str = "cpu"
) -> torch.Generator | list[torch.Generator]:
    """A ``torch.Generator`` from a seed (or the generator itself; a list of generators, one per batch row as in
    diffusers' pipelines, passes through)."""
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, list) and generator and all(isinstance(g, torch.Generator) for g in generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"expected an integer seed or a torch.Generator, got {generator!r}")
    return torch.Generator(device=device).manual_seed(generator)


def timestep_progress(scheduler: Any) -> Callable[[Any], float]:
    """``progress(t)``: the position of timestep ``t`` in ``scheduler.timesteps`` (as ``set_timesteps`` left them) as
    ``u`` in ``[0, 1]``, 0 at the first step and 1 at the last: what a weight schedule is a function of
    (:class:`~diffusion_blend.preference.PreferenceSchedule`)."""

    def progress(t: Any) -> float:
        timesteps = torch.as_tensor(scheduler.timesteps).flatten().double()
        value = float(torch.as_tensor(t).flatten()[0])
        return step_progress(int(torch.argmin((timesteps - value).abs())), len(timesteps))

    return progress


def make_scheduler(
    kind: str = "ddim",
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    clip_sample: bool = False,
    **config: Any,
) -> DDIMScheduler | DDPMScheduler:
    """A diffusers DDIM or DDPM scheduler; ``clip_sample=False`` by default (right for non-image data)."""
    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if kind not in classes:
        raise ValueError(f"unknown scheduler kind {kind!r}; choose one of {sorted(classes)}")
    return classes[kind](
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, clip_sample=clip_sample, **config
    )


def to_epsilon(scheduler: Any, model_output: torch.Tensor, t: Any, x_t: torch.Tensor) -> torch.Tensor:
    """Convert a model output of the scheduler's ``prediction_type`` to a noise prediction.

    The conversion is affine in the output with coefficients shared by all models, so blends commute with it.
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return model_output
    abar = scheduler.alphas_cumprod[int(t)].to(x_t.device, x_t.dtype)
    if prediction_type == "v_prediction":
        return abar.sqrt() * model_output + (1 - abar).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - abar.sqrt() * model_output) / (1 - abar).sqrt()
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def tweedie_x0(scheduler: Any, model_output: torch.Tensor, t: Any, x_t: torch.Tensor) -> torch.Tensor:
    """``E[x_0 | x_t] ≈ (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (Tweedie; differentiable in ``x_t``).

    Flow-matching schedulers: ``x_s - s v`` (the velocity's x0 prediction at ``s = sigma``)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigma = scheduler.sigmas[_flow_step_index(scheduler, t)].to(x_t.device, x_t.dtype)
        return x_t - sigma * model_output
    eps = to_epsilon(scheduler, model_output, t, x_t)
    abar = scheduler.alphas_cumprod[int(t)].to(x_t.device, x_t.dtype)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def score_estimate(scheduler: Any, model_output: torch.Tensor, t: Any, x_t: torch.Tensor) -> torch.Tensor:
    """The score ``grad log p_t(x_t)`` a model output implies (affine in the output).

    Variance-preserving schedulers: ``-eps / sqrt(1 - abar_t)`` (paper section 2.8); flow-matching schedulers: the
    rectified-flow score ``-(x_s + (1 - s) v) / s`` (as in :func:`flow_transition`)."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigma = scheduler.sigmas[_flow_step_index(scheduler, t)].to(x_t.device, x_t.dtype)
        return -(x_t + (1 - sigma) * model_output) / sigma
    eps = to_epsilon(scheduler, model_output, t, x_t)
    abar = scheduler.alphas_cumprod[int(t)].to(x_t.device, x_t.dtype)
    return -eps / (1 - abar).sqrt()


def _previous_alpha_cumprod(scheduler: Any, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    alphas_cumprod = scheduler.alphas_cumprod
    if isinstance(scheduler, DDIMScheduler):
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        prev = alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    else:
        prev_t = int(scheduler.previous_timestep(t))
        prev = alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.one
    return alphas_cumprod[t], torch.as_tensor(prev)


def transition_distribution(
    scheduler: DDIMScheduler | DDPMScheduler, eps: torch.Tensor, t: Any, x_t: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the sampler's Gaussian step ``x_t -> x_{t-1}`` given noise prediction ``eps``.

    DDIM (Song et al. 2021, eq. 12) with ``sigma_t = eta * sqrt((1-abar_prev)/(1-abar_t) (1-abar_t/abar_prev))``;
    DDPM (Ho et al. 2020, eq. 7) with the scheduler's fixed variance. ``std`` is a 0-d tensor (it may be 0:
    a deterministic step). Mirrors ``scheduler.step`` including ``clip_sample``.
    """
    t = int(t)
    if scheduler.config.get("thresholding", False):
        raise ValueError("dynamic thresholding makes the transition non-Gaussian; disable it for trajectories")
    abar_t, abar_prev = (a.to(x_t.device, torch.float64) for a in _previous_alpha_cumprod(scheduler, t))
    x0 = (x_t - (1 - abar_t).sqrt().to(x_t.dtype) * eps) / abar_t.sqrt().to(x_t.dtype)
    if scheduler.config.clip_sample:
        bound = scheduler.config.clip_sample_range
        x0 = x0.clamp(-bound, bound)  # like scheduler.step, the direction term keeps the unclipped eps
    if isinstance(scheduler, DDIMScheduler):
        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        std = eta * variance.clamp(min=0).sqrt()
        direction = (1 - abar_prev - std**2).clamp(min=0).sqrt()
        mean = abar_prev.sqrt().to(x_t.dtype) * x0 + direction.to(x_t.dtype) * eps
        return mean, std.to(x_t.dtype)
    if isinstance(scheduler, DDPMScheduler):
        alpha_t = abar_t / abar_prev
        beta_t = 1 - alpha_t
        coef_x0 = abar_prev.sqrt() * beta_t / (1 - abar_t)
        coef_xt = alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t)
        mean = coef_x0.to(x_t.dtype) * x0 + coef_xt.to(x_t.dtype) * x_t
        variance_type = scheduler.config.variance_type
        if t == 0:
            std = torch.zeros((), dtype=torch.float64)
        elif variance_type == "fixed_small":
            std = ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp(min=1e-20).sqrt()
        elif variance_type == "fixed_large":
            std = beta_t.sqrt()
        else:
            raise ValueError(f"DDPM variance_type {variance_type!r} is not supported for trajectories")
        return mean, std.to(x_t.dtype)
    raise TypeError(f"transition_distribution supports DDIM and DDPM schedulers, not {type(scheduler).__name__}")


class FlowMatchSDEScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow matching sampled with the marginal-preserving SDE of Flow-GRPO (``sde_step_with_logprob``,
    ``sde_type='sde'``).

    A drop-in for diffusers' ``FlowMatchEulerDiscreteScheduler`` (same sigmas, shifts, ``set_timesteps``
    arguments, so stock SD3/FLUX pipelines run with it unchanged) whose ``step`` draws from the Gaussian of
    :func:`flow_transition` with noise level ``noise_level`` (Flow-GRPO's ``eta``; 0 is the Euler ODE).
    ``step(..., eta=...)`` overrides the level for one call (the generic :func:`sample` loop passes its ``eta``).
    Stock pipelines call ``step`` without a generator: :meth:`set_noise_generator` gives the noise a seeded stream
    (else it comes from the global torch RNG, like diffusers' own stochastic schedulers).
    """

    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        noise_level: float = 0.7,
    ):
        if stochastic_sampling:
            raise DiffusionBlendError("FlowMatchSDEScheduler is itself stochastic: leave stochastic_sampling False")
        if invert_sigmas:
            raise DiffusionBlendError("FlowMatchSDEScheduler does not support invert_sigmas")
        noise_level = float(noise_level)
        if not math.isfinite(noise_level) or noise_level < 0:
            raise DiffusionBlendError(f"noise_level must be a finite number >= 0, got {noise_level}")
        super().__init__(
            num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len, invert_sigmas=invert_sigmas, shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas, time_shift_type=time_shift_type, stochastic_sampling=False,
        )
        self.noise_generator: torch.Generator | None = None

    def set_noise_generator(self, generator: torch.Generator | int | None) -> None:
        """The stream the SDE noise is drawn from when ``step`` gets no ``generator`` (``None``: global RNG)."""
        self.noise_generator = None if generator is None else as_generator(generator)

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample  # flow models take x_s unscaled

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        eta: float | None = None,
        return_dict: bool = True,
        **unused: Any,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One SDE step ``x_s -> x_{s'} = mean + std * noise`` (:func:`flow_transition`), computed in float32."""
        if self.step_index is None:
            self._init_step_index(timestep)
        level = self.config.noise_level if eta is None else eta
        mean, std = flow_transition(self, model_output.float(), timestep, sample.float(), level,
                                    step_index=self.step_index)
        noise = randn_tensor(mean.shape, generator=generator or self.noise_generator, device=mean.device,
                             dtype=mean.dtype)
        prev_sample = (mean + std * noise).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


def _flow_step_index(scheduler: FlowMatchEulerDiscreteScheduler, t: Any) -> int:
    t = torch.as_tensor(t, device=scheduler.timesteps.device)
    if t.ndim:
        t = t.flatten()[0]
    return int(scheduler.index_for_timestep(t.to(scheduler.timesteps.dtype)))


def flow_transition(
    scheduler: FlowMatchEulerDiscreteScheduler,
    velocity: torch.Tensor,
    t: Any,
    x_t: torch.Tensor,
    eta: float = 0.7,
    step_index: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the flow SDE step ``x_s -> x_{s'}`` (``s = sigma`` at timestep ``t``, ``s' < s`` the next sigma).

    Flow-GRPO's SDE (``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``, ``sde_type='sde'``): with
    ``dt = s' - s < 0`` and ``g = eta * sqrt(s / (1 - s))`` (``s = 1`` uses ``sigmas[1]`` in the denominator),

        mean = x (1 + g^2 dt / (2 s)) + v (1 + g^2 (1 - s) / (2 s)) dt,      std = g sqrt(-dt).

    This is the Euler-Maruyama step of ``dx = [v - (g^2 / 2) score] dt + g dW`` with the rectified-flow score
    ``-(x + (1 - s) v) / s``, whose marginals are the flow's for every ``g`` (``eta = 0``: the Euler ODE). The
    step is affine in ``v`` with coefficients shared by all models, so it commutes with sum-to-one blends.
    ``std`` is a 0-d tensor. ``step_index`` defaults to the index of ``t`` in ``scheduler.timesteps``.
    """
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise DiffusionBlendError(f"the flow SDE's noise level eta must be a finite number >= 0, got {eta}")
    index = _flow_step_index(scheduler, t) if step_index is None else int(step_index)
    sigmas = scheduler.sigmas.to(torch.float64)
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    dt = sigma_next - sigma
    denominator = 1 - (sigmas[1] if float(sigma) == 1.0 else sigma)
    g = eta * (sigma / denominator).sqrt()
    coef_x = (1 + g**2 / (2 * sigma) * dt).to(x_t.device, x_t.dtype)
    coef_v = ((1 + g**2 * (1 - sigma) / (2 * sigma)) * dt).to(x_t.device, x_t.dtype)
    mean = coef_x * x_t + coef_v * velocity
    return mean, (g * (-dt).sqrt()).to(x_t.device, x_t.dtype)


def model_transition(scheduler: Any, model_output: torch.Tensor, t: Any, x_t: torch.Tensor, eta: float = 1.0):
    """Mean and std of the sampler's Gaussian step given the network's raw output.

    - DDIM / DDPM: :func:`transition_distribution` of the output converted to a noise prediction (``eta``: DDIM's);
    - :class:`FlowMatchSDEScheduler`: :func:`flow_transition` with noise level ``eta``;
    - diffusers' ``FlowMatchEulerDiscreteScheduler``: its own step as a Gaussian: the Euler ODE ``x + dt v``
      (std 0), or with ``stochastic_sampling=True`` ``N((1 - s') x0_hat, s'^2 I)`` (``x0_hat = x - s v``).
    """
    if isinstance(scheduler, FlowMatchSDEScheduler):
        return flow_transition(scheduler, model_output, t, x_t, eta)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if not scheduler.config.stochastic_sampling:
            return flow_transition(scheduler, model_output, t, x_t, 0.0)
        index = _flow_step_index(scheduler, t)
        sigma, sigma_next = (scheduler.sigmas[i].to(x_t.device, x_t.dtype) for i in (index, index + 1))
        return (1 - sigma_next) * (x_t - sigma * model_output), sigma_next
    return transition_distribution(scheduler, to_epsilon(scheduler, model_output, t, x_t), t, x_t, eta)


def scale_input(scheduler: Any, x: torch.Tensor, t: Any) -> torch.Tensor:
    """``scheduler.scale_model_input`` where the scheduler has one (flow-matching schedulers do not scale)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, std^2 I)`` summed over all but the batch dimension (0 where ``std == 0``)."""
    if float(std) == 0.0:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    dims = tuple(range(1, x.ndim))
    d = math.prod(x.shape[1:])
    squared = ((x - mean) ** 2).sum(dims)
    return -squared / (2 * std**2) - d * (torch.log(std) + 0.5 * math.log(2 * math.pi))


@dataclass
class Trajectory:
    """A sampled chain ``x_T -> ... -> x_0`` with per-step Gaussian log-probabilities.

    ``latents[k]`` is the state before step ``k`` (``latents[-1]`` is the sample), ``timesteps[k]`` the
    step's timestep, ``log_probs[k, b]`` = ``log p(latents[k+1, b] | latents[k, b])`` under the sampling
    denoiser, ``stds[k]`` the step's noise scale (0 for a deterministic step).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    stds: torch.Tensor
    eta: float


@dataclass
class SampleOutput:
    samples: torch.Tensor
    trajectory: Trajectory | None = None


def initial_latents(
    scheduler: Any,
    generator: torch.Generator,
    shape: tuple[int, ...] | None = None,
    latents: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``x_T``: the given ``latents`` (checked finite) or noise of ``shape`` drawn from ``generator``."""
    if latents is None:
        if shape is None:
            raise DiffusionBlendError("give the sample shape or the initial latents")
        latents = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    if not torch.isfinite(latents).all():
        raise DiffusionBlendError("initial latents contain NaN or infinite values")
    return latents


def step_kwargs(scheduler: Any, eta: float, generator: torch.Generator) -> dict[str, Any]:
    """The keyword arguments ``scheduler.step`` accepts among ``eta`` and ``generator``."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler: Any,
    *,
    generator: torch.Generator | int | list[torch.Generator],
    shape: tuple[int, ...] | None = None,
    latents: torch.Tensor | None = None,
    num_inference_steps: int = 50,
    eta: float = 1.0,
    cond: Mapping[str, Any] | None = None,
    record_trajectory: bool = False,
    progress: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SampleOutput:
    """Run the scheduler's reverse process with ``denoiser``.

    Give either ``shape`` (initial noise drawn from ``generator``) or ``latents`` (``x_T``). ``eta`` is the
    DDIM stochasticity (the paper samples with ``eta = 1``) and the noise level of :class:`FlowMatchSDEScheduler`;
    other schedulers ignore it. With ``record_trajectory=True`` (DDIM, DDPM and the flow schedulers) the output
    carries a :class:`Trajectory` with per-step log-probabilities. The same generator seed gives the same samples.
    ``generator`` may be a list of one generator per batch row (diffusers' convention): row ``b``'s initial noise
    and step noise then come from ``generator[b]`` alone, so a row's trajectory does not depend on which other
    rows share its batch.
    """
    generator = as_generator(generator)
    if isinstance(generator, list):
        rows = latents.shape[0] if latents is not None else (shape[0] if shape else None)
        if rows != len(generator):
            raise DiffusionBlendError(f"{len(generator)} generators for a batch of {rows} rows")
    cond = dict(cond or {})
    latents = initial_latents(scheduler, generator, shape, latents, device, dtype)
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    kwargs = step_kwargs(scheduler, eta, generator)
    x = latents
    states, log_probs, stds = [x], [], []
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        model_output = denoiser(scale_input(scheduler, x, t), t, **cond)
        if not record_trajectory:
            x = scheduler.step(model_output, t, x, **kwargs).prev_sample
            continue
        mean, std = model_transition(scheduler, model_output, t, x, eta)
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_prev = mean + std * noise
        log_probs.append(gaussian_log_prob(x_prev, mean, std))
        stds.append(std)
        states.append(x_prev)
        x = x_prev
    trajectory = None
    if record_trajectory:
        trajectory = Trajectory(
            latents=torch.stack(states),
            timesteps=scheduler.timesteps.clone(),
            log_probs=torch.stack(log_probs),
            stds=torch.stack(stds),
            eta=eta,
        )
    return SampleOutput(samples=x, trajectory=trajectory)
