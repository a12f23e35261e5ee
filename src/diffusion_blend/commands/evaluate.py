"""``dblend evaluate``: sweep methods x preferences x seeds on a setting; CSV/JSON/PNG/HTML (paper section 6).

Settings (:data:`SETTINGS`): ``gmm`` (the 2-D Gaussian-mixture miniature with ideal experts), ``digits`` (the paper's
comparison table on the demo's digits experts: a preset of the same sweep, :mod:`diffusion_blend.testbeds.digits.table`)
and ``sd`` (a Stable Diffusion 1.x/2.x or SDXL base with one LoRA expert per reward: ``--base B --adapter NAME=PATH
... --prompts FILE --rewards NAME[,NAME] [--morl W=PATH ...]``, :mod:`diffusion_blend.evaluation.sd_setting`).

Resumable (finished cells are skipped) and splittable across processes: ``torchrun --nproc_per_node N -m
diffusion_blend.cli evaluate ...`` or ``accelerate launch`` (one GPU per process).
"""

from __future__ import annotations

import argparse

from diffusion_blend.commands import TILT_HELP, proposal_tilt
from diffusion_blend.errors import DiffusionBlendError


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DiffusionBlendError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DiffusionBlendError(f"expected comma-separated integers, got {text!r}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate DB-MPA/LS and baselines over a preference grid: Pareto fronts, hypervolume, HTML report",
        description="Sweeps methods x preferences x seeds. Finished cells in OUT/cells are reused on a rerun.",
    )
    # names are checked when the command runs, so registering it (`dblend --help`) does not import the sweep (torch)
    parser.add_argument("--setting", default="gmm", choices=SETTINGS,
                        help="gmm: the 2-D mixture with exact experts; digits: the paper's comparison table on the "
                        "demo's experts (--demo-dir, --quick); sd: an SD 1.x/2.x or SDXL base with LoRA experts")
    parser.add_argument("--out", required=True, help="output folder (cells/, results.csv/json, *.png, summary.html)")
    parser.add_argument("--methods",
                        help="comma-separated, from: base, mpa, ls, rs-factors, rs-deltas, code, rgg, is-oracle, "
                        "morl, smc, fk (docs/evaluation.md); default gmm: base,mpa,ls,code,rgg,is-oracle,morl; sd: "
                        "base,mpa,ls,rs-factors,rs-deltas,code,is-oracle, plus rgg when every reward is "
                        "differentiable and morl with --morl")
    parser.add_argument("--weights", help="preferences 'a=0.2,b=0.8;a=0.5,b=0.5' (overrides --grid)")
    parser.add_argument("--grid", type=int, default=5, help="evenly spaced w for two rewards (default 5 points)")
    parser.add_argument("--kl-scales", default="1", help="KL scales lambda, comma-separated (default 1)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--samples-per-seed", type=int,
                        help="samples per cell (default: 64); --setting sd: one per prompt (row b gets prompt "
                        "b mod P)")
    parser.add_argument("--batch-size", type=int,
                        help="rows per network batch within a cell (default gmm: the whole cell; sd: 8)")
    parser.add_argument(
        "--steps", type=int, help="sampling steps, DDIM eta = 1 (default: the setting's: gmm 20, sd 50)"
    )
    parser.add_argument("--alpha", type=float,
                        help="the experts' KL weight alpha (gmm: default 1; sd: read from the adapters' metadata, "
                        "needed only for foreign LoRA files)")
    sd = parser.add_argument_group("--setting sd")
    sd.add_argument("--base", help="base pipeline: a local diffusers folder or hub id (SD 1.x/2.x or SDXL)")
    sd.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="one expert per reward, named after it (diffusers LoRA file or folder); repeat")
    sd.add_argument("--prompts", help="prompts file: one per line, or a JSON list")
    sd.add_argument("--rewards", help="basis rewards from the registry, comma-separated (dblend rewards)")
    sd.add_argument("--morl", action="append", default=[], metavar="W=PATH",
                    help="MORL oracle adapter fine-tuned on r_w: W = the first reward's weight (two rewards) or "
                    "'0.2:0.8' in --rewards order; repeat per preference")
    sd.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance (default: the base kind's, 7.5 for SD, 5 for SDXL)")
    sd.add_argument("--resolution", type=int, help="image side in pixels (default: the UNet's native size)")
    sd.add_argument("--pipeline", choices=("auto", "sd", "sdxl"), default="auto",
                    help="base kind (auto: from model_index.json; a hub id counts as sd)")
    sd.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:i]; under torchrun "
                    "each process takes the GPU of its local rank")
    sd.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="UNet and text encoders (auto: float16 on cuda, float32 on cpu); the VAE decodes in float32")
    sd.add_argument("--routing", choices=("auto", "batched", "sequential"), default="auto",
                    help="how the experts are evaluated (docs/design.md, adapter routing)")
    sd.add_argument("--preview-images", type=int, default=4, help="images per cell in the report's grid (default 4)")
    parser.add_argument("--code-candidates", type=int, default=20)
    parser.add_argument("--code-block-size", type=int, default=5)
    parser.add_argument("--rgg-scale", type=float, default=1.0)
    parser.add_argument("--rgg-normalize", action="store_true", help="L2-normalise each reward gradient (dim 1)")
    parser.add_argument("--no-rgg-tempering", action="store_true")
    parser.add_argument("--oracle-samples", type=int, default=20_000,
                        help="gmm: base draws of the IS oracle (sd reweights the sweep's own base cells)")
    parser.add_argument("--gmm-oracle", choices=("chain", "exact"), default="chain", help="gmm: the IS oracle "
                        "reweights base-chain draws (SMC's target; default) or exact mixture draws (continuous time)")
    parser.add_argument("--particles", type=int, default=8, help="SMC particles per sample (methods smc, fk)")
    parser.add_argument("--fk-particles", type=int, help="FK steering's particles (default: --particles)")
    parser.add_argument("--smc-proposal", choices=("blend", "twisted"), default=None,
                        help="SMC's proposal: the blend's step, or the base's step moved by its variance times the "
                             "blend's score deviation (for continuous-time experts); default: the setting's (gmm: "
                             "twisted, its experts are exact scores; sd: blend)")
    parser.add_argument("--smc-proposal-tilt", type=proposal_tilt, default="auto", help=TILT_HELP)
    parser.add_argument("--smc-potential", default="tweedie", choices=("tweedie", "none", "experts"),
                        help="SMC's potential: r_w of the Tweedie estimate x0_hat(x_k), 0, or the experts' own value "
                             "increments (no reward before x_0; fk then uses tweedie)")
    parser.add_argument("--smc-potential-every", type=int, default=1, help="evaluate the potential every k steps")
    parser.add_argument("--smc-ess-threshold", type=float, default=0.5,
                        help="resample a sample's particles when their ESS < threshold x N (0: never; 1: always)")
    digits = parser.add_argument_group("--setting digits")
    digits.add_argument("--demo-dir", default=None,
                        help="folder with the demo's experts (default runs/demo; with --quick OUT/demo)")
    digits.add_argument("--quick", action="store_true", help="tiny budgets (tests, smoke runs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


SETTINGS = ("gmm", "digits", "sd")
SD_ONLY = ("base", "prompts", "rewards")
DIGITS_ONLY = ("demo_dir", "quick")


def _sd_setting(args: argparse.Namespace, methods: list[str] | None):
    from diffusion_blend.commands.sample import parse_pairs
    from diffusion_blend.devices import resolve_device
    from diffusion_blend.evaluation.sd_setting import parse_morl, sd_setting

    for flag in SD_ONLY:
        if not getattr(args, flag):
            raise DiffusionBlendError(f"--setting sd needs --{flag}")
    reward_names = [name.strip() for name in args.rewards.split(",") if name.strip()]
    adapters = parse_pairs(args.adapter)
    morl = parse_morl(args.morl, reward_names)
    if methods is None:
        from diffusion_blend.rewards import get_reward

        methods = ["base", "mpa", "ls", "rs-factors", "rs-deltas", "code", "is-oracle"]
        if all(getattr(get_reward(n), "differentiable", False) for n in reward_names):
            methods.append("rgg")
        if morl:
            methods.append("morl")
    if args.preview_images < 0:
        raise DiffusionBlendError(f"--preview-images must be >= 0, got {args.preview_images}")
    device, dtype = resolve_device(args.device, args.dtype)
    if device == "cuda":
        from accelerate import PartialState

        device = str(PartialState().device)  # one GPU per process under torchrun / accelerate launch
    setting = sd_setting(
        args.base, adapters, args.prompts, reward_names, morl=morl, methods=methods,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, resolution=args.resolution,
        alpha=args.alpha, pipeline=args.pipeline, device=device, dtype=dtype, routing=args.routing,
        preview_images=args.preview_images,
    )
    return setting, methods


def _digits_table(args: argparse.Namespace) -> int:
    """``--setting digits``: the comparison table (Table 1) and the KL-scale comparison on the demo's experts."""
    from pathlib import Path

    from diffusion_blend.testbeds.digits.table import (
        DigitsTableConfig,
        run_digits_table,
    )

    given = [f"--{flag.replace('_', '-')}" for flag in ("methods", "weights", *SD_ONLY, "adapter", "morl")
             if getattr(args, flag)]
    if given:
        raise DiffusionBlendError(f"{', '.join(given)} do(es) not apply to --setting digits (it runs the table's "
                                  "methods and weights)")
    out = Path(args.out)
    config = DigitsTableConfig.quick() if args.quick else DigitsTableConfig()
    demo_dir = args.demo_dir or (out / "demo" if args.quick else Path("runs/demo"))
    summary = run_digits_table(out, config, demo_dir=demo_dir, progress=not args.no_progress)
    print((out / "table.md").read_text())
    print(f"MORL adapters fine-tuned in this run: {summary['morl_trained']}; "
          f"total {summary['timings']['total_s']:.0f} s; outputs in {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from diffusion_blend.evaluation.sweep import (
        SweepConfig,
        parse_preference_grid,
        run_sweep,
    )

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    for flag, value in (("--samples-per-seed", args.samples_per_seed), ("--batch-size", args.batch_size),
                        ("--steps", args.steps)):
        if value is not None and value < 1:
            raise DiffusionBlendError(f"{flag} must be >= 1, got {value}")
    if args.setting != "digits" and (args.demo_dir or args.quick):
        raise DiffusionBlendError(f"--demo-dir and --quick belong to --setting digits, not --setting {args.setting}")
    if args.setting != "gmm" and args.gmm_oracle != "chain":
        raise DiffusionBlendError(f"--gmm-oracle belongs to --setting gmm, not --setting {args.setting}")
    if args.setting == "digits":
        return _digits_table(args)
    if args.setting == "sd":
        setting, methods = _sd_setting(args, methods)
        samples_per_seed = args.samples_per_seed or len(setting.prompts)
        batch_size = args.batch_size or 8
    else:
        from diffusion_blend.testbeds.gmm.setting import gmm_setting
        from diffusion_blend.testbeds.gmm.spec import GMM_SPEC

        given = [f"--{flag}" for flag in (*SD_ONLY, "adapter", "morl") if getattr(args, flag)]
        if given:
            raise DiffusionBlendError(f"{', '.join(given)} belong(s) to --setting sd, not --setting {args.setting}")
        setting = gmm_setting(num_inference_steps=args.steps or GMM_SPEC.steps,
                              alpha=1.0 if args.alpha is None else args.alpha, oracle=args.gmm_oracle)
        methods = methods or ["base", "mpa", "ls", "code", "rgg", "is-oracle", "morl"]
        samples_per_seed, batch_size = args.samples_per_seed or 64, args.batch_size
    preferences = parse_preference_grid(list(setting.rewards), args.weights, args.grid, _floats(args.kl_scales))
    config = SweepConfig(
        methods=methods,
        preferences=preferences,
        seeds=_ints(args.seeds),
        samples_per_seed=samples_per_seed,
        batch_size=batch_size,
        code_candidates=args.code_candidates,
        code_block_size=args.code_block_size,
        rgg_scale=args.rgg_scale,
        rgg_normalize=args.rgg_normalize,
        rgg_tempering=not args.no_rgg_tempering,
        oracle_samples=args.oracle_samples,
        particles=args.particles,
        fk_particles=args.fk_particles,
        smc_proposal=args.smc_proposal,
        smc_proposal_tilt=args.smc_proposal_tilt,
        smc_potential=args.smc_potential,
        smc_potential_every=args.smc_potential_every,
        smc_ess_threshold=args.smc_ess_threshold,
    )
    result = run_sweep(setting, config, args.out, progress=not args.no_progress)
    if result is None:  # not rank 0
        return 0
    print(f"{result['cells_run']} cell(s) computed; results in {args.out}")
    names = result["reward_names"]
    if args.setting == "sd":
        print(f"alpha = {setting.alpha:g}, {setting.name} base {args.base}, {len(setting.prompts)} prompt(s)")
    print(f"{'method':>10s}  {'weights':>24s}  {'λ':>4s}  {'r_w':>8s}  {'Δr_w':>8s}  "
          f"{'win':>5s}  {'NFE':>6s}  {'ESS':>6s}")
    for row in result["rows"]:
        weights = ",".join(f"{n}={row['weights'].get(n, 0.0):g}" for n in names)
        win = "-" if row["win_rate"] is None else f"{row['win_rate']:.2f}"
        nfe = "-" if row["network_evaluations_per_sample"] is None else f"{row['network_evaluations_per_sample']:.0f}"
        ess = f"{row['final_ess_mean']:.1f}" if row.get("final_ess_mean") is not None else "-"
        print(f"{row['method']:>10s}  {weights:>24s}  {row['kl_scale']:4g}  {row['weighted_reward']:8.4f}  "
              f"{row['gain_weighted_reward']:8.4f}  {win:>5s}  {nfe:>6s}  {ess:>6s}")
    for method, front in result["fronts"].items():
        print(f"hypervolume {method:>10s}: {front['hypervolume']:.4f}")
    return 0
