"""Per-unit input/target caches for block reconstruction.

For unit k the inputs come from the partly quantized model (units before k already quantized,
later ones FP) and the targets are the FP unit's outputs on the FP model's own inputs, both over
the whole calibration set. Inputs are captured with forward pre-hooks that stop the forward pass
as soon as the unit is reached, so the rest of the model is not run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
from torch import Tensor, nn

from gaq.calib.units import Capture, StopForward, Unit
from gaq.data.datamodule import to_device
from gaq.errors import GaqError
from gaq.models.denoiser import predict_noise

log = logging.getLogger(__name__)

Placement = Literal["auto", "device", "host"]


@dataclass
class _Slot:
    """One captured argument: a tensor batched over samples (stored as ``batched``, handed out as
    ``dtype``), or a constant shared by all."""

    batched: Tensor | None = None
    const: Any = None
    dtype: torch.dtype | None = None


@dataclass
class UnitCache:
    """Inputs and FP targets of one unit for every calibration tuple.

    Attributes:
        args / kwargs: the unit's positional / keyword inputs; batched ones have leading dim N.
        target: FP output of the unit, shape ``(N, ...)``.
        step: sampling-step index of each tuple, ``(N,)``.
        device: where the batches are used (the training device).
        target_dtype: the dtype ``target`` is handed out in (it may be stored in a narrower one).
    """

    args: list[_Slot]
    kwargs: dict[str, _Slot]
    target: Tensor
    step: Tensor
    device: torch.device
    target_dtype: torch.dtype = torch.float32

    def __len__(self) -> int:
        return self.target.shape[0]

    @property
    def nbytes(self) -> int:
        return self.target.nbytes + sum(s.batched.nbytes for s in self._batched_slots())

    @property
    def placement(self) -> torch.device:
        """Where the cache is stored (the training device, or the host)."""
        return self.target.device

    def _batched_slots(self) -> list[_Slot]:
        return [s for s in self.args + list(self.kwargs.values()) if s.batched is not None]

    def place(self, where: torch.device | str) -> None:
        """Move the stored tensors to ``where`` (pinned when that is the host of a CUDA machine)."""
        where = torch.device(where)
        pin = where.type == "cpu" and torch.cuda.is_available()
        move = lambda v: v.to(where).pin_memory() if pin else v.to(where)  # noqa: E731
        for slot in self._batched_slots():
            slot.batched = move(slot.batched)
        self.target, self.step = move(self.target), self.step.to(where)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _take(self, slot: _Slot, idx: Tensor):
        if slot.batched is None:
            return slot.const
        return slot.batched[idx.to(slot.batched.device)].to(self.device, slot.dtype, non_blocking=True)

    def batch(self, idx: Tensor) -> tuple[tuple, dict, Tensor, Tensor]:
        """``(args, kwargs, target, step)`` of the tuples ``idx`` (global calibration-set indices), on ``device``."""
        args = tuple(self._take(s, idx) for s in self.args)
        kwargs = {k: self._take(s, idx) for k, s in self.kwargs.items()}
        target = self.target[idx.to(self.target.device)].to(self.device, self.target_dtype, non_blocking=True)
        return args, kwargs, target, self.step[idx.to(self.step.device)].to(self.device)


def capture_inputs(model: nn.Module, unit: Unit, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Capture:
    """The inputs ``unit`` receives when ``model`` denoises one batch (the rest of the model is skipped)."""
    store: list[Capture] = []
    handles = unit.install_capture(store, stop=True)
    try:
        predict_noise(model, x, t, cond)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if not store:
        raise RuntimeError(f"unit {unit.name} was not called by the model's forward pass")
    return store[0]


class _Filler:
    """Writes the batches of one captured argument into a tensor of all N tuples, allocated once on the
    first batch (no list of batches and no concatenation: the cache's peak is its own size)."""

    def __init__(self, first: Any, n: int, batch: int, where: torch.device, store_dtype: torch.dtype | None):
        self.batched = isinstance(first, Tensor) and first.ndim > 0 and first.shape[0] == batch
        if not self.batched:
            self.slot = _Slot(const=first)
            return
        dtype = store_dtype if store_dtype is not None and first.is_floating_point() else first.dtype
        self.slot = _Slot(batched=torch.empty((n, *first.shape[1:]), dtype=dtype, device=where), dtype=first.dtype)

    def write(self, value: Any, at: int, count: int, what: str) -> None:
        if not self.batched:
            return
        if not isinstance(value, Tensor) or value.shape[0] != count or value.shape[1:] != self.slot.batched.shape[1:]:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise GaqError(f"{what} changes shape between calibration batches ({got} against "
                           f"{tuple(self.slot.batched.shape[1:])} per tuple); it must be per-sample or constant")
        self.slot.batched[at:at + count].copy_(value, non_blocking=True)


@torch.no_grad()
def build_unit_cache(
    qmodel: nn.Module,
    qunit: Unit,
    fp_model: nn.Module,
    fp_unit: Unit,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    placement: Placement = "auto",
    store_dtype: torch.dtype | None = None,
) -> UnitCache:
    """Capture the quantized unit's inputs and the FP unit's targets over all calibration batches.

    Args:
        batches: dicts with ``x``, ``t``, ``step`` and ``cond`` covering the calibration set in index order.
        device: the training device (where ``qmodel`` and ``fp_model`` are).
        placement: ``device`` keeps the cache on the training device, ``host`` in (pinned) host memory;
            ``auto`` picks the device when the cache takes at most half of the free device memory.
        store_dtype: the dtype floating-point inputs and targets are stored in (e.g. ``torch.bfloat16``:
            half the memory); batches are handed out in the dtype they were captured in. None: as captured.
    """
    batches = list(batches)
    n = sum(int(b["step"].shape[0]) for b in batches)
    where: torch.device | None = None
    at = 0
    for b in batches:
        b = to_device(b, device)
        x, t, cond, count = b["x"], b["t"], b["cond"], int(b["step"].shape[0])
        cap = capture_inputs(qmodel, qunit, x, t, cond)
        fp_in = capture_inputs(fp_model, fp_unit, x, t, cond)
        target = fp_unit(*fp_in.args, **fp_in.kwargs).float()
        if where is None:  # decided on the first batch, so every batch goes straight to its place
            nbytes = _capture_bytes(cap, target) * n // count
            if store_dtype is not None:
                nbytes = nbytes * store_dtype.itemsize // 4
            where = _choose_placement(nbytes, device, placement)
            args = [_Filler(a, n, count, where, store_dtype) for a in cap.args]
            kwargs = {k: _Filler(v, n, count, where, store_dtype) for k, v in cap.kwargs.items()}
            targets = _Filler(target, n, count, where, store_dtype)
            steps = _Filler(b["step"], n, count, where, None)
        for i, (filler, value) in enumerate(zip(args, cap.args)):
            filler.write(value, at, count, f"unit {qunit.name}: input {i}")
        for k, filler in kwargs.items():
            filler.write(cap.kwargs[k], at, count, f"unit {qunit.name}: input {k!r}")
        targets.write(target, at, count, f"unit {qunit.name}: output")
        steps.write(b["step"], at, count, "the step index")
        at += count
    cache = UnitCache([f.slot for f in args], {k: f.slot for k, f in kwargs.items()}, targets.slot.batched,
                      steps.slot.batched, device)
    if where.type == "cpu" and torch.cuda.is_available():
        cache.place(where)  # pinned, for asynchronous copies to the device
    stored = "" if store_dtype is None else f" as {str(store_dtype).removeprefix('torch.')}"
    log.info("unit %s: cache of %d tuples, %.1f MiB%s, kept on %s", qunit.name, n, cache.nbytes / 2**20, stored,
             "the device" if where == device and device.type != "cpu" else "the host")
    return cache


def _capture_bytes(capture: Capture, target: Tensor) -> int:
    parts = list(capture.args) + list(capture.kwargs.values()) + [target]
    return sum(p.nbytes for p in parts if isinstance(p, Tensor))


def _choose_placement(nbytes: int, device: torch.device, placement: Placement) -> torch.device:
    if device.type != "cuda" or placement == "device":
        return device
    if placement == "host":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    return device if nbytes <= free // 2 else torch.device("cpu")
