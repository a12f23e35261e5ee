"""Corrupt inputs beyond the bad-input table: truncated and zero-byte safetensors (adapters of both formats,
checkpoints, the digits assets), LoRA weights with NaN or inf (refused before sampling, naming the tensor), a
checkpoint of another recipe (refused, not resumed), a results cell edited by hand (found by its checksum and computed
again).
Each ends in one line: ``dblend: error: ...`` with exit status 2 from the CLI, a ``DiffusionBlendError`` below it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_blend.cli import main
from diffusion_blend.errors import DiffusionBlendError

DAMAGES = {"truncated": lambda data: data[: len(data) // 2], "zero-byte": lambda data: b"",
           "header only": lambda data: data[: 8 + int.from_bytes(data[:8], "little")]}


def damaged_copy(source: Path, target: Path, damage: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(DAMAGES[damage](Path(source).read_bytes()))
    return target


def one_line_error(argv: list[str], capsys) -> str:
    """``dblend argv`` ends with exit status 2 and one line on stderr; returns it."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dblend: error: "), lines
    return lines[0]


def sample_argv(files: dict[str, Path], out: Path, brightness: Path | None = None) -> list[str]:
    return ["sample", "--base", str(files["base"]), "--adapter", f"brightness={brightness or files['brightness']}",
            "--adapter", f"saturation={files['saturation']}", "--weights", "brightness=0.5,saturation=0.5",
            "--prompt", "a red car", "--steps", "2", "--resolution", "16", "--device", "cpu", "--no-progress",
            "--out", str(out)]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_diffusers_lora_is_one_line_before_any_sampling(tiny_sd_base, tmp_path, capsys, damage):
    bad = damaged_copy(tiny_sd_base["brightness"], tmp_path / "brightness.safetensors", damage)
    line = one_line_error(sample_argv(tiny_sd_base, tmp_path / "out", bad), capsys)
    assert str(bad) in line and ("corrupt" in line or "cannot read" in line)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def digits_adapter(tmp_path_factory):
    """One of our adapters on the committed digits base (random LoRA weights)."""
    from diffusion_blend.adapters import save_adapter
    from diffusion_blend.lora import add_lora
    from diffusion_blend.testbeds.digits.model import lora_target_modules
    from diffusion_blend.testbeds.digits.train import load_default_digits_model

    model = load_default_digits_model(progress=False)
    torch.manual_seed(0)
    add_lora(model, "ink", rank=2, target_modules=list(lora_target_modules()))
    return save_adapter(model, "ink", tmp_path_factory.mktemp("adapter") / "ink.safetensors", rewards={"ink": 1.0},
                        alpha=0.1)


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_adapter_of_ours_is_one_line(digits_adapter, tmp_path, capsys, damage):
    from diffusion_blend.adapters import load_adapter
    from diffusion_blend.testbeds.digits.train import load_default_digits_model

    bad = damaged_copy(digits_adapter, tmp_path / "ink.safetensors", damage)
    with pytest.raises(DiffusionBlendError, match="corrupt"):
        load_adapter(load_default_digits_model(progress=False), bad, "ink")
    assert str(bad) in one_line_error(["inspect", str(bad)], capsys)


def nan_copy(source: Path, target: Path, value: float) -> tuple[Path, str]:
    """``source`` with one element of its first ``lora_B`` tensor set to ``value``, header kept; the tensor's name."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(source))
    name = sorted(key for key in tensors if "lora_B" in key)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(target), metadata=metadata)
    return target, name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_lora_with_nan_or_inf_is_refused_before_sampling_naming_the_tensor(tiny_sd_base, digits_adapter, tmp_path,
                                                                          capsys, value, monkeypatch):
    from diffusion_blend.adapters import load_adapter
    from diffusion_blend.pipelines.session import BlendSession
    from diffusion_blend.testbeds.digits.train import load_default_digits_model

    sampled = []
    monkeypatch.setattr(BlendSession, "generate", lambda *args, **kwargs: sampled.append(1))
    bad, name = nan_copy(tiny_sd_base["brightness"], tmp_path / "brightness.safetensors", value)
    line = one_line_error(sample_argv(tiny_sd_base, tmp_path / "out", bad), capsys)
    assert name in line and "NaN" in line and not sampled and not (tmp_path / "out").exists()
    ours, name = nan_copy(digits_adapter, tmp_path / "ink.safetensors", value)
    with pytest.raises(DiffusionBlendError, match=rf"{name}.*NaN or infinite"):
        load_adapter(load_default_digits_model(progress=False), ours, "ink")


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_checkpoint_is_one_line_and_no_resume_starts_over(tmp_path, capsys, damage):
    flags = ["finetune", "--kind", "digits", "--rewards", "ink=1", "--alpha", "0.1", "--iterations", "1",
             "--batch-size", "4", "--steps", "3", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "run")]
    assert main(flags) == 0
    checkpoint = tmp_path / "run" / "checkpoint.safetensors"
    checkpoint.write_bytes(DAMAGES[damage](checkpoint.read_bytes()))
    (tmp_path / "run" / "adapter.safetensors").unlink()
    line = one_line_error(flags, capsys)
    assert "checkpoint" in line and "corrupt" in line and "--no-resume" in line
    assert main([*flags, "--no-resume"]) == 0
    load_file(str(checkpoint))


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("asset", ["denoiser", "classifier"])
def test_damaged_digits_assets_are_one_line(tmp_path, capsys, monkeypatch, damage, asset):
    from diffusion_blend.testbeds.digits import classifier, train

    source = {"denoiser": train.ASSET_DIR, "classifier": classifier.ASSET_DIR}[asset]
    copy = tmp_path / asset
    shutil.copytree(source, copy)
    damaged_copy(source / "model.safetensors", copy / "model.safetensors", damage)
    load = {"denoiser": train.load_default_digits_model, "classifier": classifier.load_classifier}[asset]
    with pytest.raises(DiffusionBlendError, match="corrupt or truncated"):
        load(copy)
    if asset == "denoiser":  # through the command line: the committed base's folder points at the damaged copy
        monkeypatch.setattr(train, "ASSET_DIR", copy)
        line = one_line_error(["finetune", "--kind", "digits", "--rewards", "ink=1", "--alpha", "0.1", "--iterations",
                               "1", "--no-progress", "--out", str(tmp_path / "run")], capsys)
        assert "model.safetensors is corrupt or truncated" in line


def test_checkpoint_of_another_recipe_is_refused_not_resumed(tmp_path):
    """Same config, same adapter layout: only the base weights (or the target) differ. Resuming would continue another
    model's fine-tuning; the checkpoint's recipe says so before anything is restored."""
    from diffusion_blend.testbeds.gmm.distributed_run import tiny_config, tiny_target
    from diffusion_blend.training.dpok import TrainingInterrupted, finetune

    config = tiny_config(iterations=3, checkpoint_every=1)
    with pytest.raises(TrainingInterrupted):
        finetune(tiny_target(seed=0), config, out_dir=tmp_path, progress=False, stop_after=1)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    with pytest.raises(DiffusionBlendError, match="another base model"):
        finetune(tiny_target(seed=1), config, out_dir=tmp_path, progress=False)
    other = tiny_target(seed=0)
    other.name = "another-target"
    with pytest.raises(DiffusionBlendError, match="while fine-tuning 'tiny-mlp', not 'another-target'"):
        finetune(other, config, out_dir=tmp_path, progress=False)
    with pytest.raises(DiffusionBlendError, match=r"another config \(it differs in alpha\)"):
        finetune(tiny_target(seed=0), tiny_config(iterations=3, checkpoint_every=1, alpha=2.0), out_dir=tmp_path,
                 progress=False)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before  # refused, nothing written
    assert finetune(tiny_target(seed=0), config, out_dir=tmp_path, progress=False).curves[0]["iteration"] == 1


def test_cell_edited_by_hand_is_found_by_its_checksum_and_computed_again(tmp_path, capsys):
    argv = ["evaluate", "--setting", "gmm", "--methods", "base,mpa", "--grid", "2", "--seeds", "0",
            "--samples-per-seed", "16", "--oracle-samples", "64", "--steps", "5", "--no-progress",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    cell = sorted((tmp_path / "cells" / "mpa").glob("*.json"))[0]
    original = cell.read_text()
    record = json.loads(original)
    name = sorted(record["rewards"])[0]
    record["rewards"][name][0] += 1.0  # a better score, typed in; the fingerprint field is left as it was
    cell.write_text(json.dumps(record, sort_keys=True, indent=1))
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"cell {cell} does not match its checksum" in captured.err
    assert "1 cell(s) computed" in captured.out
    assert json.loads(cell.read_text())["rewards"] == json.loads(original)["rewards"]  # computed again, as it was
    again = json.loads((tmp_path / "results.json").read_text())
    assert _without_times(again["rows"]) == _without_times(results["rows"])


def _without_times(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if "wall_time" not in key} for row in rows]
