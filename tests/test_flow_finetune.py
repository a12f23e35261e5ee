"""Fine-tuning SD3 / FLUX experts with the DPOK trainer on the flow SDE, and the round trip through stock diffusers.

Independent truths: stock diffusers pipelines loading the exported file (``load_lora_weights``) and sampling with
their own loop; the trained transformer's own LoRA tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from diffusion_blend.cli import main
from diffusion_blend.pipelines import BlendStableDiffusion3Pipeline
from diffusion_blend.pipelines.flow_target import flow_finetune_target
from diffusion_blend.pipelines.lora_files import (
    DIFFUSERS_LORA_NAME,
    export_run_adapter,
    read_diffusers_lora_metadata,
)
from diffusion_blend.pipelines.tiny import tiny_flux_pipeline, tiny_sd3_pipeline
from diffusion_blend.preference import Preference
from diffusion_blend.rewards import get_reward
from diffusion_blend.sampling import FlowMatchSDEScheduler
from diffusion_blend.training.config import DPOKConfig
from diffusion_blend.training.dpok import finetune

SD3_KW = dict(text_encoder_3=None, tokenizer_3=None)
PROMPTS = ["a cat", "a red house"]
SIZE = 16


def config(**extra):
    fields = dict(reward_weights={"jpeg_compressibility": 1.0}, alpha=0.5, iterations=2, batch_size=2,
                  minibatch_size=2, updates_per_batch=1, learning_rate=3e-2, lora_rank=4, lora_alpha=2.0,
                  num_inference_steps=3, eta=0.7)
    return DPOKConfig(**{**fields, **extra})


def lora_tensors(model, adapter):
    """LoRA tensors of one adapter, keyed by module path and A/B (adapter name stripped)."""
    return {key.replace(f".{adapter}.", "."): value for key, value in model.named_parameters()
            if f"lora_A.{adapter}." in key or f"lora_B.{adapter}." in key}


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_finetune")
    pipe = tiny_sd3_pipeline(root)
    pipe.save_pretrained(root / "base")
    target = flow_finetune_target(pipe, PROMPTS, {"jpeg_compressibility": get_reward("jpeg_compressibility")},
                                  guidance_scale=4.0, resolution=SIZE)
    assert isinstance(target.scheduler, FlowMatchSDEScheduler)
    result = finetune(target, config(), out_dir=root / "run", progress=False)
    export_run_adapter(result.model, result.adapter_name, root / "run", result.adapter_path, StableDiffusion3Pipeline)
    return root, target, result


def test_sd3_expert_round_trips_through_stock_diffusers(sd3_run):
    root, target, result = sd3_run
    trained = lora_tensors(result.model, result.adapter_name)
    assert any(float(v.detach().abs().max()) > 0 for k, v in trained.items() if "lora_B" in k)  # training moved lora_B
    curve = result.curves[-1]
    assert all(torch.isfinite(torch.tensor(float(curve[k]))) for k in ("reward", "kl", "objective"))
    stock = StableDiffusion3Pipeline.from_pretrained(root / "base", **SD3_KW)
    stock.load_lora_weights(str(root / "run"), adapter_name="expert")  # the run folder loads as is
    loaded = lora_tensors(stock.transformer, "expert")
    assert set(loaded) == set(trained)
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value.detach())
    metadata = read_diffusers_lora_metadata(root / "run" / DIFFUSERS_LORA_NAME)
    assert metadata.alpha == 0.5 and metadata.rewards == {"jpeg_compressibility": 1.0}
    # the expert samples the same through stock diffusers and through the blend pipeline (one-hot preference)
    stock.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    run = dict(prompt="a cat", latents=latents, num_inference_steps=3, height=SIZE, width=SIZE, guidance_scale=4.0,
               output_type="latent")
    want = stock(**run).images
    ours = BlendStableDiffusion3Pipeline.from_pretrained(root / "base", **SD3_KW)
    ours.load_adapter(root / "run", "expert")
    ours.set_progress_bar_config(disable=True)
    torch.testing.assert_close(ours(preference=Preference({"expert": 1.0}), **run).images, want, rtol=1e-4, atol=1e-5)
    stock.disable_lora()
    assert not torch.allclose(stock(**run).images, want, atol=1e-4)


def test_flux_expert_round_trips_through_stock_diffusers(tmp_path):
    pipe = tiny_flux_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "base")
    target = flow_finetune_target(pipe, PROMPTS, {"jpeg_compressibility": get_reward("jpeg_compressibility")},
                                  resolution=SIZE)
    assert target.sample_shape == ((SIZE // 2) ** 2, 16)
    result = finetune(target, config(iterations=1), out_dir=tmp_path / "run", progress=False)
    export_run_adapter(result.model, result.adapter_name, tmp_path / "run", result.adapter_path, FluxPipeline)
    stock = FluxPipeline.from_pretrained(tmp_path / "base")
    stock.load_lora_weights(str(tmp_path / "run"), adapter_name="expert")
    trained = lora_tensors(result.model, result.adapter_name)
    loaded = lora_tensors(stock.transformer, "expert")
    assert set(loaded) == set(trained) and trained
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value.detach())


def test_cli_finetune_sd3_then_sample_reads_the_expert_alpha(sd3_run, tmp_path):
    root, _, _ = sd3_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    code = main(["finetune", "--kind", "sd3", "--base", str(root / "base"), "--prompts", str(prompts),
                 "--rewards", "jpeg_compressibility=1", "--alpha", "0.25", "--iterations", "1", "--batch-size", "2",
                 "--minibatch-size", "2", "--steps", "2", "--eta", "0.7", "--resolution", str(SIZE),
                 "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0 and (tmp_path / "run" / DIFFUSERS_LORA_NAME).is_file()
    args = ["sample", "--base", str(root / "base"), "--adapter", f"a={tmp_path / 'run'}", "--weights", "a=1",
            "--prompt", "a cat", "--steps", "2", "--resolution", "16", "--num-images", "1"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["experts"]["a"]["alpha"] == 0.25
    # a second expert trained with another alpha blends (each expert tilts by its own r_i / alpha_i), and
    # settings.json records each expert's alpha; SMC targets what the blend serves (implied weights w_i / alpha_i)
    two = [*args[:4], f"a={tmp_path / 'run'}", "--adapter", f"b={root / 'run'}", "--weights", "a=0.5,b=0.5", *args[7:]]
    assert main([*two, "--out", str(tmp_path / "x")]) == 0
    experts = json.loads((tmp_path / "x" / "settings.json").read_text())["experts"]
    assert experts["a"]["alpha"] == 0.25 and experts["b"]["alpha"] != 0.25
    assert main([*two, "--method", "smc", "--particles", "2", "--out", str(tmp_path / "y")]) == 0
    smc = json.loads((tmp_path / "y" / "settings.json").read_text())
    alphas = {name: smc["experts"][name]["alpha"] for name in ("a", "b")}
    assert smc["target"]["implied_weights"] == pytest.approx({name: 0.5 / alphas[name] for name in alphas})


def test_rollout_kl_is_the_exact_gaussian_kl_of_the_guided_sde_steps(sd3_run):
    """The trainer's per-step KL on SD3 = ``||mu_policy - mu_base||^2 / (2 std^2)`` of Flow-GRPO's SDE step, with
    both velocities guided by hand from stock components (the expert through diffusers' loader, the base from disk)."""
    from diffusers import SD3Transformer2DModel

    from diffusion_blend.training.dpok import adapter_pair, rollout

    root, target, result = sd3_run
    pair = adapter_pair(result.model, target.forward, result.adapter_name)
    batch = rollout(target, pair, 2, torch.Generator().manual_seed(7), num_inference_steps=3, eta=0.7)
    stock = StableDiffusion3Pipeline.from_pretrained(root / "base", **SD3_KW)
    stock.load_lora_weights(str(root / "run"), adapter_name="expert")
    base = SD3Transformer2DModel.from_pretrained(root / "base" / "transformer").eval()
    cond = batch.cond
    scheduler = FlowMatchSDEScheduler.from_config(stock.scheduler.config)
    scheduler.set_timesteps(3)
    for k in range(3):
        x, t = batch.latents[k], batch.timesteps[k]
        with torch.no_grad():
            def guided(model):
                def run(embeds, pooled):
                    return model(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=embeds,  # noqa: B023
                                 pooled_projections=pooled, return_dict=False)[0]
                c = run(cond["encoder_hidden_states"], cond["pooled_projections"])
                u = run(cond["negative_encoder_hidden_states"], cond["negative_pooled_projections"])
                return u + 4.0 * (c - u)
            v_policy, v_base = guided(stock.transformer), guided(base)
        sigma, sigma_next = scheduler.sigmas[k].double(), scheduler.sigmas[k + 1].double()
        dt = sigma_next - sigma
        g = 0.7 * torch.sqrt(sigma / (1 - (scheduler.sigmas[1].double() if sigma == 1 else sigma)))
        coef_v = (1 + g**2 * (1 - sigma) / (2 * sigma)) * dt  # Flow-GRPO's mean: the x-term cancels in the KL
        kl = ((coef_v * (v_policy - v_base).double()) ** 2).flatten(1).sum(1) / (2 * g**2 * -dt)
        torch.testing.assert_close(batch.kl[k].double(), kl, rtol=1e-3, atol=1e-7)
    assert float(batch.kl.sum()) > 0
