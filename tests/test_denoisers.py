"""Denoiser contract, DB-MPA / DB-KLA blends, DB-MPA-LS switching, CFG, LoRA mixed batches."""

import pytest
import torch
from torch import nn

from diffusion_blend.denoisers import (
    BlendedDenoiser,
    CallableFamily,
    GuidedDenoiser,
    GuidedFamily,
    SwitchingDenoiser,
    make_denoiser,
)
from diffusion_blend.lora import LoraFamily, active_adapter, add_lora, lora_layers
from diffusion_blend.preference import BASE, Preference, PreferenceError
from diffusion_blend.sampling import make_scheduler, sample


class CountingDenoiser:
    """A fixed random non-linear denoiser with a conditioning shift; counts calls and rows seen."""

    def __init__(self, seed: int, dim: int = 3):
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(dim, dim, generator=gen) / dim**0.5
        self.bias = torch.randn(dim, generator=gen)
        self.calls = 0
        self.rows = 0

    def __call__(self, x, t, shift=None):
        self.calls += 1
        self.rows += x.shape[0]
        out = torch.tanh(x @ self.weight + self.bias * (1 + int(t) / 1000))
        return out if shift is None else out + shift


def family(identical: bool = False):
    base = CountingDenoiser(0)
    experts = {name: CountingDenoiser(1 if identical else seed) for name, seed in [("a", 1), ("b", 2), ("c", 3)]}
    return CallableFamily(base, experts)


X = torch.randn(6, 3, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_one_hot_weights_reproduce_the_expert_exactly(name):
    fam = family()
    blended = BlendedDenoiser(fam, Preference({name: 1.0}))(X, 500)
    assert torch.equal(blended, fam.experts[name](X, 500))
    assert fam.base.calls == 0  # DB-MPA never evaluates the base
    assert all(e.calls == 0 for n, e in fam.experts.items() if n != name)  # zero coefficients are skipped


def test_one_hot_sampling_reproduces_single_expert_sampling():
    fam, scheduler = family(), make_scheduler("ddim")
    blended = sample(BlendedDenoiser(fam, Preference({"b": 1.0})), scheduler, generator=3, shape=(5, 3),
                     num_inference_steps=20, progress=False).samples
    alone = sample(fam.experts["b"], scheduler, generator=3, shape=(5, 3), num_inference_steps=20,
                   progress=False).samples
    assert torch.equal(blended, alone)


def test_zero_kl_scale_reproduces_the_base_exactly():
    fam = family()
    assert torch.equal(BlendedDenoiser(fam, Preference({"a": 0.4, "b": 0.6}, 0.0))(X, 10), fam.base(X, 10))
    assert all(e.calls == 0 for e in fam.experts.values())


@pytest.mark.parametrize(
    "weights", [{"a": 1.0}, {"a": 0.3, "b": 0.7}, {"a": 0.2, "b": 0.3, "c": 0.5}, {"a": -1, "b": 2}]
)
def test_identical_experts_make_the_result_independent_of_w(weights):
    fam = family(identical=True)
    torch.testing.assert_close(BlendedDenoiser(fam, Preference(weights))(X, 100), fam.experts["a"](X, 100))


def test_kl_blend_formula_with_extrapolation():
    fam = family()
    out = BlendedDenoiser(fam, Preference.kl_only("a", 2.0))(X, 250)
    torch.testing.assert_close(out, 2 * fam.experts["a"](X, 250) - fam.base(X, 250))


def test_cfg_commutes_with_the_blend():
    fam = family()
    shift = torch.full((X.shape[0], 3), 0.7)
    uncond = {"shift": torch.zeros(X.shape[0], 3)}
    for pref in [Preference({"a": 0.3, "b": 0.7}), Preference({"a": 0.5, "c": 0.25}, 1.7)]:
        blend_of_guided = BlendedDenoiser(GuidedFamily(fam, 7.5, uncond), pref)(X, 300, shift=shift)
        guided_blend = GuidedDenoiser(BlendedDenoiser(fam, pref), 7.5, uncond)(X, 300, shift=shift)
        torch.testing.assert_close(blend_of_guided, guided_blend, rtol=1e-5, atol=1e-5)


def test_batched_conditioning_is_routed_with_its_rows():
    fam = family()
    shift = torch.randn(X.shape[0], 3, generator=torch.Generator().manual_seed(2))
    out = BlendedDenoiser(fam, Preference({"a": 0.5, "b": 0.5}))(X, 40, shift=shift)
    torch.testing.assert_close(out, 0.5 * fam.experts["a"](X, 40, shift) + 0.5 * fam.experts["b"](X, 40, shift))


def test_switching_one_hot_reproduces_the_expert_exactly():
    fam = family()
    torch.testing.assert_close(SwitchingDenoiser(fam, Preference({"c": 1.0}), 0)(X, 5), fam.experts["c"](X, 5))


def test_switching_frequencies_match_the_coefficients():
    fam = family()
    pref = Preference({"a": 0.2, "b": 0.3}, 1.0)  # c = (base 0.5, a 0.2, b 0.3)
    switching = SwitchingDenoiser(fam, pref, generator=11)
    x = torch.zeros(2000, 3)
    for _ in range(10):
        switching(x, 1)
    n = 20000
    freq = switching.selection_counts.double() / n
    expected = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    assert switching.members == [BASE, "a", "b"]
    assert ((freq - expected).abs() < 4 * (expected * (1 - expected) / n).sqrt()).all()


def test_switching_costs_one_evaluation_per_sample_per_step():
    fam = family()
    pref = Preference({"a": 0.2, "b": 0.3, "c": 0.1})
    steps, batch = 15, 8
    sample(SwitchingDenoiser(fam, pref, 4), make_scheduler("ddpm"), generator=0, shape=(batch, 3),
           num_inference_steps=steps, progress=False)
    members = [fam.base, *fam.experts.values()]
    assert sum(m.rows for m in members) == steps * batch  # every sample: exactly one model per step
    assert all(m.calls <= steps for m in members)  # each member at most one (sub-)batch call per step


def test_switching_rejects_negative_coefficients():
    with pytest.raises(PreferenceError, match="DB-MPA"):
        SwitchingDenoiser(family(), Preference.kl_only("a", 1.5), 0)
    with pytest.raises(PreferenceError, match="seed"):
        make_denoiser(family(), Preference({"a": 1.0}), "ls")
    with pytest.raises(PreferenceError, match="unknown blend method"):
        make_denoiser(family(), Preference({"a": 1.0}), "soup")


def test_unknown_expert_and_missing_base_are_clear_errors():
    with pytest.raises(PreferenceError, match="available: a, b, c"):
        BlendedDenoiser(family(), Preference({"z": 1.0}))
    no_base = CallableFamily(None, {"a": CountingDenoiser(1)})
    with pytest.raises(PreferenceError, match="needs the base model"):
        BlendedDenoiser(no_base, Preference({"a": 1.0}, 0.5))(X, 1)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 32)
        self.out = nn.Linear(32, 3)
        self.forwards = 0

    def forward(self, x, t):
        self.forwards += 1
        time = torch.full_like(x[:, :1], float(t) / 1000)
        return self.out(torch.tanh(self.inp(torch.cat([x, time], dim=1))))


def lora_net():
    torch.manual_seed(0)
    net = TinyNet()
    for i, name in enumerate(["a", "b"]):
        add_lora(net, name, rank=2, target_modules=["inp", "out"])
        for layer in lora_layers(net):
            nn.init.normal_(layer.lora_B[name].weight, std=0.5 + i)
    return net.eval()


@pytest.mark.parametrize("routing, forwards", [("batched", 1), ("sequential", 3), ("auto", 3)])  # auto: CPU
def test_lora_family_routes_every_member_and_matches_single_adapters(routing, forwards):
    net = lora_net()
    fam = LoraFamily(net, lambda model, x, t: model(x, t), routing=routing)
    net.forwards = 0
    preds = fam.predict_all(X, 300, [BASE, "a", "b"])
    assert net.forwards == forwards == fam.forwards and fam.calls == 1
    for member, pred in zip([BASE, "a", "b"], preds):
        with active_adapter(net, member):
            torch.testing.assert_close(pred, net(X, 300), rtol=1e-5, atol=3e-5)
    assert not torch.allclose(preds[1], preds[2])  # the adapters really differ


def test_lora_blend_equals_blend_of_single_adapter_forwards():
    net = lora_net()
    fam = LoraFamily(net, lambda model, x, t: model(x, t))
    pref = Preference({"a": 0.7, "b": 0.6}, 1.3)
    out = BlendedDenoiser(fam, pref)(X, 800)
    singles = {}
    for member in [BASE, "a", "b"]:
        with active_adapter(net, member):
            singles[member] = net(X, 800)
    expected = (1 - 1.3 * 1.3) * singles[BASE] + 1.3 * 0.7 * singles["a"] + 1.3 * 0.6 * singles["b"]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_lora_family_requires_eval_mode_and_known_adapters():
    net = lora_net()
    with pytest.raises(PreferenceError, match="no adapter 'zzz'"):
        LoraFamily(net, lambda model, x, t: model(x, t), ["a", "zzz"])
    net.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        LoraFamily(net, lambda model, x, t: model(x, t)).predict_all(X, 1, ["a", "b"])
