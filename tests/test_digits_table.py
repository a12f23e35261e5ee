"""`dblend evaluate --setting digits --quick`: the paper's Table 1 on digits (files, rows, RGG, MORL cache,
invariants)."""

import csv
import json
from pathlib import Path

import pytest

from diffusion_blend.cli import main
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.testbeds.digits.table import TABLE_METHODS, DigitsTableConfig

FILES = ("table.csv", "table.json", "table.md", "kl_scales.csv", "table.png")


def _morl_adapters(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted((out / "morl").rglob("adapter.safetensors"))}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-table")
    assert main(["evaluate", "--setting", "digits", "--out", str(out), "--quick", "--no-progress"]) == 0
    first = json.loads((out / "table.json").read_text())
    adapters = _morl_adapters(out)
    assert main(["evaluate", "--setting", "digits", "--out", str(out), "--quick", "--no-progress"]) == 0
    second = json.loads((out / "table.json").read_text())
    return out, first, second, adapters


def test_quick_run_writes_every_file(quick_run):
    out, first, _, _ = quick_run
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "table.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(TABLE_METHODS) * 3
    with open(out / "kl_scales.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 1 + 3 * 4  # base + (DB-KLA, MORL, IS) x 4 lambdas


def test_table_has_every_method_at_every_weight(quick_run):
    _, summary, _, _ = quick_run
    cells = {(row["method"], row["w"]) for row in summary["table"]}
    assert cells == {(m, w) for m in TABLE_METHODS for w in (0.2, 0.5, 0.8)}
    markdown = (quick_run[0] / "table.md").read_text()
    for label in ("Rewarded Soup (factors)", "Rewarded Soup (deltas)", "CoDe", "RGG", "DB-MPA", "DB-MPA-LS",
                  "MORL oracle", "IS oracle", "hypervolume", "NFE / base", "time / base"):
        assert label in markdown


def test_rgg_runs_on_the_differentiable_demo_pair(quick_run):
    # ink and digit_prob_3 both have gradients, so reward-gradient guidance runs (its refusal of a
    # non-differentiable reward is tested in test_baselines.py)
    _, summary, _, _ = quick_run
    rgg = [row for row in summary["table"] if row["method"] == "rgg"]
    assert len(rgg) == 3
    for row in rgg:
        assert "na" not in row and row["weighted_reward"] == row["weighted_reward"]  # a number, not NaN


def test_costs_match_hand_counts(quick_run):
    _, summary, _, _ = quick_run
    steps = summary["sampler"]["num_inference_steps"]  # quick: 4
    candidates, block = summary["sweep"]["code_candidates"], summary["sweep"]["code_block_size"]
    selections = len([i for i in range(steps) if i % block == 0 and i < steps - 1])
    particles = summary["sweep"]["particles"]  # SMC: 2 experts + the base per particle; FK: 3x the particles
    expected = {"base": 1.0, "rs-factors": 1.0, "rs-deltas": 1.0, "mpa": 2.0, "ls": 1.0, "morl": 1.0,
                "code": (steps + selections * (candidates - 1)) / steps, "smc": 3.0 * particles, "fk": 3.0 * particles}
    for row in summary["table"]:
        if row["method"] in expected:
            assert row["nfe_ratio"] == pytest.approx(expected[row["method"]]), row["method"]
        if row["method"] == "base":
            assert row["gain_weighted_reward"] == pytest.approx(0.0, abs=1e-12)
    oracle = [row for row in summary["table"] if row["method"] == "is-oracle"]
    assert all(0 < row["effective_sample_size"] <= summary["sweep"]["oracle_samples"] + 1e-9 for row in oracle)
    assert all(row["nfe_ratio"] is None for row in oracle)


def test_weighted_reward_and_hypervolume_follow_from_their_parts(quick_run):
    _, summary, _, _ = quick_run
    first, second = summary["rewards"]
    for row in summary["table"]:
        if "na" in row:
            continue
        assert row["weighted_reward"] == pytest.approx(row["w"] * row[f"mean_{first}"]
                                                       + (1 - row["w"]) * row[f"mean_{second}"], abs=1e-9)
    base = next(row for row in summary["table"] if row["method"] == "base")
    reference = summary["reference_point"]
    # the base has one point at every w: its dominated area is a single rectangle
    rectangle = (base[f"mean_{first}"] - reference[0]) * (base[f"mean_{second}"] - reference[1])
    assert base["hypervolume"] == pytest.approx(rectangle, rel=1e-9)


def test_morl_at_lambda_one_is_the_expert_and_lambda_grid_is_complete(quick_run):
    _, summary, _, _ = quick_run
    rows = {(row["method"], row["kl_scale"]): row for row in summary["kl_scales"]}
    assert set(rows) == {("base", 0.0)} | {(m, k) for m in ("mpa", "morl", "is-oracle") for k in (0.5, 1.0, 1.5, 2.0)}
    # MORL on ink at KL weight alpha is the ink expert's own training run (copied): same samples as DB-KLA(ink, 1)
    assert rows[("morl", 1.0)]["mean_ink"] == pytest.approx(rows[("mpa", 1.0)]["mean_ink"], abs=1e-4)
    assert summary["morl_copied"] == 1 and summary["morl_trained"] == 6


def test_rerun_reuses_the_morl_cache(quick_run):
    out, first, second, adapters = quick_run
    assert second["morl_trained"] == 0 and second["morl_copied"] == 0
    assert _morl_adapters(out) == adapters and len(adapters) == 7
    assert second["table"] == first["table"] and second["kl_scales"] == first["kl_scales"]


def test_bad_configuration_is_refused():
    with pytest.raises(DiffusionBlendError, match="weights must lie in"):
        DigitsTableConfig(weights=(1.5,))
    with pytest.raises(DiffusionBlendError, match="KL scales"):
        DigitsTableConfig(kl_scales=(0.0,))
    with pytest.raises(DiffusionBlendError, match="kl_reward"):
        DigitsTableConfig(kl_reward="symmetry")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--setting", "digits", "--quick"])  # --out is required
    assert exit_info.value.code == 2


def test_figures_equal_the_digits_table_from_before_the_house_move(quick_run):
    """`dblend evaluate --setting digits --quick` reproduces the figures `dblend digits-table --quick` printed before
    the digits table became a preset of the sweep (saved from main a01b7fb: tests/data/pre_move), every method but SMC,
    whose default proposal tilt became the automatic one since (issue 25; its figures: docs/evaluation.md)."""
    _, summary, _, _ = quick_run
    saved = json.loads((Path(__file__).parent / "data" / "pre_move" / "digits_table_quick.json").read_text())
    rows = {(row["method"], row["w"]): row for row in summary["table"]}
    for old in (row for row in saved["table"] if row["method"] != "smc"):
        new = rows[(old["method"], old["w"])]
        for key, value in old.items():
            assert new[key] == (pytest.approx(value, rel=1e-9, abs=1e-12) if isinstance(value, float) else value), key
    kl = {(row["method"], row["kl_scale"]): row for row in summary["kl_scales"]}
    for old in saved["kl_scales"]:
        new = kl[(old["method"], old["kl_scale"])]
        assert new["mean_ink"] == pytest.approx(old["mean_ink"], rel=1e-9)
        assert new["mean_digit_prob_3"] == pytest.approx(old["mean_digit_prob_3"], rel=1e-9)
