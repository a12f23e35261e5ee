"""A small time-conditioned MLP noise-prediction network for low-dimensional data (the 2-D testbed).

``eps_theta(x_t, t)``: the input point concatenated with a sinusoidal embedding of the timestep (Vaswani et
al. 2017, as in DDPM's U-Net), then ``depth`` SiLU layers. The paper's base model ``p_pre`` (section 1) is any
epsilon-parameterised diffusion model; this one is the 2-D stand-in that LoRA adapters are trained on
(paper section 4) and blended (section 2.8). Its ``config`` dict is the architecture part of the base-model
fingerprint stored with adapters.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from diffusion_blend.errors import DiffusionBlendError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t`` (shape ``(B,)``) into ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimeMLP(nn.Module):
    """``(x_t, t) -> eps`` for points in ``R^dim``; ``t`` is one timestep for the batch or one per row.

    LoRA targets: the hidden layers are named ``layers.{i}`` and the output ``out`` (see :data:`LORA_TARGETS`).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_embed_dim: int = 32):
        super().__init__()
        for value, what in ((dim, "dim"), (hidden, "hidden"), (depth, "depth"), (time_embed_dim, "time_embed_dim")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffusionBlendError(f"{what} must be a positive integer, got {value!r}")
        if time_embed_dim % 2:
            raise DiffusionBlendError(f"time_embed_dim must be even, got {time_embed_dim}")
        self.config: dict[str, Any] = {
            "class": "TimeMLP",
            "dim": dim,
            "hidden": hidden,
            "depth": depth,
            "time_embed_dim": time_embed_dim,
        }
        widths = [dim + time_embed_dim] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(hidden, dim)
        self.activation = nn.SiLU()

    def forward(self, x_t: torch.Tensor, t: Any) -> torch.Tensor:
        dim = self.config["dim"]
        if x_t.ndim != 2 or x_t.shape[1] != dim:
            raise DiffusionBlendError(f"TimeMLP expects inputs of shape (B, {dim}), got {tuple(x_t.shape)}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0 or t.numel() == 1:
            t = t.reshape(1).expand(x_t.shape[0])
        elif t.shape != (x_t.shape[0],):
            raise DiffusionBlendError(f"timesteps must be one value or one per row, got shape {tuple(t.shape)}")
        h = torch.cat([x_t, timestep_embedding(t, self.config["time_embed_dim"]).to(x_t.dtype)], dim=1)
        for layer in self.layers:
            h = self.activation(layer(h))
        return self.out(h)


LORA_TARGETS = r"(layers\.\d+|out)"
"""peft ``target_modules`` regex selecting every linear layer of :class:`TimeMLP`."""


def mlp_forward(model: nn.Module, x_t: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
    """The denoiser-contract adapter for :class:`TimeMLP` (``cond`` is unused: the model is unconditional)."""
    return model(x_t, t)
