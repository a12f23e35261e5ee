"""Adapter routing (issue 15): every routing gives the outputs of per-adapter forwards, through our LoRA forward.

Independent truths: peft's own forward with one adapter active (``set_adapter`` via ``active_adapter``), peft's own
mixed-adapter batch (``adapter_names``), and weights merged by hand (``W + scaling * B @ A``) in a plain copy of the
network. Tolerance: float32 rounding of the same sums in another order, ``rtol = atol = 1e-5`` (a wrong adapter
differs by > 1e-2, checked).
"""

import copy

import pytest
import torch
from torch import nn

from diffusion_blend.denoisers import GuidedFamily, check_routing, device_routing
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.lora import (
    LoraFamily,
    _delta_is_cheaper,
    active_adapter,
    add_lora,
    batched_fits,
    contiguous_blocks,
    lora_layers,
    mixed_adapter_batch,
    routed_adapters,
)
from diffusion_blend.preference import BASE

TOL = dict(rtol=1e-5, atol=1e-5)
TOKENS = 24


class TokenNet(nn.Module):
    """Attention-like shapes: ``wide`` sees many rows per sample (the fold ``W + s B A`` is cheaper), ``deep`` one
    pooled row per sample (the in-place low-rank delta is cheaper); ``conv`` is a LoRA layer the fast forward does
    not cover (peft keeps it). ``cond`` shifts the tokens, like a text conditioning."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(6, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.deep = nn.Linear(8, 96, bias=False)
        self.out = nn.Linear(96, 5)
        self.forwards = 0

    def forward(self, x, t, cond=None):
        self.forwards += 1
        h = x if cond is None else x + cond
        scale = 1 + torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1) / 1000  # shared or per-row timestep
        h = torch.tanh(self.wide(h) * scale)  # (B, T, 8)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.out(torch.tanh(self.deep(h.mean(1))))  # (B, 5)


def token_net(conv: bool = True) -> TokenNet:
    torch.manual_seed(0)
    net = TokenNet()
    targets = {"a": ["wide", "deep", "out"] + (["conv"] if conv else []), "b": ["deep"], "c": ["wide", "out"]}
    for i, (name, modules) in enumerate(targets.items()):
        add_lora(net, name, rank=2, target_modules=modules, alpha=3.0 + i)
        for layer in lora_layers(net):
            if name in layer.lora_B:
                nn.init.normal_(layer.lora_B[name].weight, std=0.3)
    return net.eval()


def inputs(batch: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TOKENS, 6, generator=gen), torch.randn(batch, TOKENS, 6, generator=gen)


def peft_single(net, member, x, t, **cond):
    with torch.no_grad(), active_adapter(net, member):
        return net(x, t, **cond)


def test_the_test_network_exercises_both_forms_and_adapters_differ():
    assert not _delta_is_cheaper(TOKENS, 6, 8, 2)  # wide: W + s B A folded
    assert _delta_is_cheaper(1, 8, 96, 2)  # deep: low-rank delta accumulated in place
    net = token_net()
    x, _ = inputs(2)
    outs = [peft_single(net, m, x, 100) for m in (BASE, "a", "b", "c")]
    assert all((p - q).abs().max() > 1e-2 for i, p in enumerate(outs) for q in outs[i + 1:])


@pytest.mark.parametrize("blocks", [
    [(0, 5, "a")], [(0, 5, None)], [(0, 2, "a"), (2, 3, None), (3, 5, "b")], [(0, 1, "c"), (1, 4, "a"), (4, 5, "c")],
])
def test_routed_forward_equals_peft_mixed_batch_and_single_adapter_forwards(blocks):
    net = token_net()
    x, _ = inputs(5)
    with torch.no_grad(), routed_adapters(net, blocks):
        assert "forward" in vars(net.wide) and "forward" not in vars(net.conv)  # ours on Linear, peft's on conv
        ours = net(x, 300)
    rows = ["__base__" if name is None else name for a, b, name in blocks for _ in range(a, b)]
    with torch.no_grad(), mixed_adapter_batch(net, rows):
        peft_mixed = net(x, 300)
    torch.testing.assert_close(ours, peft_mixed, **TOL)
    for a, b, name in blocks:
        torch.testing.assert_close(ours[a:b], peft_single(net, name, x[a:b], 300), **TOL)


def test_routed_forward_equals_hand_merged_weights():
    net = token_net(conv=False)
    x, _ = inputs(3)
    for name in ("a", "b", "c"):
        merged = copy.deepcopy(net)
        plain = TokenNet().eval()
        state = {}
        for key, module in merged.named_modules():
            if hasattr(module, "base_layer"):
                weight = module.base_layer.weight.detach().clone()
                if name in module.lora_A:
                    weight += module.scaling[name] * module.lora_B[name].weight @ module.lora_A[name].weight
                state[f"{key}.weight"] = weight
                if module.base_layer.bias is not None:
                    state[f"{key}.bias"] = module.base_layer.bias.detach()
        state.update({k: v for k, v in net.state_dict().items() if k.startswith("conv.")})
        plain.load_state_dict(state)
        with torch.no_grad(), routed_adapters(net, [(0, 3, name)]):
            ours = net(x, 50)
        torch.testing.assert_close(ours, plain(x, 50), **TOL)


def test_routing_leaves_no_hook_and_peft_state_unchanged_even_after_an_error():
    net = token_net()
    layers = lora_layers(net)
    with active_adapter(net, "b"):
        before = [
            (layer.disable_adapters, list(layer.active_adapters), dict(layer._forward_pre_hooks)) for layer in layers
        ]
        with pytest.raises(RuntimeError, match="boom"), routed_adapters(net, [(0, 1, "a"), (1, 2, None)]):
            assert "forward" in vars(layers[0])
            raise RuntimeError("boom")
        after = [
            (layer.disable_adapters, list(layer.active_adapters), dict(layer._forward_pre_hooks)) for layer in layers
        ]
        assert after == before and not any("forward" in vars(layer) for layer in layers)
        x, _ = inputs(2)
        torch.testing.assert_close(net(x, 10), peft_single(net, "b", x, 10), rtol=0, atol=0)  # peft's path again


def test_routed_batch_gradients_equal_per_block_peft_gradients():
    """Rows are independent, so the batch loss's gradients are the sums over blocks of peft's single-adapter ones
    (peft's own mixed batch is no reference here: its masked in-place update drops some adapters' gradients)."""
    net = token_net()
    params = [net.wide.lora_B["a"].weight, net.out.lora_A["c"].weight, net.deep.lora_B["a"].weight]
    x, _ = inputs(4)
    x.requires_grad_(True)
    with routed_adapters(net, [(0, 2, "a"), (2, 4, "c")]):
        net(x, 20).square().sum().backward()
    ours = [x.grad.clone(), *(p.grad.clone() for p in params)]
    net.zero_grad()
    x.grad = None
    for a, b, name in [(0, 2, "a"), (2, 4, "c")]:
        with active_adapter(net, name):
            net(x[a:b], 20).square().sum().backward()
    for mine, peft in zip(ours, [x.grad, *(p.grad for p in params)]):
        torch.testing.assert_close(mine, peft, **TOL)


@pytest.mark.parametrize("routing", ["batched", "sequential", "auto"])
def test_lora_family_routings_equal_peft_single_adapter_forwards(routing):
    net = token_net()
    fam = LoraFamily(net, lambda model, x, t, **cond: model(x, t, **cond), routing=routing)
    x, shift = inputs(2)
    preds = fam.predict_all(x, 400, [BASE, "a", "b", "c"], cond=shift)
    assert fam.last_routing == ("sequential" if routing == "auto" else routing)  # auto on CPU: one forward each
    for member, pred in zip([BASE, "a", "b", "c"], preds):
        torch.testing.assert_close(pred, peft_single(net, member, x, 400, cond=shift), **TOL)
    # interleaved members (DB-MPA-LS draws) and a per-row timestep vector follow their rows
    x4, shift4 = inputs(4, seed=2)
    t = torch.tensor([100, 200, 300, 400])
    members = ["c", BASE, "c", "a"]
    routed = fam.route(x4, t, members, cond=shift4)
    for row, member in enumerate(members):
        expected = peft_single(net, member, x4[row:row + 1], int(t[row]), cond=shift4[row:row + 1])
        torch.testing.assert_close(routed[row:row + 1], expected, **TOL)


def test_forward_counts_per_routing():
    for routing, forwards in (("batched", 1), ("sequential", 3)):
        net = token_net()
        fam = LoraFamily(net, lambda model, x, t: model(x, t), routing=routing)
        fam.route(inputs(4)[0], 5, ["a", "b", "a", BASE])
        assert net.forwards == fam.forwards == forwards and fam.calls == 1


@pytest.mark.parametrize("routing", ["batched", "sequential"])
def test_guided_family_routes_cfg_branches_batched_or_sequential_with_equal_outputs(routing):
    net = token_net()
    fam = LoraFamily(net, lambda model, x, t, **cond: model(x, t, **cond))
    x, shift = inputs(2)
    uncond = torch.zeros_like(shift)
    guided = GuidedFamily(fam, 4.0, {"cond": uncond}, routing=routing)
    net.forwards = 0
    out = guided.route(x, 600, ["a", "a"], cond=shift)
    assert guided.last_routing == routing and net.forwards == (1 if routing == "batched" else 2)
    eps_u, eps_c = peft_single(net, "a", x, 600, cond=uncond), peft_single(net, "a", x, 600, cond=shift)
    torch.testing.assert_close(out, eps_u + 4.0 * (eps_c - eps_u), **TOL)
    # conditioning that cannot share one call (different keys) falls back to two calls
    other = GuidedFamily(fam, 4.0, {}, routing="batched")
    other.route(x, 600, ["a", "a"], cond=shift)
    assert other.last_routing == "sequential"


def test_auto_routing_by_device_and_memory_rule():
    assert device_routing("auto", "cpu") == "sequential" and device_routing("auto", "cuda") == "batched"
    assert device_routing("batched", "cpu") == "batched" and device_routing("sequential", "cuda") == "sequential"
    gib = 2**30
    assert batched_fits(gib, 3, int(2.5 * gib))  # 2 more blocks x 1 GiB x 1.25 headroom = 2.5 GiB
    assert not batched_fits(gib, 3, int(2.4 * gib))
    assert contiguous_blocks(["a", "a", None, "a"]) == [(0, 2, "a"), (2, 3, None), (3, 4, "a")]


def test_bad_routing_is_one_clear_error():
    with pytest.raises(DiffusionBlendError, match="unknown routing 'fast'; choose one of auto, batched, sequential"):
        check_routing("fast")
    with pytest.raises(DiffusionBlendError, match="unknown routing"):
        LoraFamily(token_net(), lambda model, x, t: model(x, t), routing="fast")
    net = token_net()
    with pytest.raises(DiffusionBlendError, match="routing='sequential'"), torch.no_grad():
        with routed_adapters(net, [(0, 1, "a"), (1, 2, "b")]):
            net.wide(torch.randn(3, 6))  # a layer seeing another batch than the routed one


def test_benchmark_cuda_path_refuses_in_one_line_without_cuda_and_checks_variants():
    """The ``--device cuda`` figures need a GPU (none here): the script says so in one line, exit status 2."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sd_blend.py"
    runs = [["--variants", "mpa_fastest"]]
    if not torch.cuda.is_available():
        runs.append(["--device", "cuda", "--dtype", "float16"])
    for args in runs:
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert ("CUDA" if "cuda" in args else "mpa_fastest") in proc.stderr


def test_a_hooked_base_layer_keeps_peft_forward_and_its_hook():
    net = token_net()
    handle = net.wide.base_layer.register_forward_hook(lambda module, args, out: out + 1.0)
    x, _ = inputs(3)
    with torch.no_grad(), routed_adapters(net, [(0, 1, "a"), (1, 3, "c")]):
        assert "forward" not in vars(net.wide) and "forward" in vars(net.deep)
        ours = net(x, 70)
    torch.testing.assert_close(ours[:1], peft_single(net, "a", x[:1], 70), **TOL)
    torch.testing.assert_close(ours[1:], peft_single(net, "c", x[1:], 70), **TOL)
    handle.remove()
    with torch.no_grad(), routed_adapters(net, [(0, 1, "a"), (1, 3, "c")]):
        unhooked = net(x, 70)
    assert (ours - unhooked).abs().max() > 1e-3  # the hook took effect


def test_routed_batch_under_cpu_autocast_matches_peft_under_autocast():
    net = token_net()
    x, _ = inputs(4)
    blocks = [(0, 2, "a"), (2, 4, None)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with routed_adapters(net, blocks):
            ours = net(x, 30)
        with mixed_adapter_batch(net, ["a", "a", "__base__", "__base__"]):
            peft = net(x, 30)
    torch.testing.assert_close(ours.float(), peft.float(), rtol=2e-2, atol=2e-2)  # bfloat16 rounding
