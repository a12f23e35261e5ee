"""``dblend demo``: the end-to-end Diffusion Blend demo on handwritten digits (docs/demo.md).

Fine-tunes (or reuses) one LoRA expert per basis reward, sweeps DB-MPA / DB-MPA-LS / DB-KLA / combined
preferences, compares them with the importance-weighted oracle of the exact target, and writes
``<out>/report/index.html`` with plots, image grids, CSV/JSON and PASS/FAIL quality checks.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end demo on digits: fine-tune experts (cached), blend over (w, lambda), HTML report",
        description="Fine-tunes one adapter per basis reward (cached in OUT/adapters), evaluates DB-MPA, DB-MPA-LS, "
                    "DB-KLA and combined blends against the importance-weighted oracle, writes OUT/report/index.html.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="miniature run (tiny training budget, few samples)")
    parser.add_argument("--seed", type=int, default=0, help="training and evaluation seed (default 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusion_blend.errors import DiffusionBlendError
    from diffusion_blend.testbeds.digits.config import DemoConfig
    from diffusion_blend.testbeds.digits.demo import run_demo

    if args.seed < 0:
        raise DiffusionBlendError(f"--seed must be >= 0, got {args.seed}")
    config = (DemoConfig.quick() if args.quick else DemoConfig()).with_seed(args.seed)
    from diffusion_blend.testbeds.digits.report import SMOKE_NOTE

    summary = run_demo(args.out, config, progress=not args.quiet)
    if config.smoke_run:
        print(SMOKE_NOTE)
    for check in summary["checks"]:
        status = "-" if config.smoke_run else check["status"]
        print(f"{status:>4s}  {check['name']}: {check['value']:.4g} ({'bar ' if config.smoke_run else ''}"
              f"{check['threshold']})")
    print(f"report: {args.out / 'report' / 'index.html'}  ({summary['timings']['total_s']:.0f} s)")
    return 0
