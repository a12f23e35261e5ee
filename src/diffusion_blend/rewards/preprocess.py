"""Differentiable CLIP-style image preprocessing in plain torch (no torchvision, no PIL round trip).

Reward models of the field (CLIP, LAION aesthetic, PickScore, HPSv2, ImageReward; paper.md section 4.9) all take
``resize shortest side -> center crop -> normalise with per-channel mean/std``. Their reference pipelines run
that on PIL images, which cuts the gradient; this module does the same three steps on a float tensor so that a
reward stays differentiable with respect to the images (needed by reward-gradient guidance, paper.md section 5.3).

Differences from the PIL pipeline (documented, small): bicubic resampling is torch's ``interpolate`` with
``antialias=True`` on floats (PIL works on uint8 and rounds), and values are not clamped after resampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from diffusion_blend.errors import RewardError

#: OpenAI CLIP normalisation constants (also used by open_clip ViT-H-14, HPSv2, PickScore and ImageReward).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Repeat a 1-channel batch to 3 channels; pass 3-channel batches through; reject anything else."""
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    raise RewardError(f"CLIP-style rewards need 1 or 3 image channels, got {channels}")


def resize_shortest_side(images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize ``(B, C, H, W)`` so that the shorter side equals ``size``, keeping the aspect ratio."""
    height, width = images.shape[-2:]
    if min(height, width) == size:
        return images
    scale = size / min(height, width)
    new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    return F.interpolate(images, size=new_size, mode=mode, align_corners=False, antialias=True)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Crop the central ``size x size`` window (same rounding as torchvision's ``CenterCrop``)."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise RewardError(f"cannot center-crop {size}x{size} from images of size {height}x{width}")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    *,
    crop_size: int | None = None,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Images in ``[0, 1]``, shape ``(B, 1|3, H, W)`` -> CLIP ``pixel_values`` ``(B, 3, crop, crop)``.

    Resize the shortest side to ``size``, center-crop ``crop_size`` (default ``size``), normalise. Every step is a
    differentiable torch op, so gradients flow back to ``images``.
    """
    crop_size = size if crop_size is None else crop_size
    images = to_rgb(images)
    images = resize_shortest_side(images, size, mode)
    images = center_crop(images, crop_size)
    return normalize(images, mean, std)
