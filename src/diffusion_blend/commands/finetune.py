"""``dblend finetune``: KL-regularized RL fine-tuning of one LoRA adapter (paper section 4, DPOK family).

Targets are small builders returning a :class:`~diffusion_blend.training.config.FinetuneTarget` (model,
forward, scheduler, sample shape, decode, rewards); adding Stable Diffusion means adding one builder to
:data:`TARGETS`, not changing the trainer. Writes ``adapter.safetensors``, ``log.json`` (curves of reward,
KL and objective) and ``checkpoint.safetensors`` (resumed automatically) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusion_blend.commands import options
from diffusion_blend.devices import MALLOC_MMAP_THRESHOLD, fix_malloc_mmap_threshold
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.preference import Preference

if TYPE_CHECKING:  # the trainer (torch) is imported when the command runs, not when `dblend --help` registers it
    from diffusion_blend.training.config import DPOKConfig, FinetuneTarget


def gmm_target_builder(reward_names: Sequence[str], args: argparse.Namespace) -> FinetuneTarget:
    """The 2-D Gaussian-mixture testbed: a cached, reproducibly pretrained MLP base; rewards right, corner."""
    from diffusion_blend.testbeds.gmm.target import GmmBaseSettings, gmm_target

    return gmm_target(GmmBaseSettings(), cache_dir=args.cache_dir, progress=not args.no_progress)


def digits_target_builder(reward_names: Sequence[str], args: argparse.Namespace) -> FinetuneTarget:
    """The 8x8 digits model (``digits.train.load_default_digits_model``) with rewards from the registry."""
    from diffusion_blend.testbeds.digits.target import digits_finetune_target

    options = json.loads(args.reward_options) if args.reward_options else {}
    return digits_finetune_target(reward_names, options, progress=not args.no_progress)


def sd_target_builder(reward_names: Sequence[str], args: argparse.Namespace) -> FinetuneTarget:
    """A Stable Diffusion base (``--base``): CFG-guided rollouts on ``--prompts``, rewards on decoded images."""
    from diffusion_blend.pipelines.sd_target import load_sd_target

    if args.base is None or args.prompts is None:
        raise DiffusionBlendError(f"--kind {args.kind} needs --base PATH_OR_ID and --prompts FILE")
    options = json.loads(args.reward_options) if args.reward_options else {}
    return load_sd_target(args.base, args.prompts, reward_names, reward_options=options,
                          guidance_scale=args.guidance_scale, resolution=args.resolution,
                          sdxl=True if args.kind == "sdxl" else None, dtype=args.load_dtype)


def flow_target_builder(kind: str) -> Callable[[Sequence[str], argparse.Namespace], FinetuneTarget]:
    """An SD3 / FLUX base (``--base``): flow-SDE rollouts on ``--prompts``, rewards on decoded images."""

    def build(reward_names: Sequence[str], args: argparse.Namespace) -> FinetuneTarget:
        from diffusion_blend.pipelines.flow_target import load_flow_target

        if args.base is None or args.prompts is None:
            raise DiffusionBlendError(f"--kind {kind} needs --base PATH_OR_ID and --prompts FILE")
        options = json.loads(args.reward_options) if args.reward_options else {}
        return load_flow_target(kind, args.base, args.prompts, reward_names, reward_options=options,
                                guidance_scale=args.guidance_scale, resolution=args.resolution,
                                dtype=args.load_dtype)

    return build


def sd_export(result: Any, args: argparse.Namespace) -> list[str]:
    """Also write the adapter in diffusers' LoRA format (``load_lora_weights(OUT)`` loads the run folder)."""
    from accelerate import PartialState

    from diffusion_blend.pipelines.lora_files import export_run_adapter

    if not PartialState().is_main_process:  # under torchrun every process returns the same adapter
        return []
    pipeline_class = None
    if args.kind in ("sd3", "flux"):
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        pipeline_class = StableDiffusion3Pipeline if args.kind == "sd3" else FluxPipeline
    path = export_run_adapter(result.model, result.adapter_name, args.out, result.adapter_path, pipeline_class)
    return [f"diffusers LoRA: {path}"]


TARGETS: dict[str, Callable[[Sequence[str], argparse.Namespace], FinetuneTarget]] = {
    "gmm": gmm_target_builder,
    "digits": digits_target_builder,
    "sd": sd_target_builder,
    "sdxl": sd_target_builder,
    "sd3": flow_target_builder("sd3"),
    "flux": flow_target_builder("flux"),
}


def target_specs() -> dict[str, Any]:
    """Each target's :class:`~diffusion_blend.spec.ModelSpec` (recipe, sampler, guidance, LoRA): one source for the
    defaults below and for ``--help``."""
    from diffusion_blend.pipelines.kinds import SPECS
    from diffusion_blend.testbeds.digits.spec import DIGITS_SPEC
    from diffusion_blend.testbeds.gmm.spec import GMM_SPEC

    return {"gmm": GMM_SPEC, "digits": DIGITS_SPEC, **SPECS}


EXPORTS: dict[str, Callable[[Any, argparse.Namespace], list[str]]] = {
    "sd": sd_export, "sdxl": sd_export, "sd3": sd_export, "flux": sd_export,
}
"""Per-target extra outputs written after training (each returns lines to print)."""

FLAG_FIELDS = {
    "alpha": "alpha", "iterations": "iterations", "batch_size": "batch_size", "minibatch_size": "minibatch_size",
    "updates_per_batch": "updates_per_batch", "lr": "learning_rate", "clip_range": "clip_range",
    "lora_rank": "lora_rank", "steps": "num_inference_steps", "eta": "eta", "seed": "seed",
    "checkpoint_every": "checkpoint_every", "dtype": "dtype", "gradient_checkpointing": "gradient_checkpointing",
    "estimator": "estimator", "backprop_steps": "backprop_steps",
}


def defaults_epilog() -> str:
    from diffusion_blend.spec import spec_table

    return "\n".join(["per-target defaults (a --config file and the flags override them; the trainer's own defaults "
                      "fill the rest):", spec_table(target_specs(), recipe=True),
                      "  (alpha and --rewards have no default; --device auto = cuda when available, else cpu)"])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a LoRA adapter for a reward (KL-regularized policy gradient, DPOK)",
        description="Maximise E[r_w] - alpha * KL(path to base) with r_w = sum_i w_i r_i. Flags override --config.",
    )
    parser.formatter_class = type("DefaultsEpilogFormatter",
                                  (argparse.RawDescriptionHelpFormatter, parser.formatter_class), {})
    parser.epilog = defaults_epilog()  # the specs are light (no torch): `dblend --help` stays fast
    parser.add_argument("--kind", choices=KIND_CHOICES, default="auto",
                        help="model to fine-tune: the gmm or digits testbed, or a base pipeline's kind (auto: the "
                        "--base's kind, gmm without --base)")
    parser.add_argument("--rewards", help="the objective's reward weights r_w = sum_i w_i r_i, e.g. right=1 or "
                        "right=0.5,corner=0.5 (registry rewards: dblend rewards)")
    parser.add_argument("--config", type=Path, help="JSON file with DPOKConfig fields (reward_weights, alpha, ...)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (adapter, log, checkpoint)")
    parser.add_argument("--alpha", type=float, help="KL weight alpha > 0 of the objective E[r_w] - alpha KL")
    parser.add_argument("--iterations", type=int, help="policy-gradient iterations (default: the kind's recipe)")
    parser.add_argument("--batch-size", type=int,
                        help="trajectories per process per iteration (default: the kind's recipe)")
    parser.add_argument("--minibatch-size", type=int,
                        help="trajectories per gradient step (default: the recipe's, at most --batch-size)")
    parser.add_argument("--updates-per-batch", type=int,
                        help="passes over each batch of trajectories (PPO epochs; default: the recipe's)")
    parser.add_argument("--lr", type=float, help="learning rate of the LoRA weights (default: the recipe's)")
    parser.add_argument("--clip-range", type=float, help="PPO's ratio clip range (default: the recipe's)")
    parser.add_argument("--lora-rank", type=int, help="LoRA rank r (default: the kind's, table below)")
    parser.add_argument("--steps", type=int, help="sampler steps of the rollouts (default: the kind's recipe)")
    parser.add_argument("--eta", type=float, help="the sampler's noise: DDIM eta > 0; sd3/flux: the flow SDE's noise "
                        "level (default: the kind's, Flow-GRPO's 0.7 for sd3/flux)")
    parser.add_argument("--seed", type=int, help="seed of the rollouts and the LoRA init (default: --config's, else 0)")
    parser.add_argument("--checkpoint-every", type=int,
                        help="iterations between checkpoints (atomic; a rerun resumes; default: the recipe's)")
    parser.add_argument(
        "--estimator",
        choices=("score", "pathwise"),
        help="score: REINFORCE/PPO, any reward; pathwise: backprop through the chain (differentiable rewards; "
        "default: the recipe's, score)",
    )
    parser.add_argument(
        "--backprop-steps",
        type=int,
        metavar="K",
        help="pathwise: backprop through the last K steps only (DRaFT-K; a different, biased objective; default all)",
    )
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute activations in the backward pass (policy-update blocks; pathwise steps; "
                        "default: the recipe's)")
    options.add_device(parser)
    parser.set_defaults(dtype=None)  # unset: the recipe's (or --config's) dtype
    parser.add_argument("--reward-options", help='JSON: per-reward factory options, e.g. {"digit_prob": {"digit": 3}}')
    parser.add_argument("--cache-dir", type=Path, help="where the gmm base model is cached (default: the user cache)")
    parser.add_argument("--base", metavar="PATH_OR_ID",
                        help="sd/sdxl/sd3/flux: a local diffusers folder or a hub id (from_pretrained)")
    parser.add_argument("--prompts", type=Path, help="sd/sdxl/sd3/flux: training prompts, one per line or a JSON list")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="sd/sdxl/sd3/flux: guidance scale of the rollouts (default: the kind's, see the table "
                        "below; 1 = none)")
    parser.add_argument("--resolution", metavar="N",
                        help="sd/sdxl/sd3/flux: square image size in pixels (default: the denoiser's native size)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=MALLOC_MMAP_THRESHOLD, metavar="BYTES",
                        help="CPU runs on glibc Linux: fix malloc's mmap threshold of this process, so that resident "
                        "memory follows the live tensors instead of growing with the sampler steps (default "
                        f"{MALLOC_MMAP_THRESHOLD}, glibc's starting value; 0 = glibc's dynamic default)")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    options.add_progress(parser)
    options.deprecated(parser, "--target", "--kind", "kind")
    options.deprecated(parser, "--quiet", "--no-progress", "no_progress", flag=True)
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> DPOKConfig:
    """Per-target defaults, then the --config file, then the flags."""
    from diffusion_blend.training.config import DPOKConfig

    overrides: dict[str, Any] = {field: getattr(args, flag, None) for flag, field in FLAG_FIELDS.items()}
    if args.rewards:
        overrides["reward_weights"] = dict(Preference.parse(args.rewards).weights)
    values = target_specs()[args.kind].finetune_defaults()
    if args.config is not None:
        values.update(DPOKConfig.read_json(args.config))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get("batch_size") is not None and values.get("minibatch_size", 0) > values["batch_size"]:
        if overrides.get("minibatch_size") is None:  # a default minibatch never exceeds a smaller --batch-size
            values["minibatch_size"] = values["batch_size"]
    if "reward_weights" not in values or "alpha" not in values:
        raise DiffusionBlendError("give --rewards and --alpha (or a --config file that has them)")
    try:
        return DPOKConfig.from_dict(values)
    except DiffusionBlendError as err:  # the config's field names as the flags that set them
        flags = {field: "--" + flag.replace("_", "-") for flag, field in FLAG_FIELDS.items()}
        raise DiffusionBlendError(options.in_flag_spelling(str(err), flags)) from None


def make_accelerator(device: str):
    """The run's accelerator; ``--device cuda`` without CUDA is refused in one line."""
    import torch
    from accelerate import Accelerator

    if device not in ("auto", "cpu", "cuda"):
        raise DiffusionBlendError(f"--device {device}: fine-tuning runs on auto, cpu or cuda (pick GPUs with "
                                  "CUDA_VISIBLE_DEVICES; several with torchrun)")
    if device == "cuda" and not torch.cuda.is_available():
        raise DiffusionBlendError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    return Accelerator(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))


PIPELINE_TARGETS = ("sd", "sdxl", "sd3", "flux")


def build_target(args: argparse.Namespace, config: DPOKConfig) -> FinetuneTarget:
    """The target of ``--target`` with the kind's guidance when ``--guidance-scale`` is not given; for pipeline
    targets the base, prompts, guidance and resolution go into ``config.extra`` (the checkpoint: a resume must match,
    and the adapter's metadata) and the base loads with its frozen weights directly in ``config.dtype``."""
    if args.kind in PIPELINE_TARGETS:
        args.load_dtype = config.torch_dtype
        if args.guidance_scale is None:
            args.guidance_scale = target_specs()[args.kind].guidance_scale
        config.extra = {**config.extra, args.kind: {"base": str(args.base), "prompts": str(args.prompts),
                                                      "guidance_scale": args.guidance_scale,
                                                      "resolution": args.resolution}}
    return TARGETS[args.kind](list(config.reward_weights), args)


KIND_CHOICES = ("gmm", "digits", *options.KIND_CHOICES)


def resolve_kind_and_options(args: argparse.Namespace) -> None:
    """``--kind auto`` (the --base's kind, gmm without one), the square ``--resolution`` and ``--dtype auto``."""
    if args.kind == "auto":
        from diffusion_blend.pipelines.kinds import pipeline_kind

        args.kind = pipeline_kind(args.base) if args.base is not None else "gmm"
    if args.kind not in PIPELINE_TARGETS:
        given = [flag for flag, value in (("--base", args.base), ("--prompts", args.prompts),
                                          ("--guidance-scale", args.guidance_scale),
                                          ("--resolution", args.resolution)) if value is not None]
        if given:
            raise DiffusionBlendError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for a base pipeline "
                                      f"(--kind sd, sdxl, sd3 or flux), not --kind {args.kind}")
    args.resolution = options.square_resolution(args.resolution)
    if args.dtype == "auto":
        from diffusion_blend.devices import resolve_device

        args.dtype = resolve_device(args.device if args.device in ("cpu", "cuda") else "auto", "auto")[1]


def run(args: argparse.Namespace) -> int:
    from diffusion_blend.training.dpok import finetune

    resolve_kind_and_options(args)
    config = build_config(args)
    accelerator = make_accelerator(args.device)
    # before the base loads (its tensors are the first large blocks); CPU runs only
    allocator = fix_malloc_mmap_threshold(args.malloc_mmap_threshold, apply=accelerator.device.type == "cpu")
    if args.no_resume and (args.out / "checkpoint.safetensors").exists():
        (args.out / "checkpoint.safetensors").unlink()
    target = build_target(args, config)
    result = finetune(target, config, out_dir=args.out, accelerator=accelerator, progress=not args.no_progress,
                      routing=args.routing, log_extra={"malloc_mmap_threshold": allocator})
    last = result.curves[-1]
    print(f"adapter: {result.adapter_path}")
    for line in EXPORTS.get(args.kind, lambda *_: [])(result, args):
        print(line)
    print(f"final reward {last['reward']:.4f}  path KL {last['kl']:.4f}  objective {last['objective']:.4f}")
    return 0
