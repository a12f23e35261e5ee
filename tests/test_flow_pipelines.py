"""SD3 and FLUX blend pipelines on tiny offline components (diffusion_blend.pipelines.tiny).

Independent truths: a hand-written sampling loop over one FUSED copy of the transformer per member (stock
diffusers ``load_lora_weights`` + ``fuse_lora`` on separate pipelines; the base is a copy with no LoRA), which
guides each member's velocity and blends the guided velocities with hand-computed coefficients
``c_i = lambda w_i``, ``c_0 = 1 - lambda sum w``; stock diffusers pipelines with one adapter (``set_adapters``) or
none (``disable_lora``); transformer call counts from a forward hook.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.lora import lora_layers
from diffusion_blend.pipelines import BlendFluxPipeline, BlendStableDiffusion3Pipeline
from diffusion_blend.pipelines.tiny import (
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    write_transformer_adapters,
)
from diffusion_blend.preference import Preference
from diffusion_blend.sampling import FlowMatchSDEScheduler

SEEDS = {"aesthetic": 1, "align": 2}
STEPS, SIZE = 3, 16
SD3_KW = dict(text_encoder_3=None, tokenizer_3=None)
REL_TOL = 1e-4  # the bar: reference-loop equivalence within 1e-4 relative


def relative_error(got, want):
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    tiny_sd3_pipeline(root).save_pretrained(root / "base")
    return root, write_transformer_adapters(StableDiffusion3Pipeline, root / "base", root / "lora", SEEDS)


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    tiny_flux_pipeline(root).save_pretrained(root / "base")
    return root, write_transformer_adapters(FluxPipeline, root / "base", root / "lora", SEEDS)


def blend_pipe(cls, files, **kwargs):
    root, adapters = files
    pipe = cls.from_pretrained(root / "base", **kwargs)
    pipe.load_adapters(adapters)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3_pipe(sd3_files):
    return blend_pipe(BlendStableDiffusion3Pipeline, sd3_files, **SD3_KW)


@pytest.fixture(scope="module")
def flux_pipe(flux_files):
    return blend_pipe(BlendFluxPipeline, flux_files)


def fused_copies(cls, files, preference, **kwargs):
    """One stock pipeline per member with a non-zero coefficient, its LoRA fused into the weights (base: none)."""
    root, adapters = files
    coefficients = {name: preference.kl_scale * preference.weights.get(name, 0.0) for name in adapters}
    coefficients[None] = 1.0 - preference.kl_scale * sum(preference.weights.values())
    copies = []
    for member, coefficient in coefficients.items():
        if coefficient == 0.0:
            continue
        pipe = cls.from_pretrained(root / "base", **kwargs)
        if member is not None:
            pipe.load_lora_weights(str(adapters[member]), adapter_name=member)
            pipe.fuse_lora()
            pipe.unload_lora_weights()
        assert not lora_layers(pipe.transformer)  # a plain transformer with the expert's weights
        copies.append((coefficient, pipe.transformer))
    return copies


def sd3_reference(files, preference, latents, guidance_scale, prompt):
    copies = fused_copies(StableDiffusion3Pipeline, files, preference, **SD3_KW)
    stock = StableDiffusion3Pipeline.from_pretrained(files[0] / "base", **SD3_KW)
    pos, neg, pooled, neg_pooled = stock.encode_prompt(prompt, prompt, None, do_classifier_free_guidance=True)
    scheduler = stock.scheduler
    scheduler.set_timesteps(STEPS)
    x = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            velocity = 0.0
            for coefficient, transformer in copies:
                def run(embeds, pooled_embeds):
                    return transformer(hidden_states=x, timestep=t.expand(x.shape[0]),  # noqa: B023 - used at once
                                       encoder_hidden_states=embeds,
                                       pooled_projections=pooled_embeds, return_dict=False)[0]
                cond, uncond = run(pos, pooled), run(neg, neg_pooled)
                velocity = velocity + coefficient * (uncond + guidance_scale * (cond - uncond))
            x = scheduler.step(velocity, t, x, return_dict=False)[0]
    return x


def flux_reference(files, preference, latents, guidance_scale, prompt, size=SIZE, max_sequence_length=16):
    copies = fused_copies(FluxPipeline, files, preference)
    stock = FluxPipeline.from_pretrained(files[0] / "base")
    embeds, pooled, text_ids = stock.encode_prompt(prompt, prompt, max_sequence_length=max_sequence_length)
    image_ids = stock._prepare_latent_image_ids(1, size // 2, size // 2, torch.device("cpu"), torch.float32)
    scheduler = stock.scheduler
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS))
    guidance = torch.full([x_rows := latents.shape[0]], guidance_scale)
    x = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            velocity = 0.0
            for coefficient, transformer in copies:  # distilled guidance: one call per member, no CFG branch
                velocity = velocity + coefficient * transformer(
                    hidden_states=x, timestep=t.expand(x_rows) / 1000, guidance=guidance, pooled_projections=pooled,
                    encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
            x = scheduler.step(velocity, t, x, return_dict=False)[0]
    return x


def sd3_latents(seed=0):
    return torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def flux_latents(seed=0):
    return torch.randn(1, (SIZE // 2) ** 2, 16, generator=torch.Generator().manual_seed(seed))


def call(pipe, latents, **kwargs):
    extra = {"max_sequence_length": 16} if isinstance(pipe, FluxPipeline) else {}
    return pipe("a small red cat", latents=latents, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                output_type="latent", **extra, **kwargs).images


PREFERENCES = [Preference({"aesthetic": 0.3, "align": 0.7}), Preference({"aesthetic": 0.3, "align": 0.7}, 1.2),
               Preference({"aesthetic": 1.0}, 0.5)]


@pytest.mark.parametrize("preference", PREFERENCES, ids=str)
def test_sd3_blend_equals_reference_loop_over_fused_copies(sd3_pipe, sd3_files, preference):
    latents = sd3_latents()
    ours = call(sd3_pipe, latents, preference=preference, guidance_scale=5.0)
    want = sd3_reference(sd3_files, preference, latents, 5.0, "a small red cat")
    assert relative_error(ours, want) <= REL_TOL
    assert sd3_pipe.last_blend.calls == STEPS  # members x CFG branches in one transformer forward per step


@pytest.mark.parametrize("preference", PREFERENCES[:2], ids=str)
def test_flux_blend_equals_reference_loop_over_fused_copies(flux_pipe, flux_files, preference):
    latents = flux_latents()
    ours = call(flux_pipe, latents, preference=preference, guidance_scale=3.5)
    want = flux_reference(flux_files, preference, latents, 3.5, "a small red cat")
    assert relative_error(ours, want) <= REL_TOL
    assert flux_pipe.last_blend.calls == STEPS


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_one_hot_equals_stock_lora_and_lambda_zero_equals_base(which, request):
    pipe = request.getfixturevalue(f"{which}_pipe")
    files = request.getfixturevalue(f"{which}_files")
    stock_cls = StableDiffusion3Pipeline if which == "sd3" else FluxPipeline
    stock = stock_cls.from_pretrained(files[0] / "base", **(SD3_KW if which == "sd3" else {}))
    for name, path in files[1].items():
        stock.load_lora_weights(str(path), adapter_name=name)
    stock.set_progress_bar_config(disable=True)
    latents = sd3_latents(1) if which == "sd3" else flux_latents(1)
    stock.set_adapters(["align"])
    one_hot = call(pipe, latents, preference=Preference({"align": 1.0}))
    torch.testing.assert_close(one_hot, call(stock, latents), rtol=1e-4, atol=1e-5)
    stock.disable_lora()
    base = call(pipe, latents, preference=Preference({"align": 1.0, "aesthetic": 0.5}, 0.0))
    torch.testing.assert_close(base, call(stock, latents), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(one_hot, base, atol=1e-3)  # the adapters matter


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_ls_refuses_the_ode_and_makes_one_transformer_call_per_step(which, request):
    pipe = request.getfixturevalue(f"{which}_pipe")
    latents = sd3_latents(2) if which == "sd3" else flux_latents(2)
    preference = Preference({"aesthetic": 0.4, "align": 0.6})
    with pytest.raises(DiffusionBlendError, match="FlowMatchEulerDiscreteScheduler.*FlowMatchSDEScheduler"):
        call(pipe, latents, preference=preference, method="ls")
    ode = pipe.scheduler
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        pipe.scheduler = FlowMatchSDEScheduler.from_config(ode.config, noise_level=0.7)
        generator = torch.Generator().manual_seed(3)
        first = call(pipe, latents, preference=preference, method="ls", generator=generator)
        assert len(calls) == STEPS and pipe.last_blend.calls == STEPS
        assert int(pipe.last_blend.denoiser.selection_counts.sum()) == STEPS  # one draw per sample per step
        again = call(pipe, latents, preference=preference, method="ls", generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(first, again)  # seeded: the SDE noise and the draws follow the generator
        other = call(pipe, latents, preference=preference, method="ls", generator=torch.Generator().manual_seed(4))
        assert not torch.allclose(first, other)
        with pytest.raises(DiffusionBlendError, match="noise_level 0"):
            pipe.scheduler = FlowMatchSDEScheduler.from_config(ode.config, noise_level=0.0)
            call(pipe, latents, preference=preference, method="ls")
    finally:
        handle.remove()
        pipe.scheduler = ode


def test_sde_blend_equals_stock_pipeline_with_the_same_sde_noise(sd3_pipe, sd3_files):
    """With the SDE sampler, a one-hot blend follows the stock pipeline given the same SDE noise stream."""
    ode = sd3_pipe.scheduler
    stock = StableDiffusion3Pipeline.from_pretrained(sd3_files[0] / "base", **SD3_KW)
    stock.load_lora_weights(str(sd3_files[1]["aesthetic"]), adapter_name="aesthetic")
    stock.set_progress_bar_config(disable=True)
    try:
        sd3_pipe.scheduler = FlowMatchSDEScheduler.from_config(ode.config)
        stock.scheduler = FlowMatchSDEScheduler.from_config(ode.config)
        latents = sd3_latents(5)
        ours = call(
            sd3_pipe, latents, preference=Preference({"aesthetic": 1.0}), generator=torch.Generator().manual_seed(9)
        )
        stock.scheduler.set_noise_generator(sd3_pipe.scheduler.noise_generator)  # restored to None after the call
        assert stock.scheduler.noise_generator is None
        from diffusion_blend.pipelines.flow import SDE_NOISE_SALT
        from diffusion_blend.pipelines.stable_diffusion import _derived_switch_generator

        stock.scheduler.set_noise_generator(_derived_switch_generator(torch.Generator().manual_seed(9), SDE_NOISE_SALT))
        torch.testing.assert_close(ours, call(stock, latents), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(ours, call(sd3_pipe, latents, preference=Preference({"aesthetic": 1.0}),
                                             generator=torch.Generator().manual_seed(10)))
    finally:
        sd3_pipe.scheduler = ode


def test_flux_position_ids_are_not_tiled_when_their_length_equals_the_batch(flux_pipe, flux_files):
    """FLUX's img_ids (tokens x 3) carry no batch dimension: at 2 x 2 pixels there is ONE image token, as many as
    the batch, and the ids must still pass through untiled (else the rotary embedding would not fit)."""
    latents = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(0))
    preference = Preference({"aesthetic": 0.5, "align": 1.0}, 1.0)  # base coefficient -0.5: three members
    ours = flux_pipe("cat", latents=latents, num_inference_steps=STEPS, height=2, width=2, output_type="latent",
                     max_sequence_length=4, preference=preference, guidance_scale=3.5).images
    want = flux_reference(flux_files, preference, latents, 3.5, "cat", size=2, max_sequence_length=4)
    assert relative_error(ours, want) <= REL_TOL


def flow_cli(files, out, *extra):
    from diffusion_blend.cli import main

    root, adapters = files
    return main(["sample", "--base", str(root / "base"), "--adapter", f"a={adapters['aesthetic']}",
                 "--adapter", f"b={adapters['align']}", "--weights", "a=0.3,b=0.7", "--prompt", "a cat",
                 "--out", str(out), "--steps", "3", "--resolution", "16", "--num-images", "2", *extra])


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_cli_sample_detects_the_flow_pipeline_and_writes_images_and_settings(which, request, tmp_path):
    """The issue's bar: ``dblend sample --base TINY_SD3_DIR --adapter a=... --adapter b=... --weights a=0.3,b=0.7
    --kl-scale 1.2`` writes images and settings (and the same for FLUX)."""
    from PIL import Image

    files = request.getfixturevalue(f"{which}_files")
    assert flow_cli(files, tmp_path / "out", "--kl-scale", "1.2") == 0
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["pipeline"] == which and settings["scheduler"] == "FlowMatchSDEScheduler"
    assert settings["coefficients"] == pytest.approx({"base": -0.2, "a": 0.36, "b": 0.84})
    assert settings["transformer_calls"] == 3 and settings["noise_level"] == 0.7
    images = [Image.open(tmp_path / "out" / name) for name in settings["images"]]
    assert len(images) == 2 and all(image.size == (16, 16) for image in images)
    assert flow_cli(files, tmp_path / "ls", "--method", "ls") == 0
    assert json.loads((tmp_path / "ls" / "settings.json").read_text())["transformer_calls"] == 3
    # SMC on the flow SDE: 3 members (2 experts + the base, c_0 = -0.2 is active anyway) x 2 particles x 3 steps
    smc = ["--kl-scale", "1.2", "--method", "smc", "--particles", "2", "--alpha", "0.5", "--reward", "a=brightness",
           "--reward", "b=saturation"]
    assert flow_cli(files, tmp_path / "smc", *smc) == 0
    settings = json.loads((tmp_path / "smc" / "settings.json").read_text())
    assert settings["network_evaluations_per_image"] == 3 * 2 * 3 and len(settings["final_ess"]) == 2
    assert len(settings["images"]) == 2
    # the twisted proposal on the flow SDE: same cost, other particles (its step uses the rectified-flow score)
    assert flow_cli(files, tmp_path / "twisted", *smc, "--smc-proposal", "twisted") == 0
    twisted = json.loads((tmp_path / "twisted" / "settings.json").read_text())
    assert twisted["network_evaluations_per_image"] == 3 * 2 * 3 and twisted["smc"]["proposal"] == "twisted"
    pixels = [
        np.asarray(Image.open(tmp_path / run / name)) for run in ("smc", "twisted") for name in settings["images"]
    ]
    assert any(not np.array_equal(a, b) for a, b in zip(pixels[:2], pixels[2:]))


def test_cli_flow_refusals_are_one_line(sd3_files, tmp_path, capsys):
    cases = {
        "needs a stochastic sampler": ["--method", "ls", "--scheduler", "pipeline"],
        "noise level": ["--method", "ls", "--eta", "0"],
        "--scheduler ddim is for SD/SDXL": ["--scheduler", "ddim"],
    }
    for message, extra in cases.items():
        assert flow_cli(sd3_files, tmp_path / "x", *extra) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_ui_studio_detects_sd3_and_matches_the_pipeline(sd3_files):
    """``dblend ui --base`` on an SD3 folder: the studio loads BlendStableDiffusion3Pipeline with the SDE sampler,
    and its images are the pipeline's for the same seed (SDE noise derived from the seed)."""
    from diffusion_blend.pipelines.session import BlendSession
    from diffusion_blend.ui.pipeline_studio import PipelineStudio
    from diffusion_blend.ui.studio import image_grid

    root, adapters = sd3_files
    session = BlendSession.open(root / "base", adapters, rewards={"aesthetic": "jpeg_compressibility",
                                                               "align": "jpeg_compressibility"})
    studio = PipelineStudio(session, num_images=1, steps=STEPS, guidance_scale=4.0, height=SIZE, width=SIZE)
    pipe = session.pipe
    assert isinstance(pipe, BlendStableDiffusion3Pipeline)
    assert isinstance(pipe.scheduler, FlowMatchSDEScheduler) and pipe.scheduler.config.noise_level == 0.7
    preference = Preference({"aesthetic": 0.5, "align": 0.5})
    for method in ("mpa", "ls"):
        result = studio.generate(preference, method, seed=4, prompt="a cat")
        assert set(result.scores) == {"aesthetic", "align"}
    result = studio.generate(preference, "mpa", seed=4, prompt="a cat")
    images = pipe(["a cat"], num_inference_steps=STEPS, guidance_scale=4.0, height=SIZE, width=SIZE,
                  generator=[torch.Generator().manual_seed(4)], output_type="pt", preference=preference).images
    grid = image_grid(images.float(), cell=max(64, min(256, images.shape[-1]))).astype(int)
    assert abs(result.images.astype(int) - grid).max() <= 1  # the studio's image is the pipeline's for that seed


# ---- public expert LoRAs: the layouts they are published in, and one-line refusals -----------------------------


def source_transformer(files, which):
    """The transformer the LoRA files were saved from (independent of every loader)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from diffusion_blend.pipelines.tiny import perturbed_transformer_lora

    cls = SD3Transformer2DModel if which == "sd3" else FluxTransformer2DModel
    model = cls.from_pretrained(files[0] / "base" / "transformer")
    for name, seed in SEEDS.items():
        perturbed_transformer_lora(model, name, seed)
    return model


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_diffusers_lora_files_load_exactly_the_saved_weights(which, request):
    pipe, files = request.getfixturevalue(f"{which}_pipe"), request.getfixturevalue(f"{which}_files")
    source = dict(source_transformer(files, which).named_parameters())
    loaded = {k: v for k, v in pipe.transformer.named_parameters() if "lora_" in k}
    assert loaded and set(loaded) == {k for k in source if "lora_" in k}
    for key, value in loaded.items():
        assert torch.equal(value, source[key]), key


def test_flow_grpo_peft_folder_equals_the_diffusers_file(sd3_files, tmp_path):
    """Flow-GRPO saves ``get_peft_model(transformer, config).save_pretrained(dir)``: adapter_config.json and
    ``base_model.model.``-prefixed keys. It loads as the same expert as the diffusers file of the same weights."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model

    from diffusion_blend.pipelines.tiny import TRANSFORMER_PROJECTIONS

    root, files = sd3_files
    transformer = SD3Transformer2DModel.from_pretrained(root / "base" / "transformer")
    peft_model = get_peft_model(transformer, LoraConfig(r=4, lora_alpha=8, target_modules=TRANSFORMER_PROJECTIONS,
                                                        init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for key, param in peft_model.named_parameters():
            if "lora_B" in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(tmp_path / "flow_grpo_ckpt")
    from safetensors.torch import load_file

    assert all(
        k.startswith("base_model.model.") for k in load_file(tmp_path / "flow_grpo_ckpt" / "adapter_model.safetensors")
    )
    pipe = BlendStableDiffusion3Pipeline.from_pretrained(root / "base", **SD3_KW)
    pipe.load_adapter(tmp_path / "flow_grpo_ckpt", "grpo")
    pipe.set_progress_bar_config(disable=True)
    latents = sd3_latents(6)
    ours = call(pipe, latents, preference=Preference({"grpo": 1.0}))
    merged = StableDiffusion3Pipeline.from_pretrained(root / "base", **SD3_KW)
    merged.transformer = peft_model.merge_and_unload()  # the expert as Flow-GRPO's own code evaluates it
    merged.set_progress_bar_config(disable=True)
    want = call(merged, latents)
    assert relative_error(ours, want) <= REL_TOL  # merged vs unmerged weights: float32 rounding only
    assert relative_error(ours, call(merged.__class__.from_pretrained(root / "base", **SD3_KW), latents)) > 1e-3


def test_foreign_and_broken_loras_are_refused_with_one_line(sd3_files, flux_files, tmp_path):
    from safetensors.torch import load_file, save_file

    from diffusion_blend.errors import AdapterMismatchError

    root, files = sd3_files
    pipe = BlendStableDiffusion3Pipeline.from_pretrained(root / "base", **SD3_KW)
    good = load_file(files["align"])
    nan = dict(good)
    first = next(iter(nan))
    nan[first] = torch.full_like(nan[first], float("nan"))
    save_file(nan, tmp_path / "nan.safetensors")
    with_text = dict(good)
    with_text["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    with_text["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
    save_file(with_text, tmp_path / "text.safetensors")
    cases = {
        "NaN/infinite": tmp_path / "nan.safetensors",
        "text_encoder": tmp_path / "text.safetensors",
        "does not fit|only": flux_files[1]["align"],  # a FLUX LoRA on an SD3 base
    }
    import re

    for pattern, path in cases.items():
        with pytest.raises(AdapterMismatchError) as info:
            pipe.load_adapter(path, "x")
        assert re.search(pattern, str(info.value)) and "\n" not in str(info.value), str(info.value)
        assert "x" not in pipe.adapter_names  # nothing half-loaded stays behind


def test_kohya_flux_file_loads_as_the_deltas_it_describes(flux_files, tmp_path):
    """A kohya-style FLUX LoRA (BFL block names, lora_down / lora_up / alpha, fused qkv) goes through diffusers'
    converter; each loaded module's delta ``scale * B A`` equals ``alpha / r * up @ down`` of its kohya entry
    (the fused qkv's up-projection split in three)."""
    from safetensors.torch import save_file

    root, _ = flux_files
    generator = torch.Generator().manual_seed(0)
    rank, alpha, dim = 4, 2.0, 32
    kohya = {}
    for block, rows in (("img_attn_proj", dim), ("txt_attn_proj", dim), ("img_attn_qkv", 3 * dim)):
        key = f"lora_unet_double_blocks_0_{block}"
        kohya[f"{key}.lora_down.weight"] = torch.randn(rank, dim, generator=generator)
        kohya[f"{key}.lora_up.weight"] = torch.randn(rows, rank, generator=generator)
        kohya[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(kohya, tmp_path / "kohya.safetensors")
    pipe = BlendFluxPipeline.from_pretrained(root / "base")
    pipe.load_adapter(tmp_path / "kohya.safetensors", "kohya")

    def expected(block, rows=slice(None)):
        key = f"lora_unet_double_blocks_0_{block}"
        return alpha / rank * kohya[f"{key}.lora_up.weight"][rows] @ kohya[f"{key}.lora_down.weight"]

    want = {"to_out.0": expected("img_attn_proj"), "to_add_out": expected("txt_attn_proj"),
            "to_q": expected("img_attn_qkv", slice(0, dim)), "to_k": expected("img_attn_qkv", slice(dim, 2 * dim)),
            "to_v": expected("img_attn_qkv", slice(2 * dim, 3 * dim))}
    modules = dict(pipe.transformer.named_modules())
    for name, delta in want.items():
        module = modules[f"transformer_blocks.0.attn.{name}"]
        got = module.scaling["kohya"] * module.lora_B["kohya"].weight @ module.lora_A["kohya"].weight
        torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-5)


def test_sd3_benchmark_refuses_cuda_when_no_device_is_present(monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the refusal is checked on any machine
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_sd3_blend
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench_sd3_blend.main(["--device", "cuda"])
