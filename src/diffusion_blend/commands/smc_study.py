"""``dblend smc-study``: SMC on the blend vs FK steering, as a fraction of the exact target's gain against network
evaluations (:mod:`diffusion_blend.evaluation.smc_study`; docs/evaluation.md, "SMC on the blend")."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusion_blend.commands.options import TILT_HELP, proposal_tilt
from diffusion_blend.errors import DiffusionBlendError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "smc-study",
        help="SMC on the blend vs FK steering: oracle fraction against network evaluations (digits or gmm)",
        description="For each weight w and particle count N: base, DB-MPA, DB-MPA-LS, SMC and FK steering (same N "
                    "and equal network evaluations), as resumable sweeps; writes smc_study.{csv,json,md} and "
                    "oracle_fraction.png under --out.",
    )
    parser.add_argument("--setting", choices=("digits", "gmm"), default="digits",
                        help="digits: the demo's experts (--demo-dir); gmm: the mixture's exact experts")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--demo-dir", default="runs/demo", help="digits: folder with the demo's experts")
    parser.add_argument("--particles", default="2,4,8,16", help="particle counts N, comma-separated")
    parser.add_argument("--weights", default=None, help="w values (default 0.2,0.5,0.8 digits; 0.25,0.5,0.75 gmm)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--samples-per-seed", type=int, default=256, help="samples per seed and point")
    parser.add_argument("--steps", type=int, default=20, help="gmm: sampler steps")
    parser.add_argument("--alpha", type=float, default=1.0, help="gmm: the experts' KL weight")
    parser.add_argument("--smc-potential", default="tweedie", choices=("tweedie", "none", "experts"),
                        help="SMC's potential")
    parser.add_argument("--smc-proposal-tilt", type=proposal_tilt, default="auto", help=TILT_HELP)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _numbers(text: str, kind: type, flag: str) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise DiffusionBlendError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    import time

    from diffusion_blend.evaluation.smc_study import SMCStudyConfig, run_smc_study

    default_weights = "0.2,0.5,0.8" if args.setting == "digits" else "0.25,0.5,0.75"
    config = SMCStudyConfig(
        weights=_numbers(args.weights or default_weights, float, "--weights"),
        particles=_numbers(args.particles, int, "--particles"), seeds=_numbers(args.seeds, int, "--seeds"),
        samples_per_seed=args.samples_per_seed, potential=args.smc_potential, proposal_tilt=args.smc_proposal_tilt)
    progress = not args.no_progress
    started = time.perf_counter()
    if args.setting == "digits":
        from diffusion_blend.testbeds.digits.setting import smc_study_inputs

        inputs = smc_study_inputs(args.demo_dir, config, progress)
    else:
        from diffusion_blend.testbeds.gmm.setting import smc_study_inputs

        inputs = smc_study_inputs(config, args.steps, args.alpha)
    run_smc_study(*inputs, args.out, config, progress=progress)
    print((Path(args.out) / "smc_study.md").read_text())
    print(f"{time.perf_counter() - started:.0f} s; outputs in {args.out}")
    return 0
