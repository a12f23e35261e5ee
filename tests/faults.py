"""Fault injection for the reliability tests: real ``dblend`` processes killed with SIGKILL, and a full disk.

``dblend_process`` runs ``dblend ARGV`` in a process forked from a fork server that has imported torch, diffusers and
the package once (``multiprocessing``'s forkserver, so a run costs its work, not a fresh import of torch): a real,
separate process with its own pid, environment and working folder, killed with a real ``SIGKILL``. A kill lands

- at a file write: ``DBLEND_KILL_AT_WRITE=N:GLOB`` (``diffusion_blend.files``) makes the process SIGKILL itself during
  its N-th atomic write of a file named like GLOB, with the temporary file half written; or
- at a time: the test sends SIGKILL after a number of seconds.

Both are drawn from :func:`kill_rng` (seeded: ``DBLEND_KILL_SEED``, default 23), so a failure names moments that
reproduce. ``small_filesystem`` mounts a tmpfs of a few MB (the test machine runs as root); where it cannot, the test
is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PRELOAD = ["diffusion_blend.cli", "diffusion_blend.training.dpok", "diffusion_blend.evaluation.sweep",
           "diffusion_blend.pipelines.session", "diffusion_blend.testbeds.digits.demo", "diffusers", "faults"]
KILLED = -signal.SIGKILL
_CONTEXT = None


def kill_rng(name: str) -> random.Random:
    """The seeded generator of one test's kill moments (``DBLEND_KILL_SEED`` explores other moments)."""
    return random.Random(f"{os.environ.get('DBLEND_KILL_SEED', '23')}:{name}")


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _run(argv: list[str], env: dict[str, str], cwd: str, log: str) -> None:
    """The child: stdout and stderr to ``log``, the given environment and folder, one torch thread, then the CLI."""
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    import torch

    torch.set_num_threads(1)  # as the in-process reference runs (tests/conftest.py): bitwise-comparable results
    from diffusion_blend.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Run:
    """One ``dblend`` process: ``returncode`` (``KILLED`` = -9 after a SIGKILL) and its output."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None, cwd: str | None = None):
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        self.process = _context().Process(target=_run, args=(argv, environment, cwd or os.getcwd(), str(log)))
        self.process.start()
        self.returncode: int | None = None

    def wait(self, timeout: float = 300) -> Run:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            raise AssertionError(f"dblend did not finish in {timeout} s: {self.output[-2000:]}")
        self.returncode = self.process.exitcode
        return self

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(60)
        self.returncode = self.process.exitcode

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def dblend(argv: list[str], log: Path, *, kill_at_write: str | None = None, kill_after: float | None = None,
           env: dict[str, str] | None = None, timeout: float = 300) -> Run:
    """Run ``dblend argv`` to its end, or until it is killed: at its write ``kill_at_write`` (``"N:GLOB"``) or
    ``kill_after`` seconds (whichever comes first)."""
    env = dict(env or {})
    if kill_at_write is not None:
        env["DBLEND_KILL_AT_WRITE"] = kill_at_write
    run = Run(argv, log, env)
    if kill_after is None:
        return run.wait(timeout)
    run.process.join(kill_after)
    if run.process.exitcode is None:
        run.kill()
        return run
    return run.wait(timeout)


def partial_files(folder: Path) -> list[Path]:
    """Temporary files of atomic writes (``.NAME.partial-...``) under ``folder``."""
    return sorted(path for path in Path(folder).rglob(".*.partial-*"))


def assert_published_files_whole(folder: Path) -> int:
    """Every result file under ``folder`` (temporaries aside) reads whole: safetensors load, JSON parses, PNGs
    decode. Returns how many were checked."""
    from PIL import Image
    from safetensors.torch import load_file

    checked = 0
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or ".partial-" in path.name:
            continue
        if path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
        else:
            continue
        checked += 1
    return checked


REQUIRE_ALL = "DBLEND_REQUIRE_ALL_CHECKS"
"""Set by ``make test`` / ``make test-slow``: a check that cannot run here fails instead of being skipped."""


def cannot_run_here(reason: str) -> None:
    """A check whose means are missing here (no root to mount a tmpfs, no Chromium): a failure under ``make test``
    (:data:`REQUIRE_ALL`, where the make targets provide those means), elsewhere a skip that says why."""
    if os.environ.get(REQUIRE_ALL):
        pytest.fail(f"{reason} ({REQUIRE_ALL} is set: make test runs every check)")
    pytest.skip(reason)


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "2m"):
    """A tmpfs of ``size`` mounted at ``path`` for the duration (:func:`cannot_run_here` where it cannot)."""
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        cannot_run_here("mounting a small tmpfs needs root on Linux (the test machine runs as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        cannot_run_here(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        for _ in range(50):  # a process that had a file open there may take a moment to go
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Fill the filesystem of ``folder`` until about ``leave_bytes`` stay free (a filler file)."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave_bytes))
    return filler
