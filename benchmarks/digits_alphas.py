"""Experts of different KL weights on the digits testbed (issue 22, docs/evaluation.md "Experts of different alphas").

The demo's recipe trains ``ink`` at alpha 0.03 and ``digit_prob_3`` at alpha 0.03 and at 0.06 (cached under
``--demo-dir`` and ``--demo-dir``-alpha0.06). For w = 0.2 / 0.5 / 0.8 (weight of ink, lambda = 1) it measures DB-MPA
(and DB-MPA-LS) as a fraction of the importance-weighted oracle of the target the blend states
(:class:`~diffusion_blend.preference.BlendTarget`), three ways:

- ``equal``: both experts at 0.03 (the paper's setting; the demo's numbers);
- ``mixed``: ink at 0.03, digit_prob_3 at 0.06, each expert's own alpha (the target weights reward i by w_i / alpha_i);
- ``mixed, target 0.03``: the same experts rescaled to serve p_pre exp(lambda r_w / 0.03).

The gain is measured in the target's own reward ``sum_i u_i r_i`` (``u``: the target's implied weights, normalised to
sum 1), from the same seeds for every method; the oracle reweights ``--oracle-samples`` base samples.

    PYTHONPATH=src python benchmarks/digits_alphas.py --demo-dir runs/demo --seeds 20,21,22,23 --samples-per-seed 512
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffusion_blend.evaluation.sweep import SweepConfig, run_sweep
from diffusion_blend.preference import BlendTarget, Preference
from diffusion_blend.testbeds.digits.config import DemoConfig
from diffusion_blend.testbeds.digits.experts import ensure_demo_adapters
from diffusion_blend.testbeds.digits.setting import digits_setting, load_demo_models

WEIGHTS = (0.2, 0.5, 0.8)


def fraction(result: dict, target: BlendTarget, method: str) -> tuple[float, float]:
    """Gain of ``method`` in the target's reward over the base, as a fraction of the oracle's, and its standard error
    (delta method: the method's and the base's standard errors; the oracle's own error is reported apart)."""
    implied = target.implied_weights()
    total = sum(implied.values())
    u = {name: value / total for name, value in implied.items()}
    prefs = target.preference

    def row(name: str) -> dict:
        return next(r for r in result["rows"] if r["method"] == name and (name == "base" or (
            r["weights"] == dict(prefs.weights) and r["kl_scale"] == prefs.kl_scale)))

    def mean(r: dict) -> float:
        return sum(u[n] * r[f"mean_{n}"] for n in u)

    base, oracle, measured = row("base"), row("is-oracle"), row(method)
    gain, oracle_gain = mean(measured) - mean(base), mean(oracle) - mean(base)
    se = sum(u[n] ** 2 * measured[f"se_{n}"] ** 2 for n in u) ** 0.5
    return gain / oracle_gain, se / abs(oracle_gain)


def run(label: str, paths: dict, alphas: dict, target_alpha: float | None, args: argparse.Namespace,
        demo: DemoConfig) -> list[dict]:
    models = load_demo_models(paths, demo, progress=False)
    setting = digits_setting(models, demo)
    setting.alpha, setting.alphas, setting.target_alpha = None, alphas, target_alpha
    preferences = [Preference(demo.weights(w), 1.0) for w in WEIGHTS]
    # DB-MPA-LS draws by the blend's coefficients: where a target alpha pushes one above 1 the base's goes negative
    switching = all(setting.target(p).blend().coefficients(list(p.weights)).is_convex for p in preferences)
    methods = ("base", "mpa", "ls", "is-oracle") if switching else ("base", "mpa", "is-oracle")
    config = SweepConfig(methods=methods, preferences=preferences,
                         seeds=tuple(args.seeds), samples_per_seed=args.samples_per_seed,
                         oracle_samples=args.oracle_samples)
    result = run_sweep(setting, config, Path(args.out) / label.replace(" ", "_").replace(",", ""), progress=False)
    rows = []
    for w, preference in zip(WEIGHTS, preferences):
        target = setting.target(preference)
        oracle = next(r for r in result["rows"] if r["method"] == "is-oracle" and r["weights"] == preference.weights)
        for method in ("mpa", "ls") if switching else ("mpa",):
            value, se = fraction(result, target, method)
            rows.append({"case": label, "w": w, "method": method, "fraction": value, "se": se,
                         "target": target.describe()["target"], "oracle_ess": oracle.get("effective_sample_size")})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", default="runs/demo")
    parser.add_argument("--out", default="runs/digits-alphas")
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[20, 21, 22, 23])
    parser.add_argument("--samples-per-seed", type=int, default=512)
    parser.add_argument("--oracle-samples", type=int, default=20_000)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    demo, strong = DemoConfig(), DemoConfig(alpha=0.06)
    low = ensure_demo_adapters(args.demo_dir, demo, progress=False, log=lambda m: print(m, file=sys.stderr))
    high = ensure_demo_adapters(f"{args.demo_dir}-alpha0.06", strong, progress=False,
                                log=lambda m: print(m, file=sys.stderr))
    mixed = {"ink": low["ink"], "digit_prob_3": high["digit_prob_3"]}
    rows = run("equal", low, {"ink": 0.03, "digit_prob_3": 0.03}, None, args, demo)
    rows += run("mixed", mixed, {"ink": 0.03, "digit_prob_3": 0.06}, None, args, demo)
    rows += run("mixed, target 0.03", mixed, {"ink": 0.03, "digit_prob_3": 0.06}, 0.03, args, demo)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "digits_alphas.json").write_text(json.dumps(rows, indent=1))
    print("| case | method | w = 0.2 | w = 0.5 | w = 0.8 | target at w = 0.5 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case in ("equal", "mixed", "mixed, target 0.03"):
        for method in ("mpa", "ls"):
            cells = [r for r in rows if r["case"] == case and r["method"] == method]
            if not cells:  # DB-MPA-LS with a negative coefficient
                print(f"| {case} | DB-MPA-LS | n/a (a negative blend coefficient) | | | |")
                continue
            values = " | ".join(f"{r['fraction']:.3f} ± {r['se']:.3f}" for r in cells)
            print(f"| {case} | {'DB-MPA' if method == 'mpa' else 'DB-MPA-LS'} | {values} | {cells[1]['target']} |")
    print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
