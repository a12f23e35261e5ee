"""Tiny Stable Diffusion / SDXL pipelines built from configs (the diffusers test pattern), fully offline.

For trying the library without downloading a base model (``dblend tiny-base --out DIR``, README quick start) and
for the tests. The weights are random: images are noise-like, but every code path of the real pipelines runs.
The tokenizer is a byte-level CLIP BPE tokenizer with an empty merge table, written to disk here, so no
hub download is needed. LoRA adapters get a non-zero ``lora_B`` (the default init is zero, which would make
every adapter equal to the base).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .quiet import install_log_filters, quiet_third_party

install_log_filters()  # before diffusers is imported (transformers' torchvision notice)

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (+ word-final forms) and the two specials."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(symbol, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=16,
        pad_token="!",
    )


def _text_config(**extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        pad_token_id=1,
        vocab_size=1000,
        max_position_embeddings=16,
        **extra,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=2,
    )


def tiny_sd_pipeline(folder: Path, seed: int = 0) -> StableDiffusionPipeline:
    """A stock tiny SD pipeline (UNet 32-channel latents at 8x8 for 16x16 images)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        scheduler=_scheduler(),
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=make_tokenizer(Path(folder) / "_tokenizer_src"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def tiny_sdxl_pipeline(folder: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """A stock tiny SDXL pipeline: text_time added conditioning and two text encoders."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled text
        cross_attention_dim=64,
        norm_num_groups=2,
    )
    tokenizer = make_tokenizer(Path(folder) / "_tokenizer_src")
    return StableDiffusionXLPipeline(
        unet=unet,
        scheduler=_scheduler(),
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(projection_dim=32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
    )


def save_pipeline(pipe, folder: Path) -> Path:
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def perturbed_lora(unet: torch.nn.Module, name: str, seed: int, scale: float = 0.3, rank: int = 4,
                   target_modules: list[str] | None = None) -> None:
    """Add a rank-``rank`` LoRA on ``target_modules`` (default: all attention projections of a UNet) with random,
    non-zero ``lora_A`` and ``lora_B`` (the default init would make every adapter equal the base)."""
    with quiet_third_party():  # peft's notice on a second adapter
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules or ATTENTION_PROJECTIONS,
                       init_lora_weights="gaussian"),
            adapter_name=name,
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in unet.named_parameters():
            if f"lora_B.{name}." in param_name or f"lora_A.{name}." in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def save_diffusers_lora(pipe_class, unet: torch.nn.Module, name: str, path: Path, component: str = "unet") -> Path:
    """Save adapter ``name`` of ``unet`` (or of a ``component="transformer"``) as a diffusers LoRA file
    (``save_lora_weights``)."""
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(unet, adapter_name=name)
    path = Path(path)
    pipe_class.save_lora_weights(path.parent, **{f"{component}_lora_layers": layers}, weight_name=path.name,
                                 safe_serialization=True)
    return path


def write_adapters(pipe_class, base_folder: Path, out: Path, names_and_seeds: dict[str, int]) -> dict[str, Path]:
    """Load the saved base UNet, give it one perturbed LoRA per name, and save each as a diffusers LoRA file."""
    unet = UNet2DConditionModel.from_pretrained(Path(base_folder) / "unet")
    files = {}
    for name, seed in names_and_seeds.items():
        perturbed_lora(unet, name, seed)
        files[name] = save_diffusers_lora(pipe_class, unet, name, Path(out) / f"{name}.safetensors")
    return files


EXAMPLE_ADAPTERS = {"aesthetic": 1, "align": 2}
"""Names (and seeds) of the two example adapters :func:`write_tiny_base` writes next to the pipeline."""


def write_tiny_base(out: Path, seed: int = 0) -> dict[str, Path]:
    """Save a tiny SD 1.5-layout pipeline to ``out/base`` and two random LoRA experts (diffusers LoRA files)
    to ``out/<name>.safetensors``; returns ``{"base": ..., "aesthetic": ..., "align": ...}``.

    Offline stand-ins for a real base (e.g. ``runwayml/stable-diffusion-v1-5``) and experts trained with
    ``dblend finetune --target sd``; the adapters carry no reward metadata (their names are only labels).
    """
    import shutil

    from .files import give_user_mode

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = save_pipeline(tiny_sd_pipeline(out, seed=seed), out / "base")
    shutil.rmtree(out / "_tokenizer_src", ignore_errors=True)  # the tokenizer is saved inside base/
    files = write_adapters(StableDiffusionPipeline, base, out, EXAMPLE_ADAPTERS)
    for path in files.values():
        give_user_mode(path)  # diffusers writes LoRA files through a 0600 temporary file
    return {"base": base, **files}
