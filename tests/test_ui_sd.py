"""The UI's Stable Diffusion studio on tiny offline components (no browser: the studio and the app's generate).

Independent truth: the stock diffusers pipeline with one adapter loaded by ``load_lora_weights``, and the
registry reward applied to its images.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from diffusion_blend.adapters import AdapterMetadata, base_fingerprint
from diffusion_blend.cli import build_parser, main
from diffusion_blend.commands.ui import pipeline_studio
from diffusion_blend.errors import AdapterMismatchError, DiffusionBlendError
from diffusion_blend.pipelines.lora_files import (
    export_diffusers_lora,
    unet_architecture,
)
from diffusion_blend.pipelines.session import BlendSession
from diffusion_blend.pipelines.tiny import (
    ATTENTION_PROJECTIONS,
    perturbed_lora,
    save_diffusers_lora,
    tiny_sd_pipeline,
)
from diffusion_blend.preference import Preference, PreferenceError, PreferenceSchedule
from diffusion_blend.rewards import get_reward
from diffusion_blend.ui.app import MPA_LABEL, build_app
from diffusion_blend.ui.pipeline_studio import PipelineStudio
from diffusion_blend.ui.studio import image_grid

STEPS, GUIDANCE, IMAGES = 3, 3.0, 2

NO_SCHEDULE = (False, 0.5, 0.5)  # the app's last inputs: schedule off, last-step weights


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def metadata_for(unet, reward, alpha=1.0, weight=1.0):
    return AdapterMetadata(rewards={reward: weight}, alpha=alpha,
                           base_fingerprint=base_fingerprint(unet, unet_architecture(unet)), rank=4, lora_alpha=4.0,
                           target_modules=ATTENTION_PROJECTIONS)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny base; 'small' carries our metadata (reward jpeg_compressibility), 'big' is a foreign LoRA."""
    root = tmp_path_factory.mktemp("ui_sd")
    tiny_sd_pipeline(root).save_pretrained(root / "base")
    unet = UNet2DConditionModel.from_pretrained(root / "base" / "unet")
    perturbed_lora(unet, "small", seed=1)
    export_diffusers_lora(unet, "small", root / "small.safetensors", metadata_for(unet, "jpeg_compressibility"))
    perturbed_lora(unet, "big", seed=2)
    save_diffusers_lora(StableDiffusionPipeline, unet, "big", root / "big.safetensors")
    perturbed_lora(unet, "busy", seed=4)  # an expert of jpeg_incompressibility, effective alpha 2 / 2 = 1
    export_diffusers_lora(unet, "busy", root / "busy.safetensors",
                          metadata_for(unet, "jpeg_incompressibility", alpha=2.0, weight=2.0))
    export_diffusers_lora(unet, "busy", root / "busy-alpha3.safetensors",
                          metadata_for(unet, "jpeg_incompressibility", alpha=3.0))
    other = tiny_sd_pipeline(root / "other", seed=1).unet  # another base of the same architecture
    perturbed_lora(other, "alien", seed=3)
    export_diffusers_lora(other, "alien", root / "alien.safetensors", metadata_for(other, "jpeg_compressibility"))
    return root


def open_studio(base, adapters, rewards=None, alpha=None, **kwargs):
    """What ``dblend ui --base`` builds: a blend session and the studio over it."""
    return PipelineStudio(BlendSession.open(base, adapters, rewards=rewards, alpha=alpha), **kwargs)


@pytest.fixture(scope="module")
def studio(files):
    return open_studio(files / "base", {"small": files / "small.safetensors", "big": files / "big.safetensors"},
                       rewards={"big": "jpeg_incompressibility"}, num_images=IMAGES, steps=STEPS,
                       guidance_scale=GUIDANCE)


def stock_images(files, adapter, prompt="a cat", seed=5):
    pipe = StableDiffusionPipeline.from_pretrained(files / "base", safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(files / f"{adapter}.safetensors", adapter_name=adapter)
    generators = [torch.Generator().manual_seed(seed + k) for k in range(IMAGES)]  # image k: seed + k, as the CLI
    return pipe([prompt] * IMAGES, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=1.0, generator=generators,
                output_type="pt").images


def test_studio_reads_rewards_from_metadata_or_mapping(studio):
    assert studio.reward_names == ("small", "big") and studio.text_conditioned
    assert studio.rewards["small"].name == "jpeg_compressibility"
    assert studio.rewards["big"].name == "jpeg_incompressibility"


def test_one_hot_preference_equals_stock_diffusers_with_that_adapter(studio, files):
    result = studio.generate(Preference({"small": 1.0, "big": 0.0}), "mpa", 5, "a cat")
    expected = stock_images(files, "small")
    prompts = ["a cat"] * IMAGES
    assert result.scores["small"] == pytest.approx(float(get_reward("jpeg_compressibility")(expected, prompts).mean()),
                                                   abs=2e-3)
    assert result.scores["big"] == pytest.approx(float(get_reward("jpeg_incompressibility")(expected, prompts).mean()),
                                                 abs=2e-3)
    grid = image_grid(expected, cell=64).astype(int)
    assert abs(result.images.astype(int) - grid).max() <= 1  # uint8 rounding of a < 1e-4 difference


def test_same_seed_same_images_and_the_preference_moves_them(studio):
    first = studio.generate(Preference({"small": 0.5, "big": 0.5}), "mpa", 0, "a red house")
    again = studio.generate(Preference({"small": 0.5, "big": 0.5}), "mpa", 0, "a red house")
    other = studio.generate(Preference({"small": 0.0, "big": 1.0}), "mpa", 0, "a red house")
    assert (first.images == again.images).all() and first.scores == again.scores
    assert (first.images != other.images).any()
    switching = studio.generate(Preference({"small": 0.5, "big": 0.5}), "ls", 0, "a red house")
    assert switching.images.shape == first.images.shape and set(switching.scores) == {"small", "big"}
    with pytest.raises(PreferenceError):
        studio.generate(Preference({"small": 0.5, "big": 0.5}, kl_scale=2.5), "ls", 0, "a red house")
    with pytest.raises(DiffusionBlendError, match="prompt"):
        studio.generate(Preference({"small": 1.0}), "mpa", 0, "  ")


def test_app_generate_returns_images_and_scores_and_refuses_empty_prompt(studio):
    app = build_app(studio)
    generate = next(fn.fn for fn in app.fns.values() if getattr(fn.fn, "__name__", "") == "generate")
    # the page's inputs: weights, KL scale, method, seed, prompt, SMC particles and tilt, schedule, last-step weights
    images, scores, pareto, status, shown = generate(1.0, 0.0, 1.0, MPA_LABEL, 5, "a cat", 1, 1.0, *NO_SCHEDULE)
    assert images.ndim == 3 and images.dtype.name == "uint8" and pareto is None
    # scores labelled by the reward they measure
    assert "| small (jpeg_compressibility) |" in scores and "| big (jpeg_incompressibility) |" in scores
    assert "standard error" in scores
    assert status.startswith("Result for weights small 1, big 0, KL scale 1, DB-MPA, seed 5")
    mark_stale = next(fn.fn for fn in app.fns.values() if getattr(fn.fn, "__name__", "") == "mark_stale")
    assert mark_stale(1.0, 0.0, 1.0, MPA_LABEL, 5, "a dog", 1, 1.0, *NO_SCHEDULE, shown).startswith("**Stale**")
    assert mark_stale(1.0, 0.0, 1.0, MPA_LABEL, 5, "a cat", 1, 1.0, *NO_SCHEDULE, shown) == status  # as shown
    invalid = generate(5.0, 0.0, 1.0, MPA_LABEL, 5, "a cat", 1, 1.0, *NO_SCHEDULE)  # typed outside the range
    assert invalid[3] == "⚠️ Invalid input: weight: small must be between -1 and 2, got 5.0"
    assert all(isinstance(output, dict) for output in invalid[:3])  # gr.update(): the result on show stays
    assert generate(1.0, 0.0, 1.0, MPA_LABEL, 5, "", 1, 1.0, *NO_SCHEDULE)[3] == "⚠️ Invalid input: enter a prompt"


def test_the_page_schedules_weights_from_the_first_step_to_the_last(studio):
    """The schedule box: the sliders give the first step's weights, the last-step sliders the last step's; the page
    runs the studio with that schedule (the same images as the studio called with it) and says it is no tilt."""
    generate = next(fn.fn for fn in build_app(studio).fns.values() if getattr(fn.fn, "__name__", "") == "generate")
    images, _, _, status, _ = generate(1.0, 0.0, 1.0, MPA_LABEL, 5, "a cat", 1, 1.0, True, 0.0, 1.0)
    schedule = PreferenceSchedule({"small": ((0.0, 1.0), (1.0, 0.0)), "big": ((0.0, 0.0), (1.0, 1.0))})
    direct = studio.generate(schedule, "mpa", 5, "a cat")
    assert (images == direct.images).all()
    constant = studio.generate(Preference({"small": 1.0, "big": 0.0}), "mpa", 5, "a cat")
    assert (images != constant.images).any()  # the schedule reached the sampler
    assert "small 1, big 0 (first step) to small 0, big 1" in status and "not a tilt" in status
    refused = generate(1.0, 0.0, 1.0, MPA_LABEL, 5, "a cat", 2, 1.0, True, 0.0, 1.0)[3]
    assert refused.startswith("⚠️ Invalid input: SMC targets a fixed preference")


def test_smc_particles_run_the_pipelines_smc_with_the_experts_alpha(studio, files):
    """Both experts carry metadata (effective alphas 1 and 2/2): the studio offers SMC; N = 2 particles per image cost
    3 members (2 experts + the base) x 2 x steps rows per image; SMC needs DB-MPA; a foreign LoRA (no alpha) leaves
    the studio without SMC, and the app says so in its status line; experts of different alphas keep it."""
    kwargs = dict(num_images=IMAGES, steps=STEPS, guidance_scale=GUIDANCE)
    smc_studio = open_studio(
        files / "base", {"small": files / "small.safetensors", "busy": files / "busy.safetensors"}, **kwargs)
    assert smc_studio.supports_smc and smc_studio.alpha == pytest.approx(1.0)
    preference = Preference({"small": 0.5, "busy": 0.5})
    plain = smc_studio.generate(preference, "mpa", 3, "a cat")
    result = smc_studio.generate(preference, "mpa", 3, "a cat", particles=2)
    stats = smc_studio.session.pipe.last_smc
    assert result.images.shape == plain.images.shape and set(result.scores) == {"small", "busy"}
    assert stats.network_evaluations == 3 * 2 * STEPS and stats.final_ess.shape == (IMAGES,)
    again = smc_studio.generate(preference, "mpa", 3, "a cat", particles=2)
    assert (again.images == result.images).all()  # same seed, same SMC draws
    with pytest.raises(DiffusionBlendError, match="DB-MPA"):
        smc_studio.generate(preference, "ls", 3, "a cat", particles=2)
    generate = next(fn.fn for fn in build_app(smc_studio).fns.values()
                    if getattr(fn.fn, "__name__", "") == "generate")
    assert "with SMC, 2 particles" in generate(0.5, 0.5, 1.0, MPA_LABEL, 3, "a cat", 2, 1.0, *NO_SCHEDULE)[3]
    tilted = smc_studio.generate(preference, "mpa", 3, "a cat", particles=2, proposal_tilt=2.0)
    assert not (tilted.images == result.images).all()  # the proposal tilt reaches the pipeline's SMC
    assert not studio.supports_smc  # 'big' is a foreign LoRA: no alpha
    generate = next(fn.fn for fn in build_app(studio).fns.values() if getattr(fn.fn, "__name__", "") == "generate")
    assert "not available" in generate(1.0, 0.0, 1.0, MPA_LABEL, 5, "a cat", 2, 1.0, *NO_SCHEDULE)[3]
    mixed = open_studio(
        files / "base", {"small": files / "small.safetensors", "busy": files / "busy-alpha3.safetensors"}, **kwargs)
    assert mixed.supports_smc  # experts of different alphas: SMC targets what the blend serves (issue 22)
    assert "small 1, busy 3" in mixed.target_line(preference)


def test_adapter_problems_are_one_line_errors(files):
    kwargs = dict(num_images=1, steps=1)
    with pytest.raises(DiffusionBlendError, match="--reward big=REWARD"):
        open_studio(files / "base", {"big": files / "big.safetensors"}, **kwargs)
    with pytest.raises(AdapterMismatchError, match="another base"):
        open_studio(files / "base", {"alien": files / "alien.safetensors"}, **kwargs)
    with pytest.raises(DiffusionBlendError, match="not given"):
        open_studio(files / "base", {"small": files / "small.safetensors"}, rewards={"typo": "aesthetic"}, **kwargs)
    with pytest.raises(DiffusionBlendError, match="no such folder"):
        open_studio(files / "missing", {"small": files / "small.safetensors"}, **kwargs)


def test_ui_command_builds_the_pipeline_studio_and_exits_2_on_bad_input(files, capsys):
    args = build_parser().parse_args(["ui", "--base", str(files / "base"), "--adapter",
                                      f"small={files / 'small.safetensors'}", "--steps", "1", "--num-images", "1",
                                      "--adapter-dir", str(files)])
    built = pipeline_studio(args)
    assert built.reward_names == ("small",) and built.text_conditioned and built.alpha == 1.0  # from metadata
    foreign = [
        "ui",
        "--base",
        str(files / "base"),
        "--adapter",
        f"small={files / 'small.safetensors'}",
        "--adapter",
        f"big={files / 'big.safetensors'}",
        "--reward",
        "big=jpeg_incompressibility",
        "--steps",
        "1",
        "--num-images",
        "1",
    ]
    assert not pipeline_studio(build_parser().parse_args(foreign)).supports_smc  # 'big' has no metadata: alpha unknown
    assert pipeline_studio(build_parser().parse_args([*foreign, "--alpha", "1.0"])).alpha == 1.0  # --alpha fills it in
    differing = pipeline_studio(build_parser().parse_args([*foreign, "--alpha", "2.0"]))  # alphas 1 and 2
    assert differing.supports_smc and differing.alpha is None  # SMC serves the stated target; no common alpha
    for argv in (["ui", "--base", str(files / "base")],
                 ["ui", "--base", str(files / "base"), "--adapter", f"big={files / 'big.safetensors'}",
                  "--reward", "big=no_such_reward"],
                 ["ui", "--base", str(files / "base"), "--adapter", f"small={files / 'small.safetensors'}",
                  "--adapter-dir", str(files / "elsewhere")],
                 [*foreign, "--alpha", "-1"], ["ui", "--alpha", "1.0"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("dblend: error: ") and not any("Traceback" in line for line in err)
