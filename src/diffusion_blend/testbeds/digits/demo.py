"""The demo pipeline: experts -> blends over (w, lambda) -> numbers against the exact target (paper sections 2, 6).

:func:`run_demo` (``dblend demo``) does, on the committed digits base model:

1. :func:`~diffusion_blend.testbeds.digits.experts.ensure_demo_adapters`: one LoRA expert per basis reward at KL weight
   ``alpha`` (cached);
2. loads both experts into ONE network (:class:`~diffusion_blend.lora.LoraFamily`) and sweeps, with the shared
   evaluation code (:func:`~diffusion_blend.evaluation.sweep.run_sweep`, resumable cells): DB-MPA and DB-MPA-LS
   over the weight grid (Lemma 2, Proposition 2), DB-KLA of each expert over the lambda grid (section 2.5) and
   the combined (w, lambda) grid (section 2.6); every point on the same seeds;
3. estimates the exact target ``p_pre exp(lambda r_w / alpha)`` of every point by importance weighting base
   samples (:func:`~diffusion_blend.evaluation.oracle.importance_weighted_oracle`, with its effective sample
   size), and each expert's achieved fraction of its best objective with the trainer's exact path-KL estimator
   (:func:`~diffusion_blend.training.dpok.rollout`);
4. writes the report (:mod:`diffusion_blend.testbeds.digits.report`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion_blend.denoisers import BlendedDenoiser, SwitchingDenoiser
from diffusion_blend.evaluation.oracle import achieved_fraction, best_objective
from diffusion_blend.evaluation.stats import mean_and_standard_error
from diffusion_blend.evaluation.sweep import SweepConfig, run_sweep
from diffusion_blend.files import remove_partial_files
from diffusion_blend.preference import Preference
from diffusion_blend.sampling import sample
from diffusion_blend.testbeds.digits.config import DemoConfig
from diffusion_blend.testbeds.digits.data import IMAGE_SHAPE, to_image_space
from diffusion_blend.testbeds.digits.experts import ensure_demo_adapters
from diffusion_blend.testbeds.digits.model import digits_forward, digits_scheduler
from diffusion_blend.testbeds.digits.setting import (
    DemoModels,
    base_rewards,
    digits_setting,
    evaluation_seeds,
    load_demo_models,
)

REPORT_DIR = "report"


def run_sweeps(models: DemoModels, config: DemoConfig, report_dir: Path, progress: bool) -> dict[str, Any]:
    """Three sweeps with shared code: the weight grid (DB-MPA, DB-MPA-LS), the lambda grids (DB-KLA, combined) and
    SMC on the blend (:mod:`diffusion_blend.smc`, ``smc_particles`` per sample) at the check weights.

    DB-MPA-LS needs non-negative coefficients, so it only runs on the weight grid (lambda = 1).
    """
    setting = digits_setting(models, config)
    seeds = evaluation_seeds(config)
    common = dict(seeds=seeds, samples_per_seed=config.samples_per_seed, oracle_samples=2)
    mpa = run_sweep(setting, SweepConfig(methods=("base", "mpa", "ls"), preferences=config.mpa_preferences(), **common),
                    report_dir / "sweep-weights", progress=progress)
    kla = run_sweep(setting, SweepConfig(methods=("base", "mpa"), preferences=config.kla_preferences(), **common),
                    report_dir / "sweep-kl-scales", progress=progress)
    smc = run_sweep(setting, SweepConfig(
        methods=("base", "smc"), preferences=[Preference(config.weights(w), 1.0) for w in config.check_weights],
        seeds=seeds, samples_per_seed=config.smc_samples_per_seed, oracle_samples=2, particles=config.smc_particles,
    ), report_dir / "sweep-smc", progress=progress)
    return {"weights": mpa, "kl_scales": kla, "smc": smc}


@torch.no_grad()
def expert_objectives(models: DemoModels, config: DemoConfig, base: dict[str, torch.Tensor],
                      progress: bool) -> dict[str, dict[str, float]]:
    """Each expert's ``E_ft[r]``, path KL to the base sampler and achieved fraction of the best objective.

    ``fraction = (J_ft - E_pre[r]) / (alpha log E_pre[exp(r/alpha)] - E_pre[r])``, ``J_ft = E_ft[r] - alpha KL``;
    the path KL is the trainer's exact per-step Gaussian KL summed along the expert's own trajectories
    (``training.dpok.rollout``), averaged over ``expert_samples`` trajectories.
    """
    from diffusion_blend.testbeds.digits.target import digits_finetune_target
    from diffusion_blend.training.dpok import adapter_pair, rollout

    target = digits_finetune_target(list(config.rewards), model=models.model, progress=False)
    results = {}
    for index, reward in enumerate(config.rewards):
        pair = adapter_pair(models.model, digits_forward, reward)
        generator = torch.Generator().manual_seed(1000 * config.seed + 500 + index)
        rewards, kls = [], []
        chunk = 1024
        for start in tqdm(range(0, config.expert_samples, chunk), desc=f"expert {reward} (reward, path KL)",
                          disable=not progress):
            n = min(chunk, config.expert_samples - start)
            batch = rollout(target, pair, n, generator, num_inference_steps=config.num_inference_steps, eta=config.eta)
            rewards.append(torch.as_tensor(models.rewards[reward](to_image_space(batch.samples)), dtype=torch.float64))
            kls.append(batch.path_kl.to(torch.float64))
        r, kl = torch.cat(rewards), torch.cat(kls)
        mean_r, se_r = mean_and_standard_error(r)
        mean_kl, se_kl = mean_and_standard_error(kl)
        base_r = base[reward]
        best = best_objective(base_r, config.alpha)
        results[reward] = {
            "base_reward": float(base_r.mean()), "expert_reward": mean_r, "se_expert_reward": se_r,
            "path_kl": mean_kl, "se_path_kl": se_kl, "objective": mean_r - config.alpha * mean_kl,
            "best_objective": best, "achieved_fraction": achieved_fraction(mean_r, mean_kl, base_r, config.alpha),
            "num_trajectories": int(r.numel()),
        }
    return results


@torch.no_grad()
def image_grids(models: DemoModels, config: DemoConfig, report_dir: Path, progress: bool) -> dict[str, str]:
    """Grids with the same initial noise (and step noise) in every column: a row is one digit as w or lambda moves."""
    from diffusion_blend.testbeds.digits.quality import save_grid

    first, second = config.rewards
    rows, seed = config.grid_rows, 1000 * config.seed + 777
    panels: dict[str, tuple[str, list[tuple[str, Callable[..., torch.Tensor]]]]] = {
        "grid_mpa.png": (f"DB-MPA, w = weight of {first}: " + " ".join(f"{w:g}" for w in config.weight_grid),
                         [(f"{w:g}", BlendedDenoiser(models.family, Preference(config.weights(w), 1.0)))
                          for w in config.weight_grid]),
        "grid_ls.png": (f"DB-MPA-LS, w = weight of {first}: " + " ".join(f"{w:g}" for w in config.weight_grid),
                        [(f"{w:g}", SwitchingDenoiser(models.family, Preference(config.weights(w), 1.0), seed + 1))
                         for w in config.weight_grid]),
    }
    for reward in (first, second):
        panels[f"grid_kla_{reward}.png"] = (
            f"DB-KLA {reward}, lambda: " + " ".join(f"{k:g}" for k in config.kl_scales),
            [(f"{k:g}", BlendedDenoiser(models.family, Preference.kl_only(reward, k))) for k in config.kl_scales])
    files = {}
    for name, (title, columns) in tqdm(panels.items(), desc="image grids", disable=not progress):
        images = []
        for _, denoiser in columns:
            out = sample(denoiser, digits_scheduler("ddim"), generator=seed, shape=(rows, *IMAGE_SHAPE),
                         num_inference_steps=config.num_inference_steps, eta=config.eta, progress=False)
            images.append(to_image_space(out.samples))
        grid = torch.stack(images, dim=1).reshape(rows * len(columns), *IMAGE_SHAPE)  # row-major: sample x setting
        save_grid(grid, report_dir / name, columns=len(columns), title=title)
        files[name] = title
    return files


def run_demo(
    out_dir: str | os.PathLike = "runs/demo",
    config: DemoConfig | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The whole demo (module docstring); returns the report's summary (also in ``report/results.json``)."""
    from diffusion_blend.testbeds.digits.report import write_report

    config = config or DemoConfig()
    printer = log or (lambda message: print(message, file=sys.stderr))
    adapter_log: list[str] = []

    def log(message: str) -> None:
        adapter_log.append(message)
        printer(message)

    torch.set_num_threads(config.threads)  # docs/demo.md: 1 thread is fastest for this MLP on shared cores
    out = Path(out_dir)
    report_dir = out / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_files(out)  # what a killed run was writing (files.atomic_path)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    paths = ensure_demo_adapters(out, config, progress=progress, log=log)
    timings["adapters_s"] = time.perf_counter() - started
    models = load_demo_models(paths, config, progress=progress)
    mark = time.perf_counter()
    sweeps = run_sweeps(models, config, report_dir, progress)
    timings["sweeps_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    base = base_rewards(models, config, progress)
    experts = expert_objectives(models, config, base, progress)
    timings["oracle_and_experts_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    grids = image_grids(models, config, report_dir, progress)
    timings["grids_s"] = time.perf_counter() - mark
    summary = write_report(report_dir, config, sweeps=sweeps, base=base, experts=experts, grids=grids,
                           adapters={name: os.path.relpath(path, report_dir) for name, path in paths.items()},
                           timings=timings, started=started, adapter_log=adapter_log)
    printer(json.dumps({"checks": {c["name"]: c["status"] for c in summary["checks"]}}))
    return summary
