"""MORL oracle (Roijers et al. 2013; paper section 5.4): one adapter fine-tuned directly on ``r_w`` per preference.

The upper bound the blend is compared with: for each preference ``(w, lambda)`` fine-tune the base model on the
scalarised reward ``r_w = sum_i w_i r_i``. Fine-tuning at KL weight ``alpha'`` targets ``p_pre exp(r_w / alpha')``,
so the preference's target ``p_pre exp(lambda r_w / alpha)`` needs ``alpha' = alpha / lambda``; ``lambda = 0`` is
the base model itself (no training). Training is expensive, so adapters are cached on disk per
``(w, lambda, alpha)``: :class:`MorlOracle` keeps ``index.json`` (written atomically) in its cache folder and calls
the user's ``train_adapter(weights, alpha') -> path`` only for preferences it has not trained yet.
:func:`dpok_adapter_trainer` builds that callable from the DPOK trainer (:mod:`diffusion_blend.training.dpok`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.files import write_json_atomic
from diffusion_blend.preference import Preference

TrainAdapter = Callable[[dict[str, float], float], "str | os.PathLike"]
INDEX = "index.json"


def preference_key(preference: Preference, alpha: float) -> str:
    """A stable file-name-safe key of ``(w, lambda, alpha)`` (weights sorted by name)."""
    payload = json.dumps(
        {"weights": sorted(preference.weights.items()), "kl_scale": preference.kl_scale, "alpha": float(alpha)},
        sort_keys=True,
    )
    readable = "_".join(f"{name}{weight:g}" for name, weight in sorted(preference.weights.items()))
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in readable)[:60]
    return f"{safe}_l{preference.kl_scale:g}_a{float(alpha):g}_{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


class MorlOracle:
    """Adapters fine-tuned on ``r_w``, one per ``(w, lambda, alpha)``, trained on first use and cached on disk."""

    def __init__(self, cache_dir: str | os.PathLike, train_adapter: TrainAdapter, alpha: float):
        if not (float(alpha) > 0):
            raise DiffusionBlendError(f"alpha (the experts' KL weight) must be > 0, got {alpha}")
        self.cache_dir = Path(cache_dir)
        self.train_adapter = train_adapter
        self.alpha = float(alpha)
        self.trained = 0  # adapters trained by this object (cache misses)

    def _index(self) -> dict[str, Any]:
        path = self.cache_dir / INDEX
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DiffusionBlendError(f"the MORL cache index {path} is corrupt: {err}") from err

    def effective_alpha(self, preference: Preference) -> float | None:
        """``alpha / lambda``: the KL weight to fine-tune ``r_w`` with (``None`` for ``lambda = 0``: the base)."""
        return None if preference.kl_scale == 0 else self.alpha / preference.kl_scale

    def adapter_path(self, preference: Preference) -> Path | None:
        """The cached (or newly trained) adapter for ``preference``; ``None`` means the base model (``lambda = 0``)."""
        alpha = self.effective_alpha(preference)
        if alpha is None:
            return None
        key = preference_key(preference, self.alpha)
        entry = self._index().get(key)
        if entry is not None and Path(entry["path"]).exists():
            return Path(entry["path"])
        path = Path(self.train_adapter(dict(preference.weights), alpha))
        if not path.exists():
            raise DiffusionBlendError(f"train_adapter returned {path}, which does not exist")
        self.trained += 1
        index = self._index()  # re-read: another process may have added entries meanwhile
        index[key] = {
            "path": str(path.resolve()),
            "weights": dict(preference.weights),
            "kl_scale": preference.kl_scale,
            "alpha": self.alpha,
            "effective_alpha": alpha,
        }
        write_json_atomic(self.cache_dir / INDEX, index, indent=2, sort_keys=True)
        return path


def morl_denoiser(
    oracle: MorlOracle,
    preference: Preference,
    model: Any,
    forward: Callable[..., Any],
    architecture: Mapping[str, Any] | None = None,
) -> Callable[..., Any]:
    """The MORL oracle's denoiser for ``preference`` on ``model`` (adapter loaded as ``morl-<key>``; the base if
    lambda = 0)."""
    from diffusion_blend.adapters import load_adapter
    from diffusion_blend.lora import active_adapter, adapter_names

    path = oracle.adapter_path(preference)
    name = None
    if path is not None:
        name = "morl-" + preference_key(preference, oracle.alpha).replace(".", "_")  # torch module names: no dots
        if name not in adapter_names(model):
            load_adapter(model, path, name, architecture=architecture)

    def denoise(x_t: Any, t: Any, **cond: Any) -> Any:
        with active_adapter(model, name):
            return forward(model, x_t, t, **cond)

    return denoise


def dpok_adapter_trainer(
    make_target: Callable[[], Any], config: Mapping[str, Any], out_root: str | os.PathLike, progress: bool = True
) -> TrainAdapter:
    """A ``train_adapter(weights, alpha)`` running DPOK (:func:`diffusion_blend.training.dpok.finetune`).

    ``make_target()`` returns a fresh :class:`~diffusion_blend.training.config.FinetuneTarget` (a new base model per
    run); ``config`` holds the other :class:`~diffusion_blend.training.config.DPOKConfig` fields. Each run writes to
    ``out_root/<weights>_a<alpha>/`` and returns the path of its ``adapter.safetensors``.
    """
    from diffusion_blend.training.config import DPOKConfig
    from diffusion_blend.training.dpok import finetune

    def train(weights: dict[str, float], alpha: float) -> Path:
        run_config = DPOKConfig(**{**dict(config), "reward_weights": dict(weights), "alpha": float(alpha)})
        key = preference_key(Preference(weights), alpha)
        result = finetune(make_target(), run_config, out_dir=Path(out_root) / key, progress=progress)
        if result.adapter_path is None:
            raise DiffusionBlendError("the DPOK run wrote no adapter file")
        return Path(result.adapter_path)

    return train
