"""HPSv2 / HPSv2.1 (Wu et al., 2023) without open_clip: the checkpoint converted into a transformers ``CLIPModel``.

The reference package ``hpsv2`` builds an open_clip ViT-H-14 and loads ``HPS_v2(.1)_compressed.pt`` from the hub
repo ``xswu/HPSv2``; open_clip needs torchvision, which this project cannot use. HPSv2 is a fine-tuned open_clip
ViT-H-14 with the standard architecture, so its state dict maps one-to-one onto transformers' ``CLIPModel``
(the same route as the hub's ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` conversion). That repo supplies the
config (GELU, 16+16 heads, 224 px), the tokenizer and mean/std; the HPS checkpoint supplies the weights.

Key mapping (open_clip -> transformers; ``{t}`` = ``vision_model.`` under ``visual.``, ``text_model.`` otherwise):

=====================================================  ====================================================
``visual.conv1.weight``                                ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding``                             ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``                        ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre.*``                                    ``vision_model.pre_layrnorm.*``
``visual.ln_post.*``                                   ``vision_model.post_layernorm.*``
``visual.proj`` (width x dim)                          ``visual_projection.weight`` (transposed)
``token_embedding.weight``                             ``text_model.embeddings.token_embedding.weight``
``positional_embedding``                               ``text_model.embeddings.position_embedding.weight``
``ln_final.*``                                         ``text_model.final_layer_norm.*``
``text_projection`` (width x dim)                      ``text_projection.weight`` (transposed)
``logit_scale``                                        ``logit_scale``
``[visual.]transformer.resblocks.{i}.ln_1/ln_2.*``     ``{t}encoder.layers.{i}.layer_norm1/layer_norm2.*``
``...resblocks.{i}.attn.in_proj_weight/bias``          split in 3 -> ``{t}encoder.layers.{i}.self_attn.{q,k,v}_proj.*``
``...resblocks.{i}.attn.out_proj.*``                   ``{t}encoder.layers.{i}.self_attn.out_proj.*``
``...resblocks.{i}.mlp.c_fc.* / mlp.c_proj.*``         ``{t}encoder.layers.{i}.mlp.fc1.* / mlp.fc2.*``
=====================================================  ====================================================

Score (as ``hpsv2.score``): the cosine of the normalised image and text embeddings, no logit scale; range
``[-1, 1]`` times ``scale`` (default 1).

Images (as ``hpsv2.score``, whose ``create_model_and_transforms(..., light_augmentation=True)`` picks
``ResizeMaxSize`` in ``hpsv2/src/open_clip/transform.py``): the longer side resized to 224 (bicubic on the float
tensor, antialiased as torchvision >= 0.17 does; ``antialias=False`` for older torchvision), the image zero-padded
(black) to 224 x 224 and centred, no crop; see :mod:`.preprocess`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from diffusion_blend.errors import RewardError
from diffusion_blend.rewards.base import Reward
from diffusion_blend.rewards.clip import (
    ClipBackbone,
    build_model_from_state_dict,
    import_transformers,
    load_clip_backbone,
    load_pretrained,
    load_tokenizer,
    load_weights_file,
    preprocessing_from,
    resolve_file,
)
from diffusion_blend.rewards.preprocess import ImageTransform
from diffusion_blend.rewards.registry import register_reward

DEFAULT_HPS_REPO = "xswu/HPSv2"
HPS_FILENAMES = {"v2": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_HPS_BACKBONE = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

_TOP_LEVEL = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK_PARTS = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}


def _convert_block_key(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One ``[visual.]transformer.resblocks.{i}.*`` entry -> its transformers entries (q/k/v split)."""
    tower = "vision_model." if key.startswith("visual.") else "text_model."
    rest = key.removeprefix("visual.").removeprefix("transformer.resblocks.")
    index, part = rest.split(".", 1)
    prefix = f"{tower}encoder.layers.{index}."
    if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if part.endswith("weight") else "bias"
        query, key_, value_ = value.chunk(3, dim=0)
        return {f"{prefix}self_attn.{name}_proj.{kind}": t for name, t in zip("qkv", (query, key_, value_))}
    for old, new in _BLOCK_PARTS.items():
        if part.startswith(old):
            return {prefix + new + part[len(old) :]: value}
    raise RewardError(f"unexpected open_clip key {key!r} (layer scale or a non-standard block?)")


def open_clip_to_transformers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an open_clip ``CLIP`` (ViT vision tower) state dict onto transformers ``CLIPModel`` keys (table above)."""
    converted: dict[str, torch.Tensor] = {}
    for raw_key, value in state_dict.items():
        key = raw_key.removeprefix("module.")
        if key in _TOP_LEVEL:
            converted[_TOP_LEVEL[key]] = value
        elif key in _TRANSPOSED:
            converted[_TRANSPOSED[key]] = value.t().contiguous()
        elif key.removeprefix("visual.").startswith("transformer.resblocks."):
            converted.update(_convert_block_key(key, value))
        else:
            raise RewardError(f"unexpected open_clip key {key!r}; only ViT-tower open_clip CLIP models convert")
    return {k: v.contiguous() for k, v in converted.items()}


def build_clip_from_open_clip(state_dict: Mapping[str, torch.Tensor], config) -> torch.nn.Module:
    """A transformers ``CLIPModel(config)`` carrying the converted weights; every key and shape must match."""
    transformers = import_transformers()
    converted = open_clip_to_transformers(state_dict)
    return build_model_from_state_dict(transformers.CLIPModel, config, converted, "open_clip (HPS)")


def convert_hpsv2_checkpoint(checkpoint_file: str, backbone: str, out_dir: str) -> str:
    """Write a converted HPS checkpoint as a transformers folder (safetensors + tokenizer + preprocessor)."""
    transformers = import_transformers()
    config = load_pretrained(transformers.CLIPConfig.from_pretrained, backbone, "CLIP config")
    model = build_clip_from_open_clip(load_weights_file(checkpoint_file, "HPS"), config)
    model.save_pretrained(out_dir)
    load_tokenizer(backbone).save_pretrained(out_dir)
    prep = preprocessing_from(backbone, config.vision_config.image_size)
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = processor_cls(  # CLIP's resize-and-crop: transformers cannot state hpsv2's centred zero pad
        size={"shortest_edge": prep.resize},
        crop_size={"height": prep.crop, "width": prep.crop},
        image_mean=list(prep.mean),
        image_std=list(prep.std),
    )
    image_processor.save_pretrained(out_dir)
    return out_dir


def hpsv2_transform(source: str, image_size: int, antialias: bool = True) -> ImageTransform:
    """hpsv2's evaluation transform (``ResizeMaxSize(image_size)``, zero pad, normalise; see :mod:`.preprocess`).

    hpsv2 sizes it by the model (``model.visual.image_size``), not by the processor config; mean/std come from
    ``source``'s ``preprocessor_config.json`` (OpenAI CLIP constants, as open_clip's ``OPENAI_DATASET_MEAN/STD``).
    ``antialias=False`` restates torchvision < 0.17, whose tensor resize did not antialias by default.
    """
    prep = preprocessing_from(source, image_size)
    return ImageTransform("hpsv2", image_size, image_size, prep.mean, prep.std, mode="bicubic", antialias=antialias)


def load_hpsv2_backbone(
    checkpoint: str = DEFAULT_HPS_REPO,
    *,
    version: str = "v2.1",
    backbone: str = DEFAULT_HPS_BACKBONE,
    antialias: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ClipBackbone:
    """HPS model from a converted transformers folder, a local ``.pt``/``.safetensors``, or the hub repo.

    The image transform is always hpsv2's (:func:`hpsv2_transform`), also for a converted folder, whose
    ``preprocessor_config.json`` (CLIP's resize-and-crop, for transformers tools) supplies only mean and std.
    """
    if os.path.isdir(checkpoint) and os.path.isfile(os.path.join(checkpoint, "config.json")):
        loaded = load_clip_backbone(checkpoint, device=device, dtype=dtype)
        image_size = loaded.model.config.vision_config.image_size
        return ClipBackbone(loaded.model, loaded.tokenizer, hpsv2_transform(checkpoint, image_size, antialias))
    if version not in HPS_FILENAMES:
        raise RewardError(f"unknown HPS version {version!r}; choose one of {sorted(HPS_FILENAMES)}")
    transformers = import_transformers()
    path = resolve_file(checkpoint, HPS_FILENAMES[version], f"HPS{version} checkpoint")
    config = load_pretrained(transformers.CLIPConfig.from_pretrained, backbone, "CLIP ViT-H-14 config")
    model = build_clip_from_open_clip(load_weights_file(path, "HPS"), config)
    transform = hpsv2_transform(backbone, config.vision_config.image_size, antialias)
    return ClipBackbone(model.to(device=device, dtype=dtype), load_tokenizer(backbone), transform)


class HPSv2Reward(Reward):
    """HPSv2 score ``scale * cos(image, text)`` (the ``hpsv2.score`` definition: no logit scale)."""

    name = "hpsv2"
    differentiable = True
    needs_prompts = True

    def __init__(self, backbone: ClipBackbone, scale: float = 1.0):
        self.backbone, self.scale = backbone, float(scale)
        self.value_range = (-abs(self.scale), abs(self.scale))

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        return (self.scale * self.backbone.cosine(images, prompts)).float()


@register_reward("hpsv2", "HPSv2.1 human preference score (cosine in [-1,1]); open_clip ViT-H-14 via transformers",
                 returns=HPSv2Reward, weights=f"{DEFAULT_HPS_REPO} (HPS_v2.1_compressed.pt) + {DEFAULT_HPS_BACKBONE}")
def hpsv2(
    checkpoint: str = DEFAULT_HPS_REPO,
    version: str = "v2.1",
    backbone: str = DEFAULT_HPS_BACKBONE,
    scale: float = 1.0,
    antialias: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Reward:
    backbone_ = load_hpsv2_backbone(
        checkpoint, version=version, backbone=backbone, antialias=antialias, device=device, dtype=dtype
    )
    return HPSv2Reward(backbone_, scale=scale)
