"""The ``dblend`` entry point: sub-command discovery and one-line errors with exit status 2."""

import subprocess
import sys

from diffusion_blend.cli import main


def test_coefficients_prints_the_rule(capsys):
    assert main(["coefficients", "--weights", "a=0.25,b=0.5", "--kl-scale", "2"]) == 0
    out = capsys.readouterr().out
    assert "base  -0.5" in out and "a  +0.5" in out and "b  +1" in out and "not valid" in out


def test_bad_input_exits_2_with_one_readable_line(capsys):
    for argv in (["coefficients", "--weights", "a=0.5", "--kl-scale", "-1"],
                 ["coefficients", "--weights", "a=nan"],
                 ["coefficients", "--weights", "a"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dblend: error: ") and "\n" not in err and "Traceback" not in err


def test_console_script_subprocess_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "diffusion_blend.cli", "coefficients", "--weights", "a=1",
                           "--kl-scale", "-2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "dblend: error: kl_scale (lambda) must be >= 0, got -2.0"


def test_argument_errors_are_one_line_too(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["coefficients", "--weights", "a=1", "--kl-scale", "abc"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dblend: error: argument --kl-scale") and "\n" not in err


HEAVY = ("torch", "diffusers", "peft", "transformers", "accelerate", "gradio", "numpy", "matplotlib", "safetensors")


def test_help_and_coefficients_start_without_heavy_imports():
    """Registering every command (what `dblend --help` and `dblend COMMAND --help` do) and running `coefficients`
    import none of the heavy stacks: the start-up bar of issue 14 (figures in benchmarks/README.md)."""
    code = ("import sys\nfrom diffusion_blend.cli import build_parser, main\nbuild_parser()\n"
            "assert main(['coefficients', '--weights', 'a=0.3,b=0.7', '--kl-scale', '1.2']) == 0\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout and "base  -0.2" in proc.stdout, proc.stdout


def test_version_and_help_show_defaults(capsys):
    import pytest

    from diffusion_blend import __version__
    from diffusion_blend.cli import build_parser
    from diffusion_blend.evaluation.sweep import METHODS

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"dblend (diffusion-blend) {__version__}"
    commands = build_parser()._subparsers._group_actions[0].choices
    sample_help = " ".join(commands["sample"].format_help().split())
    assert "(default: mpa)" in sample_help and "(default: auto)" in sample_help
    assert "(default: the base kind" in sample_help
    assert "defaults per base kind" in sample_help and "flow SDE, noise level 0.7" in sample_help
    assert "(default: None)" not in sample_help and "(default: False)" not in sample_help
    evaluate_help = " ".join(commands["evaluate"].format_help().split())
    unwrapped = evaluate_help.replace("- ", "-")  # argparse wraps after a hyphen
    assert all(f" {method}," in unwrapped or f" {method} " in unwrapped for method in METHODS), unwrapped
    assert "(default gmm: 64" in evaluate_help  # --samples-per-seed had no default shown before


def test_finetune_verify_quick_report_says_smoke_run():
    """`finetune-verify --quick` labels its report (printed by the command) as a smoke run; the full one does not."""
    from dataclasses import asdict

    from diffusion_blend.testbeds.gmm.verification import (
        VerifySettings,
        markdown_report,
    )

    case = {"case": "right-alpha1", "alpha": 1.0, "E_pre[r]": 0.0, "E_ft[r]": 0.1, "E_ft[r]_se": 0.01,
            "E_target[r]_IS": 0.2, "E_target[r]_exact_mixture": 0.2, "path_kl": 0.05, "J_ft": 0.05,
            "best_objective": 0.1, "fraction": 0.5}
    blend = {"weights": {"right": 0.5}, "alpha": 1.0, "path_kl": 0.1,
             "r_w": {"blend": 0.1, "target_IS": 0.2, "J_blend": 0.05, "best_objective": 0.1, "fraction": 0.5}}

    def report(settings):
        return {"settings": asdict(settings), "cases": [case], "morl_oracle": case, "blend": blend}

    assert markdown_report(report(VerifySettings.quick())).startswith("**Smoke run (--quick)**")
    assert "Smoke run" not in markdown_report(report(VerifySettings()))
