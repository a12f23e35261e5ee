"""Blend LoRA adapters of a diffusers pipeline's UNet in output space, inside the stock denoising loop.

Every diffusers UNet pipeline calls ``self.unet(latent_model_input, t, encoder_hidden_states=..., ...)`` once
per step on the classifier-free-guidance batch ``[uncond; cond]`` and combines the two halves afterwards.
:func:`blended_unet` replaces ``unet.forward`` for the duration of one pipeline call by a forward that
returns, for every row, the blended noise prediction ``sum_j c_j eps_j`` of paper Lemma 2 / section 2.6
(DB-MPA, DB-KLA, combined) or the prediction of one randomly drawn member (DB-MPA-LS, Proposition 2).
Because CFG and the blend are both affine with coefficients summing to one, blending per CFG row and then
guiding equals guiding each member and then blending (paper section 3.2), so the stock loop, its scheduler,
``eta``, ``generator``, callbacks and output handling all stay untouched.

All members come from the ONE UNet: experts are its named LoRA adapters, the base is the same UNet with no
adapter (:class:`diffusion_blend.lora.LoraFamily`). DB-MPA evaluates every member with a non-zero
coefficient on the pipeline's CFG batch; ``routing`` decides how: ``"batched"`` is one forward of rows =
members x [uncond, cond], ``"sequential"`` one forward of the CFG batch per member (what switching adapters one
by one costs, never more), ``"auto"`` sequential on CPU and batched on CUDA when it fits. DB-MPA-LS draws one
member per *sample* per step (both CFG rows of a sample use it); with one sample that is one forward of the CFG
batch per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..denoisers import BlendedDenoiser, SwitchingDenoiser
from ..lora import LoraFamily, adapter_names
from ..preference import Preference, PreferenceError
from ..sampling import as_generator

METHODS = ("mpa", "ls")
_NESTED = "."  # separator of flattened nested keyword arguments (added_cond_kwargs.text_embeds, ...)


def _flatten(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts of keyword arguments (``added_cond_kwargs``) one level flat, so batched tensors in them are
    tiled and selected with the batch by the denoiser machinery."""
    flat: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, Mapping):
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


class UNetBlend:
    """The blending forward installed on a UNet for one pipeline call (see the module docstring).

    ``guided_copies()`` returns how many stacked copies of the samples the UNet batch holds at call time (2
    with classifier-free guidance, else 1); DB-MPA-LS uses it so that a sample's CFG rows share one draw.
    ``calls`` counts blended UNet evaluations (one per denoising step for both methods), ``forwards`` the
    network forwards they took (``routing="sequential"``: one per member), ``routing`` is the requested routing
    and ``routing_used`` the one the last step used.
    """

    def __init__(
        self,
        unet: nn.Module,
        preference: Preference,
        method: str = "mpa",
        switch_generator: torch.Generator | int | None = None,
        guided_copies: Any = None,
        routing: str = "auto",
    ):
        if method not in METHODS:
            raise PreferenceError(f"unknown blend method {method!r}; choose 'mpa' (DB-MPA) or 'ls' (DB-MPA-LS)")
        if not isinstance(preference, Preference):
            raise PreferenceError(f"preference must be a diffusion_blend.Preference, got {type(preference).__name__}")
        names = adapter_names(unet)
        if not names:
            raise PreferenceError("the pipeline's UNet carries no LoRA adapter; load some with load_adapter()")
        preference.coefficients(names)  # unknown names fail here, before any work
        if method == "ls":
            preference.coefficients(names).probabilities()  # negative coefficients fail here
            if switch_generator is None:
                raise PreferenceError("method 'ls' draws a model per step: pass a seed or torch.Generator")
        self.unet = unet
        self.original_forward = unet.forward
        self.family = LoraFamily(unet, self._forward_unet, names, routing=routing)
        self.routing = self.family.routing
        self.preference = preference
        self.method = method
        self.switch_generator = None if switch_generator is None else as_generator(switch_generator)
        self.guided_copies = guided_copies or (lambda: 1)
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

    def _forward_unet(self, model: nn.Module, sample: torch.Tensor, timestep: Any, **flat: Any) -> torch.Tensor:
        kwargs = _unflatten(flat)
        kwargs["return_dict"] = False
        return self.original_forward(sample, _match_timestep(timestep, sample.shape[0]), **kwargs)[0]

    def _make_denoiser(self) -> BlendedDenoiser | SwitchingDenoiser:
        if self.method == "mpa":
            return BlendedDenoiser(self.family, self.preference)
        return SwitchingDenoiser(self.family, self.preference, self.switch_generator, copies=self.guided_copies())

    def __call__(
        self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor | None = None, **kwargs: Any
    ) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        if self.denoiser is None:  # built on the first step, when the pipeline has fixed its CFG setting
            self.denoiser = self._make_denoiser()
        flat = _flatten({"encoder_hidden_states": encoder_hidden_states, **kwargs})
        prediction = self.denoiser(sample, timestep, **flat)
        if not return_dict:
            return (prediction,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=prediction)


@contextmanager
def blended_unet(unet: nn.Module, blend: UNetBlend) -> Iterator[UNetBlend]:
    """Install ``blend`` as ``unet.forward`` (module hooks still run around it) and restore it afterwards."""
    had_instance_forward = "forward" in vars(unet)
    saved = vars(unet).get("forward")
    unet.forward = blend
    try:
        yield blend
    finally:
        if had_instance_forward:
            unet.forward = saved
        else:
            del unet.forward
