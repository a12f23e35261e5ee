"""Fine-tuning SD3 / FLUX experts with the DPOK trainer on the flow SDE, and the round trip through stock diffusers.

Independent truths: stock diffusers pipelines loading the exported file (``load_lora_weights``) and sampling with
their own loop; the trained transformer's own LoRA tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from tiny_flow import tiny_flux_pipeline, tiny_sd3_pipeline

from diffusion_blend.cli import main
from diffusion_blend.pipelines import BlendStableDiffusion3Pipeline
from diffusion_blend.pipelines.finetune import DIFFUSERS_LORA_NAME, export_run_adapter, read_diffusers_lora_metadata
from diffusion_blend.pipelines.flow_finetune import flow_finetune_target
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
    code = main(["finetune", "--target", "sd3", "--base", str(root / "base"), "--prompts", str(prompts),
                 "--rewards", "jpeg_compressibility=1", "--alpha", "0.25", "--iterations", "1", "--batch-size", "2",
                 "--minibatch-size", "2", "--steps", "2", "--eta", "0.7", "--resolution", str(SIZE),
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0 and (tmp_path / "run" / DIFFUSERS_LORA_NAME).is_file()
    args = ["sample", "--base", str(root / "base"), "--adapter", f"a={tmp_path / 'run'}", "--weights", "a=1",
            "--prompt", "a cat", "--steps", "2", "--height", "16", "--width", "16"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["alpha"] == {"a": 0.25}
    # a second expert trained with another alpha is refused before any loading
    assert main([*args[:4], f"a={tmp_path / 'run'}", "--adapter", f"b={root / 'run'}", "--weights", "a=0.5,b=0.5",
                 *args[7:], "--out", str(tmp_path / "x")]) == 2
