"""The reward models' official image transforms, restated as differentiable torch ops (no torchvision, no PIL).

Each learned reward of the zoo is scored by its authors' code with one of three transforms (sources, versions and
measured differences: ``docs/rewards.md``):

``"torchvision"``  OpenAI CLIP's and ImageReward's ``_transform``: torchvision ``Resize(224, BICUBIC)`` and
                   ``CenterCrop(224)`` on a PIL image, then ``ToTensor`` and ``Normalize``. The resize is PIL's
                   bicubic on 8-bit pixels; the long side is ``int(224 * long / short)`` (truncated); the crop offset
                   is ``int(round((h - 224) / 2))`` (Python rounding: half to even).
``"transformers"`` transformers' ``CLIPImageProcessor`` (PIL backend; the slow processor of transformers 4.x), used by
                   PickScore, the DDPO aesthetic scorer and torchmetrics' CLIPScore: the same PIL bicubic resize and
                   truncated long side, a crop offset ``(h - 224) // 2`` (floor), rescale by 1/255, normalise.
``"hpsv2"``        hpsv2's open_clip fork with ``light_augmentation=True``: ``ToTensor`` first, then ``ResizeMaxSize``:
                   the longer side becomes 224, the other ``round(dim * 224 / long)``, torchvision's *tensor* bicubic
                   resize (``interpolate(..., antialias=True)`` on floats, no clamping), zero padding (black, before
                   normalisation) to 224 x 224 with ``pad // 2`` before and the rest after; then normalise.

How the torch versions relate to them (the inputs here are float images in ``[0, 1]``, not 8-bit files):

- The official scorers read 8-bit images (a PIL image, or ``ToTensor`` of one), so the input is rounded to 8 bits
  first (:func:`round_to_8bit`).
- PIL resamples 8-bit images in two passes (horizontal, then vertical), clipping and rounding to 8 bits after each;
  its bicubic filter (``a = -0.5``, support widened by the downscale factor) is the one torch uses with
  ``antialias=True``. The ``"pil"`` resampling below runs the same two passes, clamping to ``[0, 1]`` and rounding to
  8 bits after each. Measured against PIL on 8-bit inputs (10 sizes, 160 to 640 x 1536): mean absolute difference
  at most 6.1e-7 in ``[0, 1]`` units, a few pixels one 8-bit step apart (most likely PIL's fixed-point filter
  weights; not traced); without the rounding (float passes) it was 0.9-1.0e-3, 3.2-3.8e-3 after normalisation.
- The one departure, needed for gradients: every 8-bit rounding is straight-through (the forward value is rounded,
  the gradient is that of the identity), so pathwise training sees the float path's gradient.
- The ``"tensor"`` resampling is torchvision's tensor resize itself (one ``interpolate`` call on floats).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffusion_blend.errors import RewardError

#: OpenAI CLIP normalisation constants (also used by open_clip ViT-H-14, HPSv2, PickScore and ImageReward).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

STYLES = ("torchvision", "transformers", "hpsv2")


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Repeat a 1-channel batch to 3 channels; pass 3-channel batches through; reject anything else."""
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    raise RewardError(f"CLIP-style rewards need 1 or 3 image channels, got {channels}")


# ---------------------------------------------------------------- output sizes (pure integer rules)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` with the shorter side ``size`` and the longer ``int(size * long / short)`` (truncated).

    torchvision's ``_compute_resized_output_size`` and transformers' ``get_resize_output_image_size(...,
    default_to_square=False)`` both use this rule; a square image becomes ``size x size``.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def longest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` with the longer side ``size``: ``round(dim * size / long)`` per side (hpsv2's ``ResizeMaxSize``)."""
    scale = size / float(max(height, width))
    return round(height * scale), round(width * scale)


def crop_offsets(height: int, width: int, crop: int, rule: str) -> tuple[int, int]:
    """Top/left of a centred ``crop x crop`` window: ``"round"`` (torchvision) or ``"floor"`` (transformers)."""
    if rule == "round":  # torchvision: int(round((h - crop) / 2.0)); Python's round() already returns an int
        return round((height - crop) / 2.0), round((width - crop) / 2.0)
    if rule == "floor":
        return (height - crop) // 2, (width - crop) // 2
    raise RewardError(f"unknown crop-offset rule {rule!r}; choose 'round' or 'floor'")


# ---------------------------------------------------------------- differentiable steps


def round_to_8bit(images: torch.Tensor) -> torch.Tensor:
    """``round(255 clip(x, 0, 1)) / 255`` forward (an 8-bit image, as diffusers' ``numpy_to_pil`` and PIL make it),
    the identity's gradient backward (straight-through)."""
    return images + ((images.clamp(0.0, 1.0) * 255.0).round() / 255.0 - images).detach()


def resize(
    images: torch.Tensor,
    size: tuple[int, int],
    *,
    resampling: str = "pil",
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize ``(B, C, H, W)`` floats to ``size = (h, w)``; a no-op when the size is unchanged.

    ``resampling="pil"``: PIL's two passes (width, then height), each clamped to ``[0, 1]`` and rounded to 8 bits as
    PIL stores its pixels (straight-through: :func:`round_to_8bit`; antialiased filter, as PIL always is).
    ``resampling="tensor"``: one ``interpolate`` call, no clamping
    (torchvision's resize of a float tensor; ``antialias`` as passed).
    """
    height, width = images.shape[-2:]
    out_h, out_w = int(size[0]), int(size[1])
    if (out_h, out_w) == (height, width):
        return images
    if resampling == "tensor":
        align = False if mode in ("bilinear", "bicubic") else None
        return F.interpolate(images, size=(out_h, out_w), mode=mode, align_corners=align, antialias=antialias)
    if resampling != "pil":
        raise RewardError(f"unknown resampling {resampling!r}; choose 'pil' or 'tensor'")
    if out_w != width:
        images = F.interpolate(images, size=(height, out_w), mode=mode, align_corners=False, antialias=True)
        images = round_to_8bit(images.clamp(0.0, 1.0))
    if out_h != height:
        images = F.interpolate(images, size=(out_h, out_w), mode=mode, align_corners=False, antialias=True)
        images = round_to_8bit(images.clamp(0.0, 1.0))
    return images


def center_crop(images: torch.Tensor, size: int, rule: str = "round") -> torch.Tensor:
    """The central ``size x size`` window; offsets by ``rule`` (:func:`crop_offsets`)."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise RewardError(f"cannot center-crop {size}x{size} from images of size {height}x{width}")
    top, left = crop_offsets(height, width, size, rule)
    return images[..., top : top + size, left : left + size]


def pad_to_square(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Pad to ``size x size`` with ``fill``: ``pad // 2`` before (top/left), the rest after (hpsv2's
    ``ResizeMaxSize``)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = size - height, size - width
    if pad_h < 0 or pad_w < 0:
        raise RewardError(f"cannot pad images of size {height}x{width} to {size}x{size}")
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images - mean) / std`` per channel."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


# ---------------------------------------------------------------- the per-reward transforms


@dataclass(frozen=True)
class ImageTransform:
    """One official transform (``style`` in :data:`STYLES`) with its sizes and normalisation constants.

    ``resize`` is the shortest edge for ``"torchvision"``/``"transformers"`` and the longest edge for ``"hpsv2"``;
    ``crop`` is the crop size (the padded canvas for ``"hpsv2"``). ``antialias`` only matters for ``"hpsv2"``
    (torchvision >= 0.17 antialiases tensor resizes, older versions did not). Call it on float images in ``[0, 1]``,
    ``(B, 1|3, H, W)``; it returns ``pixel_values`` ``(B, 3, crop, crop)`` in float32, differentiable.
    """

    style: str = "transformers"
    resize: int = 224
    crop: int = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    mode: str = "bicubic"
    antialias: bool = True

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise RewardError(f"unknown preprocessing style {self.style!r}; choose one of {list(STYLES)}")
        if self.mode not in ("bicubic", "bilinear"):
            raise RewardError(f"unsupported resampling filter {self.mode!r}; only bicubic and bilinear are restated")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The resized ``(h, w)`` before the crop (or the pad)."""
        if self.style == "hpsv2":
            return longest_side_size(height, width, self.resize)
        return shortest_side_size(height, width, self.resize)

    def unnormalized(self, images: torch.Tensor) -> torch.Tensor:
        """Resized and cropped (or padded) images in ``[0, 1]`` pixel units, before ``(x - mean) / std``."""
        images = round_to_8bit(to_rgb(images).float())  # the 8-bit image the official code reads
        size = self.output_size(*images.shape[-2:])
        if self.style == "hpsv2":
            images = resize(images, size, resampling="tensor", mode=self.mode, antialias=self.antialias)
            return pad_to_square(images, self.crop, fill=0.0)
        images = resize(images, size, resampling="pil", mode=self.mode)
        return center_crop(images, self.crop, "round" if self.style == "torchvision" else "floor")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(self.unnormalized(images), self.mean, self.std)


def clip_preprocess(
    images: torch.Tensor,
    size: int = 224,
    *,
    crop_size: int | None = None,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    style: str = "transformers",
) -> torch.Tensor:
    """Images in ``[0, 1]``, ``(B, 1|3, H, W)`` -> ``pixel_values`` by :class:`ImageTransform` (``style``)."""
    crop = size if crop_size is None else crop_size
    return ImageTransform(style, size, crop, tuple(mean), tuple(std))(images)
