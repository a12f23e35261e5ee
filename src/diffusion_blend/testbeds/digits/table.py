"""The paper's comparison table (Table 1, paper sections 5-6) on the digits testbed, plus the KL-scale comparison.

On the demo's experts for ``ink`` and ``compressibility`` (``demo.ensure_demo_adapters``, the demo's ``alpha`` and
sampler), :func:`run_digits_table` evaluates at ``w`` in {0.2, 0.5, 0.8} (``w`` = weight of ``ink``,
``lambda = 1``):

- ``base`` (the pre-trained model), Rewarded Soup over LoRA factors and over LoRA deltas (section 5.1),
- CoDe (section 5.2): ``N = 20`` candidates; the paper's block of 5 of 50 DDIM steps (a selection every tenth of
  the trajectory) scaled to the 10-step sampler is a block of 1 step, i.e. a selection at every step but the last,
- RGG (section 5.3): gradient guidance with the rewards' gradients at the Tweedie estimate; with a
  non-differentiable basis reward (e.g. ``compressibility``) the method refuses and the table records its own
  error message as ``n/a: <reason>`` instead of numbers,
- DB-MPA (Lemma 2) and DB-MPA-LS (Proposition 2),
- the MORL oracle (section 5.4): an adapter fine-tuned directly on ``r_w`` with the demo experts' trainer
  configuration, cached per ``(w, lambda, alpha)`` by :class:`~diffusion_blend.baselines.morl.MorlOracle`,
- the importance-weighted oracle of the exact target ``p_pre exp(lambda r_w / alpha)`` with its ESS.

Columns: ``r_w`` ± se, each reward ± se, each method's hypervolume over its three points (one common reference
point), network evaluations and time per sample as ratios to the base. Then DB-KLA of the ``ink`` expert against
lambda-specific MORL oracles (fine-tuned on ``ink`` at ``alpha / lambda``, paper Fig. 6) and the IS oracle.

The MORL fine-tunings are the expensive part: the missing ones run in spawned worker processes
(``morl_workers`` at a time, one torch thread each, one progress-bar line each). Evaluations go through the shared
sweep (:func:`~diffusion_blend.evaluation.sweep.run_sweep`), so they are resumable cells too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from diffusion_blend.adapters import base_fingerprint
from diffusion_blend.baselines.guidance import guided_sample
from diffusion_blend.baselines.morl import (
    MorlOracle,
    dpok_adapter_trainer,
    morl_denoiser,
    preference_key,
)
from diffusion_blend.errors import DiffusionBlendError, RewardError
from diffusion_blend.evaluation.sweep import Setting, SweepConfig, run_sweep
from diffusion_blend.files import atomic_path, copy_atomic, write_text_atomic
from diffusion_blend.preference import BASE, Preference
from diffusion_blend.testbeds.digits.config import DemoConfig
from diffusion_blend.testbeds.digits.experts import ensure_demo_adapters
from diffusion_blend.testbeds.digits.model import digits_forward
from diffusion_blend.testbeds.digits.setting import (
    DemoModels,
    digits_setting,
    evaluation_seeds,
    file_digest,
    load_demo_models,
)

TABLE_METHODS = ("base", "rs-factors", "rs-deltas", "code", "rgg", "mpa", "ls", "smc", "fk", "morl", "is-oracle")
METHOD_LABELS = {
    "base": "base (pre-trained)",
    "rs-factors": "Rewarded Soup (factors)",
    "rs-deltas": "Rewarded Soup (deltas)",
    "code": "CoDe",
    "rgg": "RGG",
    "mpa": "DB-MPA",
    "ls": "DB-MPA-LS",
    "smc": "SMC on the blend",
    "fk": "FK steering (equal NFE)",
    "morl": "MORL oracle",
    "is-oracle": "IS oracle",
}


@dataclass(frozen=True)
class DigitsTableConfig:
    """What the table evaluates (module docstring). ``demo``: the experts, alpha and sampler (the demo's).

    ``weights``: the table's ``w`` (weight of ``demo.rewards[0]``) at ``lambda = 1``; ``kl_scales``: the
    DB-KLA / MORL comparison for the expert ``kl_reward``. ``seeds`` x ``samples_per_seed`` samples per point
    (``None``: the demo's). ``code_block_size`` 1 = the paper's block 5 of 50 steps scaled to 10 steps.
    ``particles``: SMC on the blend (:mod:`diffusion_blend.smc`); FK steering (base proposal) gets ``fk_particles``,
    by default 3x as many: the same network evaluations as SMC over two experts plus the base.
    """

    demo: DemoConfig = field(default_factory=DemoConfig)
    weights: tuple[float, ...] = (0.2, 0.5, 0.8)
    kl_scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    kl_reward: str = "ink"
    seeds: tuple[int, ...] | None = None
    samples_per_seed: int | None = None
    code_candidates: int = 20
    code_block_size: int = 1
    oracle_samples: int = 20_000
    morl_workers: int = 2
    particles: int = 8
    fk_particles: int | None = None

    def __post_init__(self) -> None:
        if not self.weights or any(not 0.0 <= w <= 1.0 for w in self.weights):
            raise DiffusionBlendError(f"table weights must lie in [0, 1], got {self.weights!r}")
        if not self.kl_scales or any(not (k > 0 and math.isfinite(k)) for k in self.kl_scales):
            raise DiffusionBlendError(f"KL scales must be positive, got {self.kl_scales!r}")
        if self.kl_reward not in self.demo.rewards:
            raise DiffusionBlendError(f"kl_reward {self.kl_reward!r} is not one of {self.demo.rewards}")
        for name in ("code_candidates", "code_block_size", "oracle_samples", "morl_workers", "particles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffusionBlendError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def quick(cls) -> DigitsTableConfig:
        """Tiny budgets (tests): the demo's quick experts, 2 seeds x 16 samples, 4 CoDe candidates, in-process MORL."""
        return cls(demo=DemoConfig.quick(), seeds=(0, 1), samples_per_seed=16, code_candidates=4,
                   oracle_samples=256, morl_workers=1, particles=2)

    def table_preferences(self) -> list[Preference]:
        return [Preference(self.demo.weights(w), 1.0) for w in self.weights]

    def kl_preferences(self) -> list[Preference]:
        return [Preference.kl_only(self.kl_reward, k) for k in self.kl_scales]

    def sweep_common(self) -> dict[str, Any]:
        seeds = list(self.seeds) if self.seeds is not None else evaluation_seeds(self.demo)
        per_seed = self.samples_per_seed or self.demo.samples_per_seed
        return dict(seeds=seeds, samples_per_seed=per_seed, code_candidates=self.code_candidates,
                    code_block_size=self.code_block_size, oracle_samples=self.oracle_samples, particles=self.particles,
                    fk_particles=self.fk_particles or 3 * self.particles)


# ---------------------------------------------------------------------------------------------- MORL oracles
def _morl_template(config: DemoConfig) -> dict[str, Any]:
    """The demo experts' trainer configuration without the reward and the KL weight (set per MORL run)."""
    template = config.training(config.rewards[0]).to_dict()
    template.pop("reward_weights")
    template.pop("alpha")
    return template


def _morl_target(rewards: Sequence[str], lora_targets: Sequence[str], name: str):
    from diffusion_blend.testbeds.digits.target import digits_finetune_target

    target = digits_finetune_target(list(rewards), progress=False)
    target.name = name
    target.target_modules = list(lora_targets)
    return target


def morl_cache_dir(out_dir: Path, config: DemoConfig, fingerprint: str) -> Path:
    """``<out>/morl/<key>``: the key hashes the base fingerprint and the trainer configuration, so a changed
    trainer setting (or base model) starts a new cache instead of reusing adapters trained otherwise."""
    payload = json.dumps({"base": fingerprint, "training": _morl_template(config)}, sort_keys=True, default=str)
    return out_dir / "morl" / hashlib.sha256(payload.encode()).hexdigest()[:12]


def _slot_initializer(slots: Any) -> None:
    os.environ["TQDM_POSITION"] = str(slots.get())  # tqdm reads TQDM_* defaults when a bar is created
    torch.set_num_threads(1)


def _train_morl(weights: dict[str, float], effective_alpha: float, config: DemoConfig, runs_dir: str,
                progress: bool) -> str:
    """One MORL fine-tuning (``baselines.morl.dpok_adapter_trainer``) on ``r_w`` at KL weight ``alpha / lambda``."""
    from functools import partial

    torch.set_num_threads(config.threads)
    label = "MORL " + ",".join(f"{n}={w:g}" for n, w in weights.items()) + f" alpha'={effective_alpha:.3g}"
    train = dpok_adapter_trainer(
        partial(_morl_target, config.rewards, config.lora_targets, label),
        _morl_template(config),
        runs_dir,
        progress=progress,
    )
    return str(train(dict(weights), float(effective_alpha)))


def identical_expert(preference: Preference, config: DemoConfig, experts: Mapping[str, Path]) -> Path | None:
    """The demo expert whose training run IS this MORL run, if any: ``r_w`` one reward at ``lambda = 1`` (so KL
    weight ``alpha``) and the expert's recorded training configuration equal to the MORL run's (same trainer
    settings and seed). Checked against the adapter file's own metadata, not assumed."""
    from diffusion_blend.adapters import read_adapter
    from diffusion_blend.training.config import DPOKConfig

    if preference.kl_scale != 1.0 or len(preference.weights) != 1:
        return None
    ((reward, weight),) = preference.weights.items()
    if weight != 1.0 or reward not in experts:
        return None
    run = DPOKConfig(**{**_morl_template(config), "reward_weights": {reward: 1.0}, "alpha": config.alpha}).to_dict()
    _, metadata = read_adapter(experts[reward])
    normal = lambda value: json.loads(json.dumps(value, sort_keys=True, default=str))  # noqa: E731
    return Path(experts[reward]) if normal(metadata.training_config) == normal(run) else None


@dataclass
class MorlCache:
    """The MORL oracle with every adapter cached, and what this call had to do for it."""

    oracle: MorlOracle
    fine_tuned: int  # DPOK runs started by this call
    copied: int  # adapters copied from an identical demo expert run


def ensure_morl_oracles(
    cache_dir: Path, config: DemoConfig, preferences: Sequence[Preference], *, workers: int, progress: bool,
    log: Callable[[str], None], experts: Mapping[str, Path] | None = None,
) -> MorlCache:
    """A :class:`MorlOracle` with every preference's adapter cached; the missing ones are fine-tuned first,
    ``workers`` at a time in spawned processes (one thread each), then registered in the oracle's index.

    A preference whose MORL run is exactly a demo expert's training run (:func:`identical_expert`) gets a copy of
    that expert instead of a second, identical fine-tuning.
    """
    index_path = cache_dir / "index.json"  # MorlOracle's index: {preference_key: {"path": ..., ...}}
    try:
        index = json.loads(index_path.read_text()) if index_path.exists() else {}
    except json.JSONDecodeError as err:
        raise DiffusionBlendError(f"the MORL cache index {index_path} is corrupt: {err}") from err
    missing = []
    for preference in dict.fromkeys(preferences):
        entry = index.get(preference_key(preference, config.alpha))
        if entry is not None and Path(entry["path"]).exists():
            log(f"MORL {preference}: cached")
        else:
            missing.append(preference)
    runs_dir = str(cache_dir / "runs")
    trained: dict[tuple, str] = {}  # (sorted weights, KL weight alpha / lambda) -> adapter path

    def job_key(weights: Mapping[str, float], effective_alpha: float) -> tuple:
        return tuple(sorted(weights.items())), round(float(effective_alpha), 12)

    copied = 0
    for preference in list(missing):
        same = identical_expert(preference, config, experts or {})
        if same is not None:
            key = preference_key(preference, config.alpha)
            trained[job_key(preference.weights, config.alpha)] = str(
                copy_atomic(same, Path(runs_dir) / key / "adapter.safetensors"))
            log(f"MORL {preference}: the same training run as the demo expert {same.name}; copied")
            missing.remove(preference)
            copied += 1
    if missing:
        log(f"MORL: fine-tuning {len(missing)} adapter(s), {min(workers, len(missing))} at a time")
        jobs = [(dict(p.weights), config.alpha / p.kl_scale) for p in missing]
        if workers > 1 and len(jobs) > 1:
            context = get_context("spawn")
            slots = context.Queue()
            for slot in range(workers):
                slots.put(slot)
            with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context,
                                     initializer=_slot_initializer, initargs=(slots,)) as pool:
                futures = [pool.submit(_train_morl, w, a, config, runs_dir, progress) for w, a in jobs]
                paths = [future.result() for future in futures]
        else:
            paths = [_train_morl(w, a, config, runs_dir, progress) for w, a in jobs]
        for (weights, effective_alpha), path in zip(jobs, paths):
            trained[job_key(weights, effective_alpha)] = path

    def registered(weights: dict[str, float], effective_alpha: float) -> str:
        key = job_key(weights, effective_alpha)
        if key not in trained:
            raise DiffusionBlendError(f"no MORL adapter was fine-tuned for {weights} at KL weight {effective_alpha:g}")
        return trained[key]

    oracle = MorlOracle(cache_dir, registered, config.alpha)
    for preference in dict.fromkeys(preferences):  # registers the new adapters in the oracle's index (atomic)
        oracle.adapter_path(preference)
    return MorlCache(oracle, fine_tuned=len(missing), copied=copied)


# ---------------------------------------------------------------------------------------------- evaluation
def rgg_refusal(setting: Setting, preference: Preference) -> str | None:
    """Run RGG (``baselines.guidance.guided_sample``) on one sample; its error message if it refuses, else None."""
    try:
        guided_sample(setting.family.member(BASE), setting.scheduler_factory(), rewards=setting.rewards,
                      preference=preference, alpha=setting.alpha, generator=0, decode=setting.decode,
                      shape=(1, *setting.sample_shape), num_inference_steps=setting.num_inference_steps,
                      eta=setting.eta, progress=False)
    except RewardError as err:
        return str(err)
    return None


def table_setting(models: DemoModels, config: DemoConfig, oracle: MorlOracle,
                  morl_preferences: Sequence[Preference]) -> Setting:
    """The demo's digits setting with the MORL oracle attached (its adapters' digests in the cell fingerprints)."""
    base = digits_setting(models, config)
    digests = {preference_key(p, oracle.alpha): file_digest(oracle.adapter_path(p)) for p in morl_preferences}
    return replace(base, name="digits-table",
                   morl_denoiser=lambda p: morl_denoiser(oracle, p, models.model, digits_forward),
                   options={**base.options, "morl": digests})


def _row_for(result: Mapping[str, Any], method: str, preference: Preference) -> Mapping[str, Any] | None:
    for row in result["rows"]:
        if row["method"] == method and Preference(row["weights"], row["kl_scale"]) == preference:
            return row
    return None


def _ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def build_table(result: Mapping[str, Any], config: DigitsTableConfig, methods: Sequence[str],
                refusals: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per (method, w): means ± se, ``r_w`` gain over the base, cost ratios, ESS, hypervolume."""
    rewards = list(config.demo.rewards)
    rows = []
    for method in methods:
        for w, preference in zip(config.weights, config.table_preferences()):
            entry: dict[str, Any] = {"method": method, "label": METHOD_LABELS[method], "w": w}
            if method in refusals:
                entry["na"] = refusals[method]
                rows.append(entry)
                continue
            row = _row_for(result, method, preference)
            base = _row_for(result, "base", preference)
            entry["weighted_reward"] = row["weighted_reward"]
            entry["se_weighted_reward"] = row["se_weighted_reward"]
            entry["gain_weighted_reward"] = row["gain_weighted_reward"]
            for name in rewards:
                entry[f"mean_{name}"], entry[f"se_{name}"] = row[f"mean_{name}"], row[f"se_{name}"]
            entry["win_rate"] = row.get("win_rate")
            entry["network_evaluations_per_sample"] = row.get("network_evaluations_per_sample")
            entry["nfe_ratio"] = _ratio(row.get("network_evaluations_per_sample"),
                                        base.get("network_evaluations_per_sample"))
            entry["time_ratio"] = _ratio(row.get("wall_time_per_sample"), base.get("wall_time_per_sample"))
            entry["reward_evaluations_per_sample"] = row.get("reward_evaluations_per_sample")
            entry["effective_sample_size"] = row.get("effective_sample_size")
            entry["num_samples"] = row.get("num_samples")
            entry["hypervolume"] = result["fronts"][method]["hypervolume"]
            rows.append(entry)
    return rows


def build_kl_rows(result: Mapping[str, Any], config: DigitsTableConfig) -> list[dict[str, Any]]:
    """Mean of the KL reward (and the other) vs lambda: DB-KLA, MORL(alpha / lambda), IS oracle; base at lambda 0."""
    rewards = list(config.demo.rewards)
    rows = []
    base = next(r for r in result["rows"] if r["method"] == "base")
    rows.append({"kl_scale": 0.0, "method": "base",
                 **{f"mean_{n}": base[f"mean_{n}"] for n in rewards}, **{f"se_{n}": base[f"se_{n}"] for n in rewards}})
    for preference in config.kl_preferences():
        for method in ("mpa", "morl", "is-oracle"):
            row = _row_for(result, method, preference)
            rows.append({"kl_scale": preference.kl_scale, "method": method,
                         **{f"mean_{n}": row[f"mean_{n}"] for n in rewards},
                         **{f"se_{n}": row[f"se_{n}"] for n in rewards},
                         "effective_sample_size": row.get("effective_sample_size")})
    return rows


def run_digits_table(
    out_dir: str | os.PathLike,
    config: DigitsTableConfig | None = None,
    *,
    demo_dir: str | os.PathLike = "runs/demo",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The whole study (module docstring); writes ``table.{csv,json,md}``, ``kl_scales.csv`` and ``table.png``."""
    config = config or DigitsTableConfig()
    log = log or (lambda message: print(message, file=sys.stderr))
    torch.set_num_threads(config.demo.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    paths = ensure_demo_adapters(demo_dir, config.demo, progress=progress, log=log)
    timings["experts_s"] = time.perf_counter() - started
    models = load_demo_models(paths, config.demo, progress=progress)
    mark = time.perf_counter()
    morl_preferences = [*config.table_preferences(), *config.kl_preferences()]
    cache_dir = morl_cache_dir(out, config.demo, base_fingerprint(models.model))
    morl = ensure_morl_oracles(cache_dir, config.demo, morl_preferences, workers=config.morl_workers,
                               progress=progress, log=log, experts=paths)
    oracle = morl.oracle
    timings["morl_training_s"] = time.perf_counter() - mark
    setting = table_setting(models, config.demo, oracle, morl_preferences)
    refusal = rgg_refusal(setting, config.table_preferences()[0])
    refusals = {"rgg": refusal} if refusal else {}
    methods = [m for m in TABLE_METHODS if m not in refusals]
    mark = time.perf_counter()
    common = config.sweep_common()
    table = run_sweep(setting, SweepConfig(methods=methods, preferences=config.table_preferences(), **common),
                      out / "sweep-table", progress=progress)
    kl = run_sweep(setting, SweepConfig(methods=("base", "mpa", "morl", "is-oracle"),
                                        preferences=config.kl_preferences(), **common),
                   out / "sweep-kl-scales", progress=progress)
    timings["sweeps_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started
    summary = {
        "config": {**asdict(config), "demo_dir": str(demo_dir)},
        "rewards": list(config.demo.rewards),
        "alpha": config.demo.alpha,
        "sampler": {
            "scheduler": "ddim",
            "num_inference_steps": config.demo.num_inference_steps,
            "eta": config.demo.eta,
        },
        "sweep": {k: v for k, v in common.items()},
        "table": build_table(table, config, TABLE_METHODS, refusals),
        "reference_point": table["reference_point"],
        "kl_scales": build_kl_rows(kl, config),
        "refusals": refusals,
        "experts": {name: str(path) for name, path in paths.items()},
        "morl_cache": str(cache_dir),
        "morl_trained": morl.fine_tuned,  # DPOK runs of this call (0: all cached)
        "morl_copied": morl.copied,
        "timings": timings,
    }
    write_outputs(out, summary)
    return summary


# ---------------------------------------------------------------------------------------------- outputs
def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _pm(mean: float | None, se: float | None, digits: int = 4) -> str:
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" if se is None else f"{mean:.{digits}f} ± {se:.{digits}f}"


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table_markdown(summary: Mapping[str, Any]) -> str:
    """Two Markdown tables (Table 1 style, then per-w details) and the KL-scale table."""
    names = summary["rewards"]
    weights = summary["config"]["weights"]
    rows = summary["table"]
    by_method: dict[str, dict[float, Mapping[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {})[row["w"]] = row
    head = ["method", *[f"r_w (w={w:g})" for w in weights], "hypervolume", "NFE / base", "time / base"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for cells in by_method.values():
        first = next(iter(cells.values()))
        if "na" in first:
            lines.append(f"| {first['label']} | " + " | ".join([f"n/a: {first['na']}"] + [""] * (len(head) - 2)) + " |")
            continue
        values = [_pm(cells[w]["weighted_reward"], cells[w]["se_weighted_reward"]) for w in weights]
        ess = [cells[w].get("effective_sample_size") for w in weights]
        if any(e is not None for e in ess):
            values = [f"{v} (ESS {e:,.0f})" for v, e in zip(values, ess)]
        nfe = [cells[w].get("nfe_ratio") for w in weights]
        time_ratio = [cells[w].get("time_ratio") for w in weights]
        nfe_text = "n/a (reweights base samples)" if all(v is None for v in nfe) else _ratio_text(
            sum(nfe) / len(nfe))
        time_text = "-" if all(v is None for v in time_ratio) else _ratio_text(sum(time_ratio) / len(time_ratio))
        lines.append(f"| {first['label']} | " + " | ".join([*values, f"{first['hypervolume']:.3e}", nfe_text,
                                                             time_text]) + " |")
    detail_head = ["method", "w", "r_w", "gain in r_w", *names, "win rate vs base", "NFE / sample"]
    detail = ["| " + " | ".join(detail_head) + " |", "|" + " --- |" * len(detail_head)]
    for row in rows:
        if "na" in row:
            detail.append(f"| {row['label']} | {row['w']:g} | n/a: {row['na']} |" + " |" * (len(detail_head) - 3))
            continue
        detail.append("| " + " | ".join([
            row["label"], f"{row['w']:g}", _pm(row["weighted_reward"], row["se_weighted_reward"]),
            f"{row['gain_weighted_reward']:+.4f}", *[_pm(row[f"mean_{n}"], row[f"se_{n}"]) for n in names],
            _fmt(row.get("win_rate"), 3), _fmt(row.get("network_evaluations_per_sample"), 1)]) + " |")
    kl_head = ["lambda", "method", *names, "ESS"]
    kl_lines = ["| " + " | ".join(kl_head) + " |", "|" + " --- |" * len(kl_head)]
    labels = {"base": "base", "mpa": f"DB-KLA ({summary['config']['kl_reward']} expert)",
              "morl": "MORL oracle (alpha / lambda)", "is-oracle": "IS oracle"}
    for row in summary["kl_scales"]:
        ess = row.get("effective_sample_size")
        kl_lines.append("| " + " | ".join([f"{row['kl_scale']:g}", labels[row["method"]],
                                           *[_pm(row[f"mean_{n}"], row[f"se_{n}"]) for n in names],
                                           "" if ess is None else f"{ess:,.0f}"]) + " |")
    sweep = summary["sweep"]
    header = (f"Digits testbed, rewards {names[0]} (weight w) and {names[1]}, alpha = {summary['alpha']:g}, "
              f"DDIM {summary['sampler']['num_inference_steps']} steps eta = {summary['sampler']['eta']:g}; "
              f"{len(sweep['seeds'])} seeds x {sweep['samples_per_seed']} samples per point; CoDe N = "
              f"{sweep['code_candidates']}, block {sweep['code_block_size']}; IS oracle on "
              f"{sweep['oracle_samples']:,} base samples. Hypervolume: each method's points at the table's w, "
              f"common reference point {[round(v, 4) for v in summary['reference_point']]}.")
    return "\n".join([header, "", *lines, "", *detail, "", "KL scale (DB-KLA vs lambda-specific MORL oracles):", "",
                      *kl_lines, ""])


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()


def write_plot(summary: Mapping[str, Any], path: Path) -> None:
    """Three panels: the reward plane (each method's points at the table's w), r_w vs w, KL reward vs lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, second = summary["rewards"]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for row in summary["table"]:
        if "na" not in row:
            by_method.setdefault(row["method"], []).append(row)
    for method, rows in by_method.items():
        label = METHOD_LABELS[method]
        axes[0].plot([r[f"mean_{first}"] for r in rows], [r[f"mean_{second}"] for r in rows], "o-", label=label)
        axes[1].errorbar([r["w"] for r in rows], [r["gain_weighted_reward"] for r in rows],
                         yerr=[r["se_weighted_reward"] or 0.0 for r in rows], marker="o", capsize=3, label=label)
    axes[0].set(
        xlabel=first, ylabel=second, title="rewards at w = " + ", ".join(f"{w:g}" for w in summary["config"]["weights"])
    )
    axes[1].set(xlabel=f"w (weight of {first})", ylabel="r_w gain over the base", title="weighted reward")
    axes[0].legend(fontsize=7)
    kl_reward = summary["config"]["kl_reward"]
    for method, label in (("mpa", "DB-KLA"), ("morl", "MORL oracle (alpha / lambda)"), ("is-oracle", "IS oracle")):
        rows = [r for r in summary["kl_scales"] if r["method"] in (method, "base")]
        axes[2].errorbar([r["kl_scale"] for r in rows], [r[f"mean_{kl_reward}"] for r in rows],
                         yerr=[r[f"se_{kl_reward}"] or 0.0 for r in rows], marker="o", capsize=3, label=label)
    axes[2].set(xlabel="lambda", ylabel=kl_reward, title=f"KL scale: {kl_reward}")
    axes[2].legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def write_outputs(out: Path, summary: Mapping[str, Any]) -> None:
    """``table.csv``, ``kl_scales.csv``, ``table.json``, ``table.md``, ``table.png`` in ``out``."""
    names = summary["rewards"]
    columns = ["method", "label", "w", "weighted_reward", "se_weighted_reward", "gain_weighted_reward",
               *[c for n in names for c in (f"mean_{n}", f"se_{n}")], "win_rate", "hypervolume",
               "network_evaluations_per_sample", "nfe_ratio", "time_ratio", "reward_evaluations_per_sample",
               "effective_sample_size", "num_samples", "na"]
    write_text_atomic(out / "table.csv", _csv_text(summary["table"], columns))
    kl_columns = ["kl_scale", "method", *[c for n in names for c in (f"mean_{n}", f"se_{n}")], "effective_sample_size"]
    write_text_atomic(out / "kl_scales.csv", _csv_text(summary["kl_scales"], kl_columns))
    write_text_atomic(out / "table.json", json.dumps(summary, indent=1, sort_keys=True, default=str))
    write_text_atomic(out / "table.md", table_markdown(summary))
    write_plot(summary, out / "table.png")
