"""KL-regularized policy-gradient fine-tuning of a diffusion sampler into a LoRA adapter (paper section 4, DPOK).

The policy is the sampler's Markov chain ``x_T -> ... -> x_0`` with Gaussian steps
``pi_theta(x_{k+1} | x_k) = N(mu_theta(x_k), sigma_k^2 I)`` (DDIM ``eta > 0`` or DDPM), ``theta`` the LoRA
parameters; the base ``p_pre`` is the SAME network with its adapter disabled. The objective is

    J(theta) = E_pi[ r_w(x_0) ] - alpha * E_pi[ sum_k KL_k(x_k) ],
    KL_k(x) = || mu_theta(x) - mu_pre(x) ||^2 / (2 sigma_k^2)            (exact Gaussian KL per step)

whose optimum over path measures is ``p_pre exp(r_w / alpha) / Z`` (paper section 1; Proposition 1), so
``alpha`` means what it means in the theory. Steps with ``sigma_k = 0`` are deterministic: they carry no
log-probability and no KL (they are excluded from both, see docs/finetuning.md).

Gradient estimator (per trajectory, exact in expectation):

    grad J = E[ sum_k grad log pi_theta(x_{k+1} | x_k) * A_k ]  -  alpha * E[ sum_k grad_theta KL_k(x_k) ]
    A_k    = r_w(x_0) - alpha * sum_{j > k} KL_j(x_j)  -  b_k        (KL-regularized reward-to-go)

The first term is REINFORCE on the KL-regularized return: the action at step ``k`` moves the states ``x_j``
(``j > k``) at which the later KL terms are evaluated, so their cost enters the return; ``KL_k(x_k)`` itself
does not depend on the action taken at step ``k``. The second term differentiates the analytic KL at the
visited states. ``b_k`` is the leave-one-out batch mean of the return at step ``k`` (a state-independent
baseline: unbiased); with ``baseline="tweedie"`` it is ``c_k h_k(x_k) + mean_{j != b}(return_k - c_k h_k)`` with
``h_k = r_w(decode(x0_hat(x_k)))`` the reward of the policy's Tweedie estimate at the visited state: it depends on
the state, not on the action taken there, so the estimator stays unbiased, and it tracks ``E[r | x_k]`` closely
at late steps, where most of the variance of the plain baseline comes from. Advantages are NOT divided by their
standard deviation: that would rescale the
policy-gradient term against the KL term and move the optimum away from ``p_pre exp(r/alpha)``. The
policy-gradient term uses PPO's clipped importance ratio so that several updates can reuse one batch
(``ratio = 1`` on the first update: plain REINFORCE).

Pathwise estimator (``DPOKConfig.estimator = "pathwise"``, differentiable rewards only): the chain is
reparameterised, ``x_{k+1} = mu_theta(x_k) + sigma_k eps_k`` with ``eps_k`` drawn independently of ``theta``, so
``J`` is differentiated directly by backpropagation through all ``K`` steps, the reward and the per-step KL (whose
inputs ``x_k`` depend on ``theta``). It estimates the gradient of the SAME objective (same optimum, same
``alpha``) with far less variance than REINFORCE when ``r`` has gradients (DRaFT / AlignProp back-propagate the
reward the same way, without the exact KL). It refuses samplers with a deterministic step: there the path KL does
not bound the KL of the samples, and the gradient would change that step at no cost (docs/finetuning.md).

Memory and precision (docs/finetuning.md, "Memory and precision"): rollouts and the pathwise chain run
``minibatch_size`` rows at a time, every row with its own generator (:func:`row_generators`), so chunking does
not change a single random draw and peak activation memory does not grow with ``batch_size``; the policy, the
base and both CFG branches of a chunk are ONE network batch (``lora.LoraFamily`` with the target forward's
``stacked_copies``). Frozen weights may be bfloat16/float16 (``DPOKConfig.dtype``); LoRA parameters, Adam
state, log-probabilities and the exact KL stay float32. Gradient checkpointing recomputes the network's blocks
in the policy update and each sampler step of the pathwise chain (its memory then does not grow with the
number of steps).

Scale-out: each process samples its own trajectories from a generator seeded by ``(seed, rank)``; LoRA
gradients are averaged across processes with ``accelerator.reduce`` after every backward pass (the network
is not wrapped in DDP: one update runs one forward per denoising step before a backward, and the adapter
toggling needs the bare module). Checkpoints (``training.checkpoint``) make an interrupted run resume to the
identical final adapter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from accelerate import Accelerator
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from tqdm.auto import tqdm

from diffusion_blend import lora
from diffusion_blend.adapters import base_fingerprint, save_adapter
from diffusion_blend.denoisers import Denoiser
from diffusion_blend.errors import DiffusionBlendError, RewardError
from diffusion_blend.files import remove_partial_files, write_json_atomic
from diffusion_blend.preference import BASE
from diffusion_blend.sampling import (
    gaussian_log_prob,
    initial_latents,
    model_transition,
    sample,
    tweedie_x0,
)
from diffusion_blend.training.checkpoint import (
    CheckpointState,
    load_checkpoint,
    save_checkpoint,
)
from diffusion_blend.training.config import DPOKConfig, FinetuneTarget

PairFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``pair(x_t, t, **cond) -> (eps_policy, eps_base)`` evaluated together."""

CHECKPOINT_NAME = "checkpoint.safetensors"
ADAPTER_NAME = "adapter.safetensors"
LOG_NAME = "log.json"


class TrainingInterrupted(RuntimeError):
    """Raised by the ``stop_after`` test hook to simulate a killed run."""


def process_seed(seed: int, rank: int) -> int:
    """A per-process seed derived from the run seed (distinct streams per rank, reproducible)."""
    return int.from_bytes(hashlib.sha256(f"dpok:{seed}:{rank}".encode()).digest()[:8], "little") & (2**63 - 1)


def row_generators(generator: torch.Generator, rows: int) -> list[torch.Generator]:
    """One CPU generator per trajectory, seeded from ``generator`` (``rows`` draws from it).

    Each trajectory's initial noise and step noise come from its own generator, so sampling the batch in chunks
    of any size draws exactly the same numbers as sampling it in one piece (diffusers' list-of-generators
    convention; :func:`diffusion_blend.sampling.sample` accepts it).
    """
    seeds = torch.randint(0, 2**63 - 1, (rows,), generator=generator)
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds.tolist()]


def _chunks(rows: int, chunk_size: int | None) -> list[slice]:
    size = rows if chunk_size is None else max(1, int(chunk_size))
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _concat_cond(parts: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """Join per-chunk conditioning: batched tensors (leading dim = the chunk's rows) along the batch."""
    if not parts:
        return {}
    joined = {}
    for key, value in parts[0].items():
        batched = torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == sizes[0]
        joined[key] = torch.cat([part[key] for part in parts]) if batched else value
    return joined


@dataclass
class Rollout:
    """Trajectories with everything the estimator needs, all detached.

    ``latents[k]`` is the state before step ``k``; ``means_policy[k]`` / ``means_base[k]`` the two models'
    transition means there; ``stds[k]`` the step's noise scale; ``kl[k, b]`` the exact per-step KL
    ``||mu_policy - mu_base||^2 / (2 sigma_k^2)`` (0 where ``sigma_k = 0``).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    stds: torch.Tensor
    means_base: torch.Tensor
    kl: torch.Tensor
    prompts: list[str] | None
    cond: dict[str, Any]
    x0_estimates: torch.Tensor  # (K, B, ...): the policy's Tweedie estimate of x_0 at each visited state

    @property
    def samples(self) -> torch.Tensor:
        return self.latents[-1]

    @property
    def path_kl(self) -> torch.Tensor:
        """``sum_k KL_k`` per trajectory: the path KL of the sampled chain to the base (single-sample estimate)."""
        return self.kl.sum(0)


def step_kl(mean_policy: torch.Tensor, mean_base: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Exact KL between ``N(mean_policy, std^2 I)`` and ``N(mean_base, std^2 I)`` per row; 0 when ``std == 0``."""
    if float(std) == 0.0:
        return torch.zeros(mean_policy.shape[0], dtype=mean_policy.dtype, device=mean_policy.device)
    dims = tuple(range(1, mean_policy.ndim))
    return ((mean_policy - mean_base) ** 2).sum(dims) / (2 * std**2)


def adapter_pair(model: torch.nn.Module, forward: lora.Forward, adapter_name: str, routing: str = "auto") -> PairFn:
    """Policy (adapter on) and base (adapter off) predictions of ONE network (``routing``: one batched forward or
    one forward each, see :class:`~diffusion_blend.lora.LoraFamily`)."""
    family = lora.LoraFamily(model, forward, [adapter_name], routing=routing)

    def pair(x_t: torch.Tensor, t: Any, **cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        policy, base = family.predict_all(x_t, t, [adapter_name, BASE], **cond)
        return policy, base

    return pair


def denoiser_pair(policy: Denoiser, base: Denoiser) -> PairFn:
    """Pair two separate denoisers (e.g. a DB-MPA blend and the base) for evaluation."""

    def pair(x_t: torch.Tensor, t: Any, **cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return policy(x_t, t, **cond), base(x_t, t, **cond)

    return pair


@torch.no_grad()
def rollout(
    target: FinetuneTarget,
    pair: PairFn,
    batch_size: int,
    generator: torch.Generator,
    *,
    num_inference_steps: int,
    eta: float,
    device: torch.device | str = "cpu",
    chunk_size: int | None = None,
) -> Rollout:
    """Sample ``batch_size`` trajectories of the policy and record the base's transition means along them.

    Prompts are drawn for the whole batch first, then one generator per trajectory (:func:`row_generators`);
    the trajectories are sampled ``chunk_size`` rows at a time (``None``: all at once) with
    :func:`diffusion_blend.sampling.sample` (``record_trajectory=True``: per-step log-probs), so the result does
    not depend on ``chunk_size`` while peak activation memory is that of one chunk. The denoiser passed to
    ``sample`` records both models' predictions so that the exact per-step KL can be formed.
    """
    prompts = target.draw_prompts(batch_size, generator)
    generators = row_generators(generator, batch_size)
    parts = [
        _rollout_chunk(target, pair, generators[rows], None if prompts is None else prompts[rows],
                       num_inference_steps=num_inference_steps, eta=eta, device=device)
        for rows in _chunks(batch_size, chunk_size)
    ]
    joined = {name: torch.cat([getattr(part, name) for part in parts], dim=1)
              for name in ("latents", "log_probs", "means_base", "kl", "x0_estimates")}
    return Rollout(timesteps=parts[0].timesteps, stds=parts[0].stds, prompts=prompts,
                   cond=_concat_cond([part.cond for part in parts], [part.latents.shape[1] for part in parts]),
                   **joined)


def _rollout_chunk(
    target: FinetuneTarget,
    pair: PairFn,
    generators: list[torch.Generator],
    prompts: list[str] | None,
    *,
    num_inference_steps: int,
    eta: float,
    device: torch.device | str,
) -> Rollout:
    cond = target.encode(prompts)
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    scheduler = target.scheduler

    def record(x_t: torch.Tensor, t: Any, **kwargs: Any) -> torch.Tensor:
        policy, base = pair(x_t, t, **kwargs)
        recorded.append((policy, base))
        return policy

    trajectory = sample(
        record,
        scheduler,
        generator=generators,
        shape=(len(generators), *target.sample_shape),
        num_inference_steps=num_inference_steps,
        eta=eta,
        cond=cond,
        record_trajectory=True,
        progress=False,
        device=device,
    ).trajectory
    means_base, kls, x0_estimates = [], [], []
    for k, t in enumerate(trajectory.timesteps):
        x_t = trajectory.latents[k]
        policy_out, base_out = recorded[k]
        x0_estimates.append(tweedie_x0(scheduler, policy_out, t, x_t))
        mean_policy, std = model_transition(scheduler, policy_out, t, x_t, eta)
        mean_base, _ = model_transition(scheduler, base_out, t, x_t, eta)
        means_base.append(mean_base)
        kls.append(step_kl(mean_policy, mean_base, std))
    return Rollout(
        latents=trajectory.latents,
        timesteps=trajectory.timesteps,
        log_probs=trajectory.log_probs,
        stds=trajectory.stds,
        means_base=torch.stack(means_base),
        kl=torch.stack(kls),
        prompts=prompts,
        cond=cond,
        x0_estimates=torch.stack(x0_estimates),
    )


def score_rewards(
    target: FinetuneTarget, names: Sequence[str], samples: torch.Tensor, prompts: Sequence[str] | None,
    keep_grad: bool = False, chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Each named reward on the decoded samples; NaN/inf raises :class:`RewardError` naming the reward.

    ``keep_grad``: keep the autograd graph from ``samples`` through ``target.decode`` to the values (the pathwise
    estimator); a reward that returns values without gradients then raises :class:`RewardError`. Without it the
    decode runs under ``no_grad``. ``chunk_size``: decode and score that many samples at a time (decoded images
    of the whole batch are never held at once).
    """
    unknown = [name for name in names if name not in target.rewards]
    if unknown:
        raise RewardError(f"target {target.name!r} has no reward {', '.join(map(repr, unknown))}; "
                          f"available: {', '.join(target.rewards)}")
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for rows in _chunks(samples.shape[0], chunk_size):
        part = samples[rows]
        with torch.set_grad_enabled(keep_grad and torch.is_grad_enabled()):
            decoded = target.decode(part)
        for name in names:
            value = torch.as_tensor(target.rewards[name](decoded, None if prompts is None else list(prompts[rows])))
            value = value.to(torch.float32).reshape(-1)
            if keep_grad and part.requires_grad and not value.requires_grad:
                raise RewardError(f"reward {name!r} returned values without gradients; the pathwise estimator needs "
                                  "a differentiable reward (use estimator='score')")
            value = value if keep_grad else value.detach()
            if value.shape[0] != part.shape[0]:
                raise RewardError(f"reward {name!r} returned {value.shape[0]} values for {part.shape[0]} samples")
            if not torch.isfinite(value).all():
                bad = int((~torch.isfinite(value)).sum())
                raise RewardError(f"reward {name!r} returned {bad} NaN or infinite value(s); training stopped "
                                  "(checkpoints and adapters already saved are kept)")
            pieces[name].append(value.to(samples.device))
    return {name: torch.cat(values) for name, values in pieces.items()}


def kl_regularized_advantages(
    reward: torch.Tensor, kl: torch.Tensor, alpha: float, state_values: torch.Tensor | None = None
) -> torch.Tensor:
    """``A_k = r - alpha * sum_{j>k} KL_j - b_k`` (module docstring).

    ``reward``: ``(B,)``; ``kl``: ``(K, B)``; ``state_values`` (optional, ``(K, B)``): a control variate
    ``h_k(x_k)`` of each visited state. ``b_k = c_k h_k + `` the leave-one-out batch mean of
    ``return_k - c_k h_k``, with ``c_k`` the batch regression coefficient of the return on ``h_k`` clipped to
    ``[0, 1]`` (a bias of order 1/B from estimating ``c_k`` on the batch; ``h = 0``: the plain leave-one-out
    mean, exactly unbiased). Returns ``(K, B)``.
    """
    cost_to_go = kl.flip(0).cumsum(0).flip(0) - kl  # sum over j > k
    returns = reward[None, :] - alpha * cost_to_go
    residual = returns
    if state_values is not None:
        # per-step regression coefficient of the return on h_k, clipped to [0, 1]: ~0 where h_k carries no
        # information (e.g. wild Tweedie estimates at high noise), ~1 where it predicts the return
        centred_h = state_values - state_values.mean(1, keepdim=True)
        centred_r = returns - returns.mean(1, keepdim=True)
        slope = ((centred_h * centred_r).sum(1, keepdim=True) / (centred_h.pow(2).sum(1, keepdim=True) + 1e-12))
        residual = returns - slope.clamp(0.0, 1.0) * state_values
    batch = returns.shape[1]
    if batch < 2:
        return residual - residual.mean(1, keepdim=True)
    leave_one_out = (residual.sum(1, keepdim=True) - residual) / (batch - 1)
    return residual - leave_one_out


@dataclass
class FinetuneResult:
    """The fine-tuned model (carrying adapter ``adapter_name``), its file, the per-iteration curves, and what the
    iterations of this call cost: wall seconds each, and on CUDA ``torch.cuda.max_memory_allocated`` (bytes)."""

    model: torch.nn.Module
    adapter_name: str
    adapter_path: Path | None
    curves: list[dict[str, float]] = field(default_factory=list)
    seconds_per_iteration: list[float] = field(default_factory=list)
    cuda_max_memory_allocated: int | None = None


def _sync_gradients(parameters: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def _optimizer_step(
    parameters: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    accelerator: Accelerator, max_grad_norm: float,
) -> None:
    """Average gradients across processes, unscale (float16), clip, step, update the loss scale."""
    _sync_gradients(parameters, accelerator)
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    scaler.step(optimizer)  # skipped by the scaler when a float16 gradient overflowed
    scaler.update()


def _score_function_update(
    target: FinetuneTarget,
    config: DPOKConfig,
    pair: PairFn,
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One batch of the REINFORCE/PPO estimator (module docstring): rollout, advantages, ``updates_per_batch``
    passes; returns the weighted reward, path KL and basis rewards of the batch."""
    names = list(config.reward_weights)
    chunk = config.minibatch_size
    batch = rollout(target, pair, config.batch_size, generator, num_inference_steps=config.num_inference_steps,
                    eta=config.eta, device=accelerator.device, chunk_size=chunk)
    rewards = score_rewards(target, names, batch.samples, batch.prompts, chunk_size=chunk)
    reward = sum(config.reward_weights[name] * rewards[name] for name in names)
    state_values = None
    if config.baseline == "tweedie":
        state_values = torch.stack([
            sum(config.reward_weights[n] * v
                for n, v in score_rewards(target, names, x0, batch.prompts, chunk_size=chunk).items())
            for x0 in batch.x0_estimates
        ])
    advantages = kl_regularized_advantages(reward, batch.kl, config.alpha, state_values)
    _policy_update(target, config, batch, advantages, parameters, optimizer, accelerator, generator, scaler)
    return reward, batch.path_kl, rewards


def _checkpointed(forward: lora.Forward) -> lora.Forward:
    """``forward`` under activation checkpointing as a whole (for networks without block-level checkpointing)."""

    def run(model: torch.nn.Module, x_t: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(forward, model, x_t, t, use_reentrant=False, **cond)

    run.stacked_copies = lora.stacked_copies(forward)  # type: ignore[attr-defined]
    return run


def _policy_update(
    target: FinetuneTarget,
    config: DPOKConfig,
    batch: Rollout,
    advantages: torch.Tensor,
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler,
) -> None:
    """``updates_per_batch`` passes of clipped policy gradient + analytic KL over the batch (module docstring).

    One forward (both CFG branches of the policy) of ``minibatch_size`` rows per step, each followed by its
    backward: activation memory is one minibatch's forward (with ``gradient_checkpointing``, one block's).
    """
    model, scheduler, eta = target.model, target.scheduler, config.eta
    forward = target.forward
    if config.gradient_checkpointing and not hasattr(model, "enable_gradient_checkpointing"):
        forward = _checkpointed(forward)  # diffusers networks checkpoint their blocks (enabled in finetune)
    stochastic = [k for k in range(len(batch.timesteps)) if float(batch.stds[k]) > 0]
    num_rows = batch.latents.shape[1]
    for _ in range(config.updates_per_batch):
        order = torch.randperm(num_rows, generator=generator)
        for start in range(0, num_rows - config.minibatch_size + 1, config.minibatch_size):
            rows = order[start: start + config.minibatch_size]
            steps = stochastic
            if config.timestep_fraction < 1.0:
                keep = max(1, round(config.timestep_fraction * len(stochastic)))
                steps = [
                    stochastic[i] for i in sorted(torch.randperm(len(stochastic), generator=generator)[:keep].tolist())
                ]
            optimizer.zero_grad(set_to_none=True)
            cond = {key: value[rows.to(value.device)]
                    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == num_rows else value
                    for key, value in batch.cond.items()}
            with lora.active_adapter(model, config.adapter_name):
                for k in steps:
                    t = batch.timesteps[k]
                    x_t, x_next, std = batch.latents[k, rows], batch.latents[k + 1, rows], batch.stds[k]
                    out = forward(model, scheduler.scale_model_input(x_t, t), t, **cond)
                    mean, _ = model_transition(scheduler, out, t, x_t, eta)
                    log_prob = gaussian_log_prob(x_next, mean, std)
                    ratio = torch.exp(log_prob - batch.log_probs[k, rows])
                    advantage = advantages[k, rows]
                    clipped = ratio.clamp(1 - config.clip_range, 1 + config.clip_range)
                    policy_loss = -torch.minimum(ratio * advantage, clipped * advantage).mean()
                    kl_loss = step_kl(mean, batch.means_base[k, rows], std).mean()
                    # scale by K / |steps| so a timestep subset is an unbiased estimate of the sum over steps
                    loss = (policy_loss + config.alpha * kl_loss) * (len(stochastic) / len(steps))
                    scaler.scale(loss).backward()
            _optimizer_step(parameters, optimizer, scaler, accelerator, config.max_grad_norm)


def pathwise_gradient(
    target: FinetuneTarget,
    config: DPOKConfig,
    pair: PairFn,
    generator: torch.Generator,
    *,
    device: torch.device | str = "cpu",
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate the reparameterised gradient of ``-J`` into the LoRA ``.grad`` (module docstring, "Pathwise").

    ``batch_size`` trajectories in chunks of ``minibatch_size`` rows (one backward per chunk; every row has its
    own generator, so the gradient does not depend on the chunking). With ``gradient_checkpointing`` each
    sampler step (policy + base + CFG forward, transition, KL) is one checkpointed function of its input state
    and noise: only the states are kept, so memory does not grow with the number of steps; the backward
    recomputes one step at a time (about one extra forward per step). ``backprop_steps = K``: the first
    ``steps - K`` steps run without gradient (DRaFT-K; a different, biased objective: see
    :class:`~diffusion_blend.training.config.DPOKConfig`). Returns the detached weighted reward, path KL and
    basis rewards of the trajectories.
    """
    scheduler, names = target.scheduler, list(config.reward_weights)
    weighted, kls, basis = [], [], {name: [] for name in names}
    scheduler.set_timesteps(config.num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    first_with_grad = 0 if config.backprop_steps is None else max(0, len(timesteps) - config.backprop_steps)
    prompts = target.draw_prompts(config.batch_size, generator)
    generators = row_generators(generator, config.batch_size)
    for rows in _chunks(config.batch_size, config.minibatch_size):
        chunk_prompts = None if prompts is None else prompts[rows]
        cond = target.encode(chunk_prompts)

        def step(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            policy_out, base_out = pair(scheduler.scale_model_input(x, t), t, **cond)  # noqa: B023 - this chunk's
            mean, std = model_transition(scheduler, policy_out, t, x, config.eta)
            if float(std) == 0.0:
                raise DiffusionBlendError(
                    f"sampler step t={int(t)} is deterministic (sigma = 0): the path KL would not bound the KL of "
                    "the samples and the pathwise gradient would change that step at no cost; use a scheduler "
                    "whose every step is stochastic (DDIM with steps_offset=1 and set_alpha_to_one=False, as "
                    "Stable Diffusion's; DDPM's last step is deterministic too) or estimator='score'")
            mean_base, _ = model_transition(scheduler, base_out, t, x, config.eta)
            return mean + std * noise, step_kl(mean, mean_base, std)

        x = initial_latents(scheduler, generators[rows], (rows.stop - rows.start, *target.sample_shape),
                            device=device)
        path_kl = torch.zeros(x.shape[0], device=x.device)
        for k, t in enumerate(timesteps):
            noise = randn_tensor(x.shape, generator=generators[rows], device=x.device, dtype=x.dtype)
            if k < first_with_grad:
                with torch.no_grad():
                    x, kl = step(x, noise, t)
            elif config.gradient_checkpointing:
                x, kl = torch.utils.checkpoint.checkpoint(step, x, noise, t, use_reentrant=False)
            else:
                x, kl = step(x, noise, t)
            path_kl = path_kl + kl
        rewards = score_rewards(target, names, x, chunk_prompts, keep_grad=True)
        reward = sum(config.reward_weights[name] * rewards[name] for name in names)
        loss = -(reward - config.alpha * path_kl).sum() / config.batch_size
        (scaler.scale(loss) if scaler is not None else loss).backward()
        weighted.append(reward.detach())
        kls.append(path_kl.detach())
        for name in names:
            basis[name].append(rewards[name].detach())
    return torch.cat(weighted), torch.cat(kls), {name: torch.cat(v) for name, v in basis.items()}


def _pathwise_update(
    target: FinetuneTarget,
    config: DPOKConfig,
    pair: PairFn,
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step on the reparameterised gradient of ``J`` (:func:`pathwise_gradient`)."""
    optimizer.zero_grad(set_to_none=True)
    stats = pathwise_gradient(target, config, pair, generator, device=accelerator.device, scaler=scaler)
    _optimizer_step(parameters, optimizer, scaler, accelerator, config.max_grad_norm)
    return stats


def _check_differentiable(target: FinetuneTarget, names: Sequence[str]) -> None:
    """The pathwise estimator needs rewards with gradients: refuse those that declare they have none."""
    flat = [name for name in names if getattr(target.rewards.get(name), "differentiable", True) is False]
    if flat:
        raise DiffusionBlendError(f"reward {', '.join(map(repr, flat))} is not differentiable; the pathwise "
                                  "estimator needs reward gradients (use estimator='score')")


def precision_forward(forward: lora.Forward, dtype: torch.dtype) -> lora.Forward:
    """``forward`` on a network whose frozen weights are ``dtype``: floating inputs are cast to ``dtype``, the
    output back to float32 (transition means, log-probabilities and the KL are always float32)."""
    if dtype == torch.float32:
        return forward

    def cast(model: torch.nn.Module, x_t: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        cond = {key: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                for key, value in cond.items()}
        return forward(model, x_t.to(dtype), t, **cond).float()

    cast.stacked_copies = lora.stacked_copies(forward)  # type: ignore[attr-defined]
    return cast


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating non-LoRA parameter and buffer of ``module`` to ``dtype`` in place; LoRA parameters
    are (re)set to float32 (they train, with float32 Adam state)."""
    for name, param in module.named_parameters():
        wanted = torch.float32 if "lora_" in name else dtype
        if param.is_floating_point() and param.dtype != wanted:
            param.data = param.data.to(wanted)
    for submodule in module.modules():
        for key, buffer in submodule._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                submodule._buffers[key] = buffer.to(dtype)


def _prepare_frozen_modules(target: FinetuneTarget, config: DPOKConfig, device: torch.device) -> None:
    """Move the target's frozen modules to ``device`` in ``config.dtype`` (``force_upcast`` modules stay float32
    under float16, as diffusers' pipelines keep SDXL's VAE), and checkpoint their blocks if asked."""
    for module in target.frozen_modules:
        dtype = config.torch_dtype
        if dtype == torch.float16 and getattr(getattr(module, "config", None), "force_upcast", False):
            dtype = torch.float32
        module.to(device)
        cast_frozen(module, dtype)  # parameter-wise: diffusers' .to(dtype) warns on every cast
        if (
            config.gradient_checkpointing
            and config.estimator == "pathwise"
            and hasattr(module, "enable_gradient_checkpointing")
        ):
            module.enable_gradient_checkpointing()  # the VAE decode back-propagates into the reward


def _attach_policy(target: FinetuneTarget, config: DPOKConfig, accelerator: Accelerator) -> nn.Module:
    """The target's model on the accelerator with the policy's LoRA (the same init on every process), frozen weights
    in ``config.dtype`` and the LoRA in float32, and the memory controls of ``config`` (module docstring)."""
    model = target.model.to(accelerator.device)
    model.eval()  # no dropout: the log-probs of the recorded trajectories must be reproducible
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # identical LoRA init on every process
        lora.add_lora(model, config.adapter_name, rank=config.lora_rank, alpha=config.lora_alpha,
                      target_modules=target.target_modules)
    model.to(accelerator.device)
    cast_frozen(model, config.torch_dtype)  # frozen weights in config.dtype, LoRA float32
    _prepare_frozen_modules(target, config, accelerator.device)
    block_checkpointing = config.gradient_checkpointing and config.estimator == "score"
    if block_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
        # block-level checkpointing for the policy update only: the pathwise chain checkpoints whole sampler
        # steps instead (a block recomputed after its mixed-adapter batch has exited would lose its routing)
        model.enable_gradient_checkpointing()
    return model


def _resume(checkpoint: Path, model: nn.Module, config: DPOKConfig, optimizer: torch.optim.Optimizer,
            generator: torch.Generator, scaler: Any, accelerator: Accelerator,
            recipe: Mapping[str, Any]) -> tuple[int, list[dict[str, float]]]:
    """Continue from ``checkpoint``: the LoRA and Adam state, every process's generator and the curves so far; a
    checkpoint of another recipe (target, base weights), config or process count is refused in one line."""
    state = load_checkpoint(checkpoint, model, config.adapter_name, optimizer, recipe=recipe)
    ours = json.loads(json.dumps(config.to_dict(), default=str))
    if state.config != ours:
        fields = sorted(key for key in {*state.config, *ours} if state.config.get(key) != ours.get(key))
        raise DiffusionBlendError(f"checkpoint {checkpoint} belongs to a run with another config (it differs in "
                                  f"{', '.join(fields)}); use a fresh output folder or the same config")
    if state.generator_states.shape[0] != accelerator.num_processes:
        raise DiffusionBlendError(f"checkpoint {checkpoint} was written by {state.generator_states.shape[0]} "
                                  f"process(es); resume with the same number ({accelerator.num_processes} now)")
    generator.set_state(state.generator_states[accelerator.process_index].clone())
    if state.extra.get("grad_scaler"):
        scaler.load_state_dict(state.extra["grad_scaler"])
    return state.iteration, state.curves


def _fingerprint_if_needed(target: FinetuneTarget, out: Path | None, accelerator: Accelerator) -> str | None:
    """The base's :func:`~diffusion_blend.adapters.base_fingerprint` where it is needed: on the process that writes
    the adapter, and on every process when a checkpoint is to be resumed (its recipe is checked everywhere)."""
    if out is None or not (accelerator.is_main_process or (out / CHECKPOINT_NAME).exists()):
        return None
    return target.base_fingerprint or base_fingerprint(target.model, target.architecture)


def _curve_row(iteration: int, config: DPOKConfig, reward: torch.Tensor, path_kl: torch.Tensor,
               rewards: Mapping[str, torch.Tensor], accelerator: Accelerator) -> dict[str, float]:
    """One row of the curves: reward, path KL and objective ``E[r] - alpha KL`` averaged over every process."""
    names = list(config.reward_weights)
    stats = torch.stack([reward.mean(), path_kl.mean(), *[rewards[n].mean() for n in names]])
    stats = accelerator.reduce(stats.to(accelerator.device), reduction="mean").cpu()
    row = {"iteration": iteration + 1, "reward": float(stats[0]), "kl": float(stats[1]),
           "objective": float(stats[0] - config.alpha * stats[1])}
    row.update({f"reward/{n}": float(v) for n, v in zip(names, stats[2:])})
    return row


def finetune(
    target: FinetuneTarget,
    config: DPOKConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    accelerator: Accelerator | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    routing: str = "auto",
    log_extra: Mapping[str, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune a LoRA adapter on ``target.model`` for ``r_w = sum_i w_i r_i`` at KL weight ``alpha``.

    Paper section 4 (DPOK) with the exact per-step KL (module docstring). With ``out_dir`` the run writes
    ``checkpoint.safetensors`` every ``config.checkpoint_every`` iterations, and at the end
    ``adapter.safetensors`` (see :mod:`diffusion_blend.adapters`) and ``log.json`` (the curves); with
    ``resume`` an existing checkpoint there is continued. ``stop_after=k`` raises :class:`TrainingInterrupted`
    after iteration ``k`` (a test hook simulating a killed run). ``routing`` (:func:`adapter_pair`): how the
    policy and the base are evaluated, one batched forward (``"batched"``; with a CFG target the policy, the base
    and both branches are then ONE network call) or one forward each (``"sequential"``); ``"auto"`` is sequential
    on CPU and batched on CUDA when it fits. It changes no result beyond float rounding, so it is not part of the
    config a resumed run must match. ``log.json`` also records the wall seconds of each iteration run by this call,
    the peak CUDA memory on a GPU, and ``log_extra`` (the command's process settings); none of it is in the curves.
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial_files(out, recursive=False)  # what a killed run was writing (files.atomic_path)
    if config.estimator == "pathwise":
        _check_differentiable(target, list(config.reward_weights))
    if config.adapter_name in lora.adapter_names(target.model):
        raise DiffusionBlendError(f"the model already carries an adapter named {config.adapter_name!r}")
    # the base's identity as given (before any cast to config.dtype): the adapter is bound to these weights
    fingerprint = _fingerprint_if_needed(target, out, accelerator)
    model = _attach_policy(target, config, accelerator)
    target = dataclasses.replace(target, forward=precision_forward(target.forward, config.torch_dtype))
    parameters = [p for n, p in model.named_parameters() if p.requires_grad and f".{config.adapter_name}." in n]
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=config.torch_dtype == torch.float16)
    generator = torch.Generator().manual_seed(process_seed(config.seed, accelerator.process_index))
    pair = adapter_pair(model, target.forward, config.adapter_name, routing=routing)
    update = _pathwise_update if config.estimator == "pathwise" else _score_function_update
    checkpoint = out / CHECKPOINT_NAME if out is not None else None
    recipe = {"target": target.name, "base_fingerprint": fingerprint}
    start, curves = 0, []
    if resume and checkpoint is not None and checkpoint.exists():
        start, curves = _resume(checkpoint, model, config, optimizer, generator, scaler, accelerator, recipe)
    bar = tqdm(range(start, config.iterations), desc=f"finetune {target.name}", initial=start,
               total=config.iterations, disable=not (progress and accelerator.is_main_process))
    result = FinetuneResult(model=model, adapter_name=config.adapter_name, adapter_path=None, curves=curves)
    for iteration in bar:
        started = _synchronized_clock(accelerator.device)
        reward, path_kl, rewards = update(target, config, pair, parameters, optimizer, accelerator, generator, scaler)
        result.seconds_per_iteration.append(_synchronized_clock(accelerator.device) - started)
        row = _curve_row(iteration, config, reward, path_kl, rewards, accelerator)
        curves.append(row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl']:.3f}", objective=f"{row['objective']:.3f}")
        done = iteration + 1
        if checkpoint is not None and (done % config.checkpoint_every == 0 or done == config.iterations):
            generator_states = accelerator.gather(generator.get_state()[None].to(accelerator.device)).cpu()
            if accelerator.is_main_process:
                save_checkpoint(checkpoint, model, config.adapter_name, optimizer,
                                CheckpointState(done, generator_states, curves, config.to_dict(),
                                                {"grad_scaler": scaler.state_dict()}, recipe))
            accelerator.wait_for_everyone()
        if stop_after is not None and done >= stop_after and done < config.iterations:
            raise TrainingInterrupted(f"stopped after iteration {done} (test hook)")
    if accelerator.device.type == "cuda":
        result.cuda_max_memory_allocated = torch.cuda.max_memory_allocated(accelerator.device)
    if out is not None:
        _write_outputs(out, result, target, config, fingerprint, accelerator, log_extra)
    return result


def _synchronized_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _write_outputs(out: Path, result: FinetuneResult, target: FinetuneTarget, config: DPOKConfig,
                   fingerprint: str | None, accelerator: Accelerator, log_extra: Mapping[str, Any] | None) -> None:
    """``adapter.safetensors`` (bound to the base's ``fingerprint``) and ``log.json`` (curves, then what this call's
    iterations cost and ``log_extra``), by the main process."""
    result.adapter_path = out / ADAPTER_NAME
    if accelerator.is_main_process:
        save_adapter(result.model, config.adapter_name, result.adapter_path, rewards=config.reward_weights,
                     alpha=config.alpha, steps=config.iterations, training_config=config.to_dict(),
                     architecture=target.architecture, fingerprint=fingerprint)
        process = {"device": str(accelerator.device), "seconds_per_iteration": result.seconds_per_iteration,
                   "cuda_max_memory_allocated": result.cuda_max_memory_allocated, **dict(log_extra or {})}
        write_json_atomic(out / LOG_NAME, {"target": target.name, "config": config.to_dict(), "curves": result.curves,
                                           "process": process}, indent=2)
    accelerator.wait_for_everyone()
