"""Experts fine-tuned with different KL weights (issue 22): the blend serves the target it states.

Expert ``i`` fine-tuned with KL weight ``alpha_i`` tilts the base by ``exp(r_i / alpha_i)``, so the blend with
``c_i = lambda w_i`` serves ``p_pre exp(lambda sum_i w_i r_i / alpha_i)``, and with a target alpha ``A`` the
coefficients ``lambda w_i alpha_i / A`` serve ``p_pre exp(lambda sum_i w_i r_i / A)``. On a single Gaussian with
linear rewards the blend of exact experts is exact (no Jensen gap), so its noise prediction must equal the exact
tilted target's, built here from the definition (not from :class:`BlendTarget`). Then the commands on tiny bases.
"""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_blend.cli import main
from diffusion_blend.denoisers import BlendedDenoiser
from diffusion_blend.preference import BlendTarget, Preference, PreferenceError
from diffusion_blend.sampling import make_scheduler
from diffusion_blend.testbeds.gmm import GaussianMixture, MixtureDenoiser, QuadraticForm, ideal_family

F64 = torch.float64
ALPHAS = {"right": 1.0, "up": 0.5}
REWARDS = {"right": QuadraticForm.linear_reward([1.0, 0.0]), "up": QuadraticForm.linear_reward([0.0, 1.0])}


def exact_target(base: GaussianMixture, exponent: dict[str, float], kl_scale: float) -> GaussianMixture:
    """``p_pre exp(lambda sum_i e_i r_i)`` from the definition."""
    names = list(exponent)
    return base.tilt(QuadraticForm.weighted_sum([REWARDS[n] for n in names], [exponent[n] for n in names]),
                     kl_scale)


@pytest.mark.parametrize("target_alpha", [None, 0.25])
def test_blend_of_experts_with_different_alphas_is_the_stated_target(target_alpha):
    base = GaussianMixture.isotropic([1.0], [[0.3, -0.2]], 1.1)  # closed forms in float64
    scheduler = make_scheduler("ddim")
    family = ideal_family(base, REWARDS, ALPHAS, scheduler)
    preference = Preference({"right": 0.3, "up": 0.7}, kl_scale=1.2)
    target = BlendTarget(preference, ALPHAS, target_alpha)
    blend = BlendedDenoiser(family, target.blend())
    if target_alpha is None:  # each reward weighted by w_i / alpha_i
        exponent = {n: w / ALPHAS[n] for n, w in preference.weights.items()}
    else:  # every expert as if fine-tuned at A
        exponent = {n: w / target_alpha for n, w in preference.weights.items()}
    exact = MixtureDenoiser(exact_target(base, exponent, preference.kl_scale), scheduler.alphas_cumprod)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2
    for t in (999, 700, 300, 50, 1):
        step = torch.tensor(t)
        assert (blend(x, step) - exact(x, step)).abs().max() < 1e-10, t
    assert target.implied_weights() == pytest.approx(exponent, rel=1e-12)
    if target_alpha is not None:  # the coefficients are rescaled by alpha_i / A
        assert target.blend().weights == pytest.approx({"right": 0.3 * 1.0 / 0.25, "up": 0.7 * 0.5 / 0.25})


def test_one_alpha_and_no_target_alpha_is_the_papers_blend_and_alpha_zero_is_refused():
    preference = Preference({"a": 0.4, "b": 0.6}, 1.5)
    same = BlendTarget(preference, {"a": 0.1, "b": 0.1})
    assert same.blend() is preference and same.tilt() == (preference, 0.1)
    with pytest.raises(PreferenceError, match="unbounded"):
        BlendTarget(preference, {"a": 0.0, "b": 0.1})
    with pytest.raises(PreferenceError, match="no KL weight alpha for 'b'"):
        BlendTarget(preference, {"a": 0.1})


@pytest.fixture(scope="module")
def sd_experts(tmp_path_factory):
    """A tiny SD base and two experts whose metadata says alpha 0.05 (brightness) and 0.1 (saturation)."""
    from diffusers import UNet2DConditionModel

    from diffusion_blend.adapters import AdapterMetadata, base_fingerprint
    from diffusion_blend.pipelines.lora_files import export_diffusers_lora, unet_architecture
    from diffusion_blend.pipelines.tiny import ATTENTION_PROJECTIONS, perturbed_lora, tiny_sd_pipeline

    root = tmp_path_factory.mktemp("alphas")
    tiny_sd_pipeline(root).save_pretrained(root / "base")
    unet = UNet2DConditionModel.from_pretrained(root / "base" / "unet")
    for seed, (reward, alpha) in enumerate((("brightness", 0.05), ("saturation", 0.1)), start=1):
        perturbed_lora(unet, reward, seed=seed)
        metadata = AdapterMetadata(rewards={reward: 1.0}, alpha=alpha,
                                   base_fingerprint=base_fingerprint(unet, unet_architecture(unet)), rank=4,
                                   lora_alpha=4.0, target_modules=ATTENTION_PROJECTIONS)
        export_diffusers_lora(unet, reward, root / f"{reward}.safetensors", metadata)
    return root


def sample(root, out, *extra):
    return main(["sample", "--base", str(root / "base"), "--adapter", f"b={root / 'brightness.safetensors'}",
                 "--adapter", f"s={root / 'saturation.safetensors'}", "--weights", "b=0.4,s=0.6", "--prompt", "x",
                 "--steps", "3", "--out", str(out), *extra])


def test_sample_states_both_alphas_and_the_target_and_rescales_for_a_target_alpha(sd_experts, tmp_path):
    assert sample(sd_experts, tmp_path / "own") == 0
    own = json.loads((tmp_path / "own" / "settings.json").read_text())
    assert {n: e["alpha"] for n, e in own["experts"].items()} == {"b": 0.05, "s": 0.1}
    assert own["target"]["implied_weights"] == pytest.approx({"b": 0.4 / 0.05, "s": 0.6 / 0.1})
    assert own["coefficients"] == pytest.approx({"base": 0.0, "b": 0.4, "s": 0.6})
    assert (tmp_path / "own" / "image_000.png").is_file()
    assert sample(sd_experts, tmp_path / "at", "--target-alpha", "0.1") == 0
    at = json.loads((tmp_path / "at" / "settings.json").read_text())
    assert at["coefficients"] == pytest.approx({"base": 1 - 0.2 - 0.6, "b": 0.4 * 0.05 / 0.1, "s": 0.6})
    assert at["target"]["implied_weights"] == pytest.approx({"b": 4.0, "s": 6.0})
    assert "p_pre exp(1 x (4 b + 6 s))" == at["target"]["target"]


def test_sd3_peft_folders_in_flow_grpos_layout_with_alphas_given_per_expert(tmp_path):
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig, get_peft_model

    from diffusion_blend.pipelines.tiny import TRANSFORMER_PROJECTIONS, tiny_sd3_pipeline

    tiny_sd3_pipeline(tmp_path).save_pretrained(tmp_path / "base")
    for seed, name in enumerate(("geneval", "pickscore"), start=1):
        transformer = SD3Transformer2DModel.from_pretrained(tmp_path / "base" / "transformer")
        model = get_peft_model(transformer, LoraConfig(r=4, lora_alpha=8, target_modules=TRANSFORMER_PROJECTIONS,
                                                       init_lora_weights="gaussian"))
        torch.manual_seed(seed)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.normal_(0, 0.3)
        model.save_pretrained(tmp_path / name)  # adapter_config.json + base_model.model.-prefixed keys
    argv = ["sample", "--base", str(tmp_path / "base"), "--adapter", f"g={tmp_path / 'geneval'}", "--adapter",
            f"p={tmp_path / 'pickscore'}", "--weights", "g=0.5,p=0.5", "--alpha", "g=0.04", "--alpha", "p=0.01",
            "--prompt", "x", "--steps", "3", "--height", "16", "--width", "16"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert {n: e["alpha"] for n, e in settings["experts"].items()} == {"g": 0.04, "p": 0.01}
    assert settings["target"]["implied_weights"] == pytest.approx({"g": 12.5, "p": 50.0})
    assert main([*argv, "--target-alpha", "0.02", "--out", str(tmp_path / "at")]) == 0
    at = json.loads((tmp_path / "at" / "settings.json").read_text())
    assert at["coefficients"] == pytest.approx({"base": 0.0 + 1 - 1.0 - 0.25, "g": 1.0, "p": 0.25})


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--alpha", "s=0"], "unbounded"),
    (["--alpha", "s=x"], "cannot parse --alpha"),
    (["--target-alpha", "0"], "--target-alpha"),
    (["--alpha", "nobody=0.1"], "not given"),
])
def test_bad_alphas_are_one_line_and_exit_2(sd_experts, tmp_path, capsys, extra, fragment):
    assert sample(sd_experts, tmp_path / "bad", *extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("dblend: error: ") and fragment in err[0], err
