"""Sample-quality check for digit generators: classifier confidence and class balance, and an image grid.

A sample "looks like a digit" when the classifier trained on real digits (digits/classifier.py) is confident
about it. :func:`quality_report` gives the mean max-softmax confidence, the fraction of samples with
confidence above 0.9, the predicted-class histogram and its normalised entropy (1 = perfectly balanced
classes); comparing generated samples with real digits shows how far the generator is from the data.

Run ``python -m diffusion_blend.testbeds.digits.quality --num 512 --grid samples.png`` for the committed base model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffusion_blend.files import atomic_path
from diffusion_blend.sampling import sample
from diffusion_blend.testbeds.digits.data import (
    NUM_CLASSES,
    digit_images,
    to_image_space,
)
from diffusion_blend.testbeds.digits.model import digits_forward, digits_scheduler


def sample_digits(
    model: nn.Module, num: int, *, seed: int, num_inference_steps: int = 50, eta: float = 1.0,
    progress: bool = False,
) -> torch.Tensor:
    """``num`` samples from ``model`` with DDIM (``eta=1`` as in the paper), returned in image space [0, 1]."""
    model.eval()

    def denoiser(x_t: torch.Tensor, t: Any) -> torch.Tensor:
        return digits_forward(model, x_t, t)

    out = sample(denoiser, digits_scheduler("ddim"), generator=seed, shape=(num, 1, 8, 8),
                 num_inference_steps=num_inference_steps, eta=eta, progress=progress)
    return to_image_space(out.samples)


@torch.no_grad()
def quality_report(images: torch.Tensor, classifier: nn.Module) -> dict[str, Any]:
    """Classifier statistics of images ``(B, 1, 8, 8)`` in [0, 1]."""
    probabilities = classifier.eval()(images).softmax(1)
    confidence, predicted = probabilities.max(1)
    histogram = torch.bincount(predicted, minlength=NUM_CLASSES)
    frequencies = histogram.float() / histogram.sum()
    entropy = -(frequencies[frequencies > 0] * frequencies[frequencies > 0].log()).sum() / math.log(NUM_CLASSES)
    return {
        "num": int(images.shape[0]),
        "mean_max_confidence": round(float(confidence.mean()), 4),
        "fraction_confident_0.9": round(float((confidence > 0.9).float().mean()), 4),
        "class_histogram": histogram.tolist(),
        "class_entropy": round(float(entropy), 4),
        "mean_ink": round(float(images.mean()), 4),
    }


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 16, title: str | None = None) -> Path:
    """Save images ``(B, 1, H, W)`` in [0, 1] as a PNG grid (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = images.shape[0]
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.6, rows * 0.6 + (0.4 if title else 0)),
                             squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < count:
            ax.imshow(images[index, 0].detach().cpu().numpy(), cmap="gray_r", vmin=0, vmax=1,
                      interpolation="nearest")
    if title:
        fig.suptitle(title)
    path = Path(path)
    try:
        with atomic_path(path, suffix=".png") as temporary:
            fig.savefig(temporary, dpi=100, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from diffusion_blend.testbeds.digits.classifier import load_classifier
    from diffusion_blend.testbeds.digits.model import load_digits_model
    from diffusion_blend.testbeds.digits.train import load_default_digits_model

    parser = argparse.ArgumentParser(description="classifier-based quality of digit samples vs real digits")
    parser.add_argument("--model", help="a saved digits model directory (default: the committed base model)")
    parser.add_argument("--num", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (eta = 1)")
    parser.add_argument("--grid", help="write a PNG grid of the first 128 samples here")
    args = parser.parse_args(argv)
    model = load_digits_model(args.model) if args.model else load_default_digits_model()
    classifier = load_classifier()
    samples = sample_digits(model, args.num, seed=args.seed, num_inference_steps=args.steps, progress=True)
    real = digit_images()[0]
    report = {"generated": quality_report(samples, classifier), "real": quality_report(real, classifier)}
    print(json.dumps(report, indent=2))
    if args.grid:
        save_grid(samples[:128], args.grid, title=f"{args.steps}-step DDIM (eta=1), seed {args.seed}")
        print(f"grid saved to {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
