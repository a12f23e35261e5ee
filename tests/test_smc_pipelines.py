"""method='smc' on the SDXL, SD3 and FLUX blend pipelines (tiny offline components: diffusion_blend.pipelines.tiny).

Independent truths: with ONE particle SMC is the blend sampler, so it must equal the stock diffusers loop running the
DB-MPA blend (``method="mpa"``: the stock loop with the blended forward, itself tested against hand-written sequential
loops and stock diffusers in test_sd_pipeline.py / test_flow_pipelines.py) given the same generator: same initial noise
(the pipeline's ``prepare_latents``), same step noise (SDXL: the generator; SD3 / FLUX: the SDE stream the flow
pipelines derive from it), same timesteps (FLUX: its sigmas and resolution shift), same conditioning (SDXL's pooled
embeds and time ids, SD3's CFG branches, FLUX's distilled guidance and packed latents) and the same decode. Costs are
checked against hand counts and against the rows that actually went through the network (a forward pre-hook).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
)

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.pipelines import (
    BlendFluxPipeline,
    BlendStableDiffusion3Pipeline,
    BlendStableDiffusionXLPipeline,
)
from diffusion_blend.pipelines.tiny import (
    save_pipeline,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
    write_adapters,
    write_transformer_adapters,
)
from diffusion_blend.preference import Preference
from diffusion_blend.sampling import FlowMatchSDEScheduler
from diffusion_blend.smc import SMCOptions

os.environ["HF_HUB_OFFLINE"] = "1"
STEPS, SIZE = 3, 16
DB_MPA = Preference({"aesthetic": 0.4, "align": 0.6})  # c_0 = 0: SMC adds the base, 3 members per step
ATOL = 1e-4  # float32 summation order (sequential vs batched routing, CFG computed in float32)


def _mean_red(images, prompts):
    assert images.min() >= 0 and images.max() <= 1 and len(prompts) == images.shape[0]
    return images[:, 0].mean((1, 2)).double()


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_smc")
    save_pipeline(tiny_sdxl_pipeline(root), root / "base")
    files = write_adapters(StableDiffusionXLPipeline, root / "base", root / "lora", {"aesthetic": 4, "align": 5})
    pipe = BlendStableDiffusionXLPipeline.from_pretrained(root / "base")
    pipe.load_adapters(files)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flow_pipe(tmp_path_factory, which):
    root = tmp_path_factory.mktemp(f"{which}_smc")
    stock_class, blend_class, build = {
        "sd3": (StableDiffusion3Pipeline, BlendStableDiffusion3Pipeline, tiny_sd3_pipeline),
        "flux": (FluxPipeline, BlendFluxPipeline, tiny_flux_pipeline)}[which]
    build(root).save_pretrained(root / "base")
    files = write_transformer_adapters(stock_class, root / "base", root / "lora", {"aesthetic": 1, "align": 2})
    extra = dict(text_encoder_3=None, tokenizer_3=None) if which == "sd3" else {}
    pipe = blend_class.from_pretrained(root / "base", **extra)
    pipe.load_adapters(files)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=0.7)
    return pipe


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    return _flow_pipe(tmp_path_factory, "sd3")


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    return _flow_pipe(tmp_path_factory, "flux")


def run(pipe, seed, **kwargs):
    extra = {"max_sequence_length": 16} if isinstance(pipe, FluxPipeline) else {}
    kwargs = {"prompt": "a small red cat", **extra, **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS, height=SIZE, width=SIZE,
                **kwargs).images


class RowCounter:
    """Rows of every network forward (a pre-hook on the UNet / transformer): the evaluations actually made."""

    def __init__(self, model):
        self.rows = self.forwards = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.rows += x.shape[0]
        self.forwards += 1

    def remove(self):
        self.handle.remove()


@pytest.mark.parametrize("which", ["sdxl", "sd3", "flux"])
def test_one_particle_is_the_db_mpa_blend_in_the_stock_loop(which, request):
    """N = 1: the stock loop with DB-MPA, same generator: latents and decoded images agree (SDXL: DDIM eta = 1 with
    CFG on pooled embeds and time ids; SD3: flow SDE with CFG; FLUX: flow SDE, distilled guidance, packed latents)."""
    pipe = request.getfixturevalue(f"{which}_pipe")
    extra = {"eta": 1.0} if which == "sdxl" else {}
    outputs = {}
    for output_type in ("latent", "np"):
        blend = run(pipe, 3, preference=DB_MPA, method="mpa", output_type=output_type, **extra)
        smc = run(pipe, 3, preference=DB_MPA, method="smc", reward=_mean_red, alpha=0.1, smc=SMCOptions(particles=1),
                  output_type=output_type, **extra)
        blend, smc = (torch.as_tensor(np.asarray(v)) for v in (blend, smc))
        assert smc.shape == blend.shape
        assert torch.allclose(smc, blend, atol=ATOL), float((smc - blend).abs().max())
        outputs[output_type] = smc
    assert pipe.last_smc.network_evaluations == 3 * STEPS  # 2 experts + the base, one particle
    other = run(pipe, 4, preference=DB_MPA, method="smc", reward=_mean_red, alpha=0.1, smc=SMCOptions(particles=1),
                output_type="latent", **extra)
    assert (other - outputs["latent"]).abs().max() > 1e-2  # the seed matters: the comparison is not vacuous
    if which != "flux":  # a negative prompt reaches the unconditional branch as in the stock loop
        blend = run(pipe, 3, preference=DB_MPA, method="mpa", output_type="latent", negative_prompt="blurry", **extra)
        smc = run(pipe, 3, preference=DB_MPA, method="smc", reward=_mean_red, alpha=0.1, smc=SMCOptions(particles=1),
                  output_type="latent", negative_prompt="blurry", **extra)
        assert torch.allclose(smc, blend, atol=ATOL) and (smc - outputs["latent"]).abs().max() > 1e-3


@pytest.mark.parametrize("which, cfg_copies", [("sdxl", 2), ("sd3", 2), ("flux", 1)])
def test_costs_match_hand_counts_and_the_network_rows(which, cfg_copies, request):
    """N = 3 particles, 2 prompts, DB-MPA over 2 experts (+ the base): per image 3 x 3 x steps guided evaluations,
    3 x (steps + 1) reward calls (Tweedie potential every step + the end), one final ESS in [1, N]; the network saw
    members x N x B x CFG copies rows per step."""
    pipe = request.getfixturevalue(f"{which}_pipe")
    extra = {"eta": 1.0} if which == "sdxl" else {}
    calls = []

    def reward(images, prompts):
        calls.append(list(prompts))
        return _mean_red(images, prompts)

    counter = RowCounter(pipe.unet if which == "sdxl" else pipe.transformer)
    try:
        out = run(pipe, 1, preference=DB_MPA, method="smc", reward=reward, alpha=0.05, smc=SMCOptions(particles=3),
                  prompt=["a cat", "a dog"], output_type="latent", **extra)
    finally:
        counter.remove()
    stats = pipe.last_smc
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert stats.network_evaluations == 3 * 3 * STEPS
    assert counter.rows == 3 * 3 * 2 * cfg_copies * STEPS
    assert stats.reward_evaluations == 3 * (STEPS + 1)
    assert len(calls) == STEPS + 1 and all(c == ["a cat", "a dog"] * 3 for c in calls)  # particle-major rows
    assert stats.final_ess.shape == (2,) and ((stats.final_ess >= 1 - 1e-9) & (stats.final_ess <= 3 + 1e-9)).all()
    # one batched forward per step (members x particles x prompts x CFG rows) gives the same images
    counter = RowCounter(pipe.unet if which == "sdxl" else pipe.transformer)
    try:
        batched = run(
            pipe,
            1,
            preference=DB_MPA,
            method="smc",
            reward=_mean_red,
            alpha=0.05,
            smc=SMCOptions(particles=3),
            prompt=["a cat", "a dog"],
            output_type="latent",
            routing="batched",
            **extra,
        )
    finally:
        counter.remove()
    assert counter.forwards == STEPS and counter.rows == 3 * 3 * 2 * cfg_copies * STEPS
    assert torch.allclose(batched, out, atol=ATOL)
    # the experts' potential: the same network rows, r_w only at x_0 (no decode before the end)
    calls.clear()
    experts = run(
        pipe,
        1,
        preference=DB_MPA,
        method="smc",
        reward=reward,
        alpha=0.05,
        smc=SMCOptions(particles=3, potential="experts"),
        prompt=["a cat", "a dog"],
        output_type="latent",
        **extra,
    )
    assert torch.isfinite(experts).all() and len(calls) == 1
    assert pipe.last_smc.network_evaluations == 3 * 3 * STEPS and pipe.last_smc.reward_evaluations == 3


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_flow_smc_refuses_the_ode_and_noise_level_zero(which, request):
    pipe = request.getfixturevalue(f"{which}_pipe")
    sde = pipe.scheduler
    common = dict(
        preference=DB_MPA, method="smc", reward=_mean_red, alpha=0.1, smc=SMCOptions(particles=2), output_type="latent"
    )
    try:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(sde.config)
        with pytest.raises(DiffusionBlendError, match="Euler ODE.*FlowMatchSDEScheduler") as info:
            run(pipe, 0, **common)
        assert "\n" not in str(info.value)
        pipe.scheduler = FlowMatchSDEScheduler.from_config(sde.config, noise_level=0.0)
        with pytest.raises(DiffusionBlendError, match="noise level 0"):
            run(pipe, 0, **common)
        pipe.scheduler = sde
        with pytest.raises(DiffusionBlendError, match="noise level 0"):
            run(pipe, 0, eta=0.0, **common)
    finally:
        pipe.scheduler = sde


def test_smc_refusals_are_one_line(flux_pipe, sdxl_pipe):
    common = dict(preference=DB_MPA, method="smc", reward=_mean_red, alpha=0.1, output_type="latent")
    with pytest.raises(DiffusionBlendError, match="negative"):
        run(flux_pipe, 0, negative_prompt="blurry", **common)
    with pytest.raises(DiffusionBlendError, match="does not take true_cfg_scale"):
        run(flux_pipe, 0, true_cfg_scale=4.0, **common)
    with pytest.raises(DiffusionBlendError, match="particles"):
        run(sdxl_pipe, 0, particles=0, eta=1.0, **common)
    with pytest.raises(DiffusionBlendError, match="deterministic"):
        run(sdxl_pipe, 0, eta=0.0, **common)


def test_flux_without_guidance_embedding_runs_like_its_stock_loop(tmp_path):
    """FLUX-schnell-style transformers take no guidance input: the shared forward passes none (as the stock loop) and
    N = 1 is still the DB-MPA stock loop."""
    from diffusers import FluxTransformer2DModel

    from diffusion_blend.pipelines.tiny import perturbed_transformer_lora

    stock = tiny_flux_pipeline(tmp_path)
    torch.manual_seed(1)
    transformer = FluxTransformer2DModel(**{**stock.transformer.config, "guidance_embeds": False})
    for name, seed in (("aesthetic", 1), ("align", 2)):
        perturbed_transformer_lora(transformer, name, seed)
    pipe = BlendFluxPipeline(**{**stock.components, "transformer": transformer})
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # built from configs, not loaded: the text encoders' dropout would be active
    pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=0.7)
    pipe.set_progress_bar_config(disable=True)
    blend = run(pipe, 5, preference=DB_MPA, method="mpa", output_type="latent", guidance_scale=0.0)
    smc = run(pipe, 5, preference=DB_MPA, method="smc", reward=_mean_red, alpha=0.1, smc=SMCOptions(particles=1),
              output_type="latent", guidance_scale=0.0)
    assert torch.allclose(smc, blend, atol=ATOL)


@pytest.mark.parametrize("family", ["sd3", "sd15"])
def test_smc_benchmark_refuses_cuda_when_no_device_is_present(family, monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the refusal is checked on any machine
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_smc
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench_smc.main(["--family", family, "--device", "cuda"])
