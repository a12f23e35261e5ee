"""The ``sd`` evaluation setting: a diffusers base of any kind (Stable Diffusion 1.x/2.x, SDXL, SD3/3.5, FLUX) with one
LoRA expert per basis reward (paper sections 5-6: SD 1.5, DDIM eta = 1, 50 steps, CFG 7.5; flow bases with the
flow SDE at the kind's noise level), behind the same sweep as every other setting.

:func:`sd_setting` builds a :class:`~diffusion_blend.evaluation.sweep.Setting` from

- the base pipeline (a local folder or hub id; its kind from ``model_index.json`` or ``kind``), opened as a
  :class:`~diffusion_blend.pipelines.session.BlendSession` and wrapped by the kind's fine-tuning target
  (:func:`~diffusion_blend.pipelines.sd_target.sd_finetune_target` or
  :func:`~diffusion_blend.pipelines.flow_target.flow_finetune_target`), whose guided forward (one ``[uncond; cond]``
  batch; SDXL's added conditioning; FLUX's distilled guidance), prompt encoding, sampler (DDIM, or the flow SDE)
  and VAE decode to ``[0, 1]`` images are reused as they are;
- the experts (diffusers LoRA files, e.g. the ``pytorch_lora_weights.safetensors`` of ``dblend finetune --kind
  sd``), loaded into the one UNet with diffusers' LoRA loader; the family is a
  :class:`~diffusion_blend.lora.LoraFamily` on that UNet, so DB-MPA, DB-MPA-LS, Rewarded Soup (both variants), CoDe,
  RGG, SMC/FK and the base run exactly as in the other settings;
- registry rewards scored on the decoded images (with the prompts), a prompts file (row ``b`` of every cell gets
  prompt ``b mod P``; every method draws the same initial noise for the same seed, so results are paired per
  prompt and seed), optional MORL adapters (one per preference) and the IS oracle reweighting the sweep's own base
  samples per prompt (``oracle_from_base``).

The experts' KL weight ``alpha`` comes from their metadata (:class:`~diffusion_blend.adapters.AdapterMetadata`, which
``dblend finetune`` writes into the LoRA file's header). An expert fine-tuned on ``v r_i`` (reward weight ``v``) at
KL weight ``alpha_i`` targets ``p_pre exp(r_i / (alpha_i / v))``, so its effective alpha for ``r_i`` is
``alpha_i / v``. Experts whose effective alphas differ, or whose base fingerprints differ (from each other or from the
loaded base), are refused in one line: the blend ``c_i = lambda w_i`` assumes one alpha and one base for all.
Adapters without our metadata (foreign LoRA files) need ``alpha`` given and cannot be checked against the base.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.evaluation.sweep import Setting
from diffusion_blend.lora import LoraFamily
from diffusion_blend.preference import BlendTarget, Preference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MATCH_TOLERANCE = 1e-6


def _file_digest(source: str | os.PathLike) -> str:
    """SHA-256 of the adapter's weights file(s) (part of every cell's fingerprint: a retrained expert reruns)."""
    path = Path(source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def parse_morl(items: Sequence[str], reward_names: Sequence[str]) -> list[tuple[dict[str, float], str]]:
    """``--morl W=PATH`` items: ``W`` is the first reward's weight (two rewards: ``w = (W, 1 - W)``) or the weights
    in ``--rewards`` order separated by ``:`` (``0.2:0.3:0.5``)."""
    parsed = []
    for item in items:
        spec, sep, path = item.partition("=")
        if not sep or not spec.strip() or not path.strip():
            raise DiffusionBlendError(f"cannot parse --morl {item!r}: expected W=PATH")
        try:
            values = [float(part) for part in spec.split(":")]
        except ValueError:
            raise DiffusionBlendError(f"cannot parse the weights of --morl {item!r}: expected numbers like 0.3 or "
                                      "0.3:0.7") from None
        if len(values) == 1 and len(reward_names) == 2:
            values = [values[0], 1.0 - values[0]]
        if len(values) != len(reward_names) or not all(math.isfinite(v) for v in values):
            raise DiffusionBlendError(f"--morl {item!r}: give {len(reward_names)} weights (in --rewards order, "
                                      "':'-separated) or, with two rewards, the first reward's weight")
        parsed.append(({name: v for name, v in zip(reward_names, values)}, path.strip()))
    return parsed


def morl_exponent(weights: Mapping[str, float], metadata: Any, target_of: Callable[[Preference], BlendTarget],
                  reward_of: Mapping[str, str]) -> dict[str, float]:
    """The exponent ``m`` of the target a MORL adapter serves, ``p_pre exp(sum_i m_i r_i)``, by expert name
    (``reward_of``: each expert's registry reward): fine-tuned on ``sum_i v_i r_i`` at KL weight ``alpha'`` it has
    ``m = v / alpha'``; without metadata, the target of ``w`` at ``lambda = 1`` (assumed fine-tuned on ``r_w`` at the
    experts' alphas). The given ``w`` must point the same way as ``v``."""
    names = list(reward_of)
    if metadata is None:
        return target_of(Preference({name: float(weights[name]) for name in names})).implied_weights()
    trained = {name: float(metadata.rewards.get(reward_of[name], 0.0)) for name in names}
    unknown = sorted(set(metadata.rewards) - set(reward_of.values()))
    if unknown:
        raise DiffusionBlendError(f"a --morl adapter was fine-tuned on {', '.join(unknown)}, which no expert serves")
    scale = sum(trained.values()) / sum(weights.values()) if sum(weights.values()) else float("nan")
    if not all(abs(trained[n] - scale * weights[n]) <= MATCH_TOLERANCE * (1 + abs(trained[n])) for n in names):
        given = ",".join(f"{n}={weights[n]:g}" for n in names)
        actual = ",".join(f"{n}={trained[n]:g}" for n in names)
        raise DiffusionBlendError(f"--morl {given}: that adapter was fine-tuned on the weights {actual}")
    return {name: trained[name] / float(metadata.alpha) for name in names}


def covers(exponent: Mapping[str, float], target: BlendTarget) -> bool:
    """Whether a MORL adapter serving ``p_pre exp(sum_i m_i r_i)`` is the oracle of ``target``: ``lambda`` times the
    target's implied weights equal ``m`` for every reward."""
    implied = target.implied_weights()
    scale = target.preference.kl_scale
    return all(abs(scale * implied.get(n, 0.0) - m) <= MATCH_TOLERANCE * (1 + abs(m)) for n, m in exponent.items())


def _model_dtype_forward(forward):
    """``forward`` with the latents cast to the network's dtype (latents stay float32 between sampler steps)."""

    def cast(model: torch.nn.Module, x_t: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        return forward(model, x_t.to(model.dtype), t, **cond)

    cast.stacked_copies = getattr(forward, "stacked_copies", 1)  # type: ignore[attr-defined]
    return cast


def _check_inputs(experts: Mapping[str, Any], methods: Sequence[str], morl: Sequence[Any], num_inference_steps: int,
                  dtype: str) -> dict[str, Any]:
    """The cheap checks, before the base loads; returns ``{expert name: its registry reward}``."""
    from diffusion_blend.adapters import require_rewards
    from diffusion_blend.rewards import get_reward

    names = require_rewards(experts, "the evaluation's reward scores")
    if len(set(names.values())) != len(names):
        served = ", ".join(f"{n}: {r}" for n, r in names.items())
        raise DiffusionBlendError(f"two experts serve the same reward ({served})"
                                  ": the sweep needs one expert per basis reward")
    rewards = {name: get_reward(reward) for name, reward in names.items()}
    if "rgg" in methods:
        flat = [n for n, r in rewards.items() if getattr(r, "differentiable", True) is False]
        if flat:
            raise DiffusionBlendError(f"rgg needs differentiable rewards; {', '.join(flat)} is not (drop rgg)")
    if int(num_inference_steps) < 1:
        raise DiffusionBlendError(f"--steps must be >= 1, got {num_inference_steps}")
    if dtype not in DTYPES:
        raise DiffusionBlendError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if "morl" in methods and not morl:
        raise DiffusionBlendError("method morl needs the MORL adapters: --morl W=PATH (one per preference)")
    return rewards


def _morl_adapters(session: Any, morl: Sequence[tuple[Mapping[str, float], str | os.PathLike]],
                   reward_of: Mapping[str, str], target_of: Callable[[Preference], BlendTarget]
                   ) -> tuple[list[str], list[dict[str, float]], list[str]]:
    """Load the MORL adapters next to the experts; their names, tilts and file digests (fingerprints checked)."""
    from diffusion_blend.pipelines.experts import expert_metadata
    from diffusion_blend.pipelines.loading import load_adapter

    names, tilts, digests = [], [], []
    expected = {e.metadata.base_fingerprint for e in session.experts.values() if e.metadata is not None}
    for index, (weights, path) in enumerate(morl):
        metadata = expert_metadata(path)
        if metadata is not None and expected and metadata.base_fingerprint not in expected:
            raise DiffusionBlendError(f"the MORL adapter {path} was fine-tuned on another base model than the experts "
                                      f"(fingerprint {metadata.base_fingerprint[:12]})")
        tilts.append(morl_exponent(dict(weights), metadata, target_of, reward_of))
        names.append(f"morl_{index}")
        load_adapter(session.pipe, path, names[-1])
        digests.append(_file_digest(path))
    return names, tilts, digests


@dataclass
class _MorlOracle:
    """The MORL adapters loaded next to the experts: the one whose exponent covers a preference's target."""

    names: list[str]
    exponents: list[dict[str, float]]
    target_of: Callable[[Preference], BlendTarget]
    member: Callable[[str], Any]

    def index(self, preference: Preference) -> int | None:
        target = self.target_of(preference)
        return next((i for i, exponent in enumerate(self.exponents) if covers(exponent, target)), None)

    def covers(self, preference: Preference) -> bool:
        return self.index(preference) is not None

    def denoiser(self, preference: Preference) -> Any:
        index = self.index(preference)
        if index is None:
            raise DiffusionBlendError(f"no --morl adapter for {preference}")
        return self.member(self.names[index])


def sd_setting(
    base: str | os.PathLike | Any,
    adapters: Mapping[str, str | os.PathLike],
    prompts_file: str | os.PathLike,
    rewards: Mapping[str, str] | Sequence[str] | None = None,
    *,
    morl: Sequence[tuple[Mapping[str, float], str | os.PathLike]] = (),
    methods: Sequence[str] = (),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    noise_level: float | None = None,
    alpha: float | None = None,
    alphas: Mapping[str, float] | None = None,
    target_alpha: float | None = None,
    kind: str = "auto",
    device: str = "cpu",
    dtype: str = "float32",
    routing: str = "auto",
    preview_images: int = 4,
) -> Setting:
    """The ``sd`` setting (module docstring) on a base of any kind. ``rewards``: each expert's registry reward for
    files without our metadata (``{name: reward}``; a list names experts after their rewards). Cheap checks
    (rewards, RGG on non-differentiable rewards, prompts, adapter names, alphas, fingerprints recorded in the files)
    run before the base model is loaded. ``base`` is a folder or hub id, or an already loaded pipeline. Unset steps,
    guidance and noise level are the kind's spec's (DDIM eta 1 or the flow SDE at 0.7)."""
    from diffusion_blend.pipelines.experts import read_experts
    from diffusion_blend.pipelines.prompts import read_prompts
    from diffusion_blend.pipelines.session import BlendSession

    if rewards is not None and not isinstance(rewards, Mapping):
        rewards = {name: name for name in rewards}
    experts = read_experts(adapters, rewards, alphas, alpha)
    reward_fns = _check_inputs(experts, methods, morl, num_inference_steps or 1, dtype)
    reward_names = list(reward_fns)
    prompts = read_prompts(prompts_file)
    session = BlendSession.open(base, adapters, kind=kind, rewards=rewards, alpha=alpha, alphas=alphas,
                                noise_level=noise_level, device=device, dtype=dtype)
    blend_target = session.target(Preference({name: 1.0 for name in reward_names}), target_alpha,
                                  why="the evaluation's target")  # every expert's alpha, checked once
    expert_alphas = dict(blend_target.alphas)  # type: ignore[union-attr]

    def target_of(preference: Preference) -> BlendTarget:
        return BlendTarget(preference, expert_alphas, target_alpha)

    spec, pipe = session.spec, session.pipe
    steps = spec.steps if num_inference_steps is None else int(num_inference_steps)
    reward_of = {name: str(experts[name].reward) for name in reward_names}
    morl_names, tilts, morl_digests = _morl_adapters(session, morl, reward_of, target_of)
    target, guidance_scale, side = _finetune_target(session, prompts, reward_fns, guidance_scale, resolution)
    denoiser = getattr(pipe, spec.denoiser)
    denoiser.to(DTYPES[dtype])  # the LoRA weights too
    denoiser.requires_grad_(False)
    denoiser.eval()
    forward = _model_dtype_forward(target.forward)
    family = LoraFamily(denoiser, forward, expert_names=tuple(reward_names), routing=routing)

    oracle = _MorlOracle(morl_names, tilts, target_of, lambda name: LoraFamily(
        denoiser, forward, expert_names=(name,), routing=routing).member(name))
    scheduler_config = dict(target.scheduler.config)
    options = {
        "base": session.base, "pipeline": spec.kind, "base_fingerprint": session.base_fingerprint,
        "adapters": {name: _file_digest(experts[name].source) for name in reward_names},
        "rewards": reward_of,
        "morl": [{"exponent": exponent, "file": digest} for exponent, digest in zip(tilts, morl_digests)],
        "guidance_scale": guidance_scale, "resolution": side, "noise_level": session.noise_level,
        "dtype": dtype, "device": torch.device(device).type, "preview_images": int(preview_images),
    }
    return Setting(
        name=spec.kind, family=family, rewards=reward_fns,
        scheduler_factory=lambda: type(target.scheduler).from_config(scheduler_config),
        sample_shape=tuple(target.sample_shape), decode=target.decode, num_inference_steps=steps,
        alpha=target_alpha if target_alpha is not None else blend_target.common_alpha,  # type: ignore[union-attr]
        alphas=expert_alphas, target_alpha=target_alpha,
        eta=session.noise_level, prompts=prompts, encode_prompts=target.encode_prompts,
        morl_denoiser=oracle.denoiser if morl else None, options=options,
        morl_covers=oracle.covers if morl else None, oracle_from_base=True,
        preview_images=int(preview_images), device=str(device),
    )


def _finetune_target(session: Any, prompts: Sequence[str], rewards: Mapping[str, Any], guidance_scale: float | None,
                     resolution: int | None) -> tuple[Any, float, int]:
    """The kind's chain as a :class:`~diffusion_blend.training.config.FinetuneTarget` (its guided forward, prompt
    encoding, sampler and decode: the fine-tuning rollouts' own), the guidance it uses and the image side in
    pixels."""
    from diffusion_blend.pipelines.conditioning import check_guidance_scale
    from diffusion_blend.pipelines.flow_target import flow_finetune_target
    from diffusion_blend.pipelines.sd_target import sd_finetune_target

    spec, pipe = session.spec, session.pipe
    guidance_scale = check_guidance_scale(spec.guidance_scale if guidance_scale is None else guidance_scale)
    pipe.vae.to(torch.float32)  # decoded in float32 (the stock SDXL VAE's force_upcast)
    factor = int(pipe.vae_scale_factor)
    if not spec.flow:
        target = sd_finetune_target(pipe, prompts, rewards, guidance_scale=guidance_scale, resolution=resolution,
                                    name=spec.kind)
        return target, guidance_scale, int(target.sample_shape[-1]) * factor
    target = flow_finetune_target(pipe, prompts, rewards, guidance_scale=guidance_scale, resolution=resolution)
    if len(target.sample_shape) == 3:  # SD3: (channels, h, w) latents
        return target, guidance_scale, int(target.sample_shape[-1]) * factor
    return target, guidance_scale, math.isqrt(int(target.sample_shape[0])) * 2 * factor  # FLUX: packed 2x2 patches
