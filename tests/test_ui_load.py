"""The UI under load (benchmarks/bench_ui_load.py): `dblend ui` on the digits studio, 4 gradio clients x 25 generate
requests over loopback, every 4th invalid. No server error; every invalid value answered with its readable line;
every valid request with its own result; resident memory grows at most 5 % from the 10th answer to the 100th; the
queue runs one generate at a time while requests wait (gradio's documented default: ``Blocks.queue``'s
``default_concurrency_limit=1`` per event listener, no ``max_size``: none refused). Latency figures:
benchmarks/README.md. ``slow``: about a minute here (2 cores under load), most of it the server's start.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_four_clients_of_25_requests_a_quarter_invalid(tmp_path):
    from bench_ui_load import run_load

    summary = run_load(tmp_path, clients=4, requests=25, invalid_every=4)
    records = summary["records"]
    assert summary["requests"] == 100 and sorted(r["number"] for r in records) == list(range(100))
    invalid = [r for r in records if r["expected"] is not None]
    assert len(invalid) == 25
    for record in invalid:  # the readable line, in the status, for every invalid value
        assert record["status"] == f"⚠️ Invalid input: {record['expected']}", record
    for record in records:
        if record["expected"] is None:  # its own result: the weights and seed it asked for
            weights = ", ".join(f"{name} {value:g}" for name, value in record["weights"].items())
            assert record["status"].startswith(f"Result for weights {weights}, KL scale 1, DB-MPA, seed "
                                               f"{record['seed']}."), record
    log = "\n".join(summary["server_log"])
    assert "Traceback" not in log and "ERROR" not in log and "Error" not in log, log[-3000:]
    assert summary["rss_growth"] <= 0.05, (summary["rss_10"], summary["rss_last"])
    assert summary["most_generates_at_once"] == 1  # the queue's concurrency limit
    assert summary["most_in_flight"] >= 2  # ... while other clients' requests waited in it
