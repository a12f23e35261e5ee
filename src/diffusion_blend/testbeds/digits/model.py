"""The digits base model: a small time-conditioned residual MLP predicting the noise of 8x8 images.

Why an MLP and not a UNet: on these 2 CPU cores (reference/environment.md) a 651 k-parameter
``UNet2DModel`` takes 266 s for 2,000 training steps and 3.5 s for 256 samples x 50 DDIM steps; an MLP of
similar size takes ~20 s and 0.2 s. The demo samples 50-step DDIM trajectories and fine-tunes LoRA adapters
by RL on thousands of them, so the forward pass must be cheap; for 64-pixel images a residual MLP is enough
(docs/digits.md has the measured sample quality).

Architecture (``DigitsDenoiserConfig``): sinusoidal embedding of the integer timestep -> ``time_mlp``;
``input_proj`` (64 -> hidden); ``num_blocks`` pre-norm residual blocks
``h += fc2(SiLU(fc1(LayerNorm(h)) + time_proj(temb)))``; ``output_norm`` + ``output_proj`` (hidden -> 64).
The input is in model space ``[-1, 1]`` (digits/data.py), the output is epsilon.

Weights are saved ONLY as safetensors next to a ``config.json`` holding the architecture, the noise
schedule and the training record (command, seed, steps, data hash).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.files import atomic_path, write_text_atomic
from diffusion_blend.sampling import make_scheduler
from diffusion_blend.testbeds.digits.data import IMAGE_SHAPE

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
DDIM_SAMPLING_CONFIG = {"steps_offset": 1, "set_alpha_to_one": False}
"""Stable Diffusion's DDIM settings: the last step goes to ``t = 0`` instead of a noise-free ``alpha = 1``, so
with ``eta > 0`` every step is stochastic and a fine-tuned adapter's path KL bounds the KL of its samples
(docs/finetuning.md, "Deterministic steps")."""


@dataclass(frozen=True)
class DigitsDenoiserConfig:
    hidden: int = 256
    num_blocks: int = 3
    time_embed_dim: int = 128
    pixels: int = math.prod(IMAGE_SHAPE)

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffusionBlendError(f"model config {item.name} must be a positive integer, got {value!r}")
        if self.time_embed_dim % 2:
            raise DiffusionBlendError(f"time_embed_dim must be even, got {self.time_embed_dim}")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of (integer) timesteps, as in DDPM (Ho et al. 2020)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = timesteps.float()[:, None] * frequencies[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.time_proj = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h)) + self.time_proj(temb)))


class DigitsDenoiser(nn.Module):
    """``model(x_t, t) -> eps`` for ``x_t`` of shape ``(B, 1, 8, 8)``; ``t`` an int, 0-d or ``(B,)`` tensor."""

    def __init__(self, config: DigitsDenoiserConfig | None = None):
        super().__init__()
        self.config = config or DigitsDenoiserConfig()
        c = self.config
        self.time_mlp = nn.Sequential(nn.Linear(c.time_embed_dim, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden))
        self.input_proj = nn.Linear(c.pixels, c.hidden)
        self.blocks = nn.ModuleList(ResidualBlock(c.hidden) for _ in range(c.num_blocks))
        self.output_norm = nn.LayerNorm(c.hidden)
        self.output_proj = nn.Linear(c.hidden, c.pixels)

    def forward(self, x_t: torch.Tensor, t: Any) -> torch.Tensor:
        batch = x_t.shape[0]
        timesteps = torch.as_tensor(t, device=x_t.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(batch)
        elif timesteps.numel() != batch:
            raise ValueError(f"got {timesteps.numel()} timesteps for a batch of {batch}")
        temb = nn.functional.silu(self.time_mlp(timestep_embedding(timesteps, self.config.time_embed_dim)))
        h = self.input_proj(x_t.reshape(batch, -1))
        for block in self.blocks:
            h = block(h, temb)
        return self.output_proj(self.output_norm(h)).reshape(x_t.shape)


def digits_forward(model: nn.Module, x_t: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
    """The :data:`diffusion_blend.lora.Forward` of the digits model (unconditional: ``cond`` must be empty)."""
    if cond:
        raise ValueError(f"the digits model is unconditional; got conditioning {sorted(cond)}")
    return model(x_t, t)


def lora_target_modules() -> tuple[str, ...]:
    """Module names for :func:`diffusion_blend.lora.add_lora`: every block's ``fc1``/``time_proj``/``fc2`` and
    the input/output projections (``time_proj`` lets the adapter's change depend on the noise level; the shared
    ``time_mlp`` stays frozen)."""
    return ("input_proj", "fc1", "time_proj", "fc2", "output_proj")


def digits_scheduler(kind: str = "ddim"):
    """The noise schedule the digits model is trained with (linear betas, 1,000 steps, no clipping); DDIM
    samples with :data:`DDIM_SAMPLING_CONFIG`."""
    return make_scheduler(kind, **SCHEDULER_CONFIG, **(DDIM_SAMPLING_CONFIG if kind == "ddim" else {}))


def save_module(module: nn.Module, directory: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each atomically)."""
    directory = Path(directory)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in module.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME) as temporary:
        save_file(state, temporary)
    write_text_atomic(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file() or not (Path(directory) / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{directory} does not hold {WEIGHTS_NAME} and {CONFIG_NAME}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DiffusionBlendError(f"{path} is not valid JSON: {err}") from err


def load_state(module: nn.Module, directory: str | os.PathLike) -> nn.Module:
    path = Path(directory) / WEIGHTS_NAME
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:  # truncated, zero bytes, not safetensors
        raise DiffusionBlendError(f"{path} is corrupt or truncated ({_first_line(err)}); reinstall diffusion-blend, or "
                                  "rebuild it (docs/digits.md)") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DiffusionBlendError(f"weights in {directory} do not fit the architecture: {err}") from err
    return module.eval()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def save_digits_model(model: DigitsDenoiser, directory: str | os.PathLike, training: dict[str, Any]) -> Path:
    """Save weights + ``config.json`` (``architecture``, ``scheduler``, ``training`` record)."""
    config = {
        "kind": "digits_denoiser",
        "architecture": asdict(model.config),
        "scheduler": dict(SCHEDULER_CONFIG),
        "data_space": "[-1, 1] = 2 * (sklearn load_digits pixels / 16) - 1",
        "training": training,
    }
    return save_module(model, directory, config)


def load_digits_model(directory: str | os.PathLike) -> DigitsDenoiser:
    """Load a model saved by :func:`save_digits_model` (eval mode); its record is ``model.record``."""
    config = read_config(directory)
    if config.get("kind") != "digits_denoiser":
        raise DiffusionBlendError(f"{directory} does not hold a digits denoiser (kind={config.get('kind')!r})")
    if config.get("scheduler") != SCHEDULER_CONFIG:
        raise DiffusionBlendError(f"{directory} was trained with scheduler {config.get('scheduler')}, "
                                  f"this code uses {SCHEDULER_CONFIG}")
    try:
        architecture = DigitsDenoiserConfig(**config["architecture"])
    except (KeyError, TypeError) as err:
        raise DiffusionBlendError(f"bad architecture in {directory}/{CONFIG_NAME}: {err}") from err
    model = load_state(DigitsDenoiser(architecture), directory)
    model.record = config.get("training", {})
    return model
