"""How far DB-MPA / DB-KLA with ideal experts are from the exact target, on a 2-D Gaussian mixture.

The experts are exact (:mod:`diffusion_blend.testbeds.gmm.closed_form`), so every error measured here is the blend's own
approximation error: the Jensen gap of paper Lemma 1-2 (section 2.3-2.6). Two measurements per
``(alpha, w, lambda)``:

(a) **Path KL** ``KL(P_target || P_blend)`` between the exact target's reverse process and the blended one.
    Both share the diffusion coefficient, so by Girsanov it is ``1/2 int g(t)^2 E_{p_t^target}
    ||s_blend - s_target||^2 dt``; on the discrete VP chain ``g(t)^2 dt ~ beta_t`` per training timestep.
    The blended score is the blend rule applied to exact member scores (``s = -eps / sqrt(1 - abar)`` is
    affine in eps with shared coefficients, paper section 2.8). The expectation is Monte Carlo over exact
    draws of the noised target marginals, at every training timestep; its standard error is reported.
(b) **Reward error** of actual samples from :func:`diffusion_blend.sampling.sample` (DDIM, ``eta = 1``,
    ``clip_sample=False``) driven by the blended ideal experts, next to a CONTROL: the same sampler, the same
    noise, driven by the exact target's own denoiser. The control's error is discretization plus Monte Carlo;
    the blend's error beyond it is the approximation.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion_blend.denoisers import BlendedDenoiser
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.files import atomic_write, write_text_atomic
from diffusion_blend.preference import BASE, Preference, blend_predictions
from diffusion_blend.sampling import make_scheduler, sample
from diffusion_blend.testbeds.gmm.closed_form import (
    DTYPE,
    GaussianMixture,
    MixtureDenoiser,
    QuadraticForm,
    check_alpha,
    expected_rewards,
    ideal_expert,
    ideal_family,
    tilted_target,
)

RIGHT, CORNER = "right", "corner"
EXACT_BLEND_KL = 1e-20
"""A path KL below this is float round-off of an exact blend (one exact member, or the base alone)."""


def study_testbed() -> tuple[GaussianMixture, dict[str, QuadraticForm]]:
    """A 4-component 2-D mixture and two conflicting basis rewards.

    ``right(x) = x_1`` pulls mass to the right; ``corner(x) = -|x - (-2, 2)|^2 / 2`` pulls it to the
    upper-left corner.
    """
    base = GaussianMixture(
        weights=[0.3, 0.2, 0.3, 0.2],
        means=[[-2.0, -1.0], [-1.0, 2.0], [2.0, 1.0], [1.0, -2.0]],
        covariances=[
            [[0.4, 0.15], [0.15, 0.3]],
            [[0.3, 0.0], [0.0, 0.5]],
            [[0.5, -0.1], [-0.1, 0.3]],
            [[0.35, 0.0], [0.0, 0.35]],
        ],
    )
    rewards = {
        RIGHT: QuadraticForm.linear_reward([1.0, 0.0]),
        CORNER: QuadraticForm.quadratic_reward([-2.0, 2.0], torch.eye(2, dtype=DTYPE)),
    }
    return base, rewards


@dataclass(frozen=True)
class BlendCase:
    """One preference of the study: ``sweep`` names the family of cases it belongs to."""

    sweep: str
    preference: Preference

    @property
    def weight(self) -> float:
        """``w`` = weight of the ``right`` reward."""
        return self.preference.weights.get(RIGHT, 0.0)

    @property
    def label(self) -> str:
        weights = ", ".join(f"{name}={value:g}" for name, value in self.preference.weights.items())
        return f"{self.sweep}: {weights}; lambda={self.preference.kl_scale:g}"


def study_cases() -> list[BlendCase]:
    """DB-MPA over ``w`` (lambda = 1), DB-KLA over lambda (expert ``right``), and two combined points."""
    cases = [BlendCase("DB-MPA", Preference({RIGHT: w, CORNER: 1.0 - w}, 1.0)) for w in (0.0, 0.25, 0.5, 0.75, 1.0)]
    cases += [BlendCase("DB-KLA", Preference.kl_only(RIGHT, lam)) for lam in (0.0, 0.5, 1.0, 1.5, 2.0)]
    cases += [BlendCase("MPA+KLA", Preference({RIGHT: 0.5, CORNER: 0.5}, lam)) for lam in (0.5, 2.0)]
    return cases


@dataclass(frozen=True)
class StudySettings:
    alphas: tuple[float, ...]
    mc_per_timestep: int
    num_samples: int
    num_inference_steps: int
    seed: int = 0
    report_alpha: float = 1.0

    def __post_init__(self) -> None:
        if not self.alphas:
            raise DiffusionBlendError("the study needs at least one alpha")
        for alpha in self.alphas:
            check_alpha(alpha)
        for name in ("mc_per_timestep", "num_samples", "num_inference_steps"):
            if int(getattr(self, name)) < 2:
                raise DiffusionBlendError(f"{name} must be >= 2, got {getattr(self, name)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DiffusionBlendError(f"seed must be a non-negative integer, got {self.seed!r}")

    @classmethod
    def default(cls, seed: int = 0) -> StudySettings:
        alphas = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)  # a log grid
        return cls(alphas, mc_per_timestep=64, num_samples=2048, num_inference_steps=100, seed=seed, report_alpha=0.5)

    @classmethod
    def quick(cls, seed: int = 0) -> StudySettings:
        return cls((0.1, 1.0, 10.0), mc_per_timestep=16, num_samples=512, num_inference_steps=25, seed=seed)


@dataclass(frozen=True)
class Estimate:
    value: float
    standard_error: float


def blended_score(
    base: GaussianMixture, experts: Mapping[str, GaussianMixture], preference: Preference, x: torch.Tensor, abar: Any
) -> torch.Tensor:
    """The blend rule applied to exact member scores at noise level ``abar`` (paper section 2.8)."""
    active = preference.coefficients(tuple(experts)).active()
    members = [base if member is BASE else experts[member] for member, _ in active]
    return blend_predictions([coef for _, coef in active], [member.score(x, abar) for member in members])


def path_kl(
    base: GaussianMixture,
    rewards: Mapping[str, QuadraticForm],
    preference: Preference,
    alpha: float,
    scheduler: Any,
    mc_per_timestep: int,
    generator: torch.Generator,
) -> Estimate:
    """``KL(target path || blended path) = sum_t beta_t / 2 E_{p_t^target} ||s_blend - s_target||^2`` (Girsanov).

    Sums over every training timestep of ``scheduler``; ``mc_per_timestep`` exact draws of the noised target
    marginal per timestep. The standard error is ``sqrt(sum_t (beta_t/2)^2 Var_t / n)``.
    """
    target = tilted_target(base, rewards, preference, alpha)
    experts = {name: ideal_expert(base, reward, alpha) for name, reward in rewards.items()}
    betas = torch.as_tensor(scheduler.betas).to(DTYPE)
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod).to(DTYPE)
    steps, n = len(betas), int(mc_per_timestep)
    abar = alphas_cumprod.repeat_interleave(n)
    clean = target.sample(steps * n, generator)
    noise = torch.randn(clean.shape, generator=generator, dtype=DTYPE)
    noisy = abar.sqrt()[:, None] * clean + (1 - abar).sqrt()[:, None] * noise
    difference = blended_score(base, experts, preference, noisy, abar) - target.score(noisy, abar)
    squared = (difference**2).sum(1).reshape(steps, n)
    half_beta = betas / 2
    value = float((half_beta * squared.mean(1)).sum())
    variance = float(((half_beta**2) * squared.var(1) / n).sum())
    return Estimate(value, math.sqrt(variance))


def _mean_and_error(values: torch.Tensor) -> Estimate:
    return Estimate(float(values.mean()), float(values.std() / math.sqrt(len(values))))


def sampled_rewards(
    base: GaussianMixture,
    rewards: Mapping[str, QuadraticForm],
    preference: Preference,
    alpha: float,
    num_samples: int,
    num_inference_steps: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """``E[r_i]`` of DDIM (eta = 1) samples from the blend and from the exact target's denoiser (the control).

    Both samplers use the same seed, so they see the same noise: their difference has small variance.
    Returns, per reward, the exact value and the estimates ``blend``, ``control`` and ``blend_minus_control``.
    """
    scheduler = make_scheduler("ddim", clip_sample=False)
    target = tilted_target(base, rewards, preference, alpha)
    blend = BlendedDenoiser(ideal_family(base, rewards, alpha, scheduler), preference)
    control = MixtureDenoiser(target, scheduler.alphas_cumprod)
    outputs = {}
    for name, denoiser in (("blend", blend), ("control", control)):
        outputs[name] = sample(
            denoiser,
            scheduler,
            generator=seed,
            shape=(num_samples, base.dim),
            num_inference_steps=num_inference_steps,
            eta=1.0,
            progress=False,
            dtype=DTYPE,
        ).samples
    exact = expected_rewards(target, rewards)
    result = {}
    for name, reward in rewards.items():
        blend_values, control_values = reward(outputs["blend"]), reward(outputs["control"])
        result[name] = {
            "exact": exact[name],
            "blend": _mean_and_error(blend_values),
            "control": _mean_and_error(control_values),
            "blend_minus_control": _mean_and_error(blend_values - control_values),
        }
    return result


def run_study(settings: StudySettings, progress: bool = True) -> list[dict[str, Any]]:
    """One row per ``(alpha, case)`` with the path KL and the sampled reward errors (module docstring)."""
    with single_thread():
        return _run_study(settings, progress)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: the tensors here are tiny, and threads only contend on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_study(settings: StudySettings, progress: bool) -> list[dict[str, Any]]:
    base, rewards = study_testbed()
    scheduler = make_scheduler("ddim", clip_sample=False)
    generator = torch.Generator().manual_seed(settings.seed)
    jobs = [(alpha, case) for alpha in settings.alphas for case in study_cases()]
    rows = []
    for index, (alpha, case) in enumerate(tqdm(jobs, desc="gmm-study", disable=not progress)):
        kl = path_kl(base, rewards, case.preference, alpha, scheduler, settings.mc_per_timestep, generator)
        sampled = sampled_rewards(
            base, rewards, case.preference, alpha, settings.num_samples, settings.num_inference_steps,
            settings.seed * 100_003 + index,
        )
        row: dict[str, Any] = {
            "alpha": alpha,
            "sweep": case.sweep,
            "w_right": case.preference.weights.get(RIGHT, 0.0),
            "w_corner": case.preference.weights.get(CORNER, 0.0),
            "kl_scale": case.preference.kl_scale,
            "path_kl": kl.value,
            "path_kl_se": kl.standard_error,
        }
        for name, values in sampled.items():
            row[f"exact_E_{name}"] = values["exact"]
            for kind in ("blend", "control"):
                row[f"{kind}_err_{name}"] = values[kind].value - values["exact"]
                row[f"{kind}_err_{name}_se"] = values[kind].standard_error
            row[f"blend_minus_control_{name}"] = values["blend_minus_control"].value
            row[f"blend_minus_control_{name}_se"] = values["blend_minus_control"].standard_error
        rows.append(row)
    return rows


def _case_key(row: Mapping[str, Any]) -> tuple[str, float, float, float]:
    return (row["sweep"], float(row["w_right"]), float(row["w_corner"]), float(row["kl_scale"]))


def _case_label(key: tuple[str, float, float, float]) -> str:
    sweep, w_right, w_corner, kl_scale = key
    if sweep == "DB-KLA":
        return f"DB-KLA right, lambda={kl_scale:g}"
    if sweep == "DB-MPA":
        return f"DB-MPA w={w_right:g}"
    return f"MPA+KLA w={w_right:g}, lambda={kl_scale:g}"


def _closest_alpha(rows: Sequence[Mapping[str, Any]], alpha: float) -> float:
    alphas = sorted({float(row["alpha"]) for row in rows})
    return min(alphas, key=lambda a: abs(math.log(a) - math.log(alpha)))


def markdown_report(rows: Sequence[Mapping[str, Any]], settings: StudySettings, command: str) -> str:
    """Two Markdown tables: path KL over (case, alpha); reward errors of samples at one alpha."""
    alphas = sorted({float(row["alpha"]) for row in rows})
    keys = list(dict.fromkeys(_case_key(row) for row in rows))
    by_key = {(_case_key(row), float(row["alpha"])): row for row in rows}
    lines = [
        f"Command: `{command}`",
        "",
        "Path KL(target || blend) (Monte Carlo standard error in parentheses; w = weight of `right`, "
        "the rest on `corner`):",
        "",
        "| case | " + " | ".join(f"alpha={a:g}" for a in alphas) + " |",
        "| --- | " + " | ".join("---" for _ in alphas) + " |",
    ]
    for key in keys:
        cells = [f"{by_key[key, a]['path_kl']:.3g} ({by_key[key, a]['path_kl_se']:.1g})" for a in alphas]
        lines.append(f"| {_case_label(key)} | " + " | ".join(cells) + " |")
    alpha = _closest_alpha(rows, settings.report_alpha)
    lines += [
        "",
        f"Error of E[r] from {settings.num_samples} DDIM samples (eta=1, {settings.num_inference_steps} steps) at "
        f"alpha={alpha:g}: blend vs the exact-target CONTROL (same sampler and noise), +- standard error:",
        "",
        "| case | E[right] exact | blend err | control err | E[corner] exact | blend err | control err |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in keys:
        row = by_key[key, alpha]
        cells = []
        for name in (RIGHT, CORNER):
            cells.append(f"{row[f'exact_E_{name}']:.3f}")
            for kind in ("blend", "control"):
                cells.append(f"{row[f'{kind}_err_{name}']:+.3f} +- {row[f'{kind}_err_{name}_se']:.3f}")
        lines.append(f"| {_case_label(key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    def write(stream: Any) -> None:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    with atomic_write(path) as stream:
        write(stream)


def write_plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Path KL vs alpha per case (log-log) and the sampled E[right] error of blend vs control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(_case_key(row) for row in rows))
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for key in keys:
        series = sorted((row for row in rows if _case_key(row) == key), key=lambda row: row["alpha"])
        alphas = [row["alpha"] for row in series]
        panel = {"DB-MPA": 0, "DB-KLA": 1, "MPA+KLA": 1}[key[0]]
        style = "--" if key[0] == "MPA+KLA" else "-"
        if max(row["path_kl"] for row in series) > EXACT_BLEND_KL:  # exact blends (KL = 0) cannot go on a log axis
            kl = [row["path_kl"] for row in series]
            axes[panel].plot(alphas, kl, style, marker="o", ms=3, label=_case_label(key))
        if key[0] != "DB-KLA" or key[3] in (0.5, 2.0):
            line = axes[2].errorbar(
                alphas,
                [row[f"blend_err_{RIGHT}"] for row in series],
                yerr=[2 * row[f"blend_err_{RIGHT}_se"] for row in series],
                marker="o",
                ms=3,
                capsize=2,
                label=_case_label(key),
            )
            axes[2].plot(alphas, [row[f"control_err_{RIGHT}"] for row in series], ":", color=line[0].get_color())
    titles = ("DB-MPA (lambda = 1) over w\n(w = 0, 1 are exact: KL = 0, not drawn)",
              "DB-KLA over lambda; combined (dashed)\n(lambda = 0, 1 are exact: KL = 0, not drawn)")
    for axis, title in zip(axes[:2], titles):
        axis.set(xscale="log", yscale="log", xlabel="alpha", ylabel="path KL(target || blend)", title=title)
        axis.legend(fontsize=7)
    axes[2].axhline(0.0, color="black", lw=0.8)
    axes[2].set(xscale="log", xlabel="alpha", ylabel="sampled E[right] - exact",
                title="sample error: blend (solid, 2 SE bars) vs control (dotted)")
    axes[2].legend(fontsize=6)
    figure.tight_layout()
    with atomic_write(path, "wb") as stream:
        figure.savefig(stream, format="png", dpi=110)
    plt.close(figure)


def write_outputs(rows: Sequence[Mapping[str, Any]], settings: StudySettings, out_dir: Path, command: str) -> str:
    """Write ``gmm_study.csv``, ``gmm_study.png`` and ``gmm_study.md`` into ``out_dir``; return the Markdown."""
    if not rows:
        raise DiffusionBlendError("the study produced no rows")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = markdown_report(rows, settings, command)
    write_csv(rows, out_dir / "gmm_study.csv")
    write_plot(rows, out_dir / "gmm_study.png")
    write_text_atomic(out_dir / "gmm_study.md", "# Gaussian-mixture study\n\n" + report)
    return report


__all__ = [
    "BlendCase",
    "Estimate",
    "StudySettings",
    "blended_score",
    "markdown_report",
    "path_kl",
    "run_study",
    "sampled_rewards",
    "study_cases",
    "study_testbed",
    "write_outputs",
]
