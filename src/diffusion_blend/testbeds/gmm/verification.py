"""Acceptance check of RL fine-tuning against the exact optimum, then DB-MPA over two trained adapters.

On the 2-D Gaussian-mixture testbed (``verify.gmm_target``): a learned MLP base, fine-tuned by
``training.dpok.finetune`` for a linear reward (``right``) and a quadratic one (``corner``) at two KL weights.
For each case (paper section 1's objective, path form):

- ``J_ft = E_ft[r] - alpha * KL(path)``, the path KL being the sum over stochastic steps of the exact
  per-step Gaussian KL to the base (adapter disabled), averaged over fresh trajectories;
- the best achievable value ``alpha log E_pre[exp(r / alpha)]`` of the LEARNED base (importance weighting
  over many base-sampler draws; Donsker-Varadhan), and the importance-weighted ``E_target[r]``;
- the achieved fraction ``(J_ft - E_pre[r]) / (alpha log E_pre[exp(r/alpha)] - E_pre[r])``.

Then the two adapters trained at the same ``alpha`` are loaded into ONE base network and blended with DB-MPA
(``BlendedDenoiser`` over ``lora.LoraFamily``, paper Lemma 2) for ``w = (1/2, 1/2)``; the blend's rewards are
compared with the exact target of ``r_w`` (importance-weighted over the learned base, and closed-form for the
true mixture) and with the MORL oracle: an adapter fine-tuned on ``r_w`` itself (paper section 5.4).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusion_blend import lora
from diffusion_blend.adapters import load_adapter
from diffusion_blend.denoisers import BlendedDenoiser
from diffusion_blend.evaluation.oracle import (
    achieved_fraction,
    best_objective,
    importance_weighted_oracle,
    weighted_reward,
)
from diffusion_blend.preference import BASE, Preference
from diffusion_blend.sampling import sample
from diffusion_blend.testbeds.gmm.closed_form import tilted_target
from diffusion_blend.testbeds.gmm.study import study_testbed
from diffusion_blend.testbeds.gmm.target import (
    GmmBaseSettings,
    gmm_base_model,
    gmm_rewards,
    gmm_target,
)
from diffusion_blend.training.config import DPOKConfig
from diffusion_blend.training.dpok import adapter_pair, denoiser_pair, finetune, rollout


@dataclass
class VerifySettings:
    alphas: tuple[float, ...] = (1.0, 0.5)
    rewards: tuple[str, ...] = ("right", "corner")
    blend_alpha: float = 1.0
    blend_weight: float = 0.5  # w for the first reward, 1 - w for the second
    iterations: int = 120
    batch_size: int = 256
    learning_rate: float = 3e-3
    num_inference_steps: int = 20
    num_base_samples: int = 50_000
    num_eval_samples: int = 10_000
    seed: int = 0
    base: GmmBaseSettings = field(default_factory=GmmBaseSettings)
    smoke_run: bool = False  # quick(): the report says so; its fractions are not the acceptance figures

    @classmethod
    def quick(cls) -> VerifySettings:
        """A small configuration for smoke tests (numbers are not meant to pass the acceptance bar)."""
        return cls(alphas=(1.0,), iterations=3, batch_size=32, num_base_samples=2000, num_eval_samples=500,
                   num_inference_steps=6, base=GmmBaseSettings(steps=200, hidden=32, depth=2), smoke_run=True)


def _config(settings: VerifySettings, weights: dict[str, float], alpha: float) -> DPOKConfig:
    return DPOKConfig(reward_weights=weights, alpha=alpha, iterations=settings.iterations,
                      batch_size=settings.batch_size, minibatch_size=settings.batch_size,
                      learning_rate=settings.learning_rate, num_inference_steps=settings.num_inference_steps,
                      seed=settings.seed)


def _case_name(weights: dict[str, float], alpha: float) -> str:
    return "+".join(f"{w:g}{n}" if len(weights) > 1 else n for n, w in weights.items()) + f"-alpha{alpha:g}"


def _rewards_of(points: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: form(points.double()) for name, form in gmm_rewards().items()}


def _mean_and_error(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def run_verification(out_dir: str | os.PathLike, settings: VerifySettings | None = None,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Any]:
    """Train every case, evaluate it, blend, and write ``report.json`` and ``report.md`` under ``out_dir``."""
    settings = settings or VerifySettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = settings.num_inference_steps
    base_model = gmm_base_model(settings.base, cache_dir, progress)
    scheduler = gmm_target(settings.base, cache_dir, progress=False).scheduler
    generator = torch.Generator().manual_seed(settings.seed + 10_000)
    base_samples = sample(lambda x, t: base_model(x, t), scheduler, generator=generator,
                          shape=(settings.num_base_samples, 2), num_inference_steps=steps, progress=False).samples
    base_rewards = _rewards_of(base_samples)
    mixture, forms = study_testbed()
    cases = []
    trained: dict[tuple[str, float], Path] = {}
    jobs = [({name: 1.0}, alpha) for alpha in settings.alphas for name in settings.rewards]
    first, second = settings.rewards[:2]
    morl_weights = {first: settings.blend_weight, second: 1.0 - settings.blend_weight}
    jobs.append((morl_weights, settings.blend_alpha))  # the MORL oracle for the blend's preference
    for weights, alpha in jobs:
        name = _case_name(weights, alpha)
        target = gmm_target(settings.base, cache_dir, progress=False)
        result = finetune(target, _config(settings, weights, alpha), out_dir=out / name, progress=progress)
        eval_generator = torch.Generator().manual_seed(settings.seed + 20_000)
        batch = rollout(target, adapter_pair(result.model, target.forward, "policy"), settings.num_eval_samples,
                        eval_generator, num_inference_steps=steps, eta=1.0)
        ft_rewards = _rewards_of(batch.samples)
        r_ft = weighted_reward(ft_rewards, weights)
        r_base = weighted_reward(base_rewards, weights)
        preference = Preference(weights)
        oracle = importance_weighted_oracle(base_rewards, preference, alpha)
        exact = tilted_target(mixture, forms, preference, alpha)
        mean_reward, reward_error = _mean_and_error(r_ft)
        path_kl, kl_error = _mean_and_error(batch.path_kl)
        case = {
            "case": name, "weights": weights, "alpha": alpha,
            "E_pre[r]": float(r_base.mean()),
            "best_objective": best_objective(r_base, alpha),
            "E_ft[r]": mean_reward, "E_ft[r]_se": reward_error,
            "path_kl": path_kl, "path_kl_se": kl_error,
            "J_ft": mean_reward - alpha * path_kl,
            "fraction": achieved_fraction(mean_reward, path_kl, r_base, alpha),
            "E_target[r]_IS": float(sum(w * oracle.expected_rewards[n] for n, w in weights.items())),
            "E_target[r]_exact_mixture": float(sum(w * exact.expectation(forms[n]) for n, w in weights.items())),
            "IS_ess": oracle.effective_sample_size,
            "final_curve": result.curves[-1],
        }
        cases.append(case)
        if len(weights) == 1:
            trained[(next(iter(weights)), alpha)] = result.adapter_path
    blend = _blend(settings, trained, base_rewards, cache_dir)
    morl = next(c for c in cases if len(c["weights"]) > 1)
    report = {"settings": _jsonable(asdict(settings)), "cases": [c for c in cases if len(c["weights"]) == 1],
              "morl_oracle": morl, "blend": blend}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report))
    return report


def _blend(settings: VerifySettings, trained: dict, base_rewards: dict, cache_dir) -> dict[str, Any]:
    first, second = settings.rewards[:2]
    alpha = settings.blend_alpha
    weights = {first: settings.blend_weight, second: 1.0 - settings.blend_weight}
    model = gmm_base_model(settings.base, cache_dir, progress=False)
    for name in (first, second):
        load_adapter(model, trained[(name, alpha)], name, architecture=model.config)
    model.eval()
    target = gmm_target(settings.base, cache_dir, progress=False)
    family = lora.LoraFamily(model, target.forward, [first, second])
    preference = Preference(weights)
    blended = BlendedDenoiser(family, preference)
    generator = torch.Generator().manual_seed(settings.seed + 30_000)
    target.model = model
    batch = rollout(target, denoiser_pair(blended, family.member(BASE)), settings.num_eval_samples, generator,
                    num_inference_steps=settings.num_inference_steps, eta=1.0)
    blend_rewards = _rewards_of(batch.samples)
    oracle = importance_weighted_oracle(base_rewards, preference, alpha)
    mixture, forms = study_testbed()
    exact = tilted_target(mixture, forms, preference, alpha)
    row = {"weights": weights, "alpha": alpha, "path_kl": _mean_and_error(batch.path_kl)[0]}
    for name in (first, second):
        mean, error = _mean_and_error(blend_rewards[name])
        row[name] = {
            "blend": mean,
            "blend_se": error,
            "target_IS": oracle.expected_rewards[name],
            "target_IS_se": oracle.standard_errors[name],
            "target_exact_mixture": exact.expectation(forms[name]),
        }
    r_w = weighted_reward(blend_rewards, weights)
    row["r_w"] = {"blend": float(r_w.mean()),
                  "target_IS": float(sum(w * oracle.expected_rewards[n] for n, w in weights.items())),
                  "J_blend": float(r_w.mean()) - alpha * row["path_kl"],
                  "best_objective": best_objective(weighted_reward(base_rewards, weights), alpha),
                  "fraction": achieved_fraction(float(r_w.mean()), row["path_kl"],
                                                weighted_reward(base_rewards, weights), alpha)}
    return row


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


SMOKE_NOTE = ("**Smoke run (--quick)**: a few iterations on a small base, to check that everything runs; the "
              "fractions below are not the acceptance figures (run without --quick for those).")


def markdown_report(report: dict[str, Any]) -> str:
    lines = [SMOKE_NOTE, ""] if report["settings"].get("smoke_run") else []
    lines += ["| case | alpha | E_pre[r] | E_ft[r] | E_target[r] (IS) | E_target[r] (exact mixture) | path KL | J_ft | "
             "best (alpha log E exp(r/alpha)) | fraction |", "|" + "---|" * 10]
    for c in [*report["cases"], report["morl_oracle"]]:
        lines.append(
            f"| {c['case']} | {c['alpha']:g} | {c['E_pre[r]']:.3f} | {c['E_ft[r]']:.3f} ± {c['E_ft[r]_se']:.3f} | "
            f"{c['E_target[r]_IS']:.3f} | {c['E_target[r]_exact_mixture']:.3f} | {c['path_kl']:.3f} | "
            f"{c['J_ft']:.3f} | "
            f"{c['best_objective']:.3f} | {c['fraction']:.3f} |"
        )
    blend = report["blend"]
    lines += ["", f"DB-MPA blend, weights {blend['weights']}, alpha {blend['alpha']:g} (path KL to base "
              f"{blend['path_kl']:.3f}):", "",
              "| reward | blend | target (IS, learned base) | target (exact, true mixture) |", "|---|---|---|---|"]
    for name, row in blend.items():
        if isinstance(row, dict) and "target_exact_mixture" in row:
            lines.append(f"| {name} | {row['blend']:.3f} ± {row['blend_se']:.3f} | {row['target_IS']:.3f} ± "
                         f"{row['target_IS_se']:.3f} | {row['target_exact_mixture']:.3f} |")
    r_w = blend["r_w"]
    lines.append(f"| r_w | {r_w['blend']:.3f} | {r_w['target_IS']:.3f} | |")
    lines += ["", f"Blend objective J = {r_w['J_blend']:.3f} vs best {r_w['best_objective']:.3f} "
              f"(fraction {r_w['fraction']:.3f}); MORL oracle fraction {report['morl_oracle']['fraction']:.3f}."]
    return "\n".join(lines) + "\n"
