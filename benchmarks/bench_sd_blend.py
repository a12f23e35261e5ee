"""Time per step and peak memory of Diffusion Blend sampling on the real Stable Diffusion 1.5 UNet architecture.

The UNet is ``UNet2DConditionModel`` built from the SD 1.5 config (written below; random weights, no download)
with rank-4 LoRA adapters on every attention projection (to_q, to_k, to_v, to_out.0). Every variant runs DDIM
steps (eta = 1) at 64x64 latents with classifier-free guidance (CFG batch 2), batch 1:

- ``single``: the base UNet alone, no adapter (the reference cost, ratio 1);
- ``mpa_sequential``: DB-MPA by switching adapters the stock way: peft ``set_adapter``, forward, repeat m times
  (what a user gets without this library; the bar the library's routing must not lose to);
- ``mpa_peft_mixed``: DB-MPA as the library did before routing existed: ONE forward of all m adapters x both CFG
  rows through peft's mixed-adapter batch (``adapter_names``, each layer masking rows by index);
- ``mpa_batched`` / ``mpa_sequential_routed`` / ``mpa_auto``: DB-MPA through the library (``DenoiserBlend``) with
  ``routing="batched"`` (one forward, contiguous blocks, our LoRA forward), ``"sequential"`` (one forward per
  member) and ``"auto"`` (the default: sequential on CPU, batched on CUDA when it fits);
- ``reference_copies``: the reference code's approach: m full UNet copies, each with its LoRA merged;
- ``ls_peft``: DB-MPA-LS before routing: one adapter drawn per step, peft ``set_adapter`` + forward;
- ``ls``: DB-MPA-LS through the library (``routing="auto"``): one adapter drawn per step, one forward.

Each variant runs in its own subprocess, so peak memory is not polluted by the others: on CPU the peak is the
subprocess's peak resident set size (``ru_maxrss``, includes the Python/torch runtime); on CUDA it is
``torch.cuda.max_memory_allocated``. Results are printed as ratios to ``single`` and written as JSON and Markdown,
with the process CPU time per
step and the load average before each variant (on a shared machine, wall-time ratios across processes are only as
good as the load was steady). The *paired ratio* is robust to slow load changes: right after each step, the same
process times one forward of the single model (adapters disabled) on the same input, and the ratio is the step's
time over that forward's.

    python benchmarks/bench_sd_blend.py                               # CPU, float32, 2 timed steps
    python benchmarks/bench_sd_blend.py --device cuda --dtype float16 --steps 20
    python benchmarks/bench_sd_blend.py --adapters 3 --variants single,mpa_sequential,mpa_auto,ls
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from _common import command_line, emit_result, fill_random_, worker_result, write_results

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
VARIANTS = ("single", "mpa_sequential", "mpa_peft_mixed", "mpa_batched", "mpa_sequential_routed", "mpa_auto",
            "reference_copies", "ls_peft", "ls")
ROUTED = {"mpa_batched": "batched", "mpa_sequential_routed": "sequential", "mpa_auto": "auto"}
PROMPT_TOKENS = 77


def _random_unet(dtype, device, seed):
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    unet = unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    fill_random_(unet, generator)
    return unet.to(device=device, dtype=dtype).eval()


def _add_adapters(model, names, seed, targets=TARGETS):
    """Rank-4 LoRA adapters ``names`` on ``targets`` with random non-zero ``lora_B`` (else every adapter = base)."""
    import torch

    from diffusion_blend.lora import add_lora

    generator = torch.Generator().manual_seed(seed)
    for name in names:
        add_lora(model, name, rank=4, target_modules=targets, init_lora_weights="gaussian")
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B" in key:
                param.copy_((torch.randn(param.shape, generator=generator) * 0.01).to(param))
    model.eval()


def _merged_copies(model_with_adapters, names, build_base):
    """m full networks, copy i = ``build_base()`` (the same base weights) + LoRA i merged in (W += scale * B A), as
    the reference code keeps."""
    import torch

    from diffusion_blend.lora import lora_layers

    copies = []
    layers = {id(layer) for layer in lora_layers(model_with_adapters)}
    for name in names:
        copy = build_base()
        modules = dict(copy.named_modules())
        with torch.no_grad():
            for layer_name, module in model_with_adapters.named_modules():
                if id(module) in layers and name in module.lora_A:
                    delta = module.lora_B[name].weight.float() @ module.lora_A[name].weight.float()
                    target = modules[layer_name]
                    target.weight += (module.scaling[name] * delta).to(target.weight)
        copies.append(copy)
    return copies


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_variant(variant: str, m: int, steps: int, warmup: int, device: str, dtype_name: str, seed: int) -> dict:
    """One measurement in this process; returns timing and memory."""
    import torch
    from diffusers import DDIMScheduler

    from diffusion_blend.denoisers import SwitchingDenoiser
    from diffusion_blend.lora import LoraFamily, active_adapter, mixed_adapter_batch
    from diffusion_blend.pipelines.blend import DenoiserBlend
    from diffusion_blend.preference import Preference, blend_predictions

    dtype = getattr(torch, dtype_name)
    cuda = device.startswith("cuda")
    names = [f"reward{i}" for i in range(m)]
    preference = Preference({name: 1.0 / m for name in names})
    unet = _random_unet(dtype, device, seed)
    if variant != "single":
        _add_adapters(unet, names, seed + 1)
    copies = (_merged_copies(unet, names, lambda: _random_unet(dtype, device, seed))
              if variant == "reference_copies" else None)
    if copies is not None:
        del unet
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(2, PROMPT_TOKENS, 768, generator=generator).to(device, dtype)  # [uncond; cond]
    latents = torch.randn(1, 4, 64, 64, generator=generator).to(device, dtype)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)

    def call(model, x, t):
        return model(x, t, encoder_hidden_states=embeddings, return_dict=False)[0]

    family = None
    if variant == "single":
        predict = lambda x, t: call(unet, x, t)  # noqa: E731
    elif variant in ROUTED:
        blend = DenoiserBlend(unet, preference, "mpa", routing=ROUTED[variant])
        family = blend.family
        predict = lambda x, t: blend(x, t, encoder_hidden_states=embeddings, return_dict=False)[0]  # noqa: E731
    elif variant == "mpa_sequential":
        coefficients = [c for _, c in preference.coefficients(names).active()]

        def predict(x, t):
            outputs = []
            for name in names:
                with active_adapter(unet, name):
                    outputs.append(call(unet, x, t))
            return blend_predictions(coefficients, outputs)
    elif variant == "mpa_peft_mixed":
        coefficients = [c for _, c in preference.coefficients(names).active()]
        rows = [name for name in names for _ in range(2)]  # member blocks of the CFG batch
        stacked_embeddings = embeddings.repeat(m, 1, 1)

        def predict(x, t):
            with mixed_adapter_batch(unet, rows):
                out = unet(x.repeat(m, 1, 1, 1), t, encoder_hidden_states=stacked_embeddings, return_dict=False)[0]
            return blend_predictions(coefficients, list(out.split(x.shape[0])))
    elif variant == "reference_copies":
        coefficients = [1.0 / m] * m
        predict = lambda x, t: blend_predictions(coefficients, [call(c, x, t) for c in copies])  # noqa: E731
    elif variant == "ls_peft":
        draws = torch.Generator().manual_seed(seed)
        probabilities = torch.full((m,), 1.0 / m)

        def predict(x, t):
            with active_adapter(unet, names[int(torch.multinomial(probabilities, 1, generator=draws))]):
                return call(unet, x, t)
    elif variant == "ls":
        family = LoraFamily(unet, lambda model, x, t, **kw: call(model, x, t), names, routing="auto")
        switching = SwitchingDenoiser(family, preference, seed, copies=2)
        predict = lambda x, t: switching(x, t)  # noqa: E731
    else:
        raise ValueError(f"unknown variant {variant!r}")

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    weights_bytes = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    scheduler.set_timesteps(warmup + steps)
    times, cpu_times, base_times = [], [], []
    base_model = copies[0] if copies is not None else unet  # merged copies: a plain UNet's cost

    def base_forward(x, t):
        """The single model's forward (adapters disabled), timed in this process right after each step."""
        with active_adapter(base_model, None) if variant not in ("single", "reference_copies") else nullcontext():
            return call(base_model, x, t)

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start, time.process_time() - cpu_start

    x = latents
    with torch.no_grad():
        for index, t in enumerate(scheduler.timesteps):
            def step(x: torch.Tensor = x, t: Any = t) -> torch.Tensor:  # this iteration's x and t
                eps = predict(torch.cat([x, x]), t)
                uncond, cond = eps.chunk(2)
                guided = uncond + 7.5 * (cond - uncond)
                return scheduler.step(guided, t, x, eta=1.0, generator=generator).prev_sample

            new_x, seconds, cpu_seconds = timed(step)
            _, base_seconds, _ = timed(lambda x=x, t=t: base_forward(torch.cat([x, x]), t))
            x = new_x
            if index >= warmup:
                times.append(seconds)
                cpu_times.append(cpu_seconds)
                base_times.append(base_seconds)
    finite = bool(torch.isfinite(x).all())
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        method = "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        method = "peak RSS of the variant's process (ru_maxrss)"
    return {
        "variant": variant, "m": m, "seconds_per_step": sum(times) / len(times), "step_times": times,
        "cpu_seconds_per_step": sum(cpu_times) / len(cpu_times),
        "paired_base_seconds": base_times, "paired_ratio": sum(times) / sum(base_times),
        "routing_used": None if family is None else family.last_routing,
        "memory_after_setup_bytes": weights_bytes, "peak_memory_bytes": peak, "memory_method": method,
        "finite": finite,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 2 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    parser.add_argument("--adapters", default="2,3", help="comma-separated m values (default 2,3)")
    parser.add_argument("--variants", default=",".join(VARIANTS[1:]),
                        help=f"comma-separated variants besides single (default all: {', '.join(VARIANTS[1:])})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = args.steps or (20 if args.device.startswith("cuda") else 2)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS[1:]]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS[1:])}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"error: --device {args.device} needs CUDA, and torch sees no CUDA device here", file=sys.stderr)
            return 2

    if args.worker:
        result = run_variant(args.worker[0], int(args.worker[1]), steps, args.warmup, args.device, args.dtype,
                             args.seed)
        emit_result(result)
        return 0

    ms = [int(v) for v in args.adapters.split(",")]
    jobs = [("single", 1)] + [(variant, m) for m in ms for variant in variants]
    results = []
    base_cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--dtype", args.dtype,
                "--steps", str(steps), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    for variant, m in jobs:
        load = os.getloadavg()[0]
        print(f"running {variant} (m={m}, load average {load:.2f}) ...", flush=True)
        proc = subprocess.run([*base_cmd, "--worker", variant, str(m)], capture_output=True, text=True)
        row = worker_result(proc)
        if row is None:
            raise SystemExit(f"variant {variant} (m={m}) failed with exit code {proc.returncode}")
        results.append({**row, "load_average_before": load})

    single = results[0]
    for row in results:
        row["time_ratio"] = row["seconds_per_step"] / single["seconds_per_step"]
        row["peak_memory_ratio"] = row["peak_memory_bytes"] / single["peak_memory_bytes"]
    command = command_line(__file__, argv)
    import torch

    meta = {
        "command": command, "device": args.device, "dtype": args.dtype, "timed_steps": steps, "warmup": args.warmup,
        "latents": "1x4x64x64, CFG batch 2, 77 prompt tokens", "unet": "SD 1.5 architecture, random weights",
        "lora": "rank 4 on to_q, to_k, to_v, to_out.0", "memory_method": single["memory_method"],
        "torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    header = ("| variant | m | routing used | s/step | time ratio | paired ratio | CPU s/step | peak memory (GiB) "
              "| memory ratio | load before |")
    table = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results:
        table.append(
            f"| {row['variant']} | {row['m'] if row['variant'] != 'single' else '-'} | {row['routing_used'] or '-'} "
            f"| {row['seconds_per_step']:.3f} | {row['time_ratio']:.3f}x | {row['paired_ratio']:.3f}x "
            f"| {row['cpu_seconds_per_step']:.2f} "
            f"| {row['peak_memory_bytes'] / 2**30:.2f} | {row['peak_memory_ratio']:.3f}x "
            f"| {row['load_average_before']:.2f} |"
        )
    markdown = "\n".join([
        f"Command: `{command}`", "",
        f"Device {args.device} ({meta['cuda_device'] or platform.processor() or 'cpu'}), {args.dtype}, {steps} timed "
        f"steps after {args.warmup} warm-up, {meta['latents']}. Memory: {meta['memory_method']}.", "", *table, "",
    ])
    print(markdown)
    write_results(args.out, f"sd_blend_{args.device.split(':')[0]}_{args.dtype}", meta, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
