"""Evaluation of an FP model or a quantized run: the whole job (sampling is :mod:`gaq.eval.generation`, the
real images :mod:`gaq.eval.reference`).

``gaq evaluate`` (see :mod:`gaq.eval.cli`) calls :func:`run_evaluation`, which

1. loads the FP model (``source``) and, with ``run``, the run's quantized model on top of it;
2. with ``run``, measures the per-step noise-prediction error of the quantized model against the FP
   model on the FP model's DDIM trajectories, per step and per timestep group
   (:mod:`gaq.eval.timestep_error`);
3. with ``run`` and ``fidelity.enabled``, draws (or reads from the cache) the FP model's samples of
   the same sampling settings (:mod:`gaq.eval.fp_samples`), the targets of the fidelity metrics
   (PSNR / SSIM / MSE per sample, FID to FP: :mod:`gaq.eval.fidelity`);
4. samples ``num_samples`` images with ``Trainer.predict`` over a :class:`SamplingModule` (the
   Trainer owns the device, precision and progress bar); class-conditional models get the classes
   round-robin (sample ``i`` asks for class ``i % num_classes``; ``num_samples`` must be a multiple
   of the class count, so every class gets the same number of samples);
5. lets :class:`~gaq.eval.callbacks.MetricsCallback` and
   :class:`~gaq.eval.callbacks.SampleGridCallback` turn the samples into ``metrics.json`` /
   ``metrics.csv`` and ``samples_grid.png``.

Sample ``i``'s starting noise comes from its own generator seeded by ``(seed, i)``: samples do not
depend on the batch size or device count (with ``eta > 0`` the per-step noise is drawn per batch and
does depend on the batching).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from torch import nn

import gaq
from gaq.deploy.config import DeployConfig
from gaq.errors import check
from gaq.eval.fidelity import FidelityConfig
from gaq.eval.metrics import MetricsConfig
from gaq.eval.timestep_error import TimestepErrorConfig
from gaq.models.loading import Denoiser
from gaq.provenance import device_name, git_commit
from gaq.eval.generation import SamplingConfig, Conditioning, SamplingModule
from gaq.eval.reference import ReferenceConfig

RUN_QUANTIZED_DIR = "quantized"     # where gaq calibrate saves the quantized model inside a run folder
RUN_SUMMARY_FILE = "summary.json"   # gaq calibrate's summary inside a run folder
RUN_EVAL_DIR = "eval"               # default output folder of `gaq evaluate --run R`: R/eval
FP_EVAL_DIR = "runs/eval-fp"        # default output folder of an FP evaluation


@dataclass
class GridConfig:
    """The sample grid: ``per_class`` samples per row, one row per class (at most ``max_rows``)."""

    per_class: int = 10
    max_rows: int = 10
    scale: int = 4


@dataclass
class EvaluateConfig(SamplingConfig):
    """Everything ``gaq evaluate`` reads (the ``trainer`` section aside).

    The samples to draw are the fields inherited from :class:`SamplingConfig` (``num_samples``,
    ``batch_size``, ``seed``, ``sampler``, ``cond_embeddings``, ``prompts``: top-level keys of the YAML,
    declared and checked there once); :meth:`sampling` gives them as a :class:`SamplingConfig`.

    Attributes:
        source: the FP model (folder or hub id). With ``run`` and no ``source``, the run's base model.
        run: a ``gaq calibrate`` run folder: evaluate its ``quantized/`` model on top of ``source``.
            Without it, the FP model is evaluated.
        out_dir: output folder; default ``<run>/eval``, or ``runs/eval-fp`` for the FP model.
        features: the default model's classifier folder (FID / sFID / precision / recall / accuracy
            features), e.g. ``checkpoints/default/classifier``; None: no classifier metrics.
        reference: the real images of the reference statistics and their cache.
        metrics: metric settings (k, sFID channels, Inception).
        grid: the sample grid.
        timestep_error: the per-step error of a quantized run against the FP model.
        fidelity: PSNR / SSIM / MSE / FID of a quantized run's samples against the FP model's samples
            from the same noise (FP samples cached in ``reference.cache_dir``).
        deploy: a run only: evaluate the deployed form of its quantized model (:func:`gaq.deploy.deploy`:
            integer weights and GEMMs, ``deploy.dtype`` elsewhere) instead of the fake-quantized one;
            None (default): the fake-quantized model.
    """

    source: str | None = None
    run: str | None = None
    out_dir: str | None = None
    features: str | None = None
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    timestep_error: TimestepErrorConfig = field(default_factory=TimestepErrorConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    deploy: DeployConfig | None = None

    def sampling(self) -> SamplingConfig:
        """The sampling settings alone (the fields inherited from :class:`SamplingConfig`): what the sampling,
        the metrics' records and the FP-sample cache key are made of."""
        return SamplingConfig(**{f.name: getattr(self, f.name) for f in fields(SamplingConfig)})

    def output_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        return Path(self.run) / RUN_EVAL_DIR if self.run else Path(FP_EVAL_DIR)


def load_models(cfg: EvaluateConfig) -> tuple[Denoiser, nn.Module, dict]:
    """The FP :class:`Denoiser`, the model to evaluate (FP or quantized) and what it is (for metrics.json)."""
    from gaq.models.loading import load_denoiser
    from gaq.quant import load_quantized, read_quant_config

    source, info = cfg.source, {"run": cfg.run}
    if cfg.run:
        run = Path(cfg.run)
        check(run.is_dir(), f"run folder '{run}' does not exist; give a folder written by gaq calibrate")
        check((run / RUN_QUANTIZED_DIR).is_dir(),
              f"run folder '{run}' has no {RUN_QUANTIZED_DIR}/ (the calibration did not finish); rerun gaq calibrate")
        qcfg = read_quant_config(run / RUN_QUANTIZED_DIR)
        source = source or qcfg["base_source"]
        info.update(preset=qcfg.get("preset"), w_bits=qcfg.get("w_bits"), a_bits=qcfg.get("a_bits"),
                    method=qcfg.get("extra", {}).get("method"))
        summary = run / RUN_SUMMARY_FILE
        if summary.is_file():
            s = json.loads(summary.read_text())
            info.update(calibration_seconds=s.get("calibration_seconds"), peak_memory_bytes=s.get("peak_memory_bytes"),
                        calibration_device=s.get("device"))
    check(source is not None, "set `source` (the FP model folder or hub id) or `run` (a gaq calibrate run folder)")
    check(cfg.deploy is None or cfg.run, "deploy: needs run: (a gaq calibrate run folder); the FP model has nothing "
          "to deploy")
    den = load_denoiser(source)
    info["source"] = source
    model = load_quantized(Path(cfg.run) / RUN_QUANTIZED_DIR, den.model) if cfg.run else den.model
    info["model"] = "quantized" if cfg.run else "fp"
    if cfg.deploy is not None:
        from gaq.deploy import deploy
        model = deploy(model, cfg.deploy)
        info["model"], info["deploy"] = "deployed", asdict(cfg.deploy)
    return den, model.eval(), info


def run_evaluation(cfg: EvaluateConfig, trainer_kwargs: dict[str, Any], command: str = "") -> dict:
    """Evaluate as described in the module docstring; returns the content of ``metrics.json``.

    Args:
        cfg: what to evaluate and how.
        trainer_kwargs: ``pl.Trainer`` arguments (the YAML's ``trainer`` section, callbacks
            instantiated); gaq's metrics and grid callbacks are added in front of its callbacks.
        command: the command line, recorded in ``metrics.json``.
    """
    from gaq.eval.callbacks import MetricsCallback, SampleGridCallback
    from gaq.eval.fidelity import FidelityMeter
    from gaq.eval.fp_samples import fp_samples
    from gaq.eval.timestep_error import save_timestep_error, timestep_error

    out_dir = cfg.output_dir()
    sampling = cfg.sampling()
    metrics_cb = MetricsCallback(features=cfg.features, reference=cfg.reference, metrics=cfg.metrics, sampling=sampling)
    grid_cb = SampleGridCallback(per_class=cfg.grid.per_class, max_rows=cfg.grid.max_rows, scale=cfg.grid.scale,
                                 sampling=sampling)
    den, model, info = load_models(cfg)
    conditioning = Conditioning.of(den, sampling)
    conditioning.check_balanced(sampling.num_samples)
    kwargs = dict(trainer_kwargs)
    user_callbacks = list(kwargs.get("callbacks") or [])
    kwargs["callbacks"] = [metrics_cb, grid_cb, *user_callbacks]
    progress = kwargs.get("enable_progress_bar") is not False
    if progress and not any(isinstance(cb, ProgressBar) for cb in user_callbacks):
        kwargs["callbacks"].append(RichProgressBar(leave=False))
    kwargs.setdefault("default_root_dir", str(out_dir))
    trainer = pl.Trainer(**kwargs)
    check(trainer.world_size == 1, "gaq evaluate samples on one device; set trainer.devices: 1")
    device = trainer.strategy.root_device
    out_dir.mkdir(parents=True, exist_ok=True)

    ts_summary = None
    if cfg.run and cfg.timestep_error.enabled:
        t0 = time.perf_counter()
        result = timestep_error(den.model.to(device), model.to(device), den, cfg.sampler, conditioning,
                                cfg.timestep_error, cfg.seed)
        title = f"{info.get('method')} W{info.get('w_bits')}A{info.get('a_bits')} ({info.get('preset')}) vs FP"
        json_path, png_path = save_timestep_error(result, out_dir, title)
        ts_summary = {"mean_mse": result["mean_mse"], "mean_rel_mse": result["mean_rel_mse"],
                      "max_mse": result["max_mse"], "num_groups": result["num_groups"], "group_mse": result["group_mse"],
                      "group_steps": result["group_steps"], "seconds": time.perf_counter() - t0,
                      "json": json_path.name, "png": png_path.name}
    notes = []
    if cfg.run and cfg.fidelity.enabled:
        fp_images, fp_info = fp_samples(den, sampling, cfg.fidelity.count(sampling.num_samples), cfg.reference.cache_dir,
                                        device, str(trainer.precision), trainer.precision_plugin.predict_step_context(),
                                        progress)
        metrics_cb.fidelity = FidelityMeter(fp_images, cfg.fidelity.psnr_cap_db, fp_info)
    else:
        notes.append("fidelity to FP skipped: " + ("no run (FP evaluation)" if not cfg.run else "fidelity.enabled is false"))
    metrics_cb.meta = {
        "command": command, "model": info, "device": device_name(device), "git_commit": git_commit(),
        "gaq_version": gaq.__version__, "timestep_error": ts_summary,
        "sampling": {"num_samples": sampling.num_samples, "batch_size": sampling.batch_size, "seed": sampling.seed,
                     "sampler": asdict(sampling.sampler), "cond_kind": den.cond_kind},
    }
    if ts_summary is None:
        notes.append("timestep error skipped: " + ("no run (FP evaluation)" if not cfg.run
                                                   else "timestep_error.enabled is false"))
    if den.decoder is None and den.image_shape[0] not in (1, 3):
        notes.append(f"the samples are {den.image_shape[0]}-channel latents (no vae/ or vqvae/ in the model folder): "
                     "the grid shows their first channels; add the autoencoder to see images")
    metrics_cb.notes_extra = notes
    module = SamplingModule(model, den, sampling, out_dir)
    trainer.predict(module, dataloaders=module.dataloader(), return_predictions=False)
    return metrics_cb.written
