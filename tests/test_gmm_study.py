"""The Gaussian-mixture study: path KL against known zeros and trends, and the `dblend gmm-study` command."""

from __future__ import annotations

import csv
import math

import matplotlib.image
import pytest
import torch

from diffusion_blend import cli
from diffusion_blend.preference import Preference
from diffusion_blend.sampling import make_scheduler
from diffusion_blend.testbeds.gmm import GaussianMixture, QuadraticForm
from diffusion_blend.testbeds.gmm.study import path_kl, study_cases, study_testbed

SCHEDULER = make_scheduler("ddim")


@pytest.mark.parametrize(
    "weights,kl_scale", [({"r1": 0.5, "r2": 0.5}, 1.0), ({"r1": 1.0}, 2.0), ({"r1": 1.5, "r2": -0.5}, 0.7)]
)
def test_path_kl_vanishes_for_single_gaussian_and_linear_rewards(weights: dict, kl_scale: float) -> None:
    base = GaussianMixture([1.0], [[0.3, -0.2]], [[[0.7, 0.25], [0.25, 0.5]]])
    rewards = {"r1": QuadraticForm.linear_reward([1.0, 0.5]), "r2": QuadraticForm.linear_reward([-1.0, 1.0])}
    kl = path_kl(base, rewards, Preference(weights, kl_scale), 0.2, SCHEDULER, 8, torch.Generator().manual_seed(0))
    assert 0.0 <= kl.value < 1e-6


def test_path_kl_is_positive_on_a_mixture_and_shrinks_as_alpha_grows() -> None:
    base, rewards = study_testbed()
    preference = Preference({"right": 0.5, "corner": 0.5}, 1.0)
    estimates = [
        path_kl(base, rewards, preference, alpha, SCHEDULER, 16, torch.Generator().manual_seed(1))
        for alpha in (0.3, 1.0, 3.0, 10.0)
    ]
    for estimate in estimates:
        assert estimate.value > 5 * estimate.standard_error > 0
    for larger_alpha, smaller_alpha in zip(estimates[1:], estimates[:-1]):
        gap = math.hypot(larger_alpha.standard_error, smaller_alpha.standard_error)
        assert larger_alpha.value < smaller_alpha.value - 3 * gap


def test_path_kl_is_zero_when_the_blend_is_a_single_exact_member() -> None:
    base, rewards = study_testbed()
    for preference in (Preference({"right": 1.0, "corner": 0.0}, 1.0), Preference.kl_only("corner", 0.0)):
        kl = path_kl(base, rewards, preference, 0.5, SCHEDULER, 8, torch.Generator().manual_seed(2))
        assert kl.value < 1e-12


def test_study_cases_cover_the_requested_grid() -> None:
    cases = study_cases()
    mpa = sorted(c.weight for c in cases if c.sweep == "DB-MPA")
    kla = sorted(c.preference.kl_scale for c in cases if c.sweep == "DB-KLA")
    assert mpa == [0.0, 0.25, 0.5, 0.75, 1.0] and kla == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert any(c.sweep == "MPA+KLA" for c in cases)


def test_quick_command_writes_parsable_outputs(tmp_path, capsys) -> None:
    out = tmp_path / "study"
    assert cli.main(["gmm-study", "--out", str(out), "--quick", "--seed", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    with open(out / "gmm_study.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 3 * len(study_cases())
    values = [float(row["path_kl"]) for row in rows]
    assert all(math.isfinite(value) and value >= 0 for value in values)
    assert {float(row["alpha"]) for row in rows} == {0.1, 1.0, 10.0}
    # the exact-member cases have no gap; the others do
    exact_rows = [row for row in rows if row["sweep"] == "DB-MPA" and float(row["w_right"]) in (0.0, 1.0)]
    assert all(float(row["path_kl"]) < 1e-12 for row in exact_rows)
    assert any(float(row["path_kl"]) > 0.01 for row in rows)
    image = matplotlib.image.imread(out / "gmm_study.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    markdown = (out / "gmm_study.md").read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 * (len(study_cases()) + 2)
    assert all(line.count("|") == table_lines[0].count("|") for line in table_lines[: len(study_cases()) + 2])
    assert "dblend gmm-study" in markdown and table_lines[0] in printed


@pytest.mark.parametrize(
    "arguments,message",
    [(["--seed", "-1"], "--seed"), (["--out", "FILE"], "not a folder")],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, arguments: list[str], message: str) -> None:
    existing_file = tmp_path / "a_file"
    existing_file.write_text("x")
    arguments = [str(existing_file) if a == "FILE" else a for a in arguments]
    if "--out" not in arguments:
        arguments = ["--out", str(tmp_path / "out"), *arguments]
    assert cli.main(["gmm-study", "--quick", *arguments]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and message in stderr
    assert not (tmp_path / "out").exists()
