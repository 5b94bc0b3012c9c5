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
from gaq.models.denoiser import predict_noise

log = logging.getLogger(__name__)

Placement = Literal["auto", "device", "host"]


@dataclass
class _Slot:
    """One captured argument: a tensor batched over samples, or a constant shared by all."""

    batched: Tensor | None = None
    const: Any = None


def _slot_list(parts: list[Any], n: int) -> _Slot:
    first = parts[0]
    if isinstance(first, Tensor) and first.ndim > 0 and sum(p.shape[0] for p in parts) == n:
        return _Slot(batched=torch.cat(parts))
    return _Slot(const=first)


@dataclass
class UnitCache:
    """Inputs and FP targets of one unit for every calibration tuple.

    Attributes:
        args / kwargs: the unit's positional / keyword inputs; batched ones have leading dim N.
        target: FP output of the unit, shape ``(N, ...)``.
        step: sampling-step index of each tuple, ``(N,)``.
        device: where the batches are used (the training device).
    """

    args: list[_Slot]
    kwargs: dict[str, _Slot]
    target: Tensor
    step: Tensor
    device: torch.device

    def __len__(self) -> int:
        return self.target.shape[0]

    @property
    def nbytes(self) -> int:
        slots = self.args + list(self.kwargs.values())
        return self.target.nbytes + sum(s.batched.nbytes for s in slots if s.batched is not None)

    def _take(self, slot: _Slot, idx: Tensor):
        if slot.batched is None:
            return slot.const
        return slot.batched[idx.to(slot.batched.device)].to(self.device, non_blocking=True)

    def batch(self, idx: Tensor) -> tuple[tuple, dict, Tensor, Tensor]:
        """``(args, kwargs, target, step)`` of the tuples ``idx`` (global calibration-set indices), on ``device``."""
        args = tuple(self._take(s, idx) for s in self.args)
        kwargs = {k: self._take(s, idx) for k, s in self.kwargs.items()}
        target = self.target[idx.to(self.target.device)].to(self.device, non_blocking=True)
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


def _stack(captures: list[Capture], n: int) -> tuple[list[_Slot], dict[str, _Slot]]:
    args = [_slot_list([c.args[i] for c in captures], n) for i in range(len(captures[0].args))]
    kwargs = {k: _slot_list([c.kwargs[k] for c in captures], n) for k in captures[0].kwargs}
    return args, kwargs


@torch.no_grad()
def build_unit_cache(
    qmodel: nn.Module,
    qunit: Unit,
    fp_model: nn.Module,
    fp_unit: Unit,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    placement: Placement = "auto",
) -> UnitCache:
    """Capture the quantized unit's inputs and the FP unit's targets over all calibration batches.

    Args:
        batches: dicts with ``x``, ``t``, ``step`` and ``cond`` covering the calibration set in index order.
        device: the training device (where ``qmodel`` and ``fp_model`` are).
        placement: ``device`` keeps the cache on the training device, ``host`` in (pinned) host memory;
            ``auto`` picks the device when the cache takes at most half of the free device memory.
    """
    q_caps, targets, steps = [], [], []
    where: torch.device | None = None
    batches = list(batches)
    for b in batches:
        b = to_device(b, device)
        x, t, cond = b["x"], b["t"], b["cond"]
        cap = capture_inputs(qmodel, qunit, x, t, cond)
        fp_in = capture_inputs(fp_model, fp_unit, x, t, cond)
        target = fp_unit(*fp_in.args, **fp_in.kwargs).float()
        if where is None:  # decided on the first batch, so the rest goes straight to its place
            where = _choose_placement(_capture_bytes(cap, target) * len(batches), device, placement)
        q_caps.append(_to(cap, where))
        targets.append(target.to(where))
        steps.append(b["step"].to(where))
    n = sum(s.shape[0] for s in steps)
    args, kwargs = _stack(q_caps, n)
    cache = UnitCache(args, kwargs, torch.cat(targets), torch.cat(steps), device)
    if where is not None and where.type == "cpu" and torch.cuda.is_available():
        for slot in cache.args + list(cache.kwargs.values()):
            if slot.batched is not None:
                slot.batched = slot.batched.pin_memory()
        cache.target = cache.target.pin_memory()
    log.info("unit %s: cache of %d tuples, %.1f MiB, kept on %s", qunit.name, n, cache.nbytes / 2**20,
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


def _to(capture: Capture, where: torch.device) -> Capture:
    move = lambda v: v.to(where) if isinstance(v, Tensor) else v  # noqa: E731
    return Capture(tuple(move(a) for a in capture.args), {k: move(v) for k, v in capture.kwargs.items()})
