"""``dblend tiny-base``: write a tiny offline base of any kind and two example experts (for trials, no download)."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusion_blend.commands.options import BASE_KINDS

EPILOG = """Then, as docs/try-offline.md walks through (KIND = sd, sdxl, sd3 or flux):
  dblend tiny-base --kind KIND --out tiny
  dblend sample --base tiny/base --adapter brightness=tiny/brightness.safetensors \\
      --adapter saturation=tiny/saturation.safetensors --weights brightness=0.3,saturation=0.7 \\
      --prompt "a red car" --out blend"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tiny-base",
        help="write a tiny random base (sd, sdxl, sd3 or flux) and two example experts (offline trials, no download)",
        description="Writes OUT/base (a stock diffusers pipeline folder of the kind, random weights, tiny images) and "
        "OUT/brightness.safetensors, OUT/saturation.safetensors: random LoRA experts in diffusers' format whose "
        "metadata names their reward (the weight-free brightness and saturation rewards), a KL weight alpha and the "
        "base's fingerprint, as dblend finetune writes them. Use them wherever a hub id and fine-tuned experts would "
        "go; the images are noise.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kind", choices=BASE_KINDS, default="sd", help="the base's kind (default sd)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--alpha", type=float, default=0.1,
                        help="the KL weight the experts' metadata states (default 0.1)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in OUT")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusion_blend.errors import DiffusionBlendError, positive_number

    if args.seed < 0:
        raise DiffusionBlendError(f"--seed must be >= 0, got {args.seed}")
    positive_number(args.alpha, "--alpha")
    refuse_existing_results_of_tiny_base(args.out, args.overwrite)
    from diffusion_blend.pipelines.tiny import write_tiny_base
    from diffusion_blend.quiet import no_loading_bars, quiet_third_party

    with no_loading_bars(), quiet_third_party():
        files = write_tiny_base(args.out, kind=args.kind, seed=args.seed, alpha=args.alpha)
    for name, path in files.items():
        print(f"{name:>10s}: {path}")
    return 0


def refuse_existing_results_of_tiny_base(out: Path, overwrite: bool) -> None:
    from diffusion_blend.files import refuse_existing_results
    from diffusion_blend.pipelines.tiny import EXAMPLE_EXPERTS

    refuse_existing_results(out, ["base", *(f"{name}.safetensors" for name in EXAMPLE_EXPERTS)], overwrite)
