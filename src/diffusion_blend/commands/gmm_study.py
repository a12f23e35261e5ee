"""``dblend gmm-study``: measure the blend's gap to the exact target on a 2-D Gaussian mixture."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from diffusion_blend.errors import DiffusionBlendError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gmm-study",
        help="how far DB-MPA/DB-KLA with ideal experts are from the exact target (2-D Gaussian mixture)",
        description="Path KL and sampled reward errors of the blend vs the exact tilted target, over alpha, w "
        "and lambda. Writes gmm_study.csv, gmm_study.png and gmm_study.md into --out.",
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--quick", action="store_true", help="small grid and sample sizes (~15 s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (non-negative integer, default 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusion_blend.testbeds.gmm.study import (
        StudySettings,
        run_study,
        write_outputs,
    )

    if args.seed < 0:
        raise DiffusionBlendError(f"--seed must be a non-negative integer, got {args.seed}")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DiffusionBlendError(f"--out {str(out_dir)!r} exists and is not a folder")
    settings = StudySettings.quick(args.seed) if args.quick else StudySettings.default(args.seed)
    command = "dblend gmm-study " + " ".join(
        shlex.quote(part)
        for part in ["--out", str(out_dir), *(["--quick"] if args.quick else []), "--seed", str(args.seed)]
    )
    rows = run_study(settings, progress=not args.no_progress)
    report = write_outputs(rows, settings, out_dir, command)
    print(report)
    print(f"wrote {out_dir / 'gmm_study.csv'}, {out_dir / 'gmm_study.png'}, {out_dir / 'gmm_study.md'}")
    return 0
