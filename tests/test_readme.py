"""Every ```python / ```bash block of README.md runs as written (issue 14: a README that runs as written).

The blocks run in order, each in its own process (so each must carry its own imports), in a scratch folder
holding what the README says the reader has: the demo's experts in ``runs/demo/adapters`` (trained here with the
demo's quick budget as a stand-in for ``make demo``). ``dblend`` on the PATH is this checkout's. A block preceded
by ``<!-- readme-test: skip (reason) -->`` is not run; the test checks that the skipped ones are the ones meant.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PROGRESS = re.compile(r"^\s*\d+%\|.*\| \d+/\d+ \[")
"""A tqdm progress-bar line (``dblend sample`` shows one over the steps unless --no-progress)."""
ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w+)\s*$")
SKIP = "<!-- readme-test: skip"


def readme_blocks(text: str) -> list[tuple[str, str, bool]]:
    """``(language, code, skipped)`` of every fenced block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        blocks.append((match.group(1), "\n".join(lines[i + 1:end]) + "\n", before.startswith(SKIP)))
        i = end + 1
    return blocks


def test_block_parser_on_a_sample():
    text = "x\n```python\nprint(1)\n```\n\n<!-- readme-test: skip (long) -->\n```bash\nmake demo\n```\n"
    assert readme_blocks(text) == [("python", "print(1)\n", False), ("bash", "make demo\n", True)]


def test_readme_code_blocks_run_as_written(tmp_path, monkeypatch, capfd):
    """Python blocks run in this process (``exec`` in a fresh namespace: each needs its own imports; the import
    time of a new interpreter per block would triple the test's time on 2 cores), bash blocks in a shell."""
    from diffusion_blend.testbeds.digits.config import DemoConfig
    from diffusion_blend.testbeds.digits.experts import ensure_demo_adapters

    blocks = readme_blocks((ROOT / "README.md").read_text())
    runnable = [(lang, code) for lang, code, skipped in blocks if lang in ("python", "bash") and not skipped]
    skipped = [code for lang, code, skip in blocks if skip]
    assert len(runnable) >= 3 and sum(lang == "python" for lang, _ in runnable) >= 2
    assert [code.split()[0:2] for code in skipped] == [["make", "demo"], ["make", "demo"]], skipped

    ensure_demo_adapters(tmp_path / "runs" / "demo", DemoConfig.quick(), progress=False, log=lambda _: None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    monkeypatch.chdir(tmp_path)
    capfd.readouterr()
    for lang, code in runnable:
        if lang == "python":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
            assert not [str(w.message) for w in caught], "a README block warned"
        else:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, f"README block failed:\n{code}\n--- stderr:\n{proc.stderr[-3000:]}"
            # no third-party notice; our own progress bar over the steps is all stderr may hold
            noise = [line for line in re.split(r"[\r\n]", proc.stderr) if line.strip() and not PROGRESS.search(line)]
            assert not noise, proc.stderr[-3000:]
    assert (tmp_path / "blend.png").is_file() and (tmp_path / "tiny-sd" / "base" / "model_index.json").is_file()
    out = capfd.readouterr()
    assert "torch.Size([16, 1, 8, 8]) torch.Size([16, 1, 8, 8])" in out.out
    for noise in ("torchvision", "No LoRA keys", "led to missing keys", "peft_config", "torch_dtype"):
        assert noise not in out.err, out.err[-3000:]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
