"""LoRA adapters on any torch network, and the multi-adapter denoiser family (peft).

One network carries the base weights and m named LoRA adapters (peft ``inject_adapter_in_model``; diffusers
models loaded with ``load_lora_weights`` / ``add_adapter`` carry the same peft layers). :class:`LoraFamily`
evaluates any mix of members (base = no adapter, or an adapter); the base is the same network with no adapter,
never a copy. Its ``routing`` chooses how (see :data:`ROUTINGS` and ``docs/design.md``, "Adapter routing"):

- ``"sequential"``: one forward per member, on that member's rows only (the cost and memory of switching
  adapters one by one);
- ``"batched"``: ONE forward of the whole batch, each member's rows a contiguous block;
- ``"auto"``: sequential on CPU (measured faster and smaller there), batched on CUDA unless the measured
  activation memory of one member's forward says the batched forward would not fit.

Either way every LoRA ``Linear`` layer runs :func:`routed_adapters`'s forward instead of peft's: the base
matmul once per block with the block's adapter folded in (``W + s B A``, peft's ``get_delta_weight``) or
its low-rank delta accumulated in place, whichever is cheaper for the layer's shape. peft still owns the
adapters (loading, saving, state dicts); layers the fast forward does not cover (conv, DoRA and other variants,
``lora_bias``, merged adapters, hooked base layers) keep peft's own forward (``set_adapter`` or its
mixed-adapter batch, :func:`mixed_adapter_batch`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from diffusion_blend.denoisers import (
    DenoiserFamily,
    Member,
    check_routing,
    device_routing,
    select_rows,
)
from diffusion_blend.devices import ROUTINGS  # noqa: F401 (re-exported)
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.preference import BASE, PreferenceError

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
        if name is None or name not in layer.lora_A:  # a layer the adapter does not target is the base there
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
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


# ---------------------------------------------------------------------------------------------------------------
# Adapter routing: which adapter each block of batch rows goes through, and how the batch is split into forwards.

Block = tuple[int, int, str | None]
"""Batch rows ``[start, stop)`` and the adapter they go through (``None``: the base, no adapter)."""

CUDA_BATCH_HEADROOM = 1.25  # "auto" batches on CUDA only if the extra activations fit 1.25 times over


def batched_fits(activation_bytes: int, members: int, free_bytes: int, headroom: float = CUDA_BATCH_HEADROOM) -> bool:
    """Whether one batched forward of ``members`` blocks fits when one member's forward needed ``activation_bytes``
    beyond the weights: the batch holds ``members - 1`` more blocks' activations, which must fit in ``free_bytes``
    ``headroom`` times over."""
    return (members - 1) * max(int(activation_bytes), 0) * headroom <= free_bytes


def contiguous_blocks(members: Sequence[Member]) -> list[Block]:
    """Maximal runs of equal members: ``[a, a, b, b, a] -> [(0, 2, a), (2, 4, b), (4, 5, a)]``."""
    return contiguous_runs([(row, row + 1, member) for row, member in enumerate(members)])


def contiguous_runs(blocks: Sequence[Block]) -> list[Block]:
    """Adjacent blocks of the same adapter merged: ``[(0, 2, a), (2, 4, a)] -> [(0, 4, a)]``."""
    merged: list[Block] = []
    for a, b, name in blocks:
        if merged and merged[-1][2] == name and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b, name)
        else:
            merged.append((a, b, name))
    return merged


def _fast_path_ok(layer: LoraLayer, names: set[str]) -> bool:
    """Whether :func:`_routed_linear` computes exactly what peft's forward would for adapters ``names``."""
    base = layer.get_base_layer()
    if not (isinstance(layer, LoraLinear) and type(base) is nn.Linear) or layer.fan_in_fan_out or layer.merged:
        return False
    if "forward" in vars(layer) or "forward" in vars(base) or hasattr(base, "_hf_hook"):
        return False  # someone else (accelerate offloading, a patch) wraps this layer's forward
    if base._forward_hooks or base._forward_pre_hooks:
        return False
    for name in names & set(layer.lora_A.keys()):
        if name in layer.lora_variant or layer.lora_bias.get(name, False):
            return False
        if layer.training and not isinstance(layer.lora_dropout[name], nn.Identity):
            return False
    return True


def _delta_is_cheaper(rows: int, in_features: int, out_features: int, rank: int) -> bool:
    """Folding ``s B A`` into the weight costs a rank-r product over the weight plus writing it (~(2r + 3) in out);
    the low-rank delta costs ``x A^T B^T`` over the rows plus one in-place pass over the output."""
    return rows * (2 * rank * (in_features + out_features) + 2 * out_features) < (
        in_features * out_features * (2 * rank + 3)
    )


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` for 2-D ``x``, written into ``out`` when given (no autograd) or returned."""
    if out is None:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def _adapter_rows(layer: LoraLinear, x: torch.Tensor, name: str | None, out: torch.Tensor | None) -> torch.Tensor:
    """Rows ``x`` (2-D) through the base weight plus adapter ``name``'s LoRA (``name=None``: the base only)."""
    base = layer.get_base_layer()
    weight, bias = base.weight, base.bias
    if name is None or name not in layer.lora_A:
        return _linear(x, weight, bias, out)
    lora_a, lora_b, scaling = layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name]
    same_dtype = lora_a.dtype == weight.dtype == x.dtype
    if same_dtype and not _delta_is_cheaper(x.shape[0], weight.shape[1], weight.shape[0], lora_a.shape[0]):
        return _linear(x, torch.addmm(weight, lora_b, lora_a, alpha=scaling), bias, out)  # W + s B A
    result = _linear(x, weight, bias, out)
    hidden = F.linear(x.to(lora_a.dtype), lora_a)
    if same_dtype and not torch.is_autocast_enabled(x.device.type):  # in-place ops are not autocast
        return result.addmm_(hidden, lora_b.t(), alpha=scaling)  # in place: no full-size temporaries
    return result.add_(F.linear(hidden, lora_b).to(result.dtype), alpha=scaling)


def _routed_linear(
    layer: LoraLinear, blocks: Sequence[Block], x: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """The forward installed by :func:`routed_adapters` on a LoRA ``Linear``: rows of block ``(a, b, name)``
    go through the base plus adapter ``name``; each block is a slice of the batch, never a mask."""
    if args or kwargs:
        raise TypeError(f"a LoRA Linear takes one input, got extra arguments {args or ''}{list(kwargs) or ''}")
    base = layer.get_base_layer()
    in_features, out_features = base.weight.shape[1], base.weight.shape[0]
    rows = blocks[-1][1]
    if len(blocks) > 1 and (x.ndim < 2 or x.shape[0] != rows):
        raise DiffusionBlendError(
            f"a LoRA layer received a batch of {x.shape[0] if x.ndim else 0} rows for {rows} routed rows; "
            "use routing='sequential' for networks that reshape the batch"
        )
    flat = x.reshape(-1, in_features)
    per_row = flat.shape[0] // rows if len(blocks) > 1 else 0
    grad = torch.is_grad_enabled() and (
        x.requires_grad or any(param.requires_grad for param in layer.parameters())
    )
    grad = grad or torch.is_autocast_enabled(x.device.type)  # autocast picks dtypes: no preallocated output
    if len(blocks) == 1:
        out = _adapter_rows(layer, flat, blocks[0][2], None)
    elif grad:  # autograd or autocast: pieces and one concatenation (``out=`` records no graph, fixes the dtype)
        out = torch.cat([_adapter_rows(layer, flat[a * per_row: b * per_row], name, None) for a, b, name in blocks])
    else:
        out = torch.empty((flat.shape[0], out_features), dtype=base.weight.dtype, device=flat.device)
        for a, b, name in blocks:
            _adapter_rows(layer, flat[a * per_row: b * per_row], name, out[a * per_row: b * per_row])
    return out.view(*x.shape[:-1], out_features)


@contextmanager
def routed_adapters(
    model: nn.Module, blocks: Sequence[Block], layers: Sequence[LoraLayer] | None = None
) -> Iterator[None]:
    """Within the context, batch rows ``[a, b)`` of every forward of ``model`` go through adapter ``name`` for each
    block ``(a, b, name)`` (``name=None``: the base), whatever adapters peft has active.

    LoRA ``Linear`` layers get :func:`_routed_linear` as an instance ``forward`` (removed on exit); any other LoRA
    layer (conv, DoRA, ...) gets peft's mixed-adapter batch (:func:`mixed_adapter_batch`). One block routes the whole
    batch, whatever its shape.
    """
    blocks = [(int(a), int(b), name) for a, b, name in blocks]
    if not blocks or blocks[0][0] != 0 or any(prev[1] != nxt[0] for prev, nxt in zip(blocks, blocks[1:])):
        raise ValueError(f"blocks must tile the batch from row 0 in order, got {blocks}")
    layers = lora_layers(model) if layers is None else list(layers)
    names = {name for _, _, name in blocks if name is not None}
    fast = [layer for layer in layers if _fast_path_ok(layer, names)]
    fast_ids = {id(layer) for layer in fast}
    slow = [layer for layer in layers if id(layer) not in fast_ids]
    for layer in fast:
        layer.forward = functools.partial(_routed_linear, layer, blocks)
    try:
        if slow:
            rows = [PEFT_BASE if name is None else name for a, b, name in blocks for _ in range(a, b)]
            with _peft_mixed_batch(slow, rows):
                yield
        else:
            yield
    finally:
        for layer in fast:
            del layer.forward


@contextmanager
def _peft_mixed_batch(layers: Sequence[LoraLayer], names: Sequence[str]) -> Iterator[None]:
    names = list(names)

    def inject(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs["adapter_names"] = names
        return args, kwargs

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


@contextmanager
def mixed_adapter_batch(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """peft's own mixed-adapter batch: row ``b`` through adapter ``names[b]`` (``"__base__"``: none) in every LoRA
    layer, each layer masking rows by index (``LoraLayer._mixed_batch_forward``). :class:`LoraFamily` uses the
    faster :func:`routed_adapters`; this stays as peft's reference path (tests, benchmark "before" figures)."""
    with _peft_mixed_batch(lora_layers(model), names):
        yield


class LoraFamily(DenoiserFamily):
    """Base + LoRA experts of ONE network (no copies), routed per member (see the module docstring).

    ``forward(model, x_t, t, **cond)`` calls the network and returns its noise (or velocity) prediction.
    The network must be in eval mode (peft refuses mixed batches while training: dropout). ``routing``:
    ``"auto"`` (default), ``"batched"`` or ``"sequential"``; ``last_routing`` is the one the last call used.
    ``calls`` counts :meth:`route` calls (one blended evaluation each), ``forwards`` network forwards.
    """

    def __init__(
        self, model: nn.Module, forward: Forward, expert_names: Sequence[str] | None = None, routing: str = "auto"
    ):
        available = adapter_names(model)
        self.expert_names = tuple(available if expert_names is None else expert_names)
        missing = [name for name in self.expert_names if name not in available]
        if missing:
            raise PreferenceError(f"the model has no adapter {', '.join(map(repr, missing))}")
        if not self.expert_names:
            raise PreferenceError("the model carries no LoRA adapter")
        self.model = model
        self.forward = forward
        self.routing = check_routing(routing)
        self.last_routing: str | None = None
        self.calls = 0
        self.forwards = 0
        self._cuda_choice: dict[tuple, str] = {}  # "auto" on CUDA: measured decision per (device, shape, members)

    def route(self, x_t: torch.Tensor, t: Any, members: Sequence[Member], **cond: Any) -> torch.Tensor:
        self.check_members(members)
        if self.model.training:
            raise RuntimeError("put the model in eval mode (model.eval()) before blending adapters")
        if len(members) != x_t.shape[0]:
            raise ValueError(f"{len(members)} routes for a batch of {x_t.shape[0]}")
        self.calls += 1
        layers = lora_layers(self.model)
        groups = list(dict.fromkeys(members))  # unique members, in order of first appearance
        routing = device_routing(self.routing, x_t.device)
        key = (str(x_t.device), tuple(x_t.shape), len(groups))
        measure = False
        if self.routing == "auto" and x_t.device.type == "cuda" and len(groups) > 1:
            routing = self._cuda_choice.get(key, "sequential")
            measure = key not in self._cuda_choice
        self.last_routing = routing
        if len(groups) == 1:
            return self._forward(layers, [(0, x_t.shape[0], groups[0])], x_t, t, cond)
        if routing == "batched":
            return self._batched(layers, x_t, t, members, groups, cond)
        if measure:
            torch.cuda.synchronize(x_t.device)
            before = torch.cuda.memory_allocated(x_t.device)
        out = self._sequential(layers, x_t, t, members, groups, cond)
        if measure:  # the historical peak bounds one member's forward from above: a conservative estimate
            activation = torch.cuda.max_memory_allocated(x_t.device) - before
            free, _ = torch.cuda.mem_get_info(x_t.device)
            free += torch.cuda.memory_reserved(x_t.device) - torch.cuda.memory_allocated(x_t.device)
            self._cuda_choice[key] = "batched" if batched_fits(activation, len(groups), free) else "sequential"
        return out

    def _forward(
        self, layers: list[LoraLayer], blocks: list[Block], x_t: torch.Tensor, t: Any, cond: dict
    ) -> torch.Tensor:
        """One network forward of ``x_t`` with rows ``[a, b)`` through member ``name`` for each block; a forward
        that stacks ``c`` copies of its rows (:func:`stacked_copies`) gets the blocks repeated for every copy."""
        self.forwards += 1
        rows = x_t.shape[0]
        stacked = [(a + copy * rows, b + copy * rows, _adapter(name))
                   for copy in range(stacked_copies(self.forward)) for a, b, name in blocks]
        with routed_adapters(self.model, contiguous_runs(stacked), layers):
            return self.forward(self.model, x_t, t, **cond)

    def _sequential(self, layers, x_t, t, members, groups, cond) -> torch.Tensor:
        """One forward per member on its rows (a slice when they are contiguous), outputs back in row order."""
        batch = x_t.shape[0]
        pieces, order = [], []
        for member in groups:
            rows = [row for row, m in enumerate(members) if m == member]
            contiguous = rows[-1] - rows[0] + 1 == len(rows)
            index = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=x_t.device)
            x_rows = x_t[index] if contiguous else x_t.index_select(0, index)
            pieces.append(self._forward(layers, [(0, len(rows), member)], x_rows, _rows_of_t(t, index, batch),
                                        select_rows(cond, index, batch)))
            order.extend(rows)
        out = torch.cat(pieces)
        if order != list(range(batch)):
            out = out.index_select(0, torch.argsort(torch.tensor(order, device=out.device)))
        return out

    def _batched(self, layers, x_t, t, members, groups, cond) -> torch.Tensor:
        """One forward; rows grouped so that each member's rows are one contiguous block (permuted if needed)."""
        batch = x_t.shape[0]
        blocks = contiguous_blocks(members)
        if len(blocks) == len(groups):
            return self._forward(layers, blocks, x_t, t, cond)
        order = [row for member in groups for row, m in enumerate(members) if m == member]
        index = torch.tensor(order, device=x_t.device)
        out = self._forward(layers, contiguous_blocks([members[row] for row in order]), x_t.index_select(0, index),
                            _rows_of_t(t, index, batch), select_rows(cond, index, batch))
        return out.index_select(0, torch.argsort(index))


def _adapter(member: Member) -> str | None:
    return None if member is BASE else member


def _rows_of_t(t: Any, index: slice | torch.Tensor, batch: int) -> Any:
    """A per-row timestep vector follows the rows; a shared timestep passes unchanged."""
    if torch.is_tensor(t) and t.ndim == 1 and t.shape[0] == batch and batch > 1:
        return t[index] if isinstance(index, slice) else t.index_select(0, index.to(t.device))
    return t
