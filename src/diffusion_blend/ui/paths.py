"""Adapter paths given to the UI must lie under the configured adapter folders."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from diffusion_blend.errors import DiffusionBlendError


def resolve_within(path: str | os.PathLike, roots: Sequence[str | os.PathLike]) -> Path:
    """``path`` resolved (symlinks followed); an error unless it is inside one of ``roots``."""
    resolved = Path(path).expanduser().resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).expanduser().resolve()):
            return resolved
    folders = ", ".join(str(Path(root)) for root in roots)
    raise DiffusionBlendError(f"{path} is outside the configured adapter folders ({folders})")
