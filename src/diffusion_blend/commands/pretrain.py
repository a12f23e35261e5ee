"""``dblend pretrain digits``: train the digits base model (DDPM epsilon loss) and save it (safetensors + JSON)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from diffusion_blend.errors import DiffusionBlendError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pretrain", help="pretrain a base diffusion model",
                                   description="Pretrain a base diffusion model with the DDPM epsilon loss.")
    models = parser.add_subparsers(dest="model", metavar="MODEL", required=True)
    from diffusion_blend.testbeds.digits.recipe import DEFAULT_RECIPE

    digits = models.add_parser(
        "digits", help="pixel-space model of sklearn's 8x8 digits",
        description="Train the time-conditioned MLP denoiser on all 1,797 sklearn digits scaled to [-1, 1]. "
        "The same --seed gives the same weights.",
    )
    digits.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    digits.add_argument("--steps", type=int, default=DEFAULT_RECIPE["steps"],
                        help=f"optimizer steps (default {DEFAULT_RECIPE['steps']})")
    digits.add_argument("--seed", type=int, default=DEFAULT_RECIPE["seed"], help="seed of init and all draws")
    digits.add_argument("--batch-size", type=int, default=DEFAULT_RECIPE["batch_size"])
    digits.add_argument("--lr", type=float, default=DEFAULT_RECIPE["lr"], help="AdamW peak learning rate")
    digits.add_argument("--ema", default=str(DEFAULT_RECIPE["ema_decay"]),
                        help="EMA decay in (0, 1), or 'none' (default %(default)s)")
    digits.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    digits.set_defaults(func=run_digits)


def _ema(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError as err:
        raise DiffusionBlendError(f"--ema must be a number in (0, 1) or 'none', got {text!r}") from err
    if not 0.0 < value < 1.0:
        raise DiffusionBlendError(f"--ema must be a number in (0, 1) or 'none', got {text!r}")
    return value


def run_digits(args: argparse.Namespace) -> int:
    from diffusion_blend.testbeds.digits.model import save_digits_model
    from diffusion_blend.testbeds.digits.train import train_digits_model

    if args.steps < 1:
        raise DiffusionBlendError(f"--steps must be >= 1, got {args.steps}")
    if args.seed < 0:
        raise DiffusionBlendError(f"--seed must be >= 0, got {args.seed}")
    if args.batch_size < 1:
        raise DiffusionBlendError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise DiffusionBlendError(f"--lr must be a positive number, got {args.lr}")
    ema_decay = _ema(args.ema)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DiffusionBlendError(f"--out {out} exists and is not a directory")
    model, result, record = train_digits_model(steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                                                lr=args.lr, ema_decay=ema_decay, progress=not args.no_progress)
    record["command"] = record["command"].replace("--out DIR", f"--out {out}")
    save_digits_model(model, out, record)
    print(f"trained {record['parameters']} parameters for {args.steps} steps in {record['train_seconds']} s; "
          f"final loss {result.smoothed_loss(min(500, args.steps)):.4f}; saved to {out}")
    return 0
