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

from diffusion_blend.commands import options
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
                        "demo's experts (--demo-dir, --quick); sd: a diffusers base of any kind (SD, SDXL, SD3, FLUX) "
                        "with one LoRA expert per reward (default gmm)")
    parser.add_argument("--out", required=True, help="output folder (cells/, results.csv/json, *.png, report/)")
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
                        help="samples per cell (default gmm: 64; sd: one per prompt, row b gets prompt b mod P)")
    parser.add_argument("--batch-size", type=int,
                        help="rows per network batch within a cell (default gmm: the whole cell; sd: 8)")
    sd = parser.add_argument_group("--setting sd")
    options.add_base(sd, required=False)
    options.add_experts(sd, required=False)
    sd.add_argument("--prompts", help="prompts file: one per line, or a JSON list")
    sd.add_argument("--morl", action="append", default=[], metavar="W=PATH",
                    help="MORL oracle adapter fine-tuned on r_w: W = the first expert's weight (two experts) or "
                    "'0.2:0.8' in --adapter order; repeat per preference")
    sd.add_argument("--preview-images", type=int, default=4, help="images per cell in the report's grid (default 4)")
    options.add_sampling(sd, seed=False)
    options.add_device(sd)
    baselines = parser.add_argument_group("baselines")
    baselines.add_argument("--code-candidates", type=int, default=20, help="CoDe: candidates per block (default 20)")
    baselines.add_argument("--code-block-size", type=int, default=5, help="CoDe: steps per block (default 5)")
    baselines.add_argument("--rgg-scale", type=float, default=1.0, help="RGG: guidance scale (default 1)")
    baselines.add_argument("--rgg-normalize", action="store_true", help="RGG: L2-normalise each reward gradient")
    baselines.add_argument("--no-rgg-tempering", action="store_true",
                           help="RGG: no tempering of the guidance by the noise level")
    baselines.add_argument("--oracle-samples", type=int, default=20_000,
                           help="gmm: base draws of the IS oracle (sd reweights the sweep's own base cells; "
                           "default 20000)")
    baselines.add_argument("--gmm-oracle", choices=("chain", "exact"), default="chain",
                           help="gmm: the IS oracle reweights base-chain draws (SMC's target; default) or exact "
                           "mixture draws (continuous time)")
    smc = parser.add_argument_group("SMC (methods smc, fk)")
    options.add_smc(smc)
    smc.add_argument("--fk-particles", type=int, help="FK steering's particles (default: --particles)")
    digits = parser.add_argument_group("--setting digits")
    digits.add_argument("--demo-dir", default=None,
                        help="folder with the demo's experts (default runs/demo; with --quick OUT/demo)")
    digits.add_argument("--quick", action="store_true", help="tiny budgets (tests, smoke runs)")
    options.add_progress(parser)
    options.deprecated(sd, "--pipeline", "--kind", "kind")
    options.deprecated(sd, "--rewards", "--reward NAME=REWARD (or our metadata)", "reward_list")
    parser.set_defaults(func=run)


SETTINGS = ("gmm", "digits", "sd")
SD_ONLY = ("base", "prompts", "adapter", "reward", "reward_list", "morl", "target_alpha", "reward_options",
           "guidance_scale", "eta", "resolution")
"""Flags of ``--setting sd`` only (``--alpha A`` is also the mixture's; ``--alpha NAME=A`` is not)."""


def _given(args: argparse.Namespace, dests: tuple[str, ...]) -> list[str]:
    return [f"--{dest.replace('_', '-')}" for dest in dests if getattr(args, dest, None) not in (None, [], False)]


def _sd_setting(args: argparse.Namespace, methods: list[str] | None):
    from diffusion_blend.devices import resolve_device
    from diffusion_blend.evaluation.sd_setting import parse_morl, sd_setting

    for flag in ("base", "prompts", "adapter"):
        if not getattr(args, flag):
            raise DiffusionBlendError(f"--setting sd needs --{flag}")
    experts = options.expert_options(args)
    rewards = dict(experts.rewards)
    if getattr(args, "reward_list", None):  # deprecated --rewards a,b: experts named after their rewards
        rewards.update({name.strip(): name.strip() for name in args.reward_list.split(",") if name.strip()})
    morl = parse_morl(args.morl, list(experts.adapters))
    if methods is None:
        methods = ["base", "mpa", "ls", "rs-factors", "rs-deltas", "code", "is-oracle"]
        if _all_differentiable(experts.adapters, rewards, experts):
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
        args.base, experts.adapters, args.prompts, rewards, morl=morl, methods=methods,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
        resolution=options.square_resolution(args.resolution), noise_level=args.eta,
        alpha=experts.default_alpha, alphas=experts.alphas, target_alpha=experts.target_alpha, kind=args.kind,
        device=device, dtype=dtype, routing=args.routing, preview_images=args.preview_images,
    )
    return setting, methods


def _all_differentiable(adapters: dict[str, str], rewards: dict[str, str], experts) -> bool:
    """Whether every expert's reward is differentiable (RGG joins the default methods then)."""
    from diffusion_blend.pipelines.experts import read_experts
    from diffusion_blend.rewards import get_reward

    found = read_experts(adapters, rewards, experts.alphas, experts.default_alpha)
    return all(e.reward is not None and getattr(get_reward(e.reward), "differentiable", False) for e in found.values())


def _digits_table(args: argparse.Namespace) -> int:
    """``--setting digits``: the comparison table (Table 1) and the KL-scale comparison on the demo's experts."""
    from pathlib import Path

    from diffusion_blend.testbeds.digits.table import (
        DigitsTableConfig,
        run_digits_table,
    )

    given = _given(args, ("methods", "weights", *SD_ONLY, "alpha"))
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
    options.check_positive(args, "samples_per_seed", "batch_size", "steps")
    options.check_eta(args.eta)
    smc = options.smc_options(args)  # checked now, in the flags' spelling; the sweep takes its fields
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

        given = _given(args, SD_ONLY)
        if given:
            raise DiffusionBlendError(f"{', '.join(given)} belong(s) to --setting sd, not --setting {args.setting}")
        alpha, per_expert = options.parse_alphas(args.alpha)
        if per_expert or args.target_alpha is not None:
            raise DiffusionBlendError("--alpha NAME=A and --target-alpha are for --setting sd (the mixture's experts "
                                      "share one alpha: --alpha A)")
        setting = gmm_setting(num_inference_steps=args.steps or GMM_SPEC.steps, alpha=1.0 if alpha is None else alpha,
                              oracle=args.gmm_oracle)
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
        particles=smc.particles,
        fk_particles=args.fk_particles,
        smc_proposal=args.smc_proposal,  # unset: the setting's
        smc_proposal_tilt=smc.proposal_tilt,
        smc_potential=smc.potential,
        smc_potential_every=smc.potential_every,
        smc_ess_threshold=smc.ess_threshold,
    )
    result = run_sweep(setting, config, args.out, progress=not args.no_progress)
    if result is None:  # not rank 0
        return 0
    print(f"{result['cells_run']} cell(s) computed; results in {args.out}")
    names = result["reward_names"]
    if args.setting == "sd":
        alphas = ", ".join(f"{name} {value:g}" for name, value in (setting.alphas or {}).items())
        target = f", target alpha {setting.target_alpha:g}" if setting.target_alpha is not None else ""
        print(f"experts' alpha: {alphas}{target}; {setting.name} base {args.base}, {len(setting.prompts)} prompt(s)")
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
    print(f"report: {result['report']}")
    return 0
