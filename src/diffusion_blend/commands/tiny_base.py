"""``dblend tiny-base``: write a tiny offline Stable Diffusion base and two example LoRA experts (for trials)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tiny-base",
        help="write a tiny random SD pipeline and two example LoRA adapters (offline trials, no download)",
        description="Writes OUT/base (a stock StableDiffusionPipeline folder with random weights, 16x16 images) and "
        "OUT/aesthetic.safetensors, OUT/align.safetensors (random diffusers LoRA files). Use them wherever a hub id "
        "such as runwayml/stable-diffusion-v1-5 and trained experts would go; the images are noise.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in OUT")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusion_blend.errors import DiffusionBlendError
    from diffusion_blend.files import refuse_existing_results

    if args.seed < 0:
        raise DiffusionBlendError(f"--seed must be >= 0, got {args.seed}")
    refuse_existing_results(args.out, ["base", "aesthetic.safetensors", "align.safetensors"], args.overwrite)
    from diffusion_blend.pipelines.tiny import write_tiny_base
    from diffusion_blend.quiet import no_loading_bars

    with no_loading_bars():
        files = write_tiny_base(args.out, seed=args.seed)
    for name, path in files.items():
        print(f"{name:>10s}: {path}")
    return 0
