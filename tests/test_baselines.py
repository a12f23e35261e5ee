"""Baselines: Rewarded Soup (weight space), CoDe (blockwise best-of-N), reward-gradient guidance, MORL oracle."""

import pytest
import torch
from torch import nn

from diffusion_blend.baselines.rewarded_soup import add_soup_adapter, rewarded_soup_denoiser
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
        torch.testing.assert_close(layer.get_delta_weight("rewarded_soup"), _delta_by_hand(layer, expert), rtol=1e-6, atol=1e-6)


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
    expected = 2.0 * (w["aesthetic"] * b["aesthetic"] + w["align"] * b["align"]) @ (w["aesthetic"] * a["aesthetic"] + w["align"] * a["align"])
    torch.testing.assert_close(layer.get_delta_weight("soup"), expected, rtol=1e-5, atol=1e-6)
    interpolation = 2.0 * sum(w[e] * _delta_by_hand(layer, e) for e in w)
    assert (layer.get_delta_weight("soup") - interpolation).abs().max() > 1e-2


def test_soup_is_replaced_and_validates():
    net = _lora_net()
    add_soup_adapter(net, Preference({"aesthetic": 1.0, "align": 0.0}), name="soup")
    add_soup_adapter(net, Preference({"aesthetic": 0.0, "align": 1.0}), name="soup")
    torch.testing.assert_close(net.proj.get_delta_weight("soup"), _delta_by_hand(net.proj, "align"), rtol=1e-6, atol=1e-6)
    with pytest.raises(AdapterMismatchError, match="no adapter 'nope'"):
        add_soup_adapter(net, Preference({"nope": 1.0}))
    with pytest.raises(DiffusionBlendError, match="variant"):
        add_soup_adapter(net, Preference({"align": 1.0}), variant="svd")
