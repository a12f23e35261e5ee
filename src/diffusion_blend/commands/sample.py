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
import os
import tempfile
from pathlib import Path

from ..devices import DTYPE_CHOICES, ROUTINGS
from ..errors import DiffusionBlendError, positive_number
from ..files import give_user_mode, refuse_existing_results, rounded
from ..preference import Preference

RESULT_FILES = ["image_*.png", "settings.json"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate images from a Stable Diffusion (XL, 3/3.5) or FLUX base blended with LoRA experts "
        "(DB-MPA / DB-MPA-LS)",
        description="Blend the noise (or velocity) predictions of LoRA experts of one Stable Diffusion (XL, 3/3.5) "
        "or FLUX base with reward weights w and KL scale lambda (c_i = lambda w_i, c_0 = 1 - lambda sum w).",
    )
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
    parser.add_argument("--smc-proposal-tilt", type=float, default=1.0,
                        help="smc: the proposal blends at KL scale tilt x lambda (the target keeps lambda): > 1 where "
                        "DB-MPA falls short of the preference, < 1 where it overshoots (default 1)")
    parser.add_argument("--smc-potential", choices=("tweedie", "none", "experts"), default="tweedie",
                        help="smc: potential: r_w of the Tweedie estimate (default), 0, or the experts' value "
                        "increments (no reward before the end)")
    parser.add_argument("--reward", action="append", default=[], metavar="NAME=REWARD",
                        help="smc: the basis reward of an expert without our metadata (repeat per expert)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--overwrite", action="store_true", help="replace the images and settings.json in --out")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="guidance scale (default 7.5 for SD/SDXL, 7 for SD3, 3.5 for FLUX's distilled guidance)")
    parser.add_argument("--eta", type=float, default=None,
                        help="DDIM eta (default 1, as in the paper); for SD3/FLUX the SDE noise level (default 0.7)")
    parser.add_argument("--seed", type=int, default=0, help="seed of image 0; image k uses seed + k")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--sdxl", action="store_true", help="the base is SDXL (auto-detected for local folders)")
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
        if value < 1:
            raise DiffusionBlendError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and (value < 8 or value % 8):
            raise DiffusionBlendError(f"{flag} must be a positive multiple of 8, got {value}")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:
        raise DiffusionBlendError(f"--eta must be in [0, 1], got {args.eta}")


def expert_alphas(adapters: dict[str, str], alpha: float | None) -> dict[str, float | None]:
    """Each expert's KL weight: from our metadata in its file, else ``--alpha`` (``None`` if neither says).

    The blend ``c_i = lambda w_i`` targets ``p_pre exp(lambda sum_i w_i r_i / alpha)`` only if every expert was
    fine-tuned with the same ``alpha``; experts that disagree are refused (one line)."""
    from ..pipelines.finetune import DIFFUSERS_LORA_NAME, read_diffusers_lora_metadata

    if alpha is not None:
        alpha = positive_number(alpha, "--alpha")
    alphas: dict[str, float | None] = {}
    for name, source in adapters.items():
        path = Path(source)
        readable = path.is_file() or (path / DIFFUSERS_LORA_NAME).is_file()
        try:
            metadata = read_diffusers_lora_metadata(path) if readable else None
        except DiffusionBlendError:
            metadata = None  # unreadable: the adapter loader reports it, with its own message
        alphas[name] = float(metadata.alpha) if metadata is not None else alpha
    known = {name: value for name, value in alphas.items() if value is not None}
    if len(set(known.values())) > 1:
        listed = ", ".join(f"{name}: {value:g}" for name, value in known.items())
        raise DiffusionBlendError(f"the experts were fine-tuned with different KL weights alpha ({listed}); the "
                                  "blend c_i = lambda w_i assumes one alpha for all experts")
    return alphas


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

    from ..devices import resolve_device
    from ..pipelines.loading import FLOW_KINDS, load_blend_pipeline, pipeline_kind

    _check_args(args)
    device, dtype = resolve_device(args.device, args.dtype)
    refuse_existing_results(args.out, RESULT_FILES, args.overwrite)
    adapters = parse_pairs(args.adapter)
    reward_names = parse_pairs(args.reward, "--reward", "REWARD")
    preference = Preference.parse(args.weights, args.kl_scale)
    coefficients = preference.coefficients(adapters)  # unknown names in --weights fail before any loading
    alphas = expert_alphas(adapters, args.alpha)
    if args.method == "ls":
        coefficients.probabilities()  # negative coefficients fail before any loading
    if args.method == "smc":
        from ..rewards import get_reward
        from ..smc import check_options

        # alpha is checked once known (metadata or --alpha)
        check_options(args.particles, args.smc_proposal, args.smc_potential, ess_threshold=0.5, potential_every=1,
                      alpha=1.0, proposal_tilt=args.smc_proposal_tilt)
        # the experts' rewards, built before the base is loaded: an unknown name fails early
        rewards = {reward: get_reward(reward) for reward in set(reward_names.values())}
    elif reward_names:
        raise DiffusionBlendError("--reward is for --method smc (it scores the particles)")
    kind = pipeline_kind(args.base, "sdxl" if args.sdxl and args.pipeline == "auto" else args.pipeline)
    sdxl, flow = kind == "sdxl", kind in FLOW_KINDS
    scheduler = args.scheduler or ("sde" if flow else "ddim")
    if (scheduler == "sde") != flow and scheduler != "pipeline":
        raise DiffusionBlendError(f"--scheduler {scheduler} is for {'SD3/FLUX' if scheduler == 'sde' else 'SD/SDXL'} "
                                  f"bases; this base is {kind} (use {'sde' if flow else 'ddim'} or pipeline)")
    if flow and args.method == "ls" and scheduler != "sde":
        raise DiffusionBlendError("--method ls needs a stochastic sampler that keeps the flow's marginals "
                                  "(--scheduler sde), not the base's Euler ODE")
    eta = args.eta if args.eta is not None else (0.7 if flow else 1.0)
    if flow and args.method == "ls" and eta == 0:
        raise DiffusionBlendError("--method ls needs SDE noise: --eta 0 makes the flow sampler the Euler ODE "
                                  "(its noise level must be > 0)")
    guidance_scale = args.guidance_scale if args.guidance_scale is not None else {"sd3": 7.0, "flux": 3.5}.get(kind, 7.5)
    print(f"device: {device}, {dtype}" + (" (auto)" if "auto" in (args.device, args.dtype) else ""))
    pipe = load_blend_pipeline(args.base, kind, dtype=getattr(torch, dtype))
    pipe.load_adapters(adapters)
    if scheduler == "ddim":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "sde":
        from ..sampling import FlowMatchSDEScheduler

        pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=eta)
    pipe = pipe.to(device)
    generators = [torch.Generator(device).manual_seed(args.seed + k) for k in range(args.num_images)]
    call = dict(
        prompt=[args.prompt] * args.num_images,
        negative_prompt=None if args.negative_prompt is None else [args.negative_prompt] * args.num_images,
        num_inference_steps=args.steps, guidance_scale=guidance_scale, generator=generators,
        height=args.height, width=args.width, **({} if flow else {"eta": eta}),
    )
    smc_settings = {}
    if args.method == "smc":
        from ..baselines.code import weighted_reward_scores
        from ..pipelines.experts import expert_rewards_and_alpha

        reward_of, alpha = expert_rewards_and_alpha(pipe, adapters, reward_names, args.alpha)
        if alpha is None:
            raise DiffusionBlendError("--method smc needs the experts' common KL weight alpha (its target is "
                                      "p_pre exp(lambda r_w / alpha)): give --alpha for files without our metadata; "
                                      f"experts of different alphas cannot be corrected together ({alphas})")
        for reward in set(reward_of.values()) - set(rewards):  # rewards named by the files' metadata
            rewards[reward] = get_reward(reward)
        expert_rewards = {name: rewards[reward] for name, reward in reward_of.items()}

        def weighted_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            return weighted_reward_scores(expert_rewards, preference, images, prompts)

        call["generator"] = args.seed
        images = pipe(preference=preference, method="smc", reward=weighted_reward, alpha=alpha,
                      particles=args.particles, proposal=args.smc_proposal, potential=args.smc_potential,
                      proposal_tilt=args.smc_proposal_tilt, routing=args.routing, **call).images
        stats = pipe.last_smc
        smc_settings = {"particles": args.particles, "smc_proposal": args.smc_proposal,
                        "smc_proposal_tilt": args.smc_proposal_tilt,
                        "smc_potential": args.smc_potential, "smc_alpha": alpha,
                        "rewards": reward_of, "network_evaluations_per_image": stats.network_evaluations,
                        "reward_evaluations_per_image": stats.reward_evaluations,
                        "final_ess": stats.final_ess.tolist()}
    else:
        switch = torch.Generator().manual_seed(args.seed) if args.method == "ls" else None
        images = pipe(preference=preference, method=args.method, switch_generator=switch, routing=args.routing,
                      **call).images

    args.out.mkdir(parents=True, exist_ok=True)
    files = []
    for k, image in enumerate(images):
        path = args.out / f"image_{k:03d}.png"
        _save_png(image, path)
        files.append(path.name)
    import diffusers
    import peft

    settings = {
        "base": str(args.base), "pipeline": kind, "sdxl": sdxl, "adapters": adapters, "weights": preference.weights,
        "kl_scale": preference.kl_scale, "method": args.method, "alpha": alphas,
        "coefficients": {"base" if m is None else m: c for m, c in coefficients.items()},
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
        "guidance_scale": guidance_scale, "eta": eta,
        "seeds": [args.seed] if args.method == "smc" else [args.seed + k for k in range(len(files))],
        "height": args.height, "width": args.width, "device": device, "dtype": dtype,
        "scheduler": type(pipe.scheduler).__name__, "routing": args.routing, "images": files, **smc_settings,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
    }
    if args.method != "smc":
        settings.update({f"{pipe.blend_component}_calls": pipe.last_blend.calls,
                         f"{pipe.blend_component}_forwards": pipe.last_blend.forwards,
                         "routing_used": pipe.last_blend.routing_used})
    tmp = args.out / "settings.json.tmp"
    tmp.write_text(json.dumps(rounded(settings), indent=2))
    os.replace(tmp, args.out / "settings.json")
    print(f"wrote {len(files)} image(s) and settings.json to {args.out}")
    return 0
