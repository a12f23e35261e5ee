"""Baselines: Rewarded Soup (weight space), CoDe (blockwise best-of-N), reward-gradient guidance, MORL oracle."""

import pytest
import torch
from torch import nn

from diffusion_blend.baselines.rewarded_soup import (
    add_soup_adapter,
    rewarded_soup_denoiser,
)
from diffusion_blend.errors import AdapterMismatchError, DiffusionBlendError
from diffusion_blend.lora import LoraFamily, active_adapter, add_lora
from diffusion_blend.preference import Preference


class TinyNet(nn.Module):
    """A Linear and a Conv2d layer, both LoRA targets: ``(B, 2, 4, 4) -> (B, 2, 4, 4)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.proj = nn.Linear(3, 2)

    def forward(self, x, t=None):
        h = torch.tanh(self.conv(x))
        return self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _lora_net(seed=0):
    torch.manual_seed(seed)
    net = TinyNet()
    add_lora(net, "aesthetic", rank=2, alpha=4.0, target_modules=["conv", "proj"])  # scaling 2
    add_lora(net, "align", rank=2, alpha=1.0, target_modules=["conv", "proj"])  # scaling 0.5
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    return net.eval()


def _delta_by_hand(layer, name):
    a, b, s = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    if a.ndim == 4:  # conv: A is (r, in, k, k), B is (out, r, 1, 1)
        return s * (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])
    return s * b @ a


def _forward(model, x, t, **cond):
    return model(x, t)


@pytest.mark.parametrize("variant", ["factors", "deltas"])
@pytest.mark.parametrize("expert", ["aesthetic", "align"])
def test_soup_with_one_hot_weights_is_that_adapter(variant, expert):
    net = _lora_net()
    weights = {"aesthetic": float(expert == "aesthetic"), "align": float(expert == "align")}
    family = LoraFamily(net, _forward, expert_names=("aesthetic", "align"))
    soup = rewarded_soup_denoiser(family, Preference(weights), variant=variant)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    with active_adapter(net, expert):
        expected = net(x)
    torch.testing.assert_close(soup(x, 10), expected, rtol=1e-6, atol=1e-6)
    for layer in (net.conv, net.proj):
        torch.testing.assert_close(
            layer.get_delta_weight("rewarded_soup"), _delta_by_hand(layer, expert), rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("kl_scale", [1.0, 1.7])
def test_delta_soup_is_exact_weight_interpolation(kl_scale):
    net = _lora_net()
    w = {"aesthetic": 0.3, "align": 0.7}
    add_soup_adapter(net, Preference(w, kl_scale), variant="deltas", name="soup")
    for layer in (net.conv, net.proj):
        expected = kl_scale * sum(w[e] * _delta_by_hand(layer, e) for e in w)
        torch.testing.assert_close(layer.get_delta_weight("soup"), expected, rtol=1e-5, atol=1e-6)
        assert layer.r["soup"] == 4  # rank r_1 + r_2
    # merged weights W + Delta used by the forward pass: compare the network output with a hand-merged copy
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    merged = TinyNet()
    with torch.no_grad():
        merged.conv.weight.copy_(net.conv.base_layer.weight + net.conv.get_delta_weight("soup"))
        merged.conv.bias.copy_(net.conv.base_layer.bias)
        merged.proj.weight.copy_(net.proj.base_layer.weight + net.proj.get_delta_weight("soup"))
        merged.proj.bias.copy_(net.proj.base_layer.bias)
    with active_adapter(net, "soup"):
        torch.testing.assert_close(net(x), merged(x), rtol=1e-5, atol=1e-6)


def test_factor_soup_is_product_of_averaged_factors_not_the_delta_average():
    net = _lora_net()
    w = {"aesthetic": 0.4, "align": 0.6}
    add_soup_adapter(net, Preference(w, 2.0), variant="factors", name="soup")
    layer = net.proj
    a = {e: layer.lora_A[e].weight for e in w}
    b = {e: layer.scaling[e] * layer.lora_B[e].weight for e in w}
    expected = (
        2.0
        * (w["aesthetic"] * b["aesthetic"] + w["align"] * b["align"])
        @ (w["aesthetic"] * a["aesthetic"] + w["align"] * a["align"])
    )
    torch.testing.assert_close(layer.get_delta_weight("soup"), expected, rtol=1e-5, atol=1e-6)
    interpolation = 2.0 * sum(w[e] * _delta_by_hand(layer, e) for e in w)
    assert (layer.get_delta_weight("soup") - interpolation).abs().max() > 1e-2


def test_soup_is_replaced_and_validates():
    net = _lora_net()
    add_soup_adapter(net, Preference({"aesthetic": 1.0, "align": 0.0}), name="soup")
    add_soup_adapter(net, Preference({"aesthetic": 0.0, "align": 1.0}), name="soup")
    torch.testing.assert_close(
        net.proj.get_delta_weight("soup"), _delta_by_hand(net.proj, "align"), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(AdapterMismatchError, match="no adapter 'nope'"):
        add_soup_adapter(net, Preference({"nope": 1.0}))
    with pytest.raises(DiffusionBlendError, match="variant"):
        add_soup_adapter(net, Preference({"align": 1.0}), variant="svd")


# ----------------------------------------------------------------------------------------------- CoDe and RGG
from diffusion_blend.baselines.code import code_sample, selection_steps  # noqa: E402
from diffusion_blend.baselines.guidance import guided_sample, tempering_schedule  # noqa: E402
from diffusion_blend.errors import RewardError  # noqa: E402
from diffusion_blend.sampling import make_scheduler, sample  # noqa: E402
from diffusion_blend.testbeds.gmm.closed_form import (  # noqa: E402
    GaussianMixture,
    MixtureDenoiser,
    QuadraticForm,
)

MIXTURE = GaussianMixture.isotropic([0.5, 0.5], [[-1.5, 0.0], [1.5, 0.5]], 0.5)
GMM_REWARDS = {"right": QuadraticForm.linear_reward([1.0, 0.0]), "up": QuadraticForm.linear_reward([0.0, 1.0])}


def _base_denoiser(scheduler):
    return MixtureDenoiser(MIXTURE, scheduler.alphas_cumprod)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_code_with_one_candidate_is_plain_sampling(kind):
    scheduler = make_scheduler(kind)
    denoiser = _base_denoiser(scheduler)
    plain = sample(denoiser, scheduler, generator=3, shape=(16, 2), num_inference_steps=20, progress=False).samples
    out = code_sample(
        denoiser, scheduler, rewards=GMM_REWARDS, preference=Preference({"right": 0.5, "up": 0.5}), generator=3,
        shape=(16, 2), num_inference_steps=20, num_candidates=1, block_size=5, progress=False,
    )
    torch.testing.assert_close(out.samples, plain, rtol=0, atol=0)
    assert out.network_evaluations == 20  # the kept look-ahead prediction is reused by the next step


def test_code_counts_and_selects_higher_reward():
    scheduler = make_scheduler("ddim")
    denoiser = _base_denoiser(scheduler)
    preference = Preference({"right": 1.0, "up": 0.0})
    assert selection_steps(50, 5) == list(range(0, 50, 5))  # 10 selection steps, never the last step
    out = code_sample(
        denoiser, scheduler, rewards=GMM_REWARDS, preference=preference, generator=0, shape=(64, 2),
        num_inference_steps=50, num_candidates=4, block_size=5, progress=False,
    )
    assert out.selection_steps == 10
    assert out.network_evaluations == 50 + 10 * (4 - 1)
    assert out.reward_evaluations == 10 * 4 * 1  # only rewards with non-zero weight are evaluated
    plain = sample(denoiser, scheduler, generator=0, shape=(64, 2), num_inference_steps=50, progress=False).samples
    assert out.samples[:, 0].mean() > plain[:, 0].mean() + 0.5


def test_code_softmax_selection_needs_alpha_and_zero_lambda_ignores_reward():
    scheduler = make_scheduler("ddim")
    denoiser = _base_denoiser(scheduler)
    kwargs = dict(
        rewards=GMM_REWARDS, generator=1, shape=(256, 2), num_inference_steps=20, num_candidates=6, progress=False
    )
    with pytest.raises(DiffusionBlendError, match="alpha"):
        code_sample(denoiser, scheduler, preference=Preference({"right": 1.0}), selection="softmax", **kwargs)
    flat = code_sample(
        denoiser, scheduler, preference=Preference({"right": 1.0}, 0.0), selection="softmax", alpha=1.0, **kwargs
    )
    strong = code_sample(
        denoiser, scheduler, preference=Preference({"right": 1.0}, 5.0), selection="softmax", alpha=1.0, **kwargs
    )
    assert strong.samples[:, 0].mean() > flat.samples[:, 0].mean() + 0.5


@pytest.mark.parametrize("zero", ["guidance_scale", "kl_scale"])
def test_guidance_with_zero_scale_is_plain_sampling(zero):
    scheduler = make_scheduler("ddim")
    denoiser = _base_denoiser(scheduler)
    plain = sample(denoiser, scheduler, generator=5, shape=(16, 2), num_inference_steps=20, progress=False).samples
    out = guided_sample(
        denoiser,
        scheduler,
        rewards=GMM_REWARDS,
        preference=Preference({"right": 1.0}, 0.0 if zero == "kl_scale" else 1.0),
        alpha=0.5,
        generator=5,
        shape=(16, 2),
        num_inference_steps=20,
        progress=False,
        guidance_scale=0.0 if zero == "guidance_scale" else 1.0,
    )
    torch.testing.assert_close(out.samples, plain, rtol=0, atol=0)
    assert out.reward_evaluations == 0 and out.network_evaluations == 20


def test_guidance_moves_samples_along_the_reward_gradient():
    scheduler = make_scheduler("ddim")
    denoiser = _base_denoiser(scheduler)
    plain = sample(denoiser, scheduler, generator=7, shape=(128, 2), num_inference_steps=50, progress=False).samples
    kwargs = dict(rewards=GMM_REWARDS, alpha=0.5, generator=7, shape=(128, 2), num_inference_steps=50, progress=False)
    guided = guided_sample(denoiser, scheduler, preference=Preference({"right": 1.0}), **kwargs)
    assert guided.samples[:, 0].mean() > plain[:, 0].mean() + 0.2
    assert guided.reward_evaluations == sum(tempering_schedule(i) > 0 for i in range(50)) - 1  # last step: sigma = 0
    normalized = guided_sample(
        denoiser, scheduler, preference=Preference({"up": 1.0}), normalize_gradient=True, **kwargs
    )
    assert normalized.samples[:, 1].mean() > plain[:, 1].mean() + 0.1


def test_tempering_schedule_values():
    assert tempering_schedule(0) == 0.0
    assert tempering_schedule(10) == pytest.approx(1.024**10 - 1)
    assert tempering_schedule(29) < 1.0 and tempering_schedule(30) == 1.0


def test_guidance_refuses_non_differentiable_rewards():
    scheduler = make_scheduler("ddim")

    class Compressibility:
        differentiable = False

        def __call__(self, images):
            return images.sum(1)

    kwargs = dict(
        preference=Preference({"jpeg": 1.0}),
        alpha=1.0,
        generator=0,
        shape=(4, 2),
        num_inference_steps=5,
        progress=False,
    )
    with pytest.raises(RewardError, match="not"):
        guided_sample(_base_denoiser(scheduler), scheduler, rewards={"jpeg": Compressibility()}, **kwargs)
    with pytest.raises(RewardError, match="without a gradient"):
        guided_sample(
            _base_denoiser(scheduler),
            scheduler,
            rewards={"jpeg": lambda x: x.sum(1).detach()},
            tempering=False,
            **kwargs,
        )


# ----------------------------------------------------------------------------------------------- MORL oracle cache
from diffusion_blend.baselines.morl import MorlOracle  # noqa: E402


def test_morl_oracle_trains_once_per_preference_at_alpha_over_lambda(tmp_path):
    calls = []

    def train_adapter(weights, alpha):
        calls.append((weights, alpha))
        path = tmp_path / "runs" / f"run{len(calls)}.safetensors"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"adapter")
        return path

    oracle = MorlOracle(tmp_path / "cache", train_adapter, alpha=0.5)
    first = oracle.adapter_path(Preference({"a": 0.3, "b": 0.7}, 2.0))
    assert calls == [({"a": 0.3, "b": 0.7}, 0.25)]
    # a new object over the same cache (a rerun) finds it; another lambda or w trains anew; lambda = 0 is the base
    again = MorlOracle(tmp_path / "cache", train_adapter, alpha=0.5)
    assert again.adapter_path(Preference({"b": 0.7, "a": 0.3}, 2.0)) == first.resolve() and again.trained == 0
    again.adapter_path(Preference({"a": 0.3, "b": 0.7}, 1.0))
    assert calls[-1] == ({"a": 0.3, "b": 0.7}, 0.5) and len(calls) == 2
    assert again.adapter_path(Preference({"a": 1.0}, 0.0)) is None and len(calls) == 2
    first.unlink()  # a lost file is retrained
    again.adapter_path(Preference({"a": 0.3, "b": 0.7}, 2.0))
    assert len(calls) == 3


def test_morl_oracle_with_the_dpok_trainer_writes_and_loads_an_adapter_for_r_w(tmp_path):
    from diffusion_blend.adapters import read_adapter
    from diffusion_blend.baselines.morl import dpok_adapter_trainer, morl_denoiser
    from diffusion_blend.testbeds.gmm.distributed_run import tiny_config, tiny_target

    config = {k: v for k, v in vars(tiny_config(iterations=1, batch_size=8, minibatch_size=8)).items()
              if k not in ("reward_weights", "alpha")}
    trainer = dpok_adapter_trainer(tiny_target, config, tmp_path / "runs", progress=False)
    oracle = MorlOracle(tmp_path / "cache", trainer, alpha=1.0)
    preference = Preference({"right": 1.0}, 2.0)
    path = oracle.adapter_path(preference)
    _, metadata = read_adapter(path)
    assert metadata.rewards == {"right": 1.0} and metadata.alpha == 0.5  # alpha / lambda
    target = tiny_target()
    denoiser = morl_denoiser(oracle, preference, target.model.eval(), target.forward, architecture=target.architecture)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    assert denoiser(x, 500).shape == (4, 2) and oracle.trained == 1
    base = morl_denoiser(oracle, Preference({"right": 1.0}, 0.0), target.model, target.forward)
    torch.testing.assert_close(base(x, 500), target.forward(tiny_target().model.eval(), x, 500))
