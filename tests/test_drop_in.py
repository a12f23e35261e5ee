"""The Blend pipelines are drop-ins for the stock diffusers pipelines (issue 28).

Independent truths: the stock classes themselves (their ``inspect.signature``, their outputs and callback tensors on
the same components and seed), diffusers' and transformers' own PEFT integrations (stock ``load_lora_weights``,
``fuse_lora``, ``unload_lora_weights`` with a text-encoder LoRA, which goes through transformers' integration and its
peft version check), and a fresh interpreter's logging / warnings state before and after importing us.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from diffusion_blend.pipelines import (
    BlendFluxPipeline,
    BlendStableDiffusion3Pipeline,
    BlendStableDiffusionPipeline,
    BlendStableDiffusionXLPipeline,
)
from diffusion_blend.pipelines.kinds import UNET_TARGETS
from diffusion_blend.pipelines.tiny import (
    TRANSFORMER_PROJECTIONS,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)
from diffusion_blend.preference import Preference

PAIRS = [
    (BlendStableDiffusionPipeline, StableDiffusionPipeline),
    (BlendStableDiffusionXLPipeline, StableDiffusionXLPipeline),
    (BlendStableDiffusion3Pipeline, StableDiffusion3Pipeline),
    (BlendFluxPipeline, FluxPipeline),
]
OURS = ["preference", "method", "switch_generator", "routing", "reward", "alpha", "smc"]
TEXT_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.mark.parametrize(("ours", "stock"), PAIRS, ids=lambda c: c.__name__)
def test_call_signature_is_the_stock_one_plus_keyword_only_extras(ours, stock):
    mine, theirs = inspect.signature(ours.__call__), inspect.signature(stock.__call__)
    stock_part = [p for p in mine.parameters.values() if p.name in theirs.parameters]
    assert stock_part == list(theirs.parameters.values())  # names, kinds, defaults, annotations, order
    assert mine.return_annotation == theirs.return_annotation
    extras = [p for p in mine.parameters.values() if p.name not in theirs.parameters]
    assert [p.name for p in extras][:len(OURS)] == OURS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)
    # a bound method too (what UIs and serving wrappers inspect)
    assert list(inspect.signature(ours.__new__(ours).__call__).parameters) == list(mine.parameters)[1:]


def _eval(pipe):
    for module in pipe.components.values():  # built from configs: in training mode (T5's dropout) until eval()
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def _pair(make, ours_cls, tmp_path, **extra):
    stock = _eval(make(tmp_path))
    ours = ours_cls(**stock.components, **extra)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    return stock, ours


def _run(pipe, **kwargs):
    return pipe(num_inference_steps=2, height=16, width=16, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("which", ["sd", "sd3", "flux"])
def test_callbacks_see_the_stock_tensors(which, tmp_path):
    make, cls = {"sd": (tiny_sd_pipeline, BlendStableDiffusionPipeline),
                 "sd3": (tiny_sd3_pipeline, BlendStableDiffusion3Pipeline),
                 "flux": (tiny_flux_pipeline, BlendFluxPipeline)}[which]
    stock, ours = _pair(make, cls, tmp_path)
    names = list(stock._callback_tensor_inputs)
    seen = {}

    def recorder(key):
        def callback(pipe, step, timestep, tensors):
            seen.setdefault(key, []).append({k: v.clone() for k, v in tensors.items()})
            return tensors
        return callback

    kwargs = {"prompt": ["a cat", "a dog"], "num_images_per_prompt": 2, "callback_on_step_end_tensor_inputs": names}
    a = _run(stock, callback_on_step_end=recorder("stock"), **kwargs).images
    b = _run(ours, callback_on_step_end=recorder("ours"), **kwargs).images
    assert a.shape[0] == 4 and a.shape == b.shape
    torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), rtol=0, atol=0)
    assert len(seen["ours"]) == len(seen["stock"]) == 2
    for mine, theirs in zip(seen["ours"], seen["stock"]):
        assert mine.keys() == theirs.keys() == set(names)
        for key in names:
            torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0)


def test_cfg_and_num_images_per_prompt_with_and_without_a_preference(tmp_path):
    stock, ours = _pair(tiny_sd_pipeline, BlendStableDiffusionPipeline, tmp_path)
    torch.manual_seed(0)  # one adapter on the UNet both pipelines share, active in the stock calls
    stock.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"], init_lora_weights="gaussian"),
                           adapter_name="x")
    with torch.no_grad():
        for name, param in stock.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    for guidance in (1.0, 7.5):  # without CFG and with it (the doubled batch)
        a = _run(stock, prompt="a cat", num_images_per_prompt=3, guidance_scale=guidance).images
        b = _run(ours, prompt="a cat", num_images_per_prompt=3, guidance_scale=guidance).images
        c = _run(ours, prompt="a cat", num_images_per_prompt=3, guidance_scale=guidance,
                 preference=Preference({"x": 1.0})).images
        assert a.shape == b.shape == c.shape == (3, 16, 16, 3)
        torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), rtol=0, atol=0)
        torch.testing.assert_close(torch.from_numpy(c), torch.from_numpy(a), rtol=1e-4, atol=1e-5)  # one-hot


def test_positional_arguments_are_the_stock_ones(tmp_path):
    stock, ours = _pair(tiny_sd_pipeline, BlendStableDiffusionPipeline, tmp_path)
    a = stock("a cat", 16, 16, 2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    b = ours("a cat", 16, 16, 2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), rtol=0, atol=0)
    with pytest.raises(TypeError, match="multiple values"):
        ours("a cat", prompt="a dog")


def test_encode_prompt_in_isolation_matches_the_full_call(tmp_path):
    stock, ours = _pair(tiny_sd3_pipeline, BlendStableDiffusion3Pipeline, tmp_path)
    defaults = {k: p.default for k, p in inspect.signature(ours.__call__).parameters.items()}
    embeds = ours.encode_prompt("a cat", "a cat", None, device="cpu",
                                do_classifier_free_guidance=defaults["guidance_scale"] > 1)
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    a = _run(stock, prompt="a cat").images
    b = _run(ours, **dict(zip(names, embeds))).images
    torch.testing.assert_close(torch.from_numpy(b), torch.from_numpy(a), rtol=1e-5, atol=1e-6)


def test_peft_integrations_accept_the_installed_peft():
    """transformers' integration refuses a peft older than its MIN_PEFT_VERSION at the first LoRA on a text
    encoder; the pins in constraints-cpu.txt must keep the pair consistent (issue 28)."""
    from diffusers.utils import USE_PEFT_BACKEND
    from transformers.integrations.peft import MIN_PEFT_VERSION
    from transformers.utils.peft_utils import check_peft_version

    check_peft_version(MIN_PEFT_VERSION)
    assert USE_PEFT_BACKEND


KINDS = {  # pipeline builder, our class, the stock class, the denoiser, its LoRA targets, its attention kwargs
    "sd": (tiny_sd_pipeline, BlendStableDiffusionPipeline, StableDiffusionPipeline, "unet", UNET_TARGETS,
           "cross_attention_kwargs"),
    "sdxl": (tiny_sdxl_pipeline, BlendStableDiffusionXLPipeline, StableDiffusionXLPipeline, "unet", UNET_TARGETS,
             "cross_attention_kwargs"),
    "sd3": (tiny_sd3_pipeline, BlendStableDiffusion3Pipeline, StableDiffusion3Pipeline, "transformer",
            TRANSFORMER_PROJECTIONS, "joint_attention_kwargs"),
    "flux": (tiny_flux_pipeline, BlendFluxPipeline, FluxPipeline, "transformer", TRANSFORMER_PROJECTIONS,
             "joint_attention_kwargs"),
}


@pytest.mark.parametrize("which", list(KINDS))
def test_stock_lora_loading_fusing_and_unloading_on_our_classes(which, tmp_path):
    """Stock ``load_lora_weights`` (denoiser and text-encoder LoRA) on our class: without a preference the stock
    pipeline's images bitwise; one-hot preference the same up to float rounding; set_adapters, fuse, unfuse, unload."""
    make, cls, stock_cls, denoiser, targets, attention_kwargs = KINDS[which]
    source = make(tmp_path)
    torch.manual_seed(1)
    getattr(source, denoiser).add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=list(targets),
                                                     init_lora_weights="gaussian"))
    source.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TEXT_PROJECTIONS,
                                               init_lora_weights="gaussian"))
    with torch.no_grad():
        for module in (getattr(source, denoiser), source.text_encoder):
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3)
    stock_cls.save_lora_weights(tmp_path / "lora", weight_name="lora.safetensors",
                                **{f"{denoiser}_lora_layers": get_peft_model_state_dict(getattr(source, denoiser))},
                                text_encoder_lora_layers=get_peft_model_state_dict(source.text_encoder))
    stock, ours = stock_cls(**_eval(make(tmp_path)).components), cls(**_eval(make(tmp_path)).components)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    base = _run(ours, prompt="a cat").images
    for pipe in (stock, ours):
        pipe.load_lora_weights(tmp_path / "lora", weight_name="lora.safetensors", adapter_name="x")
    assert ours.adapter_names == ("x",) and "x" in ours.get_list_adapters()["text_encoder"]
    lora = _run(ours, prompt="a cat").images
    torch.testing.assert_close(torch.from_numpy(lora), torch.from_numpy(_run(stock, prompt="a cat").images),
                               rtol=0, atol=0)
    assert abs(lora - base).max() > 1e-3  # the LoRA matters
    with_preference = _run(ours, prompt="a cat", preference=Preference({"x": 1.0})).images
    torch.testing.assert_close(torch.from_numpy(with_preference), torch.from_numpy(lora), rtol=1e-4, atol=1e-5)
    assert attention_kwargs in inspect.signature(cls.__call__).parameters  # what diffusers' LoRA helpers read
    ours.set_adapters(["x"], adapter_weights=[0.5])
    half = _run(ours, prompt="a cat").images
    assert abs(half - lora).max() > 1e-4
    ours.set_adapters(["x"], adapter_weights=[1.0])
    ours.fuse_lora()
    torch.testing.assert_close(torch.from_numpy(_run(ours, prompt="a cat").images), torch.from_numpy(lora),
                               rtol=1e-3, atol=1e-4)
    ours.unfuse_lora()
    ours.unload_lora_weights()
    torch.testing.assert_close(torch.from_numpy(_run(ours, prompt="a cat").images), torch.from_numpy(base),
                               rtol=1e-5, atol=1e-6)


IMPORT_STATE = r"""
import json, logging, sys, warnings
import diffusers, transformers, peft
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

def state():
    loggers = {name: logger for name, logger in logging.Logger.manager.loggerDict.items()
               if isinstance(logger, logging.Logger)}
    return {"warnings": [repr(f) for f in warnings.filters],
            "root": [repr(logging.getLogger().filters), logging.getLogger().level, len(logging.getLogger().handlers)],
            "loggers": {name: [[type(f).__name__ for f in lg.filters], lg.level, len(lg.handlers), lg.propagate,
                               lg.disabled] for name, lg in loggers.items()}}

before = state()
import importlib, pkgutil
import diffusion_blend, diffusion_blend.pipelines  # noqa: E401
for info in pkgutil.walk_packages(diffusion_blend.__path__, "diffusion_blend."):  # every module, all at once
    importlib.import_module(info.name)
for name in diffusion_blend.pipelines.__all__:  # the classes the package loads on first use
    getattr(diffusion_blend.pipelines, name)
after = state()
print(json.dumps({"before": before, "after": after}))
"""


def test_importing_us_changes_no_logging_or_warnings_state():
    out = subprocess.run([sys.executable, "-c", IMPORT_STATE], capture_output=True, text=True, check=True)
    states = json.loads(out.stdout.strip().splitlines()[-1])
    before, after = states["before"], states["after"]
    assert after["warnings"] == before["warnings"]
    assert after["root"] == before["root"]
    for name, settings in before["loggers"].items():
        assert after["loggers"][name] == settings, name
    for name in set(after["loggers"]) - set(before["loggers"]):  # loggers created during our import (by the
        assert "_DropHarmless" not in after["loggers"][name][0], name  # libraries' own modules): none of our filters
