"""``dblend ui``: the browser app (Gradio) for choosing a preference at inference time."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from diffusion_blend.commands.sample import parse_alphas, parse_pairs


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
                        "plot; the base kind's for --sd-base)")
    parser.add_argument(
        "--sd-base",
        metavar="PATH_OR_ID",
        help="blend a Stable Diffusion (1.x/2.x, 3/3.5) or FLUX base's LoRA experts (--adapter NAME=PATH "
        "each) with a prompt box; the pipeline class comes from the folder's model_index.json",
    )
    parser.add_argument("--reward", action="append", default=[], metavar="NAME=REWARD",
                        help="sd: the registry reward that scores adapter NAME (default: from the adapter's metadata)")
    parser.add_argument("--reward-options", help='sd: JSON per-reward factory options, e.g. {"aesthetic": {...}}')
    parser.add_argument("--alpha", action="append", default=[], metavar="[NAME=]A",
                        help="sd: the KL weight of an expert without our metadata (NAME=A, repeat) or of every such "
                        "file (A); SMC's target and the stated target need each expert's")
    parser.add_argument("--target-alpha", type=float, default=None, metavar="A",
                        help="sd: blend toward p_pre exp(lambda r_w / A) (coefficients lambda w_i alpha_i / A)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="sd: guidance scale (default: the base kind's, dblend sample --help lists them)")
    parser.add_argument("--resolution", type=int, help="sd: image size in pixels (default: the base's)")
    parser.add_argument(
        "--device", default="auto", help="sd: torch device: auto (cuda if available, else cpu), cpu, cuda"
    )
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="sd: weights dtype; auto: float16 on cuda, float32 on cpu")
    parser.set_defaults(func=run)


def sd_studio(args: argparse.Namespace):
    """``--sd-base``: the pipeline studio over the --adapter files (read only from --adapter-dir if given)."""
    import json

    from diffusion_blend.devices import resolve_device
    from diffusion_blend.errors import DiffusionBlendError, positive_number
    from diffusion_blend.pipelines.session import BlendSession
    from diffusion_blend.ui.paths import resolve_within
    from diffusion_blend.ui.pipeline_studio import PipelineStudio

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
    default_alpha, alphas = parse_alphas(args.alpha)
    target_alpha = None if args.target_alpha is None else positive_number(args.target_alpha, "--target-alpha")
    session = BlendSession.open(args.sd_base, adapters, rewards=parse_pairs(args.reward, "--reward", "REWARD"),
                                alpha=default_alpha, alphas=alphas, device=device, dtype=dtype, reward_options=options)
    return PipelineStudio(session, num_images=args.num_images, steps=args.steps, guidance_scale=args.guidance_scale,
                          resolution=args.resolution, target_alpha=target_alpha)


def run(args: argparse.Namespace) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from diffusion_blend.errors import DiffusionBlendError

    if not 1 <= args.port <= 65535:
        raise DiffusionBlendError(f"--port must be in 1..65535, got {args.port}")
    if (args.alpha or args.target_alpha is not None) and args.sd_base is None:
        raise DiffusionBlendError("--alpha and --target-alpha are for --sd-base (the digits experts carry their alpha)")
    if args.sd_base is not None:  # the device is checked before gradio and the model load
        from diffusion_blend.devices import resolve_device

        resolve_device(args.device, args.dtype)
    from diffusion_blend.testbeds.digits.studio import adapters_in, digits_studio
    from diffusion_blend.ui.app import build_app, launch, load_pareto_reference
    from diffusion_blend.ui.paths import resolve_within
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
            # trains the demo's experts once (minutes), then cached
            from diffusion_blend.testbeds.digits.experts import ensure_demo_adapters

            adapters = ensure_demo_adapters(demo_dir)
    adapters = {name: resolve_within(path, roots) for name, path in adapters.items()}
    from diffusion_blend.testbeds.digits.config import DemoConfig

    steps = args.steps or DemoConfig().num_inference_steps
    studio = digits_studio(adapters, num_images=args.num_images, num_inference_steps=steps)
    app = build_app(studio, load_pareto_reference(demo_dir / "report" / "pareto.json"))
    print(f"Diffusion Blend UI on http://{args.host}:{args.port} (Ctrl+C to stop)")
    launch(app, host=args.host, port=args.port)
    return 0
