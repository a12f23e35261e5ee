"""The real digits data: scikit-learn's ``load_digits`` (1,797 handwritten 8x8 digits, 16 gray levels).

Pixel values are integers 0..16. Two spaces are used throughout:

- *image space* ``[0, 1]``: ``pixels / 16`` (what rewards and the classifier read, rewards/base.py contract);
- *model space* ``[-1, 1]``: ``2 * image - 1`` (what the diffusion model is trained on and samples in).

Generated samples are mapped back with :func:`to_image_space`, which clamps to ``[0, 1]``.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
MAX_PIXEL = 16.0


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as images ``(N, 1, 8, 8)`` in ``[0, 1]`` and their labels ``(N,)``."""
    images, labels = _load()
    return torch.from_numpy(images / MAX_PIXEL).unsqueeze(1), torch.from_numpy(labels)


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1] -> [-1, 1]``."""
    return images * 2.0 - 1.0


def to_image_space(samples: torch.Tensor) -> torch.Tensor:
    """``[-1, 1] -> [0, 1]`` with clamping (samples may overshoot slightly)."""
    return ((samples + 1.0) / 2.0).clamp(0.0, 1.0)


def training_data() -> torch.Tensor:
    """The diffusion model's training set: all digits in model space ``[-1, 1]``, shape ``(1797, 1, 8, 8)``."""
    return to_model_space(digit_images()[0])


def data_hash(data: torch.Tensor) -> str:
    """SHA-256 (first 16 hex digits) of a tensor's float32 bytes: identifies the exact training data."""
    array = np.ascontiguousarray(data.detach().to(torch.float32).cpu().numpy())
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


def split_indices(seed: int, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded stratified train/test split of the 1,797 digits (scikit-learn ``train_test_split``)."""
    from sklearn.model_selection import train_test_split

    _, labels = _load()
    train, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
