"""``dblend ui``: the browser app (Gradio) for choosing a preference at inference time."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


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
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.set_defaults(func=run)


def parse_adapter_args(items: list[str]) -> dict[str, str]:
    from ..errors import DiffusionBlendError

    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DiffusionBlendError(f"--adapter expects NAME=PATH, got {item!r}")
        if name in adapters:
            raise DiffusionBlendError(f"adapter {name!r} given twice")
        adapters[name] = path
    return adapters


def run(args: argparse.Namespace) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from ..errors import DiffusionBlendError
    from ..ui.app import build_app, launch, load_pareto_reference
    from ..ui.digits import adapters_in, digits_studio
    from ..ui.paths import resolve_within

    if not 1 <= args.port <= 65535:
        raise DiffusionBlendError(f"--port must be in 1..65535, got {args.port}")
    demo_dir = Path(args.demo_dir)
    roots = args.adapter_dir or [demo_dir / "adapters"]
    adapters = parse_adapter_args(args.adapter)
    if not adapters:
        adapters = adapters_in(demo_dir / "adapters")
        if not adapters:
            from ..demo import ensure_demo_adapters  # trains the demo's experts once (minutes), then cached

            adapters = ensure_demo_adapters(demo_dir)
    adapters = {name: resolve_within(path, roots) for name, path in adapters.items()}
    studio = digits_studio(adapters, num_images=args.num_images, num_inference_steps=args.steps)
    app = build_app(studio, load_pareto_reference(demo_dir / "report" / "pareto.json"))
    print(f"Diffusion Blend UI on http://{args.host}:{args.port} (Ctrl+C to stop)")
    launch(app, host=args.host, port=args.port)
    return 0
