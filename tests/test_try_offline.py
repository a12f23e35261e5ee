"""docs/try-offline.md, walked as a user would: every ``bash`` block's commands, as written, for each kind.

Independent truth: the page itself (its commands are parsed from the markdown, not restated here) and the files the
commands promise (images and settings.json that name the kind, the report's path, an adapter that loads back).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from diffusion_blend.cli import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "try-offline.md"
KINDS = ("sd", "sdxl", "sd3", "flux")
SLOW_ON_FLOW = ("dblend finetune",)
"""Commands walked for SD only: fine-tuning a flow base takes a minute here (docs/try-offline.md shows it for every
kind; tests/test_flow_finetune.py covers the flow trainer)."""


def page_commands() -> list[str]:
    """The page's ``bash`` blocks as commands (continuation lines joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", PAGE.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split("  #")[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_the_page_has_the_commands_the_issue_asks_for():
    text = " ".join(page_commands())
    for needed in ("dblend tiny-base --kind $KIND", "dblend inspect", "--method ls", "--method smc",
                   "dblend evaluate --setting sd", "dblend finetune"):
        assert needed in text, needed
    assert page_commands()[0] == "KIND=sd"


@pytest.mark.parametrize("kind", KINDS)
def test_every_command_of_the_page_runs_as_written(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for command in page_commands()[1:]:  # the first sets KIND
        command = command.replace("$KIND", kind)
        if kind != "sd" and command.startswith(SLOW_ON_FLOW):
            continue
        if not command.startswith("dblend "):
            subprocess.run(["bash", "-c", command], check=True, cwd=tmp_path)
            continue
        capsys.readouterr()
        status = main(shlex.split(command)[1:])
        captured = capsys.readouterr()
        assert status == 0, f"{command}\n{captured.err}"
        assert "Traceback" not in captured.err and "dblend: error" not in captured.err, captured.err
    for out, method in ((f"blend-{kind}", "mpa"), (f"blend-ls-{kind}", "ls"), (f"blend-smc-{kind}", "smc")):
        settings = json.loads((tmp_path / out / "settings.json").read_text())
        assert settings["pipeline"] == kind and settings["method"] == method
        assert {e["reward"] for e in settings["experts"].values()} == {"brightness", "saturation"}
        assert settings["target"]["implied_weights"] == pytest.approx({"brightness": 3.0, "saturation": 7.0})
        assert len(settings["images"]) == 4 and all((tmp_path / out / name).is_file() for name in settings["images"])
    assert (tmp_path / f"eval-{kind}" / "report" / "index.html").is_file()
    results = json.loads((tmp_path / f"eval-{kind}" / "results.json").read_text())
    assert results["setting"]["name"] == kind
    assert {row["method"] for row in results["rows"]} == {"base", "mpa", "smc", "is-oracle"}
    if kind == "sd":
        assert (tmp_path / "ft-brightness-sd" / "pytorch_lora_weights.safetensors").is_file()
