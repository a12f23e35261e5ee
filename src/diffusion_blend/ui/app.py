"""The Gradio app of ``dblend ui``.

One slider per reward weight, a KL-scale slider, a method selector (DB-MPA-LS is disabled, with the reason, whenever
a blend coefficient is negative), an SMC particle count (N > 1 runs SMC on the DB-MPA blend, ``diffusion_blend.smc``,
where the studio supports it: the digits studio), a seed, a prompt box for text models. Generating shows the
samples, each basis reward's mean score with its standard error, and where the result lies on the demo report's
precomputed Pareto plot (a star with +-2 standard-error bars). Models without a prompt show a first result on page
load. When a control changes after a result, the status line marks the result stale until the next Generate.
Invalid input (a seed that is not a whole number, a value typed outside a slider's range, a missing prompt) is
rejected in the page with a readable message in the status line (the result on show stays), never a traceback, in
the page or the server log.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import gradio as gr  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from diffusion_blend.errors import DiffusionBlendError  # noqa: E402
from diffusion_blend.preference import Preference, PreferenceSchedule  # noqa: E402
from diffusion_blend.ui.studio import Studio  # noqa: E402

METHODS = {"DB-MPA (blend every step)": "mpa", "DB-MPA-LS (one model per step)": "ls"}
MPA_LABEL, LS_LABEL = list(METHODS)
WEIGHT_RANGE, KL_RANGE, PARTICLE_RANGE, TILT_RANGE = (-1.0, 2.0), (0.0, 3.0), (1, 32), (0.0, 4.0)  # tilt 0: auto
STALE = "**Stale**: the controls changed since this result was generated; press Generate for the new settings."


def checked_slider(minimum: float, maximum: float, **kwargs: Any) -> gr.Slider:
    """A ``gr.Slider`` whose value reaches our handlers even when typed outside its range, so the range check is ours
    (:func:`check_ranges`: a readable message) instead of gradio's (an error pill and a server-log traceback).

    The instance's ``preprocess`` is replaced (a subclass would make gradio write a ``.pyi`` stub next to this file).
    """
    slider = gr.Slider(minimum, maximum, **kwargs)
    slider.preprocess = lambda payload: None if payload is None else float(payload)  # type: ignore[method-assign]
    return slider


def check_ranges(weights: list[float | None], kl_scale: float | None, names: tuple[str, ...]) -> None:
    """Raise :class:`DiffusionBlendError` (one readable line) for a missing or out-of-range control value."""
    for name, value in [*zip((f"weight: {n}" for n in names), weights), ("KL scale", kl_scale)]:
        low, high = KL_RANGE if name == "KL scale" else WEIGHT_RANGE
        if value is None or not low <= value <= high:
            raise DiffusionBlendError(f"{name} must be between {low:g} and {high:g}, got {value}")


def load_pareto_reference(path: str | Path | None) -> dict[str, Any] | None:
    """The demo report's ``pareto.json`` (``{"rewards": [r1, r2], "series": {label: [{r1: .., r2: ..}, ...]}}``)."""
    if path is None or not Path(path).is_file():
        return None
    reference = json.loads(Path(path).read_text())
    if len(reference.get("rewards", [])) != 2 or not isinstance(reference.get("series"), dict):
        raise DiffusionBlendError(f"{path} is not a Pareto reference (two rewards and a 'series' mapping)")
    return reference


def pareto_figure(reference: Mapping[str, Any] | None, scores: Mapping[str, float] | None,
                  standard_errors: Mapping[str, float] | None = None) -> np.ndarray | None:
    """The reference fronts with the current result as a star with +-2 standard-error bars (two rewards only)."""
    if reference is None:
        return None
    r1, r2 = reference["rewards"]
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=100)
    for label, points in reference["series"].items():
        xs, ys = [p[r1] for p in points], [p[r2] for p in points]
        ax.plot(xs, ys, "o-" if len(points) > 1 else "s", label=label, markersize=4, linewidth=1)
    if scores is not None and r1 in scores and r2 in scores:
        se = standard_errors or {}
        ax.errorbar([scores[r1]], [scores[r2]], xerr=[2 * se.get(r1, 0.0)], yerr=[2 * se.get(r2, 0.0)], fmt="*",
                    color="black", markersize=16, capsize=4, elinewidth=1.2, label="this result (± 2 se)")
    ax.set_xlabel(r1)
    ax.set_ylabel(r2)
    ax.grid(alpha=0.3)
    ax.margins(0.08)  # room around the outermost points, so no marker or error bar touches the frame
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout(pad=0.6)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return np.asarray(Image.open(buffer).convert("RGB"))


def method_state(weights: list[float], kl_scale: float, names: tuple[str, ...]) -> tuple[dict, str]:
    """Method selector update and explanation for the current sliders."""
    try:
        check_ranges(weights, kl_scale, names)
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


def format_scores(
    scores: Mapping[str, float], seconds: float, standard_errors: Mapping[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
) -> str:
    """The scores table: one row per expert, labelled by the reward it measures (``labels``; default the name)."""
    se, labels = standard_errors or {}, labels or {}
    rows = "\n".join(f"| {labels.get(name, name)} | {value:.4f} | " + (f"{se[name]:.4f} |" if name in se else "|")
                     for name, value in scores.items())
    return f"| reward | mean score | standard error |\n| --- | --- | --- |\n{rows}\n\nGenerated in {seconds:.2f} s."


@dataclass
class Controls:
    """The app's input and output components (what :func:`build_app` wires together)."""

    weights: list[Any]
    kl_scale: Any
    method: Any
    method_note: Any
    particles: Any
    tilt: Any
    schedule: Any
    end_weights: list[Any]
    seed: Any
    prompt: Any
    button: Any
    status: Any
    last_settings: Any
    image: Any
    scores: Any
    pareto: Any

    @property
    def inputs(self) -> list[Any]:
        return [*self.weights, self.kl_scale, self.method, self.seed, self.prompt, self.particles, self.tilt,
                self.schedule, *self.end_weights]

    @property
    def outputs(self) -> list[Any]:
        return [self.image, self.scores, self.pareto, self.status, self.last_settings]


def _inputs_column(studio: Studio, names: tuple[str, ...], initial_smc: Mapping[str, float]) -> dict[str, Any]:
    """The left column: a slider per reward weight, the KL scale, the method, SMC's controls, seed, prompt."""
    smc = getattr(studio, "supports_smc", False)
    why_not = getattr(studio, "smc_unavailable", None) or "this model has no SMC"
    weights = [checked_slider(*WEIGHT_RANGE, value=1.0 / len(names), step=0.05, label=f"weight: {name}",
                              elem_id=f"weight-{name}") for name in names]
    kl_scale = checked_slider(*KL_RANGE, value=1.0, step=0.05, label="KL scale (lambda)", elem_id="kl-scale",
                              info="0 = base model, 1 = as fine-tuned, > 1 = extrapolate (weaker KL)")
    method = gr.Radio(list(METHODS), value=MPA_LABEL, label="method", elem_id="method")
    method_note = gr.Markdown(elem_id="method-note")
    particles = checked_slider(*PARTICLE_RANGE, value=initial_smc.get("particles", 1), step=1, label="SMC particles",
                               elem_id="particles",
                               interactive=smc, info="1 = the blend alone; N > 1 = SMC on the DB-MPA blend, "
                               "reweighted to the exact target (N x (experts + 1) network evaluations per image)"
                               if smc else f"SMC is off: {why_not}")
    initial_tilt = initial_smc.get("proposal_tilt", "auto")
    tilt = checked_slider(*TILT_RANGE, value=0.0 if initial_tilt == "auto" else initial_tilt, step=0.25,
                          label="SMC proposal tilt (0 = auto)", elem_id="proposal-tilt", interactive=smc,
                          info="0: learned from the run's own weights (default); t > 0: SMC's proposal blends at "
                          "t x lambda, the target stays lambda" if smc else f"SMC is off: {why_not}")
    with gr.Accordion("Weights over the steps", open=False, elem_id="schedule-box"):
        schedule = gr.Checkbox(False, label="vary the weights from the first step to the last", elem_id="schedule",
                               info="the weight sliders above set the first step, these the last, linear in between; "
                               "a schedule is in general not a tilt of the base, and SMC needs a fixed preference "
                               "(docs/method.md)")
        end_weights = [checked_slider(*WEIGHT_RANGE, value=1.0 / len(names), step=0.05,
                                      label=f"last-step weight: {name}", elem_id=f"end-weight-{name}")
                       for name in names]
    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
    prompt = gr.Textbox(label="prompt", visible=studio.text_conditioned, elem_id="prompt")
    button = gr.Button("Generate", variant="primary", elem_id="generate")
    return dict(weights=weights, kl_scale=kl_scale, method=method, method_note=method_note, particles=particles,
                tilt=tilt, schedule=schedule, end_weights=end_weights, seed=seed, prompt=prompt, button=button)


def _outputs_column(pareto_reference: Mapping[str, Any] | None) -> dict[str, Any]:
    """The right column: status line, samples, scores and the result on the demo's Pareto plot."""
    status = gr.Markdown(elem_id="status")
    last_settings = gr.State(None)  # the control values of the result on show
    image = gr.Image(label="samples", type="numpy", elem_id="samples", interactive=False)
    scores = gr.Markdown(elem_id="scores")
    gr.Markdown("**Where this lies on the demo's Pareto plot** (the star: this result, ± 2 standard errors)",
                visible=pareto_reference is not None, elem_id="pareto-caption")
    # no block label: gradio draws it over the image's top edge, where it hid the plot's top tick
    pareto = gr.Image(value=pareto_figure(pareto_reference, None), show_label=False, type="numpy",
                      elem_id="pareto", interactive=False, visible=pareto_reference is not None)
    return dict(status=status, last_settings=last_settings, image=image, scores=scores, pareto=pareto)


def checked_request(studio: Studio, names: tuple[str, ...], weights: list[float], kl_scale: float, method_label: str,
                    seed_value: Any, prompt_text: str | None, particle_count: Any, tilt_value: Any,
                    end_weights: list[float] | None = None) -> tuple[Preference | PreferenceSchedule, str, int,
                                                                     dict[str, Any]]:
    """The page's values as a preference (a schedule from the first step's weights to ``end_weights``), method, seed
    and SMC options; one readable line for a bad value."""
    check_ranges(weights, kl_scale, names)
    if seed_value is None or float(seed_value) != int(seed_value) or int(seed_value) < 0:
        raise DiffusionBlendError(f"the seed must be a non-negative whole number, got {seed_value}")
    if studio.text_conditioned and not (prompt_text or "").strip():
        raise DiffusionBlendError("enter a prompt")
    if method_label not in METHODS:
        raise DiffusionBlendError(f"unknown method {method_label!r}")
    preference = Preference(dict(zip(names, weights)), kl_scale)
    if (particle_count is None or float(particle_count) != int(particle_count)
            or not PARTICLE_RANGE[0] <= int(particle_count) <= PARTICLE_RANGE[1]):
        raise DiffusionBlendError(f"SMC particles must be a whole number from {PARTICLE_RANGE[0]} to "
                                  f"{PARTICLE_RANGE[1]}, got {particle_count}")
    if tilt_value is None or not TILT_RANGE[0] <= tilt_value <= TILT_RANGE[1]:
        raise DiffusionBlendError(f"SMC proposal tilt must be between {TILT_RANGE[0]:g} and {TILT_RANGE[1]:g}, "
                                  f"got {tilt_value}")
    tilt = "auto" if float(tilt_value) == 0 else float(tilt_value)
    smc = {"particles": int(particle_count), "proposal_tilt": tilt} if int(particle_count) > 1 else {}
    if smc and end_weights is not None:
        raise DiffusionBlendError("SMC targets a fixed preference; a weight schedule is not one (set particles to 1 "
                                  "or untick the schedule)")
    if smc and not getattr(studio, "supports_smc", False):
        why_not = getattr(studio, "smc_unavailable", None) or "this model has no SMC"
        raise DiffusionBlendError(f"SMC particles are not available: {why_not} (set particles to 1)")
    if end_weights is not None:
        check_ranges(end_weights, kl_scale, tuple(f"last-step {name}" for name in names))
        preference = PreferenceSchedule({n: ((0.0, w), (1.0, e)) for n, w, e in zip(names, weights, end_weights)},
                                        ((0.0, kl_scale), (1.0, kl_scale)))
    return preference, METHODS[method_label], int(seed_value), smc


def build_app(studio: Studio, pareto_reference: Mapping[str, Any] | None = None,
              initial_smc: Mapping[str, float] | None = None) -> gr.Blocks:
    """The page over ``studio`` (module docstring); ``initial_smc``: the SMC sliders' start values."""
    names = studio.reward_names
    with gr.Blocks(title="Diffusion Blend") as app:
        gr.Markdown(f"## Diffusion Blend: choose a preference at inference time\n{studio.description}")
        with gr.Row():
            with gr.Column(scale=1):
                inputs = _inputs_column(studio, names, initial_smc or {})
            with gr.Column(scale=2):
                outputs = _outputs_column(pareto_reference)
        ui = Controls(**inputs, **outputs)

        def update_method(*values: float) -> tuple[dict, str]:
            return method_state(list(values[:-1]), values[-1], names)

        def generate(*values: Any) -> tuple[np.ndarray, str, np.ndarray | None, str, dict]:
            weights, rest = list(values[:len(names)]), values[len(names):]
            kl_scale, method_label, seed_value, prompt_text, particle_count, tilt_value, scheduled = rest[:7]
            end_weights = list(rest[7:]) if scheduled else None
            try:
                preference, method, seed, smc = checked_request(studio, names, weights, kl_scale, method_label,
                                                                seed_value, prompt_text, particle_count, tilt_value,
                                                                end_weights)
                result = studio.generate(preference, method, seed, prompt_text or None, **smc)
            except (DiffusionBlendError, ValueError) as err:
                # in the status line, with the last result kept: a raised gr.Error would also put "Error" pills
                # over every output
                return gr.update(), gr.update(), gr.update(), f"⚠️ Invalid input: {err}", gr.update()
            weights_text = ", ".join(f"{n} {w:g}" for n, w in zip(names, weights))
            if end_weights is not None:
                weights_text += " (first step) to " + ", ".join(f"{n} {w:g}" for n, w in zip(names, end_weights))
            smc_text = f" with SMC, {smc['particles']} particles" if smc else ""
            smc_text += f", proposal tilt {tilt_value:g}" if smc and tilt_value not in (0, 1) else ""
            shown = (f"Result for weights {weights_text}, KL scale {kl_scale:g}, {method_label.split(' ')[0]}"
                     f"{smc_text}, seed {seed}.")
            if isinstance(preference, PreferenceSchedule):
                shown += " A weight schedule: in general not a tilt of the base (docs/method.md)."
            elif hasattr(studio, "target_line"):  # experts of their own alphas: the distribution this serves
                shown += f" The blend serves the {studio.target_line(preference)}."
            return (result.images, format_scores(result.scores, result.seconds, result.standard_errors,
                                                 getattr(studio, "score_labels", None)),
                    pareto_figure(pareto_reference, result.scores, result.standard_errors), shown,
                    {"values": list(values), "shown": shown})

        def first_result(*values: Any) -> tuple[Any, ...]:
            """On page load: a result for the initial controls (models without a prompt), else a hint."""
            if studio.text_conditioned:
                return gr.update(), gr.update(), gr.update(), "Enter a prompt and press Generate.", None
            return generate(*values)

        def mark_stale(*values: Any) -> str | dict:
            *current, last = values
            if last is None:
                return gr.update()
            return last["shown"] if list(current) == last["values"] else STALE

        blend_controls = [*ui.weights, ui.kl_scale]
        for control in blend_controls:
            control.change(update_method, blend_controls, [ui.method, ui.method_note])
        for control in ui.inputs:
            control.change(mark_stale, [*ui.inputs, ui.last_settings], [ui.status], show_progress="hidden")
        # one queue for both events that run the model: gradio's limit of 1 is per event, and the page's first result
        # running beside a click's would share the studio's network (its adapters are routed per call)
        ui.button.click(generate, ui.inputs, ui.outputs, concurrency_id="generate")
        app.load(update_method, blend_controls, [ui.method, ui.method_note])
        app.load(first_result, ui.inputs, ui.outputs, concurrency_id="generate")
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> None:
    """Serve on ``host:port``: no share link, analytics off (set by the CLI), nothing served but the app."""
    app.queue().launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=True,
                       footer_links=[])
