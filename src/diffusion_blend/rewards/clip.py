"""CLIP-family rewards: CLIPScore, LAION aesthetic predictor, PickScore (paper.md section 4.9, 8.13).

All three share one piece: a transformers ``CLIPModel`` with its tokenizer, fed by the differentiable torch
preprocessing of :mod:`.preprocess`, so each reward is differentiable with respect to the images. Their official
scorers (torchmetrics' CLIPScore, the DDPO aesthetic scorer, PickScore's ``calc_probs``) preprocess with transformers'
``CLIPImageProcessor``; the ``"transformers"`` transform restates it (shortest side to 224 with the long side
truncated, PIL bicubic, centre crop with the offset floored, 1/255, mean/std from ``preprocessor_config.json``).

- ``clip_score``: CLIPScore (Hessel et al., 2021) in the torchmetrics convention,
  ``100 * max(cos(image, text), 0)`` in ``[0, 100]`` (``scale`` option; Hessel's paper uses 2.5).
- ``aesthetic``: LAION "improved aesthetic predictor" ``sac+logos+ava1-l14-linearMSE``: an MLP head
  (768-1024-128-64-16-1) on the L2-normalised CLIP ViT-L/14 image embedding; predicts a 1-10 rating (unbounded).
- ``pickscore``: PickScore v1 (Kirstain et al., 2023): ``logit_scale.exp() * cos(image, text) - offset``, with
  ``offset = 19`` as in the paper's baselines (paper.md 8.13); ``offset=0`` gives the raw PickScore.

Sources are a hub id (the default, the usual one) or a local folder (``save_pretrained`` layout with tokenizer
files). Heavy packages are imported lazily; loading failures become one-line :class:`RewardError` messages.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from diffusion_blend.errors import RewardError
from diffusion_blend.rewards.base import Reward
from diffusion_blend.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from diffusion_blend.rewards.registry import register_reward

REWARDS_EXTRA = "rewards"
DEFAULT_CLIP_SOURCE = "openai/clip-vit-large-patch14"
DEFAULT_PICKSCORE_SOURCE = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_AESTHETIC_HEAD = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")
PICKSCORE_OFFSET = 19.0


# ---------------------------------------------------------------- loading helpers (shared by hpsv2, imagereward)


def import_transformers() -> Any:
    """Import transformers lazily; a missing package becomes a one-line error naming the pip extra."""
    try:
        import transformers
    except ImportError as exc:
        raise RewardError(
            f"this reward needs the 'transformers' package ({exc.__class__.__name__}); "
            f"install it with: pip install 'diffusion-blend[{REWARDS_EXTRA}]'"
        ) from None
    return transformers


def one_line(exc: BaseException, limit: int = 240) -> str:
    """First non-empty line of an exception message, shortened: errors from hub loaders span many lines."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_failure(what: str, source: str, exc: BaseException) -> RewardError:
    """A one-line error for a model/file that could not be loaded from a local path or the hub."""
    if os.path.exists(source):  # a local path that is there but broken: the loader's own reason
        return RewardError(f"cannot load {what} from local path {source!r}: {one_line(exc)}")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no", "off")
    offline_reason = "not a local path, not in the hub cache, and HF_HUB_OFFLINE=1 forbids downloads"
    where = offline_reason if offline else one_line(exc)
    return RewardError(
        f"cannot load {what} from {source!r}: {where}; pass a local folder/file or download it first "
        f"(hf download {source})"
    )


def load_pretrained(loader: Callable[..., Any], source: str, what: str, **kwargs: Any) -> Any:
    """``loader(source, **kwargs)`` (a ``from_pretrained``), with hub/IO failures as one-line RewardErrors."""
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise load_failure(what, source, exc) from None


def resolve_file(source: str, filename: str, what: str) -> str:
    """A local file: ``source`` itself, ``source/filename`` for a folder, else ``filename`` from hub repo ``source``."""
    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        if not os.path.isfile(path):
            raise RewardError(f"cannot load {what}: {filename!r} not found in folder {source!r}")
        return path
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise RewardError(f"cannot load {what} from the hub: install 'diffusion-blend[{REWARDS_EXTRA}]'") from None
    try:
        return hf_hub_download(repo_id=source, filename=filename)
    except Exception as exc:  # hub errors: offline, missing repo/file, auth, invalid id
        raise load_failure(f"{what} ({filename})", source, exc) from None


def load_weights_file(path: str, what: str) -> dict[str, torch.Tensor]:
    """A flat tensor dict from ``.safetensors`` (preferred) or a torch pickle read with ``weights_only=True``."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RewardError(f"cannot read {what} weights from {path!r}: {one_line(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise RewardError(f"{what} weights in {path!r} are not a flat dict of tensors")
    return state


def build_model_from_state_dict(
    model_cls: Any, config: Any, state_dict: dict[str, torch.Tensor], what: str, **init_kwargs: Any
) -> nn.Module:
    """``model_cls(config, **init_kwargs)`` carrying ``state_dict``; every key and shape must match exactly.

    The expected keys come from a skeleton built on the ``meta`` device (no memory, no init cost).
    """
    with torch.device("meta"):
        skeleton = model_cls(config, **init_kwargs)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in expected.keys() & state_dict.keys() if tuple(state_dict[k].shape) != expected[k])
    if missing or extra or wrong:
        raise RewardError(
            f"{what} checkpoint does not fit the config: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]}), {len(wrong)} with other shapes (e.g. {wrong[:2]})"
        )
    model = model_cls.from_pretrained(None, config=config, state_dict=state_dict, **init_kwargs)
    return model.eval().requires_grad_(False)


def _read_json(source: str, filename: str) -> dict[str, Any] | None:
    """``filename`` from a folder or hub repo as a dict, or ``None`` when it does not exist there."""
    try:
        path = resolve_file(source, filename, filename)
    except RewardError:
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _as_int(value: Any, default: int) -> int:
    if isinstance(value, dict):  # transformers writes {"shortest_edge": 224} or {"height": 224, "width": 224}
        value = value.get("shortest_edge", value.get("height"))
    return default if value is None else int(value)


#: PIL resampling codes of ``preprocessor_config.json`` (``resample``) that the torch transforms restate.
_RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}


def features(output: Any) -> torch.Tensor:
    """Projected embeddings from ``get_*_features`` (a tensor in transformers 4, an output object in 5)."""
    return output if torch.is_tensor(output) else output.pooler_output


# ---------------------------------------------------------------- the shared CLIP backbone


class ClipBackbone(nn.Module):
    """A frozen ``CLIPModel`` + tokenizer + image transform; gives L2-normalised embeddings.

    ``model`` is any transformers CLIP-architecture model (``get_image_features``/``get_text_features``);
    ``transform`` is the reward's official preprocessing restated in torch (:class:`.preprocess.ImageTransform`;
    sizes and mean/std come from ``preprocessor_config.json`` when there is one).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, transform: ImageTransform):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.transform = transform

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """``transform(images)`` (computed in float32) on the model's device, in the model's dtype."""
        return self.transform(images.to(self.device)).to(self.dtype)

    def image_embeds_from_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings ``(B, D)`` of ready ``pixel_values``."""
        emb = features(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)))
        return emb / emb.norm(dim=-1, keepdim=True)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised projected image embeddings ``(B, D)``; differentiable w.r.t. ``images``."""
        return self.image_embeds_from_pixels(self.pixel_values(images))

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings ``(B, D)`` (padded, truncated to the model's context)."""
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self.device)
        emb = features(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        )
        return emb / emb.norm(dim=-1, keepdim=True)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-pair cosine ``cos(image_i, prompt_i)``, shape ``(B,)``."""
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


def preprocessing_from(source: str, image_size: int, style: str = "transformers") -> ImageTransform:
    """The ``style`` transform with sizes/mean/std/filter from ``preprocessor_config.json`` in ``source``.

    Without a config: ``image_size`` for resize and crop, OpenAI CLIP mean/std, bicubic. A config that resizes to a
    fixed ``height x width`` (no aspect ratio kept) or names another filter is refused rather than approximated.
    """
    config = _read_json(source, "preprocessor_config.json") or {}
    size = config.get("size")
    if isinstance(size, dict) and "shortest_edge" not in size:
        raise RewardError(
            f"preprocessor_config.json in {source!r} resizes to a fixed size {size}; only shortest-edge resizing "
            "(CLIP's) is restated in torch"
        )
    resample = int(config.get("resample", 3))
    if resample not in _RESAMPLE_MODES:
        raise RewardError(f"preprocessor_config.json in {source!r}: resample={resample} is not restated in torch")
    return ImageTransform(
        style=style,
        resize=_as_int(size, image_size),
        crop=_as_int(config.get("crop_size"), image_size),
        mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
        mode=_RESAMPLE_MODES[resample],
    )


def load_tokenizer(source: str) -> Any:
    transformers = import_transformers()
    return load_pretrained(transformers.AutoTokenizer.from_pretrained, source, "tokenizer")


def load_clip_backbone(
    source: str = DEFAULT_CLIP_SOURCE,
    *,
    processor_source: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ClipBackbone:
    """``CLIPModel`` from ``source`` (hub id or folder); tokenizer + preprocessing from ``processor_source``."""
    transformers = import_transformers()
    processor_source = processor_source or source
    model = load_pretrained(transformers.CLIPModel.from_pretrained, source, "CLIP model")
    tokenizer = load_tokenizer(processor_source)
    transform = preprocessing_from(processor_source, model.config.vision_config.image_size)
    return ClipBackbone(model.to(device=device, dtype=dtype), tokenizer, transform)


# ---------------------------------------------------------------- rewards


class ClipScoreReward(Reward):
    """CLIPScore ``scale * max(cos(image, text), 0)`` (Hessel et al., 2021; torchmetrics ``scale = 100``)."""

    name = "clip_score"
    differentiable = True
    needs_prompts = True

    def __init__(self, backbone: ClipBackbone, scale: float = 100.0):
        self.backbone, self.scale = backbone, float(scale)
        self.value_range = (0.0, self.scale)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        return (self.scale * self.backbone.cosine(images, prompts).clamp(min=0)).float()


class AestheticHead(nn.Module):
    """LAION improved-aesthetic-predictor MLP (``sac+logos+ava1-l14-linearMSE``): state-dict keys
    ``layers.{0,2,4,6,7}``."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


def load_aesthetic_head(source: str, filename: str = DEFAULT_AESTHETIC_HEAD[1]) -> AestheticHead:
    """Head weights from a ``.safetensors``/``.pth`` file, a folder, or a hub repo (``filename`` inside it)."""
    state = load_weights_file(resolve_file(source, filename, "aesthetic head"), "aesthetic head")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "layers.0.weight" not in state:
        raise RewardError(f"aesthetic head weights from {source!r} lack 'layers.0.weight' (got {sorted(state)[:4]})")
    head = AestheticHead(embed_dim=state["layers.0.weight"].shape[1])
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RewardError(f"aesthetic head weights from {source!r} do not fit: {one_line(exc)}") from None
    return head.eval().requires_grad_(False)


def save_aesthetic_head(head: AestheticHead, path: str) -> None:
    """Write the head as safetensors atomically (:func:`~diffusion_blend.files.atomic_path`)."""
    from safetensors.torch import save_file

    from diffusion_blend.files import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, tmp)


class AestheticReward(Reward):
    """LAION aesthetic score: ``head(normalise(CLIP-L/14 image embedding))``; prompts ignored."""

    name = "aesthetic"
    differentiable = True
    needs_prompts = False
    value_range = (None, None)  # regression head trained on 1-10 ratings; not clipped

    def __init__(self, backbone: ClipBackbone, head: AestheticHead):
        self.backbone = backbone
        self.head = head.to(backbone.device, backbone.dtype)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        return self.head(self.backbone.image_embeds(images)).float()


class PickScoreReward(Reward):
    """PickScore ``logit_scale.exp() * cos(image, text) - offset`` (offset 19 as in paper.md 8.13)."""

    name = "pickscore"
    differentiable = True
    needs_prompts = True

    def __init__(self, backbone: ClipBackbone, offset: float = PICKSCORE_OFFSET):
        self.backbone, self.offset = backbone, float(offset)
        self.logit_scale = float(backbone.model.logit_scale.exp())
        self.value_range = (-self.logit_scale - self.offset, self.logit_scale - self.offset)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        return (self.logit_scale * self.backbone.cosine(images, prompts) - self.offset).float()


@register_reward("clip_score", "CLIPScore 100*max(cos,0) in [0,100] with CLIP ViT-L/14 (openai)",
                 returns=ClipScoreReward, weights=DEFAULT_CLIP_SOURCE)
def clip_score(
    model: str = DEFAULT_CLIP_SOURCE, scale: float = 100.0, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Reward:
    return ClipScoreReward(load_clip_backbone(model, device=device, dtype=dtype), scale=scale)


@register_reward("aesthetic", "LAION aesthetic predictor (MLP on CLIP ViT-L/14 embeddings), ~1-10",
                 returns=AestheticReward,
                 weights=f"{DEFAULT_CLIP_SOURCE} + {DEFAULT_AESTHETIC_HEAD[0]}/{DEFAULT_AESTHETIC_HEAD[1]}")
def aesthetic(
    model: str = DEFAULT_CLIP_SOURCE,
    head: str = DEFAULT_AESTHETIC_HEAD[0],
    head_filename: str = DEFAULT_AESTHETIC_HEAD[1],
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Reward:
    backbone = load_clip_backbone(model, device=device, dtype=dtype)
    return AestheticReward(backbone, load_aesthetic_head(head, head_filename))


@register_reward("pickscore", "PickScore v1: logit_scale.exp()*cos - 19 (paper offset); CLIP-H",
                 returns=PickScoreReward,
                 weights=f"{DEFAULT_PICKSCORE_SOURCE} + {DEFAULT_PICKSCORE_PROCESSOR} (processor)")
def pickscore(
    model: str = DEFAULT_PICKSCORE_SOURCE,
    processor: str = DEFAULT_PICKSCORE_PROCESSOR,
    offset: float = PICKSCORE_OFFSET,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Reward:
    backbone = load_clip_backbone(model, processor_source=processor, device=device, dtype=dtype)
    return PickScoreReward(backbone, offset=offset)
