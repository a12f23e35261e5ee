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
