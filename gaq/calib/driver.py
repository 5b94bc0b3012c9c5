"""The block-by-block calibration driver: quantize, reconstruct every unit, calibrate activations, save.

One ``Trainer.fit`` per unit. Every rank of a DDP run executes this driver (Lightning starts the
other ranks by re-running the command); only rank 0 writes files, and all ranks meet at a barrier
after each unit. The driver owns the order of work; the per-unit LightningModule owns the maths.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from gaq.calib.cache import build_unit_cache, check_cache_dir
from gaq.calib.checkpoints import (atomic_write_json, check_run_record, load_unit_state, readable_checkpoint,
                                   save_unit_state, unit_file)
from gaq.calib.recon import (ReconConfig, ReconUnit, UnitReconstruction, act_phase_config, cache_store_dtype,
                              per_sample_error)
from gaq.calib.units import Unit, find_units, fp_counterpart, unit_parameters
from gaq.data.datamodule import to_device
from gaq.errors import check
from gaq.models.denoiser import index_cond, predict_noise
from gaq.models.loading import Denoiser
from gaq.models.runner import tf32_flags
from gaq.provenance import device_name, git_commit
from gaq.quant import (act_step_parameters, calibrate_activations, quantize, rounding_parameters, save_quantized,
                       set_adaround_soft, set_quant_state, set_step_index, stored_weight_bytes)
from gaq.quant.quantizer import ActQuantizer

log = logging.getLogger(__name__)

Method = Literal["rtn", "uniform", "gac"]

# make_trainer(unit_dir, unit_name) -> a Trainer whose checkpoints go to unit_dir
TrainerFactory = Callable[[Path, str], pl.Trainer]


@dataclass
class UnitReport:
    """What happened to one unit, for ``summary.json``."""

    index: int
    name: str
    kind: str
    layers: int
    seconds: float = 0.0
    cache_seconds: float = 0.0  # capturing the unit's inputs and FP targets
    fit_seconds: float = 0.0    # the unit's Trainer.fit (meta steps and reconstruction iterations)
    resumed_from: str = "scratch"  # scratch | unit-checkpoint | lightning-checkpoint
    reconstructed: bool = True  # False: left at nearest rounding (not selected by the unit filter, or failed)
    error: str | None = None    # why the unit failed, with ``on_unit_error: skip``
    error_before: float | None = None  # validation error with nearest rounding (RTN)
    error_after: float | None = None   # validation error after reconstruction (hard rounding)
    cache_bytes: int | None = None     # the unit's input/target cache
    cache_on: str | None = None        # where that cache lived: ``device``, ``host`` or ``disk``
    cache_file: str | None = None      # the file of a disk cache (removed when the unit ended)
    peak_memory_bytes: int | None = None  # the largest CUDA memory allocated while the unit ran (None off CUDA)
    extra: dict[str, Any] = field(default_factory=dict)


def calibration_batches(calib, batch_size: int, indices: Tensor | None = None) -> Iterator[dict[str, Any]]:
    """Batches ``{"x", "t", "step", "cond"}`` of a calibration set in index order (or of ``indices``).

    ``step`` is each tuple's position among the kept timesteps (``calib.timesteps``), which is what
    per-step activation quantizers index.
    """
    order = torch.arange(len(calib)) if indices is None else indices
    kept_pos = calib.kept_pos
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield {"x": calib.x[idx], "t": calib.t[idx], "step": kept_pos[idx], "cond": index_cond(calib.cond, idx)}


@torch.no_grad()
def unit_error(unit: Unit, cache, index: Tensor, set_step, chunk: int) -> float:
    """Mean per-sample reconstruction error of ``unit`` over the tuples ``index``, ``chunk`` at a time."""
    total = 0.0
    for s in range(0, len(index), chunk):
        args, kwargs, target, step = cache.batch(index[s:s + chunk])
        set_step(step)
        total += per_sample_error(unit(*args, **kwargs), target).sum().item()
    return total / max(len(index), 1)


@dataclass
class CalibrationJob:
    """Everything one calibration run needs, already built (the CLI builds it from YAML).

    Attributes:
        denoiser: the FP model and its schedule.
        datamodule: the calibration DataModule (set up: calibration set, split, groups).
        quant: the quantization config (``gaq.quant.QuantConfig``).
        method: ``rtn`` (no reconstruction), ``uniform`` (AdaRound with uniform sample weights) or ``gac``.
        recon: reconstruction settings.
        run_dir: the run folder (per-unit checkpoints, summary, quantized model).
        make_trainer: builds the Trainer of one unit.
        device: where calibration runs.
        record: the run's configuration as plain data (written to ``run.json``, compared on resume).
        method_hooks: the GAC extension (``gaq.calib.gac_driver.GACHooks``) or None.
        end_callbacks: ``trainer.callbacks`` with an ``on_calibration_end`` hook (sample grids, metrics),
            run once on the finished quantized model, and optionally ``on_unit_end`` (after each unit).
        units: the unit filter: glob patterns (``fnmatch``) on unit names, or ``kind:<kind>`` (``time``,
            ``resnet``, ``attention``, ``sampler``, ``layer``); only matching units are reconstructed, the
            others keep nearest rounding, and only matching units have their activation step sizes tuned
            in the activation phase, the others keep the calibrated ranges (the range calibration itself
            covers every quantizer of the model). None: every unit.
        on_unit_error: ``raise``: a unit that fails stops the run (finished units are kept on disk);
            ``skip``: the failure is recorded in its report, the unit keeps nearest rounding, the run goes on.
    """

    denoiser: Denoiser
    datamodule: Any
    quant: Any
    method: Method
    recon: ReconConfig
    run_dir: Path
    make_trainer: TrainerFactory
    device: torch.device
    record: dict
    method_hooks: Any = None
    end_callbacks: list = field(default_factory=list)
    units: list[str] | None = None
    on_unit_error: Literal["raise", "skip"] = "raise"


def unit_selected(unit: Unit, patterns: list[str] | None) -> bool:
    """Whether the unit filter ``patterns`` (see :class:`CalibrationJob`) selects ``unit``."""
    if patterns is None:
        return True
    return any(unit.kind == p[len("kind:"):] if p.startswith("kind:") else fnmatch.fnmatchcase(unit.name, p)
               for p in patterns)


def run_calibration(job: CalibrationJob) -> dict:
    """Quantize ``job.denoiser.model`` and calibrate it unit by unit; returns the summary (also saved)."""
    return calibrate_model(job)[1]


def calibrate_model(job: CalibrationJob) -> tuple[nn.Module, dict]:
    """Quantize ``job.denoiser.model`` and calibrate it unit by unit; returns the quantized model (on
    ``job.device``, weights and activations quantized) and the summary (also saved). The float32 CUDA
    operations run with ``recon.tf32``'s TF32 flags (restored after)."""
    with tf32_flags(matmul=job.recon.tf32 == "all", conv=job.recon.tf32 != "none"):
        return _calibrate_model(job)


def _calibrate_model(job: CalibrationJob) -> tuple[nn.Module, dict]:
    t_start = t_mark = time.time()
    dm, device, run_dir = job.datamodule, job.device, Path(job.run_dir)
    calib = dm.calib_set
    is_zero = global_rank() == 0
    fp_model = job.denoiser.model.to(device).eval().requires_grad_(False)
    qmodel = quantize(fp_model, job.quant, timesteps=calib.timesteps).to(device).eval()
    peak = PeakMemory(device)
    set_quant_state(qmodel, weight=False, act=False)
    qmodel.requires_grad_(False)
    set_step = lambda step: set_step_index(qmodel, step)  # noqa: E731

    probe = to_device(next(calibration_batches(calib, 2)), device)
    run_probe = lambda: predict_noise(qmodel, probe["x"], probe["t"], probe["cond"])  # noqa: E731
    units = find_units(qmodel, run_probe, time_unit=job.recon.time_unit)
    log.info("%d reconstruction units: %s", len(units), ", ".join(u.name for u in units))
    selected = [unit_selected(u, job.units) for u in units]
    if job.units is not None:
        check(any(selected), f"the unit filter {job.units} selects none of the {len(units)} units "
                             f"({', '.join(u.name for u in units[:6])}, ...): fix the patterns")
        log.info("unit filter %s: reconstructing %d of %d units", job.units, sum(selected), len(units))
    if job.method != "rtn" and (job.recon.cache_placement == "disk" or job.recon.cache_dir is not None):
        check_cache_dir(disk_cache_dir(job.recon, run_dir))  # before any folder is made
    if is_zero:  # written once the model quantized and its units were found: bad settings leave no folder behind
        check_run_record(run_dir, job.record)

    reports: list[UnitReport] = []
    if job.method != "rtn":
        hooks = job.method_hooks
        for k, unit in enumerate(units):
            report = UnitReport(k, unit.name, unit.kind, len(unit.layers))
            t0 = time.time()
            peak.start_part()
            path = unit_file(run_dir, k, unit.name)
            if not selected[k]:
                report.reconstructed = False
            elif path.exists():
                load_unit_state(path, unit.layers)
                _restore_report(report, path.with_suffix(".json"))
                if hooks is not None:
                    hooks.unit_loaded(k, unit)
            elif _reconstruct_or_record(job, k, unit, qmodel, fp_model, calib, set_step, report, hooks) and is_zero:
                save_unit_state(path, unit.layers)
            for _, layer in unit.layers:
                layer.set_quant_state(weight=True, act=False)
            _set_soft(unit, False)
            if is_zero and job.end_callbacks:
                unit_end(job.end_callbacks, qmodel, job.denoiser, run_dir, k)
            _barrier()
            if report.resumed_from != "unit-checkpoint":
                report.seconds = time.time() - t0
                report.peak_memory_bytes = peak.part()
                if is_zero and report.reconstructed:  # its figures, for the summary of a run that resumes it
                    atomic_write_json(path.with_suffix(".json"), asdict(report))
            if is_zero:
                _add_progress(run_dir, time.time() - t_mark)
                t_mark = time.time()
            reports.append(report)
            log.info("unit %d/%d %s done in %.1f s%s", k + 1, len(units), unit.name, report.seconds, _memory_note(report))
    set_quant_state(qmodel, weight=True, act=False)
    act_seconds, act_reports = 0.0, []
    if job.quant.a_bits < 32:
        t0 = time.time()
        set_quant_state(qmodel, weight=True, act=True)
        calibrate_activations(qmodel, (to_device(b, device) for b in calibration_batches(calib, job.recon.cache_batch)))
        act_seconds = time.time() - t0
        act_cfg = act_phase_config(job.recon)
        if job.method != "rtn" and act_cfg.iters > 0 and act_step_parameters(qmodel):
            learn = [k for k, unit in enumerate(units) if selected[k] and act_step_parameters(unit.module)]
            if job.units is not None:
                log.info("unit filter %s: tuning the activation step sizes of %d of %d units", job.units, len(learn),
                         sum(bool(act_step_parameters(u.module)) for u in units))
            for k in learn:
                act_reports.append(_learn_act_steps(job, act_cfg, k, units[k], qmodel, fp_model, calib, set_step))
    set_quant_state(qmodel, weight=True, act=job.quant.a_bits < 32)

    summary = {
        "model": job.denoiser.source, "model_fingerprint": job.denoiser.fingerprint,
        "preset": job.quant.preset, "w_bits": job.quant.w_bits, "a_bits": job.quant.a_bits,
        "method": job.method, "units": [asdict(r) for r in reports], "num_units": len(units),
        "calibration_seconds": time.time() - t_start,  # rank 0 below: every process's time on the run
        "calibration_seconds_this_process": time.time() - t_start, "activation_calibration_seconds": act_seconds,
        "activation_step_units": [asdict(r) for r in act_reports],
        "peak_memory_bytes": peak.overall(),
        "device": device_name(device), "world_size": _world_size(), "git_commit": git_commit(),
        "calibration_set": {"tuples": len(calib), "train": int(len(dm.train_indices)), "val": int(len(dm.val_indices))},
        "recon": asdict(job.recon),
    }
    if job.method_hooks is not None:
        summary.update(job.method_hooks.summary())
    if is_zero:
        _add_progress(run_dir, time.time() - t_mark)
        summary["calibration_seconds"] = _progress_seconds(run_dir)
        qbytes, fpbytes = stored_weight_bytes(qmodel)
        summary["stored_weight_bytes"] = {"quantized": qbytes, "fp32": fpbytes}
        save_quantized(qmodel, run_dir / "quantized", base_source=job.denoiser.source, config=job.quant,
                       extra_meta={"method": job.method, "git_commit": summary["git_commit"]})
        if job.end_callbacks:
            summary["callbacks"] = calibration_end(job.end_callbacks, qmodel, job.denoiser, run_dir)
        atomic_write_json(run_dir / "summary.json", summary)
    _barrier()
    return qmodel, summary


PROGRESS_FILE = "progress.json"  # wall seconds every process has spent on the run, added up at each unit's end


def _progress_seconds(run_dir: Path) -> float:
    try:
        return float(json.loads((Path(run_dir) / PROGRESS_FILE).read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _add_progress(run_dir: Path, seconds: float) -> None:
    atomic_write_json(Path(run_dir) / PROGRESS_FILE, {"seconds": _progress_seconds(run_dir) + seconds})


def _restore_report(report: UnitReport, path: Path) -> None:
    """A unit loaded from its checkpoint keeps the figures of the run that computed it (errors, seconds)."""
    report.resumed_from = "unit-checkpoint"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # a checkpoint of an older gaq: only the resumption is known
    for key in ("seconds", "cache_seconds", "fit_seconds", "error_before", "error_after", "cache_bytes", "cache_on",
                "cache_file", "peak_memory_bytes", "extra", "error"):
        if key in saved:
            setattr(report, key, saved[key])


def unit_end(callbacks, qmodel: nn.Module, denoiser: Denoiser, run_dir: Path, k: int) -> None:
    """Call ``on_unit_end(qmodel, denoiser, run_dir, k)`` on every callback that defines it (after unit ``k``
    is final, rank 0 only): the calibration's hook for sample grids of the partly calibrated model."""
    for cb in callbacks or []:
        hook = getattr(cb, "on_unit_end", None)
        if callable(hook):
            with torch.no_grad():
                hook(qmodel, denoiser, run_dir, k)


def calibration_end(callbacks, qmodel: nn.Module, denoiser: Denoiser, run_dir: Path) -> dict[str, Any]:
    """Call ``on_calibration_end(qmodel, denoiser, run_dir)`` on every callback that defines it, once the
    quantized model is final (rank 0 only); returns ``{callback class name: what it returned}``."""
    results: dict[str, Any] = {}
    for cb in callbacks or []:
        hook = getattr(cb, "on_calibration_end", None)
        if callable(hook):
            with torch.no_grad():
                results[type(cb).__name__] = hook(qmodel, denoiser, run_dir)
    return results


def disk_cache_dir(cfg: ReconConfig, run_dir: Path) -> Path:
    """The folder of the disk-placed unit caches: ``recon.cache_dir``, or ``<run_dir>/cache``."""
    return Path(cfg.cache_dir) if cfg.cache_dir is not None else Path(run_dir) / "cache"


def _unit_cache(cfg: ReconConfig, unit: Unit, qmodel: nn.Module, fp_model: nn.Module, calib, device: torch.device,
                report: UnitReport, run_dir: Path):
    """The unit's input/target cache; its build time, size and place go into ``report``."""
    t0 = time.time()
    cache = build_unit_cache(qmodel, unit, fp_model, fp_counterpart(unit, fp_model),
                             calibration_batches(calib, cfg.cache_batch), device, cfg.cache_placement,
                             cache_store_dtype(cfg), disk_cache_dir(cfg, run_dir), cfg.cache_host_share,
                             None if cfg.cache_device_max_gib is None else int(cfg.cache_device_max_gib * 2**30))
    report.cache_seconds = time.time() - t0
    report.cache_bytes = cache.nbytes
    if cache.on_disk:
        report.cache_on, report.cache_file = "disk", str(cache.file)
    else:
        report.cache_on = "host" if cache.placement.type == "cpu" and device.type != "cpu" else "device"
    return cache


def _memory_note(report: UnitReport) -> str:
    """`` (cache 2.0 GiB on the device, peak 5.1 GiB)`` for the log line of a unit computed in this process."""
    bits = []
    if report.cache_bytes is not None:
        at = f" at {report.cache_file}" if report.cache_file else ""
        bits.append(f"cache {report.cache_bytes / 2**30:.2f} GiB on the {report.cache_on}{at}")
    if report.peak_memory_bytes is not None and report.resumed_from != "unit-checkpoint":
        bits.append(f"peak {report.peak_memory_bytes / 2**30:.2f} GiB")
    return f" ({', '.join(bits)})" if bits else ""


def free_memory(device: torch.device) -> None:
    """On CUDA, hand the cached blocks back, so that the next unit's cache finds the memory the last one used.
    (No ``gc.collect()``: it takes about 0.4 s with diffusers and transformers loaded; the unbound module
    holds nothing large, so reference counting frees the cache.)"""
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """The largest CUDA memory allocated over the run and within each part of it (a unit): CUDA keeps one
    peak counter, so each part's start folds the counter into the run's peak and resets it. None off CUDA."""

    def __init__(self, device: torch.device):
        self.device, self._before = device, 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def start_part(self) -> None:
        if self.device.type == "cuda":
            self._before = max(self._before, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def part(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None

    def overall(self) -> int | None:
        return max(self._before, self.part()) if self.device.type == "cuda" else None


def _reconstruct_or_record(job: CalibrationJob, k: int, unit: Unit, qmodel: nn.Module, fp_model: nn.Module, calib,
                           set_step, report: UnitReport, hooks) -> bool:
    """Reconstruct one unit; with ``on_unit_error: skip`` a failure is recorded (the unit is reset to
    nearest rounding) and False returned instead of raised."""
    if job.on_unit_error == "raise":
        _reconstruct_unit(job, k, unit, qmodel, fp_model, calib, set_step, report, hooks)
        return True
    rounding = unit_parameters(unit, rounding_parameters)
    initial = [p.detach().clone() for p in rounding]  # nearest rounding, as quantize() initialised it
    try:
        _reconstruct_unit(job, k, unit, qmodel, fp_model, calib, set_step, report, hooks)
        return True
    except Exception as err:  # noqa: BLE001 - on_unit_error: skip records every failure of a unit
        report.reconstructed = False
        report.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        log.error("unit %d %s failed (%s); it keeps nearest rounding", k, unit.name, report.error)
        with torch.no_grad():
            for p, p0 in zip(rounding, initial):
                p.copy_(p0)
                p.requires_grad_(False)
                p.grad = None
    free_memory(job.device)  # after the except block: the exception's frames hold the failed unit's cache
    return False


def _reconstruct_unit(job: CalibrationJob, k: int, unit: Unit, qmodel: nn.Module, fp_model: nn.Module, calib,
                      set_step, report: UnitReport, hooks) -> None:
    dm, device = job.datamodule, job.device
    cache = _unit_cache(job.recon, unit, qmodel, fp_model, calib, device, report, job.run_dir)
    rounding = unit_parameters(unit, rounding_parameters)
    qmodel.requires_grad_(False)
    for p in rounding:
        p.requires_grad_(True)
    for _, layer in unit.layers:
        layer.set_quant_state(weight=True, act=False)
    _set_soft(unit, False)  # hard rounding at initialisation = nearest rounding (RTN)
    val_index = torch.as_tensor(dm.val_indices)
    report.error_before = unit_error(unit, cache, val_index, set_step, job.recon.cache_batch)
    _set_soft(unit, True)

    def regulariser(beta: float) -> Tensor:
        return sum(layer.weight_quantizer.round_loss(beta) for _, layer in unit.layers)

    module = UnitReconstruction(job.recon).bind(ReconUnit(
        name=unit.name, module=unit.module, call=unit, learned=rounding, regulariser=regulariser, cache=cache,
        data=dm, set_step=set_step))
    if hooks is not None:
        hooks.prepare_unit(module, k, unit, cache)
    _fit(job, module, Path(job.run_dir) / "lightning" / f"{k:03d}", unit.name, report)
    _set_soft(unit, False)
    report.error_after = unit_error(unit, cache, val_index, set_step, job.recon.cache_batch)
    if hooks is not None:
        report.extra.update(hooks.finish_unit(module, k, unit, cache))
    for p in rounding:
        p.requires_grad_(False)
    reads = module.cache_reads()
    if reads:  # how a host or disk cache's batches arrived: the overlap of its reads shows here
        report.extra["cache_reads"] = reads
    module.unbind()
    cache.close()  # a disk cache's file goes with the unit (on a failure, when the cache is freed)
    del cache
    free_memory(device)


def _fit(job: CalibrationJob, module: UnitReconstruction, unit_dir: Path, name: str, report: UnitReport) -> None:
    """One unit's ``Trainer.fit``, resumed from ``unit_dir/last.ckpt`` when it exists."""
    last = unit_dir / "last.ckpt"
    if last.exists() and not readable_checkpoint(last):
        log.warning("unit %s: %s is unreadable (truncated or corrupt); it is discarded and the unit restarts", name, last)
        if global_rank() == 0:
            last.unlink()
        _barrier()
    if last.exists():
        report.resumed_from = "lightning-checkpoint"
    trainer = job.make_trainer(unit_dir, name)
    t0 = time.time()
    trainer.fit(module, ckpt_path=str(last) if last.exists() else None)
    report.fit_seconds = time.time() - t0
    module.to(job.device)  # Lightning's teardown moves the module (and so the unit inside qmodel) to the CPU


def _learnable_act_quantizers(unit: Unit) -> list[tuple[str, nn.Module]]:
    """``(name, quantizer)`` of the activation quantizers in ``unit`` whose step sizes are learned."""
    return [(n, m) for n, m in unit.module.named_modules() if isinstance(m, ActQuantizer) and m.learn_step]


def _learn_act_steps(job: CalibrationJob, cfg: ReconConfig, k: int, unit: Unit, qmodel: nn.Module,
                     fp_model: nn.Module, calib, set_step) -> UnitReport:
    """Q-Diffusion's activation phase for one unit: tune its learnable activation step sizes on the
    block-output loss, with weights (hard rounding) and activations quantized and the inputs taken
    from the model quantized so far. Checkpointed under ``<run>/act/`` like the weight phase."""
    report = UnitReport(k, unit.name, unit.kind, len(unit.layers))
    t0 = time.time()
    quantizers = _learnable_act_quantizers(unit)
    path = unit_file(Path(job.run_dir) / "act", k, unit.name)
    if path.exists():
        load_unit_state(path, quantizers)
        report.resumed_from = "unit-checkpoint"
    else:
        dm, device = job.datamodule, job.device
        cache = _unit_cache(cfg, unit, qmodel, fp_model, calib, device, report, job.run_dir)
        steps = act_step_parameters(unit.module)
        qmodel.requires_grad_(False)
        for p in steps:
            p.requires_grad_(True)
        val_index = torch.as_tensor(dm.val_indices)
        report.error_before = unit_error(unit, cache, val_index, set_step, cfg.cache_batch)
        module = UnitReconstruction(cfg).bind(ReconUnit(
            name=unit.name, module=unit.module, call=unit, learned=steps,
            regulariser=lambda beta: torch.zeros((), device=device), cache=cache,
            data=dm, set_step=set_step))
        _fit(job, module, Path(job.run_dir) / "lightning" / f"act-{k:03d}", unit.name, report)
        report.error_after = unit_error(unit, cache, val_index, set_step, cfg.cache_batch)
        for p in steps:
            p.requires_grad_(False)
        module.unbind()
        cache.close()
        del cache
        free_memory(device)
        if global_rank() == 0:
            save_unit_state(path, quantizers)
    _barrier()
    report.seconds = time.time() - t0
    log.info("unit %d %s: activation step sizes learned in %.1f s", k, unit.name, report.seconds)
    return report


def _set_soft(unit: Unit, soft: bool) -> None:
    for _, layer in unit.layers:
        set_adaround_soft(layer, soft)


def global_rank() -> int:
    """This process's rank; before the process group exists, the rank Lightning's launcher gave it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
