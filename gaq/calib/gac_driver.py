"""GAC's part of the calibration driver: one set of learned sample weights for the run, a meta phase
per unit, and the per-unit diagnostics (gradient-conflict matrices, omega spread, the paper's Figure 2).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from gaq.calib.diagnostics import (gradient_conflict_matrix, mean_conflict, per_sample_alignment,
                                   plot_conflict_matrix, plot_weight_by_step, plot_weight_vs_alignment,
                                   unit_weight_stats, validation_gradient, weight_vs_alignment)
from gaq.calib.gac import GACConfig
from gaq.calib.grouping import make_groups, per_step_gradients
from gaq.calib.recon import MetaPhase, UnitReconstruction
from gaq.calib.units import Unit
from gaq.calib.weights import LearnedSampleWeights
from gaq.atomic import atomic_write
from gaq.errors import check

log = logging.getLogger(__name__)


@dataclass
class DiagnosticsConfig:
    """Per-unit diagnostics of a GAC run (written as PNGs under ``<run>/diagnostics`` and to summary.json).

    Attributes:
        enabled: compute them at all.
        samples_per_step: training tuples per kept step for the per-timestep gradients.
        alignment_samples: training tuples for the weight-vs-alignment table (one backward each).
        bins: weight bins of that table.
    """

    enabled: bool = True
    samples_per_step: int = 32
    alignment_samples: int = 128
    bins: int = 5


class GACHooks:
    """Called by the driver around each unit's reconstruction when ``method: gac``."""

    def __init__(self, cfg: GACConfig, datamodule: Any, run_dir: Path, diagnostics: DiagnosticsConfig | None = None):
        self.cfg, self.dm, self.run_dir = cfg, datamodule, Path(run_dir)
        self.diag = diagnostics or DiagnosticsConfig()
        self.train_indices = torch.as_tensor(datamodule.train_indices).long()
        calib = datamodule.calib_set
        self.pos_of = calib.kept_pos.long()                   # kept-step position of each tuple
        self.num_kept = len(calib.timesteps)
        pos = self.pos_of[self.train_indices]
        tie = {"sample": None, "step": pos, "group": torch.as_tensor(datamodule.step_groups).long()[pos]}[cfg.weight_per]
        self.weights = LearnedSampleWeights(self.train_indices, s_init=cfg.s_init, tau=cfg.tau, tie=tie)
        self.unit_stats: dict[str, Any] = {}

    # ---- helpers ------------------------------------------------------------------------------
    def _weighted(self, unit: Unit) -> bool:
        return self.cfg.meta_iters > 0 and (unit.kind != "time" or self.cfg.weight_time_unit)

    def _weights_file(self, k: int) -> Path:
        return self.run_dir / "gac" / f"{k:03d}-s.safetensors"

    def _pos(self, index: Tensor) -> Tensor:
        return self.pos_of[index]

    def _by_step(self, indices: Tensor, cap: int | None) -> list[Tensor]:
        pos = self._pos(indices)
        return [indices[pos == p][:cap] for p in range(self.num_kept)]

    def _val_groups(self, group_of_step: Tensor) -> list[Tensor]:
        val = torch.as_tensor(self.dm.val_indices).long()
        g = group_of_step[self._pos(val)]
        return [val[g == j] for j in range(int(group_of_step.max()) + 1)]

    def _step_grads(self, module: UnitReconstruction, weighted: bool = False) -> Tensor:
        """Per kept step, the gradient of the step's mean reconstruction error, or (``weighted``) of its
        error weighted by the learned sample weights, as the reconstruction sees it."""
        batches = self._by_step(self.train_indices, self.diag.samples_per_step)
        if weighted:
            def loss(f, b):
                return module.unit_error(b, call=f) * self.weights.weights(b).detach()
        else:
            def loss(f, b):
                return module.unit_error(b, call=f)
        return per_step_gradients(module.unit, module._rounding, loss, batches)

    # ---- driver hooks -------------------------------------------------------------------------
    def unit_loaded(self, k: int, unit: Unit) -> None:
        """A finished unit was loaded from its checkpoint: restore the weights it ended with (carry-over)."""
        path = self._weights_file(k)
        if self.cfg.carry_over and self._weighted(unit) and path.exists():
            self.weights.s.copy_(load_file(str(path))["s"])

    def prepare_unit(self, module: UnitReconstruction, k: int, unit: Unit, cache) -> None:
        if not self._weighted(unit):
            return
        if not self.cfg.carry_over:
            self.weights.reset()
        grads = self._step_grads(module) if (self.diag.enabled or self.cfg.grouping == "adaptive") else None
        contiguous = torch.as_tensor(self.dm.step_groups)  # the DataModule's group id per kept step
        groups = (make_groups("adaptive", self.num_kept, self.dm.num_groups, grad_per_step=grads,
                              contiguous=self.cfg.adaptive_contiguous)
                  if self.cfg.grouping == "adaptive" else contiguous)
        val_groups = self._val_groups(torch.as_tensor(groups).long())
        check(all(len(v) for v in val_groups),
              f"unit {unit.name}: a timestep group has no validation tuples; raise data.split.val_fraction")
        self._pending = {"groups": [int(g) for g in groups], "conflict_before": grads}
        module.enable_meta(MetaPhase(self.weights, self.cfg, val_groups))

    def finish_unit(self, module: UnitReconstruction, k: int, unit: Unit, cache) -> dict[str, Any]:
        if not self._weighted(unit):
            return {"gac": "uniform (time unit)" if unit.kind == "time" else "uniform"}
        is_zero = module.trainer.is_global_zero
        if is_zero:
            s = {"s": self.weights.s.detach().cpu().contiguous()}
            atomic_write(self._weights_file(k), lambda tmp: save_file(s, str(tmp)))
        stats = unit_weight_stats(self.weights, self.pos_of, self.num_kept)
        stats["groups"] = self._pending["groups"]
        if self.diag.enabled:
            stats.update(self._diagnose(module, k, unit, is_zero, stats["mean_weight_per_step"]))
        self.unit_stats[unit.name] = stats
        log.info("unit %s: omega max/min %.4f, normalized entropy %.6f", unit.name, stats["max_min_ratio"],
                 stats["normalized_entropy"])
        return {"gac": stats}

    def _diagnose(self, module: UnitReconstruction, k: int, unit: Unit, is_zero: bool,
                  mean_weight_per_step: list[float]) -> dict[str, Any]:
        from gaq.quant import set_adaround_soft
        for _, layer in unit.layers:  # gradients of the reconstructed unit, through its soft rounding
            set_adaround_soft(layer, True)
        try:
            before = self._pending["conflict_before"]
            after = self._step_grads(module)
            cb, ca = gradient_conflict_matrix(before), gradient_conflict_matrix(after)
            # the weights' own effect at the same (reconstructed) rounding ("after" mixes it with the rounding's).
            # Cosines are blind to each step's overall scale, so this sees only reweighting *within* steps;
            # the weights' shift between steps acts through the path the rounding takes, not here.
            cw = gradient_conflict_matrix(self._step_grads(module, weighted=True))
            g = torch.Generator().manual_seed(k)
            pick = self.train_indices[torch.randperm(len(self.train_indices), generator=g)[:self.diag.alignment_samples]]
            val = self._val_groups(torch.zeros(self.num_kept, dtype=torch.long))
            ref = validation_gradient(module.unit, module._rounding, lambda f, b: module.unit_error(b, call=f), val)
            align = per_sample_alignment(module.unit, module._rounding, lambda f, b: module.unit_error(b, call=f),
                                         pick, ref)
            table = weight_vs_alignment(self.weights.weights(pick).detach().cpu(), align.cpu(), self.diag.bins)
        finally:
            for _, layer in unit.layers:
                set_adaround_soft(layer, False)
        out = {"mean_conflict_before": mean_conflict(cb), "mean_conflict_after": mean_conflict(ca),
               "mean_conflict_after_weighted": mean_conflict(cw), "weight_vs_alignment": table}
        if is_zero:
            d = self.run_dir / "diagnostics"
            d.mkdir(parents=True, exist_ok=True)
            stem = f"{k:03d}-{unit.name.replace('.', '_')}"
            plot_conflict_matrix(cb.cpu(), ca.cpu(), d / f"{stem}-conflict.png")
            plot_weight_by_step(mean_weight_per_step, d / f"{stem}-weight_by_step.png")
            plot_weight_vs_alignment(table, d / f"{stem}-weight_vs_alignment.png")
        return out

    def summary(self) -> dict[str, Any]:
        return {"gac": {"config": self.cfg.__dict__, "units": self.unit_stats}}
