"""KL-regularized policy-gradient fine-tuning: estimator pieces, resume determinism, NaN rewards, learning."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusion_blend import lora
from diffusion_blend.adapters import load_adapter, read_adapter
from diffusion_blend.errors import DiffusionBlendError, RewardError
from diffusion_blend.testbeds.gmm.distributed_run import tiny_config, tiny_target
from diffusion_blend.training.checkpoint import load_checkpoint
from diffusion_blend.training.config import DPOKConfig
from diffusion_blend.training.dpok import (
    ADAPTER_NAME,
    CHECKPOINT_NAME,
    TrainingInterrupted,
    adapter_pair,
    finetune,
    kl_regularized_advantages,
    rollout,
    step_kl,
)


def test_step_kl_is_the_gaussian_kl():
    generator = torch.Generator().manual_seed(0)
    mean_p, mean_q = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    std = torch.tensor(0.37)
    expected = kl_divergence(Normal(mean_p, std), Normal(mean_q, std)).sum(1)
    torch.testing.assert_close(step_kl(mean_p, mean_q, std), expected)
    assert torch.equal(step_kl(mean_p, mean_q, torch.tensor(0.0)), torch.zeros(5))  # deterministic step


def test_advantages_are_kl_regularized_reward_to_go_minus_leave_one_out_mean():
    reward = torch.tensor([1.0, 3.0, 2.0])
    kl = torch.tensor([[0.5, 0.0, 1.0], [0.2, 0.4, 0.0], [0.1, 0.1, 0.3]])  # (K=3 steps, B=3)
    alpha = 2.0
    # returns by hand: step 0 pays KL of steps 1 and 2, step 1 pays step 2, step 2 pays nothing
    returns = torch.stack([reward - alpha * (kl[1] + kl[2]), reward - alpha * kl[2], reward])
    expected = torch.stack([row - torch.tensor([(row.sum() - v) / 2 for v in row]) for row in returns])
    torch.testing.assert_close(kl_regularized_advantages(reward, kl, alpha), expected)


def test_state_dependent_baseline_removes_predictable_variance_and_ignores_noise():
    gen = torch.Generator().manual_seed(3)
    kl = torch.rand(4, 256, generator=gen)
    reward = torch.randn(256, generator=gen)
    plain = kl_regularized_advantages(reward, kl, 0.1)
    # an uninformative control variate gets a ~0 coefficient: close to the plain estimator
    noise = torch.randn(4, 256, generator=gen)
    torch.testing.assert_close(kl_regularized_advantages(reward, kl, 0.1, noise), plain, atol=0.25, rtol=0)
    # a control variate that predicts the reward removes its variance from the advantages
    informed = kl_regularized_advantages(reward, kl, 0.1, reward.expand(4, -1))
    assert informed.var(1).max() < 0.05 * plain.var(1).min()
    # the centring still holds: advantages are deviations from a baseline
    assert informed.mean(1).abs().max() < 1e-5


def test_rollout_kl_matches_separate_forwards_and_deterministic_steps_are_free():
    target = tiny_target()
    lora.add_lora(target.model, "policy", rank=2, target_modules=target.target_modules)
    target.model.eval()
    with torch.no_grad():
        for name, param in target.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    batch = rollout(target, adapter_pair(target.model, target.forward, "policy"), 6, torch.Generator().manual_seed(1),
                    num_inference_steps=4, eta=1.0)
    assert float(batch.stds[-1]) == 0.0  # DDIM's last step (to abar = 1) is deterministic
    assert torch.equal(batch.kl[-1], torch.zeros(6)) and torch.equal(batch.log_probs[-1], torch.zeros(6))
    scheduler = target.scheduler
    for k, t in enumerate(batch.timesteps[:-1]):
        x_t = batch.latents[k]
        abar_t = scheduler.alphas_cumprod[int(t)]
        abar_prev = scheduler.alphas_cumprod[int(batch.timesteps[k + 1])]
        sigma = ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()
        means = []
        for adapter in ("policy", None):  # two separate forwards, DDIM eq. 12 by hand
            with lora.active_adapter(target.model, adapter), torch.no_grad():
                eps = target.model(x_t, t)
            x0 = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
            means.append(abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).sqrt() * eps)
        expected = ((means[0] - means[1]) ** 2).sum(1) / (2 * sigma**2)
        torch.testing.assert_close(batch.kl[k], expected.float(), rtol=1e-4, atol=1e-6)
        assert (batch.kl[k] > 0).all()


def _adapter_tensors(path):
    return read_adapter(path)[0]


def test_resume_after_kill_reaches_the_same_adapter(tmp_path):
    config = tiny_config(iterations=5, checkpoint_every=2)
    full = finetune(tiny_target(), config, out_dir=tmp_path / "full", progress=False)
    with pytest.raises(TrainingInterrupted):
        finetune(tiny_target(), config, out_dir=tmp_path / "killed", progress=False, stop_after=3)
    assert (tmp_path / "killed" / CHECKPOINT_NAME).exists() and not (tmp_path / "killed" / ADAPTER_NAME).exists()
    resumed = finetune(tiny_target(), config, out_dir=tmp_path / "killed", progress=False)
    a, b = _adapter_tensors(full.adapter_path), _adapter_tensors(resumed.adapter_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.curves == full.curves  # iteration 3 was redone from the checkpoint at 2, identically
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)  # it trained
    # and the adapter loads back into a fresh copy of the base
    metadata = load_adapter(tiny_target().model, full.adapter_path, "loaded")
    assert metadata.steps == 5 and metadata.rewards == {"right": 1.0} and metadata.alpha == 1.0


def test_nan_reward_stops_with_its_name_and_keeps_saved_files(tmp_path):
    calls = {"n": 0}

    def flaky(points, prompts=None):
        calls["n"] += 1
        values = points[:, 0].clone()
        if calls["n"] == 5:  # rewards are scored per minibatch (2 calls per iteration): iteration 3
            values[1] = float("nan")
        return values

    target = tiny_target()
    target.rewards = {"flaky": flaky}
    config = tiny_config(reward_weights={"flaky": 1.0}, iterations=4, checkpoint_every=2)
    with pytest.raises(RewardError, match="'flaky'.*NaN"):
        finetune(target, config, out_dir=tmp_path, progress=False)
    # the checkpoint from iteration 2 is intact and loadable
    model = tiny_target().model
    lora.add_lora(model, "policy", rank=config.lora_rank, alpha=config.lora_alpha, target_modules=target.target_modules)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME, model, "policy", optimizer).iteration == 2


def test_config_validation_is_readable(tmp_path):
    with pytest.raises(DiffusionBlendError, match="alpha"):
        DPOKConfig(reward_weights={"right": 1.0}, alpha=0.0)
    with pytest.raises(DiffusionBlendError, match="eta"):
        DPOKConfig(reward_weights={"right": 1.0}, alpha=1.0, eta=0.0)  # eta = 0: no stochastic step, no policy
    (tmp_path / "c.json").write_text('{"reward_weights": {"right": 1}, "alpha": 1, "bogus": 2}')
    with pytest.raises(DiffusionBlendError, match="bogus"):
        DPOKConfig.from_json(tmp_path / "c.json")


@pytest.mark.parametrize("baseline", ["batch", "tweedie"])
def test_training_raises_reward_and_objective_on_a_linear_reward(baseline):
    config = tiny_config(iterations=25, batch_size=64, minibatch_size=64, num_inference_steps=8, learning_rate=1e-2,
                         baseline=baseline)
    result = finetune(tiny_target(), config, progress=False)
    first, last = result.curves[0], result.curves[-1]
    assert first["kl"] == 0.0  # the untrained adapter (lora_B = 0) is the base
    assert last["reward"] > first["reward"] + 0.5
    early = sum(row["objective"] for row in result.curves[:3]) / 3
    late = sum(row["objective"] for row in result.curves[-3:]) / 3
    assert late > early


def test_cli_refuses_incomplete_flags_with_exit_2(tmp_path, capsys):
    from diffusion_blend.cli import main

    assert main(["finetune", "--rewards", "right=1", "--out", str(tmp_path)]) == 2
    assert "--alpha" in capsys.readouterr().err
    assert main(["finetune", "--rewards", "right=1", "--alpha", "-1", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_acceptance_fractions_and_targets_on_the_gaussian_mixture(tmp_path):
    """The issue's acceptance run (docs/finetuning.md): every case reaches >= 0.9 of the best objective."""
    from diffusion_blend.testbeds.gmm.verification import run_verification

    report = run_verification(tmp_path, progress=False)
    for case in [*report["cases"], report["morl_oracle"]]:
        assert case["fraction"] >= 0.9, case
        gain = case["E_target[r]_IS"] - case["E_pre[r]"]
        # near the tilted target, and not far above it (that would be reward hacking past the KL)
        assert abs(case["E_ft[r]"] - case["E_target[r]_IS"]) <= 0.15 * gain, case
    blend, morl = report["blend"], report["morl_oracle"]
    # DB-MPA carries the Jensen gap on this multi-modal mixture: require most of the target's reward gain
    gain = blend["r_w"]["target_IS"] - morl["E_pre[r]"]
    assert blend["r_w"]["blend"] >= morl["E_pre[r]"] + 0.5 * gain, blend
