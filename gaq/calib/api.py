"""The calibration verb: ``qmodel = gaq.calibrate(model, config, data)``.

One call runs round-to-nearest, uniform block reconstruction or GAC and returns the quantized model.
``gaq calibrate`` (the CLI) parses its YAML into the same arguments and calls it; the benchmarks call it
too. What it takes:

- ``model``: a :class:`gaq.models.loading.Denoiser`, a model folder or hub id (loaded with
  :func:`gaq.models.loading.load_denoiser`), or a diffusers noise predictor module (with
  ``scheduler=`` when the calibration set is to be generated from it);
- ``config``: one :class:`CalibrationConfig` (method, quantization, reconstruction, GAC, split, unit filter);
- ``data``: a :class:`gaq.data.calibset.CalibrationSet`, a :class:`gaq.data.calibset.CalibSetConfig`
  (generate the set from the model's own DDIM trajectories, cached in ``cache_dir``), or any iterable /
  DataLoader of batches ``(x_t, t)`` or ``(x_t, t, cond)`` (``cond``: the model's keyword inputs, e.g.
  ``{"class_labels": ...}`` or ``{"encoder_hidden_states": ...}``; dicts with keys ``x``, ``t``,
  ``cond`` work too) that the user made.

The run folder keeps per-unit checkpoints, so the same call with the same ``run_dir`` resumes an
interrupted run; ``trainer`` (Lightning ``Trainer`` keyword arguments: ``accelerator``, ``devices``,
``strategy``, ``precision``, ``callbacks``, ...) selects the devices, DDP included.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from contextlib import nullcontext
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from gaq.atomic import check_writable_folder
from gaq.calib.checkpoints import AtomicCheckpointIO, RunLock, UnitCheckpoint, config_digest
from gaq.calib.driver import CalibrationJob, Method, calibrate_model, global_rank
from gaq.calib.gac import GACConfig
from gaq.calib.gac_driver import DiagnosticsConfig, GACHooks
from gaq.calib.recon import ReconConfig
from gaq.data.calibset import CalibrationSet, CalibSetConfig
from gaq.data.datamodule import CalibrationDataModule, SplitConfig
from gaq.errors import GaqError, check
from gaq.models.loading import Denoiser, load_denoiser, model_kind
from gaq.quant import QuantConfig
from gaq.quant.config import resolve_config

log = logging.getLogger("gaq")

#: the source recorded for a calibration set made from the user's own batches
USER_BATCHES = "user batches"


@dataclass
class CalibrationConfig:
    """Everything :func:`calibrate` does, as one typed object (the YAML's ``method``, ``quant``,
    ``model.recon``, ``gac``, ``diagnostics``, ``data.split`` and ``units``).

    Attributes:
        method: ``rtn`` (nearest rounding, activation ranges calibrated), ``uniform`` (AdaRound block
            reconstruction, every sample weighted 1) or ``gac`` (gradient-aligned sample weights).
        quant: bits, preset and per-layer overrides.
        recon: the reconstruction settings (iterations, batch, learning rate, schedule, checkpoints).
        gac: GAC's settings (read with ``method: gac`` only).
        diagnostics: GAC's per-unit diagnostics (gradient-conflict matrices, the weight figures).
        split: validation share, timestep groups and seed of the calibration set's split.
        units: the unit filter: glob patterns on unit names (e.g. ``down_blocks.*``) or ``kind:<kind>``
            (``time``, ``resnet``, ``attention``, ``sampler``, ``layer``); only those units are
            reconstructed and have their activation step sizes tuned (the activation phase), the rest
            keep nearest rounding and the calibrated activation ranges. None: all.
        on_unit_error: ``raise`` (stop; finished units stay on disk) or ``skip`` (record the failure in
            the unit's report, keep nearest rounding for it, go on).
    """

    method: Method = "uniform"
    quant: QuantConfig = field(default_factory=QuantConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    gac: GACConfig = field(default_factory=GACConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    units: list[str] | None = None
    on_unit_error: Literal["raise", "skip"] = "raise"

    def __post_init__(self):
        check(self.method in ("rtn", "uniform", "gac"), f"method must be rtn, uniform or gac, got {self.method!r}")
        check(self.units is None or (isinstance(self.units, list) and len(self.units) > 0
                                     and all(isinstance(u, str) and u for u in self.units)),
              f"units must be a non-empty list of unit-name patterns (or null for every unit), got {self.units!r}")
        check(self.on_unit_error in ("raise", "skip"), f"on_unit_error must be raise or skip, got {self.on_unit_error!r}")


# ------------------------------------------------------------------------------------------------ the model
def as_denoiser(model: Denoiser | str | os.PathLike | nn.Module, scheduler: Any = None,
                sample_shape: tuple[int, int, int] | None = None) -> Denoiser:
    """The :class:`Denoiser` of what the user passed: itself, a loaded folder / hub id, or a diffusers module
    (its schedule from ``scheduler``'s ``alphas_cumprod``; its conditioning read from the module)."""
    if isinstance(model, Denoiser):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_denoiser(model)
    check(isinstance(model, nn.Module), f"model must be a Denoiser, a model folder / hub id or a diffusers module, "
                                        f"got {type(model).__name__}")
    acp = getattr(scheduler, "alphas_cumprod", None)
    check(scheduler is None or isinstance(acp, Tensor),
          f"scheduler must be a diffusers scheduler with alphas_cumprod, got {type(scheduler).__name__}")
    config = getattr(model, "config", {}) or {}
    if sample_shape is None:
        size = config.get("sample_size")
        check(isinstance(size, int) and "in_channels" in config,
              "cannot tell the sample shape of this module: pass a calibration set or batches, or a model folder")
        sample_shape = (int(config["in_channels"]), size, size)
    cond = model_kind(model).cond(model)
    return Denoiser(model=model.eval(), alphas_cumprod=acp if acp is not None else torch.empty(0),
                    sample_shape=tuple(sample_shape), cond_kind=cond.kind, num_classes=cond.num_classes,
                    null_label=cond.null_label, source=config.get("_name_or_path") or "<in-memory>")


# ------------------------------------------------------------------------------------------------ the data
def _as_tuple(batch: Any) -> tuple[Tensor, Tensor, Mapping[str, Tensor]]:
    if isinstance(batch, Mapping):
        check("x" in batch and "t" in batch, f"a calibration batch dict needs keys x and t, got {sorted(batch)}")
        return batch["x"], batch["t"], batch.get("cond") or {}
    check(isinstance(batch, (tuple, list)) and len(batch) in (2, 3),
          "a calibration batch must be (x_t, t) or (x_t, t, cond) or a dict with x, t, cond; got "
          f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of {len(batch)} items'}")
    return batch[0], batch[1], (batch[2] if len(batch) == 3 else None) or {}


def calibration_set_from_batches(batches: Iterable[Any]) -> CalibrationSet:
    """A :class:`CalibrationSet` of the user's batches ``(x_t, t[, cond])``.

    Every distinct timestep becomes a kept step (in sampling order: the largest ``t`` first); the tuples
    are sorted by step (stably, so each step keeps the user's order). ``t`` is one integer timestep per
    sample (or one for the whole batch); each ``cond`` value has the batch as its leading dimension.
    """
    xs, ts, conds, keys = [], [], [], None
    for i, batch in enumerate(batches):
        x, t, cond = _as_tuple(batch)
        check(isinstance(x, Tensor) and x.ndim >= 2, f"batch {i}: x_t must be a tensor (B, ...), got {type(x).__name__}")
        t = torch.as_tensor(t)
        check(not t.is_floating_point() or bool((t == t.round()).all()),
              f"batch {i}: t must hold integer timesteps (the model's training timesteps), got {t.dtype} values")
        t = t.long().reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.long().reshape(-1)
        check(t.shape[0] == x.shape[0], f"batch {i}: {x.shape[0]} samples but {t.shape[0]} timesteps")
        check(bool(torch.isfinite(x).all()), f"batch {i}: x_t holds NaN or Inf values")
        check(isinstance(cond, Mapping) and all(isinstance(v, Tensor) and v.shape[0] == x.shape[0] for v in cond.values()),
              f"batch {i}: cond must map model keyword names to tensors with the batch ({x.shape[0]}) as leading dim")
        check(keys is None or set(cond) == keys, f"batch {i}: cond keys {sorted(cond)} differ from batch 0's {sorted(keys or [])}")
        keys = set(cond)
        xs.append(x.detach().cpu())
        ts.append(t.cpu())
        conds.append({k: v.detach().cpu() for k, v in cond.items()})
    check(len(xs) > 0, "the calibration data is empty: give at least one batch")
    x, t = torch.cat(xs), torch.cat(ts)
    cond = {k: torch.cat([c[k] for c in conds]) for k in sorted(keys or [])}
    timesteps = torch.unique(t).flip(0)  # sampling order: the noisiest step first
    step = torch.searchsorted(-timesteps, -t)  # position of each tuple's timestep in that order
    order = torch.sort(step, stable=True).indices
    digest = hashlib.sha256()
    for tensor in (x, t, *cond.values()):
        digest.update(tensor.contiguous().numpy().tobytes() if tensor.dtype != torch.bfloat16
                      else tensor.float().numpy().tobytes())
    return CalibrationSet(x=x[order], t=t[order], step=step[order], cond={k: v[order] for k, v in cond.items()},
                          kept_steps=torch.arange(len(timesteps)), timesteps=timesteps,
                          meta={"source": USER_BATCHES, "key": digest.hexdigest()[:16]})


def _calib_config_of(cs: CalibrationSet) -> CalibSetConfig:
    """The generation config a set was made with, or one with as many kept steps (for the DataModule)."""
    stored = cs.meta.get("config")
    if isinstance(stored, Mapping):
        try:
            return CalibSetConfig(**stored)
        except (TypeError, GaqError):
            pass
    return CalibSetConfig(steps=cs.num_kept_steps, interval=1)


def calibration_data(den: Denoiser, data: Any, split: SplitConfig, cache_dir: str | os.PathLike = "calib_sets",
                     device: str = "auto") -> CalibrationDataModule:
    """The set-up :class:`CalibrationDataModule` (split, groups, loaders) of ``data`` for ``den``."""
    if isinstance(data, CalibSetConfig):
        dm = CalibrationDataModule(den.source, data, split, cache_dir=str(cache_dir), device=device).attach(denoiser=den)
        dm.prepare_data()
    else:
        cs = data if isinstance(data, CalibrationSet) else None
        if cs is None:
            check(isinstance(data, Iterable) and not isinstance(data, (str, bytes, Tensor)),
                  "data must be a CalibrationSet, a CalibSetConfig or an iterable of (x_t, t[, cond]) batches, "
                  f"got {type(data).__name__}")
            cs = calibration_set_from_batches(data)
        dm = CalibrationDataModule(den.source, _calib_config_of(cs), split, cache_dir=str(cache_dir),
                                   device=device).attach(denoiser=den, calib_set=cs)
    dm.setup("fit")
    return dm


def check_cache_dir(den: Denoiser, cfg: CalibSetConfig, cache_dir: str | os.PathLike) -> None:
    """The calibration-set cache is a writable folder, unless the set is already cached there (then it is only read)."""
    from gaq.data.calibset import cache_path

    if not cache_path(den, cfg, cache_dir).is_file():
        check_writable_folder(cache_dir, "the calibration-set cache_dir")


# ------------------------------------------------------------------------------------------------ the run
def run_record(den: Denoiser, calib_key: Any, config: CalibrationConfig) -> dict[str, Any]:
    """What a run's results depend on (written to ``run.json`` and compared on resume; devices excluded).
    ``calib_key``: the calibration set's ``meta["key"]`` (:func:`gaq.data.calibset.cache_key` of a generated set)."""
    record = {
        "model": den.source, "model_fingerprint": den.fingerprint,
        "calibration_set": calib_key, "split": asdict(config.split),
        "quant": config.quant.as_dict() if hasattr(config.quant, "as_dict") else asdict(config.quant),
        "method": config.method, "recon": asdict(config.recon),
        "gac": asdict(config.gac) if config.method == "gac" else None,
    }
    if config.units is not None:  # absent otherwise, so that earlier run folders keep their digest
        record["units"] = list(config.units)
    return record


def default_run_dir(runs_root: str | os.PathLike, name: str, config: CalibrationConfig, record: dict) -> Path:
    """``<runs_root>/<name>-<method>-w<W>a<A>-<digest of the record>``."""
    import re

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    q = config.quant
    return Path(runs_root) / f"{safe}-{config.method}-w{q.w_bits}a{q.a_bits}-{config_digest(record)[:8]}"


def unit_trainer_factory(trainer: Mapping[str, Any], run_dir: Path):
    """``make_trainer(unit_dir, unit_name)``: one Lightning ``Trainer`` per unit from the user's Trainer
    arguments, with the flags the engine needs (one epoch, no sampler re-injection or validation loop,
    atomic checkpoints through :class:`UnitCheckpoint`, a CSV log per unit)."""
    progress_bar = trainer.get("enable_progress_bar", True) is not False
    base = {"enable_model_summary": False, **trainer}
    user_callbacks = [cb for cb in (base.pop("callbacks", None) or [])
                      if not isinstance(cb, (RichProgressBar, ModelCheckpoint))]
    for key in ("max_epochs", "max_steps", "logger", "default_root_dir", "enable_checkpointing", "plugins",
                "num_sanity_val_steps", "limit_val_batches", "use_distributed_sampler", "enable_progress_bar"):
        base.pop(key, None)

    def make(unit_dir: Path, unit_name: str) -> pl.Trainer:
        callbacks = list(user_callbacks) + ([RichProgressBar(leave=False)] if progress_bar else [])
        callbacks.append(UnitCheckpoint(unit_dir))
        return pl.Trainer(**base, callbacks=callbacks, default_root_dir=str(unit_dir), max_epochs=1, max_steps=-1,
                          use_distributed_sampler=False, plugins=[AtomicCheckpointIO()], num_sanity_val_steps=0,
                          limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=progress_bar,
                          logger=CSVLogger(str(run_dir), name="logs", version=unit_dir.name))

    return make


#: Trainer options the engine sets itself for every unit's fit (one epoch of ``recon.iters`` iterations, its own
#: checkpoints, logs and checkpoint plugin, no validation loop): a user value would be ignored, so it is refused.
ENGINE_TRAINER_KEYS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches",
                       "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches",
                       "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps",
                       "enable_checkpointing", "accumulate_grad_batches", "gradient_clip_val",
                       "gradient_clip_algorithm", "default_root_dir", "reload_dataloaders_every_n_epochs",
                       "use_distributed_sampler", "fast_dev_run", "logger", "plugins")


def check_trainer_arguments(trainer: Mapping[str, Any]) -> None:
    """Every key of ``trainer`` is a Lightning ``Trainer`` argument that the engine honours (one line otherwise)."""
    import inspect

    known = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(k for k in trainer if k not in known)
    check(not unknown, f"trainer: {', '.join(map(repr, unknown))} is not a Lightning Trainer argument: fix the name "
                       "(see lightning.pytorch.Trainer)")
    engine = [k for k in ENGINE_TRAINER_KEYS if k in trainer]
    if engine:
        raise GaqError(f"trainer {engine[0]!r} is set by gaq itself (each unit runs recon.iters iterations with its "
                       "own checkpoints and logs): remove it")


def check_sample_device(device: str) -> None:
    """``device`` (where a calibration set is sampled: ``auto`` or a torch device) exists on this machine."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise GaqError(f"data.device (sample_device) {device!r} is not a torch device: use auto, cpu or "
                       "cuda[:N]") from None
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(dev.type, True)
    check(available, f"data.device (sample_device) {device!r}: this machine has no {dev.type} device; use auto or cpu")


def check_calibration_set(den: Denoiser, cs: CalibrationSet, path: str | os.PathLike | None = None) -> None:
    """The set fits the model: finite ``x_t``, channels, timesteps inside its schedule, the condition the model
    needs (``path``: the file the set was read from, named in the errors)."""
    where = f"calibration set file {path}" if path else "the calibration data"
    bad = int((~torch.isfinite(cs.x.reshape(len(cs), -1))).any(1).sum()) if len(cs) else 0
    advice = ("it is damaged; delete it and rerun `gaq calib-data` (or this command) to regenerate it" if path
              else "drop or fix those tuples")
    check(bad == 0, f"{where} holds NaN or Inf values in {bad} of {len(cs)} tuples (x_t): {advice}")
    channels = dict(getattr(den.model, "config", None) or {}).get("in_channels")
    check(channels is None or cs.x.ndim < 2 or cs.x.shape[1] == channels,
          f"{where}: x_t has {cs.x.shape[1] if cs.x.ndim > 1 else '?'} channels but the model takes {channels} "
          f"(x_t is (N, {channels}, H, W))")
    steps = den.alphas_cumprod.numel()
    if len(cs):
        lo, hi = int(cs.t.min()), int(cs.t.max())
        check(lo >= 0 and (steps == 0 or hi < steps),
              f"{where}: timesteps {lo}..{hi} lie outside the model's training timesteps 0..{steps - 1}"
              if steps else f"{where}: timesteps must be >= 0, got {lo}")
    need = {"class": "class_labels", "text": "encoder_hidden_states"}.get(den.cond_kind)
    check(need is None or need in cs.cond,
          f"{where}: the {den.cond_kind}-conditional model needs cond {need!r} with every batch, as (x_t, t, "
          f"{{'{need}': ...}}); got cond keys {sorted(cs.cond)}")


def _root_device(trainer: Mapping[str, Any]) -> tuple[torch.device, int]:
    """The device this process calibrates on, and the number of processes, from the Trainer arguments."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    placement = {k: v for k, v in trainer.items() if k in ("accelerator", "devices", "strategy", "num_nodes")}
    try:
        probe = pl.Trainer(**placement, logger=False, enable_progress_bar=False, enable_model_summary=False,
                           enable_checkpointing=False)
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        raise GaqError(f"trainer {placement}: {str(err).splitlines()[0]}; change trainer.accelerator / "
                       "trainer.devices") from None
    return probe.strategy.root_device, probe.world_size


def calibrate(model: Denoiser | str | os.PathLike | nn.Module, config: CalibrationConfig | None = None,
              data: Any = None, *, run_dir: str | os.PathLike | None = None, trainer: Mapping[str, Any] | None = None,
              scheduler: Any = None, cache_dir: str | os.PathLike = "calib_sets", sample_device: str = "auto",
              end_callbacks: list | None = None, record_extra: Mapping[str, Any] | None = None) -> nn.Module:
    """Quantize ``model`` with RTN, uniform reconstruction or GAC and return the quantized model.

    Args:
        model: a :class:`Denoiser`, a model folder / hub id, or a diffusers noise predictor module.
        config: the method and its settings (default: uniform reconstruction, W4A8 ``tfmq_compat``...
            as :class:`CalibrationConfig`'s defaults).
        data: a :class:`CalibrationSet`, a :class:`CalibSetConfig` (generated from the model and cached in
            ``cache_dir``) or an iterable of batches ``(x_t, t[, cond])``; None: ``CalibSetConfig()``.
        run_dir: the run folder (per-unit checkpoints, ``run.json``, ``summary.json``, ``quantized/``); the
            same folder resumes an interrupted run. None: a new temporary folder (one process only).
        trainer: Lightning ``Trainer`` arguments for every unit's fit (``accelerator``, ``devices``,
            ``strategy``, ``precision``, ``callbacks``, ``enable_progress_bar``); None: one device, automatic.
        scheduler: the diffusers scheduler of a bare module ``model`` (to generate its calibration set).
        cache_dir: where generated calibration sets are cached.
        sample_device: where a calibration set is generated (``auto``: cuda when available, else cpu).
        end_callbacks: objects with ``on_calibration_end`` / ``on_unit_end`` hooks (sample grids, metrics).
        record_extra: more entries for ``run.json`` (compared on resume).

    Returns:
        the quantized model (a fake-quantized copy; ``model`` is untouched), on the calibration device,
        weights and activations quantized; its ``gaq_summary`` attribute holds the run's summary and
        ``gaq_run_dir`` the run folder.
    """
    config = config if config is not None else CalibrationConfig()
    check(isinstance(config, CalibrationConfig), f"config must be a gaq.CalibrationConfig, got {type(config).__name__}")
    check(trainer is None or isinstance(trainer, Mapping),
          f"trainer must be a mapping of Lightning Trainer arguments, got {type(trainer).__name__}")
    trainer = dict(trainer or {"accelerator": "auto", "devices": 1})
    check_trainer_arguments(trainer)
    check_sample_device(sample_device)
    data = CalibSetConfig() if data is None else data
    shape = tuple(data.x.shape[1:]) if isinstance(data, CalibrationSet) else None
    den = as_denoiser(model, scheduler, shape)
    if isinstance(data, CalibSetConfig):
        check(den.alphas_cumprod.numel() > 0, "generating a calibration set needs the model's noise schedule: "
                                              "pass scheduler=<its diffusers scheduler> or a model folder")
        check_cache_dir(den, data, cache_dir)
    resolve_config(config.quant)  # a bad quantization setting fails here, before anything is computed or written
    if run_dir is not None:
        check_writable_folder(run_dir, "run_dir")
    device, world = _root_device(trainer)
    dm = calibration_data(den, data, config.split, cache_dir, sample_device)
    check_calibration_set(den, dm.calib_set, dm.calib_path)
    calib_meta = dm.calib_set.meta
    record = {**run_record(den, calib_meta.get("key", calib_meta), config), **(record_extra or {})}
    if run_dir is None:
        check(world == 1, "a multi-process run needs run_dir: every process must share the run folder")
        run_dir = tempfile.mkdtemp(prefix="gaq-run-")
        log.info("run folder: %s (pass run_dir to keep it and resume)", run_dir)
    run_dir = Path(run_dir)
    hooks = GACHooks(config.gac, dm, run_dir, config.diagnostics) if config.method == "gac" else None
    job = CalibrationJob(
        denoiser=den, datamodule=dm, quant=config.quant, method=config.method, recon=config.recon, run_dir=run_dir,
        make_trainer=unit_trainer_factory(trainer, run_dir),
        device=device, record=record, method_hooks=hooks, end_callbacks=list(end_callbacks or []),
        units=config.units, on_unit_error=config.on_unit_error)
    with RunLock(run_dir) if global_rank() == 0 else nullcontext():  # one writer per run folder
        qmodel, summary = calibrate_model(job)
    qmodel.gaq_summary, qmodel.gaq_run_dir = summary, run_dir
    return qmodel

