"""Configuration of KL-regularized RL fine-tuning (paper section 4) and the "target" it fine-tunes.

A :class:`FinetuneTarget` is everything model-specific the trainer needs: the network (which will carry the
LoRA adapter), how to call it (``forward(model, x_t, t, **cond) -> eps``), the scheduler, the shape of one
sample, how to turn final latents into reward inputs (``decode``), the basis rewards, and optional prompts
with their conditioning. The 2-D Gaussian-mixture MLP, the digits model and Stable Diffusion are each one
builder returning a target; the trainer (``training.dpok``) never looks inside.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion_blend.errors import DiffusionBlendError, positive_int, positive_number
from diffusion_blend.lora import Forward

RewardFn = Callable[[torch.Tensor, Sequence[str] | None], torch.Tensor]
"""``reward(decoded_samples, prompts) -> Tensor[B]``; need not be differentiable."""


@dataclass
class FinetuneTarget:
    """A model to fine-tune and the rewards to fine-tune it for (see module docstring)."""

    name: str
    model: nn.Module
    forward: Forward
    scheduler: Any
    sample_shape: tuple[int, ...]
    rewards: Mapping[str, RewardFn]
    target_modules: Any
    decode: Callable[[torch.Tensor], torch.Tensor] = lambda latents: latents
    architecture: Mapping[str, Any] | None = None
    prompts: Sequence[str] | None = None
    encode_prompts: Callable[[Sequence[str]], Mapping[str, Any]] | None = None
    frozen_modules: Sequence[nn.Module] = ()
    """Frozen networks besides ``model`` (VAE, text encoders): the trainer moves them to its device and casts
    them to ``DPOKConfig.dtype`` (a module whose config says ``force_upcast``, like SDXL's VAE, stays float32
    under float16)."""
    base_fingerprint: str | None = None
    """The float32 fingerprint of ``model``'s base weights when a loader computed it (a base loaded directly in a
    lower precision: ``pipelines.loading.load_training_base``); ``None``: the trainer fingerprints ``model`` as
    given."""

    def draw_prompts(self, batch_size: int, generator: torch.Generator) -> list[str] | None:
        """``batch_size`` prompts drawn uniformly from ``generator`` (``None`` for an unconditional target)."""
        if not self.prompts:
            return None
        index = torch.randint(0, len(self.prompts), (batch_size,), generator=generator)
        return [self.prompts[i] for i in index.tolist()]

    def encode(self, prompts: Sequence[str] | None) -> dict[str, Any]:
        """The conditioning keyword arguments of ``prompts`` (``{}`` without prompts or encoder)."""
        if prompts is None or self.encode_prompts is None:
            return {}
        return dict(self.encode_prompts(prompts))

    def conditioning(self, batch_size: int, generator: torch.Generator) -> tuple[list[str] | None, dict[str, Any]]:
        """Draw ``batch_size`` prompts (uniformly, from ``generator``) and their conditioning kwargs."""
        prompts = self.draw_prompts(batch_size, generator)
        return prompts, self.encode(prompts)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



@dataclass
class DPOKConfig:
    """Hyper-parameters of :func:`diffusion_blend.training.dpok.finetune` (paper section 4, DPOK family).

    ``reward_weights``: ``r_w = sum_i w_i r_i`` (one name: a basis expert; several: the MORL oracle).
    ``alpha``: KL weight; the optimum of ``E[r_w] - alpha KL(path)`` is ``p_pre exp(r_w / alpha)``.
    ``batch_size`` trajectories per process per iteration, ``updates_per_batch`` passes (PPO epochs) over
    them in ``minibatch_size`` chunks, ``clip_range`` the PPO ratio clip, ``timestep_fraction`` the share of
    stochastic steps used per update (a random subset, DDPO's ``train_timestep_fraction``).
    ``baseline``: the policy-gradient baseline (``training.dpok.kl_regularized_advantages``): ``"batch"``, the
    leave-one-out batch mean per step; ``"tweedie"``, that plus the state-dependent control variate
    ``r_w(decode(x0_hat(x_k)))`` (one extra reward evaluation per step and sample; both are unbiased).
    ``estimator``: ``"score"``, REINFORCE/PPO on the KL-regularized return (any reward); ``"pathwise"``,
    backpropagation through the reparameterised chain (differentiable rewards; one optimizer step per iteration
    over ``batch_size`` trajectories in ``minibatch_size`` chunks; ``updates_per_batch``, ``clip_range``,
    ``timestep_fraction`` and ``baseline`` do not apply). Both estimate the gradient of the same objective.

    Memory (docs/finetuning.md, "Memory and precision"): rollouts are sampled ``minibatch_size`` rows at a time,
    so activation memory does not grow with ``batch_size``. ``dtype`` (``"float32"``, ``"bfloat16"``,
    ``"float16"``) is the precision of the FROZEN weights (network, VAE, text encoders); LoRA parameters,
    optimizer state, log-probabilities and the per-step KL stay float32 (``"float16"`` adds a gradient scaler).
    ``gradient_checkpointing``: recompute activations in the backward pass (the network's blocks in the policy
    update; each sampler step in the pathwise estimator, whose memory then does not grow with the number of
    steps). ``backprop_steps`` (pathwise only; ``None`` = all): back-propagate through the last ``K`` sampler
    steps only (DRaFT-K); the earlier steps run without gradient, so the estimator then optimises a DIFFERENT,
    biased objective (the reward and KL of the last ``K`` steps with the state before them held fixed).
    """

    reward_weights: dict[str, float]
    alpha: float
    iterations: int = 200
    batch_size: int = 256
    minibatch_size: int = 256
    updates_per_batch: int = 2
    learning_rate: float = 3e-3
    clip_range: float = 0.2
    max_grad_norm: float = 1.0
    timestep_fraction: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 8.0
    num_inference_steps: int = 20
    eta: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25
    adapter_name: str = "policy"
    baseline: str = "batch"
    estimator: str = "score"
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    backprop_steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.reward_weights, Mapping) or not self.reward_weights:
            raise DiffusionBlendError("reward_weights must name at least one reward, e.g. {'right': 1.0}")
        clean = {}
        for name, weight in self.reward_weights.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
                raise DiffusionBlendError(f"weight of reward {name!r} must be a finite number, got {weight!r}")
            clean[str(name)] = float(weight)
        self.reward_weights = clean
        self.alpha = positive_number(self.alpha, "alpha (KL weight)")
        for name in ("iterations", "batch_size", "minibatch_size", "updates_per_batch", "lora_rank",
                     "num_inference_steps", "checkpoint_every"):
            positive_int(getattr(self, name), name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DiffusionBlendError(f"seed must be a non-negative integer, got {self.seed!r}")
        self.learning_rate = positive_number(self.learning_rate, "learning_rate")
        self.clip_range = positive_number(self.clip_range, "clip_range")
        self.max_grad_norm = positive_number(self.max_grad_norm, "max_grad_norm")
        self.lora_alpha = positive_number(self.lora_alpha, "lora_alpha")
        self.eta = positive_number(self.eta, "eta")
        if not 0.0 < self.timestep_fraction <= 1.0:
            raise DiffusionBlendError(f"timestep_fraction must lie in (0, 1], got {self.timestep_fraction!r}")
        if self.baseline not in ("batch", "tweedie"):
            raise DiffusionBlendError(f"baseline must be 'batch' or 'tweedie', got {self.baseline!r}")
        if self.estimator not in ("score", "pathwise"):
            raise DiffusionBlendError(f"estimator must be 'score' or 'pathwise', got {self.estimator!r}")
        if self.dtype not in DTYPES:
            raise DiffusionBlendError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise DiffusionBlendError(
                f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}"
            )
        if self.backprop_steps is not None:
            positive_int(self.backprop_steps, "backprop_steps")
            if self.estimator != "pathwise":
                raise DiffusionBlendError(
                    "backprop_steps applies to the pathwise estimator only (estimator='pathwise')"
                )
        if self.minibatch_size > self.batch_size:
            raise DiffusionBlendError(f"minibatch_size {self.minibatch_size} exceeds batch_size {self.batch_size}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DPOKConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DiffusionBlendError(
                f"unknown fine-tuning option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        try:
            return cls(**values)
        except TypeError as err:
            raise DiffusionBlendError(f"incomplete fine-tuning config: {err}") from None

    @staticmethod
    def read_json(path: str | Path) -> dict[str, Any]:
        """The JSON object of a config file (fields not checked yet), with one-line errors."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise DiffusionBlendError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise DiffusionBlendError(f"config file {path} is not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise DiffusionBlendError(f"config file {path} must hold a JSON object")
        return values

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> DPOKConfig:
        values = cls.read_json(path)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)
