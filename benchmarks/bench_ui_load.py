"""The digits studio under load: concurrent clients sending generate requests over loopback, a share of them invalid.

    python benchmarks/bench_ui_load.py                     # 4 clients x 25 requests, every 4th invalid
    python benchmarks/bench_ui_load.py --clients 8 --requests 50

Starts ``dblend ui`` (the real command, the digits studio with its defaults: 16 images, 10 DDIM steps) on 127.0.0.1
with two random digits experts, in its own process; its studio's ``generate`` is wrapped to print a line when it
starts and ends (how many run at once: the queue's concurrency), and its ``launch`` to print a line once it serves.
Then ``--clients`` threads, each with its own ``gradio_client.Client``, send ``--requests`` generate requests each
(every ``--invalid-every``-th of all with an invalid value: a negative seed, a KL scale or weight out of range, 0 SMC
particles); the server is stopped at the end. Every request has a time limit, so the run ends by itself.

Prints the latency per request (submit to answer, p50 / p95: all, valid, invalid), the server's resident memory after
the 10th answer and after the last, the most ``generate`` calls that ran at once and the most requests in flight.
tests/test_ui_load.py runs it and checks every answer.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

READY = "BENCH-UI-READY"
GENERATE = "BENCH-UI-GENERATE"
NAMES = ("compressibility", "ink")  # the page's weight sliders, in the order of the adapters folder's sorted files
INVALID = [  # (what is invalid, the value, the readable line the page must answer with)
    ("seed", -3, "the seed must be a non-negative whole number, got -3"),
    ("kl_scale", 5.0, "KL scale must be between 0 and 3, got 5.0"),
    ("weight", 7.0, "weight: ink must be between -1 and 2, got 7.0"),
    ("particles", 0, "SMC particles must be a whole number from 1 to 32, got 0.0"),
]
MPA = "DB-MPA (blend every step)"
REQUEST_TIMEOUT_S = 300


def write_experts(folder: Path) -> Path:
    """A demo folder whose ``adapters/`` holds two random (seeded) LoRA experts on the committed digits base."""
    import torch

    from diffusion_blend.adapters import save_adapter
    from diffusion_blend.lora import add_lora, lora_layers
    from diffusion_blend.testbeds.digits.model import lora_target_modules
    from diffusion_blend.testbeds.digits.train import load_default_digits_model

    model = load_default_digits_model(progress=False)
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # peft initialises lora_A from the global generator
        for name in NAMES:
            add_lora(model, name, rank=4, target_modules=list(lora_target_modules()))
            for layer in lora_layers(model):
                layer.lora_B[name].weight.data = 0.05 * torch.randn(layer.lora_B[name].weight.shape,
                                                                    generator=generator)
            save_adapter(model, name, folder / "adapters" / f"{name}.safetensors", rewards={name: 1.0}, alpha=0.1)
    return folder


def serve(argv: list[str]) -> int:
    """The server process: ``dblend ui ARGV`` with the two lines of instrumentation (module docstring)."""
    import torch

    from diffusion_blend.cli import main
    from diffusion_blend.ui import app, studio

    torch.set_num_threads(1)
    generate, launch, lock, running = studio.LoraStudio.generate, app.launch, threading.Lock(), [0]

    def counted(self, *args: Any, **kwargs: Any) -> Any:
        with lock:
            running[0] += 1
            print(f"{GENERATE} start {running[0]}", flush=True)
        try:
            return generate(self, *args, **kwargs)
        finally:
            with lock:
                running[0] -= 1
                print(f"{GENERATE} end {running[0]}", flush=True)

    def launch_and_say(application: Any, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> None:
        launch(application, host=host, port=port, block=False)
        print(READY, flush=True)
        threading.Event().wait()  # serve until the process is stopped

    studio.LoraStudio.generate = counted
    app.launch = launch_and_say
    return main(["ui", *argv])


class Server:
    """``dblend ui`` in its own process (:func:`serve`); its output lines are collected as they come."""

    def __init__(self, demo_dir: Path, port: int):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", "--demo-dir", str(demo_dir), "--port",
                                         str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.lines.append(line.rstrip("\n"))
            if line.startswith(READY):
                self.ready.set()
        self.ready.set()  # the process ended (wait_ready then reports its output)

    def wait_ready(self, timeout: float = 300) -> None:
        if not self.ready.wait(timeout) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError("the UI server did not start:\n" + "\n".join(self.lines[-40:]))

    def rss_bytes(self) -> int:
        """The server's resident memory (``VmRSS``)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def most_generates_at_once(self) -> int:
        return max((int(line.split()[-1]) for line in self.lines if line.startswith(f"{GENERATE} start")), default=0)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)


def request(number: int, invalid_every: int, rng: random.Random) -> dict[str, Any]:
    """Request ``number`` (counted over all clients): its values (weights, KL scale, method, seed, prompt, particles,
    tilt) and the line it should be answered with (``None``: a result); every ``invalid_every``-th is invalid."""
    weights = {name: round(rng.uniform(0.0, 1.0), 2) for name in NAMES}
    values = {"weights": weights, "kl_scale": 1.0, "seed": number, "particles": 1}
    expected = None
    if invalid_every and number % invalid_every == invalid_every - 1:
        what, value, expected = INVALID[(number // invalid_every) % len(INVALID)]
        if what == "weight":
            values["weights"] = {**weights, "ink": value}
        else:
            values[what] = value
    inputs = [*values["weights"].values(), values["kl_scale"], MPA, values["seed"], "", values["particles"], 1.0]
    return {"number": number, "inputs": inputs, "seed": values["seed"], "weights": values["weights"],
            "expected": expected}


def run_clients(url: str, clients: int, requests: int, invalid_every: int, server: Server) -> list[dict[str, Any]]:
    """``clients`` threads x ``requests`` requests each; the server's memory after the 10th and the last answer."""
    from gradio_client import Client

    records: list[dict[str, Any]] = []
    lock, errors = threading.Lock(), queue.Queue()

    def one_client(client_index: int) -> None:
        try:
            client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
            rng = random.Random(client_index)
            for index in range(requests):
                record = request(client_index * requests + index, invalid_every, rng)
                record["submitted"] = time.perf_counter()
                job = client.submit(*record.pop("inputs"), api_name="/generate")
                outputs = job.result(timeout=REQUEST_TIMEOUT_S)
                record["answered"] = time.perf_counter()
                record["status"] = outputs[3]
                with lock:
                    records.append(record)
                    record["order"] = len(records)
                    if record["order"] in (min(10, clients * requests), clients * requests):
                        record["rss"] = server.rss_bytes()
        except Exception as err:  # noqa: BLE001 - reported with the results
            errors.put(f"client {client_index}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=one_client, args=(c,), daemon=True) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S * requests)
    failures = list(errors.queue)
    if failures:
        raise RuntimeError("; ".join(failures))
    return records


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between order statistics."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def most_in_flight(records: list[dict[str, Any]]) -> int:
    """The most requests submitted and not yet answered at one moment (client side)."""
    events = sorted([(r["submitted"], 1) for r in records] + [(r["answered"], -1) for r in records])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def summarize(records: list[dict[str, Any]], server: Server) -> dict[str, Any]:
    latency = {"all": [r["answered"] - r["submitted"] for r in records]}
    latency["valid"] = [r["answered"] - r["submitted"] for r in records if r["expected"] is None]
    latency["invalid"] = [r["answered"] - r["submitted"] for r in records if r["expected"] is not None]
    rss = {r["order"]: r["rss"] for r in records if "rss" in r}
    first, last = rss[min(10, len(records))], rss[len(records)]
    return {"requests": len(records), "records": records,
            "latency": {kind: {"p50": percentile(v, 0.5), "p95": percentile(v, 0.95), "n": len(v)}
                        for kind, v in latency.items() if v},
            "rss_10": first, "rss_last": last, "rss_growth": (last - first) / first,
            "most_generates_at_once": server.most_generates_at_once(), "most_in_flight": most_in_flight(records),
            "server_log": list(server.lines)}


def run_load(workdir: Path, clients: int = 4, requests: int = 25, invalid_every: int = 4) -> dict[str, Any]:
    """The whole measurement (module docstring); returns the summary and every request's record."""
    import socket

    demo_dir = write_experts(Path(workdir) / "demo")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = Server(demo_dir, port)
    try:
        server.wait_ready()
        started = time.perf_counter()
        records = run_clients(f"http://127.0.0.1:{port}/", clients, requests, invalid_every, server)
        summary = summarize(records, server)
        summary["wall_s"] = time.perf_counter() - started
    finally:
        server.stop()
    return summary


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        sys.exit(serve(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25, help="per client")
    parser.add_argument("--invalid-every", type=int, default=4, help="every k-th request (of all) is invalid")
    args = parser.parse_args()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as workdir:
        summary = run_load(Path(workdir), args.clients, args.requests, args.invalid_every)
    wrong = [r for r in summary["records"] if (r["expected"] is None) != str(r["status"]).startswith("Result for")]
    print(f"command: python benchmarks/bench_ui_load.py {' '.join(sys.argv[1:])}; load average before: {load_before}")
    print(f"{summary['requests']} requests in {summary['wall_s']:.1f} s; answers not as expected: {len(wrong)}")
    print("| requests | n | p50 latency (s) | p95 latency (s) |")
    print("| --- | --- | --- | --- |")
    for kind, row in summary["latency"].items():
        print(f"| {kind} | {row['n']} | {row['p50']:.2f} | {row['p95']:.2f} |")
    print(f"server RSS after the 10th answer {summary['rss_10'] / 2**20:.1f} MiB, after the last "
          f"{summary['rss_last'] / 2**20:.1f} MiB ({100 * summary['rss_growth']:+.2f} %); generate calls at once: at "
          f"most {summary['most_generates_at_once']}; requests in flight: at most {summary['most_in_flight']}")


if __name__ == "__main__":
    main()
