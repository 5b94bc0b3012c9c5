"""Where a result came from: the gaq commit and the device, recorded next to every number gaq writes."""
from __future__ import annotations

import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """Short commit hash of the gaq checkout, or ``unknown``."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    """GPU name, or the device type (``cpu``)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
