"""The pathwise (reparameterised) estimator of the KL-regularized objective (training/dpok.py, paper section 4).

Independent truth: for a Gaussian base ``N(0, I)`` with its exact noise predictor and a linear reward
``r(x) = a . x``, the optimum of ``E[r] - alpha KL`` is ``N(a / alpha, I)``, reached by Gaussian transitions that
only shift their means (the tilt ``E[exp(a . x_0 / alpha) | x_k]`` is log-linear in ``x_k``), with path KL
``|a|^2 / (2 alpha^2)`` and value ``|a|^2 / (2 alpha)``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusion_blend import lora
from diffusion_blend.errors import DiffusionBlendError, RewardError
from diffusion_blend.preference import BASE
from diffusion_blend.sampling import make_scheduler
from diffusion_blend.testbeds.gmm.distributed_run import tiny_config, tiny_target
from diffusion_blend.training.config import FinetuneTarget
from diffusion_blend.training.dpok import (
    ADAPTER_NAME,
    TrainingInterrupted,
    adapter_pair,
    denoiser_pair,
    finetune,
    rollout,
)


def stochastic_ddim():
    """DDIM whose every step is stochastic at eta = 1 (Stable Diffusion's settings)."""
    return make_scheduler("ddim", num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False)


class ExactGaussianDenoiser(nn.Module):
    """``eps(x_t, t) = sqrt(1 - abar_t) x_t`` (exact for data ``N(0, I)``) plus ``shift(onehot(t // 100))``, zero
    at init. ``shift`` is the layer the LoRA adapter trains: a per-step mean shift, the optimal policy's form here
    (the 6-step sampler's timesteps fall in distinct bins of 100).
    """

    def __init__(self, scheduler, dim: int = 2, bins: int = 10):
        super().__init__()
        self.register_buffer("noise_scale", (1 - scheduler.alphas_cumprod).sqrt().float())
        self.bin_width = scheduler.config.num_train_timesteps // bins
        self.shift = nn.Linear(bins, dim, bias=False)
        nn.init.zeros_(self.shift.weight)

    def forward(self, x_t, t):
        t = torch.as_tensor(t).long().reshape(-1).expand(x_t.shape[0])
        onehot = nn.functional.one_hot(t // self.bin_width, self.shift.in_features).float()
        return self.noise_scale[t][:, None] * x_t + self.shift(onehot)


def gaussian_target(direction=(1.0, 0.0)) -> FinetuneTarget:
    scheduler = stochastic_ddim()
    a = torch.tensor(direction)
    return FinetuneTarget(
        name="gaussian", model=ExactGaussianDenoiser(scheduler), forward=lambda m, x, t, **c: m(x, t),
        scheduler=scheduler, sample_shape=(2,), rewards={"linear": lambda x, prompts=None: x @ a},
        target_modules=["shift"],
    )


def test_pathwise_reaches_the_closed_form_optimum_of_a_gaussian_base():
    alpha, steps = 0.5, 6
    target = gaussian_target()
    config = tiny_config(reward_weights={"linear": 1.0}, alpha=alpha, estimator="pathwise", iterations=150,
                         batch_size=256, minibatch_size=128, num_inference_steps=steps, learning_rate=0.05,
                         lora_rank=1, lora_alpha=1.0, max_grad_norm=10.0)
    result = finetune(target, config, progress=False)
    pair = adapter_pair(result.model, target.forward, config.adapter_name)
    tuned = rollout(target, pair, 20_000, torch.Generator().manual_seed(11), num_inference_steps=steps, eta=1.0)
    base_denoiser = lora.LoraFamily(result.model, target.forward).member(BASE)
    base = rollout(target, denoiser_pair(base_denoiser, base_denoiser), 20_000, torch.Generator().manual_seed(11),
                   num_inference_steps=steps, eta=1.0)
    # the few-step chain is linear-Gaussian: its samples are N(0, s^2 I) with s^2 < 1, and the optimum is the
    # same Gaussian shifted by s^2 a / alpha with path KL = marginal KL = |shift|^2 / (2 s^2)
    s2 = float(base.samples.var(0).mean())
    shift = (tuned.samples - base.samples).mean(0)  # same noise: the optimal policy's shift is exactly constant
    torch.testing.assert_close(shift, torch.tensor([s2 / alpha, 0.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(tuned.samples.var(0), base.samples.var(0), atol=0.01, rtol=0)  # a pure mean shift
    kl = float(tuned.path_kl.mean())
    assert abs(kl - float(shift.pow(2).sum()) / (2 * s2)) < 0.03  # no KL spent beyond the marginal's
    assert abs(float(shift[0]) - alpha * kl - s2 / (2 * alpha)) < 0.01  # the closed-form best objective gain


def test_pathwise_and_score_function_estimators_improve_the_same_objective():
    common = dict(iterations=25, batch_size=64, minibatch_size=64, num_inference_steps=8, learning_rate=1e-2)
    for estimator in ("score", "pathwise"):
        target = tiny_target()
        target.scheduler = stochastic_ddim()
        result = finetune(target, tiny_config(estimator=estimator, **common), progress=False)
        first, last = result.curves[0], result.curves[-1]
        assert first["kl"] == 0.0 and last["reward"] > first["reward"] + 0.5, estimator
        assert sum(r["objective"] for r in result.curves[-3:]) > sum(r["objective"] for r in result.curves[:3])


def test_pathwise_resume_after_kill_reaches_the_same_adapter(tmp_path):
    from diffusion_blend.adapters import read_adapter

    config = tiny_config(estimator="pathwise", iterations=5, checkpoint_every=2)

    def target():
        t = tiny_target()
        t.scheduler = stochastic_ddim()
        return t

    full = finetune(target(), config, out_dir=tmp_path / "full", progress=False)
    with pytest.raises(TrainingInterrupted):
        finetune(target(), config, out_dir=tmp_path / "killed", progress=False, stop_after=3)
    resumed = finetune(target(), config, out_dir=tmp_path / "killed", progress=False)
    a, b = read_adapter(full.adapter_path)[0], read_adapter(resumed.adapter_path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.curves == full.curves and (tmp_path / "full" / ADAPTER_NAME).exists()


def test_pathwise_refuses_deterministic_steps_and_rewards_without_gradients():
    deterministic = tiny_target()  # plain DDIM: the last step (to abar = 1) has sigma = 0
    with pytest.raises(DiffusionBlendError, match="deterministic"):
        finetune(deterministic, tiny_config(estimator="pathwise"), progress=False)

    class Flat:
        differentiable = False

        def __call__(self, x, prompts=None):
            return x[:, 0]

    declared = tiny_target()
    declared.scheduler, declared.rewards = stochastic_ddim(), {"right": Flat()}
    with pytest.raises(DiffusionBlendError, match="'right' is not differentiable"):
        finetune(declared, tiny_config(estimator="pathwise"), progress=False)
    assert lora.adapter_names(declared.model) == ()  # refused before an adapter was added

    undeclared = tiny_target()
    undeclared.scheduler = stochastic_ddim()
    undeclared.rewards = {"right": lambda x, prompts=None: x[:, 0].detach()}
    with pytest.raises(RewardError, match="without gradients"):
        finetune(undeclared, tiny_config(estimator="pathwise"), progress=False)
    with pytest.raises(DiffusionBlendError, match="estimator"):
        tiny_config(estimator="adjoint")
