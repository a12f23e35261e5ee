"""Tiny Stable Diffusion 3 and FLUX pipelines built from configs (diffusers' own test pattern), fully offline.

The CLIP tokenizer is tests/tiny_sd.py's byte-level one; FLUX's T5 tokenizer is a ``tokenizers`` Unigram model
over the same byte symbols, wrapped in ``T5TokenizerFast``; the T5 encoder is a 1-layer ``T5EncoderModel``
built from config. SD3 runs without its T5 encoder (``text_encoder_3=None``), as diffusers allows.
LoRA adapters get non-zero ``lora_A``/``lora_B`` (the default init would make every adapter equal the base).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tiny_sd import _text_config, make_tokenizer, perturbed_lora, save_diffusers_lora
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

# the projections diffusers' SD3/FLUX LoRA scripts (and Flow-GRPO) train
TRANSFORMER_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


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


def _vae() -> AutoencoderKL:
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
        vae=_vae(),
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
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(projection_dim=32)),
        text_encoder_2=t5,
        tokenizer=make_tokenizer(Path(folder) / "_tokenizer_src"),
        tokenizer_2=make_t5_tokenizer(Path(folder) / "_t5_tokenizer_src"),
    )


def perturbed_transformer_lora(transformer: torch.nn.Module, name: str, seed: int) -> None:
    """A random, non-zero LoRA on the projections diffusers' SD3/FLUX LoRA scripts train."""
    perturbed_lora(transformer, name, seed, target_modules=TRANSFORMER_PROJECTIONS)


def write_transformer_adapters(pipe_class, base_folder: Path, out: Path, names_and_seeds: dict[str, int]) -> dict[str, Path]:
    """Load the saved base transformer, give it one perturbed LoRA per name, save each as a diffusers LoRA file."""
    transformer_class = SD3Transformer2DModel if pipe_class is StableDiffusion3Pipeline else FluxTransformer2DModel
    transformer = transformer_class.from_pretrained(Path(base_folder) / "transformer")
    files = {}
    for name, seed in names_and_seeds.items():
        perturbed_transformer_lora(transformer, name, seed)
        files[name] = save_diffusers_lora(pipe_class, transformer, name, Path(out) / f"{name}.safetensors",
                                          component="transformer")
    return files
