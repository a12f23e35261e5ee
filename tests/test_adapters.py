"""Adapter files: round trip, base fingerprint, and clear refusals (rank, layout, corrupt, foreign files)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_blend import lora
from diffusion_blend.adapters import (
    base_fingerprint,
    load_adapter,
    read_adapter,
    save_adapter,
)
from diffusion_blend.errors import AdapterMismatchError, DiffusionBlendError
from diffusion_blend.testbeds.gmm.model import LORA_TARGETS, TimeMLP


def make_base(seed: int = 0, hidden: int = 16) -> TimeMLP:
    torch.manual_seed(seed)
    return TimeMLP(dim=2, hidden=hidden, depth=2, time_embed_dim=8)


def trained_adapter(model: TimeMLP, name: str = "expert", rank: int = 4, seed: int = 1) -> TimeMLP:
    lora.add_lora(model, name, rank=rank, target_modules=LORA_TARGETS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if f"lora_B.{name}" in param_name:  # default init has lora_B = 0: make the adapter do something
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def outputs(model: TimeMLP, name: str | None) -> torch.Tensor:
    x = torch.linspace(-2, 2, 20).reshape(10, 2)
    with lora.active_adapter(model, name), torch.no_grad():
        return model(x, 123)


def save(model, path, name="expert"):
    return save_adapter(model, name, path, rewards={"right": 0.7, "corner": 0.3}, alpha=0.5, steps=42,
                        training_config={"learning_rate": 0.01})


def test_round_trip_restores_outputs_and_metadata(tmp_path):
    model = trained_adapter(make_base())
    path = save(model, tmp_path / "a.safetensors")
    fresh = make_base()
    assert not torch.equal(outputs(model, "expert"), outputs(fresh, None))
    metadata = load_adapter(fresh, path, "loaded")
    torch.testing.assert_close(outputs(fresh, "loaded"), outputs(model, "expert"), rtol=0, atol=0)
    torch.testing.assert_close(outputs(fresh, None), outputs(model, None), rtol=0, atol=0)
    assert metadata.rewards == {"right": 0.7, "corner": 0.3}
    assert metadata.alpha == 0.5 and metadata.steps == 42 and metadata.rank == 4
    assert metadata.training_config == {"learning_rate": 0.01}
    assert metadata.architecture == model.config


def test_fingerprint_ignores_lora_but_sees_base_weights_and_architecture():
    base = make_base()
    before = base_fingerprint(base)
    trained_adapter(base)
    assert base_fingerprint(base) == before  # adding / training LoRA does not change the base
    other = make_base()
    with torch.no_grad():
        other.out.weight[0, 0] += 1e-6
    assert base_fingerprint(other) != before
    assert base_fingerprint(make_base(), architecture={"class": "Other"}) != before


def test_load_refuses_other_base(tmp_path):
    path = save(trained_adapter(make_base()), tmp_path / "a.safetensors")
    with pytest.raises(AdapterMismatchError, match="different base model"):
        load_adapter(make_base(seed=5), path, "x")


def test_load_refuses_rank_mismatch(tmp_path):
    path = save(trained_adapter(make_base(), rank=4), tmp_path / "a.safetensors")
    target = make_base()
    lora.add_lora(target, "x", rank=2, target_modules=LORA_TARGETS)
    with pytest.raises(AdapterMismatchError, match="rank 4"):
        load_adapter(target, path, "x")


def test_load_refuses_layout_mismatch(tmp_path):
    path = save(trained_adapter(make_base()), tmp_path / "a.safetensors")
    tensors, metadata = read_adapter(path)
    dropped = {k: v for k, v in tensors.items() if not k.startswith("out.")}
    broken = tmp_path / "broken.safetensors"
    save_file(dropped, str(broken), metadata=metadata.to_header())
    with pytest.raises(AdapterMismatchError, match="layout"):
        load_adapter(make_base(), broken, "x")


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    path = save(trained_adapter(make_base()), tmp_path / "a.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DiffusionBlendError, match="corrupt"):
        load_adapter(make_base(), truncated, "x")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(DiffusionBlendError, match="not a diffusion-blend adapter"):
        load_adapter(make_base(), foreign, "x")
    with pytest.raises(DiffusionBlendError, match="does not exist"):
        load_adapter(make_base(), tmp_path / "missing.safetensors", "x")
    assert set(load_file(str(path))) == set(read_adapter(path)[0])
    assert json.loads(json.dumps(read_adapter(path)[1].rewards)) == {"right": 0.7, "corner": 0.3}
