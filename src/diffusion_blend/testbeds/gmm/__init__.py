"""The Gaussian-mixture testbed: closed-form mixtures, exact experts and tilted targets (:mod:`.closed_form`), a
small network (:mod:`.model`), its study (:mod:`.study`), the trainer's verification (:mod:`.verification`) and its
sweep setting (:mod:`.setting`).

The closed-form API is re-exported here, imported on first use (so reading :mod:`.spec` stays free of torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_CLOSED_FORM = (
    "GaussianMixture",
    "MixtureDenoiser",
    "MixtureVelocity",
    "QuadraticForm",
    "combined_reward",
    "expected_rewards",
    "ideal_expert",
    "ideal_family",
    "tilted_target",
)

__all__ = list(_CLOSED_FORM)


def __getattr__(name: str) -> Any:
    if name in _CLOSED_FORM:
        return getattr(importlib.import_module(f"{__name__}.closed_form"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
