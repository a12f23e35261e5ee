"""Open a blend session: a base pipeline, its LoRA experts, the kind's sampler, the experts' rewards and alpha.

The one use case behind ``dblend sample``, the UI's pipeline studio and ``dblend evaluate --setting sd``
(:class:`BlendSession`): the entry points parse their input, open a session, call it and print.

    session = BlendSession.open("tiny/base", {"a": "tiny/a.safetensors", "b": "tiny/b.safetensors"})
    result = session.generate("a red car", Preference({"a": 0.3, "b": 0.7}), seed=0)
    result.images[0].save("blend.png")

Opening checks everything cheap before any model loads (adapter paths and metadata, reward names, alphas), then
loads the pipeline class of the base's kind (:mod:`.kinds`) in the session's dtype, loads the experts, checks our
experts' base fingerprints, and sets the spec's sampler (DDIM with ``eta``, or the flow SDE with its noise level).
:meth:`BlendSession.generate` fills every unset sampling option from the kind's spec, so the CLI, the UI and the
evaluation draw the same images for the same preference and seed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffusion_blend.adapters import Expert, common_alpha, require_rewards
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.pipelines.classes import load_blend_pipeline
from diffusion_blend.pipelines.experts import check_fingerprints, read_experts
from diffusion_blend.pipelines.kinds import SCHEDULER_CHOICES, pipeline_kind, spec_of
from diffusion_blend.preference import BlendTarget, Preference, PreferenceSchedule
from diffusion_blend.spec import ModelSpec


def set_sampler(pipe: Any, spec: ModelSpec, scheduler: str, noise_level: float | None) -> None:
    """Give ``pipe`` the sampler ``scheduler`` (``ddim``: DDIM from the base's scheduler config; ``sde``: the flow
    SDE with ``noise_level``; ``pipeline``: the base's own), refusing one that does not fit the kind."""
    if scheduler == "pipeline":
        return
    if (scheduler == "sde") != spec.flow:
        raise DiffusionBlendError(f"--scheduler {scheduler} is for {'SD3/FLUX' if scheduler == 'sde' else 'SD/SDXL'} "
                                  f"bases; this base is {spec.kind} (use {spec.scheduler} or pipeline)")
    if scheduler == "ddim":
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    else:
        from diffusion_blend.sampling import FlowMatchSDEScheduler

        pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=noise_level)


@dataclass
class SessionResult:
    """Images of one :meth:`BlendSession.generate` call and what it ran: ``settings`` (steps, guidance, noise level,
    seeds, sampler, counts of network forwards or SMC's evaluations and ESS) for settings.json and the UI."""

    images: Any
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlendSession:
    """A base pipeline with its experts loaded and its sampler set (module docstring). Open with :meth:`open`."""

    pipe: Any
    spec: ModelSpec
    experts: dict[str, Expert]
    device: str
    dtype: str
    scheduler: str
    noise_level: float | None  # None: the base's own scheduler, with its own noise
    base: str
    reward_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    base_fingerprint: str | None = None  # of the loaded base, where our experts' fingerprints were checked
    _rewards: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls,
        base: str | os.PathLike,
        adapters: Mapping[str, str | os.PathLike],
        *,
        kind: str = "auto",
        rewards: Mapping[str, str] | None = None,
        alphas: Mapping[str, float] | None = None,
        alpha: float | None = None,
        scheduler: str | None = None,
        noise_level: float | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        reward_options: Mapping[str, Mapping[str, Any]] | None = None,
        kinds: Sequence[str] | None = None,
    ) -> BlendSession:
        """Check the experts (:func:`~.experts.read_experts`), load ``base`` as its kind's blend pipeline in
        ``dtype`` on ``device``, load the experts, check their fingerprints and set the sampler (default: the
        spec's, at the spec's noise level). ``base`` may also be a pipeline already in memory (used as it is);
        ``kinds`` limits the kinds a caller serves."""
        import torch

        from diffusion_blend.pipelines.loading import load_adapters

        if not adapters:
            raise DiffusionBlendError("give the experts to blend: --adapter NAME=PATH (one per basis reward)")
        experts = read_experts(adapters, rewards, alphas, alpha)
        for reward in {expert.reward for expert in experts.values() if expert.reward is not None}:
            _check_reward_name(reward)
        loaded = base if hasattr(base, "scheduler") and hasattr(base, "vae") else None
        spec = spec_of(_kind_of_pipeline(loaded) if loaded is not None else pipeline_kind(base, kind))
        if kinds is not None and spec.kind not in kinds:
            raise DiffusionBlendError(f"{base} is a {spec.label} base; this serves {', '.join(kinds)} bases")
        scheduler = scheduler or spec.scheduler
        if scheduler not in SCHEDULER_CHOICES:
            raise DiffusionBlendError(f"--scheduler must be one of {', '.join(SCHEDULER_CHOICES)}, got {scheduler!r}")
        if scheduler == "pipeline" and noise_level is not None:
            raise DiffusionBlendError("a noise level (--eta) is for the kind's sampler (ddim or sde); the base's own "
                                      "scheduler (pipeline) keeps its own")
        if scheduler != "pipeline":
            noise_level = spec.noise_level if noise_level is None else float(noise_level)
        pipe = loaded if loaded is not None else load_blend_pipeline(base, spec.kind, dtype=getattr(torch, dtype))
        load_adapters(pipe, {name: expert.source for name, expert in experts.items()})
        fingerprint = check_fingerprints(experts, getattr(pipe, spec.denoiser))
        set_sampler(pipe, spec, scheduler, noise_level)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device)
        name = f"<{type(loaded).__name__} in memory>" if loaded is not None else str(base)
        return cls(pipe, spec, experts, device, dtype, scheduler, noise_level, name, dict(reward_options or {}),
                   fingerprint)

    @property
    def kind(self) -> str:
        return self.spec.kind

    def reward_functions(self, why: str) -> dict[str, Any]:
        """``{expert name: its basis reward}`` as registry rewards (built once, on first use)."""
        from diffusion_blend.rewards import get_reward

        names = require_rewards(self.experts, why)
        for name, reward in names.items():
            if name not in self._rewards:
                self._rewards[name] = get_reward(reward, **dict(self.reward_options.get(reward, {})))
        return {name: self._rewards[name] for name in names}

    def alpha(self, why: str) -> float:
        """The experts' common effective KL weight (one line when unknown or when they differ)."""
        return common_alpha(self.experts, why)

    def target(self, preference: Preference, target_alpha: float | None = None, why: str | None = None
               ) -> BlendTarget | None:
        """The distribution the blend of ``preference`` serves (:class:`~diffusion_blend.preference.BlendTarget`:
        each expert's effective alpha; with ``target_alpha`` the coefficients rescaled to serve it). ``None`` when an
        expert's alpha is unknown (a foreign file without ``--alpha``), unless ``why`` names what needs it: then one
        line asks for it."""
        missing = [name for name in preference.weights if self.experts[name].alpha is None]
        if missing:
            if why is None and target_alpha is None:
                return None
            raise DiffusionBlendError(f"{why or '--target-alpha'} needs each expert's KL weight alpha; "
                                      f"{', '.join(missing)} carry none in their metadata (give --alpha NAME=A)")
        alphas = {name: float(self.experts[name].alpha) for name in preference.weights}  # type: ignore[arg-type]
        return BlendTarget(preference, alphas, target_alpha)

    def _blended(self, preference: Preference | PreferenceSchedule, method: str, target_alpha: float | None
                 ) -> tuple[BlendTarget | None, Preference | PreferenceSchedule]:
        """The target the blend serves (``None``: unknown, or a schedule's) and what the sampler blends with."""
        if isinstance(preference, PreferenceSchedule):
            if method == "smc":
                raise DiffusionBlendError("SMC targets a fixed preference p_pre exp(lambda r_w / alpha); a weight "
                                          "schedule is not one: give fixed --weights with --method smc")
            if target_alpha is None:
                return None, preference
            alphas = self.target(preference.at(0.0), target_alpha, why="--target-alpha").alphas  # type: ignore[union-attr]
            return None, preference.rescaled({name: alphas[name] / target_alpha for name in preference.weights})
        target = self.target(preference, target_alpha, why="--method smc" if method == "smc" else None)
        return target, (preference if target is None else target.blend())

    def weighted_reward(self, preference: Preference, why: str = "SMC"):
        """``r_w(images, prompts) = sum_i w_i r_i`` over the experts' basis rewards (paper section 1); with a
        :meth:`target`'s tilt preference, the target's exponent ``sum_i u_i r_i``."""
        from diffusion_blend.rewards.weighted import weighted_reward_scores

        rewards = self.reward_functions(why)

        def r_w(images: Any, prompts: Sequence[str] | None = None) -> Any:
            return weighted_reward_scores(rewards, preference, images, prompts)

        return r_w

    def generate(
        self,
        prompt: str,
        preference: Preference,
        *,
        method: str = "mpa",
        num_images: int = 1,
        seed: int = 0,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
        smc: Any = None,
        routing: str = "auto",
        output_type: str = "pil",
        target_alpha: float | None = None,
        progress: bool = False,
    ) -> SessionResult:
        """``num_images`` images of ``prompt`` under ``preference`` with ``method`` (``mpa``: DB-MPA / DB-KLA, ``ls``:
        DB-MPA-LS, ``smc``: SMC on the blend with ``smc`` options). Image ``k`` draws its noise from seed ``seed + k``
        (paired across preferences, as in the paper's evaluation); DB-MPA-LS draws its experts from ``seed``; SMC
        draws every image from one generator seeded with ``seed``. Unset sampling options come from the spec.
        Experts of different KL weights blend toward the target :meth:`target` states (``target_alpha``: rescaled to
        serve ``p_pre exp(lambda r_w / target_alpha)``); settings.json records it. ``progress``: a bar over the
        steps."""
        import torch

        target, blended = self._blended(preference, method, target_alpha)

        steps = self.spec.steps if steps is None else int(steps)
        guidance = self.spec.guidance_scale if guidance_scale is None else float(guidance_scale)
        call = dict(
            prompt=[prompt] * num_images,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * num_images,
            num_inference_steps=steps, guidance_scale=guidance, height=height, width=width, output_type=output_type,
            **({} if self.spec.flow or self.noise_level is None else {"eta": self.noise_level}),
        )
        self.pipe.set_progress_bar_config(disable=not progress)
        coefficients = (blended if isinstance(blended, Preference) else blended.at(0.0)).coefficients(self.experts)
        settings = {"steps": steps, "guidance_scale": guidance, "noise_level": self.noise_level,
                    "scheduler": type(self.pipe.scheduler).__name__, "routing": routing,
                    "coefficients": {"base" if m is None else m: c for m, c in coefficients.items()},
                    "target": None if target is None else target.describe()}
        if isinstance(preference, PreferenceSchedule):
            settings["schedule"] = {"weights": str(blended), "note": "a weight schedule blends each step with that "
                                    "step's weights: in general not a tilt of the base (docs/method.md)"}
        if method == "smc":
            from diffusion_blend.smc import SMCOptions

            smc = SMCOptions() if smc is None else smc
            tilt, alpha = target.tilt()  # type: ignore[union-attr]
            images = self.pipe(preference=blended, method="smc", reward=self.weighted_reward(tilt), alpha=alpha,
                               smc=smc, routing=routing, generator=seed, **call).images
            stats = self.pipe.last_smc
            settings.update(seeds=[seed], smc=smc.describe(), smc_alpha=alpha,
                            network_evaluations_per_image=stats.network_evaluations,
                            reward_evaluations_per_image=stats.reward_evaluations, final_ess=stats.final_ess.tolist())
            return SessionResult(images, settings)
        generators = [torch.Generator(self.device).manual_seed(seed + k) for k in range(num_images)]
        switch = torch.Generator().manual_seed(seed) if method == "ls" else None
        images = self.pipe(preference=blended, method=method, switch_generator=switch, routing=routing,
                           generator=generators, **call).images
        blend = self.pipe.last_blend
        component = self.pipe.blend_component
        settings.update({"seeds": [seed + k for k in range(num_images)], f"{component}_calls": blend.calls,
                         f"{component}_forwards": blend.forwards, "routing_used": blend.routing_used})
        return SessionResult(images, settings)


def _kind_of_pipeline(pipe: Any) -> str:
    """The kind of a pipeline object: the kind whose spec names its class or a base class of it."""
    from diffusion_blend.pipelines.kinds import SPECS

    names = {cls.__name__ for cls in type(pipe).__mro__}
    for kind, spec in SPECS.items():
        if spec.pipeline_class in names or spec.stock_class in names:
            return kind
    raise DiffusionBlendError(f"{type(pipe).__name__} is not a pipeline kind Diffusion Blend serves")


def _check_reward_name(name: str) -> None:
    from diffusion_blend.rewards import available_rewards

    if name not in available_rewards():
        raise DiffusionBlendError(f"unknown reward {name!r}; available: {', '.join(available_rewards())}")
