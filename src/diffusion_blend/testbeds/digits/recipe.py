"""The committed digits base model's training recipe (light: read by ``dblend pretrain --help`` without torch)."""

from typing import Any

DEFAULT_RECIPE: dict[str, Any] = {"steps": 6000, "seed": 0, "batch_size": 256, "lr": 1e-3, "ema_decay": 0.999}
