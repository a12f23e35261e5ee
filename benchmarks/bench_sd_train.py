"""Peak memory and seconds of ``dblend finetune`` (the command users run) on the real SD 1.5 / SDXL UNet architecture.

The base is a diffusers pipeline folder written once by this script (``--base``, default
``benchmarks/results/bases/<family>``): the UNet built from the SD 1.5 config (``bench_sd_blend.SD15_UNET_CONFIG``)
with random weights, saved in float32 as ``diffusion_pytorch_model.safetensors`` (3.4 GB; no download); a small VAE
with SD's latent interface (4 latent channels, 8x downsampling, scaling 0.18215) and a 1-layer CLIP text encoder of
SD's width (768, 77 tokens). ``--family sdxl``: the SDXL 1.0 base UNet (2.6 B parameters, ``text_time`` added
conditioning) with two 1-layer text encoders of SDXL's widths; ``sd15-narrow``: SD 1.5's layout at channels 64-256
(minutes, not hours, per pathwise run).

Each configuration is ONE process of ``dblend finetune --kind sd --base B --rewards brightness=1 --alpha 0.1
--iterations 1 --batch-size N --minibatch-size 1 --steps K --estimator E --dtype D --gradient-checkpointing
--resolution R --device D`` (CFG 7.5, DDIM eta 1, rank-4 LoRA on the attention projections, the differentiable
``brightness`` reward): the same code path, loader and allocator settings as a user's run. Peak memory on CPU is
that process's peak resident set size (``ru_maxrss`` from ``os.wait4``: runtime, loading, weights, activations);
on CUDA the ``torch.cuda.max_memory_allocated`` the command writes to its ``log.json``. Seconds per iteration are the
command's own (``log.json``: ``process.seconds_per_iteration``, loading excluded); ``process s`` is the whole
process's wall time. ``--malloc-mmap-threshold 0`` runs the commands with glibc's dynamic mmap threshold (the
command's ``--malloc-mmap-threshold``; default: the command's own, fixed at 128 KiB on CPU).

    python benchmarks/bench_sd_train.py                                   # the bars' configurations, CPU, 256 px
    python benchmarks/bench_sd_train.py --configs pathwise_s4,pathwise_s16 --malloc-mmap-threshold 0
    python benchmarks/bench_sd_train.py --family sdxl --configs score_b1,score_b2,pathwise_s1,pathwise_s4
    python benchmarks/bench_sd_train.py --device cuda --resolution 512    # GPU (benchmarks/device_check.py runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import command_line, write_results

HERE = Path(__file__).resolve().parent
PROMPTS = ["a photograph of a cat", "a red house by the sea"]

# name -> (estimator, batch_size, steps, dtype, gradient_checkpointing); minibatch 1 everywhere
CONFIGS = {
    "score_b1": ("score", 1, 2, "float32", True),
    "score_b2": ("score", 2, 2, "float32", True),
    "score_b8": ("score", 8, 2, "float32", True),
    "score_b1_bf16": ("score", 1, 2, "bfloat16", True),
    "score_b1_fp16": ("score", 1, 2, "float16", True),
    "score_b1_nockpt": ("score", 1, 2, "float32", False),
    "pathwise_s1": ("pathwise", 1, 1, "float32", True),
    "pathwise_s4": ("pathwise", 1, 4, "float32", True),
    "pathwise_s8": ("pathwise", 1, 8, "float32", True),
    "pathwise_s16": ("pathwise", 1, 16, "float32", True),
    "pathwise_s1_nockpt": ("pathwise", 1, 1, "float32", False),
}
DEFAULT = "score_b1,score_b8,pathwise_s4,pathwise_s16,score_b1_bf16"
# (numerator, denominator, what, bar)
RATIOS = [
    ("score_b8", "score_b1", "peak memory, batch 8 / batch 1 (minibatch 1)", 1.15),
    ("pathwise_s16", "pathwise_s4", "peak memory, pathwise + checkpointing, 16 / 4 steps", 1.15),
    ("score_b1_bf16", "score_b1", "peak memory, bfloat16 / float32", 0.6),
    ("score_b1_fp16", "score_b1", "peak memory, float16 / float32", None),
    ("score_b2", "score_b1", "peak memory, batch 2 / batch 1 (minibatch 1)", None),
    ("pathwise_s8", "pathwise_s4", "peak memory, pathwise + checkpointing, 8 / 4 steps", None),
    ("pathwise_s4", "pathwise_s1", "peak memory, pathwise + checkpointing, 4 / 1 steps", None),
    ("score_b1", "score_b1_nockpt", "peak memory, score update, block checkpointing on / off", None),
    ("pathwise_s1", "pathwise_s1_nockpt", "peak memory, pathwise 1 step, checkpointing on / off", None),
]
TIME_RATIOS = [
    ("score_b8", "score_b1", "seconds per iteration, batch 8 / batch 1"),
    ("pathwise_s16", "pathwise_s4", "seconds per iteration, pathwise 16 / 4 steps"),
    ("score_b1_bf16", "score_b1", "seconds per iteration, bfloat16 / float32"),
    ("score_b1_fp16", "score_b1", "seconds per iteration, float16 / float32"),
    ("score_b1", "score_b1_nockpt", "seconds per iteration, score, block checkpointing on / off"),
    ("pathwise_s1", "pathwise_s1_nockpt", "seconds per iteration, pathwise 1 step, checkpointing on / off"),
]

# SDXL 1.0 base UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): 2.6 B parameters
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled text + 6 time ids x 256
    norm_num_groups=32,
)
FAMILY_STEMS = {"sd15": "sd", "sdxl": "sdxl", "sd15-narrow": "sd-narrow"}


def unet_config(family: str) -> dict:
    sys.path.insert(0, str(HERE))
    from bench_sd_blend import SD15_UNET_CONFIG

    if family == "sdxl":
        return SDXL_UNET_CONFIG
    return {**SD15_UNET_CONFIG, **({"block_out_channels": (64, 128, 256, 256)} if family == "sd15-narrow" else {})}


def build_pipeline(dtype_name: str, seed: int, family: str = "sd15"):
    """SD 1.5 or SDXL UNet (random, built in ``dtype``), a small VAE with SD's latent interface, and 1-layer CLIP
    text encoders of the real widths (SD 1.5: 768; SDXL: 768 and 1280 with a 1280 projection)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffusion_blend.pipelines.tiny import (
        make_tokenizer,  # offline byte-level CLIP tokenizer
    )

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(family))
    for param in unet.parameters():  # still on meta: re-typing costs nothing (diffusers' .to(dtype) would warn)
        param.data = param.data.to(dtype)
    unet = unet.to_empty(device="cpu")  # the only allocation: the weights, directly in dtype
    # a pool of 2^20 N(0, 0.02^2) draws tiled over every weight (drawing 860M normals takes a minute on 2 busy
    # cores; memory and time per iteration do not depend on the values)
    pool = torch.randn(2**20, generator=generator).mul_(0.02).to(dtype)
    pool = torch.cat([pool, pool])  # any window of 2^20 values is a slice: no copies
    with torch.no_grad():
        for index, (name, param) in enumerate(unet.named_parameters()):
            if param.ndim == 1:
                param.fill_(1.0 if name.endswith("weight") and "norm" in name else 0.0)
                continue
            flat = param.view(-1)
            offset = (index * 7919) % 2**20
            for start in range(0, flat.numel(), 2**20):
                piece = flat[start:start + 2**20]
                piece.copy_(pool[offset: offset + piece.numel()])
        for buffer in unet.buffers():
            buffer.zero_()
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 64),
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        layers_per_block=1, norm_num_groups=32,
                        scaling_factor=0.13025 if family == "sdxl" else 0.18215)

    def text_config(width: int, **extra) -> CLIPTextConfig:
        return CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
                              num_attention_heads=width // 64, max_position_embeddings=77, vocab_size=1000,
                              bos_token_id=0, eos_token_id=2, pad_token_id=1, **extra)

    text_encoder = CLIPTextModel(text_config(768))
    tokenizer = make_tokenizer(Path(tempfile.mkdtemp(prefix="bench_sd_train_tokenizer_")))
    tokenizer.model_max_length = 77
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            unet=unet.eval(), vae=vae, text_encoder=text_encoder,
            text_encoder_2=CLIPTextModelWithProjection(text_config(1280, projection_dim=1280)), tokenizer=tokenizer,
            tokenizer_2=tokenizer, scheduler=scheduler)
    return StableDiffusionPipeline(unet=unet.eval(), vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def ensure_base(folder: Path, family: str, seed: int = 0) -> Path:
    """The benchmark's pipeline folder (float32 safetensors), written once by a separate process; reused after."""
    stamp = folder / "bench_base.json"
    wanted = {"family": family, "seed": seed, "dtype": "float32"}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    print(f"writing the {family} base to {folder} (once) ...", flush=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench_sd_train import build_pipeline; "
            "build_pipeline('float32', int(sys.argv[3]), sys.argv[2]).save_pretrained(sys.argv[4])")
    subprocess.run([sys.executable, "-c", code, str(HERE), family, str(seed), str(folder)], check=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL)
    stamp.write_text(json.dumps(wanted))
    return folder


def dblend_command() -> list[str]:
    """``dblend`` as installed next to this interpreter, else the same entry point through ``python -c``."""
    script = Path(sys.executable).with_name("dblend")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from diffusion_blend.cli import main; sys.exit(main())"]


def finetune_argv(base: Path, prompts: Path, out: Path, config: str, resolution: int | None, device: str,
                  target: str = "sd", malloc_mmap_threshold: int | None = None, iterations: int = 1) -> list[str]:
    """The ``dblend finetune`` command line of one configuration (``resolution`` None: the base's native size)."""
    estimator, batch, steps, dtype, checkpointing = CONFIGS[config]
    argv = [*dblend_command(), "finetune", "--kind", target, "--base", str(base), "--prompts", str(prompts),
            "--rewards", "brightness=1", "--alpha", "0.1", "--iterations", str(iterations), "--batch-size",
            str(batch), "--minibatch-size", "1", "--steps", str(steps), "--estimator", estimator, "--dtype", dtype,
            "--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing",
            "--device", device, "--lr", "1e-4", "--lora-rank", "4",
            "--eta", "1", "--guidance-scale", "7.5", "--seed", "0", "--no-progress", "--no-resume", "--out", str(out)]
    if resolution is not None:
        argv += ["--resolution", str(resolution)]
    if malloc_mmap_threshold is not None:
        argv += ["--malloc-mmap-threshold", str(malloc_mmap_threshold)]
    return argv


def run_finetune(argv: list[str], out: Path, env: dict[str, str] | None = None, timeout: float | None = None,
                 fork: bool = False) -> dict:
    """Run one ``dblend finetune`` process; its peak RSS (``os.wait4``), wall time and ``log.json`` figures (the
    last iteration's seconds: with several, the first carries the warm-up). ``timeout``: killed after it.
    ``fork``: the process is a fork of this one calling the CLI's ``main`` with the same arguments (no interpreter
    start and imports: ``device_check.py --smoke``; its memory figures then include this process's pages)."""
    import signal
    import threading

    started = time.perf_counter()
    with tempfile.TemporaryFile() as output:
        pid = _fork_command(argv, output, env) if fork else subprocess.Popen(
            argv, stdout=output, stderr=subprocess.STDOUT, env=env).pid
        killer = threading.Timer(timeout, os.kill, (pid, signal.SIGKILL)) if timeout is not None else None
        if killer is not None:
            killer.start()
        _, status, usage = os.wait4(pid, 0)
        if killer is not None:
            killer.cancel()
        returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        output.seek(0)
        text = output.read().decode(errors="replace")
    if returncode != 0:
        raise RuntimeError(f"dblend finetune exited {returncode}: {text.strip().splitlines()[-1:]}")
    process = json.loads((out / "log.json").read_text())["process"]
    cuda = process.get("cuda_max_memory_allocated")
    return {"peak_rss_bytes": usage.ru_maxrss * 1024, "process_seconds": wall,
            "process_cpu_seconds": usage.ru_utime + usage.ru_stime, "process_system_seconds": usage.ru_stime,
            "seconds_per_iteration": process["seconds_per_iteration"][-1],
            "iteration_seconds": process["seconds_per_iteration"], "cuda_max_memory_allocated": cuda,
            "peak_memory_bytes": cuda if cuda is not None else usage.ru_maxrss * 1024,
            "malloc_mmap_threshold": process.get("malloc_mmap_threshold"), "device": process.get("device")}


def _fork_command(argv: list[str], output: Any, env: dict[str, str] | None) -> int:
    """Fork; the child runs ``diffusion_blend.cli.main`` on ``argv``'s arguments, its output into ``output``."""
    pid = os.fork()
    if pid:
        return pid
    code = 1  # pragma: no cover - the child
    try:
        os.dup2(output.fileno(), 1)
        os.dup2(output.fileno(), 2)
        os.environ.update(env or {})
        from diffusion_blend.cli import main

        code = main(argv[argv.index("finetune"):])
    except BaseException:  # noqa: BLE001 - reported through the exit status and the output
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def run_config(name: str, base: Path, work: Path, resolution: int | None, device: str, threads: int,
               target: str = "sd", malloc_mmap_threshold: int | None = None, iterations: int = 1,
               timeout: float | None = None, fork: bool = False) -> dict:
    """One configuration through ``dblend finetune`` in its own process."""
    estimator, batch, steps, dtype, checkpointing = CONFIGS[name]
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = work / name
    argv = finetune_argv(base, prompts, out, name, resolution, device, target, malloc_mmap_threshold, iterations)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    row = run_finetune(argv, out, env, timeout, fork)
    shutil.rmtree(out, ignore_errors=True)
    return {"config": name, "estimator": estimator, "batch_size": batch, "minibatch_size": 1, "steps": steps,
            "dtype": dtype, "gradient_checkpointing": checkpointing, **row,
            "command": " ".join(argv[len(dblend_command()) - 1:])}


def ratio_lines(results: dict[str, dict]) -> list[str]:
    lines = ["| ratio | value | bar |", "| --- | --- | --- |"]
    for numerator, denominator, what, bar in RATIOS:
        if numerator in results and denominator in results:
            value = results[numerator]["peak_memory_bytes"] / results[denominator]["peak_memory_bytes"]
            verdict = "-" if bar is None else f"<= {bar} ({'met' if value <= bar else 'NOT met'})"
            lines.append(f"| {what} | {value:.2f}x | {verdict} |")
    for numerator, denominator, what in TIME_RATIOS:
        if numerator in results and denominator in results:
            value = results[numerator]["seconds_per_iteration"] / results[denominator]["seconds_per_iteration"]
            cpu = results[numerator]["process_cpu_seconds"] / results[denominator]["process_cpu_seconds"]
            lines.append(f"| {what} | {value:.2f}x (process CPU time {cpu:.2f}x) | - |")
    return lines


def markdown_of(results: dict[str, dict], meta: dict) -> str:
    table = ["| config | estimator | batch | steps | dtype | checkpointing | s / iteration | process s | "
             "process CPU s (system) | peak memory (GiB) |", "|" + " --- |" * 10]
    for row in results.values():
        table.append(f"| {row['config']} | {row['estimator']} | {row['batch_size']} | {row['steps']} | {row['dtype']} "
                     f"| {'on' if row['gradient_checkpointing'] else 'off'} | {row['seconds_per_iteration']:.1f} | "
                     f"{row['process_seconds']:.1f} | {row['process_cpu_seconds']:.0f} "
                     f"({row['process_system_seconds']:.0f}) | {row['peak_memory_bytes'] / 2**30:.2f} |")
    return "\n".join([f"Command: `{meta['command']}`", "",
                      f"`dblend finetune` on the {meta['family']} base, device {meta['device']} ({meta['processor']}), "
                      f"{meta['resolution']} px, {meta['threads']} threads, one process per configuration. Memory: "
                      f"{meta['memory_method']}; the command's malloc mmap threshold: "
                      f"{meta['malloc_mmap_threshold']}.", "", *table, "", *ratio_lines(results), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--family", default="sd15", choices=tuple(FAMILY_STEMS),
                        help="UNet architecture: SD 1.5 (default), SDXL 1.0 base, or SD 1.5's layout at channels "
                             "64-256 (sd15-narrow)")
    parser.add_argument("--base", type=Path, help="pipeline folder (default: written once under --out/bases)")
    parser.add_argument("--resolution", type=int, default=256, help="pixels (default 256)")
    parser.add_argument("--configs", default=DEFAULT, help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the commands (default 2)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None,
                        help="passed to the commands (default: theirs, 131072 on CPU; 0 = glibc's dynamic default)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        print(f"bench_sd_train: error: unknown configuration(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.malloc_mmap_threshold is not None and args.malloc_mmap_threshold < 0:
        print("bench_sd_train: error: --malloc-mmap-threshold must be >= 0", file=sys.stderr)
        return 2
    base = args.base or ensure_base(args.out / "bases" / args.family, args.family)
    work = Path(tempfile.mkdtemp(prefix="bench_sd_train_"))
    target = "sdxl" if args.family == "sdxl" else "sd"
    results: dict[str, dict] = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        try:
            results[name] = run_config(name, base, work, args.resolution, args.device, args.threads, target,
                                       args.malloc_mmap_threshold)
        except RuntimeError as err:
            print(f"bench_sd_train: error: configuration {name}: {err}", file=sys.stderr)
            return 1
        row = results[name]
        print(f"  {row['seconds_per_iteration']:.1f} s/iteration ({row['process_seconds']:.1f} s process), peak "
              f"{row['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    first = next(iter(results.values()))
    meta = {"command": command_line(__file__, argv), "family": args.family, "device": args.device,
            "resolution": args.resolution, "threads": args.threads, "base": str(base),
            "platform": platform.platform(), "processor": _processor(), "cpu_count": os.cpu_count(),
            "malloc_mmap_threshold": first["malloc_mmap_threshold"],
            "memory_method": ("torch.cuda.max_memory_allocated (the command's log.json)"
                              if first["cuda_max_memory_allocated"] is not None
                              else "peak RSS of the dblend finetune process (ru_maxrss, os.wait4)")}
    markdown = markdown_of(results, meta)
    print(markdown)
    suffix = "" if args.malloc_mmap_threshold is None else f"_mmap{args.malloc_mmap_threshold}"
    write_results(args.out, f"{FAMILY_STEMS[args.family]}_train_{args.device.split(':')[0]}_{args.resolution}{suffix}",
                  meta, results, markdown)
    return 0


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
