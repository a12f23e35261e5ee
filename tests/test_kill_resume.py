"""Kill at any moment, lose nothing: every long ``dblend`` job SIGKILLed at several moments, then run again.

Each job runs once uninterrupted (the reference, in this process) and once as a chain of real ``dblend`` processes
(tests/faults.py), each SIGKILLed at a moment drawn from a seeded generator: while a checkpoint, an adapter, a cell,
an image or a report file is half written (the ``DBLEND_KILL_AT_WRITE`` hook), or after a random time; the next
process resumes. After every kill each published file reads whole; the last process finishes, leaves no temporary
file, and its results equal the reference: the same adapter tensors and curves (bitwise), the same sweep results
with only unfinished cells computed again, the same demo figures, the same images.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from diffusion_blend.cli import main
from faults import KILLED, assert_published_files_whole, dblend, kill_rng, partial_files


def tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(str(path)), metadata


def assert_same_file_contents(ours: Path, reference: Path) -> None:
    """Bitwise the same tensors (names, dtypes, shapes, bytes) and the same metadata."""
    tensors, metadata = tensors_and_metadata(ours)
    expected, expected_metadata = tensors_and_metadata(reference)
    assert tensors.keys() == expected.keys()
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key
    assert metadata == expected_metadata


def timed_reference(argv: list[str]) -> float:
    """Run ``dblend argv`` here, uninterrupted; its wall time (the scale of the random kill times)."""
    started = time.perf_counter()
    assert main(argv) == 0
    return time.perf_counter() - started


def kill_chain(argv: list[str], out: Path, logs: Path, moments: list[dict], finish: bool = True) -> list:
    """Run ``argv`` once per moment, each killed there (a write ``"N:GLOB"`` or a time in seconds), then (``finish``)
    once to its end. After every kill: every published file reads whole. At the end: exit 0 and no temporary file
    left."""
    runs = []
    for index, moment in enumerate(moments):
        run = dblend(argv, logs / f"run{index}.log", **moment)
        if "kill_at_write" in moment:  # the hook fires or the test's count of writes is wrong
            assert run.returncode == KILLED, (moment, run.returncode, run.output[-3000:])
        else:  # a random time may fall after the end
            assert run.returncode in (KILLED, 0), (moment, run.returncode, run.output[-3000:])
        assert "Traceback" not in run.output, run.output[-3000:]
        assert_published_files_whole(out)
        runs.append(run)
    if not finish:
        return runs
    final = dblend(argv, logs / "final.log")
    assert final.returncode == 0, final.output[-3000:]
    assert partial_files(out) == [], "a temporary file of a killed run was left behind"
    runs.append(final)
    return runs


def finetune_argv(kind_flags: list[str], out: Path) -> list[str]:
    return ["finetune", *kind_flags, "--checkpoint-every", "1", "--device", "cpu", "--no-progress", "--out", str(out)]


def check_finetune_chain(name: str, kind_flags: list[str], iterations: int, tmp_path: Path,
                         extra_files: tuple[str, ...] = ()) -> None:
    """Reference run, then kills at a random checkpoint write, a random time and the adapter's write."""
    rng = kill_rng(name)
    seconds = timed_reference(finetune_argv(kind_flags, tmp_path / "reference"))
    first = rng.randint(1, iterations - 1)
    moments = [{"kill_at_write": f"{first}:checkpoint.safetensors"},
               {"kill_after": rng.uniform(0.0, seconds)},
               {"kill_at_write": "1:adapter.safetensors"}]
    out = tmp_path / "killed"
    argv = finetune_argv(kind_flags, out)
    kill_chain(argv, out, tmp_path / "logs", moments[:1], finish=False)
    # the first process died while writing checkpoint `first`: the one in place is the one before (or none)
    checkpoint = out / "checkpoint.safetensors"
    if first == 1:
        assert not checkpoint.exists()
    else:
        assert int(tensors_and_metadata(checkpoint)[1]["iteration"]) == first - 1
    assert not (out / "adapter.safetensors").exists()
    kill_chain(argv, out, tmp_path / "logs-rest", moments[1:])
    for file in ("adapter.safetensors", "checkpoint.safetensors", *extra_files):
        assert_same_file_contents(out / file, tmp_path / "reference" / file)
    log, expected = (json.loads((folder / "log.json").read_text()) for folder in (out, tmp_path / "reference"))
    assert log["curves"] == expected["curves"] and len(log["curves"]) == iterations


def test_finetune_gmm_killed_anywhere_resumes_to_the_same_adapter(tmp_path):
    from diffusion_blend.adapters import atomic_save_safetensors
    from diffusion_blend.testbeds.gmm.model import TimeMLP
    from diffusion_blend.testbeds.gmm.target import GmmBaseSettings

    settings = GmmBaseSettings()  # a seeded random base stands in for the pretrained one (same cache key)
    torch.manual_seed(0)
    model = TimeMLP(dim=2, hidden=settings.hidden, depth=settings.depth, time_embed_dim=settings.time_embed_dim)
    atomic_save_safetensors(model.state_dict(), tmp_path / "cache" / f"gmm-base-{settings.key()}.safetensors", {})
    flags = ["--kind", "gmm", "--rewards", "right=1", "--alpha", "1", "--iterations", "5", "--batch-size", "16",
             "--minibatch-size", "8", "--steps", "5", "--cache-dir", str(tmp_path / "cache")]
    check_finetune_chain("gmm", flags, 5, tmp_path)


def test_finetune_digits_killed_anywhere_resumes_to_the_same_adapter(tmp_path):
    flags = ["--kind", "digits", "--rewards", "ink=1", "--alpha", "0.1", "--iterations", "4", "--batch-size", "8",
             "--minibatch-size", "8", "--steps", "5"]
    check_finetune_chain("digits", flags, 4, tmp_path)


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_base, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("a red car\na blue boat\n")
    return tiny_sd_base, prompts


def test_finetune_tiny_sd_killed_anywhere_resumes_to_the_same_adapter(tiny_sd, tmp_path):
    files, prompts = tiny_sd
    flags = ["--kind", "sd", "--base", str(files["base"]), "--prompts", str(prompts), "--rewards", "brightness=1",
             "--alpha", "0.1", "--iterations", "3", "--batch-size", "2", "--minibatch-size", "2", "--steps", "2",
             "--resolution", "16"]
    check_finetune_chain("sd", flags, 3, tmp_path, extra_files=("pytorch_lora_weights.safetensors",))


def comparable(value):
    """A sweep's or demo's results without what differs between two runs of the same work: wall times, the run's
    own bookkeeping (cells computed, which process ran a cell, which adapters were cached) and absolute paths."""
    skip = ("wall_time", "timings", "cells_run", "process_index", "report", "total_s", "elapsed", "adapter_log")
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items() if not any(part in key for part in skip)}
    if isinstance(value, list):
        return [comparable(item) for item in value]
    return value


def cell_files(out: Path) -> dict[str, int]:
    """Finished cells by path, with their modification time (a cell computed again gets a new one)."""
    return {str(path.relative_to(out)): path.stat().st_mtime_ns for path in sorted((out / "cells").rglob("*.json"))}


def test_evaluate_killed_anywhere_recomputes_only_unfinished_cells(tmp_path):
    rng = kill_rng("evaluate")
    flags = ["--setting", "gmm", "--methods", "base,mpa,ls", "--grid", "3", "--seeds", "0,1", "--samples-per-seed",
             "32", "--oracle-samples", "64", "--steps", "10", "--no-progress"]
    seconds = timed_reference(["evaluate", *flags, "--out", str(tmp_path / "reference")])
    total = len(cell_files(tmp_path / "reference"))  # 2 base + 3 x 2 mpa + 3 x 2 ls
    assert total == 14
    out = tmp_path / "killed"
    argv = ["evaluate", *flags, "--out", str(out)]
    moments = [{"kill_at_write": f"{rng.randint(2, total - 1)}:*_s?.json"},
               {"kill_after": rng.uniform(0.0, seconds)},
               {"kill_at_write": "1:index.html"}]
    logs = tmp_path / "logs"
    for index, moment in enumerate(moments + [{}]):
        before = cell_files(out) if out.exists() else {}
        run = dblend(argv, logs / f"run{index}.log", **moment)
        assert run.returncode in ((KILLED,) if "kill_at_write" in moment else (KILLED, 0)), run.output[-3000:]
        assert_published_files_whole(out)
        after = cell_files(out)
        assert {cell: after[cell] for cell in before} == before  # finished cells were not computed again
        if run.returncode == 0:
            assert f"{total - len(before)} cell(s) computed" in run.output
    assert partial_files(out) == []
    result, expected = (json.loads((folder / "results.json").read_text()) for folder in (out, tmp_path / "reference"))
    assert comparable(result) == comparable(expected)


def test_demo_killed_anywhere_finishes_with_the_same_figures(quick_demo, tmp_path):
    """``dblend demo --quick``: killed while fine-tuning an expert, while writing a cell and at a random time; the
    rerun finishes with the figures of the uninterrupted run (the session's, tests/conftest.py): every check's value,
    every point, every expert's numbers."""
    reference, _, _, seconds = quick_demo
    rng = kill_rng("demo")
    out = tmp_path / "killed"
    moments = [{"kill_at_write": f"{rng.randint(1, 2)}:checkpoint.safetensors"},  # one per expert
               {"kill_at_write": f"{rng.randint(1, 46)}:*_s?.json"},  # of the three sweeps' 46 cells
               {"kill_after": rng.uniform(0.0, seconds)}]
    kill_chain(["demo", "--quick", "--quiet", "--out", str(out)], out, tmp_path / "logs", moments)
    report, expected = out / "report", reference / "report"
    for name in ("checks.csv", "points.csv", "experts.csv"):
        with open(report / name) as ours, open(expected / name) as theirs:
            assert comparable(list(csv.DictReader(ours))) == comparable(list(csv.DictReader(theirs))), name
    summary, figures = (json.loads((folder / "results.json").read_text()) for folder in (report, expected))
    assert comparable(summary) == comparable(figures)


def test_sample_killed_while_writing_leaves_no_partial_image_and_reruns_with_overwrite(tiny_sd, tmp_path):
    files, _ = tiny_sd
    rng = kill_rng("sample")

    def argv(out: Path) -> list[str]:
        return ["sample", "--base", str(files["base"]), "--adapter", f"brightness={files['brightness']}",
                "--adapter", f"saturation={files['saturation']}", "--weights", "brightness=0.3,saturation=0.7",
                "--prompt", "a red car", "--num-images", "3", "--steps", "2", "--resolution", "16", "--device", "cpu",
                "--no-progress", "--out", str(out)]

    seconds = timed_reference(argv(tmp_path / "reference"))
    out = tmp_path / "killed"
    image = rng.randint(1, 3)
    for index, moment in enumerate([{"kill_at_write": f"{image}:image_*.png"}, {"kill_after": rng.uniform(0, seconds)},
                                    {"kill_at_write": "1:settings.json"}]):
        run = dblend(argv(out) + ["--overwrite"], tmp_path / f"run{index}.log", **moment)
        assert run.returncode in ((KILLED,) if "kill_at_write" in moment else (KILLED, 0)), run.output[-3000:]
        assert_published_files_whole(out)  # every image in place decodes whole
        if index == 0:  # killed while writing image `image`: the ones before it are whole, no later file is there
            assert sorted(path.name for path in out.glob("image_*.png")) == [f"image_{k:03d}.png"
                                                                             for k in range(image - 1)]
        if run.returncode == KILLED:
            assert not (out / "settings.json").exists()
    refused = dblend(argv(out), tmp_path / "refused.log")  # results (or some) in place: refused without --overwrite
    assert refused.returncode == 2 and refused.output.strip().splitlines()[-1].startswith("dblend: error: --out")
    final = dblend(argv(out) + ["--overwrite"], tmp_path / "final.log")
    assert final.returncode == 0, final.output[-3000:]
    assert partial_files(out) == []
    for k in range(3):
        with Image.open(out / f"image_{k:03d}.png") as ours, Image.open(tmp_path / "reference" / f"image_{k:03d}.png") \
                as theirs:
            assert ours.tobytes() == theirs.tobytes()
    settings, expected = (json.loads((folder / "settings.json").read_text())
                          for folder in (out, tmp_path / "reference"))
    assert comparable(settings) == comparable(expected)
