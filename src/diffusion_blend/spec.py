"""One spec per model kind: every default a kind's entry points share, decided once (light: no torch).

A :class:`ModelSpec` holds what ``dblend sample``, ``finetune``, ``ui``, ``evaluate`` and the blend pipelines would
otherwise each decide for themselves: the sampler (scheduler and its noise level), guidance scale, steps, native
resolution, where the LoRA experts go, and the fine-tuning recipe. The Stable Diffusion / SDXL / SD3 / FLUX specs live
in :mod:`diffusion_blend.pipelines.kinds`; the testbeds' in ``testbeds.gmm.spec`` and ``testbeds.digits.spec``.
Each value carries its reason (:attr:`ModelSpec.notes`), shown by ``dblend sample --help`` and ``finetune --help``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

SCHEDULERS = ("ddim", "sde")
"""``ddim``: DDIM with ``eta`` (the paper's sampler); ``sde``: the flow SDE of Flow-GRPO with a noise level."""


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class ModelSpec:
    """The defaults of one model kind (module docstring).

    ``scheduler`` and ``noise_level``: DDIM and its ``eta``, or the flow SDE and its noise level (both 0 = the
    deterministic sampler, which DB-MPA-LS and SMC refuse). ``guidance_scale``: ``None`` for unguided models.
    ``resolution``: the native image side in pixels, ``None`` where the base's own config gives it.
    ``recipe``: ``DPOKConfig`` fields of ``dblend finetune`` for this kind (the trainer's own defaults fill the
    rest); ``lora_rank`` / ``lora_alpha`` / ``lora_targets``: where and how large the experts are.
    """

    kind: str
    label: str
    scheduler: str
    noise_level: float
    steps: int
    guidance_scale: float | None = None
    resolution: int | None = None
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: tuple[str, ...] = ()
    recipe: Mapping[str, Any] = field(default_factory=dict)
    notes: Mapping[str, str] = field(default_factory=dict)
    pipeline_class: str | None = None  # the blend pipeline's class name in diffusion_blend.pipelines
    stock_class: str | None = None  # the diffusers pipeline it extends
    denoiser: str | None = None  # the pipeline attribute holding the denoiser: "unet" or "transformer"

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"spec {self.kind}: unknown scheduler {self.scheduler!r}")
        object.__setattr__(self, "recipe", _frozen(self.recipe))
        object.__setattr__(self, "notes", _frozen(self.notes))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @property
    def flow(self) -> bool:
        """Whether the kind is a flow-matching model (velocity predictions, the flow SDE sampler)."""
        return self.scheduler == "sde"

    @property
    def noise_flag(self) -> str:
        """What the noise level means for this kind, in words."""
        return "flow SDE noise level" if self.flow else "DDIM eta"

    def finetune_defaults(self) -> dict[str, Any]:
        """The ``DPOKConfig`` fields ``dblend finetune`` starts from: the recipe, the LoRA size and the sampler."""
        values = {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha, "eta": self.noise_level}
        values.update(self.recipe)
        return values

    def sampler_line(self, steps: int | None = None, guidance_scale: float | None = None,
                     noise_level: float | None = None) -> str:
        """``"DDIM eta=1, 50 steps, guidance 7.5"``: the sampler a run uses (its values or the spec's)."""
        steps = self.steps if steps is None else steps
        noise = self.noise_level if noise_level is None else noise_level
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        sampler = f"flow SDE noise level {noise:g}" if self.flow else f"DDIM eta={noise:g}"
        text = f"{sampler}, {steps} steps"
        return text if guidance is None else f"{text}, guidance {guidance:g}"


def spec_table(specs: Mapping[str, ModelSpec], recipe: bool = False) -> str:
    """The kinds' defaults as aligned text lines (``--help`` epilogs): the sampling defaults, or with ``recipe`` the
    fine-tuning defaults (sampler, guidance of the rollouts, LoRA size, the recipe's fields)."""
    if recipe:
        rows = [("kind", "sampler", "guidance", "LoRA r/alpha", "recipe")]
        for spec in specs.values():
            guidance = "-" if spec.guidance_scale is None else f"{spec.guidance_scale:g}"
            fields = ", ".join(f"{key}={value}" for key, value in spec.recipe.items())
            rows.append((spec.kind, f"{spec.scheduler} {spec.noise_level:g}", guidance,
                         f"{spec.lora_rank}/{spec.lora_alpha:g}", fields))
    else:
        rows = [("kind", "base", "sampler", "steps", "guidance")]
        for spec in specs.values():
            guidance = "-" if spec.guidance_scale is None else f"{spec.guidance_scale:g}"
            sampler = f"flow SDE, noise level {spec.noise_level:g}" if spec.flow else f"DDIM, eta {spec.noise_level:g}"
            rows.append((spec.kind, spec.label, sampler, str(spec.steps), guidance))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows)
