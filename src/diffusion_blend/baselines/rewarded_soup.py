"""Rewarded Soup (Rame et al. 2023; paper section 5.1): interpolate the experts in WEIGHT space.

Every expert is a peft LoRA adapter of one network; adapter ``i`` adds ``Delta W_i = s_i B_i A_i`` to each targeted
layer, with ``s_i = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA) the adapter's scaling. For a preference
``(w, lambda)`` the soup is ONE new adapter, so sampling costs one network evaluation per step. Two variants:

- ``"factors"`` (what the reference ``run_RS.py`` does: it averages the two LoRA state dicts key by key, i.e. the
  factor matrices separately): ``Delta W = lambda * (sum_i w_i s_i B_i) (sum_i w_i A_i)``. Rank ``r`` (all experts
  must share it per layer). This is NOT the weighted sum of the updates: the cross terms ``w_i w_j s_i B_i A_j``
  (``i != j``) remain, and the diagonal terms are weighted ``w_i^2`` instead of ``w_i``. It equals expert ``j``
  exactly for one-hot ``w``. When all ``s_i`` are equal this is the reference's average with the common scaling.
- ``"deltas"`` (exact weight-space interpolation): ``Delta W = lambda * sum_i w_i s_i B_i A_i``, stored exactly as a
  rank ``sum_i r_i`` adapter by concatenation, ``B = [lambda w_1 s_1 B_1, ..., lambda w_m s_m B_m]`` and
  ``A = [A_1; ...; A_m]`` (peft's ``add_weighted_adapter(combination_type="cat")`` builds the same product; it only
  exists on ``PeftModel`` wrappers, while this works on any network carrying peft LoRA layers).

``kl_scale`` (lambda) multiplies the update: ``W + lambda Delta`` (weight-space analogue of DB-KLA). The scalings
are folded into ``B`` and the soup adapter has scaling 1 (``lora_alpha = r``), so mixed scalings are handled.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from diffusion_blend.denoisers import Denoiser
from diffusion_blend.errors import AdapterMismatchError, DiffusionBlendError
from diffusion_blend.lora import LoraFamily, adapter_names, lora_layers
from diffusion_blend.preference import Preference

VARIANTS = ("factors", "deltas")


def _layer_factors(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """``(A, B, scaling)`` of adapter ``name`` in one LoRA layer (``None`` if the layer lacks it)."""
    if name in getattr(layer, "lora_embedding_A", {}):
        raise AdapterMismatchError(
            f"adapter {name!r} targets an embedding layer; Rewarded Soup supports Linear/Conv LoRA"
        )
    if name not in layer.lora_A:
        return None
    if getattr(layer, "use_dora", {}).get(name, False):
        raise AdapterMismatchError(
            f"adapter {name!r} uses DoRA: its magnitude vector cannot be averaged as a LoRA update"
        )
    return layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(), float(layer.scaling[name])


def _soup_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float] | None],
    coefficients: Sequence[float],
    weights: Sequence[float],
    variant: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(A, B)`` (scaling 1) of one layer: see the module docstring. ``coefficients = lambda * w``."""
    present = [(f, c, w) for f, c, w in zip(factors, coefficients, weights) if f is not None]
    if variant == "deltas":
        a = torch.cat([f[0] for f, _, _ in present], dim=0)
        b = torch.cat([c * f[2] * f[1] for f, c, _ in present], dim=1)
        return a, b
    ranks = {f[0].shape[0] for f, _, _ in present}
    if len(ranks) != 1:
        raise AdapterMismatchError(
            f"the 'factors' soup needs equal LoRA ranks per layer, got {sorted(ranks)}; use 'deltas'"
        )
    a = sum(w * f[0] for f, _, w in present)
    b = sum(c * f[2] * f[1] for f, c, _ in present)
    return a, b


def add_soup_adapter(
    model: nn.Module,
    preference: Preference,
    *,
    variant: str = "factors",
    name: str = "rewarded_soup",
    expert_names: Sequence[str] | None = None,
) -> str:
    """Add (or replace) adapter ``name`` on ``model``: the Rewarded Soup of the experts for ``preference``.

    ``expert_names`` defaults to the preference's reward names; each must be an adapter on ``model``.
    Returns ``name``. See the module docstring for the two variants.
    """
    if variant not in VARIANTS:
        raise DiffusionBlendError(f"unknown Rewarded Soup variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    experts = tuple(preference.weights) if expert_names is None else tuple(expert_names)
    available = adapter_names(model)
    missing = [e for e in experts if e not in available]
    if missing:
        raise AdapterMismatchError(
            f"the model has no adapter {', '.join(map(repr, missing))}; it has {', '.join(available)}"
        )
    if name in experts:
        raise DiffusionBlendError(f"the soup adapter cannot reuse the expert name {name!r}")
    coefficients = preference.coefficients(experts).experts
    coefs = [coefficients[e] for e in experts]
    weights = [preference.weights.get(e, 0.0) for e in experts]

    layer_names = {module: key for key, module in model.named_modules()}
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in lora_layers(model):
        factors = [_layer_factors(layer, e) for e in experts]
        if all(f is None for f in factors):
            continue
        merged[layer_names[layer]] = _soup_factors(factors, coefs, weights, variant)
    if not merged:
        raise AdapterMismatchError("no LoRA layer carries any of the experts")

    if name in available:
        with warnings.catch_warnings():  # peft warns that the deleted adapter was active; it is replaced below
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            for layer in lora_layers(model):
                if name in layer.lora_A:
                    layer.delete_adapter(name)
    ranks = {key: a.shape[0] for key, (a, _) in merged.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules="|".join(re.escape(key) for key in merged),
        rank_pattern={re.escape(k): r for k, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(k): r for k, r in ranks.items() if r != rank},
        init_lora_weights=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, (a, b) in merged.items():
            layer = modules[key]
            if float(layer.scaling[name]) != 1.0:  # lora_alpha == r per layer, so scaling is 1
                raise AdapterMismatchError(f"unexpected soup scaling {layer.scaling[name]} in layer {key!r}")
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    for param_name, param in model.named_parameters():
        if f".{name}." in param_name:
            param.requires_grad_(False)
    return name


def rewarded_soup_denoiser(
    family: LoraFamily, preference: Preference, *, variant: str = "factors", name: str = "rewarded_soup"
) -> Denoiser:
    """The soup of ``family``'s experts as a denoiser (one network evaluation per step; paper section 5.1)."""
    add_soup_adapter(family.model, preference, variant=variant, name=name, expert_names=family.expert_names)
    return LoraFamily(family.model, family.forward, expert_names=(name,)).member(name)
