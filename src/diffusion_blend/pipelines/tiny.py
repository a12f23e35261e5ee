"""Tiny Stable Diffusion / SDXL / SD3 / FLUX pipelines built from configs (the diffusers test pattern), fully offline.

For trying the library without downloading a base model (``dblend tiny-base --kind KIND --out DIR``,
docs/try-offline.md) and
for the tests. The weights are random: images are noise-like, but every code path of the real pipelines runs.
The tokenizer is a byte-level CLIP BPE tokenizer with an empty merge table, written to disk here, so no
hub download is needed; FLUX's T5 tokenizer is a ``tokenizers`` Unigram model over the same byte symbols, wrapped in
``T5TokenizerFast``, its T5 encoder a 1-layer ``T5EncoderModel`` built from config. SD3 runs without its T5 encoder
(``text_encoder_3=None``), as diffusers allows. LoRA adapters get non-zero ``lora_A`` / ``lora_B`` (the default init
is zero, which would make every adapter equal to the base).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from diffusion_blend.pipelines.kinds import TRANSFORMER_TARGETS, UNET_TARGETS
from diffusion_blend.quiet import quiet_third_party

ATTENTION_PROJECTIONS = list(UNET_TARGETS)
TRANSFORMER_PROJECTIONS = list(TRANSFORMER_TARGETS)  # what diffusers' SD3/FLUX LoRA scripts (and Flow-GRPO) train


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



def _tiny_unet(**config: Any) -> UNet2DConditionModel:
    """The tiny SD / SDXL UNet: 4 / 8 channels, one layer per block, 8 x 8 latents of 4 channels; ``config``: the
    kind's conditioning."""
    return UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=2, **config,
    )

def tiny_sd_pipeline(folder: Path, seed: int = 0) -> StableDiffusionPipeline:
    """A stock tiny SD pipeline (UNet 32-channel latents at 8x8 for 16x16 images)."""
    torch.manual_seed(seed)
    unet = _tiny_unet(cross_attention_dim=32)
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
    unet = _tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + 32 pooled text
        cross_attention_dim=64,
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


EXAMPLE_EXPERTS = {"brightness": 1, "saturation": 2}
"""The two example experts :func:`write_tiny_base` writes next to the pipeline: named after the weight-free registry
reward each stands for (``dblend rewards``), with the seed of its random LoRA."""

TINY_ALPHA = 0.1
"""The KL weight the example experts' metadata states (they are random, not fine-tuned: it only labels them)."""


def tiny_pipeline(kind: str, folder: Path, seed: int = 0):
    """A stock tiny pipeline of ``kind`` (sd, sdxl, sd3, flux) built from configs."""
    builders = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline,
                "flux": tiny_flux_pipeline}
    return builders[kind](folder, seed=seed)


def write_tiny_base(out: Path, kind: str = "sd", seed: int = 0, alpha: float = TINY_ALPHA) -> dict[str, Path]:
    """Save a tiny pipeline of ``kind`` to ``out/base`` and two random LoRA experts with our metadata to
    ``out/brightness.safetensors`` and ``out/saturation.safetensors``; returns ``{"base": ..., "brightness": ...,
    "saturation": ...}``.

    Offline stand-ins for a real base (e.g. ``runwayml/stable-diffusion-v1-5``) and experts fine-tuned with
    ``dblend finetune``: each file states its reward (the weight-free ``brightness`` / ``saturation``), the KL weight
    ``alpha`` and the base's fingerprint, so every command that needs them (SMC, the evaluation, ``inspect``) runs
    on them as it does on fine-tuned experts. The adapters are random (the images are noise).
    """
    import shutil

    from diffusion_blend.adapters import AdapterMetadata, base_fingerprint
    from diffusion_blend.files import atomic_directory, give_user_mode
    from diffusion_blend.pipelines.kinds import spec_of
    from diffusion_blend.pipelines.lora_files import export_diffusers_lora, unet_architecture

    spec = spec_of(kind)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        pipe = tiny_pipeline(kind, out, seed=seed)
        with atomic_directory(out / "base") as folder:  # a full disk leaves no half-written base
            save_pipeline(pipe, folder)
        base = out / "base"
    finally:
        for scratch in ("_tokenizer_src", "_t5_tokenizer_src"):  # the tokenizers are saved inside base/
            shutil.rmtree(out / scratch, ignore_errors=True)
    denoiser = type(getattr(pipe, spec.denoiser)).from_pretrained(base / spec.denoiser)
    fingerprint = base_fingerprint(denoiser, unet_architecture(denoiser))
    targets = list(TRANSFORMER_PROJECTIONS if spec.flow else ATTENTION_PROJECTIONS)
    files = {}
    for reward, lora_seed in EXAMPLE_EXPERTS.items():
        perturbed_lora(denoiser, reward, lora_seed, target_modules=targets)
        metadata = AdapterMetadata(rewards={reward: 1.0}, alpha=float(alpha), base_fingerprint=fingerprint, rank=4,
                                   lora_alpha=4.0, target_modules=targets,
                                   training_config={"note": "random example expert written by dblend tiny-base"})
        files[reward] = export_diffusers_lora(denoiser, reward, out / f"{reward}.safetensors", metadata, type(pipe))
        give_user_mode(files[reward])
    return {"base": base, **files}




def make_t5_tokenizer(folder: Path) -> T5TokenizerFast:
    """A T5 tokenizer built offline: Unigram over the byte symbols, with T5's pad / eos / unk specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(symbol, -5.0) for symbol in dict.fromkeys(bytes_to_unicode().values())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=32)
    fast.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def _flow_vae() -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def tiny_sd3_pipeline(folder: Path, seed: int = 0) -> StableDiffusion3Pipeline:
    """A stock tiny SD3 pipeline (MMDiT with 2 joint blocks, 4-channel latents; no T5, as diffusers allows)."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    tokenizer = make_tokenizer(Path(folder) / "_tokenizer_src")
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(),
        text_encoder=CLIPTextModelWithProjection(_text_config(projection_dim=32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=32)),
        text_encoder_3=None,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=None,
    )


def tiny_flux_pipeline(folder: Path, seed: int = 0) -> FluxPipeline:
    """A stock tiny FLUX pipeline (1 double + 1 single block, guidance-distilled embedding, tiny T5)."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    t5 = T5EncoderModel(T5Config(vocab_size=300, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(),
        text_encoder=CLIPTextModel(_text_config(projection_dim=32)),
        text_encoder_2=t5,
        tokenizer=make_tokenizer(Path(folder) / "_tokenizer_src"),
        tokenizer_2=make_t5_tokenizer(Path(folder) / "_t5_tokenizer_src"),
    )


def perturbed_transformer_lora(transformer: torch.nn.Module, name: str, seed: int) -> None:
    """A random, non-zero LoRA on the projections diffusers' SD3/FLUX LoRA scripts train."""
    perturbed_lora(transformer, name, seed, target_modules=TRANSFORMER_PROJECTIONS)


def write_transformer_adapters(
    pipe_class, base_folder: Path, out: Path, names_and_seeds: dict[str, int]
) -> dict[str, Path]:
    """Load the saved base transformer, give it one perturbed LoRA per name, save each as a diffusers LoRA file."""
    transformer_class = SD3Transformer2DModel if pipe_class is StableDiffusion3Pipeline else FluxTransformer2DModel
    transformer = transformer_class.from_pretrained(Path(base_folder) / "transformer")
    files = {}
    for name, seed in names_and_seeds.items():
        perturbed_transformer_lora(transformer, name, seed)
        files[name] = save_diffusers_lora(pipe_class, transformer, name, Path(out) / f"{name}.safetensors",
                                          component="transformer")
    return files
