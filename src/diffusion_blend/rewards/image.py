"""Weight-free image rewards: JPEG (in)compressibility (DDPO convention; paper.md sections 4.9 and 8.13).

The paper uses JPEG compressibility in its conflicting-reward and 3-4 reward experiments but ships no code; we
follow DDPO (Black et al., 2023, ``ddpo_pytorch/rewards.py``): encode each image as an 8-bit JPEG with PIL at a
fixed quality (95 by default) and measure the file size in kilobytes (1 kB = 1000 bytes).

- ``jpeg_compressibility``   = ``-size_kB``  (higher = smaller file = simpler image), range ``(-inf, 0)``;
- ``jpeg_incompressibility`` = ``+size_kB``  (higher = larger file = more detail), range ``(0, inf)``.

Both are non-differentiable (JPEG encoding is a discrete black box).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from diffusion_blend.errors import RewardError
from diffusion_blend.rewards.base import Reward
from diffusion_blend.rewards.registry import register_reward

DEFAULT_JPEG_QUALITY = 95


def to_pil(image: torch.Tensor) -> Image.Image:
    """One ``(C, H, W)`` image in ``[0, 1]`` -> 8-bit PIL image (``L`` for 1 channel, ``RGB`` for 3)."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if array.shape[0] == 1:
        return Image.fromarray(array[0], mode="L")
    if array.shape[0] == 3:
        return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")
    raise RewardError(f"JPEG rewards need 1 or 3 channels, got {array.shape[0]}")


def jpeg_size_kb(image: torch.Tensor, quality: int = DEFAULT_JPEG_QUALITY) -> float:
    """Size in kB (1000 bytes) of ``image`` saved as JPEG at ``quality`` by PIL."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegSizeReward(Reward):
    """``sign * JPEG size in kB`` per image; ``sign = -1`` is compressibility, ``+1`` incompressibility."""

    differentiable = False
    needs_prompts = False

    def __init__(self, sign: int, quality: int = DEFAULT_JPEG_QUALITY):
        if sign not in (-1, 1):
            raise RewardError(f"JPEG reward sign must be -1 or +1, got {sign}")
        if not 1 <= int(quality) <= 100:
            raise RewardError(f"JPEG quality must be an integer in [1, 100], got {quality}")
        self.sign, self.quality = sign, int(quality)
        self.name = "jpeg_compressibility" if sign < 0 else "jpeg_incompressibility"
        self.value_range = (None, 0.0) if sign < 0 else (0.0, None)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        sizes = [jpeg_size_kb(image, self.quality) for image in images]
        return self.sign * torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility", "minus JPEG size in kB at quality 95 (DDPO convention)",
                 returns=JpegSizeReward)
def jpeg_compressibility(quality: int = DEFAULT_JPEG_QUALITY) -> Reward:
    return JpegSizeReward(-1, quality)


@register_reward("jpeg_incompressibility", "JPEG size in kB at quality 95 (DDPO convention)", returns=JpegSizeReward)
def jpeg_incompressibility(quality: int = DEFAULT_JPEG_QUALITY) -> Reward:
    return JpegSizeReward(+1, quality)
