"""Evaluation sweep: every output file parses, reruns resume without recomputing, the IS oracle matches the
closed form on the GMM testbed, and a 2-process torchrun splits the cells."""

import csv
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest

from diffusion_blend.cli import main
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.evaluation.oracle import importance_weighted_oracle
from diffusion_blend.evaluation.sweep import (
    Cell,
    CountingFamily,
    SweepConfig,
    cells_of,
    parse_preference_grid,
    run_cell,
    run_sweep,
)
from diffusion_blend.preference import BASE, Preference
from diffusion_blend.sampling import sample
from diffusion_blend.testbeds.gmm.closed_form import expected_rewards, tilted_target
from diffusion_blend.testbeds.gmm.setting import gmm_setting
from diffusion_blend.testbeds.gmm.study import study_testbed

METHODS = ["base", "mpa", "ls", "code", "rgg", "is-oracle", "morl"]


def _config(setting, **overrides):
    values = dict(
        methods=METHODS,
        preferences=parse_preference_grid(list(setting.rewards), None, 2, [1.0]),
        seeds=[0, 1],
        samples_per_seed=8,
        code_candidates=2,
        oracle_samples=500,
    )
    values.update(overrides)
    return SweepConfig(**values)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self.tables += tag == "table"


def test_miniature_sweep_writes_every_file_and_resumes(tmp_path):
    setting = gmm_setting(num_inference_steps=5)
    counting = CountingFamily(setting.family)
    setting.family = counting
    config = _config(setting)
    result = run_sweep(setting, config, tmp_path, progress=False)
    cells = cells_of(setting, config)
    assert result["cells_run"] == len(cells) == 2 + 5 * 2 * 2 + 2  # base per seed, 5 sampled methods, oracle
    first = counting.rows
    assert first > 0
    for cell in cells:
        assert (tmp_path / "cells" / cell.method / f"{cell.key}.json").exists()

    with open(tmp_path / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["method"] for row in rows} == set(METHODS)
    assert len(rows) == 2 * len(METHODS)  # one row per (method, preference)
    mpa = [r for r in rows if r["method"] == "mpa" and float(r["w_right"]) == 1.0][0]
    assert float(mpa["network_evaluations_per_sample"]) == 5  # one expert active: one evaluation per step
    both = json.loads((tmp_path / "results.json").read_text())
    assert set(both["fronts"]) == set(METHODS) and all(f["hypervolume"] >= 0 for f in both["fronts"].values())
    base_rows = [r for r in both["rows"] if r["method"] == "base"]
    assert all(r["win_rate"] == 0.5 and abs(r["gain_weighted_reward"]) < 1e-12 for r in base_rows)
    report = tmp_path / "report"
    for name in ("fronts.png", "weighted_reward_vs_w.png"):
        image = matplotlib.image.imread(report / name)
        assert image.ndim == 3 and image.shape[0] > 100
    assert not (report / "reward_vs_lambda.png").exists()  # one lambda: a plot against lambda says nothing
    page = _Images()
    text = (report / "index.html").read_text()
    page.feed(text)
    assert page.tables == 2 and sorted(page.images) == sorted(Path(p).name for p in both["plots"].values())
    assert all((report / src).exists() for src in page.images)
    assert "is-oracle</b> is the exact target" in text and "{" not in text.split("<h2>Setting</h2>")[1][:2000]

    again = run_sweep(setting, config, tmp_path, progress=False)
    assert again["cells_run"] == 0 and counting.rows == first  # nothing re-evaluated
    assert again["rows"] == result["rows"]
    # one more seed: only the new seed's cells run (the fingerprint holds the hyper-parameters, not the seed list)
    more = run_sweep(setting, _config(setting, seeds=[0, 1, 2]), tmp_path, progress=False)
    assert more["cells_run"] == 1 + 5 * 2 and counting.rows > first
    # a changed hyper-parameter invalidates the finished cells of every method
    changed = run_sweep(setting, _config(setting, code_candidates=3), tmp_path, progress=False)
    assert changed["cells_run"] == len(cells)


def test_importance_weighted_oracle_matches_closed_form_on_gmm():
    setting = gmm_setting(num_inference_steps=5, alpha=1.0, oracle="exact")
    base, rewards = study_testbed()
    preference = Preference({"right": 0.5, "corner": 0.5}, 1.0)
    config = _config(setting, oracle_samples=200_000)
    record = run_cell(setting, config, Cell("is-oracle", preference, 3))
    exact = expected_rewards(tilted_target(base, rewards, preference, 1.0), rewards)
    for name, value in exact.items():
        assert abs(record["expected_rewards"][name] - value) < 5 * record["standard_errors"][name] + 1e-3
    assert 0 < record["effective_sample_size"] < 200_000


def test_gmm_oracle_reweights_the_base_chain_by_default():
    """The gmm setting's target is the base sampler's chain tilted (SMC's target, docs/method.md): its IS oracle
    reweights ``oracle_samples`` draws of the 5-step chain, equal to importance weighting by hand; the exact-draw
    oracle stays available (``oracle="exact"``) and the two differ by the chain's discretisation."""
    preference = Preference({"right": 0.5, "corner": 0.5}, 1.0)
    chain = gmm_setting(num_inference_steps=5)
    record = run_cell(chain, _config(chain, oracle_samples=50_000), Cell("is-oracle", preference, 3))
    draws = sample(chain.family.member(BASE), chain.scheduler_factory(), generator=3, shape=(50_000, 2),
                   num_inference_steps=5, progress=False).samples
    by_hand = importance_weighted_oracle({n: r(draws) for n, r in chain.rewards.items()}, preference, 1.0)
    for name, value in by_hand.expected_rewards.items():
        assert record["expected_rewards"][name] == pytest.approx(value, rel=1e-9)
    exact = run_cell(gmm_setting(5, oracle="exact"), _config(chain, oracle_samples=50_000),
                     Cell("is-oracle", preference, 3))
    assert abs(exact["expected_rewards"]["right"] - record["expected_rewards"]["right"]) > 0.05
    with pytest.raises(DiffusionBlendError, match="oracle"):
        gmm_setting(5, oracle="closed")


def test_cli_rejects_bad_input(tmp_path, capsys):
    assert main(["evaluate", "--out", str(tmp_path), "--methods", "mpa,rs-deltas", "--grid", "2"]) == 2
    assert "Rewarded Soup" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(tmp_path), "--weights", "nope=1"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.distributed
def test_two_process_torchrun_splits_cells(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = ["evaluate", "--out", str(tmp_path), "--methods", "base,mpa,ls", "--grid", "2", "--seeds", "0,1,2,3",
            "--samples-per-seed", "4", "--steps", "3", "--no-progress"]
    done = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "diffusion_blend.cli", *args],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    cells = list((tmp_path / "cells").rglob("*.json"))
    assert len(cells) == 4 + 2 * 2 * 4
    assert {json.loads(path.read_text())["process_index"] for path in cells} == {0, 1}  # both processes worked
    assert (tmp_path / "report" / "index.html").exists() and (tmp_path / "results.csv").exists()
    assert done.stdout.count("cell(s) computed") == 1  # only rank 0 aggregates and reports
