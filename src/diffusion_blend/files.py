"""Output files: written atomically, with the user's normal permissions, no silent overwrite, tidy numbers.

Every file the library writes goes through :func:`atomic_write` (or :func:`write_text_atomic` /
:func:`write_json_atomic`): a temporary file in the same folder, flushed to disk, then renamed over the target with
``os.replace``, so a reader (or a rerun after a crash) sees the old file or the new one, never a partial one; a
failure (a full disk, a kill) leaves no temporary file behind where Python still runs. ``tempfile.mkstemp`` creates
files with mode 0600; a result file gets the mode any other program would give it, ``0o666 & ~umask``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from diffusion_blend.errors import DiffusionBlendError

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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``path`` for a writer that takes a file name (safetensors, matplotlib, PIL; keep
    ``suffix`` the format's extension where the writer reads it). On a clean exit the file is fsynced, given the
    user's file mode and renamed onto ``path``; on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        give_user_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing (``mode`` ``"w"`` or ``"wb"``); it replaces ``path`` on a
    clean exit and is removed on any error (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
        yield handle


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``path.write_text(text)``, atomically (:func:`atomic_write`)."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, value: Any, **dump_options: Any) -> Path:
    """``json.dump(value)`` into ``path``, atomically; ``dump_options`` go to ``json.dump`` (default indent 1)."""
    dump_options.setdefault("indent", 1)
    with atomic_write(path, "w") as handle:
        json.dump(value, handle, **dump_options)
    return Path(path)


def copy_atomic(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """``shutil.copyfile(source, target)``, atomically (:func:`atomic_path`)."""
    import shutil

    with atomic_path(target) as temporary:
        shutil.copyfile(source, temporary)
    return Path(target)
