"""Time per step and peak memory of SMC on the blend on the real SD3-Medium transformer or SD 1.5 UNet architecture.

``--family sd3`` (default): the transformer, its random weights (meta device, no download, bfloat16 by default) and
the rank-4 LoRA adapters are ``bench_sd3_blend.py``'s; every variant runs :func:`diffusion_blend.smc.smc_sample`
through the same :class:`~diffusion_blend.lora.LoraFamily` and guided SD3 forward
(:func:`~diffusion_blend.pipelines.flow_target.transformer_forward`, both CFG branches in one call, guidance 7) as
``BlendStableDiffusion3Pipeline(method="smc")`` does, with the flow SDE
(:class:`~diffusion_blend.sampling.FlowMatchSDEScheduler`, noise level 0.7), small latents (default 16 x 8 x 8: 16
image tokens), 16 prompt tokens, one prompt. ``--family sd15``: ``bench_sd_blend.py``'s SD 1.5 UNet (random weights,
rank-4 LoRA on the attention projections), the guided UNet forward of ``BlendStableDiffusionPipeline(method="smc")``
(:func:`~diffusion_blend.pipelines.sd_target.guided_forward`, guidance 7.5), DDIM eta = 1 with SD's settings, 4 x 64 x
64
latents, 77 prompt tokens. Variants:

- ``single``: ``proposal="base"``, one particle: the base model's own sampler (one guided forward per step; ratio 1);
- ``smc_N``: SMC on the DB-MPA blend of m = 2 experts with N particles (the base joins as a third member, so a step
  evaluates 3 N guided rows = 6 N transformer rows; ``routing="auto"``: one forward per member on CPU).

The reward is the mean latent (no VAE: the decode that the pipelines' Tweedie potential adds per step is not part of
these figures). Each variant runs in its own subprocess; CPU peak memory is that process's peak RSS (``ru_maxrss``),
CUDA peak is ``torch.cuda.max_memory_allocated``. Time per step is the whole ``smc_sample`` call over ``--steps``
steps divided by the steps (the first step includes warm-up).

    python benchmarks/bench_smc.py                                   # SD3, CPU, bfloat16, N = 1, 2, 2 steps
    python benchmarks/bench_smc.py --family sd15 --dtype float32     # SD 1.5 UNet, CPU, float32
    python benchmarks/bench_smc.py --num-layers 1                    # smoke run of the script (SD3)
    python benchmarks/bench_smc.py --device cuda --particles 1,2,4,8 --steps 10   # not run: no GPU lent
    python benchmarks/bench_smc.py --family sd15 --dtype float32 --particles 2 --proposal twisted  # twisted proposal

``--proposal twisted`` / ``--proposal-tilt auto|t`` apply to the ``smc_N`` variants (docs/method.md; default ``auto``,
the library's default since issue 25: the reward, the mean latent, gives the automatic tilt a signal to learn from).
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

from _common import command_line, emit_result, worker_result, write_results
from diffusion_blend.smc import SMCOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sd3_blend as sd3  # noqa: E402
import bench_sd_blend as sd15  # noqa: E402
from bench_sd_blend import _rss_bytes  # noqa: E402

EXPERTS = 2


def run_variant(family_name: str, particles: int, base_only: bool, steps: int, device: str, dtype_name: str,
                seed: int, latent: int, prompt_tokens: int, proposal: str = "blend",
                tilt: float | str = "auto") -> dict:
    import torch
    from diffusers import DDIMScheduler

    from diffusion_blend.lora import LoraFamily
    from diffusion_blend.pipelines.conditioning import (
        guided_forward,
        transformer_forward,
    )
    from diffusion_blend.preference import Preference
    from diffusion_blend.sampling import FlowMatchSDEScheduler
    from diffusion_blend.smc import smc_sample

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    dtype = getattr(torch, dtype_name)
    cuda = device.startswith("cuda")
    names = [f"reward{i}" for i in range(EXPERTS)]
    generator = torch.Generator().manual_seed(seed)
    if family_name == "sd3":
        model = sd3._random_transformer(dtype, device, seed)
        sd3._add_adapters(model, names, seed + 1, targets=sd3.TARGETS)
        family = LoraFamily(model, transformer_forward(False, 7.0, True), names)
        cond = {"encoder_hidden_states": torch.randn(1, prompt_tokens, 4096, generator=generator).to(device, dtype),
                "pooled_projections": torch.randn(1, 2048, generator=generator).to(device, dtype)}
        cond.update(negative_encoder_hidden_states=torch.zeros_like(cond["encoder_hidden_states"]),
                    negative_pooled_projections=torch.zeros_like(cond["pooled_projections"]))
        scheduler, eta, shape = FlowMatchSDEScheduler(shift=3.0), 0.7, (1, 16, latent, latent)
    else:
        model = sd15._random_unet(dtype, device, seed)
        sd15._add_adapters(model, names, seed + 1)
        family = LoraFamily(model, guided_forward(7.5), names)
        embeds = torch.randn(2, sd15.PROMPT_TOKENS, 768, generator=generator).to(device, dtype)
        cond = {"encoder_hidden_states": embeds[1:], "negative_encoder_hidden_states": embeds[:1]}
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        eta, shape = 1.0, (1, 4, 64, 64)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup_bytes = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    start = time.perf_counter()
    out = smc_sample(
        family,
        Preference({name: 1.0 / EXPERTS for name in names}),
        scheduler,
        reward=lambda x: x.float().mean((1, 2, 3)),
        alpha=0.1,
        generator=seed,
        options=SMCOptions(
            particles=particles, proposal="base" if base_only else proposal, proposal_tilt=1.0 if base_only else tilt
        ),
        shape=shape,
        num_inference_steps=steps,
        eta=eta,
        cond=cond,
        progress=False,
        device=device,
        dtype=dtype,
    )
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the variant's process"
    return {"variant": "single" if base_only else f"smc_{particles}", "particles": particles,
            "seconds_per_step": seconds / steps, "network_evaluations": out.network_evaluations,
            "memory_after_setup_bytes": setup_bytes, "peak_memory_bytes": peak, "memory_method": method,
            "finite": bool(torch.isfinite(out.samples).all())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd3", choices=("sd3", "sd15"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--steps", type=int, default=2, help="sampler steps per variant (default 2)")
    parser.add_argument("--particles", default="1,2", help="comma-separated N values (default 1,2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--proposal", default="blend", choices=("blend", "twisted"), help="the smc_N variants' proposal"
    )
    parser.add_argument("--proposal-tilt", type=lambda v: v if v == "auto" else float(v), default="auto",
                        help="the smc_N variants' proposal tilt: auto (the library's default) or a number")
    parser.add_argument("--latent", type=int, default=sd3.LATENT, help=f"latent side (default {sd3.LATENT})")
    parser.add_argument("--prompt-tokens", type=int, default=sd3.PROMPT_TOKENS)
    parser.add_argument("--num-layers", type=int, default=24, help="joint blocks (24 = SD3-Medium; fewer: smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", nargs=2, metavar=("PARTICLES", "BASE_ONLY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sd3.SD3_MEDIUM_CONFIG["num_layers"] = args.num_layers
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here")
    if args.worker:
        result = run_variant(args.family, int(args.worker[0]), args.worker[1] == "1", args.steps, args.device,
                             args.dtype, args.seed, args.latent, args.prompt_tokens, args.proposal, args.proposal_tilt)
        emit_result(result)
        return 0

    jobs = [(1, True)] + [(int(n), False) for n in args.particles.split(",") if n]
    base_cmd = [sys.executable, str(Path(__file__).resolve()), "--family", args.family, "--device", args.device,
                "--dtype", args.dtype,
                "--steps", str(args.steps), "--seed", str(args.seed), "--num-layers", str(args.num_layers),
                "--latent", str(args.latent), "--prompt-tokens", str(args.prompt_tokens), "--proposal", args.proposal,
                "--proposal-tilt", str(args.proposal_tilt)]
    results = []
    for particles, base_only in jobs:
        print(f"running {'single' if base_only else f'smc_{particles}'} ...", flush=True)
        started = time.perf_counter()
        proc = subprocess.run([*base_cmd, "--worker", str(particles), "1" if base_only else "0"], capture_output=True,
                              text=True)
        row = worker_result(proc)
        if row is None:
            raise SystemExit(f"variant N={particles} failed with exit code {proc.returncode}")
        row["wall_seconds"] = time.perf_counter() - started
        results.append(row)
        print(f"  {row['seconds_per_step']:.1f} s/step, peak {row['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
    single = results[0]
    for row in results:
        row["time_ratio"] = row["seconds_per_step"] / single["seconds_per_step"]
        row["peak_memory_ratio"] = row["peak_memory_bytes"] / single["peak_memory_bytes"]
    command = command_line(__file__, argv)
    import torch

    if args.family == "sd3":
        network = f"SD3-Medium transformer architecture ({args.num_layers} joint blocks), random weights"
        latents = f"16x{args.latent}x{args.latent} per particle, CFG, {args.prompt_tokens} prompt tokens"
    else:
        network, latents = "SD 1.5 UNet architecture, random weights", "4x64x64 per particle, CFG, 77 prompt tokens"
    meta = {"command": command, "device": args.device, "dtype": args.dtype, "steps": args.steps, "network": network,
            "experts": EXPERTS, "latents": latents, "proposal": args.proposal, "proposal_tilt": args.proposal_tilt,
            "torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "threads": os.environ.get("OMP_NUM_THREADS", "2"), "memory_method": single["memory_method"]}
    table = ["| variant | guided rows / step | s/step | time ratio | peak memory (GiB) | memory ratio |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in results:
        table.append(
            f"| {row['variant']} | {row['network_evaluations'] / args.steps:g} | {row['seconds_per_step']:.2f} | "
            f"{row['time_ratio']:.2f}x | {row['peak_memory_bytes'] / 2**30:.2f} | {row['peak_memory_ratio']:.2f}x |"
        )
    markdown = "\n".join([f"Command: `{command}`", "",
                          f"Device {args.device}, {args.dtype}, {args.steps} steps per variant, {meta['latents']}, "
                          f"m = {EXPERTS} experts, {args.proposal} proposal (tilt {args.proposal_tilt}); {network}. "
                          f"Memory: {meta['memory_method']}.",
                          "", *table, ""])
    print(markdown)
    suffix = (
        "" if (args.proposal, args.proposal_tilt) == ("blend", "auto") else f"_{args.proposal}_t{args.proposal_tilt}"
    )
    write_results(args.out, f"smc_{args.family}_{args.device.split(':')[0]}_{args.dtype}{suffix}", meta, results,
                  markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
