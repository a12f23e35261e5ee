"""``dblend finetune-verify``: the fine-tuning acceptance check on the 2-D Gaussian mixture (docs/finetuning.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune-verify",
        help="fine-tune adapters on the 2-D mixture and compare with the exact KL-regularized optimum",
        description="Linear and quadratic rewards at two alphas: achieved fraction of the best objective, "
        "E_ft[r] vs the importance-weighted target, then a DB-MPA blend of two adapters vs the exact target.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (adapters, report.json, report.md)")
    parser.add_argument("--quick", action="store_true", help="tiny settings (a smoke run, not the acceptance bar)")
    parser.add_argument("--iterations", type=int, help="RL iterations per adapter (default 120)")
    parser.add_argument("--cache-dir", type=Path, help="where the base model is cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusion_blend.errors import positive_int
    from diffusion_blend.testbeds.gmm.verification import (
        VerifySettings,
        run_verification,
    )

    if args.iterations is not None:  # before the base model is trained (minutes on a first run)
        positive_int(args.iterations, "--iterations")
    settings = VerifySettings.quick() if args.quick else VerifySettings()
    if args.iterations is not None:
        settings.iterations = args.iterations
    run_verification(args.out, settings, cache_dir=args.cache_dir, progress=not args.quiet)
    print((args.out / "report.md").read_text())
    return 0
