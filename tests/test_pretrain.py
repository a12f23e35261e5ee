"""The generic pretraining loop (training/pretrain.py) and ``dblend pretrain digits``."""

import math

import pytest
import torch
from torch import nn

from diffusion_blend.cli import main
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.sampling import as_generator, make_scheduler
from diffusion_blend.testbeds.digits.model import load_digits_model
from diffusion_blend.training.pretrain import denoising_loss, pretrain_denoiser


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1).expand(x.shape[0]) / 1000
        return self.net(torch.cat([x, t[:, None]], 1))


def forward(model, x_t, t):
    return model(x_t, t)


def two_blobs(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    return centres[torch.randint(0, 2, (n,), generator=g)] + 0.1 * torch.randn(n, 2, generator=g)


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return TinyMLP()


def test_exact_noise_predictor_has_zero_loss_and_zero_predictor_has_unit_loss():
    # a point mass at c: the exact noise given x_t is (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t)
    scheduler = make_scheduler("ddpm")
    centre = torch.tensor([0.3, -0.7])
    abar = scheduler.alphas_cumprod

    def exact(model, x_t, t):
        a = abar[t][:, None]
        return (x_t - a.sqrt() * centre) / (1 - a).sqrt()

    x0 = centre.expand(4096, 2).clone()
    assert denoising_loss(None, exact, x0, scheduler, as_generator(0)).item() < 1e-8
    zero_loss = denoising_loss(None, lambda m, x, t: torch.zeros_like(x), x0, scheduler, as_generator(0)).item()
    assert abs(zero_loss - 1.0) < 0.05  # E eps^2 = 1 per coordinate


def test_loss_decreases_on_a_two_blob_problem():
    result = pretrain_denoiser(fresh_model(), forward, two_blobs(), make_scheduler("ddpm"), steps=100,
                               batch_size=64, lr=3e-3, generator=0, progress=False)
    assert result.losses.shape == (100,)
    assert result.losses[-50:].mean() < 0.6 * result.losses[:20].mean()
    assert not result.model.training


def test_same_seed_same_weights_different_seed_differs():
    data, scheduler = two_blobs(), make_scheduler("ddpm")
    runs = [pretrain_denoiser(fresh_model(), forward, data, scheduler, steps=25, generator=seed,
                              ema_decay=0.9, progress=False) for seed in (5, 5, 6)]
    assert torch.equal(runs[0].losses, runs[1].losses)
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0].losses, runs[2].losses)


def test_sampler_data_and_ema_changes_the_final_weights():
    def sampler(batch_size, generator):
        return torch.randn(batch_size, 2, generator=generator) * 0.2 + 1.0

    scheduler = make_scheduler("ddpm")
    plain = pretrain_denoiser(fresh_model(), forward, sampler, scheduler, steps=30, generator=1, progress=False)
    averaged = pretrain_denoiser(fresh_model(), forward, sampler, scheduler, steps=30, generator=1,
                                 ema_decay=0.99, progress=False)
    assert torch.equal(plain.losses, averaged.losses)  # EMA does not touch the optimisation itself
    differs = [not torch.equal(a, b) for a, b in zip(plain.model.parameters(), averaged.model.parameters())]
    assert all(differs)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"), ({"lr": -1.0}, "lr"),
    ({"lr": math.nan}, "lr"), ({"ema_decay": 1.0}, "ema_decay"),
])
def test_bad_arguments_raise_readable_errors(kwargs, message):
    arguments = {"steps": 5, **kwargs}
    with pytest.raises(DiffusionBlendError, match=message):
        pretrain_denoiser(fresh_model(), forward, two_blobs(), make_scheduler("ddpm"), progress=False, **arguments)


def test_bad_data_raises():
    with pytest.raises(DiffusionBlendError, match="NaN"):
        pretrain_denoiser(fresh_model(), forward, torch.full((4, 2), math.nan), make_scheduler("ddpm"), steps=1,
                          progress=False)
    with pytest.raises(DiffusionBlendError, match="tensor"):
        pretrain_denoiser(fresh_model(), forward, torch.zeros(0, 2), make_scheduler("ddpm"), steps=1,
                          progress=False)


def test_cli_pretrain_digits_tiny_run_is_reproducible(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["pretrain", "digits", "--out", str(tmp_path / name), "--steps", "3", "--seed", "7",
                     "--batch-size", "16", "--no-progress"]) == 0
    assert "saved to" in capsys.readouterr().out
    a, b = load_digits_model(tmp_path / "a"), load_digits_model(tmp_path / "b")
    assert a.record["seed"] == 7 and a.record["steps"] == 3 and "--seed 7" in a.record["command"]
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("argv", [
    ["--steps", "0"], ["--seed", "-1"], ["--lr", "0"], ["--ema", "1.5"], ["--ema", "fast"], ["--batch-size", "0"],
])
def test_cli_bad_arguments_exit_2(tmp_path, capsys, argv):
    assert main(["pretrain", "digits", "--out", str(tmp_path / "m"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dblend: error: ") and "\n" not in err
    assert not (tmp_path / "m").exists()


def test_cli_out_is_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["pretrain", "digits", "--out", str(tmp_path / "file"), "--steps", "1", "--no-progress"]) == 2


def test_cli_missing_out_is_a_usage_error():
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "digits", "--steps", "1"])
    assert info.value.code == 2
