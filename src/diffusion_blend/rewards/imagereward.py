"""ImageReward v1.0 (Xu et al., 2023) rebuilt on transformers' BLIP modules (paper.md sections 4.9 and 8.13).

The PyPI package ``image-reward`` 1.5 imports torchvision at module level and pins ``timm==0.6.13`` and
``fairscale`` (its BLIP ViT is timm-based), so it cannot run in a torchvision-free install. ImageReward is
``BLIP ViT-L/16 image encoder -> BERT text encoder with cross-attention to the image tokens -> MLP on the [CLS]
state``; transformers ships the same two modules (``BlipVisionModel``, ``BlipTextModel``), so this module loads the
official checkpoint ``ImageReward.pt`` (hub repo ``THUDM/ImageReward``) into them:

==============================================  ==============================================
``blip.visual_encoder.cls_token``               ``vision.embeddings.class_embedding``
``blip.visual_encoder.pos_embed``               ``vision.embeddings.position_embedding``
``blip.visual_encoder.patch_embed.proj.*``      ``vision.embeddings.patch_embedding.*``
``blip.visual_encoder.blocks.{i}.norm1/norm2``  ``vision.encoder.layers.{i}.layer_norm1/layer_norm2``
``blip.visual_encoder.blocks.{i}.attn.qkv``     ``vision.encoder.layers.{i}.self_attn.qkv``
``blip.visual_encoder.blocks.{i}.attn.proj``    ``vision.encoder.layers.{i}.self_attn.projection``
``blip.visual_encoder.blocks.{i}.mlp.fc1/fc2``  ``vision.encoder.layers.{i}.mlp.fc1/fc2``
``blip.visual_encoder.norm.*``                  ``vision.post_layernorm.*``
``blip.text_encoder.*``                         ``text.*`` (same names: BLIP's ``med.py`` BERT)
``mlp.layers.*``                                ``head.layers.*`` (768-1024-128-64-16-1)
==============================================  ==============================================

``blip.vision_proj``/``blip.text_proj`` (ITC projections) are unused by the score and skipped.

Score (``ImageReward.score``): tokens = BERT tokenizer (``bert-base-uncased`` + ``[DEC]``/``[ENC]``), padded to 35;
``reward = (mlp(text_encoder(tokens, cross-attending to ViT(image))[CLS]) - 0.16717362830052426) /
1.0333394966054072``. ``normalize=False`` returns the raw MLP output (the paper's baseline scorer).
Preprocessing (``ImageReward._transform`` in ``ImageReward/ImageReward.py``): torchvision ``Resize(224, BICUBIC)`` on
the PIL image (shorter side 224, longer ``int(224 * long / short)``, PIL bicubic), ``CenterCrop(224)`` (offset
``int(round(excess / 2))``), ``ToTensor``, OpenAI CLIP mean/std; restated in torch as the ``"torchvision"`` transform
of :mod:`.preprocess`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from diffusion_blend.errors import RewardError
from diffusion_blend.rewards.base import Reward
from diffusion_blend.rewards.clip import (
    AestheticHead,
    build_model_from_state_dict,
    import_transformers,
    load_pretrained,
    load_weights_file,
    resolve_file,
)
from diffusion_blend.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from diffusion_blend.rewards.registry import register_reward

DEFAULT_IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
DEFAULT_TOKENIZER = "bert-base-uncased"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_TOKENS = 35
IMAGE_SIZE = 224

_VISION_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")


def split_imagereward_state(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """``ImageReward.pt`` -> (BlipVisionModel, BlipTextModel, MLP head) state dicts (table above)."""
    vision, text, head = {}, {}, {}
    for raw_key, value in state.items():
        key = raw_key.removeprefix("module.")
        if key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            match = _BLOCK_KEY.match(rest)
            if rest in _VISION_TOP:
                vision[_VISION_TOP[rest]] = value
            elif match and match.group(2) in _VISION_BLOCK:
                index, part, kind = match.groups()
                vision[f"encoder.layers.{index}.{_VISION_BLOCK[part]}.{kind}"] = value
            else:
                raise RewardError(f"unexpected ImageReward vision key {key!r}")
        elif key.startswith("blip.text_encoder."):
            rest = key.removeprefix("blip.text_encoder.")
            if not rest.endswith("position_ids"):  # old BERT checkpoints store this buffer; transformers rebuilds it
                text[rest] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
        elif not key.startswith(("blip.vision_proj.", "blip.text_proj.")):
            raise RewardError(f"unexpected ImageReward key {key!r}")
    return vision, text, head


def blip_configs(vision_state: Mapping[str, torch.Tensor], med_config: Mapping[str, Any], vision_heads: int = 16):
    """BLIP ViT config read off the checkpoint shapes (ViT-L/16: 16 heads) + the BERT config from ``med_config``."""
    transformers = import_transformers()
    patch = vision_state["embeddings.patch_embedding.weight"]
    width, patch_size = patch.shape[0], patch.shape[-1]
    positions = vision_state["embeddings.position_embedding"].shape[1]
    grid = int(round((positions - 1) ** 0.5))
    layers = 1 + max(int(k.split(".")[2]) for k in vision_state if k.startswith("encoder.layers."))
    vision_config = transformers.BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=vision_heads,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
    )
    text_config = transformers.BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        encoder_hidden_size=width,
        is_decoder=True,  # transformers builds the cross-attention layers only for decoder configs
        pad_token_id=med_config.get("pad_token_id", 0),
    )
    return vision_config, text_config


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP; :meth:`forward` returns the raw (unnormalised) reward."""

    def __init__(self, vision: nn.Module, text: nn.Module, head: AestheticHead, tokenizer: Any):
        super().__init__()
        self.vision, self.text, self.head, self.tokenizer = vision, text, head, tokenizer
        self.requires_grad_(False).eval()

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """``ImageReward._transform(224)`` restated in torch (the ``"torchvision"`` transform), in the model's dtype."""
        param = next(self.vision.parameters())
        size = self.vision.config.image_size
        transform = ImageTransform("torchvision", size, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        return transform(images.to(param.device)).to(param.dtype)

    def forward_pixels(self, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Raw reward of ready ``pixel_values`` ``(B, 3, 224, 224)``."""
        param = next(self.vision.parameters())
        image_embeds = self.vision(pixel_values=pixel_values.to(param.device, param.dtype)).last_hidden_state
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(param.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=param.device)
        hidden = self.text(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return self.head(hidden[:, 0, :])

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.forward_pixels(self.pixel_values(images), prompts)


def load_blip_tokenizer(source: str) -> Any:
    """BERT tokenizer with BLIP's extra ``[DEC]`` (bos) and ``[ENC]`` tokens (``blip.init_tokenizer``)."""
    transformers = import_transformers()
    tokenizer = load_pretrained(transformers.AutoTokenizer.from_pretrained, source, "BERT tokenizer")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_imagereward_model(
    checkpoint: str = DEFAULT_IMAGEREWARD_REPO,
    *,
    tokenizer: str = DEFAULT_TOKENIZER,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ImageRewardModel:
    """``ImageReward.pt`` + ``med_config.json`` from a folder or the hub repo; tokenizer from a hub id or folder."""
    transformers = import_transformers()
    weights = resolve_file(checkpoint, IMAGEREWARD_FILE, "ImageReward checkpoint")
    with open(resolve_file(checkpoint, MED_CONFIG_FILE, "ImageReward med_config"), encoding="utf-8") as handle:
        med_config = json.load(handle)
    vision_state, text_state, head_state = split_imagereward_state(load_weights_file(weights, "ImageReward"))
    vision_config, text_config = blip_configs(vision_state, med_config)
    vision = build_model_from_state_dict(transformers.BlipVisionModel, vision_config, vision_state, "ImageReward ViT")
    text = build_model_from_state_dict(
        transformers.BlipTextModel, text_config, text_state, "ImageReward BERT", add_pooling_layer=False
    )
    head = AestheticHead(embed_dim=text_config.hidden_size)
    try:
        head.load_state_dict(head_state, strict=True)
    except RuntimeError as exc:
        raise RewardError(f"ImageReward MLP weights do not fit: {str(exc).splitlines()[0]}") from None
    model = ImageRewardModel(vision, text, head, load_blip_tokenizer(tokenizer))
    return model.to(device=device, dtype=dtype)


class ImageRewardReward(Reward):
    """ImageReward v1.0, normalised ``(raw - 0.1672) / 1.0333`` by default (paper.md 8.13)."""

    name = "imagereward"
    differentiable = True
    needs_prompts = True
    value_range = (None, None)  # standardised by the published mean/std; not clipped

    def __init__(self, model: ImageRewardModel, normalize: bool = True):
        self.model, self.normalize = model, bool(normalize)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        raw = self.model(images, prompts).float()
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD if self.normalize else raw


@register_reward("imagereward", "ImageReward v1.0 (BLIP), normalised (raw-0.1672)/1.0333; via transformers BLIP",
                 returns=ImageRewardReward,
                 weights=f"{DEFAULT_IMAGEREWARD_REPO} (ImageReward.pt) + {DEFAULT_TOKENIZER} (tokenizer)")
def imagereward(
    checkpoint: str = DEFAULT_IMAGEREWARD_REPO,
    tokenizer: str = DEFAULT_TOKENIZER,
    normalize: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Reward:
    model = load_imagereward_model(checkpoint, tokenizer=tokenizer, device=device, dtype=dtype)
    return ImageRewardReward(model, normalize=normalize)
