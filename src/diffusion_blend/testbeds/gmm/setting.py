"""The Gaussian-mixture testbed as an evaluation setting (``dblend evaluate --setting gmm``)."""

from __future__ import annotations

from typing import Any

from diffusion_blend.denoisers import Denoiser
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


def gmm_setting(num_inference_steps: int = GMM_SPEC.steps, alpha: float = 1.0) -> Setting:
    """The 2-D Gaussian-mixture miniature: ideal experts (exact tilts) as a CallableFamily, closed-form rewards.

    Sampler: DDIM with Stable Diffusion's settings (``steps_offset=1``, ``set_alpha_to_one=False``), so that every
    step is stochastic (SMC's weight ratio needs ``std > 0``; the default DDIM's last step is deterministic).
    Rewards (differentiable quadratic forms): ``right(x) = x_1``, ``corner(x) = -|x - (-2, 2)|^2 / 2``. The
    importance-weighted oracle reweights exact mixture draws, so it estimates the exact target. The MORL
    oracle is the exact tilted target ``p_pre exp(lambda r_w / alpha)``: what an ideal fine-tune on ``r_w`` at KL
    weight ``alpha / lambda`` would reach. The experts are exact continuous-time tilts, so SMC proposes with the
    twisted step (:mod:`~diffusion_blend.smc`; docs/evaluation.md measures both proposals).
    """
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
        draw_base_samples=lambda n, generator: base.sample(n, generator).float(),
        smc_proposal="twisted",
        options={
            "num_inference_steps": num_inference_steps,
            "alpha": alpha,
            "ddim": "steps_offset=1,final_alpha=abar_0",
        },
    )


def smc_study_inputs(config: Any, steps: int, alpha: float):
    """The GMM setting (ideal experts), the closed-form base ``r_w`` and gain of the exact target at each w."""
    from diffusion_blend.testbeds.gmm.closed_form import combined_reward, tilted_target
    from diffusion_blend.testbeds.gmm.study import RIGHT, study_testbed

    base, rewards = study_testbed()
    setting = gmm_setting(num_inference_steps=steps, alpha=alpha)
    preferences, base_reward, gains = [], {}, {}
    other = [name for name in rewards if name != RIGHT][0]
    for w in config.weights:
        preference = Preference({RIGHT: float(w), other: 1.0 - float(w)}, 1.0)
        rw = combined_reward(rewards, preference)
        base_reward[float(w)] = base.expectation(rw)
        gains[float(w)] = tilted_target(base, rewards, preference, alpha).expectation(rw) - base_reward[float(w)]
        preferences.append(preference)
    return setting, preferences, base_reward, gains, RIGHT
