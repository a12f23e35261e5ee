"""What the digits demo runs: basis rewards, the experts' KL weight alpha, training budget, sweep grids.

One :class:`DemoConfig` fixes everything a demo run depends on. The fine-tuning part (:meth:`DemoConfig.training`)
is the adapters' cache key together with the base model's fingerprint (``demo.adapters``); the rest only
affects the evaluation. ``DemoConfig.quick()`` is a miniature for tests and smoke runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from diffusion_blend.errors import DiffusionBlendError, positive_int, positive_number
from diffusion_blend.preference import Preference
from diffusion_blend.testbeds.digits.spec import DIGITS_SPEC
from diffusion_blend.training.config import DPOKConfig


def _grid(start: float, stop: float, count: int) -> tuple[float, ...]:
    return tuple(round(start + (stop - start) * i / (count - 1), 10) for i in range(count))


@dataclass(frozen=True)
class DemoConfig:
    """Settings of ``dblend demo`` (docs/demo.md explains each choice and its measured effect).

    ``rewards``: the two basis rewards (registry names) ``(r_1, r_2)``; ``w`` is the weight of ``r_1``.
    ``alpha``: the KL weight every expert is fine-tuned with (paper section 4); the target of a preference
    ``(w, lambda)`` is ``p_pre exp(lambda r_w / alpha)``. ``finetune``: DPOKConfig fields shared by the experts.
    ``seeds`` x ``samples_per_seed`` samples per sweep point; ``oracle_samples`` base samples for the
    importance-weighted oracle and the experts' achievable objective; ``expert_samples`` trajectories to
    estimate each expert's reward and path KL. ``smc_particles`` particles per sample and ``smc_samples_per_seed``
    samples per seed for SMC on the blend (:mod:`diffusion_blend.smc`) at the check weights. ``lora_targets``: the
    digits modules that carry the LoRA
    (recorded in the training config's ``extra``, so part of the adapters' cache key).
    """

    rewards: tuple[str, str] = ("ink", "digit_prob_3")
    alpha: float = 0.03
    num_inference_steps: int = DIGITS_SPEC.steps
    eta: float = DIGITS_SPEC.noise_level
    finetune: dict[str, Any] = field(default_factory=lambda: {
        **{k: v for k, v in DIGITS_SPEC.recipe.items() if k != "num_inference_steps"},
        "lora_rank": DIGITS_SPEC.lora_rank, "lora_alpha": DIGITS_SPEC.lora_alpha,
    })
    lora_targets: tuple[str, ...] = DIGITS_SPEC.lora_targets
    seed: int = 0
    weight_grid: tuple[float, ...] = _grid(0.0, 1.0, 11)
    kl_scales: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    combined_weights: tuple[float, ...] = (0.2, 0.5, 0.8)
    combined_kl_scales: tuple[float, ...] = (0.5, 1.5)
    check_weights: tuple[float, ...] = (0.2, 0.5, 0.8)
    smc_particles: int = 8
    smc_samples_per_seed: int = 64
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
    samples_per_seed: int = 512
    oracle_samples: int = 20_000
    expert_samples: int = 4096
    grid_rows: int = 8
    threads: int = 1
    workers: int = 2
    smoke_run: bool = False
    """A miniature run (:meth:`quick`): its summary and report say so and judge no check against its bar."""

    def __post_init__(self) -> None:
        if len(self.rewards) != 2 or self.rewards[0] == self.rewards[1]:
            raise DiffusionBlendError(f"the demo needs two different basis rewards, got {self.rewards!r}")
        positive_number(self.alpha, "alpha")
        for name in ("num_inference_steps", "samples_per_seed", "oracle_samples", "expert_samples", "grid_rows",
                     "threads", "workers", "smc_particles", "smc_samples_per_seed"):
            positive_int(getattr(self, name), name)
        if not self.seeds:
            raise DiffusionBlendError("the demo needs at least one evaluation seed")
        for w in (*self.weight_grid, *self.combined_weights, *self.check_weights):
            if not 0.0 <= w <= 1.0:
                raise DiffusionBlendError(f"weights must lie in [0, 1], got {w}")
        if any(k < 0 for k in (*self.kl_scales, *self.combined_kl_scales)):
            raise DiffusionBlendError("KL scales lambda must be >= 0")
        missing = [w for w in self.check_weights if not any(abs(w - g) < 1e-9 for g in self.weight_grid)]
        if missing:
            raise DiffusionBlendError(f"check weights {missing} are not on the weight grid {self.weight_grid}")
        from diffusion_blend.testbeds.digits.model import lora_target_modules

        unknown = [name for name in self.lora_targets if name not in lora_target_modules()]
        if not self.lora_targets or unknown:
            raise DiffusionBlendError(f"lora_targets must be a non-empty subset of {lora_target_modules()}, "
                                      f"got {self.lora_targets!r}")
        self.training(self.rewards[0])  # validates the fine-tuning fields

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A miniature run (seconds): tiny training budget, few samples, short grids (tests, smoke runs)."""
        values: dict[str, Any] = dict(
            finetune={"estimator": "pathwise", "iterations": 2, "batch_size": 32, "minibatch_size": 16,
                      "learning_rate": 1e-4, "lora_rank": 2, "lora_alpha": 2.0},
            num_inference_steps=4, weight_grid=(0.0, 0.2, 0.5, 0.8, 1.0), kl_scales=(0.0, 1.0, 2.0),
            combined_weights=(0.5,), combined_kl_scales=(0.5,), seeds=(0, 1), samples_per_seed=16,
            oracle_samples=256, expert_samples=64, grid_rows=3, workers=1, smc_particles=3, smc_samples_per_seed=8,
            smoke_run=True,
        )
        values.update(overrides)
        return cls(**values)

    def with_seed(self, seed: int) -> DemoConfig:
        return replace(self, seed=int(seed))

    def training(self, reward: str) -> DPOKConfig:
        """The DPOK configuration of the expert for ``reward`` (paper section 4): ``r = reward``, KL weight alpha."""
        return DPOKConfig.from_dict({
            **self.finetune, "reward_weights": {reward: 1.0}, "alpha": self.alpha,
            "num_inference_steps": self.num_inference_steps, "eta": self.eta, "seed": self.seed,
            "checkpoint_every": max(1, int(self.finetune.get("iterations", 1)) // 4),
            "extra": {"target_modules": list(self.lora_targets)},
        })

    def weights(self, w: float) -> dict[str, float]:
        """``{r_1: w, r_2: 1 - w}``."""
        first, second = self.rewards
        return {first: float(w), second: round(1.0 - float(w), 10)}

    def mpa_preferences(self) -> list[Preference]:
        """DB-MPA (and DB-MPA-LS) over the weight grid at lambda = 1 (paper Lemma 2, Proposition 2)."""
        return [Preference(self.weights(w), 1.0) for w in self.weight_grid]

    def kla_preferences(self) -> list[Preference]:
        """DB-KLA of each expert over the lambda grid (paper section 2.5) and the combined (w, lambda) grid."""
        single = [Preference.kl_only(reward, k) for reward in self.rewards for k in self.kl_scales]
        combined = [Preference(self.weights(w), k) for k in self.combined_kl_scales for w in self.combined_weights]
        return single + combined

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
