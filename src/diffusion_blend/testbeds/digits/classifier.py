"""A small CNN digit classifier trained on the real digits (scikit-learn ``load_digits``).

It reads images in image space ``[0, 1]`` of shape ``(B, 1, 8, 8)`` (the reward contract) and returns
10 logits. It serves two jobs: the ``digit_prob`` reward (testbeds/digits/rewards.py) and the sample-quality check
(digits/quality.py: a good generator's samples get confident predictions, like real digits do).

Training: a seeded stratified 80/20 split (digits/data.py ``split_indices``), AdamW, light augmentation by
random one-pixel shifts (the digits are centred but not exactly), the held-out accuracy is recorded in the
saved ``config.json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffusion_blend.errors import DiffusionBlendError
from diffusion_blend.sampling import as_generator
from diffusion_blend.testbeds.digits.data import (
    NUM_CLASSES,
    data_hash,
    digit_images,
    split_indices,
)
from diffusion_blend.testbeds.digits.model import load_state, read_config, save_module

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "classifier"
DEFAULT_SEED = 0
DEFAULT_EPOCHS = 30


class DigitClassifier(nn.Module):
    """conv(1->32) - conv(32->64) - maxpool - fc(1024->128) - fc(128->10); input ``[0, 1]``, 8x8."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(128, NUM_CLASSES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
            raise DiffusionBlendError(f"the digit classifier expects (B, 1, 8, 8) images, got {tuple(images.shape)}")
        return self.head(self.features(images))


def _shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts by -1, 0 or +1 pixel in each direction (zero fill), one per image."""
    padded = nn.functional.pad(images, (1, 1, 1, 1))
    offsets = torch.randint(0, 3, (images.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + 8, dx:dx + 8] for i, (dy, dx) in enumerate(offsets.tolist())])


@torch.no_grad()
def accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    classifier.eval()
    return float((classifier(images).argmax(1) == labels).float().mean())


def train_classifier(
    *, seed: int = DEFAULT_SEED, epochs: int = DEFAULT_EPOCHS, batch_size: int = 64, lr: float = 2e-3,
    progress: bool = True,
) -> tuple[DigitClassifier, dict[str, Any]]:
    """Train on the seeded training split; returns the classifier and its record (held-out accuracy)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise DiffusionBlendError(f"epochs must be a positive integer, got {epochs!r}")
    generator = as_generator(seed)
    torch.manual_seed(seed)
    classifier = DigitClassifier()
    images, labels = digit_images()
    train_idx, test_idx = split_indices(seed)
    x_train, y_train = images[train_idx], labels[train_idx]
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for _ in tqdm(range(epochs), desc="classifier epochs", disable=not progress):
        classifier.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(classifier(_shift(x_train[batch], generator)), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    classifier.eval()
    record = {
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "train_size": len(train_idx), "test_size": len(test_idx), "test_fraction": 0.2,
        "train_accuracy": accuracy(classifier, x_train, y_train),
        "test_accuracy": accuracy(classifier, images[test_idx], labels[test_idx]),
        "data_hash": data_hash(images),
        "command": f"python -m diffusion_blend.testbeds.digits.classifier --seed {seed} --epochs {epochs}",
        "torch": torch.__version__,
    }
    return classifier, record


def save_classifier(classifier: DigitClassifier, directory: str | os.PathLike, record: dict[str, Any]) -> Path:
    return save_module(classifier, directory, {"kind": "digit_classifier", "input": "(B, 1, 8, 8) in [0, 1]",
                                               "training": record})


def load_classifier(directory: str | os.PathLike | None = None) -> DigitClassifier:
    """Load a saved classifier (default: the committed one under assets/digits/classifier), eval mode."""
    directory = ASSET_DIR if directory is None else Path(directory)
    config = read_config(directory)
    if config.get("kind") != "digit_classifier":
        raise DiffusionBlendError(f"{directory} does not hold a digit classifier (kind={config.get('kind')!r})")
    classifier = load_state(DigitClassifier(), directory)
    classifier.record = config.get("training", {})
    for param in classifier.parameters():
        param.requires_grad_(False)
    return classifier


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="train the digit classifier and save it")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--out", default=str(ASSET_DIR))
    args = parser.parse_args(argv)
    classifier, record = train_classifier(seed=args.seed, epochs=args.epochs)
    save_classifier(classifier, args.out, record)
    print(f"held-out accuracy {record['test_accuracy']:.4f} ({record['test_size']} digits); saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
