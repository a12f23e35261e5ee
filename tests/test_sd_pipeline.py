"""Stable Diffusion (XL) blend pipelines on tiny offline components (diffusion_blend.pipelines.tiny).

Independent truths: stock diffusers with one adapter active (``set_adapters``) or adapters disabled
(``disable_lora``); a hand-written sequential blend (``set_adapters`` per member, separate forwards, hand-computed
coefficients c_i = lambda w_i, c_0 = 1 - lambda sum w); call counts from a forward hook; the source UNet the
LoRA files were saved from.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from diffusion_blend.cli import main
from diffusion_blend.errors import AdapterMismatchError, DiffusionBlendError
from diffusion_blend.pipelines import (
    BlendStableDiffusionPipeline,
    BlendStableDiffusionXLPipeline,
)
from diffusion_blend.pipelines.tiny import (
    ATTENTION_PROJECTIONS,
    perturbed_lora,
    save_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    write_adapters,
)
from diffusion_blend.preference import Preference, PreferenceError
from diffusion_blend.smc import SMCOptions

os.environ["HF_HUB_OFFLINE"] = "1"
SEEDS = {"aesthetic": 1, "align": 2, "safety": 3}
CALL = dict(prompt="a small red cat", num_inference_steps=3, guidance_scale=5.0, eta=1.0, output_type="latent")
# batched (peft mixed-adapter) vs sequential forwards differ only by float32 summation order
BATCHED_VS_SEQUENTIAL_ATOL = 1e-4
# our LoRA forward (diffusion_blend.lora.routed_adapters) folds s B A into the weight or accumulates the low-rank
# delta in place, where stock peft adds B(A x) s: the same sum in another float32 order. On latents of magnitude
# ~5 after 3 steps they differ by ~2e-6; this bound is 10x that (a wrong adapter differs by > 1e-2).
ROUTED_VS_STOCK_ATOL = 2e-5


@pytest.fixture(scope="module")
def sd_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    save_pipeline(tiny_sd_pipeline(root), root / "base")
    files = write_adapters(StableDiffusionPipeline, root / "base", root / "lora", SEEDS)
    return root, files


@pytest.fixture(scope="module")
def sd_pipe(sd_files):
    root, files = sd_files
    pipe = BlendStableDiffusionPipeline.from_pretrained(root / "base")
    pipe.load_adapters(files)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed=0, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(seed), **{**CALL, **kwargs}).images


def sequential_latents(pipe, preference: Preference, **kwargs):
    """The blend computed the slow way: one stock forward per member (set_adapters / disable_lora)."""
    unet = pipe.unet
    original = unet.forward
    names = pipe.adapter_names
    coefs = {name: preference.kl_scale * preference.weights.get(name, 0.0) for name in names}
    coefs[None] = 1.0 - preference.kl_scale * sum(preference.weights.values())

    def forward(*args, return_dict=True, **kw):
        total = 0.0
        for member, coef in coefs.items():
            if coef == 0.0:
                continue
            if member is None:
                pipe.disable_lora()
            else:
                pipe.enable_lora()
                pipe.set_adapters([member])
            total = total + coef * original(*args, return_dict=False, **kw)[0]
        pipe.enable_lora()
        return (total,)

    unet.forward = forward
    try:
        return run(pipe, **kwargs)
    finally:
        del unet.forward


def stock_latents(pipe, adapter: str | None, **kwargs):
    """Plain diffusers with one adapter active (or none)."""
    if adapter is None:
        pipe.disable_lora()
    else:
        pipe.set_adapters([adapter])
    try:
        return run(pipe, **kwargs)
    finally:
        pipe.enable_lora()


def test_batched_blend_equals_sequential_with_base_and_extrapolation(sd_pipe):
    preference = Preference({"aesthetic": 0.3, "align": 0.5, "safety": 0.2}, kl_scale=1.4)  # c_0 = -0.4
    batched = run(sd_pipe, preference=preference)
    assert sd_pipe.last_blend.calls == CALL["num_inference_steps"]  # one mixed forward per step
    sequential = sequential_latents(sd_pipe, preference)
    assert torch.allclose(batched, sequential, atol=BATCHED_VS_SEQUENTIAL_ATOL), (batched - sequential).abs().max()
    assert (batched - run(sd_pipe, preference=Preference({"aesthetic": 1.0}))).abs().max() > 1e-2


@pytest.mark.parametrize("routing, forwards_per_step", [("batched", 1), ("sequential", 4), ("auto", 4)])
def test_every_routing_gives_the_hand_written_sequential_blend(sd_pipe, routing, forwards_per_step):
    """Issue 15: same images for every routing (within BATCHED_VS_SEQUENTIAL_ATOL of stock per-adapter forwards);
    the routing asked for and the one used (auto: sequential on CPU) are recorded on ``last_blend``."""
    preference = Preference({"aesthetic": 0.3, "align": 0.5, "safety": 0.2}, kl_scale=1.4)  # base + 3 experts
    ours = run(sd_pipe, preference=preference, routing=routing)
    blend = sd_pipe.last_blend
    assert (blend.routing, blend.routing_used) == (routing, "sequential" if routing == "auto" else routing)
    assert blend.calls == CALL["num_inference_steps"] and blend.forwards == forwards_per_step * blend.calls
    reference = sequential_latents(sd_pipe, preference)
    assert torch.allclose(ours, reference, atol=BATCHED_VS_SEQUENTIAL_ATOL), (ours - reference).abs().max()


def test_ls_routings_agree_when_samples_draw_different_members(sd_pipe):
    preference = Preference({"aesthetic": 0.5, "align": 0.5})
    kwargs = dict(method="ls", switch_generator=4, num_images_per_prompt=3)
    batched = run(sd_pipe, preference=preference, routing="batched", **kwargs)
    counts = sd_pipe.last_blend.denoiser.selection_counts
    assert (counts > 0).all()  # both members drawn: the CFG batch holds interleaved members
    sequential = run(sd_pipe, preference=preference, routing="sequential", **kwargs)
    assert torch.allclose(batched, sequential, atol=BATCHED_VS_SEQUENTIAL_ATOL)
    with pytest.raises(DiffusionBlendError, match="unknown routing"):
        run(sd_pipe, preference=preference, routing="fastest")


def test_db_mpa_one_batched_forward_holds_members_times_cfg_rows(sd_pipe):
    batches = []
    handle = sd_pipe.unet.register_forward_pre_hook(
        lambda m, args, kw: batches.append(kw.get("sample", args[0] if args else None)), with_kwargs=True
    )
    try:
        run(sd_pipe, preference=Preference({"aesthetic": 0.5, "align": 0.5}), num_images_per_prompt=2)
    finally:
        handle.remove()
    assert len(batches) == CALL["num_inference_steps"]
    assert all(x.shape[0] == 2 * 2 for x in batches)  # the pipeline's CFG batch reaches the UNet unchanged


def test_one_hot_preference_equals_that_adapter_alone_in_stock_diffusers(sd_pipe):
    for name in ("align", "safety"):
        ours = run(sd_pipe, preference=Preference({name: 1.0}))
        stock = stock_latents(sd_pipe, name)
        assert torch.allclose(ours, stock, atol=ROUTED_VS_STOCK_ATOL)


def test_kl_scale_zero_is_the_base_with_adapters_disabled(sd_pipe):
    ours = run(sd_pipe, preference=Preference({"aesthetic": 0.4, "align": 0.6}, kl_scale=0.0))
    assert torch.allclose(ours, stock_latents(sd_pipe, None), atol=1e-6)
    assert (ours - run(sd_pipe, preference=Preference({"aesthetic": 1.0}))).abs().max() > 1e-2


def test_same_seed_same_image_and_seed_matters(sd_pipe):
    preference = Preference({"aesthetic": 0.3, "align": 0.7})
    first = run(sd_pipe, preference=preference, seed=5)
    assert torch.equal(first, run(sd_pipe, preference=preference, seed=5))
    assert (first - run(sd_pipe, preference=preference, seed=6)).abs().max() > 1e-2


def test_ls_makes_one_unet_call_per_step_and_is_seeded(sd_pipe):
    calls = []
    handle = sd_pipe.unet.register_forward_hook(lambda m, args, out: calls.append(1))
    preference = Preference({"aesthetic": 0.3, "align": 0.7})
    try:
        first = run(sd_pipe, preference=preference, method="ls", switch_generator=11, num_inference_steps=6)
    finally:
        handle.remove()
    assert len(calls) == 6 and sd_pipe.last_blend.calls == 6
    counts = sd_pipe.last_blend.denoiser.selection_counts
    assert counts.sum() == 6  # one draw per sample per step; both CFG rows share it
    again = run(sd_pipe, preference=preference, method="ls", switch_generator=11, num_inference_steps=6)
    assert torch.equal(first, again)


def test_ls_with_a_one_hot_preference_is_that_adapter(sd_pipe):
    ours = run(sd_pipe, preference=Preference({"safety": 1.0}), method="ls", switch_generator=0)
    assert torch.allclose(ours, stock_latents(sd_pipe, "safety"), atol=ROUTED_VS_STOCK_ATOL)


def test_ls_step_uses_exactly_the_drawn_members_prediction(sd_pipe):
    """Replay the draws: a stock run that switches adapters per step by the same draws gives the same image."""
    preference = Preference({"aesthetic": 0.5, "align": 0.5})
    ours = run(sd_pipe, preference=preference, method="ls", switch_generator=3)
    members, probabilities = preference.coefficients(sd_pipe.adapter_names).probabilities()
    replay = torch.Generator().manual_seed(3)
    draws = [
        members[int(torch.multinomial(probabilities, 1, replacement=True, generator=replay))]
        for _ in range(CALL["num_inference_steps"])
    ]
    unet, original = sd_pipe.unet, sd_pipe.unet.forward
    step = iter(draws)

    def forward(*args, **kw):
        sd_pipe.set_adapters([next(step)])
        return original(*args, **kw)

    unet.forward = forward
    try:
        replayed = run(sd_pipe)
    finally:
        del unet.forward
    assert torch.allclose(ours, replayed, atol=ROUTED_VS_STOCK_ATOL)


def test_ls_refuses_negative_coefficients_and_unknown_names(sd_pipe):
    with pytest.raises(PreferenceError, match="non-negative"):
        run(sd_pipe, preference=Preference({"aesthetic": 1.0}, kl_scale=1.5), method="ls", switch_generator=0)
    with pytest.raises(PreferenceError, match="no expert named 'style'"):
        run(sd_pipe, preference=Preference({"style": 1.0}))


def test_diffusers_lora_file_loads_into_stock_and_ours_identically(sd_files):
    root, files = sd_files
    stock = StableDiffusionPipeline.from_pretrained(root / "base")
    stock.load_lora_weights(str(files["align"]), adapter_name="align")
    stock.set_progress_bar_config(disable=True)
    ours = BlendStableDiffusionPipeline.from_pretrained(root / "base")
    ours.load_adapter(files["align"], "align")
    ours.set_progress_bar_config(disable=True)
    assert torch.allclose(run(stock), run(ours, preference=Preference({"align": 1.0})), atol=ROUTED_VS_STOCK_ATOL)
    # and the file reproduces the source adapter it was saved from
    source = UNet2DConditionModel.from_pretrained(root / "base" / "unet")
    for name, seed in SEEDS.items():
        perturbed_lora(source, name, seed)
    source.set_adapters(["align"])
    x, emb = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 16, 32)
    assert torch.allclose(source(x, 500, emb).sample, ours.unet(x, 500, emb).sample, atol=1e-6)


def test_peft_adapter_folder_equals_the_diffusers_file(sd_files, tmp_path):
    root, files = sd_files
    source = UNet2DConditionModel.from_pretrained(root / "base" / "unet")
    perturbed_lora(source, "aesthetic", SEEDS["aesthetic"])
    folder = tmp_path / "peft_aesthetic"
    folder.mkdir()
    LoraConfig(r=4, lora_alpha=4, target_modules=ATTENTION_PROJECTIONS).save_pretrained(folder)
    state = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(source, adapter_name="aesthetic").items()}
    save_file(state, folder / "adapter_model.safetensors")
    from_folder = BlendStableDiffusionPipeline.from_pretrained(root / "base")
    from_folder.load_adapter(folder, "aesthetic")
    from_folder.set_progress_bar_config(disable=True)
    from_file = BlendStableDiffusionPipeline.from_pretrained(root / "base")
    from_file.load_adapter(files["aesthetic"], "aesthetic")
    from_file.set_progress_bar_config(disable=True)
    preference = Preference({"aesthetic": 1.0}, kl_scale=0.6)
    assert torch.allclose(run(from_folder, preference=preference), run(from_file, preference=preference), atol=1e-6)


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    save_pipeline(tiny_sdxl_pipeline(root), root / "base")
    return root, write_adapters(StableDiffusionXLPipeline, root / "base", root / "lora", {"aesthetic": 4, "align": 5})


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_files):
    root, files = sdxl_files
    pipe = BlendStableDiffusionXLPipeline.from_pretrained(root / "base")
    pipe.load_adapters(files)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_blend_equals_sequential_and_one_hot_equals_stock(sdxl_pipe):
    preference = Preference({"aesthetic": 0.6, "align": 0.6}, kl_scale=1.0)  # c_0 = -0.2: base in the batch
    batched = run(sdxl_pipe, preference=preference)
    assert torch.allclose(batched, sequential_latents(sdxl_pipe, preference), atol=BATCHED_VS_SEQUENTIAL_ATOL)
    one_hot = run(sdxl_pipe, preference=Preference({"align": 1.0}))
    assert torch.allclose(one_hot, stock_latents(sdxl_pipe, "align"), atol=ROUTED_VS_STOCK_ATOL)
    assert (batched - one_hot).abs().max() > 1e-2


# ---- CLI -------------------------------------------------------------------------------------------------------


def cli(sd_files, out, *extra, weights="aesthetic=0.3,align=0.7"):
    root, files = sd_files
    return main([
        "sample", "--base", str(root / "base"), "--adapter", f"aesthetic={files['aesthetic']}",
        "--adapter", f"align={files['align']}", "--weights", weights, "--prompt", "a cat", "--out", str(out),
        "--steps", "3", "--num-images", "2", "--seed", "7", *extra,
    ])


def test_cli_sample_writes_pngs_and_settings(sd_files, tmp_path):
    from PIL import Image

    assert cli(sd_files, tmp_path / "out", "--kl-scale", "1.2") == 0
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["images"] == ["image_000.png", "image_001.png"]
    assert settings["coefficients"] == pytest.approx({"base": -0.2, "aesthetic": 0.36, "align": 0.84})
    assert settings["unet_calls"] == 3 and settings["seeds"] == [7, 8]
    # routing: the default "auto" is sequential on CPU, one forward per member (base, aesthetic, align) per step
    assert settings["routing"] == "auto" and settings["routing_used"] == "sequential"
    assert settings["unet_forwards"] == 9
    images = [Image.open(tmp_path / "out" / name) for name in settings["images"]]
    assert all(image.size == (16, 16) for image in images)
    assert cli(sd_files, tmp_path / "ls", "--method", "ls") == 0
    assert json.loads((tmp_path / "ls" / "settings.json").read_text())["unet_calls"] == 3


def test_cli_mismatched_adapters_exit_2_with_one_line(sd_files, sdxl_files, tmp_path, capsys):
    root, files = sd_files
    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    # another base: a LoRA saved from a UNet with another cross-attention width (the SDXL tiny UNet)
    other_base = sdxl_files[1]["align"]
    # wrong rank layout: lora_A of rank 4 but lora_B of rank 2
    good = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(files["align"]).items()}
    broken = {k: (v[:, :2].contiguous() if "lora_B" in k else v) for k, v in good.items()}
    bad_rank = tmp_path / "bad_rank.safetensors"
    save_file(broken, bad_rank)
    cases = {
        "not a safetensors file": ["--adapter", f"aesthetic={corrupted}"],
        "does not fit": ["--adapter", f"aesthetic={other_base}"],
        "rank": ["--adapter", f"aesthetic={bad_rank}"],
        "does not exist": ["--adapter", f"aesthetic={tmp_path / 'missing.safetensors'}"],
    }
    for expected, adapter in cases.items():
        code = main(["sample", "--base", str(root / "base"), *adapter, "--adapter", f"align={files['align']}",
                     "--weights", "aesthetic=0.5,align=0.5", "--prompt", "x", "--out", str(tmp_path / "o"),
                     "--steps", "2"])
        ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dblend")]
        err = ours[0] if ours else ""
        assert code == 2, (expected, err)
        assert len(ours) == 1 and err.startswith("dblend: error:"), ours  # (other lines: loading progress bars)
        if expected != "rank":
            assert expected in err, err
        else:
            assert "does not fit" in err or "rank" in err, err
    assert cli(sd_files, tmp_path / "o", weights="aesthetic=0.5,style=0.5") == 2
    assert "no expert named 'style'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_load_adapter_refuses_text_encoder_lora_and_duplicates(sd_files, tmp_path, sd_pipe):
    root, files = sd_files
    with pytest.raises(DiffusionBlendError, match="already loaded"):
        sd_pipe.load_adapter(files["align"], "align")
    from safetensors.torch import load_file

    state = load_file(files["align"])
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
    path = tmp_path / "with_te.safetensors"
    save_file(state, path)
    fresh = BlendStableDiffusionPipeline.from_pretrained(root / "base")
    with pytest.raises(AdapterMismatchError, match="text_encoder"):
        fresh.load_adapter(path, "te")
    assert fresh.adapter_names == ()


# ---- samplers: eta and DB-MPA-LS (issue 14) ----------------------------------------------------------------------


def test_eta_with_a_scheduler_that_ignores_it_is_refused(sd_files):
    """SD 1.5 ships PNDM: stock diffusers gives the same image at eta 0 and 1 (eta silently dropped), so a blended
    call with eta != 0 on it is an error naming the fix; DDIM honours eta (the images differ)."""
    from diffusers import PNDMScheduler

    root, files = sd_files
    pipe = BlendStableDiffusionPipeline.from_pretrained(root / "base")
    pipe.load_adapters(files)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)  # as SD 1.5 ships it
    assert torch.equal(run(pipe, eta=0.0), run(pipe, eta=1.0))  # the silent no-op the check exists for
    preference = Preference({"aesthetic": 0.3, "align": 0.7})
    with pytest.raises(DiffusionBlendError, match="eta=1 has no effect with PNDMScheduler.*DDIMScheduler"):
        run(pipe, preference=preference, eta=1.0)
    assert run(pipe, preference=preference, eta=0.0).shape == run(pipe, eta=0.0).shape  # eta 0: deterministic, fine
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert not torch.equal(run(pipe, preference=preference, eta=0.0), run(pipe, preference=preference, eta=1.0))


def test_ls_refuses_deterministic_samplers(sd_files):
    """DB-MPA-LS (paper Proposition 2) needs fresh noise every step: DDIM eta=0, PNDM and Euler are refused with one
    line; DDIM eta=1, DDPM and Euler ancestral run (one UNet call per step, like stock)."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    root, files = sd_files
    pipe = BlendStableDiffusionPipeline.from_pretrained(root / "base")
    pipe.load_adapters(files)
    pipe.set_progress_bar_config(disable=True)
    preference = Preference({"aesthetic": 0.5, "align": 0.5})
    config = pipe.scheduler.config
    for scheduler, eta in ((DDIMScheduler, 0.0), (PNDMScheduler, None), (EulerDiscreteScheduler, None)):
        pipe.scheduler = scheduler.from_config(config, skip_prk_steps=True)  # (PNDM as SD 1.5 ships it)
        with pytest.raises(DiffusionBlendError, match=f"needs a stochastic sampler.*{scheduler.__name__}") as info:
            run(pipe, preference=preference, method="ls", switch_generator=0, eta=eta)
        assert "\n" not in str(info.value)
        assert run(pipe, preference=preference, method="mpa", eta=eta).shape[0] == 1  # DB-MPA: any scheduler
    for scheduler, eta in ((DDIMScheduler, 1.0), (DDPMScheduler, None), (EulerAncestralDiscreteScheduler, None)):
        pipe.scheduler = scheduler.from_config(config)
        run(pipe, preference=preference, method="ls", switch_generator=0, eta=eta)
        assert pipe.last_blend.calls == CALL["num_inference_steps"]


def test_cli_settings_are_tidy_and_files_have_the_users_mode(sd_files, tmp_path, capsys):
    os.umask(umask := os.umask(0o022))
    assert cli(sd_files, tmp_path / "out", "--kl-scale", "1.2") == 0
    assert "device: cpu, float32 (auto)" in capsys.readouterr().out  # says what auto picked
    text = (tmp_path / "out" / "settings.json").read_text()
    assert '"base": -0.2' in text and "0.19999999" not in text and "0.36000000" not in text
    for path in (tmp_path / "out").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert cli(sd_files, tmp_path / "out") == 2  # holds results: refused
    assert "--overwrite" in capsys.readouterr().err
    assert cli(sd_files, tmp_path / "out", "--num-images", "1", "--overwrite") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["image_000.png", "settings.json"]


def _mean_red(images, prompts):
    assert len(prompts) == images.shape[0]
    return images[:, 0].mean((1, 2)).double()


def test_smc_with_one_particle_is_the_blend_in_the_stock_loop(sd_pipe):
    """method='smc', N = 1: the stock diffusers loop with the DB-MPA blend (same noise stream, CFG commutes)."""
    preference = Preference({"aesthetic": 0.4, "align": 0.6})
    blend = run(sd_pipe, seed=3, preference=preference, method="mpa")
    smc = run(
        sd_pipe,
        seed=3,
        preference=preference,
        method="smc",
        reward=_mean_red,
        alpha=0.1,
        smc=SMCOptions(particles=1),
    )
    assert torch.allclose(smc, blend, atol=BATCHED_VS_SEQUENTIAL_ATOL)
    assert sd_pipe.last_smc.network_evaluations == 3 * CALL["num_inference_steps"]  # 2 experts + the base


def test_smc_particles_report_cost_and_refuse_bad_input(sd_pipe):
    preference = Preference({"aesthetic": 0.5, "align": 0.5})
    out = run(
        sd_pipe,
        seed=1,
        preference=preference,
        method="smc",
        reward=_mean_red,
        alpha=0.05,
        smc=SMCOptions(particles=3),
        prompt=["a cat", "a dog"],
    )
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    stats = sd_pipe.last_smc
    assert stats.network_evaluations == 3 * 3 * CALL["num_inference_steps"]
    assert stats.reward_evaluations == 3 * (CALL["num_inference_steps"] + 1)
    assert stats.final_ess.shape == (2,) and ((stats.final_ess >= 1 - 1e-9) & (stats.final_ess <= 3 + 1e-9)).all()
    with pytest.raises(DiffusionBlendError, match="deterministic"):
        run(sd_pipe, preference=preference, method="smc", reward=_mean_red, alpha=0.05, eta=0.0)
    with pytest.raises(DiffusionBlendError, match="needs a preference"):
        run(sd_pipe, method="smc", reward=_mean_red, alpha=0.05)


def test_cli_smc_matches_the_pipelines_smc_and_records_its_costs(sd_files, tmp_path, capsys):
    """``--method smc``: the saved images are the pipeline's own SMC images (same seed, same r_w = 0.3 brightness +
    0.7 saturation from ``--reward``, same alpha); settings.json records N, the costs (3 members x N x steps rows) and
    one final ESS per image; ``--smc-proposal twisted`` reaches the pipeline's twisted SMC. SMC without a known
    alpha, or --reward without smc, is one line and exit 2."""
    import numpy as np
    from PIL import Image

    from diffusion_blend.rewards import get_reward

    rewards = ["--reward", "aesthetic=brightness", "--reward", "align=saturation"]
    assert cli(sd_files, tmp_path / "smc", "--method", "smc", "--particles", "2", "--alpha", "0.5", *rewards) == 0
    settings = json.loads((tmp_path / "smc" / "settings.json").read_text())
    assert settings["method"] == "smc" and settings["smc"]["particles"] == 2 and settings["smc_alpha"] == 0.5
    assert {name: e["reward"] for name, e in settings["experts"].items()} == {"aesthetic": "brightness",
                                                                             "align": "saturation"}
    assert settings["network_evaluations_per_image"] == 3 * 2 * 3 and len(settings["final_ess"]) == 2
    brightness, saturation = get_reward("brightness"), get_reward("saturation")

    def r_w(images, prompts):
        return 0.3 * brightness(images, prompts).double() + 0.7 * saturation(images, prompts).double()

    root, files = sd_files
    pipe = BlendStableDiffusionPipeline.from_pretrained(root / "base")  # as the CLI builds it
    pipe.load_adapters(files)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert cli(sd_files, tmp_path / "twisted", "--method", "smc", "--particles", "2", "--alpha", "0.5", *rewards,
               "--smc-proposal", "twisted") == 0
    assert json.loads((tmp_path / "twisted" / "settings.json").read_text())["smc"]["proposal"] == "twisted"
    assert settings["smc"]["proposal"] == "blend" and settings["smc"]["proposal_tilt"] == "auto"  # the defaults
    images = {}
    for proposal, run_dir in (("blend", "smc"), ("twisted", "twisted")):
        expected = pipe(
            ["a cat"] * 2,
            preference=Preference({"aesthetic": 0.3, "align": 0.7}),
            method="smc",
            reward=r_w,
            alpha=0.5,
            smc=SMCOptions(particles=2, proposal=proposal),
            generator=7,
            num_inference_steps=3,
            guidance_scale=7.5,
            eta=1.0,
            output_type="np",
        ).images
        saved = np.stack([np.asarray(Image.open(tmp_path / run_dir / name)) for name in settings["images"]])
        assert np.abs(saved.astype(int) - (expected * 255).round().astype(int)).max() <= 1, proposal
        images[proposal] = saved
    assert not np.array_equal(images["blend"], images["twisted"])
    capsys.readouterr()
    assert cli(sd_files, tmp_path / "no-alpha", "--method", "smc", *rewards) == 2
    assert cli(sd_files, tmp_path / "not-smc", "--particles", "2", *rewards) == 2  # an SMC flag without SMC
    assert cli(sd_files, tmp_path / "bad-n", "--method", "smc", "--particles", "0", "--alpha", "1", *rewards) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "alpha" in errors[0] and "--particles is for --method smc" in errors[1]
    assert "--particles must be" in errors[2]
