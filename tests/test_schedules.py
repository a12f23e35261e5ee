"""Weight schedules over the steps (issue 22): parsing, the plain blend when constant, a switch at step k equal to a
loop that runs one expert and then the other, DB-MPA-LS's per-step draws, the pipelines and the command line.

Independent truths: a hand-written DDIM loop over exact mixture experts (``scheduler.step`` on expert a's prediction
for the first k steps, expert b's after), and per-step binomial frequencies for DB-MPA-LS.
"""

from __future__ import annotations

import json

import pytest
import torch

from diffusion_blend.cli import main
from diffusion_blend.denoisers import BlendedDenoiser, SwitchingDenoiser
from diffusion_blend.preference import BASE, Preference, PreferenceError, PreferenceSchedule, step_progress
from diffusion_blend.sampling import make_scheduler, sample, timestep_progress
from diffusion_blend.testbeds.gmm import GaussianMixture, QuadraticForm, ideal_family

F64 = torch.float64
STEPS = 10


def mixture_family(scheduler):
    base = GaussianMixture.isotropic([0.5, 0.5], [[-1.0, 0.0], [1.5, 0.5]], 0.6)
    rewards = {"a": QuadraticForm.linear_reward([1.0, 0.0]), "b": QuadraticForm.linear_reward([0.0, 1.0])}
    return ideal_family(base, rewards, 0.5, scheduler)


def stochastic_ddim():
    return make_scheduler("ddim", steps_offset=1, set_alpha_to_one=False)


def test_parsing_and_evaluation():
    schedule = PreferenceSchedule.parse("a=0.8:0.2,b=0.2:0.8", "1")
    assert isinstance(schedule, PreferenceSchedule)
    assert schedule.at(0.0).weights == {"a": 0.8, "b": 0.2} and schedule.at(1.0).weights == {"a": 0.2, "b": 0.8}
    assert schedule.at(0.5).weights == pytest.approx({"a": 0.5, "b": 0.5})
    switch = PreferenceSchedule.parse("a=1@0:1@0.5:0@0.5:0@1,b=0@0:0@0.5:1@0.5:1@1")
    assert switch.at(0.4999).weights == {"a": 1.0, "b": 0.0} and switch.at(0.5).weights == {"a": 0.0, "b": 1.0}
    assert isinstance(PreferenceSchedule.parse("a=0.3,b=0.7", "1.2"), Preference)  # constant: the plain preference
    assert isinstance(PreferenceSchedule.parse("a=0.5:0.5", "1:2"), PreferenceSchedule)  # lambda scheduled
    for bad in ("a=0.8:", "a=1@0:0.5", "a=1@0.6:0@0.5", "a=1@2", "a=0.1:0.2:0.3", "a=x:1", "a=0.5,a=0.5"):
        with pytest.raises(PreferenceError):
            PreferenceSchedule.parse(bad)
    with pytest.raises(PreferenceError, match=">= 0"):
        PreferenceSchedule.parse("a=1", "1:-1")


def test_a_constant_schedule_is_the_plain_blend_bitwise():
    scheduler = stochastic_ddim()
    family = mixture_family(scheduler)
    plain = sample(BlendedDenoiser(family, Preference({"a": 0.3, "b": 0.7}, 1.2)), scheduler, generator=3,
                   shape=(64, 2), num_inference_steps=STEPS, eta=1.0, progress=False).samples
    schedule = PreferenceSchedule({"a": ((0.0, 0.3), (1.0, 0.3)), "b": ((0.0, 0.7), (0.4, 0.7), (1.0, 0.7))},
                                  ((0.0, 1.2), (1.0, 1.2)))
    scheduled = sample(BlendedDenoiser(family, schedule, timestep_progress(scheduler)), scheduler, generator=3,
                       shape=(64, 2), num_inference_steps=STEPS, eta=1.0, progress=False).samples
    assert torch.equal(plain, scheduled)


@pytest.mark.parametrize("k", [1, 4, 9])
def test_a_one_hot_switch_at_step_k_is_expert_a_then_expert_b(k):
    scheduler = stochastic_ddim()
    family = mixture_family(scheduler)
    position = (step_progress(k - 1, STEPS) + step_progress(k, STEPS)) / 2  # between step k-1 and step k
    schedule = PreferenceSchedule({"a": ((0.0, 1.0), (position, 1.0), (position, 0.0), (1.0, 0.0)),
                                   "b": ((0.0, 0.0), (position, 0.0), (position, 1.0), (1.0, 1.0))})
    ours = sample(BlendedDenoiser(family, schedule, timestep_progress(scheduler)), scheduler, generator=5,
                  shape=(32, 2), num_inference_steps=STEPS, eta=1.0, progress=False).samples
    reference = stochastic_ddim()  # a hand-written loop: expert a's prediction for k steps, then expert b's
    reference.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn((32, 2), generator=generator) * reference.init_noise_sigma
    for index, t in enumerate(reference.timesteps):
        expert = family.member("a" if index < k else "b")
        x = reference.step(expert(x, t), t, x, eta=1.0, generator=generator).prev_sample
    assert torch.allclose(ours, x, atol=1e-6, rtol=0), (ours - x).abs().max()


def test_ls_draws_each_step_with_that_steps_probabilities():
    scheduler = stochastic_ddim()
    family = mixture_family(scheduler)
    schedule = PreferenceSchedule({"a": ((0.0, 1.0), (1.0, 0.0)), "b": ((0.0, 0.0), (1.0, 1.0))})
    switching = SwitchingDenoiser(family, schedule, generator=7, progress=timestep_progress(scheduler))
    scheduler.set_timesteps(STEPS)
    rows = 4000
    for index, t in enumerate(scheduler.timesteps):
        before = switching.selection_counts.clone()
        switching(torch.zeros(rows, 2), t)
        drawn = switching.selection_counts - before
        p_a = 1.0 - step_progress(index, STEPS)
        freq_a = float(drawn[switching.members.index("a")]) / rows
        assert abs(freq_a - p_a) <= 4 * (p_a * (1 - p_a) / rows) ** 0.5 + 1e-12, (index, freq_a, p_a)
        assert int(drawn[switching.members.index(BASE)]) == 0
    with pytest.raises(PreferenceError, match="non-negative"):  # LS refuses a negative coefficient at any step
        SwitchingDenoiser(family, PreferenceSchedule({"a": ((0.0, 1.0), (1.0, 1.0))}, ((0.0, 1.0), (1.0, 1.5))),
                          generator=1, progress=timestep_progress(scheduler))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    from diffusion_blend.pipelines.tiny import save_pipeline, tiny_sd_pipeline, write_adapters

    root = tmp_path_factory.mktemp("schedules")
    base = save_pipeline(tiny_sd_pipeline(root / "t", seed=0), root / "base")
    write_adapters(StableDiffusionPipeline, base, root, {"a": 1, "b": 2})
    return root


def test_the_pipeline_switch_equals_stock_diffusers_switching_adapters_in_a_callback(tiny):
    """The stock pipeline with expert a active, switched to expert b by ``callback_on_step_end`` after step k-1: the
    blend pipeline with a one-hot schedule switching at step k gives the same images."""
    from diffusers import StableDiffusionPipeline

    from diffusion_blend.pipelines import BlendStableDiffusionPipeline

    steps, k = 4, 2
    position = (step_progress(k - 1, steps) + step_progress(k, steps)) / 2
    schedule = PreferenceSchedule({"a": ((0.0, 1.0), (position, 1.0), (position, 0.0), (1.0, 0.0)),
                                   "b": ((0.0, 0.0), (position, 0.0), (position, 1.0), (1.0, 1.0))})
    call = dict(num_inference_steps=steps, eta=1.0, output_type="np")
    ours = BlendStableDiffusionPipeline.from_pretrained(tiny / "base", safety_checker=None)
    ours.load_adapters({"a": tiny / "a.safetensors", "b": tiny / "b.safetensors"})
    ours.set_progress_bar_config(disable=True)
    mine = ours("a cat", preference=schedule, generator=torch.Generator().manual_seed(0), **call).images
    stock = StableDiffusionPipeline.from_pretrained(tiny / "base", safety_checker=None)
    for name in ("a", "b"):
        stock.load_lora_weights(tiny / f"{name}.safetensors", adapter_name=name)
    stock.set_adapters(["a"])
    stock.set_progress_bar_config(disable=True)

    def switch(pipe, step, timestep, tensors):
        if step == k - 1:
            pipe.set_adapters(["b"])
        return tensors

    theirs = stock("a cat", generator=torch.Generator().manual_seed(0), callback_on_step_end=switch, **call).images
    assert abs(mine - theirs).max() < 1e-5


def test_sample_takes_a_schedule_and_refuses_bad_ones_in_one_line(tiny, tmp_path, capsys):
    common = ["sample", "--base", str(tiny / "base"), "--adapter", f"a={tiny / 'a.safetensors'}", "--adapter",
              f"b={tiny / 'b.safetensors'}", "--prompt", "x", "--steps", "3"]
    assert main([*common, "--weights", "a=0.8:0.2,b=0.2:0.8", "--method", "ls", "--out", str(tmp_path / "s")]) == 0
    settings = json.loads((tmp_path / "s" / "settings.json").read_text())
    assert settings["schedule"]["weights"].startswith("a=0.8@0:0.2@1,b=0.2@0:0.8@1")
    assert (tmp_path / "s" / "image_000.png").is_file()
    capsys.readouterr()
    for weights, extra, fragment in (("a=0.8:,b=0.2", [], "cannot parse"),
                                     ("a=0.8:0.2,b=0.2:0.8", ["--method", "smc"], "fixed preference"),
                                     ("a=1:0,b=0:1,c=1", [], "no expert named 'c'")):
        assert main([*common, "--weights", weights, *extra, "--out", str(tmp_path / "bad")]) == 2, weights
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("dblend: error:") and fragment in err[0], err
