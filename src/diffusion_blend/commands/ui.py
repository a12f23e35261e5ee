"""``dblend ui``: the browser app (Gradio) for choosing a preference at inference time.

Without ``--base``: the embedded digits model with the demo's experts. With ``--base``: any kind ``dblend sample``
serves (SD, SDXL, SD3, FLUX) with its experts, through the same blend session and the same options and defaults
(:mod:`diffusion_blend.commands.options`), so the page and the command line give the same images.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from diffusion_blend.commands import options
from diffusion_blend.errors import DiffusionBlendError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ui",
        help="start the browser UI (a base with its experts, or the embedded digits model with the demo's)",
        description="Serves on 127.0.0.1 unless --host is given; never creates a share link; analytics off.",
    )
    options.add_base(parser, required=False, what="blend this base's experts (--adapter NAME=PATH each) with a "
                     "prompt box; without it, the embedded digits model")
    options.add_experts(parser, required=False)
    parser.add_argument("--demo-dir", default="runs/demo",
                        help="digits: the demo's output folder (adapters/ and report/)")
    parser.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                        help="folders adapters may be read from (repeat; default: any, or DEMO_DIR/adapters for "
                        "digits)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on, 1..65535")
    options.add_num_images(parser)
    options.add_sampling(parser, seed=False)
    options.add_smc(parser)
    options.add_device(parser)
    options.deprecated(parser, "--sd-base", "--base", "base")
    parser.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """The cheap checks, before gradio or a model loads."""
    if not 1 <= args.port <= 65535:
        raise DiffusionBlendError(f"--port must be in 1..65535, got {args.port}")
    options.check_positive(args, "steps", "num_images")
    options.check_eta(args.eta)
    options.parse_resolution(args.resolution)
    options.smc_options(args)  # SMC's flags are checked now; the page's sliders set particles and tilt
    if args.base is None:
        only_for_base = [flag for flag, given in (
            ("--alpha", args.alpha), ("--target-alpha", args.target_alpha is not None), ("--reward", args.reward),
            ("--reward-options", args.reward_options), ("--kind", args.kind != "auto"),
            ("--guidance-scale", args.guidance_scale is not None), ("--eta", args.eta is not None),
            ("--resolution", args.resolution is not None)) if given]
        if only_for_base:
            raise DiffusionBlendError(f"{', '.join(only_for_base)} {'is' if len(only_for_base) == 1 else 'are'} for "
                                      "--base (the digits model and its experts fix them)")


def pipeline_studio(args: argparse.Namespace):
    """``--base``: the pipeline studio over the --adapter files (read only from --adapter-dir if given)."""
    from diffusion_blend.devices import resolve_device
    from diffusion_blend.pipelines.kinds import pipeline_kind
    from diffusion_blend.pipelines.session import BlendSession
    from diffusion_blend.ui.paths import resolve_within
    from diffusion_blend.ui.pipeline_studio import PipelineStudio

    device, dtype = resolve_device(args.device, args.dtype)
    experts = options.expert_options(args)
    adapters = experts.adapters
    if not adapters:
        raise DiffusionBlendError("--base needs the experts to blend: --adapter NAME=PATH (one per basis reward)")
    if args.adapter_dir:
        adapters = {name: resolve_within(path, args.adapter_dir) for name, path in adapters.items()}
    kind = pipeline_kind(args.base, args.kind)
    print(f"device: {device}, {dtype}" + (" (auto)" if "auto" in (args.device, args.dtype) else ""))
    session = BlendSession.open(args.base, adapters, kind=kind, rewards=experts.rewards, alpha=experts.default_alpha,
                                alphas=experts.alphas, noise_level=args.eta, device=device, dtype=dtype,
                                reward_options=experts.reward_options)
    height, width = options.parse_resolution(args.resolution)
    return PipelineStudio(session, num_images=args.num_images or options.NUM_IMAGES, steps=args.steps,
                          guidance_scale=args.guidance_scale, height=height, width=width,
                          target_alpha=experts.target_alpha, smc=options.smc_options(args), routing=args.routing)


def digits_studio(args: argparse.Namespace):
    """No ``--base``: the embedded digits model with the demo's experts (trained once if missing)."""
    from diffusion_blend.testbeds.digits.config import DemoConfig
    from diffusion_blend.testbeds.digits.studio import adapters_in, digits_studio
    from diffusion_blend.ui.paths import resolve_within

    demo_dir = Path(args.demo_dir)
    roots = args.adapter_dir or [demo_dir / "adapters"]
    adapters = options.parse_pairs(args.adapter)
    if not adapters:
        adapters = adapters_in(demo_dir / "adapters")
        if not adapters:
            # trains the demo's experts once (minutes), then cached
            from diffusion_blend.testbeds.digits.experts import ensure_demo_adapters

            adapters = ensure_demo_adapters(demo_dir)
    adapters = {name: resolve_within(path, roots) for name, path in adapters.items()}
    steps = args.steps or DemoConfig().num_inference_steps
    return digits_studio(adapters, num_images=args.num_images or options.DIGITS_UI_IMAGES, num_inference_steps=steps,
                         smc=options.smc_options(args))


def run(args: argparse.Namespace) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    check_args(args)
    if args.base is not None:  # the device is checked before gradio and the model load
        from diffusion_blend.devices import resolve_device

        resolve_device(args.device, args.dtype)
    from diffusion_blend.ui.app import build_app, launch, load_pareto_reference

    if args.base is not None:
        studio = pipeline_studio(args)
        app = build_app(studio, initial_smc=_initial_smc(args, studio.smc))
    else:
        pareto = load_pareto_reference(Path(args.demo_dir) / "report" / "pareto.json")
        studio = digits_studio(args)
        app = build_app(studio, pareto, initial_smc=_initial_smc(args, studio.smc))
    print(f"Diffusion Blend UI on http://{args.host}:{args.port} (Ctrl+C to stop)")
    launch(app, host=args.host, port=args.port)
    return 0


def _initial_smc(args: argparse.Namespace, smc: Any) -> dict[str, float | str]:
    """The page's SMC sliders start at --particles (unset: 1, SMC off until raised) and the studio's proposal tilt
    (``smc``: its :class:`~diffusion_blend.smc.SMCOptions`, from the flags)."""
    return {"particles": args.particles or 1, "proposal_tilt": smc.proposal_tilt}
