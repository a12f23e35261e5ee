"""Small statistics helpers: means with standard errors over seeds or samples."""

from __future__ import annotations

import math

import torch


def mean_and_standard_error(values: torch.Tensor) -> tuple[float, float]:
    """Sample mean and its standard error (``std / sqrt(n)``, unbiased std; 0 for a single value)."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("no values")
    mean = float(values.mean())
    if values.numel() == 1:
        return mean, 0.0
    return mean, float(values.std(unbiased=True)) / math.sqrt(values.numel())
