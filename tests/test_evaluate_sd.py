"""``dblend evaluate --setting sd`` on a tiny SD pipeline built from config, with two tiny experts fine-tuned here.

Independent truths: the stock diffusers pipeline (its own CFG batch, DDIM step, LoRA loader) for the base and the
one-hot DB-MPA cells; a brute-force hypervolume (coordinate-compressed grid) and hand-computed win rates and IS
weights on the written numbers; a rerun with the UNet and VAE forwards made to fail (nothing is recomputed).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open

from diffusion_blend.adapters import atomic_save_safetensors
from diffusion_blend.cli import main
from diffusion_blend.pipelines.lora_files import DIFFUSERS_LORA_NAME, export_run_adapter
from diffusion_blend.pipelines.sd_target import sd_finetune_target
from diffusion_blend.pipelines.tiny import tiny_sd_pipeline
from diffusion_blend.rewards import get_reward
from diffusion_blend.training.config import DPOKConfig
from diffusion_blend.training.dpok import finetune

STEPS, GUIDANCE, ALPHA = 3, 3.0, 0.5
PROMPTS = ["a cat", "a red house"]
REWARDS = ("brightness", "saturation")
WEIGHTS = "brightness=1,saturation=0;brightness=0.5,saturation=0.5;brightness=0,saturation=1"
METHODS = ["base", "mpa", "ls", "rs-factors", "rs-deltas", "code", "rgg", "is-oracle", "morl", "smc"]


def _expert(root: Path, name: str, weights: dict[str, float], seed: int) -> Path:
    """One quick DPOK run on the saved tiny base (fresh pipeline per run), exported as a diffusers LoRA folder."""
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(root / "base", safety_checker=None, requires_safety_checker=False)
    target = sd_finetune_target(pipe, PROMPTS, {n: get_reward(n) for n in weights}, guidance_scale=GUIDANCE)
    config = DPOKConfig(reward_weights=weights, alpha=ALPHA, iterations=1, batch_size=2, minibatch_size=2,
                        updates_per_batch=1, learning_rate=5e-2, lora_rank=2, num_inference_steps=STEPS)
    result = finetune(target, config, out_dir=root / name, progress=False)
    export_run_adapter(result.model, result.adapter_name, root / name, result.adapter_path)
    return root / name / DIFFUSERS_LORA_NAME


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # before the module fixture trains (conftest's per-test fixture comes after it)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def experts(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("eval_sd")
    tiny_sd_pipeline(root).save_pretrained(root / "base")
    files = {name: _expert(root, name, {name: 1.0}, seed) for seed, name in enumerate(REWARDS)}
    files["morl"] = _expert(root, "morl", {"brightness": 0.5, "saturation": 0.5}, 7)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root, files


def _argv(root, files, out, *extra, brightness=None, saturation=None):
    return ["evaluate", "--setting", "sd", "--base", str(root / "base"), "--prompts", str(root / "prompts.txt"),
            "--adapter", f"brightness={brightness or files['brightness']}",
            "--adapter", f"saturation={saturation or files['saturation']}", "--steps", str(STEPS), "--guidance-scale",
            str(GUIDANCE), "--seeds", "0,1", "--code-candidates", "2", "--code-block-size", "1", "--particles", "2",
            "--device", "cpu", "--no-progress", "--out", str(out), *extra]


def _stock_images(root, seed, adapter=None):
    """The stock diffusers pipeline (DDIM eta = 1, same guidance) on the cell's two prompts from ``seed``."""
    pipe = StableDiffusionPipeline.from_pretrained(root / "base", safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipe.load_lora_weights(adapter, adapter_name="expert")
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=1.0, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def _brute_force_hypervolume(points, reference):
    """Area of the union of the boxes [reference, p] on the grid of all coordinates (no sweep, no sorting tricks)."""
    xs = sorted({reference[0], *[p[0] for p in points]})
    ys = sorted({reference[1], *[p[1] for p in points]})
    area = 0.0
    for x0, x1 in zip(xs, xs[1:]):
        for y0, y1 in zip(ys, ys[1:]):
            if any(p[0] >= x1 and p[1] >= y1 for p in points):
                area += (x1 - x0) * (y1 - y0)
    return area


def _cells(out):
    return {(path.parent.name, path.stem): json.loads(path.read_text()) for path in (out / "cells").rglob("*.json")}


def test_sd_sweep_full_table_fronts_report_and_a_rerun_recomputes_nothing(experts, tmp_path, capsys, monkeypatch):
    root, files = experts
    out = tmp_path / "eval"
    argv = _argv(root, files, out, "--methods", ",".join(METHODS), "--weights", WEIGHTS, "--kl-scales", "0,1",
                 "--morl", f"0.5={files['morl']}", "--preview-images", "2")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"experts' alpha: brightness {ALPHA:g}, saturation {ALPHA:g}" in printed  # from the metadata

    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    table = {(r["method"], float(r["w_brightness"]), float(r["kl_scale"])) for r in rows}
    grid = [(b, k) for k in (0.0, 1.0) for b in (1.0, 0.5, 0.0)]
    for method in METHODS:
        expected = {(method, b, k) for b, k in grid if method != "morl" or (b, k) == (0.5, 1.0)}
        assert expected <= table, method  # every method x preference (MORL: where an adapter was given)
    assert len(rows) == (len(METHODS) - 1) * 6 + 1  # 6 preferences for every method but MORL (one adapter)
    result = json.loads((out / "results.json").read_text())
    cells = _cells(out)
    assert result["cells_run"] == len(cells) == 2 + (len(METHODS) - 3) * 6 * 2 + 1 * 2  # oracle: no cells

    # independent truth 1: the base cell and the one-hot DB-MPA cell are the stock pipeline's images
    brightness, saturation = get_reward("brightness"), get_reward("saturation")
    for seed in (0, 1):
        base_cell = next(c for (m, k), c in cells.items() if m == "base" and c["seed"] == seed)
        stock = _stock_images(root, seed)
        assert np.allclose(base_cell["rewards"]["brightness"], brightness(stock).tolist(), atol=1e-4)
        one_hot = next(c for (m, k), c in cells.items() if m == "mpa" and c["seed"] == seed
                       and c["weights"]["brightness"] == 1.0 and c["kl_scale"] == 1.0)
        stock_expert = _stock_images(root, seed, files["brightness"])
        assert np.allclose(one_hot["rewards"]["brightness"], brightness(stock_expert).tolist(), atol=1e-4)
        assert np.allclose(one_hot["rewards"]["saturation"], saturation(stock_expert).tolist(), atol=1e-4)
        assert not np.allclose(one_hot["rewards"]["brightness"], base_cell["rewards"]["brightness"], atol=1e-4)
        # lambda = 0 is the base model for every weight (DB-KLA with c_0 = 1)
        for (m, _k), c in cells.items():
            if m in ("mpa", "ls", "rs-factors", "rs-deltas", "rgg") and c["kl_scale"] == 0.0 and c["seed"] == seed:
                assert np.allclose(c["rewards"]["brightness"], base_cell["rewards"]["brightness"], atol=1e-5), m
        # one-hot Rewarded Soup (both variants) is the expert itself
        for variant in ("rs-factors", "rs-deltas"):
            soup = next(c for (m, k), c in cells.items() if m == variant and c["seed"] == seed
                        and c["weights"]["brightness"] == 1.0 and c["kl_scale"] == 1.0)
            assert np.allclose(soup["rewards"]["brightness"], one_hot["rewards"]["brightness"], atol=1e-4)

    # independent truth 2: hypervolumes against a brute-force union of boxes on the written means
    reference = result["reference_point"]
    for method, front in result["fronts"].items():
        points = [(float(r["mean_brightness"]), float(r["mean_saturation"])) for r in rows if r["method"] == method]
        assert math.isclose(front["hypervolume"], _brute_force_hypervolume(points, reference), rel_tol=1e-9,
                            abs_tol=1e-15), method

    # independent truth 3: a win rate and the IS oracle recomputed by hand from the cells
    row = next(r for r in result["rows"] if r["method"] == "mpa" and r["weights"]["brightness"] == 0.5
               and r["kl_scale"] == 1.0)
    wins = []
    for seed in (0, 1):
        ours = next(c for (m, k), c in cells.items() if m == "mpa" and c["seed"] == seed
                    and c["weights"]["brightness"] == 0.5 and c["kl_scale"] == 1.0)["rewards"]
        theirs = next(c for (m, k), c in cells.items() if m == "base" and c["seed"] == seed)["rewards"]
        for i in range(len(PROMPTS)):
            a = 0.5 * ours["brightness"][i] + 0.5 * ours["saturation"][i]
            b = 0.5 * theirs["brightness"][i] + 0.5 * theirs["saturation"][i]
            wins.append(1.0 if a > b else 0.5 if a == b else 0.0)
    assert row["win_rate"] == pytest.approx(np.mean(wins))
    oracle = next(r for r in result["rows"] if r["method"] == "is-oracle" and r["weights"]["brightness"] == 0.5
                  and r["kl_scale"] == 1.0)
    base_cells = sorted((c for (m, k), c in cells.items() if m == "base"), key=lambda c: c["seed"])
    by_prompt = []
    for p in range(len(PROMPTS)):  # row b has prompt b mod P; per prompt, weights exp(lambda r_w / alpha)
        r = {n: np.array([c["rewards"][n][p] for c in base_cells]) for n in REWARDS}
        v = np.exp((0.5 * r["brightness"] + 0.5 * r["saturation"]) / ALPHA)
        by_prompt.append(float((v * r["brightness"]).sum() / v.sum()))
    assert oracle["mean_brightness"] == pytest.approx(np.mean(by_prompt), rel=1e-9)
    zero = next(r for r in result["rows"] if r["method"] == "is-oracle" and r["kl_scale"] == 0.0)
    assert zero["mean_brightness"] == pytest.approx(np.mean([c["rewards"]["brightness"] for c in base_cells]))

    # the report: tables, plots and an image grid of small PNG strips that exist
    page = (out / "report" / "index.html").read_text()
    assert "Image grid" in page and page.count('class="strip"') >= len(cells)
    strips = list((out / "images").rglob("*.png"))
    assert len(strips) == len(cells) and all(path.stat().st_size < 20_000 for path in strips)
    for name in ("fronts.png", "weighted_reward_vs_w.png", "reward_vs_lambda.png"):
        assert (out / "report" / name).stat().st_size > 1000

    # rerun: nothing is recomputed (any UNet or VAE forward fails), same table
    def fail(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(UNet2DConditionModel, "forward", fail)
    monkeypatch.setattr(AutoencoderKL, "decode", fail)
    capsys.readouterr()
    assert main(argv) == 0
    assert "0 cell(s) computed" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == result["rows"] and again["cells_run"] == 0


def _rewrite_metadata(source: Path, path: Path, **changes) -> Path:
    """A copy of a LoRA file whose diffusion-blend metadata has ``changes`` (JSON values)."""
    with safe_open(str(source), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for key, value in changes.items():
        header[f"diffusion_blend.{key}"] = json.dumps(value)
    return atomic_save_safetensors(tensors, path, header)


def _foreign(source: Path, path: Path) -> Path:
    """A copy of a LoRA file without our metadata (as other people's files are)."""
    with safe_open(str(source), framework="pt") as handle:
        header = {k: v for k, v in handle.metadata().items() if not k.startswith("diffusion_blend.")}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return atomic_save_safetensors(tensors, path, header)


def test_sd_refusals_are_one_line(experts, tmp_path, capsys):
    root, files = experts
    foreign = _foreign(files["saturation"], tmp_path / "foreign.safetensors")
    other_base = _rewrite_metadata(files["saturation"], tmp_path / "fp.safetensors", base_fingerprint="0" * 64)
    moved = {name: _rewrite_metadata(files[name], tmp_path / f"moved_{name}.safetensors", base_fingerprint="1" * 64)
             for name in REWARDS}
    out = str(tmp_path / "bad")
    cases = {
        "fine-tuned on another base model": ([], moved),
        "unbounded": (["--reward", "saturation=saturation", "--alpha", "saturation=0"], foreign),
        "different base models": ([], other_base),
        "unknown reward": (["--reward", "saturation=no_such_reward", "--alpha", f"saturation={ALPHA}"], foreign),
        "was fine-tuned on 'saturation', not on": (["--reward", "saturation=brightness"], None),
        "prompts file": (["--prompts", str(tmp_path / "missing.txt")], None),
        "rgg needs differentiable rewards": (["--reward", "saturation=jpeg_compressibility", "--alpha",
                                              f"saturation={ALPHA}", "--methods", "base,rgg"], foreign),
        "two experts serve the same reward": (["--reward", "saturation=brightness", "--alpha", f"saturation={ALPHA}"],
                                              foreign),
        "--morl": (["--methods", "base,morl", "--morl", f"0.3={files['morl']}"], None),
    }
    if not torch.cuda.is_available():
        cases["CUDA is not available"] = (["--device", "cuda"], None)
    for expected, (extra, replaced) in cases.items():
        replaced = replaced if isinstance(replaced, dict) else {"saturation": replaced}
        assert main(_argv(root, files, out, *extra, **replaced)) == 2, expected
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("dblend: error: ") and expected in err[0], (expected, err)


def test_sdxl_sweep_in_chunks_matches_the_stock_sdxl_pipeline(tmp_path, capsys):
    """SDXL base (added conditioning: pooled text embeds, time ids), foreign LoRA files (no metadata: --alpha),
    cells of 4 rows run in network batches of 2: each chunk's rows are the stock SDXL pipeline's images from that
    chunk's generator (:func:`chunk_seed`), for the base and the one-hot DB-MPA blend."""
    from diffusers import StableDiffusionXLPipeline

    from diffusion_blend.evaluation.sweep import chunk_seed
    from diffusion_blend.pipelines.tiny import tiny_sdxl_pipeline, write_adapters

    tiny_sdxl_pipeline(tmp_path).save_pretrained(tmp_path / "base")
    files = write_adapters(StableDiffusionXLPipeline, tmp_path / "base", tmp_path, {"brightness": 1, "saturation": 2})
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    argv = ["evaluate", "--setting", "sd", "--base", str(tmp_path / "base"), "--prompts", str(tmp_path / "prompts.txt"),
            "--reward", "brightness=brightness", "--reward", "saturation=saturation", "--adapter",
            f"brightness={files['brightness']}", "--adapter", f"saturation={files['saturation']}", "--alpha", "1",
            "--methods", "base,mpa,ls", "--weights",
            "brightness=1,saturation=0", "--seeds", "3", "--samples-per-seed", "4", "--batch-size", "2", "--steps",
            str(STEPS), "--guidance-scale", str(GUIDANCE), "--device", "cpu", "--no-progress", "--out",
            str(tmp_path / "out")]
    assert main(argv) == 0
    assert "sdxl base" in capsys.readouterr().out
    cells = _cells(tmp_path / "out")
    base = next(c for (m, _), c in cells.items() if m == "base")["rewards"]["brightness"]
    blend = next(c for (m, _), c in cells.items() if m == "mpa")["rewards"]["brightness"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "base")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    brightness = get_reward("brightness")

    def stock(chunk):
        return brightness(pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=1.0, output_type="pt",
                               generator=torch.Generator().manual_seed(chunk_seed(3, chunk, 2))).images).tolist()

    expected_base = stock(0) + stock(1)
    pipe.load_lora_weights(files["brightness"], adapter_name="expert")
    expected_blend = stock(0) + stock(1)
    assert np.allclose(base, expected_base, rtol=0, atol=2e-6) and np.allclose(blend, expected_blend, rtol=0, atol=2e-6)
    assert (
        np.abs(np.array(base) - blend).max() > 1e-4
    )  # the expert changes the images (measured ~4e-4): teeth  # the expert changes the images: the check has teeth
    assert expected_base[0] != pytest.approx(expected_base[2], abs=1e-6)  # the two chunks draw different noise
    switching = next(c for (m, _), c in cells.items() if m == "ls")["rewards"]["brightness"]
    assert np.allclose(switching, blend, rtol=0, atol=2e-6)  # one expert with weight 1: LS always draws it


@pytest.mark.distributed
def test_two_process_torchrun_splits_sd_cells(experts, tmp_path):
    import os
    import subprocess
    import sys

    root, files = experts
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = _argv(root, files, tmp_path, "--methods", "base,mpa", "--grid", "2", "--seeds", "0,1,2")[1:]
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "diffusion_blend.cli", "evaluate", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = list((tmp_path / "cells").rglob("*.json"))
    assert len(cells) == 3 + 2 * 3
    assert {json.loads(path.read_text())["process_index"] for path in cells} == {0, 1}  # both processes worked
    assert (tmp_path / "report" / "index.html").exists() and done.stdout.count("cell(s) computed") == 1
