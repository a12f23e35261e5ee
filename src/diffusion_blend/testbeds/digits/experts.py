"""The demo's basis experts: one LoRA adapter per reward, fine-tuned once and cached (paper section 4).

``<out>/adapters/<reward>.safetensors`` (written by :func:`diffusion_blend.adapters.save_adapter`) carries in
its own metadata the base model's fingerprint and the full training configuration: that pair is the cache
key. :func:`ensure_demo_adapters` reuses a file whose key matches and (re)trains only the rewards whose file is
missing, was trained on another base or with another configuration, or cannot be read (corrupt or truncated:
the demo says so and retrains; docs/demo.md). Several missing adapters train in parallel worker processes,
one torch thread each (``DemoConfig.workers``). A killed training run resumes from its checkpoint in
``<out>/adapters/.train-<reward>/``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from diffusion_blend.adapters import base_fingerprint, read_adapter
from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.files import write_text_atomic
from diffusion_blend.testbeds.digits.config import DemoConfig

ADAPTER_DIR = "adapters"


def adapter_path(out_dir: str | os.PathLike, reward: str) -> Path:
    return Path(out_dir) / ADAPTER_DIR / f"{reward}.safetensors"


def _json_normal(value: object) -> object:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def cache_status(path: Path, fingerprint: str, config: DemoConfig, reward: str) -> str | None:
    """``None`` if the cached adapter at ``path`` is valid for this base and configuration, else why not."""
    if not path.exists():
        return "missing"
    try:
        _, metadata = read_adapter(path)
    except DiffusionBlendError as err:
        return f"unreadable ({err})"
    if metadata.base_fingerprint != fingerprint:
        return "trained on another base model"
    if _json_normal(metadata.training_config) != _json_normal(config.training(reward).to_dict()):
        return "trained with another configuration"
    return None


def train_expert(reward: str, config: DemoConfig, out_dir: str | os.PathLike, progress: bool = True) -> str:
    """Fine-tune the expert for ``reward`` (``training.dpok.finetune``) and move it to its cache path."""
    from diffusion_blend.testbeds.digits.target import digits_finetune_target
    from diffusion_blend.training.dpok import finetune

    torch.set_num_threads(config.threads)
    work = Path(out_dir) / ADAPTER_DIR / f".train-{reward}"
    training = config.training(reward)
    stamp = work / "demo-config.json"
    if work.exists() and _stamp(stamp) != _json_normal(training.to_dict()):
        shutil.rmtree(work)  # a checkpoint of another configuration cannot be resumed: start afresh
    work.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stamp, json.dumps(_json_normal(training.to_dict()), sort_keys=True))
    target = digits_finetune_target([reward], progress=progress)
    target.name = f"digits:{reward}"
    target.target_modules = list(config.lora_targets)
    result = finetune(target, training, out_dir=work, progress=progress)
    final = adapter_path(out_dir, reward)
    os.replace(work / "log.json", final.with_suffix(".log.json"))  # the log first: an adapter in place is whole
    os.replace(result.adapter_path, final)
    shutil.rmtree(work, ignore_errors=True)
    return str(final)


def _stamp(path: Path) -> object:
    """The training configuration a work folder was started with (``None``: none, or unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _train_in_workers(rewards: Sequence[str], config: DemoConfig, out: Path, progress: bool) -> None:
    """Train several experts at once, one spawned process (one torch thread) each, ``config.workers`` at a time.

    Each worker's progress bar gets its own terminal line: tqdm reads ``TQDM_POSITION`` from the environment
    the process starts with.
    """
    saved = os.environ.get("TQDM_POSITION")
    for start in range(0, len(rewards), config.workers):
        pools, futures = [], []
        try:
            for position, reward in enumerate(rewards[start: start + config.workers]):
                os.environ["TQDM_POSITION"] = str(position)
                pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
                pools.append(pool)
                futures.append(pool.submit(train_expert, reward, config, str(out), progress))
        finally:
            if saved is None:
                os.environ.pop("TQDM_POSITION", None)
            else:
                os.environ["TQDM_POSITION"] = saved
        try:
            for future in futures:
                future.result()
        finally:
            for pool in pools:
                pool.shutdown()


def ensure_demo_adapters(
    out_dir: str | os.PathLike,
    config: DemoConfig | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Paths of the demo's adapters ``{reward: <out>/adapters/<reward>.safetensors}``, training what is missing.

    The cache key is the base model's fingerprint plus the training configuration (both recorded in each
    adapter file): a change of either retrains. An unreadable cached file is retrained (with a message).
    """
    from diffusion_blend.testbeds.digits.train import load_default_digits_model

    config = config or DemoConfig()
    log = log or (lambda message: print(message, file=sys.stderr))
    out = Path(out_dir)
    (out / ADAPTER_DIR).mkdir(parents=True, exist_ok=True)
    fingerprint = base_fingerprint(load_default_digits_model(progress=progress))
    todo: list[str] = []
    for reward in config.rewards:
        reason = cache_status(adapter_path(out, reward), fingerprint, config, reward)
        if reason is None:
            log(f"adapter {reward}: cached ({adapter_path(out, reward)})")
        else:
            log(f"adapter {reward}: {reason}; fine-tuning (alpha={config.alpha:g})")
            todo.append(reward)
    if len(todo) > 1 and config.workers > 1:
        _train_in_workers(todo, config, out, progress)
    else:
        for reward in todo:
            train_expert(reward, config, out, progress)
    for reward in todo:
        reason = cache_status(adapter_path(out, reward), fingerprint, config, reward)
        if reason is not None:
            raise DiffusionBlendError(f"adapter {reward} was trained but its file is not usable: {reason}")
    return {reward: adapter_path(out, reward) for reward in config.rewards}
