"""Each learned reward's preprocessing against an independent statement of its official scorer's transform.

References (none of them calls this project's preprocessing):

- ImageReward (``ImageReward._transform``: torchvision ``Resize(224, BICUBIC)`` + ``CenterCrop(224)`` on a PIL image,
  ``ToTensor``, ``Normalize``): torchvision's documented rules restated with PIL (torchvision is not a dependency):
  long side ``int(224 * long / short)``, no resize when the size is unchanged, ``PIL.Image.resize(BICUBIC)`` on the
  8-bit image, crop offset ``int(round((h - 224) / 2))``.
- PickScore, the aesthetic predictor, CLIPScore (transformers' ``CLIPImageProcessor``): transformers' own
  processor, PIL backend (``CLIPImageProcessorPil``; the slow processor of transformers 4.x), built from the
  ``preprocessor_config.json`` the rewards load.
- HPSv2 (hpsv2's open_clip fork, ``light_augmentation=True``: ``ToTensor``, ``ResizeMaxSize(224)``, ``Normalize``):
  restated with PIL float (``"F"``) images, whose antialiased bicubic filter is the one torchvision >= 0.17 applies to
  tensors; ``antialias=False`` (torchvision < 0.17) with Keys' cubic convolution (``a = -0.75``) in numpy.

Checks, on square, portrait, landscape and odd sizes: pixel differences (in ``[0, 1]`` units, i.e. the official
output converted to float before normalisation) at most one 8-bit step and under 1e-5 on average (the passes round to
8 bits as PIL does; with float passes it was 0.9-1.0e-3), and score differences
under 0.5 % of the spread of the official scores over a batch of different images (one prompt), with the same tiny
random weights. The tiny vision models get smooth (low-pass) random patch filters, see :func:`low_pass_`.

The pre-issue-26 transform (rounded long side, rounded crop offsets everywhere, one float pass, HPSv2 cropped instead
of padded) fails both checks, measured with this module's code: pixels up to 165-270/255 apart, scores up to
1.1-2.4 % (CLIP family, ImageReward) and 155 % (HPSv2) of the spread (numbers in docs/rewards.md).
"""

from __future__ import annotations

import functools
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from diffusion_blend.rewards import get_reward
from diffusion_blend.rewards.clip import AestheticHead, save_aesthetic_head
from diffusion_blend.rewards.imagereward import ImageRewardModel, ImageRewardReward
from diffusion_blend.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageTransform,
    crop_offsets,
    longest_side_size,
    shortest_side_size,
)

SIZE = 224
#: (height, width): square, portrait, landscape, odd (300 x 401: odd crop excess 75), SDXL (832 x 1216 both ways).
SIZES = [(160, 160), (224, 224), (300, 400), (416, 608), (512, 512), (512, 384), (1024, 1024), (300, 401),
         (1216, 832), (640, 1536)]
BATCH = 6  # different images, one prompt: the spread is the images'
PROMPT = "a red cat"
EIGHT_BIT_STEP = 1 / 255 + 1e-6
LEARNED = ["imagereward", "hpsv2", "pickscore", "aesthetic", "clip_score"]


# ------------------------------------------------------------------ test images


@functools.cache
def make_image(height: int, width: int, seed: int) -> np.ndarray:
    """8-bit RGB ``(H, W, 3)``: smooth colour field + a saturated rectangle (hard edges) + mild noise (read-only)."""
    g = np.random.default_rng(seed)
    low = Image.fromarray((g.random((6, 6, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    image = np.asarray(low, dtype=np.float32) + g.normal(0.0, 12.0, (height, width, 3))
    top, left = int(g.integers(0, height // 2)), int(g.integers(0, width // 2))
    image[top : top + height // 3, left : left + width // 3] = g.choice([0.0, 255.0], size=3)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    image.flags.writeable = False
    return image


def as_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """8-bit ``(H, W, 3)`` arrays -> float batch ``(B, 3, H, W)`` in ``[0, 1]`` (what the rewards take)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


# ------------------------------------------------------------------ independent references (pixel units, [0, 1])


def torchvision_reference(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """torchvision ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a PIL image + ``ToTensor``, with PIL."""
    pil = Image.fromarray(image)
    width, height = pil.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    if (new_w, new_h) != (width, height):
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # int(round(...)) in torchvision
    pil = pil.crop((left, top, left + size, top + size))
    return np.asarray(pil, dtype=np.float32).transpose(2, 0, 1) / 255.0


def clip_processor(folder: str):
    """transformers' ``CLIPImageProcessor`` (PIL backend) from the folder's ``preprocessor_config.json``."""
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls.from_pretrained(folder)


def transformers_reference(image: np.ndarray, processor) -> np.ndarray:
    """``processor(images=...)["pixel_values"]``, de-normalised to ``[0, 1]`` pixel units."""
    pixels = processor(images=[Image.fromarray(image)], return_tensors="np")["pixel_values"][0]
    mean = np.asarray(processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(processor.image_std, dtype=np.float32)[:, None, None]
    return pixels * std + mean


def keys_cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """Rows of Keys' cubic convolution weights (half-pixel centres, edge samples repeated): no antialiasing."""
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        source = (i + 0.5) * n_in / n_out - 0.5
        base = math.floor(source)
        for k in range(-1, 3):
            d = abs(base + k - source)
            weight = (a + 2) * d**3 - (a + 3) * d**2 + 1 if d <= 1 else a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
            matrix[i, min(max(base + k, 0), n_in - 1)] += weight if d < 2 else 0.0
    return matrix


def hpsv2_reference(image: np.ndarray, size: int = SIZE, antialias: bool = True) -> np.ndarray:
    """hpsv2 ``ToTensor`` + ``ResizeMaxSize(size)`` (tensor bicubic resize of the longer side, centred zero pad)."""
    x = image.astype(np.float32).transpose(2, 0, 1) / 255.0
    height, width = x.shape[1:]
    scale = size / float(max(height, width))
    if scale == 1.0:
        return x
    new_h, new_w = round(height * scale), round(width * scale)
    if antialias:
        x = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((new_w, new_h), Image.BICUBIC)) for c in x])
    else:
        rows, cols = keys_cubic_matrix(height, new_h), keys_cubic_matrix(width, new_w)
        x = (rows @ x.astype(np.float64) @ cols.T).astype(np.float32)
    pad_h, pad_w = size - new_h, size - new_w
    return np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))


# ------------------------------------------------------------------ tiny rewards at 224 px


def tiny_vocab() -> dict[str, int]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {token: i for i, token in enumerate([*letters, *(c + "</w>" for c in letters)])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def low_pass_(patch_conv: torch.nn.Conv2d, grid: int = 4) -> None:
    """Replace random patch filters by smooth ones (random ``grid x grid`` filters upsampled), keeping their norm.

    Trained vision models' first layers are mostly smooth (blob- and edge-like) and barely respond to per-pixel noise;
    white random filters respond to the 8-bit rounding noise as much as to image content (measured in
    docs/rewards.md), which would make a test of the transform a test of the random filters.
    """
    weight = patch_conv.weight
    coarse = torch.randn(weight.shape[0] * weight.shape[1], 1, grid, grid)
    smooth = torch.nn.functional.interpolate(coarse, size=weight.shape[-2:], mode="bilinear", align_corners=False)
    smooth = smooth.view_as(weight)
    with torch.no_grad():
        weight.copy_(smooth * weight.norm() / smooth.norm())


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    """Tiny random CLIP at 224 px (patch 32), tokenizer, CLIP ``preprocessor_config.json``.

    Both projections share one matrix and both final layer norms one large bias, so image and text embeddings share
    a direction and cosines are positive (CLIPScore clamps negative cosines to 0, which would hide differences).
    """
    torch.manual_seed(0)
    vocab = tiny_vocab()
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "hidden_act": "gelu"}
    config = transformers.CLIPConfig(
        text_config=dict(common, vocab_size=len(vocab), max_position_embeddings=16,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(common, image_size=SIZE, patch_size=32),
        projection_dim=16,
    )
    model = transformers.CLIPModel(config).eval()
    low_pass_(model.vision_model.embeddings.patch_embedding)
    with torch.no_grad():
        model.text_projection.weight.copy_(model.visual_projection.weight)
        bias = torch.randn(32) * 1.5
        model.vision_model.post_layernorm.bias.copy_(bias)
        model.text_model.final_layer_norm.bias.copy_(bias)
    folder = str(tmp_path_factory.mktemp("clip224"))
    model.save_pretrained(folder)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor_cls(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, resample=3,
                  image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD)).save_pretrained(folder)
    return folder


def tiny_imagereward(tmp_path) -> ImageRewardReward:
    """ImageReward's architecture (BLIP ViT, cross-attending BERT, MLP) at 224 px with tiny random weights."""
    torch.manual_seed(1)
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\ncat\nred\ndog\n##s\n")
    tokenizer = transformers.BertTokenizer(vocab_file=str(vocab_file))
    vision = transformers.BlipVisionModel(transformers.BlipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
        patch_size=32, layer_norm_eps=1e-6, initializer_range=0.2)).eval()
    low_pass_(vision.embeddings.patch_embedding)
    text = transformers.BlipTextModel(transformers.BlipTextConfig(
        vocab_size=12, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=40, encoder_hidden_size=32, is_decoder=True, pad_token_id=0, initializer_range=0.2),
        add_pooling_layer=False).eval()
    return ImageRewardReward(ImageRewardModel(vision, text, AestheticHead(embed_dim=24).eval(), tokenizer))


@pytest.fixture(scope="module")
def rewards(clip_folder, tmp_path_factory):
    """name -> (reward, pixel_values function, official reference of one 8-bit image in pixel units)."""
    tmp = tmp_path_factory.mktemp("heads")
    torch.manual_seed(2)
    head = str(tmp / "head.safetensors")
    save_aesthetic_head(AestheticHead(embed_dim=16), head)
    processor = clip_processor(clip_folder)
    clip_ref = functools.partial(transformers_reference, processor=processor)
    imagereward = tiny_imagereward(tmp)
    built = {
        "imagereward": (imagereward, imagereward.model.pixel_values, torchvision_reference),
        "hpsv2": (get_reward("hpsv2", checkpoint=clip_folder), None, hpsv2_reference),
        "pickscore": (get_reward("pickscore", model=clip_folder, processor=clip_folder, offset=0.0), None, clip_ref),
        "aesthetic": (get_reward("aesthetic", model=clip_folder, head=head), None, clip_ref),
        "clip_score": (get_reward("clip_score", model=clip_folder), None, clip_ref),
    }
    return {name: (reward, fn or reward.backbone.pixel_values, ref) for name, (reward, fn, ref) in built.items()}


def normalize(pixels: np.ndarray) -> torch.Tensor:
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(-1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(-1, 3, 1, 1)
    return (torch.from_numpy(np.asarray(pixels, dtype=np.float32)) - mean) / std


def denormalize(pixel_values: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(-1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(-1, 3, 1, 1)
    return pixel_values.detach().float() * std + mean


def scores_on_pixels(reward, pixel_values: torch.Tensor, images: torch.Tensor, prompts) -> torch.Tensor:
    """The reward's score with its preprocessing replaced by ready ``pixel_values`` (same weights, same formula)."""
    owner = reward.model if hasattr(reward, "model") else reward.backbone
    owner.pixel_values = lambda _images: pixel_values  # shadows the method for this call
    try:
        return reward(images, prompts)
    finally:
        del owner.pixel_values


def compare(rewards, name: str, height: int, width: int) -> dict[str, float]:
    """Pixel and score differences of one reward on a batch of ``BATCH`` different ``height x width`` images."""
    reward, pixel_fn, reference = rewards[name]
    batch = [make_image(height, width, seed) for seed in range(BATCH)]
    images = as_tensor(batch)
    ours = denormalize(pixel_fn(images))
    official = torch.from_numpy(np.stack([reference(image) for image in batch]))
    diff = (ours - official).abs()
    prompts = [PROMPT] * BATCH
    with torch.no_grad():
        value = reward(images, prompts)
        expected = scores_on_pixels(reward, normalize(official), images, prompts)
    spread = float(expected.max() - expected.min())
    return {"px_max": float(diff.max()), "px_mean": float(diff.mean()), "spread": spread,
            "score_max": float((value - expected).abs().max()), "shape": tuple(ours.shape[-2:])}


# ------------------------------------------------------------------ the integer rules (values from the issue)


def test_resize_and_crop_rules_truncate_round_and_floor_as_the_official_code():
    assert shortest_side_size(300, 400, 224) == (224, 298)  # round() gave 299
    assert shortest_side_size(1536, 640, 224) == (537, 224)  # round() gave 538
    assert shortest_side_size(1216, 832, 224) == (327, 224)
    assert longest_side_size(300, 400, 224) == (168, 224) and longest_side_size(1216, 832, 224) == (224, 153)
    assert crop_offsets(224, 299, 224, "round") == (0, 38)  # torchvision: round(37.5) = 38 (half to even)
    assert crop_offsets(224, 299, 224, "floor") == (0, 37)  # transformers: 75 // 2
    assert crop_offsets(224, 537, 224, "round") == (0, 156)  # round(156.5) = 156


# ------------------------------------------------------------------ pixels and scores, every reward, every size


@pytest.mark.parametrize("name", LEARNED)
def test_preprocessing_matches_the_official_transform_on_every_size(rewards, name):
    for height, width in SIZES:
        result = compare(rewards, name, height, width)
        where = f"{name} {height}x{width}: {result}"
        assert result["shape"] == (SIZE, SIZE), where
        if name == "hpsv2":  # the official resize is itself a float one: only float rounding apart
            assert result["px_max"] < 1e-4 and result["px_mean"] < 1e-5, where
        else:  # 8-bit passes as PIL's: a few pixels one 8-bit step apart (PIL's fixed-point filter weights)
            assert result["px_max"] <= EIGHT_BIT_STEP and result["px_mean"] < 1e-5, where
        # the bar, on the normalised tensors the models read: (x - mean) / std, std >= 0.26
        assert result["px_mean"] / min(OPENAI_CLIP_STD) < 2e-3, where
        assert result["spread"] > 0 and result["score_max"] < 0.005 * result["spread"], where


def test_hpsv2_without_antialias_matches_torchvision_before_0_17(clip_folder):
    transform = get_reward("hpsv2", checkpoint=clip_folder, antialias=False).backbone.transform
    for height, width in [(300, 400), (1216, 832), (160, 160)]:
        image = make_image(height, width, 5)
        ours = denormalize(transform(as_tensor([image])))[0]
        official = torch.from_numpy(hpsv2_reference(image, antialias=False))
        assert (ours - official).abs().max() < 1e-4, (height, width)


def test_hpsv2_pads_with_black_and_keeps_the_whole_image(clip_folder):
    transform = get_reward("hpsv2", checkpoint=clip_folder).backbone.transform
    white = torch.ones(1, 3, 300, 400)
    pixels = transform.unnormalized(white)[0]
    assert pixels.shape == (3, 224, 224)
    assert torch.all(pixels[:, :28] == 0) and torch.all(pixels[:, 196:] == 0)  # 224 - 168 = 56: 28 above, 28 below
    torch.testing.assert_close(pixels[:, 28:196], torch.ones(3, 168, 224))


@pytest.mark.parametrize("style", ["torchvision", "transformers", "hpsv2"])
def test_every_transform_is_differentiable(style):
    images = torch.rand(2, 3, 300, 401, generator=torch.Generator().manual_seed(0), requires_grad=True)
    ImageTransform(style)(images).square().sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
