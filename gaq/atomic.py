"""Atomic file writes: every file gaq keeps (checkpoints, calibration sets, exports, caches) is written
to a temporary name in the same folder and renamed, so a kill never leaves half a file behind."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``.

    The temporary name carries the process id, so processes writing the same file (DDP ranks,
    parallel runs sharing a cache) do not clobber each other's half-written file; it is removed if
    ``write`` fails. The file gets the mode the user's umask gives a new file (some writers, such as
    safetensors, create theirs private, 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def apply_umask(folder: str | os.PathLike) -> None:
    """Give every file under ``folder`` the mode the user's umask gives a new file (diffusers' ``save_pretrained``
    writes its safetensors private, 0600)."""
    mode = 0o666 & ~_umask()
    for f in Path(folder).rglob("*"):
        if f.is_file():
            os.chmod(f, mode)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it: set, then restore
    os.umask(mask)
    return mask


def check_writable_folder(path: str | os.PathLike, what: str) -> None:
    """Raise :class:`gaq.errors.GaqError` (one line) unless ``path`` is, or can be created as, a writable
    folder; called before any work so that nothing computed is lost to an unwritable output location."""
    from gaq.errors import check

    path = Path(path)
    check(not path.exists() or path.is_dir(), f"{what} {path} is a file, not a folder: choose a folder path")
    existing = next(p for p in (path, *path.parents) if p.exists())
    check(existing.is_dir() and os.access(existing, os.W_OK | os.X_OK),
          f"{what} {path} is not writable ({existing} is read-only for this user): choose a writable location")
