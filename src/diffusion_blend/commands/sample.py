"""``dblend sample``: images from a Stable Diffusion (1.x/2.x, XL, 3/3.5) or FLUX base blended with named LoRA experts.

    dblend sample --base runwayml/stable-diffusion-v1-5 --adapter aesthetic=a.safetensors \\
        --adapter align=b.safetensors --weights aesthetic=0.3,align=0.7 --kl-scale 1.0 --method mpa \\
        --prompt "a cat" --out out/

writes ``image_000.png ...`` and ``settings.json`` (every setting, the blend coefficients, library versions).
Image ``k`` uses seed ``--seed + k`` (paired noise across preferences, as in the paper's evaluation).
The pipeline class comes from the base folder's ``model_index.json`` (or ``--kind``); flow-matching bases
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

from diffusion_blend.commands import options
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.files import refuse_existing_results, rounded
from diffusion_blend.pipelines.kinds import SCHEDULER_CHOICES
from diffusion_blend.preference import Preference, PreferenceSchedule

RESULT_FILES = ["image_*.png", "settings.json"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate images from a Stable Diffusion (XL, 3/3.5) or FLUX base blended with LoRA experts "
        "(DB-MPA / DB-MPA-LS / SMC)",
        description="Blend the noise (or velocity) predictions of LoRA experts of one Stable Diffusion (XL, 3/3.5) "
        "or FLUX base with reward weights w and KL scale lambda (c_i = lambda w_i, c_0 = 1 - lambda sum w).",
        epilog=kinds_epilog(),
    )
    parser.formatter_class = type("DefaultsEpilogFormatter",
                                  (argparse.RawDescriptionHelpFormatter, parser.formatter_class), {})
    options.add_base(parser, required=True)
    options.add_experts(parser, required=True)
    parser.add_argument("--weights", required=True,
                        help="reward weights by expert name, e.g. aesthetic=0.3,align=0.7; a schedule over the steps: "
                        "START:END (aesthetic=0.8:0.2,align=0.2:0.8) or key points V@U:V@U with U from 0 (first step) "
                        "to 1 (last), e.g. a=1@0:1@0.5:0@0.5:0@1 switches at half way")
    parser.add_argument("--kl-scale", default="1", help="KL scale lambda >= 0; a schedule like --weights (default 1)")
    options.add_method(parser)
    options.add_smc(parser)
    parser.add_argument("--prompt", required=True, help="the text prompt")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from (CFG kinds; default none)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--overwrite", action="store_true", help="replace the images and settings.json in --out")
    options.add_sampling(parser)
    options.add_num_images(parser)
    parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=None,
                        help="ddim (default for SD/SDXL): DDIMScheduler from the base's config (the paper's sampler, "
                        "honours --eta); sde (default for SD3/FLUX): the Flow-GRPO SDE with noise level --eta; "
                        "pipeline: the base's own scheduler (no --eta)")
    options.add_device(parser)
    options.add_progress(parser)
    options.deprecated(parser, "--pipeline", "--kind", "kind")
    options.deprecated(parser, "--height", "--resolution HxW", "height")
    options.deprecated(parser, "--width", "--resolution HxW", "width")
    parser.set_defaults(func=run)


def kinds_epilog() -> str:
    """The kinds' defaults (:data:`diffusion_blend.pipelines.kinds.SPECS`) as ``--help`` shows them."""
    from diffusion_blend.pipelines.kinds import SPECS
    from diffusion_blend.spec import spec_table

    return "defaults per base kind (a flag overrides them; docs/design.md says why each):\n" + spec_table(SPECS)


def _check_args(args: argparse.Namespace) -> None:
    """Every cheap check of ``dblend sample``'s flags, before any model loads."""
    options.check_positive(args, "steps", "num_images")
    options.check_eta(args.eta)
    options.resolve_resolution(args)
    options.refuse_smc_flags_without_smc(args)
    if args.scheduler == "pipeline" and args.eta is not None:
        raise DiffusionBlendError("--eta sets the noise of --scheduler ddim or sde; --scheduler pipeline keeps the "
                                  "base's own scheduler and its noise (drop one of them)")


def _save_png(image, path: Path) -> None:
    from diffusion_blend.files import atomic_write

    with atomic_write(path, "wb") as handle:
        image.save(handle, format="PNG")


def _preference(args: argparse.Namespace, adapters: dict[str, str]) -> Preference | PreferenceSchedule:
    """``--weights`` and ``--kl-scale`` for these experts, checked before any model loads."""
    preference = PreferenceSchedule.parse(args.weights, args.kl_scale)
    points = [preference] if isinstance(preference, Preference) else preference.preferences()
    for point in points:
        coefficients = point.coefficients(adapters)  # unknown names in --weights fail before any loading
        if args.method == "ls":
            coefficients.probabilities()  # negative coefficients (at any step) fail before any loading
    if args.method == "smc" and not isinstance(preference, Preference):
        raise DiffusionBlendError("--method smc targets a fixed preference; a weight schedule (START:END) is not "
                                  "one: give fixed --weights")
    return preference


def run(args: argparse.Namespace) -> int:
    from diffusion_blend.devices import resolve_device
    from diffusion_blend.pipelines.kinds import FLOW_KINDS, pipeline_kind
    from diffusion_blend.pipelines.session import BlendSession

    _check_args(args)
    device, dtype = resolve_device(args.device, args.dtype)
    refuse_existing_results(args.out, RESULT_FILES, args.overwrite)
    experts = options.expert_options(args)
    preference = _preference(args, experts.adapters)
    smc = options.smc_options(args) if args.method == "smc" else None
    kind = pipeline_kind(args.base, args.kind)
    if kind in FLOW_KINDS and args.method == "ls" and args.scheduler == "pipeline":
        raise DiffusionBlendError("--method ls needs a stochastic sampler that keeps the flow's marginals "
                                  "(--scheduler sde), not the base's Euler ODE")
    if kind in FLOW_KINDS and args.method == "ls" and args.eta == 0:
        raise DiffusionBlendError("--method ls needs SDE noise: --eta 0 makes the flow sampler the Euler ODE "
                                  "(its noise level must be > 0)")
    print(f"device: {device}, {dtype}" + (" (auto)" if "auto" in (args.device, args.dtype) else ""))
    session = BlendSession.open(args.base, experts.adapters, kind=kind, rewards=experts.rewards,
                                alpha=experts.default_alpha, alphas=experts.alphas, scheduler=args.scheduler,
                                noise_level=args.eta, device=device, dtype=dtype,
                                reward_options=experts.reward_options)
    if args.method == "smc" or experts.target_alpha is not None:  # before sampling: the target needs every alpha
        session.target(preference, experts.target_alpha,
                       why="--method smc" if args.method == "smc" else "--target-alpha")
    result = session.generate(args.prompt, preference, method=args.method,
                              num_images=args.num_images or options.NUM_IMAGES,
                              seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                              height=args.height, width=args.width, negative_prompt=args.negative_prompt, smc=smc,
                              routing=args.routing, target_alpha=experts.target_alpha,
                              progress=not args.no_progress)
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

    settings = {
        "base": str(args.base), "pipeline": session.kind, "adapters": {n: e.source for n, e in session.experts.items()},
        "experts": {name: expert.describe() for name, expert in session.experts.items()},
        "weights": preference.weights, "kl_scale": preference.kl_scale, "method": args.method,
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "height": args.height, "width": args.width,
        "device": device, "dtype": dtype, "images": files, **run,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    }
    with atomic_write(args.out / "settings.json", "w") as handle:
        handle.write(json.dumps(rounded(settings), indent=2))
