"""Layer 7: diffusers integration. Diffusion Blend pipelines for Stable Diffusion (1.x/2.x, XL, 3/3.5) and FLUX."""

from ..quiet import install_log_filters

install_log_filters()  # before diffusers is imported: its import logs a known-harmless transformers notice

from .flow import BlendFluxPipeline, BlendStableDiffusion3Pipeline, BlendTransformerPipelineMixin  # noqa: E402
from .loading import is_sdxl_folder, load_adapter, load_adapters, load_base_pipeline
from .stable_diffusion import BlendPipelineMixin, BlendStableDiffusionPipeline, BlendStableDiffusionXLPipeline
from .unet_blend import DenoiserBlend, UNetBlend, blended_denoiser, blended_unet

__all__ = [
    "BlendFluxPipeline",
    "BlendPipelineMixin",
    "BlendStableDiffusion3Pipeline",
    "BlendStableDiffusionPipeline",
    "BlendStableDiffusionXLPipeline",
    "BlendTransformerPipelineMixin",
    "DenoiserBlend",
    "UNetBlend",
    "blended_denoiser",
    "blended_unet",
    "is_sdxl_folder",
    "load_adapter",
    "load_adapters",
    "load_base_pipeline",
]
