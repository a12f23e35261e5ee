"""``dblend inspect``: what a LoRA file or folder is before it is loaded into a large pipeline."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="describe LoRA files or folders: format, the denoiser they fit, rank, alpha, size, our metadata",
        description="Reads headers and key names only (no model loads unless --base is given). For each adapter: "
                    "diffusers / peft / kohya format, which denoiser it fits (SD 1.x/2.x or SDXL UNet, SD3 or FLUX "
                    "transformer), whether it adapts a text encoder, ranks, LoRA alpha, target modules, parameters "
                    "and size, and the rewards, KL weight and base fingerprint a diffusion-blend expert carries.",
    )
    parser.add_argument("adapters", nargs="+", metavar="PATH_OR_ID", help="LoRA files or folders (or hub ids)")
    parser.add_argument("--base", metavar="PATH_OR_ID",
                        help="also check whether each adapter loads into this base (the loader's own check)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per adapter")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from diffusion_blend.pipelines.inspection import check_loads, inspect_adapter
    from diffusion_blend.pipelines.loading import resolve_adapter_source

    reports = [inspect_adapter(resolve_adapter_source(source)) for source in args.adapters]
    if args.base is not None:
        from diffusion_blend.pipelines.classes import load_blend_pipeline
        from diffusion_blend.pipelines.kinds import pipeline_kind

        pipe = load_blend_pipeline(args.base, pipeline_kind(args.base))
        for report in reports:
            report.loads = check_loads(pipe, report.source)
    for report in reports:
        print(json.dumps(report.to_json()) if args.json else "\n".join(report.lines()))
    return 0
