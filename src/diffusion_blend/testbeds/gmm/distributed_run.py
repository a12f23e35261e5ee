"""A small multi-process fine-tuning run for checking the accelerate scale-out (used by tests/test_distributed.py).

Launch with ``OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m diffusion_blend.testbeds.gmm.distributed_run --out DIR``
(or ``accelerate launch --multi_gpu --num_processes 2 -m ...``; note that ``accelerate launch --cpu
--num_processes 2`` runs only ONE process). Every process writes ``rank{r}.json`` with its view of the run: the
number of processes, a digest of its first batch of samples (each process samples its own trajectories), and
a digest of its final LoRA weights (identical on every process when gradients are synchronised). Rank 0 also
writes the adapter file. The base is a randomly initialised (seeded) MLP: the point is the mechanics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from accelerate import Accelerator

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    accelerator = Accelerator(cpu=True)
    out = Path(args.out)
    config = tiny_config()
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


if __name__ == "__main__":
    main()
