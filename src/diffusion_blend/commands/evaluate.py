"""``dblend evaluate``: sweep methods x preferences x seeds on a setting; CSV/JSON/PNG/HTML (paper section 6).

Resumable (finished cells are skipped) and splittable across processes: ``torchrun --nproc_per_node N -m
diffusion_blend.cli evaluate ...`` or ``accelerate launch``.
"""

from __future__ import annotations

import argparse

from ..errors import DiffusionBlendError


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
    parser.add_argument("--setting", default="gmm", help="model family and rewards (gmm)")
    parser.add_argument("--out", required=True, help="output folder (cells/, results.csv/json, *.png, summary.html)")
    parser.add_argument("--methods", default="base,mpa,ls,code,rgg,is-oracle,morl",
                        help="comma-separated, from: base, mpa, ls, rs-factors, rs-deltas, code, rgg, is-oracle, "
                        "morl (docs/evaluation.md)")
    parser.add_argument("--weights", help="preferences 'a=0.2,b=0.8;a=0.5,b=0.5' (overrides --grid)")
    parser.add_argument("--grid", type=int, default=5, help="evenly spaced w for two rewards (default 5 points)")
    parser.add_argument("--kl-scales", default="1", help="KL scales lambda, comma-separated (default 1)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--samples-per-seed", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (DDIM, eta = 1)")
    parser.add_argument("--alpha", type=float, default=1.0, help="the experts' KL weight alpha")
    parser.add_argument("--code-candidates", type=int, default=20)
    parser.add_argument("--code-block-size", type=int, default=5)
    parser.add_argument("--rgg-scale", type=float, default=1.0)
    parser.add_argument("--rgg-normalize", action="store_true", help="L2-normalise each reward gradient (dim 1)")
    parser.add_argument("--no-rgg-tempering", action="store_true")
    parser.add_argument("--oracle-samples", type=int, default=20_000)
    parser.add_argument("--particles", type=int, default=8, help="SMC particles per sample (methods smc, fk)")
    parser.add_argument("--fk-particles", type=int, help="FK steering's particles (default: --particles)")
    parser.add_argument("--smc-potential", default="tweedie", choices=("tweedie", "none"),
                        help="look-ahead potential h_k: r_w of the Tweedie estimate x0_hat(x_k), or 0")
    parser.add_argument("--smc-potential-every", type=int, default=1, help="evaluate the potential every k steps")
    parser.add_argument("--smc-ess-threshold", type=float, default=0.5,
                        help="resample a sample's particles when their ESS < threshold x N (0: never; 1: always)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.sweep import SETTINGS, SweepConfig, parse_preference_grid, run_sweep

    if args.setting not in SETTINGS:
        raise DiffusionBlendError(f"unknown --setting {args.setting!r}; choose from {', '.join(sorted(SETTINGS))}")
    setting = SETTINGS[args.setting](num_inference_steps=args.steps, alpha=args.alpha)
    preferences = parse_preference_grid(list(setting.rewards), args.weights, args.grid, _floats(args.kl_scales))
    config = SweepConfig(
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        preferences=preferences,
        seeds=_ints(args.seeds),
        samples_per_seed=args.samples_per_seed,
        code_candidates=args.code_candidates,
        code_block_size=args.code_block_size,
        rgg_scale=args.rgg_scale,
        rgg_normalize=args.rgg_normalize,
        rgg_tempering=not args.no_rgg_tempering,
        oracle_samples=args.oracle_samples,
        particles=args.particles,
        fk_particles=args.fk_particles,
        smc_potential=args.smc_potential,
        smc_potential_every=args.smc_potential_every,
        smc_ess_threshold=args.smc_ess_threshold,
    )
    result = run_sweep(setting, config, args.out, progress=not args.no_progress)
    if result is None:  # not rank 0
        return 0
    print(f"{result['cells_run']} cell(s) computed; results in {args.out}")
    names = result["reward_names"]
    print(f"{'method':>10s}  {'weights':>24s}  {'λ':>4s}  {'r_w':>8s}  {'Δr_w':>8s}  {'win':>5s}  {'NFE':>6s}  {'ESS':>6s}")
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
