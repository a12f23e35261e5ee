"""Start-up time of ``dblend`` against ``python -c "import torch"`` (issue 14: the CLI starts faster than torch).

Runs each command ``--repeats`` times, interleaved (one of each per round, so machine load hits all alike), each in
a fresh interpreter, and reports the median wall time and its ratio to ``import torch`` from the same run.

    python benchmarks/bench_cli_start.py --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "dblend --help": [sys.executable, "-m", "diffusion_blend.cli", "--help"],
    "dblend --version": [sys.executable, "-m", "diffusion_blend.cli", "--version"],
    "dblend sample --help": [sys.executable, "-m", "diffusion_blend.cli", "sample", "--help"],
    "dblend coefficients --weights a=0.3,b=0.7": [sys.executable, "-m", "diffusion_blend.cli", "coefficients",
                                                  "--weights", "a=0.3,b=0.7"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, argv in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    torch_median = statistics.median(times['python -c "import torch"'])
    print(f"command: python benchmarks/bench_cli_start.py --repeats {args.repeats}; load average before: "
          f"{load_before}")
    print("| command | median wall time (s) | ratio to `import torch` |")
    print("| --- | --- | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.3f} | {median / torch_median:.2f}x |")


if __name__ == "__main__":
    main()
