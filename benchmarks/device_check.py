"""One prepared GPU check: blending, SMC and the trainer on the real architectures, as ratios from one run.

ONE command on one GPU with about 78 GB, meant to finish within 9 minutes including model construction (random
weights from configs, nothing downloaded, fixed seeds, warm-up excluded from every timing):

- SD 1.5 UNet architecture, 512 px (64 x 64 latents), float16, CFG 7.5, DDIM eta 1, 50 steps: the base alone vs
  DB-MPA with m = 2 and 3 rank-4 LoRA experts under ``routing`` auto / batched / sequential, DB-MPA-LS, and the
  reference code's m merged model copies: seconds per image, peak memory and the routing ``auto`` chose;
- SDXL 1.0 base UNet, 1024 px, float16, CFG 5, 50 steps, and the SD3-Medium transformer, 1024 px, bfloat16, CFG 7,
  flow SDE 0.7, 28 steps: the base vs DB-MPA m = 2 (``auto``, ``sequential``) and DB-MPA-LS;
- SMC on the blend, N = 4 particles, m = 2 (SD 1.5 architecture, 50 steps; reward the mean latent, no VAE): seconds
  per image against DB-MPA m = 2 (``auto``);
- the trainer through ``dblend finetune`` (``bench_sd_train.py``'s commands) on a pipeline folder with the SD 1.5 UNet
  architecture, 512 px, 2 iterations (the second is timed): batch 1 vs 8 (score, 2 steps), pathwise 4 vs 16 steps
  with step checkpointing, float16 / bfloat16 vs float32: peak memory (the command's
  ``torch.cuda.max_memory_allocated``) and seconds per iteration.

Each image row is timed inside one worker process per architecture (the model built once; ``reset_peak_memory_stats``
before each row, so a row's peak includes the resident base weights and whatever the row adds); every trainer row is
its own ``dblend finetune`` process. Seconds per image are the denoising loop (``steps`` network steps after
``warmup`` untimed ones), without text encoding or VAE decoding.

The command prints its plan first: every row with its ESTIMATED device seconds (``--plan`` prints only that). The
estimates are not measurements: FLOPs per network forward counted with ``torch.utils.flop_counter`` on the meta
device (``--count-flops`` recounts them), divided by an assumed effective H100 throughput (250 TFLOP/s in float16 /
bfloat16, about a quarter of the dense peak, as eager diffusers models reach; 40 TFLOP/s in float32), plus 30 ms per
network call (kernel launches and Python in the launch-bound regime of one image) and fixed costs for process start,
model construction and loading. Rows that would not fit the time left (``--budget``, default 540 s; estimates scaled
by how much slower than estimated the finished rows were) are skipped and named with the reason. Rows are written as
they finish: ``device_check.json`` and ``device_check.md`` under ``$OUT`` when set, else ``benchmarks/results/``.

``--smoke``: the same rows on CPU with the tiny models of ``diffusion_blend.pipelines.tiny`` (float32 images, the
trainer's float16 / bfloat16 rows in their dtypes), a few steps: a check that the script runs
(``tests/test_device_check.py``).

    python benchmarks/device_check.py --plan      # rows and estimated seconds; runs nothing
    python benchmarks/device_check.py             # on the GPU (about 9 minutes)
    python benchmarks/device_check.py --smoke     # CPU, tiny models, under two minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULT, SKIP = "ROW ", "SKIP "

# FLOPs of one network forward of ONE row, counted with torch.utils.flop_counter.FlopCounterMode on the meta device
# (`python benchmarks/device_check.py --count-flops`); a training forward + backward is 3 forwards (counted: 3.00x)
FLOPS_PER_ROW = {"sd15": 803.3e9, "sdxl": 6761.2e9, "sd3": 8904.3e9}
HALF_FLOPS, FP32_FLOPS, CALL_OVERHEAD = 250e12, 40e12, 0.03  # assumed H100 effective rates (see the docstring)
PROCESS_START, LOAD_SD15_BASE, WRITE_SD15_BASE = 12.0, 10.0, 25.0  # assumed seconds
BUILD = {"sd15": 3.0, "sdxl": 6.0, "sd3": 6.0}  # assumed seconds to construct and fill a model on the GPU


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    group: str  # sd15 | sdxl | sd3 (image rows, one worker process each) | train (dblend finetune processes)
    what: str
    variant: str  # single | mpa | ls | copies | smc | a bench_sd_train configuration
    m: int = 0
    routing: str | None = None
    baseline: str | None = None  # the row the ratios divide by


def _image_rows(group: str, label: str, ms: tuple[int, ...], routings: tuple[str, ...], copies: bool) -> list[Row]:
    single = f"{group}_single"
    rows = [Row(single, group, f"{label}: base model alone", "single")]
    for m in ms:
        rows += [Row(f"{group}_mpa{m}_{r}", group, f"{label}: DB-MPA m = {m}, routing {r}", "mpa", m, r, single)
                 for r in routings]
        rows.append(Row(f"{group}_ls{m}", group, f"{label}: DB-MPA-LS m = {m} (routing auto)", "ls", m, "auto",
                        single))
        if copies:
            rows.append(Row(f"{group}_copies{m}", group, f"{label}: reference code, {m} merged model copies",
                            "copies", m, None, single))
    return rows


TRAIN_ROWS = [
    ("score_b1", None, "batch 1, score, 2 steps, float32 (the trainer's reference)"),
    ("score_b8", "score_b1", "batch 8 (minibatch 1), score, 2 steps, float32"),
    ("pathwise_s4", None, "pathwise, 4 steps, step checkpointing, float32"),
    ("pathwise_s16", "pathwise_s4", "pathwise, 16 steps, step checkpointing, float32"),
    ("score_b1_fp16", "score_b1", "batch 1, score, 2 steps, float16"),
    ("score_b1_bf16", "score_b1", "batch 1, score, 2 steps, bfloat16"),
]
ROWS = [
    *_image_rows("sd15", "SD 1.5 UNet 512 px fp16", (2, 3), ("auto", "batched", "sequential"), True),
    Row("sd15_smc4", "sd15", "SD 1.5 UNet 512 px fp16: SMC on the blend, N = 4, m = 2", "smc", 2, "auto",
        "sd15_mpa2_auto"),
    *_image_rows("sdxl", "SDXL UNet 1024 px fp16", (2,), ("auto", "sequential"), False),
    *_image_rows("sd3", "SD3-Medium transformer 1024 px bf16", (2,), ("auto", "sequential"), False),
    *[Row(f"train_{name}", "train", f"dblend finetune, SD 1.5 UNet 512 px: {what}", name,
          baseline=None if base is None else f"train_{base}") for name, base, what in TRAIN_ROWS],
]
GROUPS = ("sd15", "sdxl", "sd3", "train")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Per-architecture sizes: the full check's (GPU) or the smoke run's (CPU, tiny models)."""

    device: str
    dtypes: dict[str, str]
    latent: dict[str, int]
    tokens: dict[str, int]
    steps: dict[str, int]
    warmup: int
    particles: int
    train_resolution: int | None
    train_iterations: int
    smoke: bool


FULL = Settings("cuda", {"sd15": "float16", "sdxl": "float16", "sd3": "bfloat16"},
                {"sd15": 64, "sdxl": 128, "sd3": 128}, {"sd15": 77, "sdxl": 77, "sd3": 333},
                {"sd15": 50, "sdxl": 50, "sd3": 28}, warmup=3, particles=4, train_resolution=512, train_iterations=2,
                smoke=False)
SMOKE = Settings("cpu", {"sd15": "float32", "sdxl": "float32", "sd3": "float32"},
                 {"sd15": 8, "sdxl": 8, "sd3": 8}, {"sd15": 8, "sdxl": 8, "sd3": 8},
                 {"sd15": 2, "sdxl": 2, "sd3": 2}, warmup=1, particles=4, train_resolution=None, train_iterations=2,
                 smoke=True)
GUIDANCE = {"sd15": 7.5, "sdxl": 5.0, "sd3": 7.0}


# ---------------------------------------------------------------------------------------------------- estimates
def _call_seconds(group: str, rows: int, settings: Settings) -> float:
    return CALL_OVERHEAD + rows * FLOPS_PER_ROW[group] * (settings.latent[group] / FULL.latent[group]) ** 2 / HALF_FLOPS


def _train_seconds(name: str) -> float:
    """One training iteration at 512 px on SD 1.5 (module docstring: FLOPs / assumed rate + call overheads)."""
    import bench_sd_train

    estimator, batch, steps, dtype, _ = bench_sd_train.CONFIGS[name]
    rate = FP32_FLOPS if dtype == "float32" else HALF_FLOPS
    row = FLOPS_PER_ROW["sd15"]
    if estimator == "score":  # rollout: policy + base, CFG: 4 rows; update: 2 rows x (forward, backward, recompute)
        calls, flops = batch * steps * 4, batch * steps * (4 * row + 2 * row * 4)
    else:  # pathwise with step checkpointing: forward, recompute, backward of 4 rows per step
        calls, flops = steps * 12, steps * 4 * row * 4
    return calls * CALL_OVERHEAD + flops / rate


SMOKE_IMAGE_ROW, SMOKE_TRAIN_ROW, SMOKE_SETUP = 1.0, 3.0, 8.0  # CPU smoke run, tiny models (assumed seconds)


def estimate(row: Row, settings: Settings) -> float:
    """Estimated device seconds of one row (the plan; module docstring says how)."""
    if settings.smoke:
        return SMOKE_TRAIN_ROW if row.group == "train" else SMOKE_IMAGE_ROW
    if row.group == "train":
        iterations = settings.train_iterations * _train_seconds(row.variant) + 3.0  # + the first iteration's warm-up
        return PROCESS_START + LOAD_SD15_BASE + iterations
    steps = settings.steps[row.group] + settings.warmup
    if row.variant == "single":
        per_step = _call_seconds(row.group, 2, settings)
    elif row.variant in ("mpa", "copies"):
        batched = row.routing in ("auto", "batched")
        per_step = (_call_seconds(row.group, 2 * row.m, settings) if batched
                    else row.m * _call_seconds(row.group, 2, settings))
    elif row.variant == "ls":
        per_step = _call_seconds(row.group, 2, settings)
    else:  # smc: N particles x (m + 1 members) x CFG rows, one batched call
        per_step = _call_seconds(row.group, settings.particles * (row.m + 1) * 2, settings)
    extra = row.m * BUILD[row.group] if row.variant == "copies" else 0.0
    return 2.0 + extra + steps * per_step  # 2 s: the row's first-call warm-up (kernels, handles)


def group_setup(group: str, settings: Settings) -> float:
    """Seconds before a group's first row: the worker's start and model construction, or the trainer's base."""
    if settings.smoke:
        return SMOKE_SETUP if group == "sd15" else 1.0  # smoke: one worker for all image rows
    if group == "train":
        return WRITE_SD15_BASE
    return PROCESS_START + BUILD[group]


def estimated_total(rows: list[Row], settings: Settings) -> float:
    groups = {row.group for row in rows}
    return (PROCESS_START + sum(group_setup(g, settings) for g in groups)
            + sum(estimate(row, settings) for row in rows))


def plan_lines(rows: list[Row], settings: Settings) -> list[str]:
    total = PROCESS_START
    lines = [f"  check: setup {PROCESS_START:5.1f} s (this process: imports, the report)"]
    for group in GROUPS:
        chosen = [row for row in rows if row.group == group]
        if not chosen:
            continue
        setup = group_setup(group, settings)
        total += setup
        what = "write the SD 1.5 pipeline folder" if group == "train" else "process start, model construction"
        lines.append(f"  {group}: setup {setup:5.1f} s ({what})")
        for row in chosen:
            seconds = estimate(row, settings)
            total += seconds
            lines.append(f"    {row.id:<24} {seconds:6.1f} s  {row.what}")
    kind = "CPU smoke run (tiny models): the GPU estimates do not apply" if settings.smoke else "one H100"
    return [f"plan ({kind}): {len(rows)} rows, estimated {total:.0f} s = {total / 60:.1f} min of device time "
            "(ESTIMATES: FLOP counts / assumed throughput + fixed costs, see --help)", *lines]


# ---------------------------------------------------------------------------------------------------- models
def _model_class(group: str):
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    return SD3Transformer2DModel if group == "sd3" else UNet2DConditionModel


def model_config(group: str, settings: Settings, tmp: Path) -> dict:
    """The real architecture's config (full check) or the tiny pipeline's (smoke)."""
    if settings.smoke:
        from diffusion_blend.pipelines import tiny

        builder = {"sd15": tiny.tiny_sd_pipeline, "sdxl": tiny.tiny_sdxl_pipeline, "sd3": tiny.tiny_sd3_pipeline}
        pipe = builder[group](tmp)
        model = pipe.transformer if group == "sd3" else pipe.unet
        return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    from bench_sd3_blend import SD3_MEDIUM_CONFIG
    from bench_sd_blend import SD15_UNET_CONFIG
    from bench_sd_train import SDXL_UNET_CONFIG

    return dict({"sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG, "sd3": SD3_MEDIUM_CONFIG}[group])


def random_model(group: str, config: dict, dtype: Any, device: str, seed: int):
    """The architecture built on the meta device and filled on ``device`` in ``dtype``: N(0, 0.02^2) weights, unit
    norm scales, zero biases and buffers (no float32 copy, nothing downloaded)."""
    import torch

    with torch.device("meta"):
        model = _model_class(group).from_config(config)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    model = model.to_empty(device=device)
    from _common import fill_random_

    return fill_random_(model, torch.Generator(device=device).manual_seed(seed))


def conditioning(group: str, config: dict, settings: Settings, device: str, dtype: Any) -> dict:
    """Random ``[uncond; cond]`` conditioning of the architecture's shapes (2 rows)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    tokens = settings.tokens[group]

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    if group == "sd3":
        return {"encoder_hidden_states": randn(2, tokens, config["joint_attention_dim"]),
                "pooled_projections": randn(2, config["pooled_projection_dim"])}
    cond = {"encoder_hidden_states": randn(2, tokens, config["cross_attention_dim"])}
    if group == "sdxl":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        cond["added_cond_kwargs"] = {"text_embeds": randn(2, pooled), "time_ids": randn(2, 6)}
    return cond


def scheduler_of(group: str):
    if group == "sd3":
        from diffusion_blend.sampling import FlowMatchSDEScheduler

        return FlowMatchSDEScheduler(shift=3.0, noise_level=0.7)
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


# ---------------------------------------------------------------------------------------------------- image rows
class ImageWorker:
    """One architecture's rows in one process: the model built once, each row timed after its own warm-up."""

    def __init__(self, group: str, settings: Settings, tmp: Path):
        import torch

        from bench_sd_blend import _add_adapters

        self.torch, self.group, self.settings = torch, group, settings
        self.device, self.dtype = settings.device, getattr(torch, settings.dtypes[group])
        self.config = model_config(group, settings, tmp)
        self.model = random_model(group, self.config, self.dtype, self.device, seed=0)
        self.cond = conditioning(group, self.config, settings, self.device, self.dtype)
        channels = int(self.config.get("in_channels", 4))
        self.latents = torch.randn(1, channels, settings.latent[group], settings.latent[group],
                                   generator=torch.Generator().manual_seed(2)).to(self.device, self.dtype)
        self.names = [f"reward{i}" for i in range(3)]
        self.with_adapters = False
        self._add_adapters = _add_adapters

    def _ensure_adapters(self) -> None:
        if not self.with_adapters:  # after `single`, which times the plain model
            from bench_sd3_blend import TARGETS as SD3_TARGETS
            from bench_sd_blend import TARGETS

            self._add_adapters(self.model, self.names, seed=1, targets=SD3_TARGETS if self.group == "sd3" else TARGETS)
            self.model.to(self.device)
            self.with_adapters = True

    def call(self, net, x, t):
        if self.group == "sd3":
            return net(hidden_states=x, timestep=t.expand(x.shape[0]).to(self.device), return_dict=False,
                       **self.cond)[0]
        return net(x, t, return_dict=False, **self.cond)[0]

    def _sync(self) -> float:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def _reset_memory(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def _peak(self) -> tuple[int, str]:
        if self.device.startswith("cuda"):
            return self.torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the worker process"

    def image_seconds(self, predict) -> float:
        """Warm-up steps, then ``steps`` timed steps of the CFG sampler loop (DDIM eta 1 / flow SDE)."""
        torch, settings = self.torch, self.settings
        scheduler = scheduler_of(self.group)
        steps, warmup, guidance = settings.steps[self.group], settings.warmup, GUIDANCE[self.group]
        scheduler.set_timesteps(warmup + steps, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(3)
        x, start = self.latents, None
        with torch.no_grad():
            for index, t in enumerate(scheduler.timesteps):
                if index == warmup:
                    start = self._sync()
                uncond, cond = predict(torch.cat([x, x]), t).float().chunk(2)
                guided = (uncond + guidance * (cond - uncond)).to(x.dtype)
                extra = {} if self.group == "sd3" else {"eta": 1.0}
                x = scheduler.step(guided, t, x, generator=generator, **extra).prev_sample
        return self._sync() - start

    def run(self, row: Row) -> dict:
        from bench_sd_blend import _merged_copies
        from diffusion_blend.pipelines.blend import DenoiserBlend
        from diffusion_blend.preference import Preference, blend_predictions

        self._reset_memory()
        if row.variant == "single":
            seconds = self.image_seconds(lambda x, t: self.call(self.model, x, t))
            return self._row(row, seconds)
        self._ensure_adapters()
        preference = Preference({name: 1.0 / row.m for name in self.names[:row.m]})
        if row.variant == "copies":
            copies = _merged_copies(self.model, self.names[:row.m],
                                    lambda: random_model(self.group, self.config, self.dtype, self.device, seed=0))
            seconds = self.image_seconds(
                lambda x, t: blend_predictions([1.0 / row.m] * row.m, [self.call(c, x, t) for c in copies]))
            del copies
            return self._row(row, seconds)
        if row.variant == "smc":
            return self._row(row, self.smc_seconds(preference, row))
        blend = DenoiserBlend(self.model, preference, row.variant, switch_generator=4 if row.variant == "ls" else None,
                              guided_copies=lambda: 2, routing=row.routing)
        seconds = self.image_seconds(lambda x, t: self.call(blend, x, t))
        return self._row(row, seconds, blend.routing_used, blend.forwards)

    def smc_seconds(self, preference, row: Row) -> float:
        """``smc_sample`` (the pipelines' ``method="smc"`` loop) with the guided UNet forward: warm-up call, timed
        call of ``steps`` steps."""
        from diffusion_blend.lora import LoraFamily
        from diffusion_blend.pipelines.conditioning import guided_forward
        from diffusion_blend.smc import SMCOptions, smc_sample

        family = LoraFamily(self.model, guided_forward(GUIDANCE[self.group]), self.names[:row.m], routing=row.routing)
        embeds = self.cond["encoder_hidden_states"]
        cond = {"encoder_hidden_states": embeds[1:], "negative_encoder_hidden_states": embeds[:1]}
        self.family = family

        def sample(steps: int) -> None:
            smc_sample(family, preference, scheduler_of(self.group), reward=lambda x: x.float().mean((1, 2, 3)),
                       alpha=0.1, generator=5, options=SMCOptions(particles=self.settings.particles),
                       shape=tuple(self.latents.shape), num_inference_steps=steps, eta=1.0, cond=cond,
                       progress=False, device=self.device, dtype=self.dtype)

        sample(self.settings.warmup)
        start = self._sync()
        sample(self.settings.steps[self.group])
        return self._sync() - start

    def _row(self, row: Row, seconds: float, routing_used: str | None = None, forwards: int | None = None) -> dict:
        if row.variant == "smc":
            routing_used = self.family.last_routing
        peak, method = self._peak()
        return {"id": row.id, "status": "measured", "seconds_per_image": seconds, "peak_memory_bytes": peak,
                "memory_method": method, "routing_used": routing_used, "network_forwards": forwards,
                "steps": self.settings.steps[self.group], "dtype": self.settings.dtypes[self.group]}


def worker_main(groups: list[str], row_ids: list[str], settings: Settings, deadline: float, factor: float) -> int:
    """The worker's side: one ``ROW <json>`` / ``SKIP <json>`` line per row, as each finishes (the groups in turn:
    one group per worker on the GPU, all image groups in one worker in the smoke run)."""
    import torch

    if not settings.device.startswith("cuda"):
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    for group in groups:
        rows = [row for row in ROWS if row.id in row_ids and row.group == group]
        if rows:
            _worker_group(group, rows, settings, deadline, factor)
    return 0


def _worker_group(group: str, rows: list[Row], settings: Settings, deadline: float, factor: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        worker = ImageWorker(group, settings, Path(tmp))
        for row in rows:
            needed = estimate(row, settings) * factor
            if time.time() + needed > deadline:
                print(SKIP + json.dumps({"id": row.id, "status": "skipped", "reason": f"would not fit: estimated "
                                         f"{needed:.0f} s, {max(0.0, deadline - time.time()):.0f} s left"}),
                      flush=True)
                continue
            started = time.time()
            try:
                result = worker.run(row)
            except Exception as err:  # noqa: BLE001 - one row's failure is reported, the others still run
                result = {"id": row.id, "status": "failed", "reason": f"{type(err).__name__}: "
                          f"{' '.join(str(err).split())[:300]}"}
            result["row_seconds"] = time.time() - started
            print(RESULT + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------- the parent
class Report:
    """The results so far, rewritten (JSON and Markdown, atomically) after every row."""

    def __init__(self, out: Path, meta: dict, rows: list[Row], settings: Settings):
        self.out, self.meta, self.rows, self.settings = out, meta, rows, settings
        self.results: dict[str, dict] = {row.id: {"id": row.id, "status": "pending"} for row in rows}
        self.estimates = {row.id: estimate(row, settings) for row in rows}

    def update(self, result: dict) -> None:
        self.results[result["id"]] = {**self.results.get(result["id"], {}), **result}
        self.write()

    def factor(self) -> float:
        """How much slower than estimated the measured rows ran (>= 1): scales the estimates of the rows left."""
        done = [(r["row_seconds"], self.estimates[i]) for i, r in self.results.items()
                if r.get("status") == "measured" and "row_seconds" in r]
        if not done or self.settings.smoke:
            return 1.0
        return max(1.0, sum(real for real, _ in done) / sum(est for _, est in done))

    def markdown(self) -> str:
        lines = ["| row | what | status | s / image or iteration | peak memory (GiB) | time ratio | memory ratio "
                 "| baseline | routing used |", "|" + " --- |" * 9]
        for row in self.rows:
            r = self.results[row.id]
            seconds = r.get("seconds_per_image", r.get("seconds_per_iteration"))
            base = self.results.get(row.baseline or "", {})
            base_seconds = base.get("seconds_per_image", base.get("seconds_per_iteration"))
            time_ratio = f"{seconds / base_seconds:.2f}x" if seconds and base_seconds else "-"
            memory_ratio = (f"{r['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}x"
                            if r.get("peak_memory_bytes") and base.get("peak_memory_bytes") else "-")
            status = r["status"] if r["status"] in ("measured", "pending") else f"{r['status']}: {r.get('reason')}"
            seconds_text = "-" if seconds is None else f"{seconds:.3f}"
            peak_text = "-" if not r.get("peak_memory_bytes") else f"{r['peak_memory_bytes'] / 2**30:.2f}"
            lines.append(f"| {row.id} | {row.what} | {status} | {seconds_text} | {peak_text} | {time_ratio} | "
                         f"{memory_ratio} | {row.baseline or '-'} | {r.get('routing_used') or '-'} |")
        meta = self.meta
        head = [f"Command: `{meta['command']}` ({meta['date']})", "",
                f"Device: {meta['device_name']}; torch {meta['torch']}, diffusers {meta['diffusers']}. "
                f"{'SMOKE RUN: tiny models on CPU, figures meaningless. ' if meta['smoke'] else ''}"
                f"Budget {meta['budget_s']:.0f} s; estimated {meta['estimated_s']:.0f} s; elapsed "
                f"{meta.get('elapsed_s', 0):.0f} s. Memory: torch.cuda.max_memory_allocated on CUDA (per row, after "
                "a reset; the trainer's from its log.json), else peak RSS of the row's process.", ""]
        return "\n".join([*head, *lines, ""])

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        payload = {"meta": self.meta, "estimates_s": self.estimates,
                   "rows": [{**dataclasses.asdict(row), **self.results[row.id]} for row in self.rows]}
        for name, text in (("device_check.json", json.dumps(payload, indent=2)), ("device_check.md", self.markdown())):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def run_image_groups(groups: list[str], rows: list[Row], settings: Settings, report: Report, deadline: float,
                     argv_extra: list[str]) -> None:
    """Start a worker for ``groups`` (if its setup and first row fit) and record its rows as they arrive."""
    first = estimate(rows[0], settings) * report.factor() + group_setup(groups[0], settings)
    if time.time() + first > deadline:
        for row in rows:
            report.update({"id": row.id, "status": "skipped", "reason": f"would not fit: the group needs about "
                           f"{first:.0f} s to its first row, {max(0.0, deadline - time.time()):.0f} s left"})
        return
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(groups), "--rows",
               ",".join(row.id for row in rows), "--deadline", str(deadline), "--factor", str(report.factor()),
               *argv_extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    import threading

    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    killer = threading.Timer(max(1.0, deadline - time.time() + 30.0), proc.kill)  # hard stop past the deadline
    killer.start()
    for line in proc.stdout:
        for prefix in (RESULT, SKIP):
            if line.startswith(prefix):
                report.update(json.loads(line[len(prefix):]))
    proc.wait()
    killer.cancel()
    for row in rows:
        if report.results[row.id]["status"] == "pending":
            tail = " ".join("".join(errors[-3:]).split())[-300:]
            report.update({"id": row.id, "status": "failed", "reason": f"worker exited {proc.returncode} before "
                           f"this row{' (stopped at the deadline)' if time.time() > deadline else ''}: {tail}"})


def run_train_group(rows: list[Row], settings: Settings, report: Report, deadline: float, work: Path) -> None:
    """Each trainer row is one ``dblend finetune`` process (``bench_sd_train``'s command line)."""
    import bench_sd_train

    started = time.time()
    if time.time() + group_setup("train", settings) + estimate(rows[0], settings) > deadline:
        base = None
    elif settings.smoke:
        base = _smoke_base(work)
    else:
        base = bench_sd_train.ensure_base(work / "sd15_base", "sd15")
    report.meta["train_base_seconds"] = time.time() - started
    for row in rows:
        needed = estimate(row, settings) * report.factor()
        if base is None or time.time() + needed > deadline:
            report.update({"id": row.id, "status": "skipped", "reason": f"would not fit: estimated {needed:.0f} s, "
                           f"{max(0.0, deadline - time.time()):.0f} s left"})
            continue
        begun = time.time()
        try:
            result = bench_sd_train.run_config(row.variant, base, work, settings.train_resolution, settings.device,
                                               threads=int(os.environ.get("OMP_NUM_THREADS", "2")),
                                               iterations=settings.train_iterations,
                                               timeout=max(1.0, deadline - time.time() + 30.0),
                                               fork=settings.smoke)
            result = {"status": "measured", "routing_used": None, **result}
        except Exception as err:  # noqa: BLE001 - reported as the row's failure
            result = {"status": "failed", "reason": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
        report.update({**result, "id": row.id, "row_seconds": time.time() - begun})


def _smoke_base(work: Path) -> Path:
    """The tiny SD pipeline folder of the smoke run's trainer rows, written by a forked child (this process then
    forks each ``dblend finetune`` from its imported CLI, ``bench_sd_train.run_finetune(fork=True)``, and runs no
    torch operation itself: no OpenMP pool to inherit)."""
    import bench_sd_train  # noqa: F401 - imported before forking, as the commands' children use it
    import diffusion_blend.cli  # noqa: F401
    import diffusion_blend.commands.finetune  # noqa: F401
    import diffusion_blend.pipelines.sd_target  # noqa: F401
    import diffusion_blend.pipelines.tiny  # noqa: F401
    import diffusion_blend.training.dpok  # noqa: F401

    folder = work / "tiny_base"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            from diffusion_blend.pipelines.tiny import save_pipeline, tiny_sd_pipeline

            save_pipeline(tiny_sd_pipeline(work / "tiny"), folder)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("writing the tiny base failed")
    return folder


def count_flops() -> None:
    """Print FLOPs of one forward per row (meta device): the constants of the plan."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    for group in ("sd15", "sdxl", "sd3"):
        config = model_config(group, FULL, Path(tempfile.gettempdir()))
        with torch.device("meta"):
            model = _model_class(group).from_config(config)
            cond = {k: (v[:1] if torch.is_tensor(v) else {kk: vv[:1] for kk, vv in v.items()})
                    for k, v in conditioning(group, config, FULL, "meta", torch.float32).items()}
            x = torch.randn(1, int(config.get("in_channels", 4)), FULL.latent[group], FULL.latent[group])
            with FlopCounterMode(display=False) as counter:
                if group == "sd3":
                    model(hidden_states=x, timestep=torch.tensor([10.0]), **cond)
                else:
                    model(x, 10, **cond)
        print(f"{group}: {counter.get_total_flops() / 1e9:.1f} GFLOP per row per forward")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--plan", action="store_true", help="print the rows and their estimated seconds; run nothing")
    parser.add_argument("--smoke", action="store_true", help="the same rows on CPU with tiny models")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 540; smoke 300)")
    parser.add_argument("--rows", help="comma-separated row ids or groups (sd15, sdxl, sd3, train); default all")
    parser.add_argument("--out", type=Path, help="results folder (default $OUT, else benchmarks/results)")
    parser.add_argument("--count-flops", action="store_true", help="recount the plan's FLOPs (meta device, CPU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--factor", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    wanted = None if not args.rows else {item.strip() for item in args.rows.split(",") if item.strip()}
    rows = [row for row in ROWS if wanted is None or row.id in wanted or row.group in wanted]
    if wanted is not None and not rows:
        print(f"device_check: error: no row matches --rows {args.rows}", file=sys.stderr)
        return 2
    if args.worker:
        return worker_main(args.worker.split(","), [row.id for row in rows], settings, args.deadline, args.factor)
    if args.count_flops:
        count_flops()
        return 0
    print("\n".join(plan_lines(rows, settings)), flush=True)
    if args.plan:
        return 0
    import torch

    if not settings.smoke and not torch.cuda.is_available():
        print("device_check: error: no CUDA device here (use --smoke for the CPU check, --plan for the plan)",
              file=sys.stderr)
        return 2
    return run_check(args, argv, rows, settings)


def run_check(args: argparse.Namespace, argv: list[str] | None, rows: list[Row], settings: Settings) -> int:
    import diffusers
    import torch

    from _common import command_line

    budget = args.budget if args.budget is not None else (300.0 if settings.smoke else 540.0)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results")
    start = time.time()
    deadline = start + budget
    meta = {"command": command_line(__file__, argv), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "smoke": settings.smoke, "budget_s": budget, "estimated_s": estimated_total(rows, settings),
            "device_name": (torch.cuda.get_device_name() if not settings.smoke
                            else f"CPU ({platform.processor() or platform.machine()})"),
            "device_memory_bytes": torch.cuda.get_device_properties(0).total_memory if not settings.smoke else None,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "platform": platform.platform(),
            "settings": dataclasses.asdict(settings)}
    report = Report(out, meta, rows, settings)
    report.write()
    extra = ["--smoke"] if settings.smoke else []
    # one worker per image group on the GPU (its memory and budget apart); all image rows in one worker when smoking
    batches = [[g] for g in GROUPS] if not settings.smoke else [[g for g in GROUPS if g != "train"], ["train"]]
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        for groups in batches:
            chosen = [row for row in rows if row.group in groups]
            if not chosen:
                continue
            print(f"{', '.join(groups)}: {len(chosen)} rows ({time.time() - start:.0f} s elapsed)", flush=True)
            if groups == ["train"]:
                run_train_group(chosen, settings, report, deadline, Path(tmp))
            else:
                run_image_groups(groups, chosen, settings, report, deadline, extra)
            report.meta["elapsed_s"] = time.time() - start
            report.write()
    print(report.markdown())
    print(f"wrote {out / 'device_check.json'} and device_check.md")
    return 1 if any(r["status"] == "failed" for r in report.results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
