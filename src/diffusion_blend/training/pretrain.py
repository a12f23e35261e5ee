"""Generic denoising-score-matching pretraining of any noise-prediction network (DDPM, Ho et al. 2020).

The paper's base model ``p_pre`` (section 1) is an ordinary diffusion model trained with the simple
epsilon-prediction loss ``E_{x_0, t, eps} || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t) ||^2``
with ``t`` uniform over the scheduler's training timesteps (its noised marginals are exactly the ones the
paper's section 2.8 relates to scores: ``eps = -sqrt(1 - abar_t) * score``). This loop is model-agnostic:
``forward(model, x_t, t) -> eps`` is the same contract as :data:`diffusion_blend.lora.Forward`, with ``t``
a ``LongTensor`` of shape ``(B,)`` (one timestep per row) during training. Forward noising is the
scheduler's own ``add_noise``; AdamW with an optional cosine learning-rate decay (diffusers' schedule) and an
optional exponential moving average of the weights (diffusers' ``EMAModel``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.optimization import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
)
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from diffusion_blend.errors import DiffusionBlendError, positive_int, positive_number
from diffusion_blend.lora import Forward
from diffusion_blend.sampling import as_generator

Sampler = Callable[[int, torch.Generator], torch.Tensor]
"""``sampler(batch_size, generator) -> Tensor[batch_size, ...]``: draws training data on demand."""


@dataclass
class PretrainResult:
    """The trained ``model`` (EMA weights copied in when ``ema_decay`` was given) and one loss per step."""

    model: nn.Module
    losses: torch.Tensor

    def smoothed_loss(self, window: int = 100) -> float:
        """Mean loss over the last ``window`` steps."""
        return float(self.losses[-window:].mean())


def _data_sampler(data: torch.Tensor | Sampler) -> Sampler:
    if callable(data) and not torch.is_tensor(data):
        return data
    if not torch.is_tensor(data) or data.ndim < 2 or data.shape[0] == 0:
        shape = tuple(data.shape) if torch.is_tensor(data) else type(data).__name__
        raise DiffusionBlendError(f"training data must be a tensor (N, ...) with N >= 1 or a sampler, got {shape}")
    if not torch.isfinite(data).all():
        raise DiffusionBlendError("training data contain NaN or infinite values")
    data = data.float()

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
        return data[index]

    return draw



def denoising_loss(
    model: nn.Module,
    forward: Forward,
    x0: torch.Tensor,
    scheduler,
    generator: torch.Generator,
) -> torch.Tensor:
    """One Monte-Carlo estimate of the DDPM simple loss: uniform ``t``, ``x_t = add_noise(x0, eps, t)``, MSE."""
    num_timesteps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator).long()
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    prediction = forward(model, x_t, timesteps)
    if prediction.shape != noise.shape:
        raise DiffusionBlendError(f"forward returned shape {tuple(prediction.shape)}, expected {tuple(noise.shape)}")
    return torch.nn.functional.mse_loss(prediction, noise)


def pretrain_denoiser(
    model: nn.Module,
    forward: Forward,
    data: torch.Tensor | Sampler,
    scheduler,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    generator: torch.Generator | int = 0,
    ema_decay: float | None = None,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    cosine_decay: bool = True,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
) -> PretrainResult:
    """Train ``model`` (in place) to predict the noise added by ``scheduler`` to samples of ``data``.

    ``data`` is a tensor of training examples (rows drawn uniformly with replacement) or a :data:`Sampler`.
    Every random draw (rows, timesteps, noise) comes from ``generator``, so the same initial weights and seed
    give the same loss curve and weights. ``ema_decay`` (e.g. 0.999) keeps an EMA of the weights (with
    diffusers' warm-up ``min(decay, (1 + n) / (10 + n))``) and copies it into ``model`` at the end.
    Returns the model (in eval mode) and the per-step losses.
    """
    positive_int(steps, "steps")
    positive_int(batch_size, "batch_size")
    positive_number(lr, "lr")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        raise DiffusionBlendError(f"ema_decay must lie in (0, 1), got {ema_decay!r}")
    draw = _data_sampler(data)
    generator = as_generator(generator)
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise DiffusionBlendError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if cosine_decay:
        lr_schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    else:
        lr_schedule = get_constant_schedule_with_warmup(optimizer, warmup_steps)
    ema = EMAModel(parameters, decay=ema_decay) if ema_decay is not None else None
    losses = torch.empty(steps)
    model.train()
    bar = tqdm(range(steps), desc="pretraining", disable=not progress)
    for step in bar:
        x0 = draw(batch_size, generator)
        loss = denoising_loss(model, forward, x0, scheduler, generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        lr_schedule.step()
        if ema is not None:
            ema.step(parameters)
        losses[step] = loss.detach()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{losses[max(0, step - 49):step + 1].mean():.4f}")
    if ema is not None:
        ema.copy_to(parameters)
    model.eval()
    return PretrainResult(model=model, losses=losses)
