"""``dblend digits-table``: the paper's comparison table (Table 1) and the KL-scale comparison on digits.

See :mod:`diffusion_blend.studies.digits_table` and docs/evaluation.md ("The comparison table on digits").
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "digits-table",
        help="Table 1 on digits: base, Rewarded Soup, CoDe, RGG, DB-MPA(-LS), MORL and IS oracles at w = 0.2/0.5/0.8",
        description="Evaluates every method of the paper's comparison table on the demo's digits experts (trained "
                    "or reused from --demo-dir), fine-tunes the MORL oracles (cached in OUT/morl), and writes "
                    "OUT/table.{csv,json,md}, OUT/kl_scales.csv and OUT/table.png.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--demo-dir", type=Path, default=None,
                        help="folder with the demo's experts (default runs/demo; with --quick OUT/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (tests, smoke runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..studies.digits_table import DigitsTableConfig, run_digits_table

    config = DigitsTableConfig.quick() if args.quick else DigitsTableConfig()
    demo_dir = args.demo_dir or (args.out / "demo" if args.quick else Path("runs/demo"))
    summary = run_digits_table(args.out, config, demo_dir=demo_dir, progress=not args.quiet)
    print((args.out / "table.md").read_text())
    print(f"MORL adapters fine-tuned in this run: {summary['morl_trained']}; "
          f"total {summary['timings']['total_s']:.0f} s; outputs in {args.out}")
    return 0
