"""``dblend rewards``: the registered rewards (built in and from plugins), what each scores and what it needs."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rewards",
        help="list the registered rewards: what each scores, differentiable or not, the weights and options it needs",
        description="Every reward --reward NAME=REWARD, --rewards and the evaluation accept: built in, or added by a "
        "plugin through the diffusion_blend.rewards entry-point group (docs/rewards.md). Weights are fetched from the "
        "hub on first use (or read from a local folder given in --reward-options).",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusion_blend.rewards.registry import reward_infos

    infos = reward_infos()
    if args.json:
        import json

        print(json.dumps(infos, indent=2))
        return 0
    for info in infos:
        flags = ["differentiable" if info["differentiable"] else "not differentiable"]
        if info["needs_prompts"]:
            flags.append("needs the prompts")
        flags.append(f"weights: {info['weights']}" if info["weights"] else "weight-free")
        print(f"{info['name']}\n    {info['description']}\n    {'; '.join(flags)}")
        if info["options"]:
            print("    options: " + ", ".join(f"{k}={v}" for k, v in info["options"].items()))
    print("\nOptions go to --reward-options, e.g. '{\"aesthetic\": {\"model\": \"/models/clip\"}}'.")
    return 0
