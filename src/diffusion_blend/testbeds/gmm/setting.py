"""The Gaussian-mixture testbed as an evaluation setting (``dblend evaluate --setting gmm``)."""

from __future__ import annotations

from typing import Any

from diffusion_blend.denoisers import Denoiser
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.evaluation.sweep import Setting
from diffusion_blend.preference import Preference
from diffusion_blend.sampling import make_scheduler
from diffusion_blend.testbeds.gmm.closed_form import (
    MixtureDenoiser,
    ideal_family,
    tilted_target,
)
from diffusion_blend.testbeds.gmm.spec import GMM_SPEC
from diffusion_blend.testbeds.gmm.study import study_testbed

ORACLES = ("chain", "exact")


def gmm_setting(num_inference_steps: int = GMM_SPEC.steps, alpha: float = 1.0, oracle: str = "chain") -> Setting:
    """The 2-D Gaussian-mixture miniature: ideal experts (exact tilts) as a CallableFamily, closed-form rewards.

    Sampler: DDIM with Stable Diffusion's settings (``steps_offset=1``, ``set_alpha_to_one=False``), so that every
    step is stochastic (SMC's weight ratio needs ``std > 0``; the default DDIM's last step is deterministic).
    Rewards (differentiable quadratic forms): ``right(x) = x_1``, ``corner(x) = -|x - (-2, 2)|^2 / 2``.

    The target is ``p_pre exp(lambda r_w / alpha)`` with ``p_pre`` the base SAMPLER's output (this many DDIM steps),
    as on every other setting and as SMC's target (docs/method.md): the importance-weighted oracle reweights
    ``oracle_samples`` base-chain samples (``oracle="chain"``, default). ``oracle="exact"`` reweights exact mixture
    draws instead: the continuous-time target, which the 20-step chain's own tilt misses by up to 0.25 in ``r_w``
    (at w = 1; docs/evaluation.md). The MORL oracle is the exact tilted target ``p_pre exp(lambda r_w / alpha)``
    (continuous time): what an ideal fine-tune on ``r_w`` at KL weight ``alpha / lambda`` would reach. The experts
    are exact continuous-time tilts, so SMC proposes with the twisted step (:mod:`~diffusion_blend.smc`;
    docs/evaluation.md measures both proposals: the path weights' ESS).
    """
    if oracle not in ORACLES:
        raise DiffusionBlendError(f"unknown gmm oracle {oracle!r}; choose from {', '.join(ORACLES)}")
    base, rewards = study_testbed()

    def make() -> Any:
        return make_scheduler("ddim", steps_offset=1, set_alpha_to_one=False)

    scheduler = make()
    family = ideal_family(base, rewards, alpha, scheduler)

    def morl(preference: Preference) -> Denoiser:
        return MixtureDenoiser(tilted_target(base, rewards, preference, alpha), scheduler.alphas_cumprod)

    return Setting(
        name="gmm",
        family=family,
        rewards=rewards,
        scheduler_factory=make,
        sample_shape=(2,),
        alpha=alpha,
        num_inference_steps=num_inference_steps,
        morl_denoiser=morl,
        draw_base_samples=(lambda n, generator: base.sample(n, generator).float()) if oracle == "exact" else None,
        smc_proposal="twisted",
        options={
            "num_inference_steps": num_inference_steps,
            "alpha": alpha,
            "ddim": "steps_offset=1,final_alpha=abar_0",
            "oracle": oracle,
        },
    )


CHAIN_ORACLE_SAMPLES, CHAIN_ORACLE_SEED = 200_000, 54321


def smc_study_inputs(config: Any, steps: int, alpha: float, oracle: str = "chain"):
    """The GMM setting (ideal experts), the base ``r_w`` and the target's gain in ``r_w`` at each w.

    ``oracle="chain"`` (default: SMC's target, :func:`gmm_setting`): both from ``CHAIN_ORACLE_SAMPLES`` draws of
    the base sampler's chain (the base's mean, and importance weighting by ``exp(lambda r_w / alpha)``);
    ``"exact"``: the closed forms of the mixture and of its exact tilt (the continuous-time target)."""
    import torch

    from diffusion_blend.evaluation.oracle import importance_weighted_oracle
    from diffusion_blend.preference import BASE
    from diffusion_blend.sampling import sample
    from diffusion_blend.testbeds.gmm.closed_form import combined_reward, tilted_target
    from diffusion_blend.testbeds.gmm.study import RIGHT, study_testbed

    base, rewards = study_testbed()
    setting = gmm_setting(num_inference_steps=steps, alpha=alpha, oracle=oracle)
    draws = None
    if oracle == "chain":
        with torch.no_grad():
            draws = sample(setting.family.member(BASE), setting.scheduler_factory(), generator=CHAIN_ORACLE_SEED,
                           shape=(CHAIN_ORACLE_SAMPLES, 2), num_inference_steps=steps, progress=False).samples
    preferences, base_reward, gains = [], {}, {}
    other = [name for name in rewards if name != RIGHT][0]
    for w in config.weights:
        preference = Preference({RIGHT: float(w), other: 1.0 - float(w)}, 1.0)
        rw = combined_reward(rewards, preference)
        if draws is None:
            base_reward[float(w)] = base.expectation(rw)
            target = tilted_target(base, rewards, preference, alpha).expectation(rw)
        else:
            base_reward[float(w)] = float(rw(draws).double().mean())
            estimate = importance_weighted_oracle({n: r(draws) for n, r in rewards.items()}, preference, alpha)
            target = sum(v * estimate.expected_rewards[n] for n, v in preference.weights.items())
        gains[float(w)] = target - base_reward[float(w)]
        preferences.append(preference)
    return setting, preferences, base_reward, gains, RIGHT
