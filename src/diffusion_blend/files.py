"""Output files: written atomically, with the user's normal permissions, no silent overwrite, tidy numbers.

Every file the library writes goes through :func:`atomic_write` (or :func:`write_text_atomic` /
:func:`write_json_atomic`): a temporary file in the same folder, flushed to disk, then renamed over the target with
``os.replace``, so a reader (or a rerun after a crash) sees the old file or the new one, never a partial one; a
failure (a full disk, an exception) leaves no temporary file behind where Python still runs. A process killed
outright (SIGKILL, power loss) can leave its temporary file, named ``.NAME.partial-XXXXXXXX...``: it is never read,
and the next run in that folder removes it (:func:`remove_partial_files`). A full disk is one line
(:class:`DiskFullError`, exit status 2 in the CLI), the file being written is left as it was.
``tempfile.mkstemp`` creates files with mode 0600; a result file gets the mode any other program would give it,
``0o666 & ~umask``.

Test hook: with ``DBLEND_KILL_AT_WRITE=N[:GLOB]`` in the environment, the process SIGKILLs itself during its N-th
atomic write (of a file whose name matches ``GLOB``), after half of the temporary file is written: the moment a
crash while saving leaves the most behind (``tests/test_kill_resume.py``).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from diffusion_blend.errors import DiffusionBlendError

_UMASK: int | None = None
PARTIAL = ".partial-"
"""What names a temporary file (or folder) of an atomic write: ``.NAME.partial-XXXXXXXX[.tmp]``."""
KILL_HOOK = "DBLEND_KILL_AT_WRITE"
_WRITES = 0  # atomic writes matching the kill hook's pattern so far (the hook's counter)
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(DiffusionBlendError):
    """No space left (or the quota is spent) while writing a result: the file being written is left as it was."""


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the device is full: an ``OSError`` with ``ENOSPC`` / ``EDQUOT``, or a writer that wraps
    the system's error in its own (safetensors' ``SafetensorError`` quotes ``code: 28``)."""
    if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
        return True
    text = str(err)
    return "No space left on device" in text or "Disk quota exceeded" in text or "StorageFull" in text


def disk_full_error(path: str | os.PathLike) -> DiskFullError:
    """The one line for a full disk while writing ``path``."""
    return DiskFullError(f"no space left on the device to write {path} (nothing half-written is left; earlier "
                         "results are intact): free some space and run the command again")


def _umask() -> int:
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)  # reading the umask means setting it; put it back at once
        os.umask(_UMASK)
    return _UMASK


def user_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open(path, "w")`` gives a new file."""
    return 0o666 & ~_umask()


def give_user_mode(path: str | os.PathLike) -> None:
    """chmod a file created by ``tempfile.mkstemp`` (mode 0600) to the user's normal mode before it is published."""
    os.chmod(path, user_file_mode())


def refuse_existing_results(out: str | os.PathLike, patterns: list[str], overwrite: bool) -> None:
    """Refuse an ``--out`` folder that holds results of an earlier run (files matching ``patterns``), unless
    ``overwrite``: then those files are removed first, so no stale result of the earlier run stays behind. Temporary
    files a killed run left there are removed when the run goes ahead (:func:`remove_partial_files`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DiffusionBlendError(f"--out {out} exists and is not a folder")
    found = sorted({path for pattern in patterns for path in glob.glob(str(out / pattern))})
    if not found:
        remove_partial_files(out, recursive=False)
        return
    if not overwrite:
        shown = ", ".join(Path(path).name for path in found[:3]) + (", ..." if len(found) > 3 else "")
        raise DiffusionBlendError(f"--out {out} already holds results ({shown}); pass --overwrite to replace them "
                                  "or choose another folder")
    for path in found:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    remove_partial_files(out, recursive=False)


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
    user's file mode and renamed onto ``path``; on any error it is removed, and a full disk becomes a
    :class:`DiskFullError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{PARTIAL}", suffix=suffix)
    except OSError as err:
        raise (disk_full_error(path) if is_disk_full(err) else err) from None
    os.close(fd)
    try:
        yield Path(tmp)
        _kill_hook(path, Path(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        give_user_mode(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, Exception) and not isinstance(err, DiffusionBlendError) and is_disk_full(err):
            raise disk_full_error(path) from None
        raise


def _kill_hook(path: Path, tmp: Path) -> None:
    """The ``DBLEND_KILL_AT_WRITE`` test hook (module docstring): SIGKILL this process with ``tmp`` half written."""
    spec = os.environ.get(KILL_HOOK)
    if not spec:
        return
    count, _, pattern = spec.partition(":")
    if not fnmatch.fnmatch(path.name, pattern or "*"):
        return
    global _WRITES
    _WRITES += 1
    if _WRITES == int(count):
        size = tmp.stat().st_size
        os.truncate(tmp, size // 2)  # what a kill in the middle of the write leaves
        os.kill(os.getpid(), signal.SIGKILL)


def remove_partial_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove the temporary files and folders that killed runs left in ``folder`` (and its subfolders, when
    ``recursive``; names holding ``.partial-``, :func:`atomic_path`); returns what was removed. Call it before a run
    starts writing there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".*{PARTIAL}*"
    found = sorted(path for path in (folder.rglob(pattern) if recursive else folder.glob(pattern))
                   if path.name.startswith(".") and path.exists())
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()
    return found


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to ``path`` to fill; on a clean exit it is renamed onto ``path`` (an existing folder
    there is moved aside first and removed after), on any error it is removed (a full disk becomes a
    :class:`DiskFullError`): a reader sees a whole folder, never a half-written one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{PARTIAL}"))
    except OSError as err:
        raise (disk_full_error(path) if is_disk_full(err) else err) from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir gives
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{PARTIAL}old-"))
            os.replace(path, old / path.name)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and not isinstance(err, DiffusionBlendError) and is_disk_full(err):
            raise disk_full_error(path) from None
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
    with atomic_path(target) as temporary:
        shutil.copyfile(source, temporary)
    return Path(target)
