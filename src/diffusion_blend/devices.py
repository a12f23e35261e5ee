"""Device and dtype choice for the Stable Diffusion commands (``--device auto --dtype auto``).

``auto`` picks CUDA when torch sees a GPU (as ``dblend finetune`` does through accelerate) and half precision
there (float16: what SD 1.5 / SDXL checkpoints are published and run in), else the CPU in float32. An explicit
device that this machine does not have is bad input: one line, exit status 2.
"""

from __future__ import annotations

from diffusion_blend.errors import DiffusionBlendError

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
ROUTINGS = ("auto", "batched", "sequential")
"""How a LoRA family evaluates its members (:func:`diffusion_blend.denoisers.check_routing`); here, not in
``denoisers``, so that registering ``dblend sample`` imports no torch."""


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    """``(device, dtype name)`` with ``auto`` resolved; raises :class:`DiffusionBlendError` for an unusable device."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise DiffusionBlendError(f"--device {device!r} is not a torch device (try auto, cpu or cuda)") from None
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DiffusionBlendError(f"--device {device}: CUDA is not available on this machine (torch "
                                      f"{torch.__version__}); use --device cpu or auto")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise DiffusionBlendError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif kind == "mps":
        if not torch.backends.mps.is_available():
            raise DiffusionBlendError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif kind != "cpu":
        raise DiffusionBlendError(f"--device {device!r}: only cpu, cuda and mps are supported")
    if dtype == "auto":
        dtype = "float16" if kind == "cuda" else "float32"
    if dtype not in DTYPE_CHOICES[1:]:
        raise DiffusionBlendError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    return device, dtype
