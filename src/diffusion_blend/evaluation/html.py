"""A self-contained HTML summary of a sweep: tables, the plots and (image settings) an image grid of a few samples
per cell, all linked relatively; no scripts, no network."""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from diffusion_blend.files import atomic_path, write_text_atomic

THUMBNAIL = 96  # pixels: the longer side of each preview image (keeps a report of many cells small)


def write_image_strip(images: torch.Tensor, path: str | os.PathLike, size: int = THUMBNAIL) -> Path:
    """Images ``(B, C, H, W)`` in ``[0, 1]`` side by side as one PNG, each shrunk to at most ``size`` pixels
    (PIL, bicubic), written atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    pictures = [Image.fromarray(p.permute(1, 2, 0).contiguous().numpy()) for p in pixels[:, :3]]
    scale = min(1.0, size / max(pictures[0].size))  # shrink large images, never enlarge small ones
    width, height = (max(1, round(d * scale)) for d in pictures[0].size)
    strip = Image.new("RGB", (width * len(pictures) + 2 * (len(pictures) - 1), height), (255, 255, 255))
    for index, picture in enumerate(pictures):
        strip.paste(picture.resize((width, height), Image.Resampling.BICUBIC), (index * (width + 2), 0))
    with atomic_path(path, suffix=".png") as tmp:
        strip.save(tmp, format="PNG", optimize=True)
    return path


def format_cell(value: Any) -> str:
    """A table cell: '–' for None, 4 significant digits for floats, HTML-escaped text otherwise."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


PLOT_CAPTIONS = {
    "fronts": "Mean rewards of every method and preference; lines: each method's Pareto front",
    "weighted_reward_vs_w": "Weighted reward r_w (± se) against the first reward's weight, per method and λ",
    "reward_vs_lambda": "Weighted reward r_w against the KL scale λ, per method and weights",
}
ORACLE_NOTE = ("<p><b>is-oracle</b> is the exact target p<sub>pre</sub> exp(λ r<sub>w</sub> / α) itself, estimated by "
               "self-normalised importance weighting of base samples: what every method aims at, not an upper bound "
               "on reward (a method that overshoots the KL term can score above it; one that scores below falls short "
               "of its target). Its standard errors grow as the weights concentrate.</p>")


def setting_lines(setting: Mapping[str, Any]) -> dict[str, Any]:
    """The setting as labelled lines (name, the options that define it, the sampler, the experts' alphas)."""
    lines: dict[str, Any] = {"setting": setting.get("name")}
    lines.update(setting.get("options") or {})
    lines["steps"] = setting.get("num_inference_steps")
    lines["sampler noise (eta)"] = setting.get("eta")
    lines["experts' alpha"] = setting.get("alphas") or setting.get("alpha")
    target_alpha = setting.get("target_alpha")
    if target_alpha is not None:
        lines["target alpha"] = target_alpha
        lines["each preference's target"] = (f"p_pre exp(λ Σ_i w_i r_i / {target_alpha:g}): the coefficients are "
                                             f"λ w_i α_i / {target_alpha:g}")
    else:
        lines["each preference's target"] = ("p_pre exp(λ Σ_i w_i r_i / α_i): reward i weighs w_i / α_i "
                                             "(docs/method.md, experts with different KL weights)")
    return lines


def definition_list(values: Mapping[str, Any]) -> str:
    """Labelled values as an HTML definition list; dicts and lists written out as ``key: value`` text."""

    def text(value: Any) -> str:
        if isinstance(value, Mapping):
            return "; ".join(f"{k}: {text(v)}" for k, v in value.items()) or "–"
        if isinstance(value, list | tuple):
            return ", ".join(text(v) for v in value) or "–"
        return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    return "<dl>" + "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(text(v))}</dd>"
                            for k, v in values.items()) + "</dl>"


def render_html(result: Mapping[str, Any]) -> str:
    """The summary page as a string (escapes every value)."""
    names = result["reward_names"]
    head = ["method", "weights", "λ", *[f"{n} (± se)" for n in names], *[f"Δ{n}" for n in names],
            "r_w (± se)", "Δr_w", "win rate", "NFE / sample", "s / sample"]
    rows_html = []
    for row in result["rows"]:
        weights = ", ".join(f"{n}={w:g}" for n, w in row["weights"].items())
        cells = [html.escape(row["method"]), html.escape(weights), format_cell(row["kl_scale"])]
        cells += [f"{format_cell(row[f'mean_{n}'])} ± {format_cell(row[f'se_{n}'])}" for n in names]
        cells += [format_cell(row[f"gain_{n}"]) for n in names]
        cells += [
            f"{format_cell(row['weighted_reward'])} ± {format_cell(row['se_weighted_reward'])}",
            format_cell(row["gain_weighted_reward"]),
            format_cell(row["win_rate"]),
            format_cell(row["network_evaluations_per_sample"]),
            format_cell(row["wall_time_per_sample"]),
        ]
        rows_html.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    fronts = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{format_cell(f['hypervolume'])}</td><td>{len(f['points'])}</td></tr>"
        for m, f in result["fronts"].items()
    )
    plots = "".join(
        f'<figure><img src="{html.escape(Path(name).name)}" alt="{html.escape(PLOT_CAPTIONS.get(kind, kind))}">'
        f"<figcaption>{html.escape(PLOT_CAPTIONS.get(kind, kind))}</figcaption></figure>"
        for kind, name in result.get("plots", {}).items()
    ) or "<p>No plot: one preference and one λ give single points (the tables hold them).</p>"
    grid_rows = []
    for row in result["rows"]:
        if not row.get("images"):
            continue
        weights = ", ".join(f"{n}={w:g}" for n, w in row["weights"].items())
        pictures = "".join(
            f'<img class="strip" src="../{html.escape(src)}" alt="{html.escape(src)}">' for src in row["images"]
        )
        grid_rows.append(f"<tr><td>{html.escape(row['method'])}</td><td>{html.escape(weights)}</td>"
                         f"<td>{format_cell(row['kl_scale'])}</td><td>{pictures}</td></tr>")
    grid = ""
    if grid_rows:
        grid = ("<h2>Image grid</h2><p>The first samples of every cell, one strip per seed (same seed: same initial "
                "noise and prompts in every row).</p><table><tr><th>method</th><th>weights</th><th>λ</th>"
                f"<th>samples</th></tr>{''.join(grid_rows)}</table>")
    setting = result.get("setting", {})
    name = html.escape(str(setting.get("name", "")))
    oracle = ORACLE_NOTE if any(row["method"] == "is-oracle" for row in result["rows"]) else ""
    reference = html.escape(str([round(v, 4) for v in result["reference_point"]]))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>diffusion-blend evaluation: {name}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}} figure{{display:inline-block;margin:0 1em 1em 0}}
dl{{display:grid;grid-template-columns:max-content auto;gap:2px 1em}} dt{{font-weight:bold}} dd{{margin:0}}
img{{max-width:100%}} figure img{{width:560px;max-width:100%}}
img.strip{{margin-right:6px;height:96px;image-rendering:pixelated}}</style></head><body>
<h1>Evaluation: {name}</h1>
<h2>Setting</h2>{definition_list(setting_lines(setting))}
<h2>Sweep</h2>{definition_list(result.get("sweep", {}))}{oracle}
<h2>Per method and preference</h2>
<p>Means over seeds × samples with standard errors; Δ = gain over the base model; win rate against the base paired by
seed and sample (same initial noise); NFE = network evaluations per sample.</p>
<table><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr>{"".join(rows_html)}</table>
<h2>Pareto fronts</h2>
<p>Hypervolume against the common reference point {reference}.</p>
<table><tr><th>method</th><th>hypervolume</th><th>front size</th></tr>{fronts}</table>
<h2>Plots</h2>{plots}
{grid}
</body></html>
"""


def write_html(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write :func:`render_html` atomically to ``path`` (images are referenced relative to it)."""
    return write_text_atomic(path, render_html(result))
