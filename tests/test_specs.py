"""One spec per model kind (issue 21): every entry point resolves the same guidance, steps, sampler and noise level.

For each kind (tiny SD, SDXL, SD3, FLUX bases built offline) and with no sampling flag given: ``dblend sample``
(its settings.json), ``dblend ui --base`` (the studio it builds), ``dblend evaluate --setting sd`` (every kind:
the setting it builds), ``dblend finetune`` (the resolved config and target) and the stock pipeline's own call defaults
all equal :data:`diffusion_blend.pipelines.kinds.SPECS`. The stock pipelines' defaults are read from diffusers,
which we did not write: the spec must agree with them, so that a blend pipeline called without arguments and the CLI
give the same images.
"""

from __future__ import annotations

import inspect
import json

import pytest

from diffusion_blend.cli import build_parser, main
from diffusion_blend.pipelines.kinds import SPECS

KINDS = ("sd", "sdxl", "sd3", "flux")
SCHEDULERS = {"ddim": "DDIMScheduler", "sde": "FlowMatchSDEScheduler"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A tiny base of every kind and two random experts each (diffusers LoRA files)."""
    import shutil

    from diffusers import (
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from diffusion_blend.pipelines import tiny

    root = tmp_path_factory.mktemp("specs")
    builders = {"sd": (tiny.tiny_sd_pipeline, StableDiffusionPipeline, tiny.write_adapters),
                "sdxl": (tiny.tiny_sdxl_pipeline, StableDiffusionXLPipeline, tiny.write_adapters),
                "sd3": (tiny.tiny_sd3_pipeline, StableDiffusion3Pipeline, tiny.write_transformer_adapters),
                "flux": (tiny.tiny_flux_pipeline, FluxPipeline, tiny.write_transformer_adapters)}
    folders = {}
    for kind, (build, stock, write) in builders.items():
        folder = root / kind
        base = tiny.save_pipeline(build(folder), folder / "base")
        for scratch in ("_tokenizer_src", "_t5_tokenizer_src"):
            shutil.rmtree(folder / scratch, ignore_errors=True)
        write(stock, base, folder, {"brightness": 1, "saturation": 2})
        folders[kind] = folder
    return folders


def adapters(folder) -> list[str]:
    return ["--adapter", f"brightness={folder / 'brightness.safetensors'}",
            "--adapter", f"saturation={folder / 'saturation.safetensors'}"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_stock_pipelines_defaults_are_the_specs(kind):
    import diffusers

    spec = SPECS[kind]
    parameters = inspect.signature(getattr(diffusers, spec.stock_class).__call__).parameters
    assert parameters["guidance_scale"].default == spec.guidance_scale
    assert parameters["num_inference_steps"].default == spec.steps


@pytest.mark.parametrize("kind", KINDS)
def test_sample_ui_evaluate_and_finetune_resolve_the_specs_defaults(bases, kind, tmp_path):
    spec, folder = SPECS[kind], bases[kind]
    expected = {"steps": spec.steps, "guidance": spec.guidance_scale, "noise": spec.noise_level,
                "scheduler": SCHEDULERS[spec.scheduler]}

    assert main(["sample", "--base", str(folder / "base"), *adapters(folder), "--weights",
                 "brightness=0.5,saturation=0.5", "--prompt", "a cat", "--resolution", "16", "--num-images", "1",
                 "--out", str(tmp_path / "sample")]) == 0
    settings = json.loads((tmp_path / "sample" / "settings.json").read_text())
    assert {"steps": settings["steps"], "guidance": settings["guidance_scale"], "noise": settings["noise_level"],
            "scheduler": settings["scheduler"], } == expected, "sample"

    from diffusion_blend.commands.ui import pipeline_studio

    studio = pipeline_studio(build_parser().parse_args(["ui", "--base", str(folder / "base"), *adapters(folder),
                                                  "--reward", "brightness=brightness", "--reward",
                                                  "saturation=saturation", "--device", "cpu"]))
    session = studio.session
    assert {"steps": studio.steps, "guidance": studio.guidance_scale, "noise": session.noise_level,
            "scheduler": type(session.pipe.scheduler).__name__} == expected, "ui"
    assert spec.sampler_line() in studio.description  # the header names the sampler it runs

    from diffusion_blend.evaluation.sd_setting import sd_setting

    prompts = _prompts(tmp_path)
    setting = sd_setting(folder / "base", {n: folder / f"{n}.safetensors" for n in ("brightness", "saturation")},
                         prompts, ["brightness", "saturation"], alpha=1.0)
    assert {"steps": setting.num_inference_steps, "guidance": setting.options["guidance_scale"],
            "noise": setting.eta, "scheduler": type(setting.scheduler_factory()).__name__} == expected, "evaluate"

    from diffusion_blend.commands.finetune import build_config, build_target, resolve_kind_and_options

    args = build_parser().parse_args(["finetune", "--base", str(folder / "base"), "--prompts", str(prompts),
                                      "--rewards", "brightness=1", "--alpha", "1", "--out", str(tmp_path / "ft")])
    resolve_kind_and_options(args)  # --kind auto: the base's
    assert args.kind == kind
    config = build_config(args)
    target = build_target(args, config)
    assert config.num_inference_steps == spec.recipe["num_inference_steps"] and config.eta == spec.noise_level
    assert (config.lora_rank, config.lora_alpha) == (spec.lora_rank, spec.lora_alpha)
    assert config.extra[kind]["guidance_scale"] == spec.guidance_scale
    assert type(target.scheduler).__name__ == SCHEDULERS[spec.scheduler]
    assert tuple(target.target_modules) == spec.lora_targets


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n")
    return path
