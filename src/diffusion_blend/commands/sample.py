"""``dblend sample``: images from a Stable Diffusion (XL) base blended with named LoRA experts (paper section 3).

    dblend sample --base runwayml/stable-diffusion-v1-5 --adapter aesthetic=a.safetensors \\
        --adapter align=b.safetensors --weights aesthetic=0.3,align=0.7 --kl-scale 1.0 --method mpa \\
        --prompt "a cat" --out out/

writes ``image_000.png ...`` and ``settings.json`` (every setting, the blend coefficients, library versions).
Image ``k`` uses seed ``--seed + k`` (paired noise across preferences, as in the paper's evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from ..devices import DTYPE_CHOICES
from ..errors import DiffusionBlendError
from ..files import give_user_mode, refuse_existing_results, rounded
from ..preference import Preference

RESULT_FILES = ["image_*.png", "settings.json"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate images from a Stable Diffusion base blended with LoRA experts (DB-MPA / DB-MPA-LS)",
        description="Blend the noise predictions of LoRA experts of one Stable Diffusion (XL) base with reward "
        "weights w and KL scale lambda (c_i = lambda w_i, c_0 = 1 - lambda sum w).",
    )
    parser.add_argument("--base", required=True, help="base pipeline: hub id or local folder (from_pretrained)")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=PATH", required=True,
        help="a LoRA expert: diffusers LoRA .safetensors file/folder or peft adapter folder (repeat per expert)",
    )
    parser.add_argument("--weights", required=True, help="reward weights by expert name, e.g. aesthetic=0.3,align=0.7")
    parser.add_argument("--kl-scale", type=float, default=1.0, help="KL scale lambda >= 0 (default 1)")
    parser.add_argument("--method", choices=("mpa", "ls"), default="mpa",
                        help="mpa: deterministic blend (DB-MPA); ls: one expert drawn per step (DB-MPA-LS)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--overwrite", action="store_true", help="replace the images and settings.json in --out")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1, as in the paper)")
    parser.add_argument("--seed", type=int, default=0, help="seed of image 0; image k uses seed + k")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--sdxl", action="store_true", help="the base is SDXL (auto-detected for local folders)")
    parser.add_argument("--scheduler", choices=("ddim", "pipeline"), default="ddim",
                        help="ddim: DDIMScheduler from the base's scheduler config (the paper's sampler, honours "
                        "--eta); pipeline: the base's own scheduler")
    parser.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights dtype; auto: float16 on cuda, float32 on cpu")
    parser.set_defaults(func=run)


def _parse_adapters(items: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise DiffusionBlendError(f"cannot parse --adapter {item!r}: expected NAME=PATH")
        if name.strip() in adapters:
            raise DiffusionBlendError(f"adapter {name.strip()!r} given twice")
        adapters[name.strip()] = path.strip()
    return adapters


def _check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--steps", args.steps), ("--num-images", args.num_images)):
        if value < 1:
            raise DiffusionBlendError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < 8 or value % 8):
            raise DiffusionBlendError(f"{flag} must be a positive multiple of 8, got {value}")
    if not 0.0 <= args.eta <= 1.0:
        raise DiffusionBlendError(f"--eta must be in [0, 1], got {args.eta}")


def _save_png(image, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        give_user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    import torch

    from ..pipelines import BlendStableDiffusionPipeline, BlendStableDiffusionXLPipeline, is_sdxl_folder
    from ..pipelines.loading import load_base_pipeline

    from ..devices import resolve_device

    _check_args(args)
    device, dtype = resolve_device(args.device, args.dtype)
    refuse_existing_results(args.out, RESULT_FILES, args.overwrite)
    adapters = _parse_adapters(args.adapter)
    preference = Preference.parse(args.weights, args.kl_scale)
    coefficients = preference.coefficients(adapters)  # unknown names in --weights fail before any loading
    if args.method == "ls":
        coefficients.probabilities()  # negative coefficients fail before any loading
    sdxl = args.sdxl or is_sdxl_folder(args.base)
    pipeline_class = BlendStableDiffusionXLPipeline if sdxl else BlendStableDiffusionPipeline
    print(f"device: {device}, {dtype}" + (" (auto)" if "auto" in (args.device, args.dtype) else ""))
    pipe = load_base_pipeline(pipeline_class, args.base, dtype=getattr(torch, dtype))
    pipe.load_adapters(adapters)
    if args.scheduler == "ddim":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    generators = [torch.Generator(device).manual_seed(args.seed + k) for k in range(args.num_images)]
    call = dict(
        prompt=[args.prompt] * args.num_images,
        negative_prompt=None if args.negative_prompt is None else [args.negative_prompt] * args.num_images,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta, generator=generators,
        height=args.height, width=args.width,
    )
    switch = torch.Generator().manual_seed(args.seed) if args.method == "ls" else None
    images = pipe(preference=preference, method=args.method, switch_generator=switch, **call).images

    args.out.mkdir(parents=True, exist_ok=True)
    files = []
    for k, image in enumerate(images):
        path = args.out / f"image_{k:03d}.png"
        _save_png(image, path)
        files.append(path.name)
    import diffusers
    import peft

    settings = {
        "base": str(args.base), "sdxl": sdxl, "adapters": adapters, "weights": preference.weights,
        "kl_scale": preference.kl_scale, "method": args.method,
        "coefficients": {"base" if m is None else m: c for m, c in coefficients.items()},
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "eta": args.eta, "seeds": [args.seed + k for k in range(len(files))],
        "height": args.height, "width": args.width, "device": device, "dtype": dtype,
        "scheduler": type(pipe.scheduler).__name__, "unet_calls": pipe.last_blend.calls, "images": files,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    }
    tmp = args.out / "settings.json.tmp"
    tmp.write_text(json.dumps(rounded(settings), indent=2))
    os.replace(tmp, args.out / "settings.json")
    print(f"wrote {len(files)} image(s) and settings.json to {args.out}")
    return 0
