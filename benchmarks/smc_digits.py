"""SMC on the blend vs FK steering on the demo's digits experts: oracle fraction vs network evaluations (README).

One weight per run (1 thread), experts cached by `dblend demo --out DEMO` (trained there first if missing or stale):

    PYTHONPATH=src python benchmarks/smc_digits.py 0.8 --samples 1024 --tilts auto,1,2,3 --seed 21
    PYTHONPATH=src python benchmarks/smc_digits.py 0.8 --samples 128 --potentials tweedie,experts,none --particles 4,8
    PYTHONPATH=src python benchmarks/smc_digits.py plot                # docs/images/smc_oracle_fraction.png
    PYTHONPATH=src python benchmarks/smc_digits.py table               # docs/evaluation.md's tables

Rows: DB-MPA, DB-MPA-LS, then for each N SMC on the blend (each potential and proposal tilt: ``auto``, the default,
learns the tilt from the run, docs/method.md; a number t blends the proposal at KL scale t x lambda, the target keeps
lambda), FK steering with N particles (``--same-n``) and FK steering with as many particles as give SMC's network
evaluations (3N: the blend costs 2 experts + the base per particle and step; the automatic tilt costs none).

The oracle: importance weighting of ``--oracle-samples`` base samples (default 200,000, generator seed 99991: a
seed no measurement uses), cached in the results folder; its gain's standard error is reported and is common to
every row of a weight (it scales all fractions alike). ``table`` also prints the issue-25 comparison: per w and N,
the default SMC's and FK's (equal NFE) distances to the oracle, their difference and its standard error
(independent samples: the root sum of squares).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from diffusion_blend.smc import SMCOptions

WEIGHTS = (0.2, 0.5, 0.8)
ORACLE_SEED = 99991
LABELS = {"mpa": "DB-MPA", "ls": "DB-MPA-LS", "smc": "SMC on blend (N=2,4,8,16)", "fk": "FK steering (same N)",
          "fk-equal": "FK steering (3N: equal NFE)"}


def results_path(results: Path, w: float) -> Path:
    return results / f"smc-digits-w{w}.json"


def tilt_value(text: str) -> float | str:
    return "auto" if text.strip() == "auto" else float(text)


def load_models(demo_dir: Path):
    import torch

    from diffusion_blend.testbeds.digits.config import DemoConfig
    from diffusion_blend.testbeds.digits.experts import ensure_demo_adapters
    from diffusion_blend.testbeds.digits.setting import load_demo_models

    torch.set_num_threads(1)
    demo = DemoConfig()
    return demo, load_demo_models(ensure_demo_adapters(demo_dir, demo, progress=False), demo, progress=False)


def oracle(models, demo, results: Path, samples: int) -> dict:
    """Base rewards' means and the IS oracle at each w of ``WEIGHTS`` (cached): ``{w: (base r_w, gain, gain se)}``."""
    import torch

    from diffusion_blend.evaluation.oracle import importance_weighted_oracle
    from diffusion_blend.preference import BASE, Preference
    from diffusion_blend.sampling import sample
    from diffusion_blend.testbeds.digits.data import IMAGE_SHAPE, to_image_space
    from diffusion_blend.testbeds.digits.model import digits_scheduler

    path = results / f"smc-digits-oracle-{samples}-s{ORACLE_SEED}.json"
    if path.exists():
        return {float(w): tuple(v) for w, v in json.loads(path.read_text()).items()}
    generator, values = torch.Generator().manual_seed(ORACLE_SEED), {name: [] for name in models.rewards}
    with torch.no_grad():
        for start in range(0, samples, 10_000):
            out = sample(models.family.member(BASE), digits_scheduler("ddim"), generator=generator,
                         shape=(min(10_000, samples - start), *IMAGE_SHAPE), num_inference_steps=10, progress=False)
            images = to_image_space(out.samples)
            for name, reward in models.rewards.items():
                values[name].append(reward(images).double())
    rewards = {name: torch.cat(v) for name, v in values.items()}
    table = {}
    for w in WEIGHTS:
        preference = Preference(demo.weights(w), 1.0)
        r_w = sum(v * rewards[n] for n, v in preference.weights.items())
        log_v = preference.kl_scale * r_w / demo.alpha
        p = torch.softmax(log_v, 0)
        target = float((p * r_w).sum())
        target_se = float(((p**2) * (r_w - target) ** 2).sum().sqrt())
        estimate = importance_weighted_oracle(rewards, preference, demo.alpha)
        assert abs(sum(v * estimate.expected_rewards[n] for n, v in preference.weights.items()) - target) < 1e-9
        table[w] = (float(r_w.mean()), target - float(r_w.mean()), target_se)
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(w): v for w, v in table.items()}))
    return table


def measure(w: float, samples: int, particles: list[int], potentials: list[str], tilts: list[float | str],
            seed: int, demo_dir: Path, results: Path, oracle_samples: int, same_n: bool) -> list[dict]:
    from diffusion_blend.denoisers import BlendedDenoiser, SwitchingDenoiser
    from diffusion_blend.evaluation.smc_study import members_per_particle
    from diffusion_blend.evaluation.stats import mean_and_standard_error
    from diffusion_blend.preference import Preference
    from diffusion_blend.sampling import sample
    from diffusion_blend.smc import smc_sample
    from diffusion_blend.testbeds.digits.data import IMAGE_SHAPE, to_image_space
    from diffusion_blend.testbeds.digits.model import digits_scheduler

    demo, models = load_models(demo_dir)
    base_rw, gain, gain_se = oracle(models, demo, results, oracle_samples)[w]
    preference = Preference(demo.weights(w), 1.0)

    def r_w(x):
        images = to_image_space(x)
        return sum(v * models.rewards[name](images).double() for name, v in preference.weights.items())

    rows = []

    def record(method, n, out_samples, nfe, potential=None, ess=None, reward_evaluations=None, tilt=None,
               tilts=None):
        mean, se = mean_and_standard_error(r_w(out_samples))
        rows.append(dict(method=method, w=w, particles=n, potential=potential, tilt=tilt, seed=seed, samples=samples,
                         fraction=(mean - base_rw) / gain, se=se / gain, oracle_gain=gain, oracle_gain_se=gain_se,
                         oracle_samples=oracle_samples, nfe=nfe, ess=ess, reward_evaluations=reward_evaluations,
                         tilts=tilts))
        print({k: v for k, v in rows[-1].items() if k != "tilts"}, flush=True)

    common = dict(generator=seed, shape=(samples, *IMAGE_SHAPE), num_inference_steps=10, progress=False)
    record("mpa", None, sample(BlendedDenoiser(models.family, preference), digits_scheduler("ddim"), **common).samples,
           20)
    record("ls", None, sample(SwitchingDenoiser(models.family, preference, 12), digits_scheduler("ddim"),
                              **common).samples, 10)
    runs = [("smc", "blend", 1, potential, tilt) for potential in potentials for tilt in tilts]
    equal = members_per_particle(models.family, preference)  # FK's particles per SMC particle at equal NFE
    runs += [("fk", "base", 1, "tweedie", None)] if same_n else []
    runs += [("fk-equal", "base", equal, "tweedie", None)]
    for n in particles:
        for method, proposal, factor, potential, tilt in runs:
            options = SMCOptions(particles=factor * n, proposal=proposal, potential=potential,
                                 proposal_tilt=1.0 if tilt is None else tilt)
            out = smc_sample(models.family, preference, digits_scheduler("ddim"), reward=r_w, alpha=demo.alpha,
                             options=options, **common)
            record(method, n, out.samples, out.network_evaluations, potential, float(out.final_ess.mean()),
                   out.reward_evaluations, tilt, out.tilts.tolist() if tilt == "auto" else None)
    return rows


def variant_of(row: dict) -> tuple[str, str]:
    """(potential, proposal tilt as text) of a result row (rows from before the tilt option: tilt 1)."""
    tilt = row.get("tilt")
    return row.get("potential") or "tweedie", "auto" if tilt == "auto" else f"{float(tilt or 1.0):g}"


def smc_suffix(potential: str, tilt: str) -> str:
    return f", {potential} potential" + (", automatic tilt (default)" if tilt == "auto" else f", tilt {tilt}")


def plot(results: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion_blend.evaluation.smc_study import STYLES, format_oracle_fraction_axis

    rows = [row for w in WEIGHTS for row in json.loads(results_path(results, w).read_text())]
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


def table(results: Path) -> str:
    """docs/evaluation.md's tables from the three weights' results."""
    rows = {w: json.loads(results_path(results, w).read_text()) for w in WEIGHTS}
    names = {"mpa": "DB-MPA", "ls": "DB-MPA-LS", "fk": "FK steering (same N)",
             "fk-equal": "FK steering (3N: equal NFE)"}
    keys = list(dict.fromkeys((r["method"], r["particles"], variant_of(r)) for r in rows[WEIGHTS[0]]))
    order = ["mpa", "ls", "smc", "fk", "fk-equal"]
    keys.sort(key=lambda k: (order.index(k[0]), (k[2][0], k[2][1] != "auto", k[2][1]) if k[0] == "smc" else "",
                             k[1] or 0))
    lines = ["| method | particles | NFE / sample | reward evaluations / sample | "
             + " | ".join(f"w = {w:g}" for w in WEIGHTS) + " | mean final ESS (w = 0.5) |",
             "| --- " * (5 + len(WEIGHTS)) + "|"]
    for method, n, variant in keys:
        found = {w: next(r for r in rows[w] if (r["method"], r["particles"], variant_of(r)) == (method, n, variant))
                 for w in WEIGHTS}
        first = found[WEIGHTS[0]]
        name = "SMC on blend" + smc_suffix(*variant) if method == "smc" else names[method]
        shown_n = "-" if n is None else str(round(first["nfe"] / 10) if method == "fk-equal" else n)
        rewards = first.get("reward_evaluations")
        ess = found[0.5]["ess"]
        lines.append(f"| {name} | {shown_n} | {first['nfe']:g} | {'-' if rewards is None else f'{rewards:g}'} | "
                     + " | ".join(f"{found[w]['fraction']:.3f} ± {found[w]['se']:.3f}" for w in WEIGHTS)
                     + f" | {'-' if ess is None else f'{ess:.1f}'} |")
    return "\n".join(lines) + "\n\n" + comparison(rows)


def comparison(rows: dict) -> str:
    """Default SMC vs FK steering at equal network evaluations: distances to the oracle (|fraction - 1|)."""
    lines = ["| w | N (SMC) / 3N (FK) | default SMC | FK, equal NFE | distance FK - SMC (se) | in se | "
             "both >= 0.98 |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for w in WEIGHTS:
        for smc in (r for r in rows[w] if r["method"] == "smc" and variant_of(r) == ("tweedie", "auto")):
            fk = next(r for r in rows[w] if r["method"] == "fk-equal" and r["particles"] == smc["particles"])
            gap = abs(fk["fraction"] - 1) - abs(smc["fraction"] - 1)
            se = math.hypot(smc["se"], fk["se"])
            both = abs(smc["fraction"] - 1) <= 0.02 and abs(fk["fraction"] - 1) <= 0.02
            lines.append(f"| {w:g} | {smc['particles']} / {fk['nfe'] / 10:g} | {smc['fraction']:.3f} ± "
                         f"{smc['se']:.3f} | {fk['fraction']:.3f} ± {fk['se']:.3f} | {gap:+.3f} ({se:.3f}) | "
                         f"{gap / se:+.1f} | {'yes' if both else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", help="a weight w in (0, 1), 'plot' or 'table'")
    parser.add_argument("--samples", type=int, default=128, help="output samples per point (default 128)")
    parser.add_argument("--particles", default="2,4,8,16", help="N values (default 2,4,8,16)")
    parser.add_argument("--potentials", default="tweedie", help="SMC potentials, comma-separated (default tweedie)")
    parser.add_argument("--tilts", default="auto", help="SMC proposal tilts, comma-separated: auto (the default) "
                        "and numbers")
    parser.add_argument("--same-n", action="store_true", help="also FK steering with N particles")
    parser.add_argument("--seed", type=int, default=11, help="generator seed of every point (default 11)")
    parser.add_argument("--demo-dir", type=Path, default=Path("runs/demo"), help="the demo's folder (its experts)")
    parser.add_argument("--results", type=Path, default=Path("runs"), help="folder of the results and the oracle")
    parser.add_argument("--oracle-samples", type=int, default=200_000, help="base samples of the IS oracle")
    parser.add_argument("--plot-out", type=Path, default=Path("docs/images/smc_oracle_fraction.png"))
    args = parser.parse_args()
    if args.what == "plot":
        plot(args.results, args.plot_out)
        return
    if args.what == "table":
        print(table(args.results))
        return
    w = float(args.what)
    rows = measure(w, args.samples, [int(n) for n in args.particles.split(",")], args.potentials.split(","),
                   [tilt_value(t) for t in args.tilts.split(",")], args.seed, args.demo_dir, args.results,
                   args.oracle_samples, args.same_n)
    args.results.mkdir(parents=True, exist_ok=True)
    results_path(args.results, w).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":  # the experts train in a spawned process pool when missing or stale
    main()
