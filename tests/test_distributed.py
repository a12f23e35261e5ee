"""A real 2-process CPU fine-tuning run (torchrun, gloo): both ranks run, sample differently, stay in sync; one process
SIGKILLed (the checkpoint's writer while it writes, or the other one at a random time) ends the launch, and the next
launch resumes to the adapter of the run that was never interrupted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusion_blend.adapters import read_adapter
from faults import kill_rng, partial_files


def torchrun(out: Path, *options: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m diffusion_blend.testbeds.gmm.distributed_run --out OUT OPTIONS``."""
    with socket.socket() as probe:  # a free port, so concurrent runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("DBLEND_KILL_AT_WRITE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "-m", "diffusion_blend.testbeds.gmm.distributed_run", "--out", str(out), *options]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """One launch: the uninterrupted 2-process run (checkpoints every 2 iterations of 3) in ``reference``, then the
    same run in ``killed`` (a checkpoint every iteration), where rank 0 is SIGKILLed while its k-th checkpoint is half
    written, which ends the launch. ``(reference, killed, the launch's result)``."""
    root = tmp_path_factory.mktemp("torchrun")
    write = kill_rng("torchrun-writer").randint(1, 3)
    done = torchrun(root / "reference", "--then", str(root / "killed"), "--kill-writer-at-write",
                    f"{write}:checkpoint.safetensors")
    assert (root / "reference" / "rank1.json").exists(), done.stderr[-3000:]
    return root / "reference", root / "killed", done


@pytest.fixture(scope="module")
def two_process_run(launch):
    return launch[0]


@pytest.mark.distributed
def test_two_process_run_syncs_gradients_and_writes_the_usual_adapter(two_process_run, tmp_path):
    reports = [json.loads((two_process_run / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["num_processes"] == 2 for r in reports)
    assert reports[0]["first_samples"] != reports[1]["first_samples"]  # process-dependent seeds
    assert reports[0]["lora_weights"] == reports[1]["lora_weights"]  # gradients were averaged across ranks
    assert reports[0]["curves"] == reports[1]["curves"]  # logged stats are the all-reduced means
    tensors, metadata = read_adapter(Path(two_process_run) / "adapter.safetensors")
    from diffusion_blend.testbeds.gmm.distributed_run import tiny_config, tiny_target
    from diffusion_blend.training.dpok import finetune

    single = finetune(tiny_target(), tiny_config(iterations=1), out_dir=tmp_path / "single", progress=False)
    single_tensors, single_metadata = read_adapter(single.adapter_path)
    assert tensors.keys() == single_tensors.keys()
    assert all(tensors[k].shape == single_tensors[k].shape for k in tensors)
    assert metadata.base_fingerprint == single_metadata.base_fingerprint and metadata.rank == single_metadata.rank


def killed(done: subprocess.CompletedProcess, rank: int) -> bool:
    """Whether the launch ended because local rank ``rank`` was SIGKILLed (torchrun's report of its worker)."""
    return done.returncode != 0 and f"exitcode: -9) local_rank: {rank}" in done.stderr


def check_resumed_like_the_uninterrupted_run(out: Path, reference: Path) -> None:
    done = torchrun(out, "--checkpoint-every", "1")  # the next launch, without a kill
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    expected = [json.loads((reference / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for ours, theirs in zip(reports, expected):
        assert ours["lora_weights"] == theirs["lora_weights"] and ours["curves"] == theirs["curves"]
    tensors, reference_tensors = load_file(str(out / "adapter.safetensors")), load_file(
        str(reference / "adapter.safetensors"))
    assert tensors.keys() == reference_tensors.keys()
    assert all(torch.equal(tensors[key], reference_tensors[key]) for key in tensors)  # bitwise
    assert partial_files(out) == []


@pytest.mark.distributed
def test_checkpoint_writer_killed_mid_write_under_torchrun_resumes_to_the_same_adapter(launch):
    """Rank 0 died while its k-th checkpoint (of 3, one per iteration) was half written, which ended the launch; the
    next launch resumes from the checkpoint before it (checkpointing more often changes no result)."""
    reference, out, done = launch
    assert killed(done, 0), done.stderr[-3000:]
    assert not (out / "adapter.safetensors").exists() and partial_files(out)
    check_resumed_like_the_uninterrupted_run(out, reference)


@pytest.mark.distributed
@pytest.mark.slow
def test_both_processes_killed_in_turn_under_torchrun_resume_to_the_same_adapter(two_process_run, tmp_path):
    """As above, then rank 1 SIGKILLed at a random moment of the second launch; a third launch finishes."""
    rng = kill_rng("torchrun-both")
    write, seconds = rng.randint(1, 2), rng.uniform(0.0, 0.5)
    done = torchrun(tmp_path, "--checkpoint-every", "1", "--kill-writer-at-write", f"{write}:checkpoint.safetensors")
    assert killed(done, 0), done.stderr[-3000:]
    done = torchrun(tmp_path, "--checkpoint-every", "1", "--kill-rank1-after", f"{seconds:.3f}")
    assert killed(done, 1) or done.returncode == 0, done.stderr[-3000:]  # 0: it finished before the moment came
    check_resumed_like_the_uninterrupted_run(tmp_path, two_process_run)
