"""Memory-bounded fine-tuning (issue 11): chunked rollouts, one batched forward, gradient checkpointing, DRaFT-K,
precision of frozen weights, and the weight-free differentiable rewards.

Independent truths: the unchunked computation (same seed), the plain (non-checkpointed) gradient, closed forms
(luma, chroma, the per-step mean shifts of an exact Gaussian denoiser), and a forward hook counting UNet calls.
Tolerance for chunked vs unchunked: states 1e-5 absolute / 1e-4 relative, gradients 1e-4 of the largest gradient
entry (a float32 kernel may sum in another order for another batch size, and the chain amplifies it; the random
numbers themselves are identical).
"""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from diffusion_blend import lora
from diffusion_blend.adapters import base_fingerprint, read_adapter
from diffusion_blend.pipelines.lora_files import unet_architecture
from diffusion_blend.pipelines.sd_target import sd_finetune_target
from diffusion_blend.pipelines.tiny import tiny_sd_pipeline
from diffusion_blend.rewards import get_reward
from diffusion_blend.testbeds.gmm.distributed_run import tiny_config, tiny_target
from diffusion_blend.training.config import DPOKConfig
from diffusion_blend.training.dpok import (
    adapter_pair,
    finetune,
    pathwise_gradient,
    rollout,
    score_rewards,
)
from test_pathwise import gaussian_target, stochastic_ddim

PROMPTS = ["a cat", "a red house", "a dog"]
TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sd_target(tmp_path, guidance_scale=3.0, reward="brightness"):
    pipe = tiny_sd_pipeline(tmp_path)
    return sd_finetune_target(pipe, PROMPTS, {reward: get_reward(reward)}, guidance_scale=guidance_scale)


def with_policy(target, seed=3, scale=0.2, routing="auto"):
    """Give ``target.model`` a LoRA adapter 'policy' with random non-zero weights (so policy != base)."""
    lora.add_lora(target.model, "policy", rank=2, target_modules=target.target_modules)
    target.model.eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in target.model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return adapter_pair(target.model, target.forward, "policy", routing=routing)


def lora_grads(model):
    return torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if "lora_" in n and p.grad is not None])


def test_chunked_rollouts_equal_unchunked_on_sd_with_cfg(tmp_path):
    target = sd_target(tmp_path)
    pair = with_policy(target)
    whole, chunked = (rollout(target, pair, 5, torch.Generator().manual_seed(1), num_inference_steps=3, eta=1.0,
                              chunk_size=size) for size in (None, 2))
    assert whole.prompts == chunked.prompts
    for name in ("latents", "log_probs", "kl", "means_base"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), **TOL)
    torch.testing.assert_close(chunked.cond["encoder_hidden_states"], whole.cond["encoder_hidden_states"])
    assert (whole.kl[:-1] > 0).all()  # the policy differs from the base: the KL comparison has teeth


def test_chunked_rollouts_equal_unchunked_on_an_unconditional_target():
    target = tiny_target()
    pair = with_policy(target)
    whole, chunked = (rollout(target, pair, 7, torch.Generator().manual_seed(2), num_inference_steps=4, eta=1.0,
                              chunk_size=size) for size in (None, 3))
    torch.testing.assert_close(chunked.latents, whole.latents, **TOL)
    torch.testing.assert_close(chunked.kl, whole.kl, **TOL)


def test_policy_base_and_both_cfg_branches_are_one_unet_call_per_step(tmp_path):
    """routing='batched': ONE UNet call per step; 'sequential' (auto's CPU choice): one per member, same rollout."""
    target = sd_target(tmp_path)
    pair = with_policy(target, routing="batched")
    batches = []
    handle = target.model.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        batched = rollout(target, pair, 4, torch.Generator().manual_seed(1), num_inference_steps=3, eta=1.0,
                          chunk_size=2)
        # 2 chunks x 3 steps, each call = 2 members (policy, base) x 2 CFG branches x 2 rows
        assert batches == [8] * 6
        batches.clear()
        sequential = rollout(target, adapter_pair(target.model, target.forward, "policy", routing="sequential"), 4,
                             torch.Generator().manual_seed(1), num_inference_steps=3, eta=1.0, chunk_size=2)
        assert batches == [4] * 12  # policy, then base: each both CFG branches x 2 rows
    finally:
        handle.remove()
    torch.testing.assert_close(sequential.latents, batched.latents, **TOL)
    torch.testing.assert_close(sequential.kl, batched.kl, **TOL)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_pathwise_gradient_does_not_depend_on_chunking_or_checkpointing(tmp_path, checkpointing):
    target = sd_target(tmp_path)
    target.scheduler = stochastic_ddim()
    pair = with_policy(target)
    grads = []
    for minibatch, ckpt in ((4, False), (1, checkpointing), (2, checkpointing)):
        config = DPOKConfig(reward_weights={"brightness": 10.0}, alpha=0.5, batch_size=4, minibatch_size=minibatch,
                            num_inference_steps=3, estimator="pathwise", gradient_checkpointing=ckpt)
        target.model.zero_grad(set_to_none=True)
        reward, kl, _ = pathwise_gradient(target, config, pair, torch.Generator().manual_seed(5))
        grads.append(lora_grads(target.model))
        assert (kl > 0).all()
    assert grads[0].abs().max() > 0  # gradients flow through the chain, the VAE decode and the reward
    for other in grads[1:]:
        torch.testing.assert_close(other, grads[0], atol=1e-4 * float(grads[0].abs().max()), rtol=1e-3)


def _saved_bytes(target, pair, steps, checkpointing):
    config = DPOKConfig(reward_weights={"brightness": 1.0}, alpha=1.0, batch_size=2, minibatch_size=2,
                        num_inference_steps=steps, estimator="pathwise", gradient_checkpointing=checkpointing)
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        pathwise_gradient(target, config, pair, torch.Generator().manual_seed(0))
    return total[0]


def test_checkpointed_pathwise_keeps_only_the_states(tmp_path):
    """What autograd keeps for the backward pass (a saved-tensor hook counts it): with step checkpointing it
    hardly grows from 2 to 8 steps (the states and noises only); without, it grows with the steps."""
    target = sd_target(tmp_path)
    target.scheduler = stochastic_ddim()
    pair = with_policy(target)
    plain = [_saved_bytes(target, pair, steps, False) for steps in (2, 8)]
    checkpointed = [_saved_bytes(target, pair, steps, True) for steps in (2, 8)]
    assert plain[1] > 2.5 * plain[0]
    assert checkpointed[1] < 0.3 * plain[1]
    assert checkpointed[1] - checkpointed[0] < 0.05 * (plain[1] - plain[0])


def test_backprop_steps_truncates_the_gradient_to_the_last_k_steps():
    """Exact Gaussian denoiser whose adapter layer has one column per sampler step (a one-hot time bin): with
    DRaFT-K the columns of the first steps get exactly zero gradient, those of the last K steps the full
    chain's gradient (their effect on the objective does not pass through earlier states)."""
    target = gaussian_target()
    lora.add_lora(target.model, "policy", rank=2, target_modules=target.target_modules)
    target.model.eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in target.model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    pair = adapter_pair(target.model, target.forward, "policy")
    steps, k = 6, 2
    grads = {}
    for backprop in (None, k):
        config = DPOKConfig(reward_weights={"linear": 1.0}, alpha=0.5, batch_size=8, minibatch_size=8,
                            num_inference_steps=steps, estimator="pathwise", backprop_steps=backprop)
        target.model.zero_grad(set_to_none=True)
        pathwise_gradient(target, config, pair, torch.Generator().manual_seed(1))
        (grad_a,) = [p.grad.clone() for n, p in target.model.named_parameters() if "lora_A" in n]
        grads[backprop] = grad_a  # (rank, bins): column j = time bin j
    target.scheduler.set_timesteps(steps)
    bins = [int(t) // target.model.bin_width for t in target.scheduler.timesteps]
    early, late = bins[: steps - k], bins[steps - k:]
    assert torch.equal(grads[k][:, early], torch.zeros_like(grads[k][:, early]))
    assert grads[None][:, early].abs().min() > 0
    torch.testing.assert_close(grads[k][:, late], grads[None][:, late], atol=1e-6, rtol=1e-5)
    with pytest.raises(Exception, match="pathwise"):
        DPOKConfig(reward_weights={"linear": 1.0}, alpha=0.5, backprop_steps=2)  # score estimator: refused


def test_policy_update_with_block_checkpointing_gives_the_same_adapter(tmp_path):
    adapters = []
    for checkpointing in (False, True):
        target = sd_target(tmp_path / str(checkpointing))
        config = DPOKConfig(reward_weights={"brightness": 10.0}, alpha=1.0, iterations=2, batch_size=4,
                            minibatch_size=2, updates_per_batch=1, learning_rate=1e-2, lora_rank=2,
                            num_inference_steps=3, gradient_checkpointing=checkpointing)
        result = finetune(target, config, progress=False)
        if checkpointing:
            assert result.model.down_blocks[1].gradient_checkpointing  # diffusers' block checkpointing was on
        adapters.append({n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_" in n})
    assert adapters[0].keys() == adapters[1].keys()
    assert any(v.abs().max() > 0 for n, v in adapters[0].items() if "lora_B" in n)  # it trained
    for name in adapters[0]:
        torch.testing.assert_close(adapters[1][name], adapters[0][name], atol=1e-6, rtol=1e-4)


def test_low_precision_keeps_lora_adam_and_fingerprint_in_float32(tmp_path):
    target = sd_target(tmp_path / "base")
    fresh_fingerprint = base_fingerprint(target.model, unet_architecture(target.model))
    config = DPOKConfig(reward_weights={"brightness": 10.0}, alpha=1.0, iterations=1, batch_size=2,
                        minibatch_size=1, updates_per_batch=1, num_inference_steps=2, dtype="bfloat16")
    result = finetune(target, config, out_dir=tmp_path / "run", progress=False)
    model = result.model
    frozen = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    trained = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert {p.dtype for m in target.frozen_modules for p in m.parameters()} == {torch.bfloat16}
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "run" / "checkpoint.safetensors"))
    assert {v.dtype for k, v in state.items() if k.startswith("optimizer.")} == {torch.float32}
    assert read_adapter(result.adapter_path)[1].base_fingerprint == fresh_fingerprint  # the base as given


@pytest.mark.parametrize("layout", ["float32", "float16-sharded"])
def test_training_base_loads_frozen_weights_in_low_precision_with_the_float32_fingerprint(tmp_path, layout):
    """``load_training_base`` (``dblend finetune``'s loader) fills the denoiser tensor by tensor in the run's dtype:
    the same values as the stock float32 load cast afterwards, the fingerprint of that float32 load (what
    ``dblend sample`` checks), and no mapping of the weights file left behind (a float32 mapping kept while the
    cast copy is built was the bfloat16 peak, benchmarks/README.md). A float16 file in shards loads the same way."""
    import gc
    from pathlib import Path

    from diffusers import StableDiffusionPipeline

    from diffusion_blend.pipelines.loading import load_training_base

    folder = tmp_path / "base"
    pipe = tiny_sd_pipeline(tmp_path)
    if layout == "float16-sharded":
        pipe.unet.to(torch.float16)
    pipe.save_pretrained(folder)
    if layout == "float16-sharded":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        pipe.unet.save_pretrained(folder / "unet", max_shard_size="20KB")
        assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    kwargs = {"safety_checker": None, "requires_safety_checker": False}
    stock = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, **kwargs)
    expected = base_fingerprint(stock.unet, unet_architecture(stock.unet))
    reference = {key: value.clone() for key, value in stock.unet.state_dict().items()}
    del stock
    gc.collect()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        loaded, fingerprint = load_training_base(StableDiffusionPipeline, folder, dtype, **kwargs)
        assert fingerprint == expected
        assert (loaded.unet.dtype, loaded.text_encoder.dtype) == (dtype, dtype)
        assert loaded.vae.dtype == (torch.float32 if dtype == torch.float16 else dtype)  # force_upcast under fp16
        state = loaded.unet.state_dict()
        assert set(state) == set(reference)
        assert all(torch.equal(state[key], reference[key].to(dtype)) for key in reference)
        if Path("/proc/self/maps").exists():
            assert str(folder / "unet") not in Path("/proc/self/maps").read_text()


def test_training_base_falls_back_to_the_stock_float32_load(tmp_path):
    """Weights the streaming loader does not read (a ``.bin`` file) load the stock way: float32, no fingerprint (the
    trainer fingerprints and casts them as before)."""
    from diffusers import StableDiffusionPipeline

    from diffusion_blend.pipelines.loading import load_training_base

    folder = tmp_path / "base"
    tiny_sd_pipeline(tmp_path).save_pretrained(folder, safe_serialization=False)
    loaded, fingerprint = load_training_base(StableDiffusionPipeline, folder, torch.bfloat16, safety_checker=None,
                                             requires_safety_checker=False)
    assert fingerprint is None and loaded.unet.dtype == torch.float32


def test_float16_uses_a_gradient_scaler_whose_state_is_checkpointed(tmp_path):
    from safetensors import safe_open

    target = sd_target(tmp_path / "base")
    config = DPOKConfig(reward_weights={"brightness": 10.0}, alpha=1.0, iterations=1, batch_size=2,
                        minibatch_size=2, num_inference_steps=2, dtype="float16", estimator="pathwise")
    target.scheduler = stochastic_ddim()
    finetune(target, config, out_dir=tmp_path / "run", progress=False)
    with safe_open(str(tmp_path / "run" / "checkpoint.safetensors"), framework="pt") as handle:
        import json

        extra = json.loads(handle.metadata()["extra"])
    assert extra["grad_scaler"]["scale"] > 1  # the loss is scaled (float16 gradients would underflow)


def test_bfloat16_first_gradient_matches_float32_on_tiny_sd(tmp_path):
    """At a run's first iteration the adapter is the base (lora_B = 0), so the KL is exactly 0 in every precision
    and the pathwise gradient is the reward's: bfloat16 frozen weights give the float32 direction."""
    grads = {}
    for dtype in ("float32", "bfloat16"):
        target = sd_target(tmp_path / dtype)
        target.scheduler = stochastic_ddim()
        config = DPOKConfig(reward_weights={"brightness": 10.0}, alpha=1.0, iterations=1, batch_size=4,
                            minibatch_size=4, num_inference_steps=3, estimator="pathwise", dtype=dtype,
                            learning_rate=1e-12)
        grads_seen = {}

        def keep(optimizer, args, kwargs):
            grads_seen["g"] = torch.cat([p.grad.reshape(-1) for group in optimizer.param_groups  # noqa: B023
                                         for p in group["params"] if p.grad is not None])

        handle = register_optimizer_step_pre_hook(keep)
        try:
            result = finetune(target, config, progress=False)
        finally:
            handle.remove()
        assert result.curves[0]["kl"] == 0.0
        grads[dtype] = grads_seen["g"]
    cosine = torch.nn.functional.cosine_similarity(grads["float32"], grads["bfloat16"], dim=0)
    assert cosine > 0.95, float(cosine)


def test_bfloat16_training_reaches_the_float32_objective_on_tiny_sd(tmp_path):
    """Train the same tiny SD target in float32 and in bfloat16 (pathwise, brightness x 1e5, alpha 1, 30 iterations
    of 8), then evaluate BOTH adapters the same way, in float32, on 256 paired trajectories (same seeds as the
    untrained base): J = 1e5 brightness - path KL. Both gains over the base agree within two paired standard errors;
    the float32 gain is over twice that tolerance, so a bfloat16 run that learned nothing would fail. (bfloat16's own
    training curve reads lower: its KL carries a rounding floor, docs/finetuning.md; the policy it learns does not.)"""
    weight, alpha, trained, name = 1e5, 1.0, {}, None
    for dtype in ("float32", "bfloat16"):
        target = sd_target(tmp_path / dtype)
        target.scheduler = stochastic_ddim()
        config = DPOKConfig(reward_weights={"brightness": weight}, alpha=alpha, iterations=30, batch_size=8,
                            minibatch_size=8, num_inference_steps=4, estimator="pathwise", dtype=dtype,
                            learning_rate=1e-2)
        result = finetune(target, config, progress=False)
        name = result.adapter_name
        trained[dtype] = {n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_" in n}

    def objective(state):
        target = sd_target(tmp_path / "eval")  # float32, the same base (the builder is seeded)
        target.scheduler = stochastic_ddim()
        lora.add_lora(target.model, name, rank=config.lora_rank, target_modules=target.target_modules)
        with torch.no_grad():
            for param_name, param in target.model.named_parameters():
                if state is not None and param_name in state:
                    param.copy_(state[param_name])
            pair = adapter_pair(target.model.eval(), target.forward, name)
            paths = rollout(target, pair, 256, torch.Generator().manual_seed(123), num_inference_steps=4, eta=1.0)
            reward = score_rewards(target, ["brightness"], paths.samples, paths.prompts)["brightness"]
        return weight * reward - alpha * paths.path_kl

    base = objective(None)
    gains = {dtype: objective(state) - base for dtype, state in trained.items()}
    mean = {dtype: float(g.mean()) for dtype, g in gains.items()}
    se = {dtype: float(g.std() / len(g) ** 0.5) for dtype, g in gains.items()}
    tolerance = 2 * (se["float32"] ** 2 + se["bfloat16"] ** 2) ** 0.5
    assert mean["float32"] > 2 * tolerance, (mean, se)  # training moved J well beyond the tolerance
    assert abs(mean["bfloat16"] - mean["float32"]) < tolerance, (mean, se)


def test_bfloat16_training_reaches_the_float32_objective_on_the_tiny_mlp():
    curves = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(iterations=25, batch_size=64, minibatch_size=32, num_inference_steps=8,
                             learning_rate=1e-2, estimator="pathwise", dtype=dtype)
        target = tiny_target()
        target.scheduler = stochastic_ddim()
        curves[dtype] = finetune(target, config, progress=False).curves
    late = {dtype: sum(row["objective"] for row in c[-5:]) / 5 for dtype, c in curves.items()}
    gain = late["float32"] - curves["float32"][0]["objective"]
    assert gain > 0.5  # training moved the objective by far more than the tolerance below
    assert abs(late["bfloat16"] - late["float32"]) < 0.1 * gain, late


def test_brightness_and_saturation_closed_forms_and_gradients():
    colour = torch.tensor([0.9, 0.3, 0.1])
    images = colour[None, :, None, None].expand(2, 3, 4, 4).clone().requires_grad_(True)
    brightness, saturation = get_reward("brightness"), get_reward("saturation")
    value = brightness(images)
    torch.testing.assert_close(value, torch.full((2,), 0.2126 * 0.9 + 0.7152 * 0.3 + 0.0722 * 0.1))
    value.sum().backward()
    torch.testing.assert_close(images.grad[0, :, 0, 0], torch.tensor([0.2126, 0.7152, 0.0722]) / 16)
    images.grad = None
    value = saturation(images)
    torch.testing.assert_close(value, torch.full((2,), 0.8))
    value.sum().backward()
    torch.testing.assert_close(images.grad[0, :, 0, 0], torch.tensor([1.0, 0.0, -1.0]) / 16)
    grey = torch.full((1, 3, 2, 2), 0.4)
    assert float(saturation(grey)) == 0.0 and abs(float(brightness(grey)) - 0.4) < 1e-6
    assert float(brightness(torch.full((1, 1, 2, 2), 0.25))) == 0.25
    assert brightness.differentiable and saturation.differentiable
    from diffusion_blend.errors import RewardError

    with pytest.raises(RewardError, match="3 channels"):
        saturation(torch.zeros(1, 1, 2, 2))


def test_finetune_fixes_glibc_mmap_threshold_on_cpu_and_checks_the_option(monkeypatch):
    """``dblend finetune`` on CPU fixes glibc's mmap threshold of its own process (resident memory then follows the
    live tensors, benchmarks/README.md); 0 keeps glibc's dynamic default, an environment setting is left alone, a GPU
    run only checks the value, and a value glibc refuses is one line. A fresh process: the setting is process-wide."""
    import platform
    import subprocess
    import sys

    from diffusion_blend.devices import MALLOC_MMAP_THRESHOLD, fix_malloc_mmap_threshold
    from diffusion_blend.errors import DiffusionBlendError

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert fix_malloc_mmap_threshold(MALLOC_MMAP_THRESHOLD, apply=False) == "not applied (not a CPU run)"
    assert fix_malloc_mmap_threshold(0) in ("glibc default (dynamic)", "not glibc: allocator unchanged")
    for bad in (-1, 64 * 2**20):
        with pytest.raises(DiffusionBlendError, match="between 0 and"):
            fix_malloc_mmap_threshold(bad, apply=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_malloc_mmap_threshold() == "MALLOC_MMAP_THRESHOLD_=65536 (environment)"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    code = "from diffusion_blend.devices import fix_malloc_mmap_threshold as f; print(f())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert done == ("131072 (fixed)" if glibc else "not glibc: allocator unchanged")


def test_training_benchmark_measures_the_dblend_finetune_command(monkeypatch, tmp_path):
    """bench_sd_train runs the user's command (``dblend finetune`` with the configuration's flags, the command's own
    allocator setting unless ``--malloc-mmap-threshold`` is given) and divides its figures; bad options are one
    line, exit 2. The commands are replaced by a stub here (the real ones take minutes)."""
    import pathlib
    import subprocess
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_sd_train
    finally:
        sys.path.pop(0)

    seen = []

    def fake_run(argv, out, env=None, timeout=None, fork=False):
        seen.append(argv)
        dtype = argv[argv.index("--dtype") + 1]
        peak = 2**30 if dtype == "float32" else 2**29
        return {"peak_rss_bytes": peak, "process_seconds": 2.0, "process_cpu_seconds": 3.0,
                "process_system_seconds": 0.5, "seconds_per_iteration": 1.0,
                "iteration_seconds": [1.0], "cuda_max_memory_allocated": None, "peak_memory_bytes": peak,
                "malloc_mmap_threshold": "131072 (fixed)", "device": "cpu"}

    monkeypatch.setattr(bench_sd_train, "run_finetune", fake_run)
    base = tmp_path / "base"
    base.mkdir()
    args = ["--configs", "score_b1,score_b1_bf16,pathwise_s4", "--base", str(base), "--out", str(tmp_path)]
    assert bench_sd_train.main(args) == 0
    assert bench_sd_train.main([*args, "--malloc-mmap-threshold", "0"]) == 0
    first = seen[0]
    assert first[first.index("finetune") + 1:first.index("finetune") + 3] == ["--kind", "sd"]
    for flag, value in (("--estimator", "score"), ("--batch-size", "1"), ("--steps", "2"), ("--dtype", "float32"),
                        ("--resolution", "256"), ("--iterations", "1"), ("--device", "cpu")):
        assert first[first.index(flag) + 1] == value
    assert "--gradient-checkpointing" in first and "--malloc-mmap-threshold" not in first
    assert seen[1][seen[1].index("--dtype") + 1] == "bfloat16"
    assert seen[2][seen[2].index("--estimator") + 1] == "pathwise"
    assert seen[-1][seen[-1].index("--malloc-mmap-threshold") + 1] == "0"
    table = (tmp_path / "sd_train_cpu_256.md").read_text()
    assert "| peak memory, bfloat16 / float32 | 0.50x | <= 0.6 (met) |" in table
    assert "dblend finetune" in table and (tmp_path / "sd_train_cpu_256_mmap0.json").exists()
    for bad in (["--malloc-mmap-threshold", "-1"], ["--configs", "score_b3"]):
        proc = subprocess.run([sys.executable, bench_sd_train.__file__, *bad], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
