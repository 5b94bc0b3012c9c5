"""Run-folder bookkeeping: atomic per-unit checkpoints, the run's config record, atomic Lightning checkpoints.

A run folder holds ``run.json`` (what the run was configured with), ``units/NNN-<unit>.safetensors``
(the tuned quantizer state of every finished unit, written to a temporary name and renamed) and
``lightning/<unit>/last.ckpt`` (the resumable state of the unit in progress). A rerun of the same
command loads finished units, resumes the unit in progress and refuses a folder written under a
different configuration.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gaq.atomic import atomic_write
from gaq.provenance import json_digest
from gaq.errors import GaqError


def atomic_write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed, so a kill never leaves half a file,
    and read back with ``weights_only=True`` whatever the environment says (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    cannot turn unpickling of arbitrary objects back on)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp, storage_options))

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict:
        import torch

        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def readable_checkpoint(path: Path) -> bool:
    """Whether the Lightning checkpoint ``path`` loads (``weights_only``); a truncated, empty or corrupt one
    does not."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure to read means: recompute the unit
        return False


class RunLock:
    """An advisory lock on a run folder (``<run>/.lock``, ``fcntl.flock``): a second process that would write
    the same run folder is refused in one line naming the holder. The operating system releases the lock
    when its process ends, ``kill -9`` included, so an interrupted run resumes without cleanup."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._file = None
        self._created = False

    def acquire(self) -> "RunLock":
        import os
        import socket

        try:
            import fcntl
        except ImportError:  # no flock (Windows): no lock
            return self
        self._created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise GaqError(f"run folder {self.path.parent} is in use by {holder}; wait for it to finish or use "
                           "another --run_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Release the lock; a run folder this lock created and nothing else wrote into is removed again."""
        if self._file is None:
            return
        self._file.close()  # closing the descriptor releases the flock
        self._file = None
        folder = self.path.parent
        if self._created and [p.name for p in folder.iterdir()] == [self.path.name]:
            self.path.unlink()
            folder.rmdir()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def config_digest(record: dict) -> str:
    return json_digest(record)


def check_run_record(run_dir: Path, record: dict) -> None:
    """Write ``run.json`` for a new run, or refuse a folder written under a different config."""
    path = run_dir / "run.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise GaqError(f"{path} is corrupt: if this is the command that made the run, delete that one file and "
                           f"rerun to resume from the finished units; otherwise use another --run_dir") from None
        if old.get("digest") != config_digest(record):
            diff = sorted(k for k in set(old.get("config", {})) | set(record)
                          if old.get("config", {}).get(k) != record.get(k))
            raise GaqError(f"run folder {run_dir} was written with a different config (differs in: "
                           f"{', '.join(diff) or 'content'}); use another --run_dir or delete that folder")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"digest": config_digest(record), "config": record})


def unit_file(run_dir: Path, k: int, name: str) -> Path:
    return run_dir / "units" / f"{k:03d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.safetensors"


def save_unit_state(path: Path, layers: list[tuple[str, nn.Module]]) -> None:
    """Save the state of a unit's quantized layers (rounding logits, ranges) atomically."""
    tensors = {f"{lname}.{k}": v.detach().cpu().contiguous() for lname, layer in layers
               for k, v in layer.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def load_unit_state(path: Path, layers: list[tuple[str, nn.Module]]) -> None:
    """Load a finished unit's layer states; a corrupt or mismatched file gets one clear error."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise GaqError(f"unit checkpoint {path} is unreadable ({err}); delete it to recompute that unit") from None
    for lname, layer in layers:
        prefix = f"{lname}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            layer.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            raise GaqError(f"unit checkpoint {path} does not match layer {lname} ({first}); "
                           "delete it to recompute that unit") from None



class UnitCheckpoint(Callback):
    """Writes the unit's resumable ``last.ckpt`` into ``dirpath`` when the reconstruction module says
    one is due (``pl_module.checkpoint_due``: the Lightning step crossed a multiple of
    ``recon.ckpt_every`` iterations). Counting iterations, not Lightning's optimizer steps, keeps the
    schedule the same whatever ``iters_per_step`` and the meta phase add. Every rank calls
    ``Trainer.save_checkpoint`` (it is collective); rank 0 writes, atomically through the trainer's
    checkpoint IO.
    """

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if getattr(pl_module, "checkpoint_due", False):
            trainer.save_checkpoint(self.last_path)
