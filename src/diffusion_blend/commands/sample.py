"""``dblend sample``: images from a Stable Diffusion (1.x/2.x, XL, 3/3.5) or FLUX base blended with named LoRA experts.

    dblend sample --base runwayml/stable-diffusion-v1-5 --adapter aesthetic=a.safetensors \\
        --adapter align=b.safetensors --weights aesthetic=0.3,align=0.7 --kl-scale 1.0 --method mpa \\
        --prompt "a cat" --out out/

writes ``image_000.png ...`` and ``settings.json`` (every setting, the blend coefficients, library versions).
Image ``k`` uses seed ``--seed + k`` (paired noise across preferences, as in the paper's evaluation).
The pipeline class comes from the base folder's ``model_index.json`` (or ``--pipeline``); flow-matching bases
(SD3, FLUX) sample with the Flow-GRPO SDE (``--scheduler sde``, noise level ``--eta``, default 0.7), which
DB-MPA-LS needs; ``--scheduler pipeline`` keeps the base's Euler ODE (DB-MPA only).

``--method smc --particles N`` corrects the blend toward the exact target ``p_pre exp(lambda r_w / alpha)`` with
sequential Monte Carlo (``diffusion_blend.smc``: the blend as proposal, ``N`` particles per image, docs/method.md).
It scores particles with ``r_w = sum_i w_i r_i``: each expert's reward comes from our metadata in its file or
``--reward NAME=REWARD``, and ``alpha`` from the metadata or ``--alpha``. SMC draws all images from one generator
seeded with ``--seed`` (no per-image seeds); settings.json adds the particles, network and reward evaluations per
image and each image's final effective sample size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusion_blend.commands import TILT_HELP, proposal_tilt
from diffusion_blend.devices import DTYPE_CHOICES, ROUTINGS
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.files import refuse_existing_results, rounded
from diffusion_blend.preference import Preference

RESULT_FILES = ["image_*.png", "settings.json"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate images from a Stable Diffusion (XL, 3/3.5) or FLUX base blended with LoRA experts "
        "(DB-MPA / DB-MPA-LS)",
        description="Blend the noise (or velocity) predictions of LoRA experts of one Stable Diffusion (XL, 3/3.5) "
        "or FLUX base with reward weights w and KL scale lambda (c_i = lambda w_i, c_0 = 1 - lambda sum w).",
        epilog=kinds_epilog(),
    )
    parser.formatter_class = type("DefaultsEpilogFormatter",
                                  (argparse.RawDescriptionHelpFormatter, parser.formatter_class), {})
    parser.add_argument("--base", required=True, help="base pipeline: hub id or local folder (from_pretrained)")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=PATH", required=True,
        help="a LoRA expert: diffusers LoRA .safetensors file/folder or peft adapter folder (repeat per expert)",
    )
    parser.add_argument("--weights", required=True, help="reward weights by expert name, e.g. aesthetic=0.3,align=0.7")
    parser.add_argument("--kl-scale", type=float, default=1.0, help="KL scale lambda >= 0 (default 1)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="KL weight alpha the experts were fine-tuned with, for files without our metadata "
                        "(foreign LoRAs, e.g. Flow-GRPO's: docs/flow-models.md); recorded in settings.json")
    parser.add_argument("--method", choices=("mpa", "ls", "smc"), default="mpa",
                        help="mpa: deterministic blend (DB-MPA); ls: one expert drawn per step (DB-MPA-LS); smc: "
                        "sequential Monte Carlo with the blend as proposal, toward the exact target (--particles)")
    parser.add_argument("--particles", type=int, default=4, help="smc: particles per image (default 4)")
    parser.add_argument("--smc-proposal", choices=("blend", "twisted"), default="blend",
                        help="smc: proposal: the blend's step (default; experts trained on this sampler's chain), or "
                        "the base's step moved by its variance times the blend's score deviation (twisted SMC, for "
                        "experts whose steps are continuous-time tilts; docs/method.md)")
    parser.add_argument("--smc-proposal-tilt", type=proposal_tilt, default="auto", help="smc: " + TILT_HELP)
    parser.add_argument("--smc-potential", choices=("tweedie", "none", "experts"), default="tweedie",
                        help="smc: potential: r_w of the Tweedie estimate (default), 0, or the experts' value "
                        "increments (no reward before the end)")
    parser.add_argument("--reward", action="append", default=[], metavar="NAME=REWARD",
                        help="smc: the basis reward of an expert without our metadata (repeat per expert)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--overwrite", action="store_true", help="replace the images and settings.json in --out")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the kind's, table below)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="guidance scale (default: the kind's, table below; FLUX: its distilled guidance)")
    parser.add_argument("--eta", type=float, default=None,
                        help="DDIM eta for SD/SDXL, the flow SDE's noise level for SD3/FLUX (default: the kind's, "
                        "table below)")
    parser.add_argument("--seed", type=int, default=0, help="seed of image 0; image k uses seed + k")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--pipeline", choices=("auto", "sd", "sdxl", "sd3", "flux"), default="auto",
                        help="the base's pipeline (default auto: from a local folder's model_index.json; hub ids: sd)")
    parser.add_argument("--scheduler", choices=("ddim", "sde", "pipeline"), default=None,
                        help="ddim (default for SD/SDXL): DDIMScheduler from the base's config (the paper's sampler, "
                        "honours --eta); sde (default for SD3/FLUX): the Flow-GRPO SDE with noise level --eta; "
                        "pipeline: the base's own scheduler")
    parser.add_argument("--routing", choices=ROUTINGS, default="auto",
                        help="how the experts are evaluated: batched (one forward of all members), sequential (one "
                        "forward per member), auto (sequential on CPU, batched on CUDA when it fits; default)")
    parser.add_argument("--device", default="auto", help="torch device: auto (cuda if available, else cpu), cpu, cuda")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights dtype; auto: float16 on cuda, float32 on cpu")
    parser.set_defaults(func=run)


def kinds_epilog() -> str:
    """The kinds' defaults (:data:`diffusion_blend.pipelines.kinds.SPECS`) as ``--help`` shows them."""
    from diffusion_blend.pipelines.kinds import SPECS
    from diffusion_blend.spec import spec_table

    return "defaults per base kind (a flag overrides them; docs/design.md says why each):\n" + spec_table(SPECS)


def parse_pairs(items: list[str], flag: str = "--adapter", value: str = "PATH") -> dict[str, str]:
    """``NAME=VALUE`` arguments (``--adapter``, ``--reward``) as a dict; malformed or repeated names: one line."""
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise DiffusionBlendError(f"cannot parse {flag} {item!r}: expected NAME={value}")
        if name.strip() in pairs:
            raise DiffusionBlendError(f"{flag} {name.strip()!r} given twice")
        pairs[name.strip()] = path.strip()
    return pairs


def _check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--steps", args.steps), ("--num-images", args.num_images)):
        if value is not None and value < 1:
            raise DiffusionBlendError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < 8 or value % 8):
            raise DiffusionBlendError(f"{flag} must be a positive multiple of 8, got {value}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise DiffusionBlendError(f"--eta must be in [0, 1], got {args.eta}")


def smc_options(args: argparse.Namespace):
    """``--particles`` and the ``--smc-*`` flags as :class:`~diffusion_blend.smc.SMCOptions` (checked once)."""
    from diffusion_blend.smc import SMCOptions

    return SMCOptions(particles=args.particles, proposal=args.smc_proposal, potential=args.smc_potential,
                      proposal_tilt=args.smc_proposal_tilt)


def _save_png(image, path: Path) -> None:
    from diffusion_blend.files import atomic_write

    with atomic_write(path, "wb") as handle:
        image.save(handle, format="PNG")


def run(args: argparse.Namespace) -> int:
    from diffusion_blend.devices import resolve_device
    from diffusion_blend.pipelines.kinds import FLOW_KINDS, pipeline_kind
    from diffusion_blend.pipelines.session import BlendSession

    _check_args(args)
    device, dtype = resolve_device(args.device, args.dtype)
    refuse_existing_results(args.out, RESULT_FILES, args.overwrite)
    adapters = parse_pairs(args.adapter)
    reward_names = parse_pairs(args.reward, "--reward", "REWARD")
    preference = Preference.parse(args.weights, args.kl_scale)
    coefficients = preference.coefficients(adapters)  # unknown names in --weights fail before any loading
    if args.method == "ls":
        coefficients.probabilities()  # negative coefficients fail before any loading
    smc = smc_options(args) if args.method == "smc" else None
    if reward_names and args.method != "smc":
        raise DiffusionBlendError("--reward is for --method smc (it scores the particles)")
    kind = pipeline_kind(args.base, args.pipeline)
    if kind in FLOW_KINDS and args.method == "ls" and args.scheduler == "pipeline":
        raise DiffusionBlendError("--method ls needs a stochastic sampler that keeps the flow's marginals "
                                  "(--scheduler sde), not the base's Euler ODE")
    if kind in FLOW_KINDS and args.method == "ls" and args.eta == 0:
        raise DiffusionBlendError("--method ls needs SDE noise: --eta 0 makes the flow sampler the Euler ODE "
                                  "(its noise level must be > 0)")
    print(f"device: {device}, {dtype}" + (" (auto)" if "auto" in (args.device, args.dtype) else ""))
    session = BlendSession.open(args.base, adapters, kind=kind, rewards=reward_names, alpha=args.alpha,
                                scheduler=args.scheduler, noise_level=args.eta, device=device, dtype=dtype)
    if args.method == "smc":
        session.alpha("--method smc")  # before sampling: the target needs it
    result = session.generate(args.prompt, preference, method=args.method, num_images=args.num_images,
                              seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                              height=args.height, width=args.width, negative_prompt=args.negative_prompt, smc=smc,
                              routing=args.routing)
    args.out.mkdir(parents=True, exist_ok=True)
    files = []
    for k, image in enumerate(result.images):
        path = args.out / f"image_{k:03d}.png"
        _save_png(image, path)
        files.append(path.name)
    _write_settings(args, session, preference, result.settings, files, device, dtype)
    print(f"wrote {len(files)} image(s) and settings.json to {args.out}")
    return 0


def _write_settings(args: argparse.Namespace, session, preference: Preference, run: dict, files: list[str],
                    device: str, dtype: str) -> None:
    import diffusers
    import peft
    import torch

    from diffusion_blend.files import atomic_write

    coefficients = preference.coefficients(session.experts)
    settings = {
        "base": str(args.base), "pipeline": session.kind, "adapters": {n: e.source for n, e in session.experts.items()},
        "experts": {name: expert.describe() for name, expert in session.experts.items()},
        "weights": preference.weights, "kl_scale": preference.kl_scale, "method": args.method,
        "coefficients": {"base" if m is None else m: c for m, c in coefficients.items()},
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "height": args.height, "width": args.width,
        "device": device, "dtype": dtype, "images": files, **run,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    }
    with atomic_write(args.out / "settings.json", "w") as handle:
        handle.write(json.dumps(rounded(settings), indent=2))
