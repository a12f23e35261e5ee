"""Every command, given bad input, ends with exactly one line on stderr (``dblend: error: ...``) and exit status 2,
with no third-party text before it (issue 14).

Every case runs ``dblend``'s ``main`` with the process's stderr captured at the file-descriptor level (so library
loggers, warnings and progress bars writing to fd 2 are seen). Import-time notices appear once per process, so a
few cases that import each heavy stack (torch; diffusers + transformers + peft; gradio) also run in a fresh
interpreter; a fresh interpreter per case would cost minutes of imports on 2 cores."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffusion_blend.pipelines.tiny import write_tiny_base

    root = tmp_path_factory.mktemp("tiny")
    files = write_tiny_base(root / "sd")
    (root / "a_file").write_text("not a folder")
    used = root / "used"
    used.mkdir()
    (used / "image_000.png").write_bytes(b"an earlier result")
    return root, files


def bad_inputs(root: Path, files: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, a fragment the error line must contain)."""
    base, a, b = str(files["base"]), f"brightness={files['brightness']}", f"saturation={files['saturation']}"
    sample = ["sample", "--base", base, "--adapter", a, "--adapter", b, "--prompt", "x", "--steps", "2"]
    weights = ["--weights", "brightness=0.5,saturation=0.5"]
    a_file, used = str(root / "a_file"), str(root / "used")
    return {
        "no command known": (["paint"], "invalid choice"),
        "coefficients nan": (["coefficients", "--weights", "a=nan"], "finite"),
        "coefficients negative lambda": (["coefficients", "--weights", "a=1", "--kl-scale", "-1"], ">= 0"),
        "coefficients unparsable": (["coefficients", "--weights", "a"], "name=value"),
        "coefficients lambda text": (["coefficients", "--weights", "a=1", "--kl-scale", "x"], "--kl-scale"),
        "demo negative seed": (["demo", "--seed", "-1", "--out", str(root / "d")], "seed"),
        "evaluate digits out is a file": (["evaluate", "--setting", "digits", "--out", a_file, "--quick"], a_file),
        "evaluate digits with methods": (["evaluate", "--setting", "digits", "--methods", "mpa", "--out",
                                          str(root / "e")], "--methods"),
        "smc-study particles text": (["smc-study", "--setting", "gmm", "--particles", "two", "--out",
                                      str(root / "m")], "--particles"),
        "evaluate unknown setting": (["evaluate", "--setting", "moons", "--out", str(root / "e")], "moons"),
        "evaluate unknown method": (["evaluate", "--methods", "magic", "--out", str(root / "e")], "magic"),
        "evaluate seeds text": (["evaluate", "--seeds", "one", "--out", str(root / "e")], "integers"),
        "finetune without rewards": (["finetune", "--out", str(root / "f")], "--rewards"),
        "finetune negative alpha": (["finetune", "--rewards", "right=1", "--alpha", "-1", "--out", str(root / "f")],
                                    "alpha"),
        "finetune sd without base": (["finetune", "--kind", "sd", "--rewards", "jpeg_compressibility=1", "--alpha",
                                      "1", "--out", str(root / "f")], "--base"),
        "finetune-verify zero iterations": (["finetune-verify", "--iterations", "0", "--out", str(root / "v")],
                                            "iterations"),
        "gmm-study negative seed": (["gmm-study", "--seed", "-3", "--out", str(root / "g")], "seed"),
        "gmm-study out is a file": (["gmm-study", "--out", a_file], "not a folder"),
        "pretrain zero steps": (["pretrain", "digits", "--steps", "0", "--out", str(root / "p")], "--steps"),
        "pretrain bad ema": (["pretrain", "digits", "--ema", "2", "--out", str(root / "p")], "--ema"),
        "sample on an unavailable device": ([*sample, *weights, "--out", str(root / "s"), "--device", "cuda:7"],
                                            "cuda"),
        "sample unknown device": ([*sample, *weights, "--out", str(root / "s"), "--device", "tpu"], "tpu"),
        "sample weight naming no expert": ([*sample, "--weights", "style=1", "--out", str(root / "s")], "style"),
        "sample missing adapter file": (["sample", "--base", base, "--adapter", f"x={root / 'none.safetensors'}",
                                         "--weights", "x=1", "--prompt", "x", "--out", str(root / "s")],
                                        "does not exist"),
        "sample adapter that is not LoRA": (["sample", "--base", base, "--adapter", f"x={a_file}", "--weights", "x=1",
                                             "--prompt", "x", "--out", str(root / "s")], "not a safetensors"),
        "sample eta out of range": ([*sample, *weights, "--eta", "2", "--out", str(root / "s")], "--eta"),
        "sample alpha not positive": ([*sample, *weights, "--alpha", "0", "--out", str(root / "s")], "--alpha"),
        "sample alpha not finite": ([*sample, *weights, "--alpha", "nan", "--out", str(root / "s")], "--alpha"),
        "sample smc tilt not positive": ([*sample, *weights, "--method", "smc", "--alpha", "1", "--smc-proposal-tilt",
                                         "-1", "--out", str(root / "s")], "--smc-proposal-tilt"),
        "sample out holds results": ([*sample, *weights, "--out", used], "--overwrite"),
        "sample ls with a negative coefficient": ([*sample, *weights, "--kl-scale", "2", "--method", "ls", "--out",
                                                   str(root / "s")], "non-negative"),
        "sample ls on a deterministic sampler": ([*sample, *weights, "--method", "ls", "--eta", "0", "--out",
                                                  str(root / "s")], "stochastic"),
        "sample missing base": (["sample", "--base", str(root / "nothing"), "--adapter", a, "--weights",
                                 "brightness=1", "--prompt", "x", "--out", str(root / "s")], "no such folder"),
        "sample mistyped base": (["sample", "--base", "tiny/bse", "--adapter", a, "--weights", "brightness=1",
                                  "--prompt", "x", "--out", str(root / "s")], "not a hub id in the local cache"),
        "sample base that is a file": (["sample", "--base", a_file, "--adapter", a, "--weights", "brightness=1",
                                        "--prompt", "x", "--out", str(root / "s")], "is a file"),
        "sample mistyped adapter file": (["sample", "--base", base, "--adapter", "x=sd/brightnes.safetensors",
                                          "--weights", "x=1", "--prompt", "x", "--out", str(root / "s")],
                                         "no such file"),
        "sample kind that is not the base's": ([*sample, *weights, "--kind", "sd3", "--out", str(root / "s")],
                                               "--kind sd3, but"),
        "sample smc flags without smc": ([*sample, *weights, "--particles", "8", "--smc-potential", "none", "--out",
                                          str(root / "s")], "--particles, --smc-potential are for --method smc"),
        "sample smc potential every zero": ([*sample, *weights, "--method", "smc", "--smc-potential-every", "0",
                                             "--out", str(root / "s")], "--smc-potential-every must be"),
        "sample resolution not a multiple of 8": ([*sample, *weights, "--resolution", "20", "--out", str(root / "s")],
                                                  "--resolution"),
        "sample eta with the base's own scheduler": ([*sample, *weights, "--scheduler", "pipeline", "--eta", "0.5",
                                                      "--out", str(root / "s")], "--scheduler pipeline"),
        "sample bad dtype": ([*sample, *weights, "--dtype", "float64", "--out", str(root / "s")], "--dtype"),
        "tiny-base out holds results": (["tiny-base", "--out", str(files["base"].parent)], "--overwrite"),
        "ui bad port": (["ui", "--port", "0"], "--port"),
        "ui sd on an unavailable device": (["ui", "--base", base, "--adapter", a, "--device", "cuda"], "CUDA"),
        "ui sd without adapters": (["ui", "--base", base, "--device", "cpu"], "--adapter"),
        "ui malformed adapter": (["ui", "--base", base, "--adapter", "nameonly", "--device", "cpu"], "NAME=PATH"),
        "ui base flags without a base": (["ui", "--eta", "0.5", "--guidance-scale", "3"],
                                         "--guidance-scale, --eta are for --base"),
        "ui smc flags that do not fit": (["ui", "--smc-potential", "experts", "--smc-proposal-tilt", "2",
                                          "--particles", "0"], "--particles must be"),
        "evaluate sd flags on gmm": (["evaluate", "--guidance-scale", "3", "--out", str(root / "e")],
                                     "--setting sd, not --setting gmm"),
        "evaluate sd on a kind that is not the base's": (["evaluate", "--setting", "sd", "--base", base, "--adapter", a,
                                                          "--adapter", b, "--prompts", a_file, "--kind", "flux",
                                                          "--out", str(root / "e")], "--kind flux, but"),
        "finetune base flags on a testbed": (["finetune", "--kind", "gmm", "--base", base, "--rewards", "right=1",
                                              "--alpha", "1", "--out", str(root / "f")], "--base is for a base"),
        "finetune device it cannot use": (["finetune", "--rewards", "right=1", "--alpha", "1", "--device", "mps",
                                           "--out", str(root / "f")], "--device mps"),
        "rewards unknown flag": (["rewards", "--all"], "unrecognized arguments"),
        "inspect missing file": (["inspect", str(root / "none.safetensors")], "none.safetensors"),
        "tiny-base unknown kind": (["tiny-base", "--kind", "sd2", "--out", str(root / "t")], "invalid choice"),
        "tiny-base alpha zero": (["tiny-base", "--alpha", "0", "--out", str(root / "t")], "--alpha"),
    }


FRESH_PROCESS = ["coefficients nan", "sample missing adapter file", "ui sd on an unavailable device"]
"""Cases also run in a fresh interpreter: no heavy import; torch + diffusers + transformers + peft; gradio."""


def run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "diffusion_blend.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def one_error_line(code: int | None, stderr: str, expected: str) -> str | None:
    """Why this outcome is not one ``dblend: error:`` line naming ``expected`` with exit status 2, or None."""
    lines = stderr.splitlines()
    if code != 2 or len(lines) != 1 or not lines[0].startswith("dblend: error: ") or expected not in lines[0]:
        return f"exit {code}, stderr {stderr[-600:]!r}"
    return None


def test_every_bad_input_is_one_line_and_exit_2(tiny, capfd, monkeypatch):
    from diffusion_blend.cli import build_parser, main

    root, files = tiny
    cases = bad_inputs(root, files)
    registered = set(build_parser()._subparsers._group_actions[0].choices)  # every command has a bad input here
    assert registered <= {argv[0] for argv, _ in cases.values()}
    monkeypatch.chdir(root)
    capfd.readouterr()
    failures = []
    for name, (argv, expected) in cases.items():
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        problem = one_error_line(code, capfd.readouterr().err, expected)
        if problem:
            failures.append(f"{name}: {problem}")
    assert not failures, "\n".join(failures)
    assert not (root / "s").exists()  # nothing written on refusal


def test_bad_inputs_in_a_fresh_process(tiny):
    root, files = tiny
    cases = bad_inputs(root, files)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(FRESH_PROCESS, pool.map(lambda name: run_cli(cases[name][0], root), FRESH_PROCESS)))
    failures = [f"{name}: {problem}" for name, proc in results.items()
                if (problem := one_error_line(proc.returncode, proc.stderr, cases[name][1]))]
    assert not failures, "\n".join(failures)


def test_out_with_results_is_kept_unless_overwrite(tiny, tmp_path):
    """``--out`` holding results is refused (files untouched); ``--overwrite`` replaces them, stale ones removed."""
    from diffusion_blend.files import refuse_existing_results

    (tmp_path / "image_000.png").write_text("old")
    (tmp_path / "image_001.png").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    from diffusion_blend.errors import DiffusionBlendError

    with pytest.raises(DiffusionBlendError, match="--overwrite"):
        refuse_existing_results(tmp_path, ["image_*.png", "settings.json"], overwrite=False)
    assert (tmp_path / "image_001.png").read_text() == "old"
    refuse_existing_results(tmp_path, ["image_*.png", "settings.json"], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
