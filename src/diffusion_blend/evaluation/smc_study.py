"""SMC on the blend vs FK steering: the gain in ``r_w`` over the base as a fraction of the exact target's gain, against
network evaluations per sample (docs/evaluation.md, "SMC on the blend").

For every weight ``w`` (``lambda = 1``) and every particle count ``N``, one shared sweep
(:func:`~diffusion_blend.evaluation.sweep.run_sweep`, resumable cells under ``<out>/n<N>/``) runs the base,
DB-MPA, DB-MPA-LS, SMC with the blend as proposal (``smc``) and FK steering (``fk``: the base as proposal) at the
same ``N``; a second sweep (``<out>/fk-equal-n<N>/``) runs FK steering with as many particles as give SMC's network
evaluations (``N x`` the blend's members plus the base). The target's gain comes from the setting's oracle: on
digits the importance-weighted oracle over the demo's base samples (the same estimate the demo's checks use), on
the Gaussian mixture importance weighting of 200,000 draws of the base sampler's chain (SMC's target; the closed
form of the continuous-time target with ``oracle="exact"``). SMC runs with the sweep's proposal tilt
(``proposal_tilt``: ``"auto"`` by default). Outputs: ``smc_study.csv`` / ``.json`` / ``.md`` and
``oracle_fraction.png``.

    dblend smc-study --setting digits --out runs/smc-study-digits --demo-dir runs/demo
    dblend smc-study --setting gmm --out runs/smc-study-gmm
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffusion_blend.denoisers import DenoiserFamily
from diffusion_blend.evaluation.sweep import Setting, SweepConfig, run_sweep
from diffusion_blend.preference import BASE, Preference

STYLES = {"mpa": "o", "ls": "s", "smc": "o-", "fk": "^--", "fk-equal": "v:"}  # matplotlib format per method
LABELS = {"mpa": "DB-MPA", "ls": "DB-MPA-LS", "smc": "SMC on blend", "fk": "FK steering (same N)",
          "fk-equal": "FK steering (equal NFE)"}


@dataclass(frozen=True)
class SMCStudyConfig:
    weights: tuple[float, ...] = (0.2, 0.5, 0.8)
    particles: tuple[int, ...] = (2, 4, 8, 16)
    seeds: tuple[int, ...] = (0, 1)
    samples_per_seed: int = 256
    equal_nfe: bool = True
    potential: str = "tweedie"
    proposal_tilt: float | str = "auto"


def members_per_particle(family: DenoiserFamily, preference: Preference) -> int:
    """Members SMC evaluates per particle and step: the blend's active members plus the base if it is not one."""
    active = [m for m, _ in preference.coefficients(family.expert_names).active()]
    return len(active) + (BASE not in active)


def run_smc_study(setting: Setting, preferences: Sequence[Preference], base_reward: Mapping[float, float],
                  oracle_gain: Mapping[float, float], first_reward: str, out_dir: str | Path, config: SMCStudyConfig,
                  progress: bool = True) -> list[dict]:
    """One row per (method, w, N) with the gain in ``r_w``, its oracle fraction, NFE, reward evaluations and ESS.

    Gains are measured from ``base_reward[w]``, the same base ``r_w`` the oracle's gain is measured from (the
    Gaussian mixture's 200,000 chain draws, or its closed form; on digits the demo's base samples), not from the
    sweep's own base cells (a few hundred samples per seed): one baseline for both ends of the ratio."""
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []
    common = dict(preferences=list(preferences), seeds=list(config.seeds), samples_per_seed=config.samples_per_seed,
                  oracle_samples=2, smc_potential=config.potential, smc_proposal_tilt=config.proposal_tilt)
    done_blends = False
    for n in config.particles:
        methods = ("base", "smc", "fk") if done_blends else ("base", "mpa", "ls", "smc", "fk")
        result = run_sweep(
            setting, SweepConfig(methods=methods, particles=n, **common), out / f"n{n}", progress=progress
        )
        sweeps = [("", result)]
        if config.equal_nfe:
            members = members_per_particle(setting.family, preferences[0])
            equal = run_sweep(setting, SweepConfig(methods=("base", "fk"), particles=n, fk_particles=members * n,
                                                   **common), out / f"fk-equal-n{n}", progress=progress)
            sweeps.append(("-equal", equal))
        for suffix, res in sweeps:
            for row in res["rows"]:
                if row["method"] in ("base", "is-oracle") or (done_blends and row["method"] in ("mpa", "ls")):
                    continue
                w = float(row["weights"][first_reward])
                method = row["method"] + suffix
                rows.append(
                    {
                        "method": method,
                        "label": LABELS[method],
                        "w": w,
                        "particles": row.get("particles"),
                        "smc_particles": n if method != "mpa" and method != "ls" else None,
                        "weighted_reward": row["weighted_reward"],
                        "se_weighted_reward": row["se_weighted_reward"],
                        "gain": row["weighted_reward"] - base_reward[w],
                        "oracle_gain": oracle_gain[w],
                        "oracle_fraction": (row["weighted_reward"] - base_reward[w]) / oracle_gain[w],
                        "oracle_fraction_se": row["se_weighted_reward"] / abs(oracle_gain[w]),
                        "network_evaluations_per_sample": row["network_evaluations_per_sample"],
                        "reward_evaluations_per_sample": row.get("reward_evaluations_per_sample"),
                        "final_ess_mean": row.get("final_ess_mean"),
                        "wall_time_per_sample": row["wall_time_per_sample"],
                    }
                )
        done_blends = True
    write_outputs(rows, out, config)
    return rows


COLUMNS = ["method", "w", "particles", "smc_particles", "weighted_reward", "se_weighted_reward", "gain", "oracle_gain",
           "oracle_fraction", "oracle_fraction_se", "network_evaluations_per_sample", "reward_evaluations_per_sample",
           "final_ess_mean", "wall_time_per_sample"]


def write_outputs(rows: Sequence[Mapping[str, Any]], out: Path, config: SMCStudyConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion_blend.evaluation.plots import save_figure

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "smc_study.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "smc_study.json").write_text(json.dumps({"config": asdict(config), "rows": list(rows)}, indent=1))
    lines = ["| method | N | " + " | ".join(f"w={w:g}: fraction (NFE)" for w in config.weights) + " |",
             "| --- | --- |" + " --- |" * len(config.weights)]
    keys = sorted({(r["method"], r["particles"]) for r in rows}, key=lambda k: (list(LABELS).index(k[0]), k[1] or 0))
    for method, particles in keys:
        cells = []
        for w in config.weights:
            match = [
                r for r in rows if r["method"] == method and r["particles"] == particles and abs(r["w"] - w) < 1e-9
            ]
            cells.append(f"{match[0]['oracle_fraction']:.2f} ± {match[0]['oracle_fraction_se']:.2f} "
                         f"({match[0]['network_evaluations_per_sample']:.0f})" if match else "")
        lines.append(f"| {LABELS[method]} | {particles or '-'} | " + " | ".join(cells) + " |")
    (out / "smc_study.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, len(config.weights), figsize=(5 * len(config.weights), 4), squeeze=False)
    for ax, w in zip(axes[0], config.weights):
        for method, style in STYLES.items():
            points = sorted((r for r in rows if r["method"] == method and abs(r["w"] - w) < 1e-9),
                            key=lambda r: r["network_evaluations_per_sample"])
            if points:
                ax.errorbar([p["network_evaluations_per_sample"] for p in points],
                            [p["oracle_fraction"] for p in points], yerr=[p["oracle_fraction_se"] for p in points],
                            fmt=style, label=LABELS[method], capsize=2, ms=5)
        format_oracle_fraction_axis(ax, f"w = {w:g}")
    save_figure(fig, out / "oracle_fraction.png")


def format_oracle_fraction_axis(ax: Any, title: str) -> None:
    """Oracle fraction against network evaluations (log scale), with the exact target (1) and the 0.9 bar."""
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.axhline(0.9, color="C3", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("gain in r_w / IS oracle's gain")
    ax.set_title(title)
    ax.legend(fontsize=7)
