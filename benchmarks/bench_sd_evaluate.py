"""Seconds and peak memory of ONE ``dblend evaluate --setting sd`` cell per method, on the real SD 1.5 UNet
architecture with random weights (no download).

The pipeline is ``bench_sd_train.build_pipeline`` (SD 1.5 UNet from config with random weights, a small VAE with SD's
latent interface, a 1-layer 768-wide CLIP text encoder; see that script). Two rank-4 LoRA experts with random
non-zero factors are written as diffusers LoRA files and loaded by :func:`diffusion_blend.evaluation.sd_setting.
sd_setting` exactly as the command does (``--alpha`` given: the files carry no metadata). Each method runs one cell
(``run_cell``: preference ``brightness=0.5, saturation=0.5``, lambda = 1, seed 0) in its own subprocess, so its
peak resident set size (``ru_maxrss``; on CUDA ``torch.cuda.max_memory_allocated``) is its own. Printed and written
as JSON and Markdown with the ratios to ``base``.

    python benchmarks/bench_sd_evaluate.py                                # CPU, 256 px, 4 steps, 1 sample per cell
    python benchmarks/bench_sd_evaluate.py --device cuda --resolution 512 --steps 50 --samples 4   # GPU (not run yet)
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import command_line, emit_result, worker_result, write_results

HERE = Path(__file__).resolve().parent
METHODS = ("base", "mpa", "ls", "rs-factors", "rs-deltas", "code", "rgg", "smc")


def run_method(method: str, device: str, resolution: int, steps: int, samples: int, seed: int) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    sys.path.insert(0, str(HERE))
    from bench_sd_train import build_pipeline
    from diffusion_blend.evaluation.sd_setting import sd_setting
    from diffusion_blend.evaluation.sweep import Cell, SweepConfig, run_cell
    from diffusion_blend.pipelines.tiny import perturbed_lora, save_diffusers_lora
    from diffusion_blend.preference import Preference

    pipe = build_pipeline("float32", seed)
    scratch = Path(tempfile.mkdtemp(prefix="bench_sd_evaluate_"))
    files = {}
    for index, name in enumerate(("brightness", "saturation")):
        perturbed_lora(pipe.unet, name, seed + index, scale=0.01)
        files[name] = save_diffusers_lora(StableDiffusionPipeline, pipe.unet, name, scratch / f"{name}.safetensors")
    pipe.unet.delete_adapters(["brightness", "saturation"])
    (scratch / "prompts.txt").write_text("a photograph of a cat\na red house by the sea\n")
    setting = sd_setting(pipe, files, scratch / "prompts.txt", ["brightness", "saturation"], methods=[method],
                         num_inference_steps=steps, guidance_scale=7.5, resolution=resolution, alpha=0.1,
                         device=device, preview_images=0)
    config = SweepConfig(methods=[method], preferences=[Preference({"brightness": 0.5, "saturation": 0.5})],
                         seeds=[0], samples_per_seed=samples, code_candidates=4, code_block_size=2, particles=2)
    cell = Cell(method, None if method == "base" else config.preferences[0], 0)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    record = run_cell(setting, config, cell)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the method's process"
    return {"method": method, "seconds_per_cell": seconds, "seconds_per_sample": seconds / samples,
            "network_evaluations_per_sample": record["network_evaluations_per_sample"],
            "reward_evaluations_per_sample": record.get("reward_evaluations_per_sample"),
            "peak_memory_bytes": peak, "peak_before_cell_bytes": setup_rss, "memory_method": how}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=1, help="samples per cell (default 1)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("bench_sd_evaluate: error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        result = run_method(args.worker, args.device, args.resolution, args.steps, args.samples, args.seed)
        emit_result(result)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    base_cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--resolution",
                str(args.resolution), "--steps", str(args.steps), "--samples", str(args.samples), "--seed",
                str(args.seed), "--threads", str(args.threads)]
    results: dict[str, dict] = {}
    for method in methods:
        print(f"running {method} ...", flush=True)
        proc = subprocess.run([*base_cmd, "--worker", method], capture_output=True, text=True, env=env)
        row = worker_result(proc)
        if row is None:
            print(f"bench_sd_evaluate: error: method {method} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results[method] = row
        print(f"  {row['seconds_per_sample']:.1f} s / sample, peak {row['peak_memory_bytes'] / 2**30:.2f} GiB",
              flush=True)
    command = command_line(__file__, argv)
    base = results.get("base")
    table = ["| method | NFE / sample | reward evals / sample | s / sample | x base | peak memory (GiB) | x base | "
             "peak before the cell (GiB) |", "|" + " --- |" * 8]
    for row in results.values():
        time_ratio = f"{row['seconds_per_sample'] / base['seconds_per_sample']:.2f}" if base else "-"
        memory_ratio = f"{row['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}" if base else "-"
        rewards = row["reward_evaluations_per_sample"]
        table.append(f"| {row['method']} | {row['network_evaluations_per_sample']:g} | "
                     f"{'-' if rewards is None else f'{rewards:g}'} | {row['seconds_per_sample']:.1f} | {time_ratio} | "
                     f"{row['peak_memory_bytes'] / 2**30:.2f} | {memory_ratio} | "
                     f"{row['peak_before_cell_bytes'] / 2**30:.2f} |")
    import torch

    meta = {"command": command, "device": args.device, "resolution": args.resolution, "steps": args.steps,
            "samples": args.samples, "threads": args.threads, "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "memory_method": next(iter(results.values()))["memory_method"] if results else None}
    markdown = "\n".join([f"Command: `{command}`", "",
                          f"Device {args.device}, {args.resolution} px, {args.steps} DDIM steps (eta 1, CFG 7.5), "
                          f"{args.samples} sample(s) per cell, 2 experts, preference (0.5, 0.5), lambda 1, "
                          f"{args.threads} threads; one method per process. Memory: {meta['memory_method']}.", "",
                          *table, ""])
    print(markdown)
    write_results(args.out, f"sd_evaluate_{args.device.split(':')[0]}_{args.resolution}", meta, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
