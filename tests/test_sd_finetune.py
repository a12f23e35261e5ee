"""Fine-tuning on a (tiny, offline) Stable Diffusion pipeline: guided KL, diffusers-format round trip, CLI.

Independent truths: the stock diffusers pipeline (its own CFG batch, scheduler step and LoRA loader) and a fresh
UNet read from disk, never the code under test.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

from diffusion_blend import lora
from diffusion_blend.adapters import base_fingerprint
from diffusion_blend.cli import main
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.pipelines import BlendStableDiffusionPipeline
from diffusion_blend.pipelines.lora_files import (
    DIFFUSERS_LORA_NAME,
    export_run_adapter,
    read_diffusers_lora_metadata,
    unet_architecture,
)
from diffusion_blend.pipelines.prompts import read_prompts
from diffusion_blend.pipelines.sd_target import sd_finetune_target
from diffusion_blend.pipelines.tiny import tiny_sd_pipeline
from diffusion_blend.preference import Preference
from diffusion_blend.rewards import get_reward
from diffusion_blend.sampling import sample
from diffusion_blend.training.config import DPOKConfig
from diffusion_blend.training.dpok import adapter_pair, finetune, rollout

GUIDANCE, STEPS, SEED = 4.0, 4, 3
PROMPTS = ["a cat", "a red house"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models are slower with thread contention on shared cores
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SD base on disk and a 2-iteration run on it (lora_alpha != rank, so the scaling must travel)."""
    root = tmp_path_factory.mktemp("sd_finetune")
    pipe = tiny_sd_pipeline(root)
    pipe.save_pretrained(root / "base")
    target = sd_finetune_target(pipe, PROMPTS, {"jpeg_compressibility": get_reward("jpeg_compressibility")},
                                guidance_scale=GUIDANCE)
    config = DPOKConfig(reward_weights={"jpeg_compressibility": 1.0}, alpha=1.0, iterations=2, batch_size=4,
                        minibatch_size=4, updates_per_batch=1, learning_rate=3e-2, lora_rank=4, lora_alpha=2.0,
                        num_inference_steps=STEPS)
    result = finetune(target, config, out_dir=root / "run", progress=False)
    export_run_adapter(result.model, result.adapter_name, root / "run", result.adapter_path)
    return root, target, result


def stock_pipeline(base, cls=StableDiffusionPipeline):
    pipe = cls.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_image(pipe, **kwargs):
    return pipe("a cat", num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=1.0, output_type="pt",
                generator=torch.Generator().manual_seed(SEED), **kwargs).images


def our_image(target, model, adapter):
    """The trained UNet with ``adapter`` active (None: base), sampled by our loop with the target's CFG forward."""
    cond = target.encode_prompts(["a cat"])
    with lora.active_adapter(model, adapter):
        latents = sample(lambda x, t, **c: target.forward(model, x, t, **c), target.scheduler, generator=SEED,
                         shape=(1, *target.sample_shape), num_inference_steps=STEPS, eta=1.0, cond=cond,
                         progress=False).samples
    return target.decode(latents)


def test_adapter_round_trips_into_stock_diffusers_and_the_blend_pipeline(trained):
    root, target, result = trained
    expected = our_image(target, result.model, result.adapter_name)
    base_image = our_image(target, result.model, None)

    stock = stock_pipeline(root / "base")
    assert (stock_image(stock) - base_image).abs().max() < 1e-4  # our sampler + CFG forward == stock pipeline
    stock.load_lora_weights(root / "run", adapter_name="jpeg")  # the run folder: diffusers' default weight name
    from_stock = stock_image(stock)

    blend = stock_pipeline(root / "base", BlendStableDiffusionPipeline)
    blend.load_adapter(root / "run" / DIFFUSERS_LORA_NAME, "jpeg")
    from_blend = stock_image(blend, preference=Preference({"jpeg": 1.0}))

    assert (from_stock - expected).abs().max() < 1e-4
    assert (from_blend - expected).abs().max() < 1e-4
    assert (expected - base_image).abs().max() > 1e-2  # the adapter changes the image: the check has teeth


def test_file_keeps_diffusers_header_and_our_fingerprinted_metadata(trained):
    root, _, _ = trained
    with safe_open(str(root / "run" / DIFFUSERS_LORA_NAME), framework="pt") as handle:
        header, keys = handle.metadata(), list(handle.keys())
    assert header["format"] == "pt"
    assert json.loads(header["lora_adapter_metadata"])["unet.lora_alpha"] == 2.0
    assert keys and all(key.startswith("unet.") for key in keys)
    metadata = read_diffusers_lora_metadata(root / "run")
    fresh = UNet2DConditionModel.from_pretrained(root / "base" / "unet")
    assert metadata.base_fingerprint == base_fingerprint(fresh, unet_architecture(fresh))
    assert metadata.rewards == {"jpeg_compressibility": 1.0} and metadata.alpha == 1.0 and metadata.rank == 4


def guided_by_hand(unet, x, t, positive, negative):
    """Stock-pipeline CFG: one [uncond; cond] batch, then uncond + g (cond - uncond)."""
    out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, positive])).sample
    uncond, cond = out.chunk(2)
    return uncond + GUIDANCE * (cond - uncond)


def test_rollout_kl_compares_guided_policy_with_guided_base(trained):
    root, target, result = trained
    pair = adapter_pair(result.model, target.forward, result.adapter_name)
    batch = rollout(target, pair, 2, torch.Generator().manual_seed(7), num_inference_steps=STEPS, eta=1.0)
    stock = stock_pipeline(root / "base")
    stock.load_lora_weights(root / "run", adapter_name="jpeg")  # the policy, through diffusers' own loader
    base_unet = UNet2DConditionModel.from_pretrained(root / "base" / "unet").eval()
    positive, negative = batch.cond["encoder_hidden_states"], batch.cond["negative_encoder_hidden_states"]
    scheduler = DDIMScheduler.from_config(stock.scheduler.config)
    scheduler.set_timesteps(STEPS)
    k = 1
    x, t = batch.latents[k], batch.timesteps[k]
    with torch.no_grad():
        guided = {name: guided_by_hand(unet, x, t, positive, negative)
                  for name, unet in (("policy", stock.unet), ("base", base_unet))}
        unguided = {name: unet(x, t, encoder_hidden_states=positive).sample
                    for name, unet in (("policy", stock.unet), ("base", base_unet))}

    def mean(eps):  # scheduler.step with zero variance noise returns the transition mean
        return scheduler.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample

    prev_t = t - scheduler.config.num_train_timesteps // STEPS
    variance = scheduler._get_variance(int(t), int(prev_t))
    kl_guided = ((mean(guided["policy"]) - mean(guided["base"])) ** 2).flatten(1).sum(1) / (2 * variance)
    kl_unguided = ((mean(unguided["policy"]) - mean(unguided["base"])) ** 2).flatten(1).sum(1) / (2 * variance)
    assert torch.allclose(batch.kl[k], kl_guided, rtol=1e-3, atol=1e-6)
    assert (kl_guided - kl_unguided).abs().min() > 0.05 * kl_guided.abs().max()  # guidance matters to the KL


def test_read_prompts_accepts_lines_and_json_and_refuses_junk(tmp_path):
    (tmp_path / "lines.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "list.json").write_text('["a cat", "a dog"]')
    assert read_prompts(tmp_path / "lines.txt") == read_prompts(tmp_path / "list.json") == ["a cat", "a dog"]
    for name, text in (("empty.txt", "\n \n"), ("bad.json", '["a cat",'), ("nums.json", "[1, 2]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DiffusionBlendError):
            read_prompts(tmp_path / name)
    with pytest.raises(DiffusionBlendError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_target_refuses_bad_settings(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    reward = {"jpeg_compressibility": get_reward("jpeg_compressibility")}
    for kwargs in ({"guidance_scale": 0.5}, {"guidance_scale": float("nan")}, {"resolution": 15}):
        with pytest.raises(DiffusionBlendError):
            sd_finetune_target(pipe, PROMPTS, reward, **kwargs)
    with pytest.raises(DiffusionBlendError):
        sd_finetune_target(pipe, [], reward)


def test_cli_finetunes_a_saved_sd_base_and_fails_in_one_line(trained, tmp_path, capsys):
    root, _, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red house\n")
    common = ["finetune", "--kind", "sd", "--prompts", str(prompts), "--alpha", "1", "--no-progress"]
    out = tmp_path / "run"
    argv = [*common, "--base", str(root / "base"), "--rewards", "jpeg_compressibility=1", "--iterations", "1",
            "--batch-size", "2", "--minibatch-size", "2", "--steps", "3", "--guidance-scale", "3", "--out", str(out)]
    assert main(argv) == 0
    assert "diffusers LoRA:" in capsys.readouterr().out
    metadata = read_diffusers_lora_metadata(out / DIFFUSERS_LORA_NAME)
    assert metadata.training_config["extra"]["sd"]["guidance_scale"] == 3.0
    assert json.loads((out / "log.json").read_text())["target"] == "sd"

    for bad in (["--base", str(tmp_path / "nope"), "--rewards", "jpeg_compressibility=1"],
                ["--base", str(root / "base"), "--rewards", "no_such_reward=1"],
                ["--rewards", "jpeg_compressibility=1"]):
        assert main([*common, *bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len([line for line in err if line.startswith("dblend")]) == 1
        assert err[-1].startswith("dblend: error: ") and "Traceback" not in "\n".join(err)


def test_cli_pathwise_low_precision_checkpointed_run_and_its_refusals(trained, tmp_path, capsys):
    root, _, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "run"
    argv = ["finetune", "--kind", "sd", "--base", str(root / "base"), "--prompts", str(prompts), "--rewards",
            "brightness=1", "--alpha", "0.5", "--estimator", "pathwise", "--dtype", "bfloat16",
            "--gradient-checkpointing", "--backprop-steps", "2", "--device", "cpu", "--iterations", "1",
            "--batch-size", "2", "--steps", "3", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    config = read_diffusers_lora_metadata(out / DIFFUSERS_LORA_NAME).training_config
    assert (config["estimator"], config["dtype"], config["gradient_checkpointing"], config["backprop_steps"]) == (
        "pathwise", "bfloat16", True, 2)
    # SD defaults (DDPO/DPOK range) fill what the flags leave: minibatch 2 <= batch 2, lr 1e-4, eta 1
    assert (config["minibatch_size"], config["learning_rate"], config["eta"]) == (2, 1e-4, 1.0)
    # the base loaded directly in bfloat16; the adapter is bound to its float32 fingerprint, as `dblend sample` checks
    stock = UNet2DConditionModel.from_pretrained(root / "base" / "unet")
    fingerprint = read_diffusers_lora_metadata(out / DIFFUSERS_LORA_NAME).base_fingerprint
    assert fingerprint == base_fingerprint(stock, unet_architecture(stock))
    process = json.loads((out / "log.json").read_text())["process"]
    assert process["device"] == "cpu" and len(process["seconds_per_iteration"]) == 1
    capsys.readouterr()
    refusals = [["--backprop-steps", "2"],  # DRaFT-K without the pathwise estimator
                ["--dtype", "float8"]]
    if not torch.cuda.is_available():
        refusals.append(["--device", "cuda"])
    for extra in refusals:
        bad = ["finetune", "--kind", "sd", "--base", str(root / "base"), "--prompts", str(prompts), "--rewards",
               "brightness=1", "--alpha", "1", "--out", str(tmp_path / "bad"), *extra]
        try:
            status = main(bad)
        except SystemExit as exit_:  # argparse's own choice errors exit directly
            status = exit_.code
        assert status == 2, extra
        err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
        assert len(err) == 1 and err[0].startswith("dblend: error: "), (extra, err)
    capsys.readouterr()
    main(["finetune", "--kind", "sd", "--base", str(root / "base"), "--prompts", str(prompts), "--rewards",
          "brightness=1", "--alpha", "1", "--out", str(tmp_path / "bad"), "--backprop-steps", "2"])
    assert "--backprop-steps applies to the pathwise estimator only (--estimator pathwise)" in capsys.readouterr().err


def test_finetune_help_prints_per_target_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = capsys.readouterr().out
    assert "per-target defaults" in text and "--gradient-checkpointing" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}
    assert "batch_size=8, minibatch_size=2" in rows["sd"] and "num_inference_steps=50" in rows["sd"]
    assert "num_inference_steps=10" in rows["sd3"] and "32/64" in rows["flux"]


def test_sdxl_adapter_round_trips_into_stock_sdxl_and_the_blend_pipeline(tmp_path):
    """SDXL fine-tuning: CFG rollouts with SDXL's added conditioning (pooled text embeds, time ids); the exported
    file loads with StableDiffusionXLPipeline.load_lora_weights and BlendStableDiffusionXLPipeline.load_adapter,
    and both reproduce our sampler's image with the adapter active."""
    from diffusers import StableDiffusionXLPipeline

    from diffusion_blend.pipelines import BlendStableDiffusionXLPipeline
    from diffusion_blend.pipelines.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "base")
    target = sd_finetune_target(pipe, PROMPTS, {"brightness": get_reward("brightness")}, guidance_scale=GUIDANCE)
    assert {"text_embeds", "time_ids", "negative_text_embeds", "negative_time_ids"} <= set(target.encode(["a cat"]))
    config = DPOKConfig(reward_weights={"brightness": 100.0}, alpha=1.0, iterations=2, batch_size=2, minibatch_size=1,
                        updates_per_batch=1, learning_rate=3e-2, lora_rank=4, lora_alpha=2.0,
                        num_inference_steps=STEPS)
    result = finetune(target, config, out_dir=tmp_path / "run", progress=False)
    export_run_adapter(result.model, result.adapter_name, tmp_path / "run", result.adapter_path)
    expected = our_image(target, result.model, result.adapter_name)
    base_image = our_image(target, result.model, None)

    stock = stock_pipeline(tmp_path / "base", StableDiffusionXLPipeline)
    assert (stock_image(stock) - base_image).abs().max() < 1e-4  # our SDXL CFG forward == the stock pipeline
    stock.load_lora_weights(tmp_path / "run", adapter_name="bright")
    blend = stock_pipeline(tmp_path / "base", BlendStableDiffusionXLPipeline)
    blend.load_adapter(tmp_path / "run" / DIFFUSERS_LORA_NAME, "bright")
    assert (stock_image(stock) - expected).abs().max() < 1e-4
    assert (stock_image(blend, preference=Preference({"bright": 1.0})) - expected).abs().max() < 1e-4
    assert (expected - base_image).abs().max() > 1e-3  # the adapter changes the image: the check has teeth
    metadata = read_diffusers_lora_metadata(tmp_path / "run")
    assert metadata.rewards == {"brightness": 100.0} and metadata.rank == 4
    # the CLI path: --kind sdxl on the saved base writes a run folder stock SDXL loads
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    argv = ["finetune", "--kind", "sdxl", "--base", str(tmp_path / "base"), "--prompts", str(prompts),
            "--rewards", "brightness=1", "--alpha", "1", "--iterations", "1", "--batch-size", "1", "--steps", "2",
            "--no-progress", "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    stock.load_lora_weights(tmp_path / "cli", adapter_name="cli")
    assert "cli" in stock.get_list_adapters()["unet"]
