"""The Gradio app of ``dblend ui``.

One slider per reward weight, a KL-scale slider, a method selector (DB-MPA-LS is disabled, with the reason, whenever
a blend coefficient is negative), an SMC particle count (digits studio: N > 1 runs SMC on the DB-MPA blend, ``diffusion_blend.smc``), a seed, a
prompt box for text models. Generating shows the samples, each basis
reward's mean score, and where the result lies on the demo report's precomputed Pareto plot. Invalid input is
rejected in the page with a readable message (``gr.Error``), never a traceback.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import gradio as gr  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ..errors import DiffusionBlendError  # noqa: E402
from ..preference import Preference  # noqa: E402
from .studio import Studio  # noqa: E402

METHODS = {"DB-MPA (blend every step)": "mpa", "DB-MPA-LS (one model per step)": "ls"}
MPA_LABEL, LS_LABEL = list(METHODS)


def load_pareto_reference(path: str | Path | None) -> dict[str, Any] | None:
    """The demo report's ``pareto.json`` (``{"rewards": [r1, r2], "series": {label: [{r1: .., r2: ..}, ...]}}``)."""
    if path is None or not Path(path).is_file():
        return None
    reference = json.loads(Path(path).read_text())
    if len(reference.get("rewards", [])) != 2 or not isinstance(reference.get("series"), dict):
        raise DiffusionBlendError(f"{path} is not a Pareto reference (two rewards and a 'series' mapping)")
    return reference


def pareto_figure(reference: Mapping[str, Any] | None, scores: Mapping[str, float] | None) -> np.ndarray | None:
    """The reference fronts with the current result as a star (only for two rewards)."""
    if reference is None:
        return None
    r1, r2 = reference["rewards"]
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=100)
    for label, points in reference["series"].items():
        xs, ys = [p[r1] for p in points], [p[r2] for p in points]
        ax.plot(xs, ys, "o-" if len(points) > 1 else "s", label=label, markersize=4, linewidth=1)
    if scores is not None and r1 in scores and r2 in scores:
        ax.plot([scores[r1]], [scores[r2]], "*", color="black", markersize=16, label="this result")
    ax.set_xlabel(r1)
    ax.set_ylabel(r2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return np.asarray(Image.open(buffer).convert("RGB"))


def method_state(weights: list[float], kl_scale: float, names: tuple[str, ...]) -> tuple[dict, str]:
    """Method selector update and explanation for the current sliders."""
    try:
        coefficients = Preference(dict(zip(names, weights)), kl_scale).coefficients(names)
    except DiffusionBlendError as err:
        return gr.update(), f"⚠️ {err}"
    coefs = ", ".join(f"{'base' if m is None else m}: {c:+.3g}" for m, c in coefficients.items())
    if coefficients.is_convex:
        return gr.update(choices=list(METHODS), interactive=True), f"Blend coefficients: {coefs}"
    return (
        gr.update(choices=[MPA_LABEL], value=MPA_LABEL, interactive=False),
        f"Blend coefficients: {coefs}. DB-MPA-LS is disabled: a negative coefficient (KL scale > 1 or a "
        "negative weight extrapolates) cannot be a probability, so only the deterministic blend DB-MPA applies.",
    )


def format_scores(scores: Mapping[str, float], seconds: float) -> str:
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in scores.items())
    return f"| reward | mean score |\n| --- | --- |\n{rows}\n\nGenerated in {seconds:.2f} s."


def build_app(studio: Studio, pareto_reference: Mapping[str, Any] | None = None) -> gr.Blocks:
    names = studio.reward_names
    with gr.Blocks(title="Diffusion Blend") as app:
        gr.Markdown(f"## Diffusion Blend: choose a preference at inference time\n{studio.description}")
        with gr.Row():
            with gr.Column(scale=1):
                weight_sliders = [
                    gr.Slider(-1.0, 2.0, value=1.0 / len(names), step=0.05, label=f"weight: {name}",
                              elem_id=f"weight-{name}")
                    for name in names
                ]
                kl_slider = gr.Slider(0.0, 3.0, value=1.0, step=0.05, label="KL scale (lambda)", elem_id="kl-scale",
                                      info="0 = base model, 1 = as fine-tuned, > 1 = extrapolate (weaker KL)")
                method = gr.Radio(list(METHODS), value=MPA_LABEL, label="method", elem_id="method")
                method_note = gr.Markdown(elem_id="method-note")
                particles = gr.Slider(1, 32, value=1, step=1, label="SMC particles", elem_id="particles",
                                      info="1 = the blend alone; N > 1 = SMC on the DB-MPA blend, reweighted to the "
                                           "exact target (N x (experts + 1) network evaluations per image)")
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                prompt = gr.Textbox(label="prompt", visible=studio.text_conditioned, elem_id="prompt")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                image = gr.Image(label="samples", type="numpy", elem_id="samples", interactive=False)
                scores_md = gr.Markdown(elem_id="scores")
                pareto = gr.Image(value=pareto_figure(pareto_reference, None), label="where this lies on the demo's "
                                  "Pareto plot", type="numpy", elem_id="pareto", interactive=False,
                                  visible=pareto_reference is not None)

        def update_method(*values: float) -> tuple[dict, str]:
            return method_state(list(values[:-1]), values[-1], names)

        def generate(*values: Any) -> tuple[np.ndarray, str, np.ndarray | None]:
            particle_count = values[-1] if len(values) == len(names) + 5 else 1  # the particles input comes last
            *weights, kl_scale, method_label, seed_value, prompt_text = values[: len(names) + 4]
            try:
                if seed_value is None or float(seed_value) != int(seed_value) or int(seed_value) < 0:
                    raise DiffusionBlendError(f"the seed must be a non-negative whole number, got {seed_value}")
                if studio.text_conditioned and not (prompt_text or "").strip():
                    raise DiffusionBlendError("enter a prompt")
                preference = Preference(dict(zip(names, weights)), kl_scale)
                smc = {"particles": int(particle_count)} if int(particle_count or 1) > 1 else {}
                if smc and not getattr(studio, "supports_smc", False):
                    raise DiffusionBlendError("SMC particles are not available for this model (set particles to 1)")
                result = studio.generate(preference, METHODS[method_label], int(seed_value), prompt_text or None,
                                         **smc)
            except (DiffusionBlendError, ValueError) as err:
                raise gr.Error(str(err), title="Invalid input", print_exception=False) from None
            return result.images, format_scores(result.scores, result.seconds), pareto_figure(
                pareto_reference, result.scores
            )

        for control in [*weight_sliders, kl_slider]:
            control.change(update_method, [*weight_sliders, kl_slider], [method, method_note])
        button.click(generate, [*weight_sliders, kl_slider, method, seed, prompt, particles], [image, scores_md, pareto])
        app.load(update_method, [*weight_sliders, kl_slider], [method, method_note])
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> None:
    """Serve on ``host:port``: no share link, analytics off (set by the CLI), nothing served but the app."""
    app.queue().launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=True,
                       footer_links=[])
