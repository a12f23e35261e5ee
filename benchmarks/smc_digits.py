"""SMC on the blend vs FK steering on the demo's digits experts: oracle fraction vs network evaluations (README).

One weight per run (1 thread, about a minute at 128 samples on a quiet core), experts cached by
`dblend demo --out runs/demo` (trained there first if missing or stale):

    PYTHONPATH=src python benchmarks/smc_digits.py 0.2 --samples 128   # then 0.5 and 0.8
    PYTHONPATH=src python benchmarks/smc_digits.py 0.8 --samples 128 --potentials tweedie,experts,none --particles 4,8
    PYTHONPATH=src python benchmarks/smc_digits.py 0.8 --samples 512 --tilts 1,2,3   # over-tilted proposals too
    PYTHONPATH=src python benchmarks/smc_digits.py plot                # docs/images/smc_oracle_fraction.png
    PYTHONPATH=src python benchmarks/smc_digits.py table               # the README's markdown table

Rows: DB-MPA, DB-MPA-LS, then for each N SMC on the blend (each potential and proposal tilt: the proposal blends at
KL scale tilt x lambda, the target keeps lambda), FK steering with N particles and FK
steering with as many particles as give SMC's network evaluations (3N: the blend costs 2 experts + the base per
particle and step).
The oracle's gain and the base's mean r_w come from the demo report (IS over its 20,000 base samples).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusion_blend.smc import SMCOptions

RUNS = Path("runs")
WEIGHTS = (0.2, 0.5, 0.8)
LABELS = {"mpa": "DB-MPA", "ls": "DB-MPA-LS", "smc": "SMC on blend (N=2,4,8,16)", "fk": "FK steering (same N)",
          "fk-equal": "FK steering (3N: equal NFE)"}


def results_path(w: float) -> Path:
    return RUNS / f"smc-digits-w{w}.json"


def measure(w: float, samples: int, particles: list[int], potentials: list[str], tilts: list[float],
            seed: int = 11) -> list[dict]:
    import torch

    from diffusion_blend.denoisers import BlendedDenoiser, SwitchingDenoiser
    from diffusion_blend.evaluation.smc_study import members_per_particle
    from diffusion_blend.evaluation.stats import mean_and_standard_error
    from diffusion_blend.preference import Preference
    from diffusion_blend.sampling import sample
    from diffusion_blend.smc import smc_sample
    from diffusion_blend.testbeds.digits.config import DemoConfig
    from diffusion_blend.testbeds.digits.data import IMAGE_SHAPE, to_image_space
    from diffusion_blend.testbeds.digits.experts import ensure_demo_adapters
    from diffusion_blend.testbeds.digits.model import digits_scheduler
    from diffusion_blend.testbeds.digits.setting import load_demo_models

    torch.set_num_threads(1)
    demo = DemoConfig()
    models = load_demo_models(ensure_demo_adapters(RUNS / "demo", demo, progress=False), demo, progress=False)
    points = json.loads((RUNS / "demo" / "report" / "results.json").read_text())["points"]
    preference = Preference(demo.weights(w), 1.0)
    mpa = next(p for p in points if p["method"] == "DB-MPA" and abs(p["w"] - w) < 1e-9)
    gain = mpa["oracle_gain_weighted_reward"]
    base_rw = mpa["oracle_weighted_reward"] - gain

    def r_w(x):
        images = to_image_space(x)
        return sum(v * models.rewards[name](images).double() for name, v in preference.weights.items())

    rows = []

    def record(method, n, out_samples, nfe, potential=None, ess=None, reward_evaluations=None, tilt=None):
        mean, se = mean_and_standard_error(r_w(out_samples))
        rows.append(dict(method=method, w=w, particles=n, potential=potential, tilt=tilt,
                         fraction=(mean - base_rw) / gain, se=se / gain, nfe=nfe, ess=ess,
                         reward_evaluations=reward_evaluations))
        print(rows[-1], flush=True)

    shape = (samples, *IMAGE_SHAPE)
    common = dict(generator=seed, shape=shape, num_inference_steps=10, progress=False)
    record("mpa", None, sample(BlendedDenoiser(models.family, preference), digits_scheduler("ddim"), **common).samples,
           20)
    record("ls", None, sample(SwitchingDenoiser(models.family, preference, 12), digits_scheduler("ddim"),
                              **common).samples, 10)
    runs = [("smc", "blend", 1, potential, tilt) for potential in potentials for tilt in tilts]
    equal = members_per_particle(models.family, preference)  # FK's particles per SMC particle at equal NFE
    runs += [("fk", "base", 1, "tweedie", None), ("fk-equal", "base", equal, "tweedie", None)]
    for n in particles:
        for method, proposal, factor, potential, tilt in runs:
            out = smc_sample(
                models.family,
                preference,
                digits_scheduler("ddim"),
                reward=r_w,
                alpha=demo.alpha,
                options=SMCOptions(
                    particles=factor * n, proposal=proposal, potential=potential, proposal_tilt=tilt or 1.0
                ),
                **common,
            )
            record(method, n, out.samples, out.network_evaluations, potential, float(out.final_ess.mean()),
                   out.reward_evaluations, tilt)
    return rows


def variant_of(row: dict) -> tuple[str, float]:
    """(potential, proposal tilt) of a result row (rows from before the tilt option: tilt 1)."""
    return row.get("potential") or "tweedie", float(row.get("tilt") or 1.0)


def smc_suffix(potential: str, tilt: float) -> str:
    return f", {potential} potential" + ("" if tilt == 1.0 else f", tilt {tilt:g}")


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion_blend.evaluation.smc_study import STYLES, format_oracle_fraction_axis

    rows = [row for w in WEIGHTS for row in json.loads(results_path(w).read_text())]
    fig, axes = plt.subplots(1, len(WEIGHTS), figsize=(15, 4))
    for ax, w in zip(axes, WEIGHTS):
        for method, style in STYLES.items():
            for variant in sorted({variant_of(r) for r in rows if r["method"] == method}):
                points = sorted((r for r in rows if r["method"] == method and r["w"] == w
                                 and variant_of(r) == variant), key=lambda r: r["nfe"])
                label = LABELS[method] + (smc_suffix(*variant) if method == "smc" else "")
                ax.errorbar([p["nfe"] for p in points], [p["fraction"] for p in points],
                            yerr=[p["se"] for p in points], fmt=style, label=label, capsize=2, ms=5)
        format_oracle_fraction_axis(ax, f"digits (ink vs digit_prob_3), w = {w:g}")
    fig.savefig(out, dpi=100, bbox_inches="tight")
    print(f"wrote {out}")


def table() -> str:
    """The README / docs/evaluation.md table from the three weights' results."""
    rows = {w: json.loads(results_path(w).read_text()) for w in WEIGHTS}
    names = {"mpa": "DB-MPA", "ls": "DB-MPA-LS", "fk": "FK steering (same N)",
             "fk-equal": "FK steering (3N: equal NFE)"}
    keys = list(dict.fromkeys((r["method"], r["particles"], variant_of(r)) for r in rows[WEIGHTS[0]]))
    order = ["mpa", "ls", "smc", "fk", "fk-equal"]
    keys.sort(key=lambda k: (order.index(k[0]), k[2] if k[0] == "smc" else ("", 0.0), k[1] or 0))
    lines = ["| method | particles | NFE / sample | reward evaluations / sample | "
             + " | ".join(f"w = {w:g}" for w in WEIGHTS) + " | mean final ESS (w = 0.5) |",
             "| --- " * (5 + len(WEIGHTS)) + "|"]
    for method, n, variant in keys:
        found = {w: next(r for r in rows[w] if (r["method"], r["particles"], variant_of(r)) == (method, n, variant))
                 for w in WEIGHTS}
        first = found[WEIGHTS[0]]
        name = "SMC on blend" + smc_suffix(*variant) if method == "smc" else names[method]
        if (
            method == "fk-equal"
        ):  # FK has one member per particle: its particles are its NFE over FK-at-N's per particle
            same_n = next(r for r in rows[WEIGHTS[0]] if r["method"] == "fk" and r["particles"] == n)
            n = round(first["nfe"] / same_n["nfe"] * n)
        shown_n = "-" if n is None else str(n)
        rewards = first.get("reward_evaluations")
        ess = found[0.5]["ess"]
        lines.append(f"| {name} | {shown_n} | {first['nfe']:g} | {'-' if rewards is None else f'{rewards:g}'} | "
                     + " | ".join(f"{found[w]['fraction']:.3f} ± {found[w]['se']:.3f}" for w in WEIGHTS)
                     + f" | {'-' if ess is None else f'{ess:.1f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", help="a weight w in (0, 1), 'plot' or 'table'")
    parser.add_argument("--samples", type=int, default=128, help="output samples per point (default 128)")
    parser.add_argument("--particles", default="2,4,8,16", help="N values (default 2,4,8,16)")
    parser.add_argument("--potentials", default="tweedie", help="SMC potentials, comma-separated (default tweedie)")
    parser.add_argument("--out", default=None, help="results file of a weight run (default runs/smc-digits-wW.json, "
                        "what plot and table read)")
    parser.add_argument("--seed", type=int, default=11, help="generator seed of every point (default 11)")
    parser.add_argument("--tilts", default="1", help="SMC proposal tilts, comma-separated (default 1: the blend)")
    args = parser.parse_args()
    if args.what == "plot":
        plot(Path("docs/images/smc_oracle_fraction.png"))
        return
    if args.what == "table":
        print(table())
        return
    w = float(args.what)
    rows = measure(w, args.samples, [int(n) for n in args.particles.split(",")], args.potentials.split(","),
                   [float(t) for t in args.tilts.split(",")], args.seed)
    Path(args.out or results_path(w)).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":  # the experts train in a spawned process pool when missing or stale
    main()
