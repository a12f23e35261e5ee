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

from ..errors import DiffusionBlendError
from ..preference import Preference

if TYPE_CHECKING:  # the trainer (torch) is imported when the command runs, not when `dblend --help` registers it
    from ..training.config import DPOKConfig, FinetuneTarget


def gmm_target_builder(reward_names: Sequence[str], args: argparse.Namespace) -> FinetuneTarget:
    """The 2-D Gaussian-mixture testbed: a cached, reproducibly pretrained MLP base; rewards right, corner."""
    from ..verify.gmm_target import GmmBaseSettings, gmm_target

    return gmm_target(GmmBaseSettings(), cache_dir=args.cache_dir, progress=not args.quiet)


def digits_target_builder(reward_names: Sequence[str], args: argparse.Namespace) -> FinetuneTarget:
    """The 8x8 digits model (``digits.train.load_default_digits_model``) with rewards from the registry."""
    from ..digits.target import digits_finetune_target

    options = json.loads(args.reward_options) if args.reward_options else {}
    return digits_finetune_target(reward_names, options, progress=not args.quiet)


def sd_target_builder(reward_names: Sequence[str], args: argparse.Namespace) -> FinetuneTarget:
    """A Stable Diffusion base (``--base``): CFG-guided rollouts on ``--prompts``, rewards on decoded images."""
    from ..pipelines.finetune import load_sd_target

    if args.base is None or args.prompts is None:
        raise DiffusionBlendError("--target sd needs --base PATH_OR_ID and --prompts FILE")
    options = json.loads(args.reward_options) if args.reward_options else {}
    return load_sd_target(args.base, args.prompts, reward_names, reward_options=options,
                          guidance_scale=args.guidance_scale, resolution=args.resolution)


def sd_export(result: Any, args: argparse.Namespace) -> list[str]:
    """Also write the adapter in diffusers' LoRA format (``load_lora_weights(OUT)`` loads the run folder)."""
    from accelerate import PartialState

    from ..pipelines.finetune import export_run_adapter

    if not PartialState().is_main_process:  # under torchrun every process returns the same adapter
        return []
    path = export_run_adapter(result.model, result.adapter_name, args.out, result.adapter_path)
    return [f"diffusers LoRA: {path}"]


TARGETS: dict[str, Callable[[Sequence[str], argparse.Namespace], FinetuneTarget]] = {
    "gmm": gmm_target_builder,
    "digits": digits_target_builder,
    "sd": sd_target_builder,
}

EXPORTS: dict[str, Callable[[Any, argparse.Namespace], list[str]]] = {"sd": sd_export}
"""Per-target extra outputs written after training (each returns lines to print)."""

FLAG_FIELDS = {
    "alpha": "alpha", "iterations": "iterations", "batch_size": "batch_size", "minibatch_size": "minibatch_size",
    "updates_per_batch": "updates_per_batch", "lr": "learning_rate", "clip_range": "clip_range",
    "lora_rank": "lora_rank", "steps": "num_inference_steps", "eta": "eta", "seed": "seed",
    "checkpoint_every": "checkpoint_every",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a LoRA adapter for a reward (KL-regularized policy gradient, DPOK)",
        description="Maximise E[r_w] - alpha * KL(path to base) with r_w = sum_i w_i r_i. Flags override --config.",
    )
    parser.add_argument("--target", choices=sorted(TARGETS), default="gmm", help="model to fine-tune (default gmm)")
    parser.add_argument("--rewards", help="reward weights, e.g. right=1 or right=0.5,corner=0.5")
    parser.add_argument("--config", type=Path, help="JSON file with DPOKConfig fields (reward_weights, alpha, ...)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (adapter, log, checkpoint)")
    parser.add_argument("--alpha", type=float, help="KL weight alpha > 0")
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--batch-size", type=int, help="trajectories per process per iteration")
    parser.add_argument("--minibatch-size", type=int)
    parser.add_argument("--updates-per-batch", type=int)
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--clip-range", type=float)
    parser.add_argument("--lora-rank", type=int)
    parser.add_argument("--steps", type=int, help="sampler steps")
    parser.add_argument("--eta", type=float, help="DDIM eta > 0")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--reward-options", help='JSON: per-reward factory options, e.g. {"digit_prob": {"digit": 3}}')
    parser.add_argument("--cache-dir", type=Path, help="where the gmm base model is cached")
    parser.add_argument("--base", help="sd: Stable Diffusion pipeline folder or hub id")
    parser.add_argument("--prompts", type=Path, help="sd: training prompts, one per line or a JSON list")
    parser.add_argument("--guidance-scale", type=float, default=7.5,
                        help="sd: classifier-free guidance scale of the rollouts (default 7.5; 1 = none)")
    parser.add_argument("--resolution", type=int, help="sd: image size in pixels (default: the UNet's native size)")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> DPOKConfig:
    from ..training.config import DPOKConfig

    overrides: dict[str, Any] = {field: getattr(args, flag) for flag, field in FLAG_FIELDS.items()}
    if args.rewards:
        overrides["reward_weights"] = dict(Preference.parse(args.rewards).weights)
    if args.config is not None:
        return DPOKConfig.from_json(args.config, **overrides)
    values = {k: v for k, v in overrides.items() if v is not None}
    if "reward_weights" not in values or "alpha" not in values:
        raise DiffusionBlendError("give --rewards and --alpha (or a --config file that has them)")
    return DPOKConfig.from_dict(values)


def run(args: argparse.Namespace) -> int:
    from ..training.dpok import finetune

    config = build_config(args)
    if args.no_resume and (args.out / "checkpoint.safetensors").exists():
        (args.out / "checkpoint.safetensors").unlink()
    if args.target == "sd":  # recorded in the checkpoint (a resume must match) and the adapter's metadata
        config.extra = {**config.extra, "sd": {"base": str(args.base), "prompts": str(args.prompts),
                                               "guidance_scale": args.guidance_scale, "resolution": args.resolution}}
    target = TARGETS[args.target](list(config.reward_weights), args)
    result = finetune(target, config, out_dir=args.out, progress=not args.quiet)
    last = result.curves[-1]
    print(f"adapter: {result.adapter_path}")
    for line in EXPORTS.get(args.target, lambda *_: [])(result, args):
        print(line)
    print(f"final reward {last['reward']:.4f}  path KL {last['kl']:.4f}  objective {last['objective']:.4f}")
    return 0
