"""The 2-D Gaussian-mixture fine-tuning target: a learned MLP base model and the testbed's quadratic rewards.

The base ``p_pre`` (paper section 1) is a :class:`~diffusion_blend.testbeds.gmm.model.TimeMLP` trained by denoising
score
matching (``training.pretrain.pretrain_denoiser``) on samples of the study mixture
(``testbeds.gmm.study.study_testbed``). It is trained once per settings and cached as safetensors under a key
that hashes the settings, so every run that asks for the same settings gets bit-identical base weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusion_blend.adapters import atomic_save_safetensors
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.sampling import make_scheduler
from diffusion_blend.testbeds.gmm.closed_form import QuadraticForm
from diffusion_blend.testbeds.gmm.model import LORA_TARGETS, TimeMLP, mlp_forward
from diffusion_blend.testbeds.gmm.study import study_testbed
from diffusion_blend.training.config import FinetuneTarget
from diffusion_blend.training.pretrain import pretrain_denoiser


@dataclass(frozen=True)
class GmmBaseSettings:
    """How the base MLP is built and pretrained (all of it enters the cache key)."""

    hidden: int = 128
    depth: int = 3
    time_embed_dim: int = 32
    steps: int = 6000
    batch_size: int = 256
    lr: float = 2e-3
    seed: int = 0
    num_train_timesteps: int = 1000

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("DBLEND_CACHE", Path.home() / ".cache" / "diffusion-blend"))


def gmm_scheduler(settings: GmmBaseSettings):
    return make_scheduler("ddim", num_train_timesteps=settings.num_train_timesteps)


def gmm_base_model(
    settings: GmmBaseSettings = GmmBaseSettings(), cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> TimeMLP:
    """The pretrained base MLP: loaded from the cache, or trained reproducibly from ``settings.seed`` and cached."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"gmm-base-{settings.key()}.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = TimeMLP(dim=2, hidden=settings.hidden, depth=settings.depth, time_embed_dim=settings.time_embed_dim)
    if path.exists():
        try:
            model.load_state_dict(load_file(str(path)))
        except Exception as err:  # a corrupt cache file: say which and how to fix it
            raise DiffusionBlendError(f"cached base model {path} is unreadable ({err}); delete it to retrain") from None
        return model.eval()
    mixture, _ = study_testbed()
    data_generator = torch.Generator().manual_seed(settings.seed + 1)

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return mixture.sample(batch_size, generator).float()

    pretrain_denoiser(
        model, mlp_forward, draw, gmm_scheduler(settings), steps=settings.steps, batch_size=settings.batch_size,
        lr=settings.lr, generator=data_generator, progress=progress,
    )
    atomic_save_safetensors(model.state_dict(), path, {"settings": json.dumps(asdict(settings))})
    return model.eval()


def gmm_rewards() -> dict[str, QuadraticForm]:
    """The testbed's basis rewards: ``right(x) = x_1`` (linear) and ``corner`` (quadratic bump at (-2, 2))."""
    _, rewards = study_testbed()
    return dict(rewards)


def gmm_target(
    settings: GmmBaseSettings = GmmBaseSettings(), cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> FinetuneTarget:
    """A fresh target (fresh model instance from the cached base) for the 2-D mixture testbed."""
    model = gmm_base_model(settings, cache_dir, progress)
    rewards = {name: _point_reward(form) for name, form in gmm_rewards().items()}
    return FinetuneTarget(
        name="gmm",
        model=model,
        forward=mlp_forward,
        scheduler=gmm_scheduler(settings),
        sample_shape=(2,),
        rewards=rewards,
        target_modules=LORA_TARGETS,
        architecture=model.config,
    )


def _point_reward(form: QuadraticForm):
    def reward(points: torch.Tensor, prompts=None) -> torch.Tensor:
        return form(points)

    reward.__name__ = "quadratic_form_reward"
    return reward
