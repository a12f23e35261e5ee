"""``dblend ui``: the browser app (Gradio) for choosing a preference at inference time."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .sample import parse_pairs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ui",
        help="start the browser UI (default: the embedded digits model with the demo's adapters)",
        description="Serves on 127.0.0.1 unless --host is given; never creates a share link; analytics off.",
    )
    parser.add_argument("--demo-dir", default="runs/demo", help="demo output folder (adapters/ and report/)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="an adapter to blend (repeatable); default: every adapter in DEMO_DIR/adapters")
    parser.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                        help="folders adapters may be read from (repeatable; default: DEMO_DIR/adapters)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the demo's sampler for digits, so results sit on its Pareto "
                        "plot; 50 for Stable Diffusion)")
    parser.add_argument("--sd-base", metavar="PATH_OR_ID",
                        help="blend a Stable Diffusion (1.x/2.x, 3/3.5) or FLUX base's LoRA experts (--adapter NAME=PATH "
                        "each) with a prompt box; the pipeline class comes from the folder's model_index.json")
    parser.add_argument("--reward", action="append", default=[], metavar="NAME=REWARD",
                        help="sd: the registry reward that scores adapter NAME (default: from the adapter's metadata)")
    parser.add_argument("--reward-options", help='sd: JSON per-reward factory options, e.g. {"aesthetic": {...}}')
    parser.add_argument("--alpha", type=float, default=None,
                        help="sd: the KL weight the experts were fine-tuned with, for files without our metadata "
                        "(foreign LoRAs); SMC particles need it")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="sd: classifier-free guidance scale")
    parser.add_argument("--resolution", type=int, help="sd: image size in pixels (default: the base's)")
    parser.add_argument("--device", default="auto", help="sd: torch device: auto (cuda if available, else cpu), cpu, cuda")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="sd: weights dtype; auto: float16 on cuda, float32 on cpu")
    parser.set_defaults(func=run)


def sd_studio(args: argparse.Namespace):
    """``--sd-base``: the Stable Diffusion studio over the --adapter files (read only from --adapter-dir if given)."""
    import json

    import torch

    from ..devices import resolve_device
    from ..errors import DiffusionBlendError
    from ..ui.paths import resolve_within
    from ..ui.stable_diffusion import stable_diffusion_studio

    device, dtype = resolve_device(args.device, args.dtype)
    adapters = parse_pairs(args.adapter)
    if not adapters:
        raise DiffusionBlendError("--sd-base needs the experts to blend: --adapter NAME=PATH (one per basis reward)")
    print(f"device: {device}, {dtype}" + (" (auto)" if "auto" in (args.device, args.dtype) else ""))
    if args.adapter_dir:
        adapters = {name: resolve_within(path, args.adapter_dir) for name, path in adapters.items()}
    try:
        options = json.loads(args.reward_options) if args.reward_options else {}
    except json.JSONDecodeError as err:
        raise DiffusionBlendError(f"--reward-options is not valid JSON ({err})") from None
    return stable_diffusion_studio(
        args.sd_base, adapters, reward_names=parse_pairs(args.reward, "--reward", "REWARD"),
        reward_options=options, num_images=args.num_images, num_inference_steps=args.steps or 50,
        guidance_scale=args.guidance_scale, resolution=args.resolution, device=device, dtype=getattr(torch, dtype),
        alpha=args.alpha,
    )


def run(args: argparse.Namespace) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from ..errors import DiffusionBlendError

    if not 1 <= args.port <= 65535:
        raise DiffusionBlendError(f"--port must be in 1..65535, got {args.port}")
    if args.alpha is not None and args.sd_base is None:
        raise DiffusionBlendError("--alpha is for --sd-base (the digits experts carry their alpha)")
    if args.sd_base is not None:  # the device is checked before gradio and the model load
        from ..devices import resolve_device

        resolve_device(args.device, args.dtype)
    from ..ui.app import build_app, launch, load_pareto_reference
    from ..ui.digits import adapters_in, digits_studio
    from ..ui.paths import resolve_within
    if args.sd_base is not None:
        app = build_app(sd_studio(args))
        print(f"Diffusion Blend UI on http://{args.host}:{args.port} (Ctrl+C to stop)")
        launch(app, host=args.host, port=args.port)
        return 0
    demo_dir = Path(args.demo_dir)
    roots = args.adapter_dir or [demo_dir / "adapters"]
    adapters = parse_pairs(args.adapter)
    if not adapters:
        adapters = adapters_in(demo_dir / "adapters")
        if not adapters:
            from ..demo import ensure_demo_adapters  # trains the demo's experts once (minutes), then cached

            adapters = ensure_demo_adapters(demo_dir)
    adapters = {name: resolve_within(path, roots) for name, path in adapters.items()}
    from ..demo import DemoConfig

    steps = args.steps or DemoConfig().num_inference_steps
    studio = digits_studio(adapters, num_images=args.num_images, num_inference_steps=steps)
    app = build_app(studio, load_pareto_reference(demo_dir / "report" / "pareto.json"))
    print(f"Diffusion Blend UI on http://{args.host}:{args.port} (Ctrl+C to stop)")
    launch(app, host=args.host, port=args.port)
    return 0
