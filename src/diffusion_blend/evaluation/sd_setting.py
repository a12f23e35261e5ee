"""The ``sd`` evaluation setting: a Stable Diffusion 1.x/2.x or SDXL base with one LoRA expert per basis reward
(paper sections 5-6: SD 1.5, DDIM eta = 1, 50 steps, CFG 7.5), behind the same sweep as every other setting.

:func:`sd_setting` builds a :class:`~diffusion_blend.evaluation.sweep.Setting` from

- the base pipeline (a local folder or hub id; SDXL when its ``model_index.json`` says so or ``pipeline="sdxl"``),
  loaded with diffusers and wrapped by :func:`~diffusion_blend.pipelines.finetune.sd_finetune_target`, whose
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DiffusionBlendError, positive_number
from ..pipelines.experts import expert_alpha
from ..preference import Preference
from .sweep import Setting

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MATCH_TOLERANCE = 1e-6


def _metadata(source: str | os.PathLike):
    """Our metadata of a LoRA source (file or folder), ``None`` for a foreign file or a peft folder."""
    from ..pipelines.finetune import read_diffusers_lora_metadata

    path = Path(source)
    if not path.exists():
        raise DiffusionBlendError(f"adapter {path} does not exist")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return None
    return read_diffusers_lora_metadata(path)


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


def morl_tilt(weights: Mapping[str, float], metadata: Any, alpha: float, reward_names: Sequence[str]) -> dict[str, float]:
    """The tilt ``u = lambda w`` a MORL adapter targets, ``p_pre exp(sum_i u_i r_i / alpha)``: fine-tuned on
    ``sum_i v_i r_i`` at KL weight ``alpha'`` it has ``u = v alpha / alpha'``; without metadata ``u = w`` (assumed
    fine-tuned on ``r_w`` at the experts' ``alpha``). The given ``w`` must point the same way as ``v``."""
    if metadata is None:
        return {name: float(weights[name]) for name in reward_names}
    trained = {name: float(metadata.rewards.get(name, 0.0)) for name in reward_names}
    unknown = sorted(set(metadata.rewards) - set(reward_names))
    if unknown:
        raise DiffusionBlendError(f"a --morl adapter was fine-tuned on {', '.join(unknown)}, not among --rewards")
    scale = sum(trained.values()) / sum(weights.values()) if sum(weights.values()) else float("nan")
    if not all(abs(trained[n] - scale * weights[n]) <= MATCH_TOLERANCE * (1 + abs(trained[n])) for n in reward_names):
        given = ",".join(f"{n}={weights[n]:g}" for n in reward_names)
        actual = ",".join(f"{n}={trained[n]:g}" for n in reward_names)
        raise DiffusionBlendError(f"--morl {given}: that adapter was fine-tuned on the weights {actual}")
    return {name: trained[name] * alpha / float(metadata.alpha) for name in reward_names}


def covers(tilt: Mapping[str, float], preference: Preference) -> bool:
    """Whether a MORL adapter with tilt ``u`` is the oracle of ``preference``: ``lambda w_i = u_i`` for every i."""
    return all(abs(preference.kl_scale * preference.weights.get(n, 0.0) - u) <= MATCH_TOLERANCE * (1 + abs(u))
               for n, u in tilt.items())


def _model_dtype_forward(forward):
    """``forward`` with the latents cast to the network's dtype (latents stay float32 between sampler steps)."""

    def cast(model: torch.nn.Module, x_t: torch.Tensor, t: Any, **cond: Any) -> torch.Tensor:
        return forward(model, x_t.to(model.dtype), t, **cond)

    cast.stacked_copies = getattr(forward, "stacked_copies", 1)  # type: ignore[attr-defined]
    return cast


def sd_setting(
    base: str | os.PathLike | Any,
    adapters: Mapping[str, str | os.PathLike],
    prompts_file: str | os.PathLike,
    reward_names: Sequence[str],
    *,
    morl: Sequence[tuple[Mapping[str, float], str | os.PathLike]] = (),
    methods: Sequence[str] = (),
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    resolution: int | None = None,
    alpha: float | None = None,
    pipeline: str = "auto",
    device: str = "cpu",
    dtype: str = "float32",
    routing: str = "auto",
    preview_images: int = 4,
) -> Setting:
    """The ``sd`` setting (module docstring). Cheap checks (rewards, RGG on non-differentiable rewards, prompts,
    adapter names, alphas, fingerprints recorded in the files) run before the base model is loaded. ``base`` is a
    folder or hub id, or an already loaded ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``."""
    from ..lora import LoraFamily
    from ..pipelines.finetune import check_guidance_scale, read_prompts, sd_finetune_target, unet_architecture
    from ..pipelines.loading import load_adapter, pipeline_kind
    from ..rewards import get_reward

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
    guidance_scale = check_guidance_scale(guidance_scale)
    if dtype not in DTYPES:
        raise DiffusionBlendError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if alpha is not None:
        alpha = positive_number(alpha, "--alpha")
    prompts = read_prompts(prompts_file)
    if set(adapters) != set(reward_names):
        raise DiffusionBlendError(
            f"give one --adapter NAME=PATH per reward, named after it: rewards {', '.join(reward_names)}, adapters "
            f"{', '.join(adapters) or 'none'}")
    if "morl" in methods and not morl:
        raise DiffusionBlendError("method morl needs the MORL adapters: --morl W=PATH (one per preference)")

    metadata = {name: _metadata(path) for name, path in adapters.items()}
    alphas = {name: expert_alpha(name, m) for name, m in metadata.items() if m is not None}
    if len({round(a, 12) for a in alphas.values()}) > 1:
        listed = ", ".join(f"{name}: {value:g}" for name, value in alphas.items())
        raise DiffusionBlendError(f"the experts were fine-tuned with different KL weights alpha ({listed}); the blend "
                                  "c_i = lambda w_i assumes one alpha for all experts")
    if alphas:
        known = next(iter(alphas.values()))
        if alpha is not None and abs(alpha - known) > 1e-12 * known:
            raise DiffusionBlendError(f"--alpha {alpha:g} contradicts the experts' metadata (alpha = {known:g}); drop "
                                      "--alpha")
        alpha = known
    elif alpha is None:
        raise DiffusionBlendError("the adapters carry no diffusion-blend metadata (foreign LoRA files): give the "
                                  "experts' KL weight with --alpha")
    morl_metadata = [(dict(w), path, _metadata(path)) for w, path in morl]
    fingerprints = {f"adapter {n!r}": m.base_fingerprint for n, m in metadata.items() if m is not None}
    fingerprints.update({f"morl {path}": m.base_fingerprint for _, path, m in morl_metadata if m is not None})
    if len(set(fingerprints.values())) > 1:
        listed = ", ".join(f"{who}: {value[:12]}" for who, value in fingerprints.items())
        raise DiffusionBlendError(f"the adapters were fine-tuned on different base models (fingerprints {listed})")
    tilts = [morl_tilt(w, m, alpha, reward_names) for w, _, m in morl_metadata]

    if hasattr(base, "unet") and hasattr(base, "vae"):  # an already loaded pipeline (benchmarks, notebooks)
        pipe, kind = base, "sdxl" if getattr(base, "text_encoder_2", None) is not None else "sd"
        base = f"<{type(pipe).__name__} in memory>"
    else:
        kind = pipeline_kind(base, pipeline)
        if kind not in ("sd", "sdxl"):
            raise DiffusionBlendError(f"--setting sd evaluates Stable Diffusion 1.x/2.x and SDXL bases; {base} is a "
                                      f"{kind} pipeline")
        from ..pipelines.finetune import load_sd_pipeline

        pipe = load_sd_pipeline(base, sdxl=kind == "sdxl")
    unet = pipe.unet
    base_print = None
    if fingerprints:
        from ..adapters import base_fingerprint

        base_print = base_fingerprint(unet, unet_architecture(unet))
        expected = next(iter(fingerprints.values()))
        if base_print != expected:
            raise DiffusionBlendError(f"the adapters were fine-tuned on another base model (fingerprint "
                                      f"{expected[:12]}..., {base} is {base_print[:12]}...)")
    target = sd_finetune_target(pipe, prompts, rewards, guidance_scale=guidance_scale, resolution=resolution,
                                name=kind)
    torch_dtype = DTYPES[dtype]

    def place(module: torch.nn.Module, module_dtype: torch.dtype) -> None:
        module.to(device)
        if module_dtype != torch.float32:  # (diffusers warns on any dtype cast, even to float32)
            module.to(module_dtype)

    place(unet, torch_dtype)
    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if encoder is not None:
            place(encoder, torch_dtype)
    place(pipe.vae, torch.float32)  # decoded in float32 (the stock SDXL VAE's force_upcast)
    for name, path in adapters.items():
        load_adapter(pipe, path, name)
    morl_names = []
    for index, (_, path, _) in enumerate(morl_metadata):
        morl_names.append(f"morl_{index}")
        load_adapter(pipe, path, morl_names[-1])
    place(unet, torch_dtype)  # the LoRA weights too
    unet.requires_grad_(False)
    unet.eval()
    forward = _model_dtype_forward(target.forward)
    family = LoraFamily(unet, forward, expert_names=tuple(reward_names), routing=routing)

    def morl_index(preference: Preference) -> int | None:
        return next((i for i, tilt in enumerate(tilts) if covers(tilt, preference)), None)

    def morl_denoiser(preference: Preference):
        index = morl_index(preference)
        if index is None:
            raise DiffusionBlendError(f"no --morl adapter for {preference}")
        return LoraFamily(unet, forward, expert_names=(morl_names[index],), routing=routing).member(morl_names[index])

    scheduler_config = dict(target.scheduler.config)

    def scheduler_factory():
        return type(target.scheduler).from_config(scheduler_config)

    options = {
        "base": str(base),
        "pipeline": kind,
        "base_fingerprint": base_print,
        "adapters": {name: _file_digest(path) for name, path in adapters.items()},
        "morl": [{"tilt": tilt, "file": _file_digest(path)} for tilt, (_, path, _) in zip(tilts, morl_metadata)],
        "guidance_scale": guidance_scale,
        "resolution": target.sample_shape[-1] * int(pipe.vae_scale_factor),
        "dtype": dtype,
        "device": torch.device(device).type,
        "preview_images": int(preview_images),
    }
    return Setting(
        name=kind,
        family=family,
        rewards=rewards,
        scheduler_factory=scheduler_factory,
        sample_shape=tuple(target.sample_shape),
        alpha=float(alpha),
        decode=target.decode,
        num_inference_steps=int(num_inference_steps),
        eta=1.0,
        prompts=prompts,
        encode_prompts=target.encode_prompts,
        morl_denoiser=morl_denoiser if morl_metadata else None,
        options=options,
        morl_covers=(lambda p: morl_index(p) is not None) if morl_metadata else None,
        oracle_from_base=True,
        preview_images=int(preview_images),
        device=str(device),
    )
