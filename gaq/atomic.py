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
    ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
