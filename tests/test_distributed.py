"""A real 2-process CPU fine-tuning run (torchrun, gloo): both ranks run, sample differently, stay in sync."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_blend.adapters import read_adapter


@pytest.mark.distributed
def test_two_process_run_syncs_gradients_and_writes_the_usual_adapter(tmp_path):
    with socket.socket() as probe:  # a free port, so concurrent runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "-m", "diffusion_blend.testbeds.gmm.distributed_run", "--out", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["num_processes"] == 2 for r in reports)
    assert reports[0]["first_samples"] != reports[1]["first_samples"]  # process-dependent seeds
    assert reports[0]["lora_weights"] == reports[1]["lora_weights"]  # gradients were averaged across ranks
    assert reports[0]["curves"] == reports[1]["curves"]  # logged stats are the all-reduced means
    tensors, metadata = read_adapter(Path(tmp_path) / "adapter.safetensors")
    from diffusion_blend.testbeds.gmm.distributed_run import tiny_config, tiny_target
    from diffusion_blend.training.dpok import finetune

    single = finetune(tiny_target(), tiny_config(iterations=1), out_dir=tmp_path / "single", progress=False)
    single_tensors, single_metadata = read_adapter(single.adapter_path)
    assert tensors.keys() == single_tensors.keys()
    assert all(tensors[k].shape == single_tensors[k].shape for k in tensors)
    assert metadata.base_fingerprint == single_metadata.base_fingerprint and metadata.rank == single_metadata.rank
