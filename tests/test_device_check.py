"""benchmarks/device_check.py, the prepared GPU check: its plan names every row under 9 minutes (estimates), and
``--smoke`` runs every row on CPU with tiny models and writes its table and JSON into ``$OUT`` (no timing
assertions: the smoke figures mean nothing, the point is that the script cannot rot before a GPU is lent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.py"


@pytest.fixture(scope="module")
def check():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import device_check
    finally:
        sys.path.pop(0)
    return device_check


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                       **(env or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=environment,
                          timeout=timeout)


def test_plan_lists_every_row_with_its_estimate_under_nine_minutes(check):
    proc = run("--plan")
    assert proc.returncode == 0, proc.stderr
    for row in check.ROWS:
        assert row.id in proc.stdout
    wanted = {"sd15_single", "sd15_mpa2_auto", "sd15_mpa2_batched", "sd15_mpa2_sequential", "sd15_ls2",
              "sd15_copies2", "sd15_mpa3_auto", "sd15_mpa3_batched", "sd15_mpa3_sequential", "sd15_ls3",
              "sd15_copies3", "sd15_smc4", "sdxl_single", "sdxl_mpa2_auto", "sdxl_mpa2_sequential", "sdxl_ls2",
              "sd3_single", "sd3_mpa2_auto", "sd3_mpa2_sequential", "sd3_ls2", "train_score_b1", "train_score_b8",
              "train_pathwise_s4", "train_pathwise_s16", "train_score_b1_fp16", "train_score_b1_bf16"}
    assert {row.id for row in check.ROWS} == wanted
    assert check.estimated_total(check.ROWS, check.FULL) < 9 * 60
    assert "ESTIMATES" in proc.stdout.splitlines()[0]


def test_bad_input_is_one_line_with_exit_2():
    for args in (["--rows", "no_such_row"],):
        proc = run(*args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("device_check: error: ")


def test_smoke_run_writes_every_row_into_out(check, tmp_path):
    proc = run("--smoke", env={"OUT": str(tmp_path)}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "device_check.json").read_text())
    table = (tmp_path / "device_check.md").read_text()
    assert report["meta"]["smoke"] is True and "SMOKE RUN" in table
    rows = {row["id"]: row for row in report["rows"]}
    assert set(rows) == {row.id for row in check.ROWS}
    for row_id, row in rows.items():
        assert f"| {row_id} |" in table
        assert row["status"] in ("measured", "skipped"), row
        if row["status"] == "skipped":
            assert "would not fit" in row["reason"]
        else:
            assert row["peak_memory_bytes"] > 0
            assert (row.get("seconds_per_image") or row.get("seconds_per_iteration")) > 0
    routed = [rows[i] for i in rows if i.endswith(("_auto", "_batched", "_sequential")) and
              rows[i]["status"] == "measured"]
    for row in routed:  # which routing ran is recorded; on CPU `auto` is sequential
        assert row["routing_used"] in ("batched", "sequential")
        if row["id"].endswith(("_sequential", "_auto")):
            assert row["routing_used"] == "sequential"
