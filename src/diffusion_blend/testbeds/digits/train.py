"""Training recipe of the digits base model and the loader of the committed default weights.

``dblend pretrain digits`` and :func:`load_default_digits_model` both go through :func:`train_digits_model`,
which calls the generic :func:`diffusion_blend.training.pretrain.pretrain_denoiser` on all 1,797 real digits
in model space ``[-1, 1]``. The same seed gives the same weights (model init and every draw are seeded).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.testbeds.digits.data import data_hash, training_data
from diffusion_blend.testbeds.digits.model import (
    DigitsDenoiser,
    DigitsDenoiserConfig,
    digits_forward,
    digits_scheduler,
    load_digits_model,
    save_digits_model,
)
from diffusion_blend.testbeds.digits.recipe import DEFAULT_RECIPE
from diffusion_blend.training.pretrain import PretrainResult, pretrain_denoiser

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "denoiser"


def default_command(steps: int, seed: int, batch_size: int, lr: float, ema_decay: float | None) -> str:
    ema = "none" if ema_decay is None else f"{ema_decay:g}"
    return (f"dblend pretrain digits --out DIR --steps {steps} --seed {seed} --batch-size {batch_size} "
            f"--lr {lr:g} --ema {ema}")


def train_digits_model(
    *,
    steps: int = DEFAULT_RECIPE["steps"],
    seed: int = DEFAULT_RECIPE["seed"],
    batch_size: int = DEFAULT_RECIPE["batch_size"],
    lr: float = DEFAULT_RECIPE["lr"],
    ema_decay: float | None = DEFAULT_RECIPE["ema_decay"],
    config: DigitsDenoiserConfig | None = None,
    progress: bool = True,
) -> tuple[DigitsDenoiser, PretrainResult, dict[str, Any]]:
    """Initialise the model from ``seed`` and pretrain it; returns model, loss curve and training record."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DiffusionBlendError(f"seed must be a non-negative integer, got {seed!r}")
    torch.manual_seed(seed)
    model = DigitsDenoiser(config)
    data = training_data()
    started = time.perf_counter()
    result = pretrain_denoiser(
        model, digits_forward, data, digits_scheduler("ddpm"), steps=steps, batch_size=batch_size, lr=lr,
        generator=seed, ema_decay=ema_decay, progress=progress,
    )
    record = {
        "command": default_command(steps, seed, batch_size, lr, ema_decay),
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
        "optimizer": "AdamW, cosine decay, grad-norm clip 1.0", "loss": "epsilon MSE, uniform t",
        "data": "sklearn load_digits, all 1797 images", "data_hash": data_hash(data),
        "final_loss_mean_last_500": round(result.smoothed_loss(500), 5),
        "train_seconds": round(time.perf_counter() - started, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "architecture": asdict(model.config),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return model, result, record


def load_default_digits_model(directory: str | os.PathLike | None = None, *, progress: bool = True) -> DigitsDenoiser:
    """The committed base model (assets/digits/denoiser); if its files are absent, retrain it with
    :data:`DEFAULT_RECIPE` through :func:`train_digits_model` and try to save it there."""
    directory = ASSET_DIR if directory is None else Path(directory)
    try:
        return load_digits_model(directory)
    except FileNotFoundError:
        pass
    model, _, record = train_digits_model(**DEFAULT_RECIPE, progress=progress)
    try:
        save_digits_model(model, directory, record)
    except OSError:  # read-only install: keep the freshly trained model in memory
        pass
    model.record = record
    return model
