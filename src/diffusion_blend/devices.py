"""Device and dtype choice for the Stable Diffusion commands (``--device auto --dtype auto``).

``auto`` picks CUDA when torch sees a GPU (as ``dblend finetune`` does through accelerate) and half precision
there (float16: what SD 1.5 / SDXL checkpoints are published and run in), else the CPU in float32. An explicit
device that this machine does not have is bad input: one line, exit status 2.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

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


MALLOC_MMAP_THRESHOLD = 128 * 1024
"""``dblend finetune``'s glibc mmap threshold on CPU (bytes): glibc's own starting value, fixed."""
MALLOC_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
"""glibc's ceiling for ``M_MMAP_THRESHOLD`` on 64-bit systems (``mallopt`` refuses more)."""
_M_MMAP_THRESHOLD = -3  # <malloc.h>


def fix_malloc_mmap_threshold(threshold: int = MALLOC_MMAP_THRESHOLD, apply: bool = True) -> str:
    """Fix glibc's mmap threshold of this process at ``threshold`` bytes (``mallopt(M_MMAP_THRESHOLD)``); returns
    what holds now, for the run's log.

    glibc's threshold is dynamic by default: freeing a memory-mapped block raises it to that block's size (up to
    32 MiB), after which blocks of that size come from the heap, and the heap keeps what it was given. A CPU trainer
    that allocates and frees activations of a few MiB per sampler step (the pathwise chain recomputed in the
    backward pass) then grows its resident memory with the number of steps, not with its live tensors
    (benchmarks/README.md: 16 / 4 steps 1.34x with the dynamic threshold through ``dblend finetune``). A fixed
    threshold (which also stops the dynamic adjustment) maps every larger block and returns it when freed.
    ``0`` keeps glibc's default; a ``MALLOC_MMAP_THRESHOLD_`` in the environment (read by glibc at start) is left
    as it is; elsewhere than glibc Linux, or with ``apply=False`` (a GPU run), nothing is done but the check.
    """
    if threshold < 0 or threshold > MALLOC_MMAP_THRESHOLD_MAX:
        raise DiffusionBlendError(f"--malloc-mmap-threshold must be between 0 and {MALLOC_MMAP_THRESHOLD_MAX} bytes "
                                  f"(glibc's ceiling), got {threshold}")
    if not apply:
        return "not applied (not a CPU run)"
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} (environment)"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "not glibc: allocator unchanged"
    if threshold == 0:
        return "glibc default (dynamic)"
    try:
        done = ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold))
    except (OSError, AttributeError):
        done = 0
    return f"{threshold} (fixed)" if done == 1 else "glibc default (dynamic): mallopt refused"
