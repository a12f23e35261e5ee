"""Time per step and peak memory of Diffusion Blend on the real Stable Diffusion 3 Medium transformer architecture.

The transformer is ``SD3Transformer2DModel`` built from the SD3-Medium config (written below: 24 joint blocks,
24 heads of 64, 2.03 B parameters; random weights built on the meta device, no download) in bfloat16 (about 4 GB,
native on CPUs with avx512_bf16), with rank-4 LoRA adapters on the attention projections Flow-GRPO trains (to_q,
to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out). Every variant runs flow-SDE steps
(:class:`~diffusion_blend.sampling.FlowMatchSDEScheduler`, noise level 0.7) on small latents (default 16 x 8 x 8:
16 image tokens) with classifier-free guidance (CFG batch 2, default 16 prompt tokens), batch 1:

- ``single``: the base transformer alone, no adapter (ratio 1);
- ``mpa_batched``: DB-MPA, all m adapters x both CFG rows in ONE mixed-adapter forward (the library's
  :class:`~diffusion_blend.pipelines.DenoiserBlend`, as ``BlendStableDiffusion3Pipeline`` runs it);
- ``mpa_sequential``: DB-MPA by switching adapters: set adapter, forward, repeat m times;
- ``copies``: m full transformer copies, each with its LoRA merged (what a fused-copy implementation keeps);
  skipped, and reported as such, when the machine's available memory cannot hold the m copies;
- ``ls``: DB-MPA-LS, one adapter drawn per step, one forward.

Each variant runs in its own subprocess; CPU peak memory is that process's peak RSS (``ru_maxrss``, includes the
Python/torch runtime), CUDA peak is ``torch.cuda.max_memory_allocated``.

    python benchmarks/bench_sd3_blend.py                                    # CPU, bfloat16, m = 2,3
    python benchmarks/bench_sd3_blend.py --device cuda --dtype bfloat16 --steps 10   # not run yet: no GPU lent
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import command_line, emit_result, fill_random_, worker_result, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sd_blend import _add_adapters, _merged_copies, _rss_bytes  # noqa: E402

SD3_MEDIUM_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
VARIANTS = ("single", "mpa_batched", "mpa_sequential", "copies", "ls")
PROMPT_TOKENS, LATENT = 16, 8  # small: CPU bfloat16 here is emulated (no avx512_bf16), ~3.6 GFLOP/s


def _random_transformer(dtype, device, seed):
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**SD3_MEDIUM_CONFIG).to(dtype)  # no float32 copy is ever allocated
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    return fill_random_(model, generator)


def model_bytes(dtype_name: str) -> int:
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        count = sum(p.numel() for p in SD3Transformer2DModel(**SD3_MEDIUM_CONFIG).parameters())
    return count * torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_variant(variant: str, m: int, steps: int, warmup: int, device: str, dtype_name: str, seed: int) -> dict:
    import torch

    from diffusion_blend.denoisers import SwitchingDenoiser
    from diffusion_blend.lora import LoraFamily, active_adapter
    from diffusion_blend.pipelines import DenoiserBlend
    from diffusion_blend.preference import Preference, blend_predictions
    from diffusion_blend.sampling import FlowMatchSDEScheduler

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    dtype = getattr(torch, dtype_name)
    cuda = device.startswith("cuda")
    names = [f"reward{i}" for i in range(m)]
    preference = Preference({name: 1.0 / m for name in names})
    model = _random_transformer(dtype, device, seed)
    if variant != "single":
        _add_adapters(model, names, seed + 1, targets=TARGETS)
    copies = (_merged_copies(model, names, lambda: _random_transformer(dtype, device, seed))
              if variant == "copies" else None)
    if copies is not None:
        del model
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(2, PROMPT_TOKENS, 4096, generator=generator).to(device, dtype)  # [uncond; cond]
    pooled = torch.randn(2, 2048, generator=generator).to(device, dtype)
    latents = torch.randn(1, 16, LATENT, LATENT, generator=generator).to(device, dtype)
    scheduler = FlowMatchSDEScheduler(shift=3.0, noise_level=0.7)

    def call(net, x, t):
        return net(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=embeddings,
                   pooled_projections=pooled, return_dict=False)[0]

    if variant == "single":
        predict = lambda x, t: call(model, x, t)  # noqa: E731
    elif variant == "mpa_batched":
        blend = DenoiserBlend(model, preference, "mpa")
        predict = lambda x, t: call(blend, x, t)  # noqa: E731
    elif variant == "mpa_sequential":
        coefficients = [c for _, c in preference.coefficients(names).active()]

        def predict(x, t):
            outputs = []
            for name in names:
                with active_adapter(model, name):
                    outputs.append(call(model, x, t))
            return blend_predictions(coefficients, outputs)
    elif variant == "copies":
        predict = lambda x, t: blend_predictions([1.0 / m] * m, [call(c, x, t) for c in copies])  # noqa: E731
    elif variant == "ls":
        family = LoraFamily(model, lambda net, x, t, **kw: call(net, x, t), names)
        switching = SwitchingDenoiser(family, preference, seed, copies=2)
        predict = lambda x, t: switching(x, t)  # noqa: E731
    else:
        raise ValueError(f"unknown variant {variant!r}")

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup_bytes = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    scheduler.set_timesteps(warmup + steps)
    times = []
    x = latents
    with torch.no_grad():
        for index, t in enumerate(scheduler.timesteps):
            start = time.perf_counter()
            velocity = predict(torch.cat([x, x]), t)
            uncond, cond = velocity.chunk(2)
            x = scheduler.step(uncond + 7.0 * (cond - uncond), t, x, generator=generator).prev_sample
            if cuda:
                torch.cuda.synchronize()
            if index >= warmup:
                times.append(time.perf_counter() - start)
    if cuda:
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the variant's process"
    return {"variant": variant, "m": m, "seconds_per_step": sum(times) / len(times), "step_times": times,
            "memory_after_setup_bytes": setup_bytes, "peak_memory_bytes": peak, "memory_method": method,
            "finite": bool(torch.isfinite(x).all())}


def main(argv: list[str] | None = None) -> int:
    global LATENT, PROMPT_TOKENS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--steps", type=int, default=1, help="timed steps (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    parser.add_argument("--adapters", default="2,3", help="comma-separated m values (default 2,3)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--latent", type=int, default=LATENT, help=f"latent side (default {LATENT}; patch 2: side^2/4 tokens)"
    )
    parser.add_argument(
        "--prompt-tokens", type=int, default=PROMPT_TOKENS, help=f"prompt tokens (default {PROMPT_TOKENS})"
    )
    parser.add_argument("--num-layers", type=int, default=24, help="joint blocks (24 = SD3-Medium; fewer: smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "M"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    SD3_MEDIUM_CONFIG["num_layers"] = args.num_layers
    LATENT, PROMPT_TOKENS = args.latent, args.prompt_tokens
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here")
    if args.worker:
        result = run_variant(args.worker[0], int(args.worker[1]), args.steps, args.warmup, args.device, args.dtype,
                             args.seed)
        emit_result(result)
        return 0

    ms = [int(v) for v in args.adapters.split(",")]
    chosen = [v for v in args.variants.split(",") if v]
    jobs = [("single", 1)] + [(variant, m) for m in ms for variant in VARIANTS[1:] if variant in chosen]
    weights = model_bytes(args.dtype)
    results, skipped = [], []
    base_cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--dtype", args.dtype,
                "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed),
                "--num-layers", str(args.num_layers), "--latent", str(args.latent),
                "--prompt-tokens", str(args.prompt_tokens)]
    for variant, m in jobs:
        if variant == "copies" and not args.device.startswith("cuda"):
            need, have = (m + 1) * weights + 2 * 2**30, available_bytes()  # m copies + the model they come from
            if need > have:
                skipped.append({"variant": variant, "m": m, "needed_gib": need / 2**30, "available_gib": have / 2**30})
                print(f"skipping copies (m={m}): needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available")
                continue
        print(f"running {variant} (m={m}) ...", flush=True)
        started = time.perf_counter()
        proc = subprocess.run([*base_cmd, "--worker", variant, str(m)], capture_output=True, text=True)
        row = worker_result(proc)
        if row is None:
            if variant == "copies":  # killed for memory: report, do not abort the others
                skipped.append({"variant": variant, "m": m, "failed_exit_code": proc.returncode})
                continue
            raise SystemExit(f"variant {variant} (m={m}) failed with exit code {proc.returncode}")
        row["wall_seconds"] = time.perf_counter() - started
        results.append(row)
        print(f"  {row['seconds_per_step']:.1f} s/step, peak {row['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)

    single = results[0]
    for row in results:
        row["time_ratio"] = row["seconds_per_step"] / single["seconds_per_step"]
        row["peak_memory_ratio"] = row["peak_memory_bytes"] / single["peak_memory_bytes"]
    command = command_line(__file__, argv)
    import torch

    meta = {
        "command": command,
        "device": args.device,
        "dtype": args.dtype,
        "timed_steps": args.steps,
        "warmup": args.warmup,
        "transformer": f"SD3-Medium architecture ({args.num_layers} joint blocks), random weights",
        "weights_gib": weights / 2**30,
        "latents": f"1x16x{LATENT}x{LATENT}, CFG batch 2, {PROMPT_TOKENS} prompt tokens",
        "lora": "rank 4 on " + ", ".join(TARGETS),
        "memory_method": single["memory_method"],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": os.environ.get("OMP_NUM_THREADS", "2"),
        "skipped": skipped,
    }
    table = [
        "| variant | m | s/step | time ratio | peak memory (GiB) | memory ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results:
        table.append(f"| {row['variant']} | {row['m'] if row['variant'] != 'single' else '-'} | "
                     f"{row['seconds_per_step']:.2f} | {row['time_ratio']:.2f}x | "
                     f"{row['peak_memory_bytes'] / 2**30:.2f} | {row['peak_memory_ratio']:.2f}x |")
    for row in skipped:
        why = (f"needs ~{row['needed_gib']:.1f} GiB, {row['available_gib']:.1f} GiB available" if "needed_gib" in row
               else f"killed (exit {row['failed_exit_code']})")
        table.append(f"| {row['variant']} | {row['m']} | not run: {why} | | | |")
    markdown = "\n".join(
        [
            f"Command: `{command}`",
            "",
            f"Device {args.device}, {args.dtype}, {args.steps} timed step(s) after {args.warmup} warm-up, "
            f"{meta['latents']}; weights {meta['weights_gib']:.2f} GiB. Memory: {meta['memory_method']}.",
            "",
            *table,
            "",
        ]
    )
    print(markdown)
    write_results(args.out, f"sd3_blend_{args.device.split(':')[0]}_{args.dtype}", meta, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
