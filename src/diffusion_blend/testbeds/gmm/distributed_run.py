"""A small multi-process fine-tuning run for checking the accelerate scale-out (used by tests/test_distributed.py).

Launch with ``OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m diffusion_blend.testbeds.gmm.distributed_run --out DIR``
(or ``accelerate launch --multi_gpu --num_processes 2 -m ...``; note that ``accelerate launch --cpu
--num_processes 2`` runs only ONE process). Every process writes ``rank{r}.json`` with its view of the run: the
number of processes, a digest of its first batch of samples (each process samples its own trajectories), and
a digest of its final LoRA weights (identical on every process when gradients are synchronised). Rank 0 also
writes the adapter file. The base is a randomly initialised (seeded) MLP: the point is the mechanics.

Kills, for the resume tests under torchrun (``tests/test_distributed.py``: a launch with a kill fails, the next launch
resumes from the checkpoint): ``--kill-writer-at-write N:GLOB`` SIGKILLs rank 0 (the checkpoint's writer) during its
N-th atomic write (``diffusion_blend.files``' hook), ``--kill-rank1-after S`` SIGKILLs rank 1 S seconds into its
training; with ``--then DIR`` they are armed for a second run in DIR, after the run in ``--out`` has finished. (Not
``torchrun --max-restarts``: its restarted workers met the last attempt's gloo addresses in the static rendezvous
store and failed or hung.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import threading
from pathlib import Path

import torch
from accelerate import Accelerator

from diffusion_blend.files import KILL_HOOK
from diffusion_blend.sampling import make_scheduler
from diffusion_blend.testbeds.gmm.closed_form import QuadraticForm
from diffusion_blend.testbeds.gmm.model import LORA_TARGETS, TimeMLP, mlp_forward
from diffusion_blend.training.config import DPOKConfig, FinetuneTarget
from diffusion_blend.training.dpok import adapter_pair, finetune, process_seed, rollout


def tiny_target(seed: int = 0) -> FinetuneTarget:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TimeMLP(dim=2, hidden=32, depth=2, time_embed_dim=16)
    right = QuadraticForm.linear_reward([1.0, 0.0])
    return FinetuneTarget(
        name="tiny-mlp",
        model=model,
        forward=mlp_forward,
        scheduler=make_scheduler("ddim", num_train_timesteps=1000),
        sample_shape=(2,),
        rewards={"right": lambda x, prompts=None: right(x)},
        target_modules=LORA_TARGETS,
        architecture=model.config,
    )


def tiny_config(**overrides) -> DPOKConfig:
    values = dict(reward_weights={"right": 1.0}, alpha=1.0, iterations=3, batch_size=16, minibatch_size=8,
                  updates_per_batch=2, num_inference_steps=5, learning_rate=1e-2, checkpoint_every=2, seed=7)
    values.update(overrides)
    return DPOKConfig(**values)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def arm_kills(args: argparse.Namespace, rank: int) -> None:
    """Arm this process's kill, if any (module docstring)."""
    if args.kill_writer_at_write and rank == 0:
        os.environ[KILL_HOOK] = args.kill_writer_at_write
    else:
        os.environ.pop(KILL_HOOK, None)
    if args.kill_rank1_after is not None and rank == 1:
        timer = threading.Timer(args.kill_rank1_after, os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()


def run_and_report(out: Path, checkpoint_every: int, accelerator: Accelerator) -> None:
    """Fine-tune the tiny target into ``out`` (resuming a checkpoint there) and write this process's report."""
    config = tiny_config(checkpoint_every=checkpoint_every)
    target = tiny_target()
    result = finetune(target, config, out_dir=out, accelerator=accelerator, progress=False)
    generator = torch.Generator().manual_seed(process_seed(config.seed, accelerator.process_index))
    first = rollout(target, adapter_pair(result.model, target.forward, config.adapter_name), 4, generator,
                    num_inference_steps=config.num_inference_steps, eta=config.eta)
    lora_weights = torch.cat([p.detach().reshape(-1) for n, p in result.model.named_parameters() if "lora_" in n])
    report = {
        "rank": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "first_samples": _digest(first.samples),
        "lora_weights": _digest(lora_weights),
        "curves": result.curves,
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint-every", type=int, default=tiny_config().checkpoint_every)
    parser.add_argument("--then", metavar="DIR", help="after the run in --out, the same run in DIR with checkpoints "
                        "every iteration and the kills armed (saves a launch: the kill tests' reference comes first)")
    parser.add_argument("--kill-writer-at-write", metavar="N:GLOB")
    parser.add_argument("--kill-rank1-after", type=float, metavar="SECONDS")
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=True)
    if args.then is None:
        arm_kills(args, accelerator.process_index)
    run_and_report(Path(args.out), args.checkpoint_every, accelerator)
    if args.then is not None:
        arm_kills(args, accelerator.process_index)
        run_and_report(Path(args.then), 1, accelerator)


if __name__ == "__main__":
    main()
