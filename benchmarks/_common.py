"""Plumbing shared by the benchmark scripts: each configuration runs in its own worker process (so that its peak
memory is its own), prints one ``RESULT <json>`` line, and the parent writes ``<stem>.json`` / ``<stem>.md``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULT = "RESULT "


def emit_result(row: dict[str, Any]) -> None:
    """The worker's side: its one result line on stdout."""
    print(RESULT + json.dumps(row), flush=True)


def worker_result(proc: subprocess.CompletedProcess) -> dict[str, Any] | None:
    """The parent's side: the worker's result row, or None when it failed (its stderr tail is printed)."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(lines[-1][len(RESULT):])


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that produced the figures, as recorded with them."""
    return "python " + " ".join([os.path.relpath(script), *(argv if argv is not None else sys.argv[1:])])


def write_results(out: Path, stem: str, meta: dict[str, Any], results: Any, markdown: str) -> None:
    """``<out>/<stem>.json`` (``{"meta", "results"}``) and ``<out>/<stem>.md``, each replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps({"meta": meta, "results": results}, indent=2)), (".md", markdown)):
        tmp = out / (stem + suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / (stem + suffix))
    print(f"wrote {out / (stem + '.json')} and {stem}.md")


def fill_random_(model: Any, generator: Any) -> Any:
    """Random weights in place for a model materialised with ``to_empty`` (no download): 1-D weights 1 and biases 0
    (norms as initialised), every other parameter N(0, 0.02^2) from ``generator``, buffers 0; the model, in eval
    mode."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for buffer in model.buffers():
            buffer.zero_()
    return model.eval()
