"""Layer 7: diffusers integration. Diffusion Blend pipelines for the Stable Diffusion family."""

from ..quiet import install_log_filters

install_log_filters()  # before diffusers is imported: its import logs a known-harmless transformers notice

from .loading import is_sdxl_folder, load_adapter, load_adapters, load_base_pipeline
from .stable_diffusion import BlendPipelineMixin, BlendStableDiffusionPipeline, BlendStableDiffusionXLPipeline
from .unet_blend import UNetBlend, blended_unet

__all__ = [
    "BlendPipelineMixin",
    "BlendStableDiffusionPipeline",
    "BlendStableDiffusionXLPipeline",
    "UNetBlend",
    "blended_unet",
    "is_sdxl_folder",
    "load_adapter",
    "load_adapters",
    "load_base_pipeline",
]
