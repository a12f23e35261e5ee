"""LoRA adapters on any torch network, and the multi-adapter denoiser family (peft).

One network carries the base weights and m named LoRA adapters (peft ``inject_adapter_in_model``; diffusers
models loaded with ``load_lora_weights`` / ``add_adapter`` carry the same peft layers). :class:`LoraFamily`
evaluates any mix of members (base = no adapter, or an adapter) in ONE forward pass: each peft LoRA layer
receives ``adapter_names`` (one per batch row) through a forward-pre-hook and applies each row's adapter to
that row only (peft's mixed-adapter batch). The base is the same network with no adapter, never a copy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from .denoisers import DenoiserFamily, Member
from .preference import BASE, PreferenceError

PEFT_BASE = "__base__"  # peft's name for "no adapter" in a mixed batch

Forward = Callable[..., torch.Tensor]
"""``forward(model, x_t, t, **cond) -> eps``: how a network is called (e.g. ``unet(x, t, ...).sample``).

A forward that stacks its rows into one network batch of ``c`` copies (classifier-free guidance's
``[uncond; cond]``: ``c = 2``) says so with the attribute ``forward.stacked_copies = c``; a mixed-adapter batch
then routes every copy of row ``b`` through row ``b``'s member (:meth:`LoraFamily.route`)."""


def stacked_copies(forward: Forward) -> int:
    """How many stacked copies of its input rows ``forward`` sends through the network (1 unless declared)."""
    return int(getattr(forward, "stacked_copies", 1))


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def adapter_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the LoRA adapters present on ``model``."""
    names: dict[str, None] = {}
    for layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return tuple(names)


def add_lora(
    model: nn.Module,
    name: str,
    *,
    rank: int = 4,
    target_modules: Sequence[str] | str,
    alpha: float | None = None,
    init_lora_weights: bool | str = True,
) -> nn.Module:
    """Inject a LoRA adapter ``name`` into ``model`` (in place) and freeze everything but LoRA parameters.

    With the default init (``lora_B = 0``) the new adapter equals the base exactly.
    """
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}")
    if name == PEFT_BASE:
        raise ValueError(f"{PEFT_BASE!r} is reserved")
    config = LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        init_lora_weights=init_lora_weights,
    )
    with warnings.catch_warnings():  # peft warns on every adapter after the first; several are the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)
    for param_name, param in model.named_parameters():
        param.requires_grad_("lora_" in param_name)
    return model


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the only active adapter (``None``: all adapters disabled, i.e. the base model)."""
    layers = lora_layers(model)
    if name is not None and name not in adapter_names(model):
        raise PreferenceError(f"the model has no adapter {name!r}; it has {', '.join(adapter_names(model))}")
    for layer in layers:
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            if name in layer.lora_A:
                layer.set_adapter(name)


@contextmanager
def active_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    """Temporarily activate one adapter (``None``: the base model), restoring the previous state after."""
    layers = lora_layers(model)
    saved = [(layer, layer.disable_adapters, list(layer.active_adapters)) for layer in layers]
    set_active_adapter(model, name)
    try:
        yield
    finally:
        for layer, disabled, active in saved:
            layer.enable_adapters(not disabled)
            if active:
                layer.set_adapter(active)


@contextmanager
def mixed_adapter_batch(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Route batch row ``b`` through adapter ``names[b]`` (``"__base__"``: none) in every LoRA layer."""
    names = list(names)

    def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs["adapter_names"] = names
        return args, kwargs

    layers = lora_layers(model)
    saved = [(layer, layer.disable_adapters) for layer in layers]
    handles = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in layers]
    for layer in layers:
        layer.enable_adapters(True)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, disabled in saved:
            layer.enable_adapters(not disabled)


class LoraFamily(DenoiserFamily):
    """Base + LoRA experts of ONE network, evaluated together in one mixed-adapter forward.

    ``forward(model, x_t, t, **cond)`` calls the network and returns its noise (or velocity) prediction.
    The network must be in eval mode (peft refuses mixed batches while training: dropout).
    """

    def __init__(self, model: nn.Module, forward: Forward, expert_names: Sequence[str] | None = None):
        available = adapter_names(model)
        self.expert_names = tuple(available if expert_names is None else expert_names)
        missing = [name for name in self.expert_names if name not in available]
        if missing:
            raise PreferenceError(f"the model has no adapter {', '.join(map(repr, missing))}")
        if not self.expert_names:
            raise PreferenceError("the model carries no LoRA adapter")
        self.model = model
        self.forward = forward
        self.calls = 0  # network forwards, for cost accounting

    def route(self, x_t: torch.Tensor, t: Any, members: Sequence[Member], **cond: Any) -> torch.Tensor:
        self.check_members(members)
        if self.model.training:
            raise RuntimeError("put the model in eval mode (model.eval()) before blending adapters")
        self.calls += 1
        unique = set(members)
        if len(unique) == 1:  # one member for the whole batch: a plain forward
            (member,) = unique
            with active_adapter(self.model, member):
                return self.forward(self.model, x_t, t, **cond)
        names = [PEFT_BASE if member is BASE else member for member in members] * stacked_copies(self.forward)
        with mixed_adapter_batch(self.model, names):
            return self.forward(self.model, x_t, t, **cond)
