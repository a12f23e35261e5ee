"""The digits testbed as an evaluation setting: the demo's experts on the embedded base, one network with one LoRA
adapter per basis reward (the demo's sweeps, ``dblend evaluate --setting digits``, the SMC study)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion_blend.adapters import load_adapter
from diffusion_blend.evaluation.sweep import Setting
from diffusion_blend.lora import LoraFamily
from diffusion_blend.preference import BASE, Preference
from diffusion_blend.rewards.registry import get_reward
from diffusion_blend.sampling import sample
from diffusion_blend.testbeds.digits.config import DemoConfig
from diffusion_blend.testbeds.digits.data import IMAGE_SHAPE, to_image_space
from diffusion_blend.testbeds.digits.model import digits_forward, digits_scheduler
from diffusion_blend.testbeds.digits.train import load_default_digits_model


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass
class DemoModels:
    """The base network carrying every expert as a LoRA adapter, and the family that blends them."""

    model: torch.nn.Module
    family: LoraFamily
    rewards: dict[str, Callable[..., torch.Tensor]]
    adapter_digests: dict[str, str]


def load_demo_models(paths: dict[str, Path], config: DemoConfig, progress: bool = True) -> DemoModels:
    """Load the base model once and each expert into it under the reward's name (one network, m adapters)."""
    model = load_default_digits_model(progress=progress)
    for reward in config.rewards:
        load_adapter(model, paths[reward], reward)
    model.eval()
    rewards = {name: get_reward(name) for name in config.rewards}
    digests = {name: file_digest(paths[name]) for name in config.rewards}
    return DemoModels(model, LoraFamily(model, digits_forward, list(config.rewards)), rewards, digests)


def evaluation_seeds(config: DemoConfig) -> list[int]:
    """The fixed sample seeds of every sweep point (``--seed`` shifts them all)."""
    return [1000 * config.seed + s for s in config.seeds]


def digits_setting(models: DemoModels, config: DemoConfig) -> Setting:
    """The digits :class:`~diffusion_blend.evaluation.sweep.Setting`: the experts' LoRA family and the rewards."""
    steps = config.num_inference_steps
    return Setting(
        name="digits-demo", family=models.family, rewards=models.rewards,
        scheduler_factory=lambda: digits_scheduler("ddim"), sample_shape=tuple(IMAGE_SHAPE), alpha=config.alpha,
        decode=to_image_space, num_inference_steps=steps, eta=config.eta,
        options={"adapters": models.adapter_digests, "rewards": list(config.rewards)},
    )


@torch.no_grad()
def base_rewards(models: DemoModels, config: DemoConfig, progress: bool) -> dict[str, torch.Tensor]:
    """Rewards of ``oracle_samples`` base samples (same sampler as the experts: DDIM, ``eta``, same steps)."""
    denoiser = models.family.member(BASE)
    generator = torch.Generator().manual_seed(1000 * config.seed + 999)
    chunk, values = 2048, {name: [] for name in config.rewards}
    for start in tqdm(range(0, config.oracle_samples, chunk), desc="base samples (oracle)", disable=not progress):
        n = min(chunk, config.oracle_samples - start)
        out = sample(denoiser, digits_scheduler("ddim"), generator=generator, shape=(n, *IMAGE_SHAPE),
                     num_inference_steps=config.num_inference_steps, eta=config.eta, progress=False)
        images = to_image_space(out.samples)
        for name, reward in models.rewards.items():
            values[name].append(torch.as_tensor(reward(images), dtype=torch.float64))
    return {name: torch.cat(v) for name, v in values.items()}


def smc_study_inputs(demo_dir: str, config: Any, progress: bool):
    """The demo's experts, setting, and the IS oracle's gain at each w (demo's 20,000 base samples)."""
    from diffusion_blend.evaluation.oracle import importance_weighted_oracle
    from diffusion_blend.testbeds.digits.config import DemoConfig
    from diffusion_blend.testbeds.digits.experts import ensure_demo_adapters
    from diffusion_blend.testbeds.digits.setting import (
        base_rewards,
        digits_setting,
        load_demo_models,
    )

    demo = DemoConfig()
    torch.set_num_threads(2)
    models = load_demo_models(ensure_demo_adapters(demo_dir, demo, progress=progress), demo, progress=progress)
    setting = digits_setting(models, demo)
    base = base_rewards(models, demo, progress)
    first = demo.rewards[0]
    preferences, base_reward, gains = [], {}, {}
    for w in config.weights:
        preference = Preference(demo.weights(w), 1.0)
        oracle = importance_weighted_oracle(base, preference, demo.alpha)
        base_reward[float(w)] = sum(v * float(base[n].mean()) for n, v in preference.weights.items())
        gains[float(w)] = sum(v * oracle.expected_rewards[n] for n, v in preference.weights.items()) - base_reward[w]
        preferences.append(preference)
    return setting, preferences, base_reward, gains, first
