"""Plots of a sweep (matplotlib, Agg backend): Pareto fronts, weighted reward vs w, reward vs lambda (paper 6.1)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

from diffusion_blend.files import atomic_path

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig: Any, path: Path) -> str:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path.name


def _methods(rows: list[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(row["method"] for row in rows))


def plot_fronts(result: Mapping[str, Any], path: Path) -> str:
    """Mean rewards (first two objectives) of every (method, preference) and each method's Pareto front."""
    names, rows = result["reward_names"], result["rows"]
    first, second = names[0], names[1] if len(names) > 1 else names[0]
    fig, ax = plt.subplots(figsize=(6, 5))
    for method in _methods(rows):
        mine = [r for r in rows if r["method"] == method]
        xs, ys = [r[f"mean_{first}"] for r in mine], [r[f"mean_{second}"] for r in mine]
        (line,) = ax.plot(xs, ys, "o", alpha=0.6, label=method)
        front = sorted(result["fronts"][method]["points"])
        ax.plot([p[0] for p in front], [p[min(1, len(p) - 1)] for p in front], "-", color=line.get_color(), lw=1.2)
    ax.set_xlabel(f"mean {first}")
    ax.set_ylabel(f"mean {second}")
    ax.set_title("Pareto fronts (points: preferences; lines: non-dominated)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_weighted_reward_vs_weight(result: Mapping[str, Any], path: Path) -> str:
    """Weighted reward r_w (with standard errors) against the first reward's weight, per method and KL scale."""
    first, rows = result["reward_names"][0], result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in _methods(rows):
        for kl_scale in sorted({r["kl_scale"] for r in rows if r["method"] == method}):
            mine = sorted((r for r in rows if r["method"] == method and r["kl_scale"] == kl_scale),
                          key=lambda r: r["weights"].get(first, 0.0))
            ax.errorbar([r["weights"].get(first, 0.0) for r in mine], [r["weighted_reward"] for r in mine],
                        yerr=[r["se_weighted_reward"] or 0.0 for r in mine], marker="o", capsize=2,
                        label=f"{method} (λ={kl_scale:g})")
    ax.set_xlabel(f"weight of {first}")
    ax.set_ylabel("weighted reward r_w")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_reward_vs_kl_scale(result: Mapping[str, Any], path: Path) -> str:
    """Weighted reward against the KL scale lambda, one line per (method, weights)."""
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in _methods(rows):
        mine = [r for r in rows if r["method"] == method]
        for weights in {tuple(sorted(r["weights"].items())) for r in mine}:
            line = sorted(
                (r for r in mine if tuple(sorted(r["weights"].items())) == weights), key=lambda r: r["kl_scale"]
            )
            label = f"{method} " + ",".join(f"{n}={w:g}" for n, w in weights)
            ax.plot([r["kl_scale"] for r in line], [r["weighted_reward"] for r in line], "o-", label=label)
    ax.set_xlabel("KL scale λ")
    ax.set_ylabel("weighted reward r_w")
    ax.legend(fontsize=6)
    return save_figure(fig, path)


def write_plots(result: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
    """Write the plots that carry information into ``out_dir`` (the fronts with two or more rewards, ``r_w`` against
    the weight with two or more weights, against lambda with two or more lambdas); returns their file names by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    weights = {tuple(sorted(r["weights"].items())) for r in rows if r["method"] != "base"}
    first = result["reward_names"][0]
    plots = {}
    if len(result["reward_names"]) > 1:
        plots["fronts"] = plot_fronts(result, out_dir / "fronts.png")
    if len({dict(w).get(first, 0.0) for w in weights}) > 1:
        plots["weighted_reward_vs_w"] = plot_weighted_reward_vs_weight(result, out_dir / "weighted_reward_vs_w.png")
    if len({r["kl_scale"] for r in rows if r["method"] != "base"}) > 1:
        plots["reward_vs_lambda"] = plot_reward_vs_kl_scale(result, out_dir / "reward_vs_lambda.png")
    return plots
