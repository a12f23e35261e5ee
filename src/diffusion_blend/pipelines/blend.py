"""Blend LoRA adapters of a diffusers pipeline's denoiser (UNet or transformer) in output space, inside the stock loop.

Every diffusers UNet pipeline calls ``self.unet(latent_model_input, t, encoder_hidden_states=..., ...)`` once
per step on the classifier-free-guidance batch ``[uncond; cond]`` and combines the two halves afterwards; the
SD3 pipeline calls ``self.transformer(hidden_states=..., timestep=..., encoder_hidden_states=...,
pooled_projections=...)`` the same way, and FLUX (guidance-distilled: ``guidance=`` is an input, no CFG batch)
once per step on the plain batch. :func:`blended_denoiser` replaces the denoiser's ``forward`` for the duration
of one pipeline call by a forward that returns, for every row, the blended prediction ``sum_j c_j eps_j`` (noise
or velocity) of paper Lemma 2 / section 2.6 (DB-MPA, DB-KLA, combined) or the prediction of one randomly drawn
member (DB-MPA-LS, Proposition 2). Because CFG and the blend are both affine with coefficients summing to one,
and a flow model's velocity is affine in its score with model-independent coefficients (docs/method.md),
blending per CFG row and then guiding equals guiding each member and then blending (paper section 3.2), so the
stock loop, its scheduler, ``eta``, ``generator``, callbacks and output handling all stay untouched.

All members come from the ONE denoiser: experts are its named LoRA adapters, the base is the same network with no
adapter (:class:`diffusion_blend.lora.LoraFamily`). DB-MPA evaluates every member with a non-zero
coefficient on the pipeline's CFG batch; ``routing`` decides how: ``"batched"`` is one forward of rows =
members x [uncond, cond], ``"sequential"`` one forward of the CFG batch per member (what switching adapters one
by one costs, never more), ``"auto"`` sequential on CPU and batched on CUDA when it fits. DB-MPA-LS draws one
member per *sample* per step (both CFG rows of a sample use it); with one sample that is one forward of the CFG
batch per step.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffusion_blend.denoisers import BlendedDenoiser, SwitchingDenoiser, make_denoiser
from diffusion_blend.lora import LoraFamily, adapter_names
from diffusion_blend.preference import Preference, PreferenceError, PreferenceSchedule
from diffusion_blend.sampling import as_generator

METHODS = ("mpa", "ls")
_NESTED = "."  # separator of flattened nested keyword arguments (added_cond_kwargs.text_embeds, ...)
UNBATCHED_KEYWORDS = frozenset({"txt_ids", "img_ids"})
"""Tensor inputs without a batch dimension (FLUX's rotary position ids): passed through, never tiled with the batch."""


@dataclass(frozen=True)
class _Unbatched:
    value: Any


def _flatten(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts of keyword arguments (``added_cond_kwargs``) one level flat, so batched tensors in them are
    tiled and selected with the batch by the denoiser machinery."""
    flat: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in UNBATCHED_KEYWORDS:
            flat[key] = _Unbatched(value)  # not a tensor: the member machinery leaves it alone
        elif isinstance(value, Mapping):
            flat[key + _NESTED] = True  # marks a (possibly empty) nested dict
            flat.update({f"{key}{_NESTED}{sub}": item for sub, item in value.items()})
        else:
            flat[key] = value
    return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {key[:-1]: {} for key in flat if key.endswith(_NESTED)}
    for key, value in flat.items():
        if key.endswith(_NESTED):
            continue
        if isinstance(value, _Unbatched):
            value = value.value
        outer, sep, inner = key.partition(_NESTED)
        if sep and outer in kwargs:
            kwargs[outer][inner] = value
        else:
            kwargs[key] = value
    return kwargs


def _match_timestep(timestep: Any, batch: int) -> Any:
    """A per-row timestep vector tiled to the (possibly stacked) batch; scalars pass unchanged."""
    if torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.shape[0] not in (1, batch):
        return timestep.repeat(batch // timestep.shape[0])
    return timestep


class DenoiserBlend:
    """The blending forward installed on a UNet or transformer for one pipeline call (see the module docstring).

    ``guided_copies()`` returns how many stacked copies of the samples the denoiser batch holds at call time (2
    with classifier-free guidance, else 1); DB-MPA-LS uses it so that a sample's CFG rows share one draw.
    ``calls`` counts blended denoiser evaluations (one per denoising step for both methods), ``forwards`` the
    network forwards they took (``routing="sequential"``: one per member), ``routing`` is the requested routing
    and ``routing_used`` the one the last step used.
    """

    def __init__(
        self,
        model: nn.Module,
        preference: Preference | PreferenceSchedule,
        method: str = "mpa",
        switch_generator: torch.Generator | int | None = None,
        guided_copies: Any = None,
        routing: str = "auto",
        progress: Any = None,
    ):
        if method not in METHODS:
            raise PreferenceError(f"unknown blend method {method!r}; choose 'mpa' (DB-MPA) or 'ls' (DB-MPA-LS)")
        if not isinstance(preference, Preference | PreferenceSchedule):
            raise PreferenceError("preference must be a diffusion_blend.Preference (or a PreferenceSchedule), got "
                                  f"{type(preference).__name__}")
        names = adapter_names(model)
        if not names:
            raise PreferenceError(
                f"the pipeline's {type(model).__name__} carries no LoRA adapter; load some with load_adapter()"
            )
        points = [preference] if isinstance(preference, Preference) else preference.preferences()
        for point in points:
            point.coefficients(names)  # unknown names fail here, before any work
            if method == "ls":
                point.coefficients(names).probabilities()  # negative coefficients fail here
        if method == "ls":
            if switch_generator is None:
                raise PreferenceError("method 'ls' draws a model per step: pass a seed or torch.Generator")
        self.model = model
        self.original_forward = model.forward
        parameters = list(inspect.signature(self.original_forward).parameters)
        self.input_name = parameters[0]  # "sample" (UNets) or "hidden_states" (transformers)
        self.parameter_names = parameters
        self.family = LoraFamily(model, self._forward_model, names, routing=routing)
        self.routing = self.family.routing
        self.preference = preference
        self.method = method
        self.switch_generator = None if switch_generator is None else as_generator(switch_generator)
        self.guided_copies = guided_copies or (lambda: 1)
        self.progress = progress  # a schedule's step progress (the pipeline's scheduler's timesteps)
        self.denoiser: BlendedDenoiser | SwitchingDenoiser | None = None

    @property
    def calls(self) -> int:
        return self.family.calls

    @property
    def forwards(self) -> int:
        return self.family.forwards

    @property
    def routing_used(self) -> str | None:
        return self.family.last_routing

    def _forward_model(self, model: nn.Module, sample: torch.Tensor, timestep: Any, **flat: Any) -> torch.Tensor:
        kwargs = _unflatten(flat)
        kwargs["return_dict"] = False
        kwargs[self.input_name] = sample
        kwargs["timestep"] = _match_timestep(timestep, sample.shape[0])
        return self.original_forward(**kwargs)[0]


    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        named = dict(zip(self.parameter_names, args))
        duplicated = sorted(set(named) & set(kwargs))
        if duplicated:
            raise TypeError(f"{type(self.model).__name__}.forward got multiple values for {', '.join(duplicated)}")
        kwargs.update(named)
        return_dict = kwargs.pop("return_dict", True)
        sample = kwargs.pop(self.input_name)
        timestep = kwargs.pop("timestep")
        if self.denoiser is None:  # built on the first step, when the pipeline has fixed its CFG setting
            self.denoiser = make_denoiser(self.family, self.preference, self.method, self.switch_generator,
                                          copies=self.guided_copies(), progress=self.progress)
        prediction = self.denoiser(sample, timestep, **_flatten(kwargs))
        if not return_dict:
            return (prediction,)
        if "Transformer" in type(self.model).__name__:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=prediction)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=prediction)



@contextmanager
def blended_denoiser(model: nn.Module, blend: DenoiserBlend) -> Iterator[DenoiserBlend]:
    """Install ``blend`` as ``model.forward`` (module hooks still run around it) and restore it afterwards."""
    had_instance_forward = "forward" in vars(model)
    saved = vars(model).get("forward")
    model.forward = blend
    try:
        yield blend
    finally:
        if had_instance_forward:
            model.forward = saved
        else:
            del model.forward

