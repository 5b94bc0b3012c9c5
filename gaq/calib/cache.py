"""Per-unit input/target caches for block reconstruction.

For unit k the inputs come from the partly quantized model (units before k already quantized,
later ones FP) and the targets are the FP unit's outputs on the FP model's own inputs, both over
the whole calibration set. Inputs are captured with forward pre-hooks that stop the forward pass
as soon as the unit is reached, so the rest of the model is not run.

A cache is kept on the training device, in (pinned) host memory, or on disk: a safetensors file written
while the cache is filled and read back memory-mapped, so that a batch reads only its samples' rows, with
the reconstruction's batches (known ahead: their order is seeded) read by a background thread into pinned
buffers while the current step runs.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import queue
import re
import shutil
import struct
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import safetensors

import torch
from torch import Tensor, nn

from gaq.calib.units import Capture, StopForward, Unit
from gaq.data.datamodule import to_device
from gaq.errors import GaqError, check
from gaq.models.denoiser import predict_noise

log = logging.getLogger(__name__)

Placement = Literal["auto", "device", "host", "disk"]


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
        file: the safetensors file a disk-placed cache is read from (memory-mapped), else None.
    """

    args: list[_Slot]
    kwargs: dict[str, _Slot]
    target: Tensor
    step: Tensor
    device: torch.device
    target_dtype: torch.dtype = torch.float32
    file: Path | None = None
    _reads: "_ReadState | None" = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.target.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._sources())

    @property
    def placement(self) -> torch.device:
        """Where the cache is stored (the training device, or the host; a disk cache is mapped into the host)."""
        return self.target.device

    @property
    def on_disk(self) -> bool:
        return self.file is not None

    def _batched_slots(self) -> list[_Slot]:
        return [s for s in self.args + list(self.kwargs.values()) if s.batched is not None]

    def _sources(self) -> list[Tensor]:
        """The stored per-tuple tensors, in the order :func:`_gather_rows` returns their rows."""
        return [s.batched for s in self._batched_slots()] + [self.target]

    def place(self, where: torch.device | str) -> None:
        """Move the stored tensors to ``where`` (pinned when that is the host of a CUDA machine)."""
        where = torch.device(where)
        pin = where.type == "cpu" and torch.cuda.is_available()
        move = lambda v: v.to(where).pin_memory() if pin else v.to(where)  # noqa: E731
        for slot in self._batched_slots():
            slot.batched = move(slot.batched)
        self.target, self.step = move(self.target), self.step.to(where)
        if self.file is None:  # a cache in host memory reads ahead like a disk cache; one on the device needs not
            if self._reads is not None:
                self._reads.stop_reader()
            self._reads = _ReadState(None) if where != self.device else None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def read_ahead(self, plan: Iterator[Tensor], depth: int) -> None:
        """Read the batches ``plan`` yields (global indices, in the order :meth:`batch` will ask for them) in a
        background thread, up to ``depth`` ahead, into pinned host buffers. Only a cache off the training
        device (host or disk) reads ahead (a no-op otherwise); a :meth:`batch` call for other indices is
        gathered directly, so the numbers never depend on the plan."""
        if self._reads is None:
            return
        self._reads.stop_reader()
        self._reads.reader = _ReadAhead(self._sources(), plan, depth, pin=torch.cuda.is_available())

    @property
    def read_stats(self) -> dict[str, int]:
        """``{"read_ahead": batches served by the read-ahead, "direct": batches gathered on the spot}``."""
        return {"read_ahead": self._reads.hits, "direct": self._reads.misses} if self._reads is not None else {}

    def close(self) -> None:
        """Stop the read-ahead and remove the cache's file (its mapping stays readable until the cache is freed)."""
        if self._reads is not None:
            self._reads.close()

    @property
    def off_device(self) -> bool:
        """Whether the cache lives off the training device (host memory or disk), so that batches are copied over."""
        return self._reads is not None

    def window(self, resident: Tensor | None, batch: int) -> "DeviceWindow | UnitCache":
        """What the reconstruction gathers its batches from: the cache itself when it is on the training device,
        else a :class:`DeviceWindow` that holds the tuples ``resident`` (GAC's validation tuples) and one batch of
        up to ``batch`` others on the device."""
        return DeviceWindow(self, resident, batch) if self.off_device else self

    def stage(self, idx: Tensor) -> None:
        """Nothing to do: a cache on the training device serves every batch directly (see :class:`DeviceWindow`)."""

    def rows(self, idx: Tensor) -> list[Tensor]:
        """The stored rows of ``idx`` (global indices), in :meth:`_sources` order, where the cache keeps them:
        the read-ahead's pinned buffers when ``idx`` is its next planned batch, else gathered on the spot."""
        rows = self._reads.take(idx) if self._reads is not None else None
        return rows if rows is not None else _gather_rows(self._sources(), idx)

    def assemble(self, rows: list[Tensor], step: Tensor) -> tuple[tuple, dict, Tensor, Tensor]:
        """``(args, kwargs, target, step)`` on ``device`` from stored rows in :meth:`_sources` order."""
        rows = iter(rows)
        take = lambda slot: slot.const if slot.batched is None else next(rows).to(  # noqa: E731
            self.device, slot.dtype, non_blocking=True)
        args = tuple(take(s) for s in self.args)
        kwargs = {k: take(s) for k, s in self.kwargs.items()}
        target = next(rows).to(self.device, self.target_dtype, non_blocking=True)
        return args, kwargs, target, step.to(self.device)

    def batch(self, idx: Tensor) -> tuple[tuple, dict, Tensor, Tensor]:
        """``(args, kwargs, target, step)`` of the tuples ``idx`` (global calibration-set indices), on ``device``."""
        return self.assemble(self.rows(idx), self.step[idx.to(self.step.device)])


class DeviceWindow:
    """The rows of a host or disk cache that the reconstruction is using, copied to the training device.

    A batch is gathered from device tensors only (``slot_of[idx]`` into the window's rows), so one iteration
    or meta step replays as a CUDA graph as with a cache on the device. Two kinds of rows:

    - *resident*: copied once when the window is made (GAC's validation tuples, which every meta step reads:
      5% of the set);
    - *staged*: up to ``batch`` rows rewritten before each step by :meth:`stage` (the iteration's or meta
      step's training batch). The next planned batch (the cache's read-ahead, pinned host buffers) is copied
      to a landing buffer on a side stream while the current step runs, and moved into place with a
      device-to-device copy, so the host-to-device transfer overlaps the compute.

    ``stage(idx)`` must precede every CUDA-graph replay that reads ``idx``: the rows of a batch staged earlier
    are overwritten by the next one (an eager :meth:`batch` of tuples not in the window reads the cache).
    """

    def __init__(self, cache: UnitCache, resident: Tensor | None, batch: int):
        self.cache, self.device = cache, cache.device
        sources = cache._sources() + [cache.step]
        resident = torch.empty(0, dtype=torch.long) if resident is None else resident.long().cpu()
        self._base, self.capacity = int(len(resident)), int(batch)
        size = self._base + self.capacity
        self.rows = [torch.empty((size, *src.shape[1:]), dtype=src.dtype, device=self.device) for src in sources]
        self.slot_of = torch.zeros(len(cache), dtype=torch.long, device=self.device)
        self._resident = torch.zeros(len(cache), dtype=torch.bool)
        self._resident[resident] = True
        self._slots = torch.arange(self._base, size, device=self.device)
        for s in range(0, len(resident), max(1, batch)):  # the resident rows, one batch at a time
            chunk = resident[s:s + max(1, batch)]
            self._write(self._gather(chunk), s)
            self.slot_of[chunk.to(self.device)] = torch.arange(s, s + len(chunk), device=self.device)
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._landing: list[Tensor] | None = None
        self._landed: Tensor | None = None  # the host indices whose rows the landing buffer holds
        self._landed_event = torch.cuda.Event() if cuda else None
        self.landed_hits = 0
        self._staged = torch.empty(0, dtype=torch.long)  # the host indices of the rows staged last

    def _gather(self, idx: Tensor) -> list[Tensor]:
        return self.cache.rows(idx) + [self.cache.step[idx.to(self.cache.step.device)]]

    def _write(self, rows: list[Tensor], at: int) -> None:
        for dst, src in zip(self.rows, rows):
            dst[at:at + src.shape[0]].copy_(src, non_blocking=True)

    def stage(self, idx: Tensor) -> None:
        """Copy the rows of ``idx`` (global indices; the resident ones are skipped) into the window."""
        idx = idx.cpu()
        fresh = idx[~self._resident[idx]]
        n = int(fresh.shape[0])
        if n == 0:
            return
        check(n <= self.capacity, f"a batch of {n} tuples for a cache window of {self.capacity}: "
                                  "recon.batch_size and gac.meta_batch bound a unit's batches")
        if self._holds_landed(fresh):  # prefetched by the side stream: move it into place on the device
            torch.cuda.current_stream(self.device).wait_event(self._landed_event)
            for dst, src in zip(self.rows, self._landing):
                dst[self._base:self._base + n].copy_(src[:n])
            self.cache.rows(fresh)  # the read-ahead hands the same batch out: advance its plan
            self.landed_hits += 1
            self._landed = None
        else:  # (a batch off the plan, e.g. a meta step's, leaves a landed planned batch waiting for its turn)
            self._write(self._gather(fresh), self._base)
        self.slot_of[fresh.to(self.device, non_blocking=True)] = self._slots[:n]
        self._staged = fresh
        self._prefetch()

    def _holds_landed(self, idx: Tensor) -> bool:
        """Whether the landing buffer holds the rows of the host indices ``idx``."""
        return self._landed is not None and self._landed.shape == idx.shape and torch.equal(self._landed, idx)

    def _prefetch(self) -> None:
        """Start copying the read-ahead's next planned batch to the landing buffer on the side stream."""
        reads = self.cache._reads
        nxt = reads.peek() if self._stream is not None and reads is not None else None
        if nxt is None:
            return
        idx, rows = nxt
        if self._holds_landed(idx):
            return  # already landed
        if not bool((~self._resident[idx]).all()) or idx.shape[0] > self.capacity:
            return
        if self._landing is None:
            self._landing = [torch.empty_like(r[self._base:]) for r in self.rows]
        step = self.cache.step[idx.to(self.cache.step.device)]
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the landing buffer was read before
        with torch.cuda.stream(self._stream):
            for dst, src in zip(self._landing, rows + [step]):
                dst[:src.shape[0]].copy_(src, non_blocking=True)
            self._landed_event.record(self._stream)
        self._landed = idx

    @property
    def placement(self) -> torch.device:
        """Where the batches are gathered: the training device."""
        return self.device

    def batch(self, idx: Tensor) -> tuple[tuple, dict, Tensor, Tensor]:
        """``(args, kwargs, target, step)`` of ``idx`` from the window, on the device. Outside a CUDA-graph capture,
        tuples that are neither resident nor in the last staged batch are gathered from the cache itself."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not capturing:
            host = idx.cpu()
            if not bool((self._resident[host] | torch.isin(host, self._staged)).all()):
                return self.cache.batch(idx)
        slots = self.slot_of.index_select(0, idx.to(self.device, non_blocking=True))
        rows = [r.index_select(0, slots) for r in self.rows]
        return self.cache.assemble(rows[:-1], rows[-1])


def _gather_rows(sources: list[Tensor], idx: Tensor, pin: bool = False) -> list[Tensor]:
    """The rows ``idx`` of every tensor in ``sources`` (``pin``: into new pinned host buffers). On a memory-mapped
    tensor only those rows' pages are read."""
    out = []
    for src in sources:
        at = idx.to(src.device)
        if pin:
            buf = torch.empty((len(at), *src.shape[1:]), dtype=src.dtype, pin_memory=True)
            out.append(torch.index_select(src, 0, at, out=buf))
        else:
            out.append(src[at])
    return out


_END = object()


class _ReadAhead:
    """A thread that gathers the planned batches' rows ahead of use; :meth:`take` hands out the next planned
    batch when it is the one asked for (the plan only advances on such hits)."""

    def __init__(self, sources: list[Tensor], plan: Iterator[Tensor], depth: int, pin: bool):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._head: Any = None
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(sources, plan, pin), daemon=True,
                                        name="gaq-cache-read-ahead")
        self._thread.start()

    def _run(self, sources: list[Tensor], plan: Iterator[Tensor], pin: bool) -> None:
        item: Any = _END
        try:
            for idx in plan:
                if self._stop.is_set():
                    return
                idx = idx.cpu()
                self._queue.put((idx, _gather_rows(sources, idx, pin)))
        except BaseException as err:  # noqa: BLE001 - handed to the training thread, which raises it
            item = err
        if not self._stop.is_set():
            self._queue.put(item)

    def peek(self) -> tuple[Tensor, list[Tensor]] | None:
        """The next planned batch ``(indices, rows)`` (waiting for its read), or None after the plan's end."""
        if self._head is None and not self._done:
            self._head = self._queue.get()
            if self._head is _END:
                self._head, self._done = None, True
            elif isinstance(self._head, BaseException):
                err, self._head, self._done = self._head, None, True
                raise err
        return self._head

    def take(self, idx: Tensor) -> list[Tensor] | None:
        """The rows of ``idx`` when it is the next planned batch (waiting for its read), else None."""
        if self.peek() is None:
            return None
        planned, rows = self._head
        if planned.shape != idx.shape or not torch.equal(planned, idx.cpu()):
            return None
        self._head = None
        return rows

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # empty the queue, so that a blocked put returns and the thread sees the stop
            try:
                self._queue.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.01)
        self._head = None


class _ReadState:
    """The read-ahead of a cache off the training device and, for a disk cache, its file; also the finaliser's
    target (it holds no reference to the cache)."""

    def __init__(self, path: Path | None):
        self.path, self.reader, self.hits, self.misses = path, None, 0, 0

    def peek(self) -> tuple[Tensor, list[Tensor]] | None:
        return self.reader.peek() if self.reader is not None else None

    def take(self, idx: Tensor) -> list[Tensor] | None:
        rows = self.reader.take(idx) if self.reader is not None else None
        if rows is None:
            self.misses += 1
        else:
            self.hits += 1
        return rows

    def stop_reader(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def close(self) -> None:
        self.stop_reader()
        if self.path is None:
            return
        if self.path.exists():
            log.info("cache file %s removed (%d batches read ahead, %d read directly)", self.path, self.hits,
                     self.misses)
        self.path.unlink(missing_ok=True)



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

    def __init__(self, first: Any, n: int, batch: int, store_dtype: torch.dtype | None):
        self.batched = isinstance(first, Tensor) and first.ndim > 0 and first.shape[0] == batch
        if not self.batched:
            self.slot = _Slot(const=first)
            return
        dtype = store_dtype if store_dtype is not None and first.is_floating_point() else first.dtype
        self.shape, self.dtype = (n, *first.shape[1:]), dtype
        self.slot = _Slot(dtype=first.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize if self.batched else 0

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
    cache_dir: str | Path | None = None,
    host_share: float | None = None,
    device_max_bytes: int | None = None,
) -> UnitCache:
    """Capture the quantized unit's inputs and the FP unit's targets over all calibration batches.

    Args:
        batches: dicts with ``x``, ``t``, ``step`` and ``cond`` covering the calibration set in index order.
        device: the training device (where ``qmodel`` and ``fp_model`` are).
        placement: ``device`` keeps the cache on the training device, ``host`` in (pinned) host memory, ``disk``
            in a safetensors file under ``cache_dir`` read memory-mapped; ``auto`` picks the device when the
            cache takes at most half of the free device memory (and at most ``device_max_bytes``), else the host when it takes at most
            ``host_share`` of the available host memory (None: no limit), else the disk.
        store_dtype: the dtype floating-point inputs and targets are stored in (e.g. ``torch.bfloat16``:
            half the memory); batches are handed out in the dtype they were captured in. None: as captured.
        cache_dir: the folder of a disk cache's file (``recon.cache_dir``; created when needed). A file left
            there by an interrupted run of this unit is replaced; the file is removed by
            :meth:`UnitCache.close` (or when the cache is freed).
        host_share: see ``placement`` (``recon.cache_host_share``).
        device_max_bytes: see ``placement`` (``recon.cache_device_max_gib``); None: no limit but the free memory.
    """
    batches = list(batches)
    n = sum(int(b["step"].shape[0]) for b in batches)
    where: str | None = None
    path: Path | None = None
    at = 0
    for b in batches:
        b = to_device(b, device)
        x, t, cond, count = b["x"], b["t"], b["cond"], int(b["step"].shape[0])
        cap = capture_inputs(qmodel, qunit, x, t, cond)
        fp_in = capture_inputs(fp_model, fp_unit, x, t, cond)
        target = fp_unit(*fp_in.args, **fp_in.kwargs).float()
        if where is None:  # decided on the first batch, so every batch goes straight to its place
            args = [_Filler(a, n, count, store_dtype) for a in cap.args]
            kwargs = {k: _Filler(v, n, count, store_dtype) for k, v in cap.kwargs.items()}
            targets = _Filler(target, n, count, store_dtype)
            steps = _Filler(b["step"], n, count, None)
            named = {f"arg.{i}": f for i, f in enumerate(args)} | {f"kwarg.{k}": f for k, f in kwargs.items()}
            named = {k: f for k, f in (named | {"target": targets}).items() if f.batched}
            nbytes = sum(f.nbytes for f in named.values())
            where = _choose_placement(nbytes, device, placement, host_share, device_max_bytes)
            if where == "disk":
                path = _disk_cache_path(cache_dir, qunit.name)
                tensors = create_mapped_safetensors(path, {k: (f.shape, f.dtype) for k, f in named.items()},
                                                     {"unit": qunit.name, "tuples": str(n)})
            else:
                home = device if where == "device" else torch.device("cpu")
                tensors = {k: torch.empty(f.shape, dtype=f.dtype, device=home) for k, f in named.items()}
            for k, f in named.items():
                f.slot.batched = tensors[k]
            steps.slot.batched = torch.empty(steps.shape, dtype=steps.dtype,
                                             device=device if where == "device" else "cpu")
        for i, (filler, value) in enumerate(zip(args, cap.args)):
            filler.write(value, at, count, f"unit {qunit.name}: input {i}")
        for k, filler in kwargs.items():
            filler.write(cap.kwargs[k], at, count, f"unit {qunit.name}: input {k!r}")
        targets.write(target, at, count, f"unit {qunit.name}: output")
        steps.write(b["step"], at, count, "the step index")
        at += count
    disk = None
    if where == "disk":  # the writing map is dropped and the file read back through a read-only one
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        del tensors
        for f in named.values():
            f.slot.batched = None
        tensors = open_mapped_safetensors(path)
        for k, f in named.items():
            f.slot.batched = tensors[k]
        disk = _ReadState(path)
    cache = UnitCache([f.slot for f in args], {k: f.slot for k, f in kwargs.items()}, targets.slot.batched,
                      steps.slot.batched, device, file=path, _reads=disk)
    if disk is not None:
        weakref.finalize(cache, disk.close)
    if where == "host" and torch.cuda.is_available():
        cache.place("cpu")  # pinned, for asynchronous copies to the device (and read ahead, see place)
    stored = "" if store_dtype is None else f" as {str(store_dtype).removeprefix('torch.')}"
    kept = {"device": "the device" if device.type != "cpu" else "the host", "host": "the host",
            "disk": f"disk at {path} (read memory-mapped)"}[where]
    log.info("unit %s: cache of %d tuples, %.1f MiB%s, kept on %s", qunit.name, n, cache.nbytes / 2**20, stored, kept)
    return cache


def _choose_placement(nbytes: int, device: torch.device, placement: Placement, host_share: float | None,
                      device_max_bytes: int | None = None) -> str:
    """``device``, ``host`` or ``disk`` for a cache of ``nbytes`` (see :func:`build_unit_cache`)."""
    if placement != "auto":
        return "device" if placement == "host" and device.type != "cuda" else placement
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= free // 2 and (device_max_bytes is None or nbytes <= device_max_bytes):
            return "device"
    if host_share is None or nbytes <= host_share * available_host_memory():
        return "host" if device.type == "cuda" else "device"
    return "disk"


def available_host_memory() -> int:
    """Free host memory in bytes (``os.sysconf``: the free pages, so memory held by the page cache counts
    as used and ``auto`` errs towards the disk)."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ---- disk caches: one safetensors file per unit (and rank), written through one map and read through another
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def check_cache_dir(path: str | Path) -> None:
    """Raise a one-line :class:`GaqError` when ``recon.cache_dir`` cannot hold files (nothing is created)."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    why = None if probe.is_dir() else f"{probe} is not a folder"
    if why is None and not os.access(probe, os.W_OK | os.X_OK):
        why = f"{probe} is not writable"
    if why:
        raise GaqError(f"recon.cache_dir {path} cannot hold the disk caches ({why}); point it at a writable folder")


def _disk_cache_path(cache_dir: str | Path | None, unit_name: str) -> Path:
    """The file of ``unit_name``'s disk cache, after checking the folder and its free space: nothing is written
    before both pass (a file left by an interrupted run of the unit is removed first, as it is replaced)."""
    check(cache_dir is not None, "recon.cache_placement is 'disk' but no recon.cache_dir is set")
    cache_dir = Path(cache_dir)
    check_cache_dir(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GaqError(f"recon.cache_dir {cache_dir} cannot be created ({err.strerror}); "
                       "point it at a writable folder") from None
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    path = cache_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', unit_name)}.rank{rank}.safetensors"
    path.unlink(missing_ok=True)
    return path


def create_mapped_safetensors(path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                               metadata: dict[str, str]) -> dict[str, Tensor]:
    """Create the safetensors file of zero-filled tensors ``specs`` (name -> shape, dtype), its space reserved,
    and return writable tensors mapped onto it (``torch.from_file``). Raises :class:`GaqError` naming
    ``recon.cache_dir`` when the disk lacks the space, before anything is written."""
    for name, (_, dtype) in specs.items():
        check(dtype in _SAFETENSORS_DTYPES, f"the cache's {name} has dtype {dtype}, which a disk cache cannot store; "
                                            "set recon.cache_placement to 'host' or 'device'")
    # largest items first: every offset is a multiple of its itemsize, with no padding between tensors
    order = sorted(specs, key=lambda k: -specs[k][1].itemsize)
    header: dict[str, Any] = {"__metadata__": metadata}
    data = 0
    for name in order:
        shape, dtype = specs[name]
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [data, data + size]}
        data += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-aligned, as safetensors writes it
    head = struct.pack("<Q", len(text)) + text
    total = len(head) + data
    free = shutil.disk_usage(path.parent).free
    if total > free:
        raise GaqError(f"recon.cache_dir {path.parent} has {free / 2**30:.1f} GiB free but the cache needs "
                       f"{total / 2**30:.1f} GiB; free space there, point recon.cache_dir at a larger disk, or set "
                       "recon.cache_dtype bfloat16")
    try:
        with open(path, "wb") as f:
            try:  # reserve the blocks: a full disk fails here, not as SIGBUS in a write through the map
                os.posix_fallocate(f.fileno(), 0, total)
            except (AttributeError, OSError) as err:
                if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                    raise
                f.truncate(total)
            f.write(head)
    except OSError as err:
        path.unlink(missing_ok=True)
        raise GaqError(f"recon.cache_dir {path.parent}: the cache file {path.name} cannot be written "
                       f"({err.strerror}); point recon.cache_dir at a writable folder with "
                       f"{total / 2**30:.1f} GiB free") from None
    raw = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
    start = len(head)
    return {name: raw[start + header[name]["data_offsets"][0]:start + header[name]["data_offsets"][1]]
            .view(specs[name][1]).view(specs[name][0]) for name in order}


def open_mapped_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, memory-mapped read-only (zero-copy: indexing reads only the rows it
    takes). The file is checked by ``safetensors.safe_open`` first."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    total = os.path.getsize(path)
    raw = torch.from_file(str(path), shared=False, size=total, dtype=torch.uint8)
    start = 8 + size
    out = {}
    for name in names:
        info = header[name]
        b, e = info["data_offsets"]
        out[name] = raw[start + b:start + e].view(_TORCH_DTYPES[info["dtype"]]).view(info["shape"])
    return out
