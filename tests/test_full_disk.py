"""A full disk: every writer (sample, finetune, evaluate, demo, tiny-base) pointed at a small tmpfs the test mounts and
fills. Each ends with one line on stderr and exit status 2, leaves no partial file, and the earlier results on that
filesystem stay byte for byte as they were and still load; with space freed, the run goes on from what it had
finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diffusion_blend.adapters import read_adapter
from diffusion_blend.cli import main
from faults import assert_published_files_whole, fill, partial_files, small_filesystem


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def run_out_of_space(argv: list[str], capsys, volume: Path) -> str:
    """``dblend argv`` on the full ``volume``: exit 2, one line naming the full disk (after what the command said
    while it ran, e.g. the demo's log), no traceback, no temporary file left."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("dblend: error: no space left on the device"), lines
    assert "Traceback" not in err and sum(line.startswith("dblend:") for line in lines) == 1
    assert partial_files(volume) == []
    assert_published_files_whole(volume)
    return lines[-1]


@pytest.fixture
def volume(tmp_path):
    with small_filesystem(tmp_path / "volume", size="4m") as path:
        yield path


def test_finetune_on_a_full_disk_keeps_the_last_checkpoint_and_resumes(volume, capsys):
    """The disk fills between two checkpoints: the first stays whole, and with space freed the run resumes from it."""
    flags = ["finetune", "--kind", "digits", "--rewards", "ink=1", "--alpha", "0.1", "--iterations", "3",
             "--batch-size", "8", "--steps", "5", "--checkpoint-every", "1", "--no-progress", "--device", "cpu"]
    assert main([*flags, "--out", str(volume / "earlier")]) == 0
    earlier = snapshot(volume / "earlier")
    checkpoint_size = len(earlier["checkpoint.safetensors"])
    filler = fill(volume, leave_bytes=checkpoint_size * 3 // 2)  # room for one checkpoint, not for two
    line = run_out_of_space([*flags, "--out", str(volume / "run")], capsys, volume)
    assert "checkpoint.safetensors" in line
    assert snapshot(volume / "earlier") == earlier
    read_adapter(volume / "earlier" / "adapter.safetensors")
    from safetensors import safe_open

    with safe_open(str(volume / "run" / "checkpoint.safetensors"), framework="pt") as handle:
        assert handle.metadata()["iteration"] == "1"  # the one written before the disk filled, whole
    filler.unlink()
    assert main([*flags, "--out", str(volume / "run")]) == 0
    assert len(json.loads((volume / "run" / "log.json").read_text())["curves"]) == 3


def test_evaluate_on_a_full_disk_keeps_finished_cells(volume, capsys):
    flags = ["evaluate", "--setting", "gmm", "--methods", "base,mpa", "--grid", "3", "--samples-per-seed", "16",
             "--oracle-samples", "64", "--steps", "5", "--no-progress", "--out", str(volume / "sweep")]
    assert main([*flags, "--seeds", "0"]) == 0
    earlier = snapshot(volume / "sweep")
    filler = fill(volume, leave_bytes=12_000)  # a few cells' room
    run_out_of_space([*flags, "--seeds", "0,1,2"], capsys, volume)
    now = snapshot(volume / "sweep")
    assert {name: now[name] for name in earlier} == earlier  # the earlier cells and report, untouched
    json.loads((volume / "sweep" / "results.json").read_text())
    finished = len(list((volume / "sweep" / "cells").rglob("*.json")))
    filler.unlink()
    capsys.readouterr()
    assert main([*flags, "--seeds", "0,1,2"]) == 0
    assert f"{12 - finished} cell(s) computed" in capsys.readouterr().out  # 3 seeds x (1 base + 3 mpa)


def test_sample_on_a_full_disk_keeps_earlier_images(tiny_sd_base, volume, capsys):
    files = tiny_sd_base
    argv = ["sample", "--base", str(files["base"]), "--adapter", f"brightness={files['brightness']}", "--adapter",
            f"saturation={files['saturation']}", "--weights", "brightness=0.3,saturation=0.7", "--prompt", "a red car",
            "--num-images", "3", "--steps", "2", "--resolution", "16", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(volume / "earlier")]) == 0
    earlier = snapshot(volume / "earlier")
    fill(volume, leave_bytes=6_000)  # room for about one image
    run_out_of_space([*argv, "--out", str(volume / "now")], capsys, volume)
    assert snapshot(volume / "earlier") == earlier
    assert not (volume / "now" / "settings.json").exists()


def test_demo_on_a_full_disk_keeps_its_experts(quick_demo, volume, capsys):
    reference = quick_demo[0]
    shutil.copytree(reference / "adapters", volume / "demo" / "adapters",
                    ignore=shutil.ignore_patterns(".train-*"))
    earlier = snapshot(volume / "demo")
    fill(volume, leave_bytes=60_000)
    run_out_of_space(["demo", "--quick", "--quiet", "--out", str(volume / "demo")], capsys, volume)
    now = snapshot(volume / "demo")
    assert {name: now[name] for name in earlier} == earlier  # the cached experts were neither retrained nor touched
    for path in (volume / "demo" / "adapters").glob("*.safetensors"):
        read_adapter(path)


def test_tiny_base_on_a_full_disk_leaves_no_half_written_base(volume, capsys):
    assert main(["tiny-base", "--out", str(volume / "earlier")]) == 0
    earlier = snapshot(volume / "earlier")
    fill(volume, leave_bytes=200_000)  # less than a tiny base
    run_out_of_space(["tiny-base", "--out", str(volume / "now")], capsys, volume)
    assert not (volume / "now" / "base").exists() and not list((volume / "now").glob("_*"))
    assert snapshot(volume / "earlier") == earlier
    load_file(str(volume / "earlier" / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
