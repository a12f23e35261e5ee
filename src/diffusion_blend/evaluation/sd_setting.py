"""The ``sd`` evaluation setting: a Stable Diffusion 1.x/2.x or SDXL base with one LoRA expert per basis reward
(paper sections 5-6: SD 1.5, DDIM eta = 1, 50 steps, CFG 7.5), behind the same sweep as every other setting.

:func:`sd_setting` builds a :class:`~diffusion_blend.evaluation.sweep.Setting` from

- the base pipeline (a local folder or hub id; SDXL when its ``model_index.json`` says so or ``pipeline="sdxl"``),
  loaded with diffusers and wrapped by :func:`~diffusion_blend.pipelines.sd_target.sd_finetune_target`, whose
  classifier-free-guided forward (one ``[uncond; cond]`` UNet batch; SDXL's pooled text embeddings and time ids as
  added conditioning), prompt encoding, DDIM scheduler and VAE decode to ``[0, 1]`` images are reused as they are;
- the experts (diffusers LoRA files, e.g. the ``pytorch_lora_weights.safetensors`` of ``dblend finetune --target
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
from pathlib import Path
from typing import Any

import torch

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.evaluation.sweep import Setting
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
                  reward_names: Sequence[str]) -> dict[str, float]:
    """The exponent ``m`` of the target a MORL adapter serves, ``p_pre exp(sum_i m_i r_i)``: fine-tuned on ``sum_i v_i
    r_i`` at KL weight ``alpha'`` it has ``m = v / alpha'``; without metadata, the target of ``w`` at ``lambda = 1``
    (assumed fine-tuned on ``r_w`` at the experts' alphas). The given ``w`` must point the same way as ``v``."""
    if metadata is None:
        return target_of(Preference({name: float(weights[name]) for name in reward_names})).implied_weights()
    trained = {name: float(metadata.rewards.get(name, 0.0)) for name in reward_names}
    unknown = sorted(set(metadata.rewards) - set(reward_names))
    if unknown:
        raise DiffusionBlendError(f"a --morl adapter was fine-tuned on {', '.join(unknown)}, not among --rewards")
    scale = sum(trained.values()) / sum(weights.values()) if sum(weights.values()) else float("nan")
    if not all(abs(trained[n] - scale * weights[n]) <= MATCH_TOLERANCE * (1 + abs(trained[n])) for n in reward_names):
        given = ",".join(f"{n}={weights[n]:g}" for n in reward_names)
        actual = ",".join(f"{n}={trained[n]:g}" for n in reward_names)
        raise DiffusionBlendError(f"--morl {given}: that adapter was fine-tuned on the weights {actual}")
    return {name: trained[name] / float(metadata.alpha) for name in reward_names}


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


def _check_inputs(reward_names: Sequence[str], adapters: Mapping[str, Any], methods: Sequence[str],
                  morl: Sequence[Any], num_inference_steps: int, dtype: str) -> dict[str, Any]:
    """The cheap checks, before anything loads; returns the registry rewards."""
    from diffusion_blend.rewards import get_reward

    if not reward_names:
        raise DiffusionBlendError("give --rewards NAME[,NAME]: the basis rewards, one expert each")
    if len(set(reward_names)) != len(reward_names):
        raise DiffusionBlendError(f"--rewards lists a reward twice: {', '.join(reward_names)}")
    rewards = {name: get_reward(name) for name in reward_names}
    if "rgg" in methods:
        flat = [n for n, r in rewards.items() if getattr(r, "differentiable", True) is False]
        if flat:
            raise DiffusionBlendError(f"rgg needs differentiable rewards; {', '.join(flat)} is not (drop rgg)")
    if int(num_inference_steps) < 1:
        raise DiffusionBlendError(f"--steps must be >= 1, got {num_inference_steps}")
    if dtype not in DTYPES:
        raise DiffusionBlendError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if set(adapters) != set(reward_names):
        raise DiffusionBlendError(
            f"give one --adapter NAME=PATH per reward, named after it: rewards {', '.join(reward_names)}, adapters "
            f"{', '.join(adapters) or 'none'}")
    if "morl" in methods and not morl:
        raise DiffusionBlendError("method morl needs the MORL adapters: --morl W=PATH (one per preference)")
    return rewards


def _morl_adapters(session: Any, morl: Sequence[tuple[Mapping[str, float], str | os.PathLike]],
                   reward_names: Sequence[str], target_of: Callable[[Preference], BlendTarget]
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
        tilts.append(morl_exponent(dict(weights), metadata, target_of, reward_names))
        names.append(f"morl_{index}")
        load_adapter(session.pipe, path, names[-1])
        digests.append(_file_digest(path))
    return names, tilts, digests


def sd_setting(
    base: str | os.PathLike | Any,
    adapters: Mapping[str, str | os.PathLike],
    prompts_file: str | os.PathLike,
    reward_names: Sequence[str],
    *,
    morl: Sequence[tuple[Mapping[str, float], str | os.PathLike]] = (),
    methods: Sequence[str] = (),
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    resolution: int | None = None,
    alpha: float | None = None,
    alphas: Mapping[str, float] | None = None,
    target_alpha: float | None = None,
    pipeline: str = "auto",
    device: str = "cpu",
    dtype: str = "float32",
    routing: str = "auto",
    preview_images: int = 4,
) -> Setting:
    """The ``sd`` setting (module docstring). Cheap checks (rewards, RGG on non-differentiable rewards, prompts,
    adapter names, alphas, fingerprints recorded in the files) run before the base model is loaded. ``base`` is a
    folder or hub id, or an already loaded ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``. Unset steps
    and guidance are the kind's spec's (DDIM eta 1, as the paper)."""
    from diffusion_blend.lora import LoraFamily
    from diffusion_blend.pipelines.conditioning import check_guidance_scale
    from diffusion_blend.pipelines.prompts import read_prompts
    from diffusion_blend.pipelines.sd_target import sd_finetune_target
    from diffusion_blend.pipelines.session import BlendSession

    rewards = _check_inputs(reward_names, adapters, methods, morl, num_inference_steps or 1, dtype)
    prompts = read_prompts(prompts_file)
    session = BlendSession.open(base, adapters, kind=pipeline, rewards={name: name for name in adapters}, alpha=alpha,
                                alphas=alphas, device=device, dtype=dtype, kinds=("sd", "sdxl"))
    blend_target = session.target(Preference({name: 1.0 for name in reward_names}), target_alpha,
                                  why="the sd setting")  # every expert's alpha, checked once
    expert_alphas = dict(blend_target.alphas)  # type: ignore[union-attr]

    def target_of(preference: Preference) -> BlendTarget:
        return BlendTarget(preference, expert_alphas, target_alpha)

    spec, pipe = session.spec, session.pipe
    steps = spec.steps if num_inference_steps is None else int(num_inference_steps)
    guidance_scale = check_guidance_scale(spec.guidance_scale if guidance_scale is None else guidance_scale)
    pipe.vae.to(torch.float32)  # decoded in float32 (the stock SDXL VAE's force_upcast)
    morl_names, tilts, morl_digests = _morl_adapters(session, morl, reward_names, target_of)
    target = sd_finetune_target(pipe, prompts, rewards, guidance_scale=guidance_scale, resolution=resolution,
                                name=spec.kind)
    unet = pipe.unet
    unet.to(DTYPES[dtype])  # the LoRA weights too
    unet.requires_grad_(False)
    unet.eval()
    forward = _model_dtype_forward(target.forward)
    family = LoraFamily(unet, forward, expert_names=tuple(reward_names), routing=routing)

    def morl_index(preference: Preference) -> int | None:
        return next((i for i, exponent in enumerate(tilts) if covers(exponent, target_of(preference))), None)

    def morl_denoiser(preference: Preference):
        index = morl_index(preference)
        if index is None:
            raise DiffusionBlendError(f"no --morl adapter for {preference}")
        return LoraFamily(unet, forward, expert_names=(morl_names[index],), routing=routing).member(morl_names[index])

    scheduler_config = dict(target.scheduler.config)
    options = {
        "base": session.base, "pipeline": spec.kind, "base_fingerprint": session.base_fingerprint,
        "adapters": {name: _file_digest(path) for name, path in adapters.items()},
        "morl": [{"exponent": exponent, "file": digest} for exponent, digest in zip(tilts, morl_digests)],
        "guidance_scale": guidance_scale, "resolution": target.sample_shape[-1] * int(pipe.vae_scale_factor),
        "dtype": dtype, "device": torch.device(device).type, "preview_images": int(preview_images),
    }
    return Setting(
        name=spec.kind, family=family, rewards=rewards,
        scheduler_factory=lambda: type(target.scheduler).from_config(scheduler_config),
        sample_shape=tuple(target.sample_shape), decode=target.decode, num_inference_steps=steps,
        alpha=target_alpha if target_alpha is not None else blend_target.common_alpha,  # type: ignore[union-attr]
        alphas=expert_alphas, target_alpha=target_alpha,
        eta=spec.noise_level, prompts=prompts, encode_prompts=target.encode_prompts,
        morl_denoiser=morl_denoiser if morl else None, options=options,
        morl_covers=(lambda p: morl_index(p) is not None) if morl else None, oracle_from_base=True,
        preview_images=int(preview_images), device=str(device),
    )
