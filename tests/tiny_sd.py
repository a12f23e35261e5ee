"""Tiny SD / SDXL pipelines for the tests: built by :mod:`diffusion_blend.tiny` (kept importable here for the tests)."""

from diffusion_blend.tiny import (  # noqa: F401 - re-exported for the tests
    ATTENTION_PROJECTIONS,
    EXAMPLE_ADAPTERS,
    _scheduler,
    _text_config,
    _vae,
    make_tokenizer,
    perturbed_lora,
    save_diffusers_lora,
    save_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    write_adapters,
    write_tiny_base,
)
