"""Evaluation side jobs as Lightning callbacks: sample grids and metrics.

Both callbacks work in two places:

- ``gaq evaluate``: ``Trainer.predict`` over a :class:`~gaq.eval.generation.SamplingModule`; the
  callbacks consume each batch of samples in ``on_predict_batch_end`` and write their files into the
  module's ``out_dir`` in ``on_predict_end``.
- ``gaq calibrate``: listed in ``trainer.callbacks`` (``class_path: gaq.eval.callbacks.MetricsCallback``),
  they do nothing during the per-unit fits; the calibration driver calls
  ``on_calibration_end(qmodel, denoiser, run_dir)`` once the quantized model is final (rank 0 only),
  and they sample the quantized model themselves (``sampling``) and write into
  ``<run_dir>/<subdir>``. :func:`gaq.calib.driver.calibration_end` calls that hook on every callback that has it.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from gaq.errors import check
from gaq.eval.generation import Conditioning, SamplingConfig, SamplingModule, generate, module_device
from gaq.eval.reference import ReferenceConfig, reference_stats
from gaq.eval.fidelity import FidelityMeter, distances_to_fp
from gaq.eval.grid import save_grid
from gaq.eval.metrics import FeatureStats, MetricsConfig, build_extractors, compute_metrics, extract_all
from gaq.models.loading import Denoiser

log = logging.getLogger(__name__)

CALIBRATION_EVAL_DIR = "calibration_eval"  # default subfolder of a run folder for on_calibration_end outputs


def _sampling_module(pl_module: pl.LightningModule, name: str) -> SamplingModule | None:
    if isinstance(pl_module, SamplingModule):
        return pl_module
    log.warning("%s: predict ran on %s, not a gaq SamplingModule: nothing to do", name, type(pl_module).__name__)
    return None


class MetricsCallback(Callback):
    """FID, sFID, improved precision / recall and class accuracy (and FID-Inception / IS where
    Inception is available) of generated samples against cached reference statistics; with a
    :attr:`fidelity` meter (set by ``gaq evaluate`` for a quantized run), also the fidelity of the
    samples to the FP model's samples of the same indices (:mod:`gaq.eval.fidelity`).

    Writes ``<filename>.json`` (metrics, notes, reference and sampling details, plus the ``meta``
    dict given by the caller) and ``<filename>.csv`` (``metric,value`` rows, per-class accuracies as
    ``accuracy_class_<c>``).

    Args:
        features: the default model's classifier folder (e.g. ``checkpoints/default/classifier``);
            None: no classifier metrics.
        reference: the real images and the cache of their features.
        metrics: metric settings.
        sampling: what to sample in :meth:`on_calibration_end` (``gaq evaluate`` samples itself).
        subdir: output subfolder of the run folder in :meth:`on_calibration_end`.
        filename: output file stem.
    """

    def __init__(self, features: str | None = "checkpoints/default/classifier",
                 reference: ReferenceConfig = ReferenceConfig(), metrics: MetricsConfig = MetricsConfig(),
                 sampling: SamplingConfig = SamplingConfig(), subdir: str = CALIBRATION_EVAL_DIR, filename: str = "metrics"):
        self.features = features
        self.reference = copy.deepcopy(reference)
        self.metrics = copy.deepcopy(metrics)
        self.sampling = copy.deepcopy(sampling)
        self.subdir = subdir
        self.filename = filename
        self.extractors, self.notes = build_extractors(features, self.metrics)
        self.meta: dict[str, Any] = {}          # extra entries for the JSON file (set by the caller)
        self.notes_extra: list[str] = []        # extra one-line notes (set by the caller)
        self.fidelity: FidelityMeter | None = None  # the FP samples to compare with (set by the caller)
        self.written: dict[str, Any] = {}       # the content of the last JSON written
        self._reset()

    def _reset(self) -> None:
        self._parts: dict[str, list[FeatureStats]] = {e.name: [] for e in self.extractors}
        self._labels: list[Tensor] = []
        self._index: list[Tensor] = []
        self._fp: dict[str, FeatureStats] = {}   # the extractors' outputs on the fidelity meter's FP samples
        self._den: Denoiser | None = None
        self._out: Path | None = None
        self._real: dict[str, FeatureStats] = {}
        self._ref_info: dict[str, dict] = {}
        self._t0 = 0.0

    # ------------------------------------------------------------------ the accumulation
    def start(self, den: Denoiser, device: torch.device, out_dir: str | Path) -> None:
        """Prepare a new measurement: extractors on ``device``, reference statistics loaded or computed."""
        self._reset()
        self._den, self._out, self._t0 = den, Path(out_dir), time.perf_counter()
        for ex in self.extractors:
            ex.check_channels(den.image_shape[0])
            ex.to(device)
            self._real[ex.name], self._ref_info[ex.name] = reference_stats(self.reference, ex, tuple(den.image_shape),
                                                                           self.metrics.batch_size)
            if self.fidelity is not None:
                self._fp[ex.name] = extract_all(ex, self.fidelity.fp_images, self.metrics.batch_size)

    def add(self, images: Tensor, cond_id: Tensor, index: Tensor) -> None:
        """Accumulate the extractors' outputs on a batch of samples ``(B, C, H, W)`` in [-1, 1] with
        conditions ``cond_id`` ``(B,)``, sample indices ``index`` ``(B,)``."""
        # before any metric: NaN features crash LAPACK inside the Frechet distance (a segfault, not an error)
        check(bool(torch.isfinite(images).all()),
              f"samples {int(index.min())}..{int(index.max())} hold NaN or Inf: the model's noise predictions are "
              "not finite; check its weights (gaq.quantize refuses non-finite ones)")
        for ex in self.extractors:
            for s in range(0, len(images), self.metrics.batch_size):
                self._parts[ex.name].append(ex.extract(images[s:s + self.metrics.batch_size]))
        self._labels.append(cond_id.detach().cpu().long())
        self._index.append(index.detach().cpu().long())
        if self.fidelity is not None:
            self.fidelity.update(index, images)

    def finish(self) -> dict[str, Any]:
        """Compute the metrics of everything added since :meth:`start`, write the files, return the JSON content."""
        den = self._den
        check(den is not None and self._out is not None, "MetricsCallback.finish called before start")
        labels = torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.long)
        is_class = den.cond_kind == "class"
        values: dict[str, Any] = {}
        features: dict[str, str] = {}
        for ex in self.extractors:
            fake = FeatureStats.cat(self._parts[ex.name])
            values.update(compute_metrics(ex, self._real[ex.name], fake, labels if is_class else None,
                                          den.num_classes if is_class else None, self.metrics))
            features[ex.name] = ex.description
        fidelity = None
        if self.fidelity is not None:
            values.update(self.fidelity.compute())
            index = torch.cat(self._index)
            order = index.argsort()
            paired = order[index[order] < len(self.fidelity)]  # generated rows of samples 0..n-1, in order
            for ex in self.extractors:
                values.update(distances_to_fp(ex.name, self._fp[ex.name], FeatureStats.cat(self._parts[ex.name]).rows(paired)))
            fidelity = {"num_samples": len(self.fidelity), "psnr_cap_db": self.fidelity.psnr_cap_db,
                        "fp_samples": self.fidelity.info}
        counts = torch.bincount(labels, minlength=den.num_classes).tolist() if is_class and len(labels) else None
        result = {
            **self.meta,
            "metrics": values,
            "notes": [*self.notes, *self.notes_extra],
            "features": features,
            "reference": self._ref_info,
            "fidelity": fidelity,
            "samples": {"count": int(len(labels)), "per_class": counts, "seconds": time.perf_counter() - self._t0},
            "metric_settings": {"k": self.metrics.k, "sfid_channels": self.metrics.sfid_channels,
                                "inception": self.metrics.inception, "pr_equal_sizes": self.metrics.pr_equal_sizes},
        }
        self._out.mkdir(parents=True, exist_ok=True)
        (self._out / f"{self.filename}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        write_metrics_csv(self._out / f"{self.filename}.csv", values)
        self.written = result
        for ex in self.extractors:
            ex.to("cpu")
        return result

    # ------------------------------------------------------------------ gaq evaluate (Trainer.predict)
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = _sampling_module(pl_module, "MetricsCallback")
        if module is not None:
            self.start(module.denoiser, pl_module.device, module.out_dir)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._den is not None:
            self.add(outputs["images"], outputs["cond_id"], outputs["index"])
            # a line per batch in the log: with the output redirected, the progress bar shows nothing
            done = sum(len(i) for i in self._index)
            log.info("sampled %d of %d images (%.0f s)", done, self.sampling.num_samples,
                     time.perf_counter() - self._t0)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._den is not None:
            self.finish()

    # ------------------------------------------------------------------ gaq calibrate
    def on_calibration_end(self, qmodel: nn.Module, denoiser: Denoiser, run_dir: str | Path) -> dict[str, Any]:
        """Sample ``qmodel`` (where it is) per ``sampling``, measure, write into ``<run_dir>/<subdir>``."""
        Conditioning.of(denoiser, self.sampling).check_balanced(self.sampling.num_samples, "sampling.num_samples")
        self.start(denoiser, module_device(qmodel), Path(run_dir) / self.subdir)
        self.meta = {**self.meta, "model": {"model": "quantized", "run": str(run_dir), "source": denoiser.source}}
        for index, cond_id, images in generate(qmodel.eval(), denoiser, self.sampling):
            self.add(images, cond_id, index)
        return self.finish()


def write_metrics_csv(path: str | Path, values: dict[str, Any]) -> Path:
    """``metric,value`` rows of the scalar metrics; lists become ``<name>_class_<i>`` rows; None stays empty."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "value"])
        for key, value in values.items():
            if isinstance(value, list):
                base = key.replace("per_class_", "")
                for i, v in enumerate(value):
                    writer.writerow([f"{base}_class_{i}", "" if v is None or (isinstance(v, float) and math.isnan(v)) else v])
            else:
                writer.writerow([key, "" if value is None else value])
    return path


class SampleGridCallback(Callback):
    """A PNG grid of samples: one row per class (``per_class`` samples each, at most ``max_rows``
    classes); for unconditional / text models ``max_rows`` rows of ``per_class`` samples.

    Args:
        per_class: samples per row.
        max_rows: rows at most (the first classes for class models).
        scale: pixel enlargement of the PNG.
        filename: PNG file name.
        sampling: sampler and seed used by :meth:`on_calibration_end` (its ``num_samples`` is ignored:
            ``per_class`` times the rows are drawn).
        subdir: output subfolder of the run folder in :meth:`on_calibration_end`.
        every_n_units: under ``gaq calibrate``, also a grid of the partly calibrated model (weights of
            the finished units quantized, everything else FP) after every this many units, as
            ``<subdir>/units/grid_unit_<k>.png``; 0: only at the end.
    """

    def __init__(self, per_class: int = 10, max_rows: int = 10, scale: int = 4, filename: str = "samples_grid.png",
                 sampling: SamplingConfig = SamplingConfig(), subdir: str = CALIBRATION_EVAL_DIR, every_n_units: int = 0):
        check(per_class >= 1 and max_rows >= 1, "SampleGridCallback needs per_class >= 1 and max_rows >= 1")
        check(every_n_units >= 0, f"SampleGridCallback.every_n_units must be >= 0, got {every_n_units}")
        self.per_class, self.max_rows, self.scale = per_class, max_rows, scale
        self.every_n_units = every_n_units
        self.filename = filename
        self.sampling = copy.deepcopy(sampling)
        self.subdir = subdir
        self.path: Path | None = None  # the last PNG written
        self._rows: dict[int, list[Tensor]] = {}
        self._den: Denoiser | None = None
        self._out: Path | None = None

    def _num_rows(self, den: Denoiser) -> int:
        return min(self.max_rows, den.num_classes) if den.cond_kind == "class" else self.max_rows

    def start(self, den: Denoiser, out_dir: str | Path) -> None:
        self._rows, self._den, self._out = {}, den, Path(out_dir)

    def add(self, images: Tensor, cond_id: Tensor, index: Tensor) -> None:
        """Keep the images the grid still needs from a batch ``(B, C, H, W)``."""
        den = self._den
        rows = self._num_rows(den)
        for img, c, i in zip(images.detach().float().cpu(), cond_id.tolist(), index.tolist()):
            row = int(c) if den.cond_kind == "class" else int(i) // self.per_class
            if row < rows and len(self._rows.setdefault(row, [])) < self.per_class:
                self._rows[row].append(img)

    def finish(self, filename: str | None = None) -> Path | None:
        """Write the grid (rows in class order, as wide as the longest row; shorter rows padded with white)
        to ``filename`` (default :attr:`filename`) in the output folder."""
        if not self._rows or self._out is None:
            return None
        shape = next(iter(self._rows.values()))[0].shape
        blank = torch.full(shape, 1.0)
        width = max(len(row) for row in self._rows.values())
        cells = [img for r in sorted(self._rows) for img in (self._rows[r] + [blank] * (width - len(self._rows[r])))]
        self.path = save_grid(torch.stack(cells), self._out / (filename or self.filename), nrow=width, scale=self.scale)
        return self.path

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = _sampling_module(pl_module, "SampleGridCallback")
        self._den = None
        if module is not None:
            self.start(module.denoiser, module.out_dir)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._den is not None:
            self.add(outputs["images"], outputs["cond_id"], outputs["index"])

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._den is not None:
            self.finish()

    def on_calibration_end(self, qmodel: nn.Module, denoiser: Denoiser, run_dir: str | Path) -> dict[str, Any]:
        """Sample the grid from ``qmodel`` (where it is) and write ``<run_dir>/<subdir>/<filename>``."""
        path = self._sample_grid(qmodel, denoiser, Path(run_dir) / self.subdir, self.filename)
        return {"grid": None if path is None else str(path)}

    def on_unit_end(self, qmodel: nn.Module, denoiser: Denoiser, run_dir: str | Path, k: int) -> None:
        """After unit ``k`` of a calibration: every ``every_n_units`` units, the grid of the model so far."""
        if self.every_n_units and (k + 1) % self.every_n_units == 0:
            self._sample_grid(qmodel, denoiser, Path(run_dir) / self.subdir / "units", f"grid_unit_{k:03d}.png")

    def _sample_grid(self, qmodel: nn.Module, denoiser: Denoiser, out_dir: Path, filename: str) -> Path | None:
        self.start(denoiser, out_dir)
        rows = self._num_rows(denoiser)
        cond_ids = torch.arange(rows).repeat_interleave(self.per_class) if denoiser.cond_kind == "class" else None
        sampling = SamplingConfig(rows * self.per_class, self.sampling.batch_size, self.sampling.seed,
                                  self.sampling.sampler, self.sampling.cond_embeddings, self.sampling.prompts)
        for index, cond_id, images in generate(qmodel.eval(), denoiser, sampling, cond_ids):
            self.add(images, cond_id, index)
        return self.finish(filename)
