"""Output files of the commands: the user's normal permissions, no silent overwrite, tidy numbers.

``tempfile.mkstemp`` (used for atomic writes: write a temporary file, then ``os.replace``) creates files with mode
0600; a result file should have the mode any other program would give it, ``0o666 & ~umask``.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

from .errors import DiffusionBlendError

_UMASK: int | None = None


def user_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open(path, "w")`` gives a new file."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)  # reading the umask means setting it; put it back at once
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def give_user_mode(path: str | os.PathLike) -> None:
    """chmod a file created by ``tempfile.mkstemp`` (mode 0600) to the user's normal mode before it is published."""
    os.chmod(path, user_file_mode())


def refuse_existing_results(out: str | os.PathLike, patterns: list[str], overwrite: bool) -> None:
    """Refuse an ``--out`` folder that holds results of an earlier run (files matching ``patterns``), unless
    ``overwrite``: then those files are removed first, so no stale result of the earlier run stays behind."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiffusionBlendError(f"--out {out} exists and is not a folder")
    found = sorted({path for pattern in patterns for path in glob.glob(str(out / pattern))})
    if not found:
        return
    if not overwrite:
        shown = ", ".join(Path(path).name for path in found[:3]) + (", ..." if len(found) > 3 else "")
        raise DiffusionBlendError(f"--out {out} already holds results ({shown}); pass --overwrite to replace them "
                                  "or choose another folder")
    import shutil

    for path in found:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def rounded(value: Any, digits: int = 12) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (``-0.19999999999999996`` -> ``-0.2``):
    the float noise of the arithmetic, not information, goes (recurses into dicts, lists and tuples)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item, digits) for item in value]
    return value
