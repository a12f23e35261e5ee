"""Errors that mean "bad input": the CLI prints them as one line and exits with status 2."""

import math
from typing import Any


class DiffusionBlendError(ValueError):
    """Invalid user input (weights, files, adapters, shapes, values)."""


class AdapterMismatchError(DiffusionBlendError):
    """An adapter does not fit the base model it is being loaded into."""


class RewardError(DiffusionBlendError):
    """A reward is unknown, misconfigured, or returned NaN/infinite values."""


def finite_number(value: Any, what: str, error: type[DiffusionBlendError] = DiffusionBlendError) -> float:
    """``value`` as a finite float, else ``error`` naming ``what`` (boundary validation shared by every layer)."""
    if isinstance(value, bool):
        raise error(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise error(f"{what} must be finite, got {number}")
    return number


def positive_number(value: Any, what: str, allow_zero: bool = False) -> float:
    """``value`` (an int or float, not a string) as a finite float that is > 0 (``>= 0`` with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DiffusionBlendError(f"{what} must be a number, got {value!r}")
    number = finite_number(value, what)
    if number < 0 or (number == 0 and not allow_zero):
        raise DiffusionBlendError(f"{what} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return number


def positive_int(value: Any, what: str) -> int:
    """``value`` if it is an integer >= 1 (``bool`` refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DiffusionBlendError(f"{what} must be a positive integer, got {value!r}")
    return value


def check_scores(values: Any, rows: int, who: str, error: type[DiffusionBlendError] = DiffusionBlendError) -> Any:
    """``values`` as a tensor of ``rows`` finite scores, else ``error`` naming ``who`` (a reward, an ``r_w``): the
    one check of a reward's output, shared by the reward contract, the weighted rewards and SMC."""
    import torch  # here, not at the top: this module is read by the CLI before torch is needed

    values = torch.as_tensor(values)
    if values.shape != (rows,):
        raise error(f"{who} returned shape {tuple(values.shape)}, expected ({rows},)")
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum().item())
        raise error(f"{who} returned {bad} NaN or infinite value(s)")
    return values
