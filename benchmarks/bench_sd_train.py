"""Peak memory and seconds of ONE fine-tuning iteration on the real Stable Diffusion 1.5 (or SDXL) UNet architecture.

The UNet is ``UNet2DConditionModel`` built from the SD 1.5 config (``bench_sd_blend.SD15_UNET_CONFIG``) on the
meta device and filled with random weights directly in the run's dtype (no download, no float32 copy); the VAE
is small but has SD's latent interface (4 latent channels, 8x downsampling, scaling factor 0.18215) and the text
encoder is a 1-layer CLIP text model of SD 1.5's width (768, 77 tokens), as docs/environment notes describe.
``--family sdxl``: the SDXL 1.0 base UNet (``SDXL_UNET_CONFIG``, 2.6 B parameters, ``text_time`` added conditioning),
two 1-layer text encoders of SDXL's widths (768; 1280 with a 1280 projection) and scaling factor 0.13025. The
iteration is the library's own trainer (``training.dpok.finetune`` on ``pipelines.finetune.sd_finetune_target``):
CFG 7.5, DDIM eta 1, rank-4 LoRA on the attention projections, reward ``brightness`` (differentiable, weight-free).

Each configuration runs in its own subprocess (peak memory is not polluted by the others): on CPU the peak is the
subprocess's peak resident set size (``ru_maxrss``: Python/torch runtime + weights + activations), on CUDA
``torch.cuda.max_memory_allocated``. Ratios are printed and written as JSON and Markdown.

On CPU the workers run with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``, default 128 KiB;
``--malloc-mmap-threshold 0`` keeps glibc's dynamic default). With the dynamic default, freeing a large block raises
the threshold, later activations of up to 32 MiB come from the heap, and the heap keeps what it was given, so the
resident peak can grow with the number of alloc/free cycles rather than with the live tensors. On a reduced-width SD
UNet (``--family sd15-narrow``: channels 64-256, 256 px, pathwise, step checkpointing, 1 thread), 16 / 4 steps peak
at 1.54x with the dynamic threshold and 1.05x with it fixed (commands: benchmarks/README.md). torch's CPU allocator
has no ``max_memory_allocated``; with the threshold fixed the resident peak tracks the live tensors more closely (on
CUDA the caching allocator's statistic is used instead).

    python benchmarks/bench_sd_train.py                                   # the bars' configurations, CPU, 256 px
    python benchmarks/bench_sd_train.py --configs score_b1,score_b2,score_b4,score_b8
    python benchmarks/bench_sd_train.py --family sdxl --configs score_b1,score_b2,pathwise_s1_ckpt,pathwise_s4_ckpt
    python benchmarks/bench_sd_train.py --device cuda --resolution 512    # the GPU check (not run yet)
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

HERE = Path(__file__).resolve().parent

# name -> (estimator, batch_size, minibatch_size, steps, dtype, gradient_checkpointing)
CONFIGS = {
    "score_b1": ("score", 1, 1, 2, "float32", False),
    "score_b2": ("score", 2, 1, 2, "float32", False),
    "score_b4": ("score", 4, 1, 2, "float32", False),
    "score_b8": ("score", 8, 1, 2, "float32", False),
    "score_b1_bf16": ("score", 1, 1, 2, "bfloat16", False),
    "score_b1_ckpt": ("score", 1, 1, 2, "float32", True),
    "pathwise_s1": ("pathwise", 1, 1, 1, "float32", False),
    "pathwise_s1_ckpt": ("pathwise", 1, 1, 1, "float32", True),
    "pathwise_s4_ckpt": ("pathwise", 1, 1, 4, "float32", True),
    "pathwise_s8_ckpt": ("pathwise", 1, 1, 8, "float32", True),
    "pathwise_s16_ckpt": ("pathwise", 1, 1, 16, "float32", True),
}
DEFAULT = ("score_b1,score_b8,pathwise_s4_ckpt,pathwise_s16_ckpt,pathwise_s1,pathwise_s1_ckpt,score_b1_ckpt,"
           "score_b1_bf16")
# (numerator, denominator, what, bar): the bars and the time cost of checkpointing
RATIOS = [
    ("score_b8", "score_b1", "peak memory, batch 8 / batch 1 (minibatch 1)", 1.15),
    ("pathwise_s16_ckpt", "pathwise_s4_ckpt", "peak memory, pathwise + checkpointing, 16 / 4 steps", 1.15),
    ("score_b1_bf16", "score_b1", "peak memory, bfloat16 / float32", 0.6),
    ("score_b2", "score_b1", "peak memory, batch 2 / batch 1 (minibatch 1)", None),
    ("pathwise_s8_ckpt", "pathwise_s4_ckpt", "peak memory, pathwise + checkpointing, 8 / 4 steps", None),
    ("pathwise_s4_ckpt", "pathwise_s1_ckpt", "peak memory, pathwise + checkpointing, 4 / 1 steps", None),
    ("pathwise_s1_ckpt", "pathwise_s1", "peak memory, pathwise 1 step, checkpointing on / off", None),
    ("score_b1_ckpt", "score_b1", "peak memory, score update, block checkpointing on / off", None),
]
TIME_RATIOS = [
    ("pathwise_s1_ckpt", "pathwise_s1", "seconds, pathwise 1 step, checkpointing on / off"),
    ("score_b1_ckpt", "score_b1", "seconds, score iteration, block checkpointing on / off"),
    ("score_b8", "score_b1", "seconds, batch 8 / batch 1"),
    ("score_b1_bf16", "score_b1", "seconds, bfloat16 / float32"),
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


# --family -> results file stem; sd15-narrow is SD 1.5's layout at channels 64-256 (the allocator diagnosis: minutes,
# not hours, per pathwise run)
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
    tokenizer = make_tokenizer(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_sd_train_tokenizer_{os.getpid()}")
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


def run_config(name: str, device: str, resolution: int, seed: int, family: str = "sd15") -> dict:
    import torch
    from accelerate import Accelerator

    from diffusion_blend.pipelines.sd_target import sd_finetune_target
    from diffusion_blend.rewards import get_reward
    from diffusion_blend.training.config import DPOKConfig
    from diffusion_blend.training.dpok import finetune

    estimator, batch, minibatch, steps, dtype, checkpointing = CONFIGS[name]
    cuda = device.startswith("cuda")
    pipe = build_pipeline(dtype, seed, family)
    target = sd_finetune_target(pipe, ["a photograph of a cat", "a red house by the sea"],
                                {"brightness": get_reward("brightness")}, guidance_scale=7.5, resolution=resolution)
    config = DPOKConfig(reward_weights={"brightness": 1.0}, alpha=0.1, iterations=1, batch_size=batch,
                        minibatch_size=minibatch, updates_per_batch=1, learning_rate=1e-4, lora_rank=4,
                        num_inference_steps=steps, eta=1.0, estimator=estimator, dtype=dtype,
                        gradient_checkpointing=checkpointing)
    accelerator = Accelerator(cpu=not cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    result = finetune(target, config, accelerator=accelerator, progress=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        method = "peak RSS of the configuration's process (ru_maxrss)"
    return {"config": name, "estimator": estimator, "batch_size": batch, "minibatch_size": minibatch,
            "steps": steps, "dtype": dtype, "gradient_checkpointing": checkpointing, "seconds": seconds,
            "peak_memory_bytes": peak, "peak_before_training_bytes": setup_rss, "memory_method": method,
            "objective": result.curves[-1]["objective"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--family", default="sd15", choices=tuple(FAMILY_STEMS),
                        help="UNet architecture: SD 1.5 (default), SDXL 1.0 base, or SD 1.5's layout at channels "
                             "64-256 (sd15-narrow)")
    parser.add_argument("--resolution", type=int, default=256, help="pixels (default 256)")
    parser.add_argument("--configs", default=DEFAULT, help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                        help="CPU workers: glibc MALLOC_MMAP_THRESHOLD_ in bytes (default 131072; 0 = glibc's "
                             "dynamic default)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("bench_sd_train: error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        row = run_config(args.worker, args.device, args.resolution, args.seed, args.family)
        emit_result(row)
        return 0

    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        print(f"bench_sd_train: error: unknown configuration(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1")
    if args.malloc_mmap_threshold < 0:
        print("bench_sd_train: error: --malloc-mmap-threshold must be >= 0", file=sys.stderr)
        return 2
    if args.malloc_mmap_threshold and not args.device.startswith("cuda"):
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    base_cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--family", args.family,
                "--resolution", str(args.resolution), "--seed", str(args.seed), "--threads", str(args.threads)]
    results: dict[str, dict] = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        proc = subprocess.run([*base_cmd, "--worker", name], capture_output=True, text=True, env=env)
        row = worker_result(proc)
        if row is None:
            print(f"bench_sd_train: error: configuration {name} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results[name] = row
        print(f"  {row['seconds']:.1f} s, peak {row['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)

    command = command_line(__file__, argv)
    table = ["| config | estimator | batch | minibatch | steps | dtype | checkpointing | s / iteration | "
             "peak memory (GiB) | peak before training (GiB) |", "|" + " --- |" * 10]
    for row in results.values():
        table.append(f"| {row['config']} | {row['estimator']} | {row['batch_size']} | {row['minibatch_size']} | "
                     f"{row['steps']} | {row['dtype']} | {'on' if row['gradient_checkpointing'] else 'off'} | "
                     f"{row['seconds']:.1f} | {row['peak_memory_bytes'] / 2**30:.2f} | "
                     f"{row['peak_before_training_bytes'] / 2**30:.2f} |")
    ratios = ["| ratio | value | bar |", "| --- | --- | --- |"]
    for numerator, denominator, what, bar in RATIOS:
        if numerator in results and denominator in results:
            value = results[numerator]["peak_memory_bytes"] / results[denominator]["peak_memory_bytes"]
            verdict = "-" if bar is None else f"<= {bar} ({'met' if value <= bar else 'NOT met'})"
            ratios.append(f"| {what} | {value:.2f}x | {verdict} |")
    for numerator, denominator, what in TIME_RATIOS:
        if numerator in results and denominator in results:
            value = results[numerator]["seconds"] / results[denominator]["seconds"]
            ratios.append(f"| {what} | {value:.2f}x | - |")
    import torch

    meta = {"command": command, "family": args.family, "device": args.device, "resolution": args.resolution,
            "threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_", "glibc default (dynamic)"),
            "memory_method": next(iter(results.values()))["memory_method"] if results else None}
    markdown = "\n".join([f"Command: `{command}`", "",
                          f"UNet {args.family}, device {args.device}, {args.resolution} px, {args.threads} threads, "
                          f"one iteration per configuration in its own process. Memory: {meta['memory_method']}; glibc "
                          f"MALLOC_MMAP_THRESHOLD_: {meta['malloc_mmap_threshold']}.", "", *table, "",
                          *ratios, ""])
    print(markdown)
    stem = f"{FAMILY_STEMS[args.family]}_train_{args.device.split(':')[0]}_{args.resolution}"
    write_results(args.out, stem, meta, results, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
