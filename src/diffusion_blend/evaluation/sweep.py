"""Evaluation sweeps: methods x preference grid x seeds over a pluggable setting (paper section 6.1).

A :class:`Setting` bundles what a model family needs: its :class:`~diffusion_blend.denoisers.DenoiserFamily`
(base + one expert per basis reward), rewards, ``decode``, the sampler configuration and the experts' KL weight
``alpha``. :func:`run_sweep` evaluates every *cell* ``(method, preference, seed)``: ``samples_per_seed`` samples
drawn from a generator seeded with ``seed`` (so every method starts from the same initial noise: results are
paired by seed and row), their per-reward scores, network evaluations (rows routed through the family: a DB-MPA
step over m experts counts m; classifier-free guidance doubling is not counted) and wall time per sample. A cell
larger than ``SweepConfig.batch_size`` runs in chunks, each from its own :func:`chunk_seed` generator (the same
for every method, so the pairing holds). Settings: ``gmm`` here, ``sd`` (Stable Diffusion / SDXL with LoRA
experts) in :mod:`.sd_setting`.

Resumable: each finished cell is written atomically to ``cells/<method>/<key>.json`` together with a fingerprint of
the setting and sweep configuration and a checksum of its own record (:func:`cell_checksum`); a rerun skips finished
cells with the same fingerprint and an intact checksum (a cell edited by hand is computed again). Under ``torchrun`` /
``accelerate launch`` the cells still to do are split across processes with
``PartialState().split_between_processes``; every process writes its own cells and rank 0 aggregates after a
barrier (:mod:`.report`-style outputs are written by :func:`aggregate` and :func:`write_reports`).

Methods (:data:`METHODS`): ``base`` (pre-trained model), ``mpa`` (DB-MPA / DB-KLA / combined), ``ls`` (DB-MPA-LS),
``rs-factors`` / ``rs-deltas`` (Rewarded Soup, LoRA families only), ``code`` (CoDe), ``rgg`` (reward-gradient
guidance; differentiable rewards only), ``is-oracle`` (importance-weighted oracle of the exact target from
``oracle_samples`` base samples, or, with ``Setting.oracle_from_base``, from the sweep's own base cells per prompt;
no sampler, so no win rate or cost), ``morl`` (the setting's MORL oracle),
``smc`` (sequential Monte Carlo with the blend as proposal, :func:`~diffusion_blend.smc.smc_sample`, ``particles``
per sample) and ``fk`` (FK steering: the same sampler with the base as proposal, ``fk_particles`` per sample). SMC
cells also record reward evaluations per sample (basis rewards) and every sample's final effective sample size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from diffusion_blend.baselines.code import code_sample
from diffusion_blend.baselines.guidance import guided_sample
from diffusion_blend.baselines.morl import preference_key
from diffusion_blend.baselines.rewarded_soup import rewarded_soup_denoiser
from diffusion_blend.denoisers import (
    BlendedDenoiser,
    Denoiser,
    DenoiserFamily,
    Member,
    SwitchingDenoiser,
)
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.evaluation.oracle import importance_weighted_oracle
from diffusion_blend.evaluation.pareto import (
    common_reference_point,
    hypervolume,
    pareto_front,
)
from diffusion_blend.evaluation.stats import mean_and_standard_error
from diffusion_blend.files import atomic_write, remove_partial_files, write_json_atomic
from diffusion_blend.lora import LoraFamily
from diffusion_blend.preference import BASE, BlendTarget, Preference
from diffusion_blend.rewards.weighted import active_rewards, weighted_reward_scores
from diffusion_blend.sampling import sample
from diffusion_blend.smc import BLENDED, SMCOptions, smc_sample

REPORT_DIR = "report"
"""The sweep's page and plots: ``OUT/report/index.html``, as the demo's."""
METHODS = ("base", "mpa", "ls", "rs-factors", "rs-deltas", "code", "rgg", "is-oracle", "morl", "smc", "fk")


class CountingFamily(DenoiserFamily):
    """Wraps a family and counts the rows it routes (one row = one network evaluation of one sample)."""

    def __init__(self, family: DenoiserFamily):
        self.family = family
        self.expert_names = family.expert_names
        self.rows = 0

    def route(self, x_t: torch.Tensor, t: Any, members: Sequence[Member], **cond: Any) -> torch.Tensor:
        self.rows += len(members)
        return self.family.route(x_t, t, members, **cond)


@dataclass
class Setting:
    """A model family to evaluate on (see module docstring).

    ``rewards[name](decoded)`` (or ``(decoded, prompts)`` when the setting has prompts) gives one value per sample.
    ``scheduler_factory()`` returns a fresh diffusers DDIM/DDPM scheduler. ``sample_shape`` is one sample's shape.
    ``prompts`` (text models) are cycled over the rows of a batch; ``encode_prompts(prompts) -> cond kwargs``.
    ``morl_denoiser(preference)`` returns the MORL oracle's denoiser (e.g. via
    :class:`~diffusion_blend.baselines.morl.MorlOracle`). ``draw_base_samples(n, generator)`` gives exact base draws
    for the importance-weighted oracle when available (else the base model is sampled). ``options`` are recorded in
    every cell's fingerprint.

    ``morl_covers(preference)``: whether the MORL oracle has a model for that preference (MORL cells run only
    there; ``None``: every preference). ``oracle_from_base``: the ``is-oracle`` rows reweight the sweep's own
    ``base`` cells, self-normalised per prompt (:func:`oracle_record_from_base`; no extra sampling, no cells of
    its own) instead of drawing ``oracle_samples`` base samples. ``preview_images``: how many decoded samples of
    every cell are written as one small PNG strip (``images/<method>/<key>.png``, the HTML report's image grid;
    0 for non-image settings). ``device``: where latents are drawn and the networks run. ``smc_proposal``: the SMC
    proposal the setting's experts suit when the sweep does not choose one (:mod:`~diffusion_blend.smc`: ``"blend"``
    for experts trained on the sampler's own chain, ``"twisted"`` for continuous-time experts such as exact scores).
    """

    name: str
    family: DenoiserFamily
    rewards: Mapping[str, Callable[..., torch.Tensor]]
    scheduler_factory: Callable[[], Any]
    sample_shape: tuple[int, ...]
    alpha: float | None  # the experts' one KL weight; None when they differ (then ``alphas``)
    decode: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    num_inference_steps: int = 50
    eta: float = 1.0
    prompts: Sequence[str] | None = None
    encode_prompts: Callable[[list[str]], Mapping[str, Any]] | None = None
    morl_denoiser: Callable[[Preference], Denoiser] | None = None
    draw_base_samples: Callable[[int, torch.Generator], torch.Tensor] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    morl_covers: Callable[[Preference], bool] | None = None
    oracle_from_base: bool = False
    preview_images: int = 0
    device: str = "cpu"
    smc_proposal: str = "blend"
    alphas: Mapping[str, float] | None = None  # per basis reward, when the experts' KL weights differ
    target_alpha: float | None = None  # blend toward p_pre exp(lambda r_w / target_alpha) (BlendTarget)

    def target(self, preference: Preference) -> BlendTarget:
        """The distribution each method of a cell samples toward (:class:`~diffusion_blend.preference.BlendTarget`):
        the experts' own alphas (``alphas``, else ``alpha`` for every reward), rescaled by ``target_alpha``."""
        alphas = dict(self.alphas) if self.alphas is not None else {name: self.alpha for name in self.rewards}
        return BlendTarget(preference, alphas, self.target_alpha)

    def supports(self, method: str) -> str | None:
        """``None`` if ``method`` can run on this setting, else the reason it cannot."""
        if method not in METHODS:
            return f"unknown method {method!r}; choose from {', '.join(METHODS)}"
        if method.startswith("rs-") and not isinstance(self.family, LoraFamily):
            return f"{method} (Rewarded Soup) needs the experts as LoRA adapters of one network"
        if method == "rgg":
            flat = [n for n, r in self.rewards.items() if getattr(r, "differentiable", True) is False]
            if flat:
                return f"rgg needs differentiable rewards; {', '.join(flat)} is not"
        if method == "morl" and self.morl_denoiser is None:
            return "morl needs the setting's MORL oracle (no morl_denoiser given)"
        return None


@dataclass
class SweepConfig:
    """What to sweep and the baselines' hyper-parameters (paper sections 5.2-5.3 defaults)."""

    methods: Sequence[str]
    preferences: Sequence[Preference]
    seeds: Sequence[int] = (0, 1)
    samples_per_seed: int = 64
    code_candidates: int = 20
    code_block_size: int = 5
    rgg_scale: float = 1.0
    rgg_normalize: bool = False
    rgg_tempering: bool = True
    oracle_samples: int = 20_000
    oracle_seed: int = 12345
    particles: int = SMCOptions.particles  # the one default of every SMC entry point
    fk_particles: int | None = None  # None: as many as ``particles``
    smc_proposal: str | None = None  # None: the setting's (Setting.smc_proposal)
    smc_proposal_tilt: float | str = "auto"  # 'auto': learned from the run (smc.TiltAdapter)
    smc_potential: str = "tweedie"
    smc_potential_every: int = 1
    smc_ess_threshold: float = 0.5
    batch_size: int | None = None  # rows per network batch within a cell (None: the whole cell in one batch)

    def __post_init__(self) -> None:
        if not self.methods or not self.preferences or not self.seeds:
            raise DiffusionBlendError("a sweep needs at least one method, one preference and one seed")
        if int(self.samples_per_seed) < 1 or int(self.oracle_samples) < 2:
            raise DiffusionBlendError("samples_per_seed must be >= 1 and oracle_samples >= 2")
        if self.fk_particles is None:
            self.fk_particles = self.particles
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise DiffusionBlendError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.smc_proposal not in (None, *BLENDED):
            raise DiffusionBlendError(f"smc_proposal must be one of {', '.join(BLENDED)}, got {self.smc_proposal!r}")
        self.smc_options("blend")  # validates the SMC fields once, here (SMCOptions)
        self.smc_options("base")  # and FK steering's

    def smc_options(self, proposal: str) -> SMCOptions:
        """The :class:`~diffusion_blend.smc.SMCOptions` of the ``smc`` cells (``proposal``: the blend's or the
        twisted step) or, with ``proposal="base"``, of FK steering's (its own particle count; the Tweedie potential
        where the sweep asks for the experts', which FK has none of)."""
        if proposal == "base":
            potential = "tweedie" if self.smc_potential == "experts" else self.smc_potential
            return SMCOptions(particles=self.fk_particles, proposal="base", potential=potential,
                              ess_threshold=self.smc_ess_threshold, potential_every=self.smc_potential_every)
        return SMCOptions(particles=self.particles, proposal=proposal, potential=self.smc_potential,
                          proposal_tilt=self.smc_proposal_tilt, ess_threshold=self.smc_ess_threshold,
                          potential_every=self.smc_potential_every)

    def hyperparameters(self) -> dict[str, Any]:
        skip = {"methods", "preferences", "seeds"}
        if not {"smc", "fk"} & set(self.methods):  # SMC settings do not touch other methods' cells (cache stays valid)
            skip |= {"particles", "fk_particles", "smc_proposal", "smc_proposal_tilt", "smc_potential",
                     "smc_potential_every", "smc_ess_threshold"}
        if self.batch_size is None or int(self.batch_size) >= int(self.samples_per_seed):  # one chunk: seed as is
            skip.add("batch_size")
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass(frozen=True)
class Cell:
    method: str
    preference: Preference | None  # None: the base model (preference-free)
    seed: int

    @property
    def key(self) -> str:
        pref = "none" if self.preference is None else preference_key(self.preference, 0.0)
        return f"{pref}_s{self.seed}"


def smc_proposal(setting: Setting, config: SweepConfig) -> str:
    """The proposal of the sweep's ``smc`` cells: the sweep's choice, else the setting's."""
    return config.smc_proposal or setting.smc_proposal


def fingerprint(setting: Setting, config: SweepConfig) -> str:
    payload = {
        "setting": setting.name,
        "options": dict(setting.options),
        "steps": setting.num_inference_steps,
        "eta": setting.eta,
        "alpha": setting.alpha,
        "rewards": sorted(setting.rewards),
        "shape": list(setting.sample_shape),
        "prompts": list(setting.prompts or []),
        "hyper": config.hyperparameters(),
    }
    if setting.alphas is not None or setting.target_alpha is not None:  # (absent otherwise: cached cells stay valid)
        payload.update(alphas=dict(setting.alphas or {}), target_alpha=setting.target_alpha)
    if "smc_proposal" in payload["hyper"]:
        payload["hyper"]["smc_proposal"] = smc_proposal(setting, config)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cells_of(setting: Setting, config: SweepConfig) -> list[Cell]:
    """Every cell of the sweep; ``base`` once per seed, ``is-oracle`` once per preference."""
    for method in dict.fromkeys(config.methods):
        reason = setting.supports(method)
        if reason:
            raise DiffusionBlendError(reason)
    for preference in config.preferences:
        preference.coefficients(setting.family.expert_names)  # validates reward names
    if "morl" in config.methods and setting.morl_covers is not None:
        if not any(setting.morl_covers(p) for p in config.preferences):
            raise DiffusionBlendError("morl: no MORL model matches any preference of the sweep (give one per w)")
    cells = [Cell("base", None, int(seed)) for seed in config.seeds]
    for method in dict.fromkeys(config.methods):
        if method == "base" or (method == "is-oracle" and setting.oracle_from_base):
            continue  # the base-reweighting oracle is computed from the base cells (run_sweep)
        for preference in dict.fromkeys(config.preferences):
            if method == "is-oracle":
                cells.append(Cell(method, preference, config.oracle_seed))
                continue
            if method == "morl" and setting.morl_covers is not None and not setting.morl_covers(preference):
                continue
            cells.extend(Cell(method, preference, int(seed)) for seed in config.seeds)
    return cells


def cell_path(out_dir: Path, cell: Cell) -> Path:
    return out_dir / "cells" / cell.method / f"{cell.key}.json"


def _conditioning(setting: Setting, batch: int, offset: int = 0) -> tuple[list[str] | None, dict[str, Any]]:
    """Prompts of rows ``offset .. offset + batch - 1`` of a cell (row ``b`` has prompt ``b mod P``) and their
    encoded conditioning."""
    if not setting.prompts:
        return None, {}
    prompts = [setting.prompts[(offset + b) % len(setting.prompts)] for b in range(batch)]
    cond = dict(setting.encode_prompts(prompts)) if setting.encode_prompts else {}
    return prompts, cond


def _score(setting: Setting, samples: torch.Tensor, prompts: list[str] | None,
           keep: int = 0) -> tuple[dict[str, list[float]], torch.Tensor | None]:
    """Per-reward scores of the decoded samples, and the first ``keep`` decoded images (``None`` if 0)."""
    with torch.no_grad():
        images = setting.decode(samples)
    scores = {}
    for name, reward in setting.rewards.items():
        values = reward(images) if prompts is None else reward(images, prompts)
        values = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
        if values.shape != (samples.shape[0],) or not torch.isfinite(values).all():
            raise DiffusionBlendError(f"reward {name!r} must return one finite value per sample")
        scores[name] = values.tolist()
    return scores, (images[:keep].detach().float().cpu() if keep > 0 else None)


def _oracle_cell(setting: Setting, config: SweepConfig, cell: Cell) -> dict[str, Any]:
    batch = int(config.oracle_samples)
    prompts, cond = _conditioning(setting, batch)
    if setting.draw_base_samples is not None:
        samples = setting.draw_base_samples(batch, torch.Generator().manual_seed(cell.seed))
    else:
        with torch.no_grad():
            samples = sample(
                setting.family.member(BASE), setting.scheduler_factory(), generator=cell.seed,
                shape=(batch, *setting.sample_shape), num_inference_steps=setting.num_inference_steps, eta=setting.eta,
                cond=cond, progress=False, device=setting.device,
            ).samples
    scores, _ = _score(setting, samples, prompts)
    tilt, alpha = setting.target(cell.preference).tilt()
    estimate = importance_weighted_oracle({k: torch.tensor(v) for k, v in scores.items()}, tilt, alpha)
    return {
        "expected_rewards": estimate.expected_rewards,
        "standard_errors": estimate.standard_errors,
        "effective_sample_size": estimate.effective_sample_size,
        "num_base_samples": estimate.num_samples,
    }


def chunk_seed(seed: int, index: int, chunks: int) -> int:
    """The generator seed of chunk ``index`` of a cell split into ``chunks`` network batches: the cell's seed when
    it is one batch, else a hash of ``(seed, index)``; equal for every method, so methods stay paired."""
    if chunks == 1:
        return int(seed)
    return int.from_bytes(hashlib.sha256(f"{int(seed)}/{int(index)}".encode()).digest()[:7], "big")


def _sample_chunk(setting: Setting, config: SweepConfig, cell: Cell, counting: CountingFamily, rows: int,
                  offset: int, seed: int) -> tuple[torch.Tensor, list[str] | None, dict[str, Any]]:
    """``rows`` samples of ``cell.method`` (rows ``offset ..`` of the cell) from a generator seeded ``seed``."""
    shape = (rows, *setting.sample_shape)
    prompts, cond = _conditioning(setting, rows, offset)
    scheduler = setting.scheduler_factory()
    common = dict(generator=seed, shape=shape, num_inference_steps=setting.num_inference_steps, eta=setting.eta,
                  cond=cond, progress=False, device=setting.device)
    method = cell.method
    if method == "base":  # preference-free
        with torch.no_grad():
            return sample(counting.member(BASE), scheduler, **common).samples, prompts, {}
    target = setting.target(cell.preference)
    preference, (tilt, alpha) = target.blend(), target.tilt()  # the blended experts; the target's exponent
    extra: dict[str, Any] = {}
    if method in ("mpa", "ls", "morl", "rs-factors", "rs-deltas"):
        if method == "mpa":
            denoiser: Denoiser = BlendedDenoiser(counting, preference)
        elif method == "ls":
            denoiser = SwitchingDenoiser(counting, preference,
                                         torch.Generator().manual_seed((10_007 * seed + 1) % 2**63))
        elif method == "morl":
            inner = setting.morl_denoiser(cell.preference)

            def denoiser(x_t, t, **kw):  # noqa: E306 - count one evaluation per row
                counting.rows += x_t.shape[0]
                return inner(x_t, t, **kw)
        else:
            soup = rewarded_soup_denoiser(setting.family, preference, variant=method.split("-", 1)[1])

            def denoiser(x_t, t, **kw):  # noqa: E306
                counting.rows += x_t.shape[0]
                return soup(x_t, t, **kw)
        with torch.no_grad():
            samples = sample(denoiser, scheduler, **common).samples
    elif method == "code":
        out = code_sample(
            counting.member(BASE), scheduler, rewards=setting.rewards, preference=tilt, decode=setting.decode,
            prompts=prompts, num_candidates=config.code_candidates, block_size=config.code_block_size, **common,
        )
        samples = out.samples
        extra["reward_evaluations"] = out.reward_evaluations
    elif method == "rgg":
        out = guided_sample(
            counting.member(BASE), scheduler, rewards=setting.rewards, preference=tilt, alpha=alpha,
            decode=setting.decode, prompts=prompts, guidance_scale=config.rgg_scale,
            normalize_gradient=config.rgg_normalize, tempering=config.rgg_tempering, **common,
        )
        samples = out.samples
        extra["reward_evaluations"] = out.reward_evaluations
    elif method in ("smc", "fk"):
        options = config.smc_options(smc_proposal(setting, config) if method == "smc" else "base")
        particles = options.particles

        def potential(x: torch.Tensor) -> torch.Tensor:  # the target's r of decoded particles (prompts tiled)
            return weighted_reward_scores(setting.rewards, tilt, setting.decode(x),
                                          None if prompts is None else list(prompts) * particles)

        # FK steering proposes from the base: no experts to take a potential from, so Tweedie (its own choice)
        out = smc_sample(counting, preference, scheduler, reward=potential, alpha=alpha, options=options, **common)
        samples = out.samples
        extra["reward_evaluations"] = out.reward_evaluations * len(active_rewards(setting.rewards, tilt))
        extra["final_ess"] = out.final_ess.tolist()
        extra["particles"] = particles
    else:
        raise DiffusionBlendError(f"unknown method {method!r}")
    return samples, prompts, extra


def oracle_record_from_base(base_records: Sequence[Mapping[str, Any]], preference: Preference,
                            target: BlendTarget | float, num_prompts: int = 1) -> dict[str, Any]:
    """The ``is-oracle`` record of ``preference`` from the sweep's base cells (no sampling).

    Row ``b`` of every base cell has prompt ``b mod num_prompts``. Per prompt ``c``, the base samples of ``c``
    (all seeds) are reweighted by ``exp(lambda r_w / alpha)``, self-normalised within the prompt
    (:func:`~diffusion_blend.evaluation.oracle.importance_weighted_oracle`): the target ``p_pre(x | c)
    exp(lambda r_w(x, c) / alpha)`` is tilted per prompt, not across prompts. The estimate is the mean over prompts
    (prompts equally likely), its standard error ``sqrt(sum_c se_c^2) / P``, its ESS the sum of the prompts' ESS.
    """
    if not base_records:
        raise DiffusionBlendError("the base-reweighting oracle needs the base cells (add method 'base')")
    if not isinstance(target, BlendTarget):  # one alpha for every reward
        target = BlendTarget(preference, {name: float(target) for name in preference.weights})
    tilt, alpha = target.tilt()
    names = list(base_records[0]["rewards"])
    per_prompt: list[dict[str, list[float]]] = [{n: [] for n in names} for _ in range(int(num_prompts))]
    for record in sorted(base_records, key=lambda r: r["seed"]):
        for name in names:
            for row, value in enumerate(record["rewards"][name]):
                per_prompt[row % num_prompts][name].append(value)
    estimates = [importance_weighted_oracle({n: torch.tensor(v, dtype=torch.float64) for n, v in group.items()},
                                            tilt, alpha) for group in per_prompt if group[names[0]]]
    count = len(estimates)
    return {
        "method": "is-oracle",
        "seed": None,
        "weights": dict(preference.weights),
        "kl_scale": preference.kl_scale,
        "expected_rewards": {n: sum(e.expected_rewards[n] for e in estimates) / count for n in names},
        "standard_errors": {n: math.sqrt(sum(e.standard_errors[n] ** 2 for e in estimates)) / count for n in names},
        "effective_sample_size": sum(e.effective_sample_size for e in estimates),
        "num_base_samples": sum(e.num_samples for e in estimates),
        "wall_time_per_sample": None,
        "network_evaluations_per_sample": None,
    }


def run_cell(
    setting: Setting, config: SweepConfig, cell: Cell, out_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Evaluate one cell; returns its JSON record (without the fingerprint).

    The cell's ``samples_per_seed`` rows go through the network in chunks of ``config.batch_size`` rows (each chunk
    from its own :func:`chunk_seed` generator). With ``out_dir`` and ``setting.preview_images > 0`` the first
    decoded samples are written as ``out_dir/images/<method>/<key>.png`` (record key ``"images"``).
    """
    record: dict[str, Any] = {
        "method": cell.method,
        "seed": cell.seed,
        "weights": None if cell.preference is None else dict(cell.preference.weights),
        "kl_scale": None if cell.preference is None else cell.preference.kl_scale,
    }
    if cell.method == "is-oracle":
        record.update(_oracle_cell(setting, config, cell))
        record["wall_time_per_sample"] = None
        record["network_evaluations_per_sample"] = None
        return record
    batch = int(config.samples_per_seed)
    size = min(int(config.batch_size or batch), batch)
    starts = list(range(0, batch, size))
    counting = CountingFamily(setting.family)
    scores: dict[str, list[float]] = {name: [] for name in setting.rewards}
    previews: list[torch.Tensor] = []
    reward_evaluations, final_ess, particles, elapsed = 0.0, [], None, 0.0
    for index, offset in enumerate(starts):
        rows = min(size, batch - offset)
        start = time.perf_counter()
        samples, prompts, extra = _sample_chunk(setting, config, cell, counting, rows, offset,
                                                chunk_seed(cell.seed, index, len(starts)))
        elapsed += time.perf_counter() - start
        keep = max(0, int(setting.preview_images) - sum(len(p) for p in previews)) if out_dir is not None else 0
        chunk_scores, images = _score(setting, samples, prompts, keep)
        for name, values in chunk_scores.items():
            scores[name].extend(values)
        if images is not None:
            previews.append(images)
        reward_evaluations += extra.get("reward_evaluations", 0.0) * rows
        final_ess.extend(extra.get("final_ess", []))
        particles = extra.get("particles", particles)
        has_reward_cost = "reward_evaluations" in extra
    record["rewards"] = scores
    record["network_evaluations_per_sample"] = counting.rows / batch
    record["wall_time_per_sample"] = elapsed / batch
    if has_reward_cost:
        record["reward_evaluations_per_sample"] = reward_evaluations / batch
    if particles is not None:
        record["final_ess"] = final_ess
        record["particles"] = particles
    if previews:
        from diffusion_blend.evaluation.html import write_image_strip

        relative = Path("images") / cell.method / f"{cell.key}.png"
        write_image_strip(torch.cat(previews), Path(out_dir) / relative)
        record["images"] = relative.as_posix()
    return record


def cell_checksum(record: Mapping[str, Any]) -> str:
    """SHA-256 (16 hex digits) of a cell's record without its ``checksum``: a cell edited by hand or damaged after it
    was written no longer matches, and a rerun computes it again."""
    body = {key: value for key, value in record.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode()).hexdigest()[:16]


def _finished(path: Path, print_: str, say: bool = True) -> bool:
    """Whether ``path`` holds this sweep's finished cell: the setting's and sweep's fingerprint, and its own checksum
    (a cell that fails it is computed again, with a line on stderr when ``say``)."""
    if not path.exists():
        return False
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict) or record.get("fingerprint") != print_:
        return False
    try:
        intact = record.get("checksum") == cell_checksum(record)
    except (TypeError, ValueError):  # a value JSON cannot hold (NaN typed in by hand)
        intact = False
    if not intact and say:
        print(f"evaluate: cell {path} does not match its checksum (edited or damaged after it was written); "
              "computing it again", file=sys.stderr)
    return intact


def run_sweep(
    setting: Setting, config: SweepConfig, out_dir: str | os.PathLike, *, progress: bool = True
) -> dict[str, Any] | None:
    """Run the unfinished cells (split across processes), then aggregate and write reports on rank 0.

    Returns the aggregate (rank 0) or ``None`` (other ranks); its ``"cells_run"`` is the number of cells this
    call computed over all processes (0 when everything was already finished).
    """
    out = Path(out_dir)
    state = PartialState(cpu=not torch.cuda.is_available())  # CPU runs under torchrun need cpu=True (gloo)
    print_ = fingerprint(setting, config)
    cells = cells_of(setting, config)
    if state.is_main_process:
        remove_partial_files(out)  # what a killed run was writing (files.atomic_path)
    todo = [cell for cell in cells if not _finished(cell_path(out, cell), print_, say=state.is_main_process)]
    state.wait_for_everyone()  # every process has listed the same unfinished cells before anyone writes
    with state.split_between_processes(todo) as mine:
        for cell in tqdm(mine, desc=f"evaluate [rank {state.process_index}]", disable=not progress):
            record = run_cell(setting, config, cell, out)
            record["fingerprint"] = print_
            record["process_index"] = state.process_index
            record = json.loads(json.dumps(record, allow_nan=False))  # the values as the file will hold them
            record["checksum"] = cell_checksum(record)
            write_json_atomic(cell_path(out, cell), record, sort_keys=True, allow_nan=False)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    records = [json.loads(cell_path(out, cell).read_text()) for cell in cells]
    if "is-oracle" in config.methods and setting.oracle_from_base:
        base_records = [r for r in records if r["method"] == "base"]
        num_prompts = len(setting.prompts) if setting.prompts else 1
        records += [oracle_record_from_base(base_records, p, setting.target(p), num_prompts)
                    for p in dict.fromkeys(config.preferences)]
    result = aggregate(records, list(setting.rewards))
    result["cells_run"] = len(todo)
    result["setting"] = {"name": setting.name, "options": dict(setting.options), "alpha": setting.alpha,
                         "alphas": None if setting.alphas is None else dict(setting.alphas),
                         "target_alpha": setting.target_alpha,
                         "num_inference_steps": setting.num_inference_steps, "eta": setting.eta}
    result["sweep"] = {"methods": list(config.methods), "seeds": list(config.seeds), **config.hyperparameters()}
    from diffusion_blend.evaluation.html import write_html
    from diffusion_blend.evaluation.plots import write_plots

    write_tables(result, out)
    result["plots"] = {kind: f"{REPORT_DIR}/{name}" for kind, name in write_plots(result, out / REPORT_DIR).items()}
    write_json_atomic(out / "results.json", _json_safe(result), sort_keys=True, allow_nan=False)
    result["report"] = str(write_html(result, out / REPORT_DIR / "index.html"))
    return result


def _rw(rewards: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> np.ndarray:
    return sum(float(w) * np.asarray(rewards[n], dtype=np.float64) for n, w in weights.items())


def aggregate(records: Sequence[Mapping[str, Any]], reward_names: Sequence[str]) -> dict[str, Any]:
    """Rows per (method, preference) with means, standard errors, gains, win rates; fronts and hypervolumes."""
    base = {r["seed"]: r["rewards"] for r in records if r["method"] == "base"}
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        if record["method"] == "base":
            continue
        pref = Preference(record["weights"], record["kl_scale"])
        groups.setdefault((record["method"], str(pref)), []).append(record)
    preferences = {str(Preference(r["weights"], r["kl_scale"])): Preference(r["weights"], r["kl_scale"])
                   for r in records if r["method"] != "base"}
    rows = []
    for pref_label, preference in preferences.items():
        base_all = {n: np.concatenate([np.asarray(base[s][n]) for s in sorted(base)]) for n in reward_names}
        base_images = {r["seed"]: r.get("images") for r in records if r["method"] == "base"}
        base_row = _sample_row("base", preference,
                               [{"seed": s, "rewards": base[s], "images": base_images[s]} for s in sorted(base)],
                               base, reward_names, base_all)
        base_row["network_evaluations_per_sample"] = _mean_field(
            [r for r in records if r["method"] == "base"], "network_evaluations_per_sample")
        base_row["wall_time_per_sample"] = _mean_field(
            [r for r in records if r["method"] == "base"], "wall_time_per_sample"
        )
        rows.append(base_row)
        for (method, label), group in groups.items():
            if label != pref_label:
                continue
            if method == "is-oracle":
                rows.append(_oracle_row(group[0], preference, reward_names, base_all))
            else:
                row = _sample_row(method, preference, group, base, reward_names, base_all)
                row["network_evaluations_per_sample"] = _mean_field(group, "network_evaluations_per_sample")
                row["wall_time_per_sample"] = _mean_field(group, "wall_time_per_sample")
                if "reward_evaluations_per_sample" in group[0]:
                    row["reward_evaluations_per_sample"] = _mean_field(group, "reward_evaluations_per_sample")
                if "final_ess" in group[0]:
                    row["final_ess_mean"] = float(np.mean(np.concatenate([g["final_ess"] for g in group])))
                    row["particles"] = group[0]["particles"]
                rows.append(row)
    fronts, points = {}, {}
    for row in rows:
        points.setdefault(row["method"], []).append([row[f"mean_{n}"] for n in reward_names])
    reference = common_reference_point([np.asarray(p) for p in points.values()]).tolist()
    for method, pts in points.items():
        fronts[method] = {
            "points": pareto_front(np.unique(np.asarray(pts), axis=0)).tolist(),
            "hypervolume": hypervolume(np.asarray(pts), reference),
        }
    return {"reward_names": list(reward_names), "rows": rows, "fronts": fronts, "reference_point": reference}


def _mean_field(group: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = [g[key] for g in group if g.get(key) is not None]
    return float(np.mean(values)) if values else None


def _sample_row(method, preference, group, base, reward_names, base_all) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method, "weights": dict(preference.weights), "kl_scale": preference.kl_scale}
    stacked = {n: np.concatenate([np.asarray(g["rewards"][n]) for g in group]) for n in reward_names}
    for name in reward_names:
        mean, se = mean_and_standard_error(torch.from_numpy(stacked[name]))
        row[f"mean_{name}"], row[f"se_{name}"] = mean, se
        row[f"gain_{name}"] = mean - float(base_all[name].mean())
    weighted = _rw(stacked, preference.weights)
    row["weighted_reward"], row["se_weighted_reward"] = mean_and_standard_error(torch.from_numpy(weighted))
    row["gain_weighted_reward"] = row["weighted_reward"] - float(_rw(base_all, preference.weights).mean())
    wins = []
    for g in group:  # paired by seed and row: the same seed gives the same initial noise
        if g["seed"] in base:
            ours, theirs = _rw(g["rewards"], preference.weights), _rw(base[g["seed"]], preference.weights)
            if ours.shape == theirs.shape:
                wins.append((ours > theirs) + 0.5 * (ours == theirs))
    row["win_rate"] = float(np.concatenate(wins).mean()) if wins else None
    row["num_samples"] = int(weighted.size)
    row["images"] = [g["images"] for g in sorted(group, key=lambda g: g["seed"]) if g.get("images")]
    return row


def _oracle_row(record, preference, reward_names, base_all) -> dict[str, Any]:
    row: dict[str, Any] = {"method": "is-oracle", "weights": dict(preference.weights), "kl_scale": preference.kl_scale}
    for name in reward_names:
        row[f"mean_{name}"] = record["expected_rewards"][name]
        row[f"se_{name}"] = record["standard_errors"][name]
        row[f"gain_{name}"] = record["expected_rewards"][name] - float(base_all[name].mean())
    row["weighted_reward"] = sum(w * record["expected_rewards"][n] for n, w in preference.weights.items())
    row["se_weighted_reward"] = None  # the per-reward errors are correlated; see the per-reward columns
    row["gain_weighted_reward"] = row["weighted_reward"] - float(_rw(base_all, preference.weights).mean())
    row["win_rate"] = None
    row["num_samples"] = record["num_base_samples"]
    row["effective_sample_size"] = record["effective_sample_size"]
    row["network_evaluations_per_sample"] = None
    row["wall_time_per_sample"] = None
    return row


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_tables(result: Mapping[str, Any], out_dir: Path) -> None:
    """``results.csv``: one row per (method, preference), weights as ``w_<name>`` columns."""
    import csv

    names = result["reward_names"]
    columns = ["method", *[f"w_{n}" for n in names], "kl_scale"]
    for name in names:
        columns += [f"mean_{name}", f"se_{name}", f"gain_{name}"]
    columns += ["weighted_reward", "se_weighted_reward", "gain_weighted_reward", "win_rate",
                "network_evaluations_per_sample", "reward_evaluations_per_sample", "wall_time_per_sample",
                "num_samples", "effective_sample_size", "particles", "final_ess_mean"]
    with atomic_write(out_dir / "results.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"]:
            flat = {**row, **{f"w_{n}": row["weights"].get(n, 0.0) for n in names}}
            writer.writerow({k: ("" if v is None else v) for k, v in flat.items()})


def parse_preference_grid(
    reward_names: Sequence[str], weights: str | None, grid: int | None, kl_scales: Sequence[float]
) -> list[Preference]:
    """Preferences from ``"a=0.2,b=0.8;a=0.5,b=0.5"`` or an evenly spaced 2-reward grid, times each KL scale."""
    if weights:
        bases = [Preference.parse(part).weights for part in weights.split(";") if part.strip()]
    elif grid:
        if len(reward_names) != 2:
            raise DiffusionBlendError(
                f"--grid needs exactly 2 rewards, the setting has {len(reward_names)}; use --weights"
            )
        if int(grid) < 2:
            raise DiffusionBlendError("--grid needs at least 2 points")
        first, second = reward_names
        bases = [{first: float(w), second: float(1 - w)} for w in np.linspace(0.0, 1.0, int(grid)).round(10)]
    else:
        raise DiffusionBlendError("give --weights or --grid")
    return [Preference(b, k) for k in kl_scales for b in bases]
