"""Where a result came from: the gaq commit and the device, recorded next to every number gaq writes."""
from __future__ import annotations

import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """Short commit hash of the gaq checkout, with ``+dirty`` when tracked gaq files differ from it,
    or ``unknown``."""
    here = Path(__file__).parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                             timeout=5)
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, cwd=here, timeout=5)
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    """GPU name, or the device type (``cpu``)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def json_digest(obj, length: int | None = 16) -> str:
    """The sha256 of ``obj`` as canonical JSON (sorted keys, non-JSON values as ``str``), its first ``length``
    hex digits (None: all 64): the one identity hash of configs, run records and cache keys."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    return digest if length is None else digest[:length]
