"""Prompt files: one prompt per line, or a JSON list (training prompts, evaluation prompts)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffusion_blend.errors import DiffusionBlendError


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Training prompts from a file: a JSON list of strings, or one prompt per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DiffusionBlendError(f"prompts file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DiffusionBlendError(f"cannot read prompts file {path} ({err})") from None
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise DiffusionBlendError(f"prompts file {path} looks like JSON but does not parse ({err})") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise DiffusionBlendError(f"prompts file {path}: the JSON list must hold non-empty strings only")
        prompts = [p.strip() for p in prompts]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DiffusionBlendError(f"prompts file {path} holds no prompt")
    return prompts
