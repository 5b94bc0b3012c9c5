"""One reconstruction unit as a LightningModule in manual-optimization mode.

AdaRound block reconstruction (BRECQ): Adam on the unit's rounding logits minimises
``mean_i w_i * ||f_Q(x_i) - f_FP(x_i)||^2 + lambda * sum(1 - |2h(alpha) - 1|^beta)``,
with the per-sample error summed over channels and averaged over space, and per-sample
weights ``w_i`` from a weight source (all ones for the uniform baseline, learned for GAC).

The data comes from the calibration DataModule: its ``unit_train_dataloader`` serves, per Lightning
step, the global indices of that step's iterations and meta steps (a pure function of seed and step
number) and resumes mid-epoch through Lightning's resumable-loader state, so a run resumed from a
Lightning checkpoint continues exactly where the straight run would be (the module checks each step's
data against its own checkpointed counters). Under
DDP every global batch is split evenly between ranks, so the averaged gradient equals the
single-process gradient of the same global batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from gaq.calib.cache import Placement, UnitCache
from gaq.calib.weights import UniformWeights
from gaq.data.datamodule import CalibrationDataModule, UnitSchedule, UnitStepLoader
from gaq.errors import GaqError, check
from gaq.quant.adaround import BetaSchedule

log = logging.getLogger(__name__)


@dataclass
class ReconConfig:
    """Block reconstruction settings (TFMQ-DM / BRECQ defaults).

    Attributes:
        iters: AdaRound iterations per unit (paper: 20,000).
        batch_size: global batch per iteration (split evenly across DDP ranks).
        lr: Adam learning rate on the rounding logits.
        reg_weight: weight of the AdaRound rounding regulariser.
        beta_start / beta_end: annealing of the regulariser's exponent.
        warmup: fraction of iterations with the regulariser off and beta held at ``beta_start``.
        ckpt_every: write a resumable Lightning checkpoint every this many iterations and meta steps
            (at the end of the Lightning step that reaches a multiple; 0: none).
        iters_per_step: iterations (or meta steps) per Lightning step: Lightning's per-step work
            (hooks, progress bar, checkpoint test) is paid once per this many iterations.
        cuda_graph: ``auto``: on a CUDA device with the cache on it, capture one iteration's forward
            and backward (and one GAC meta step's hypergradient) as CUDA graphs and replay them
            (:mod:`gaq.calib.graphed`), falling back to eager where a capture fails; ``on``: the
            same, but a failed capture is an error; ``off``: always eager.
        seed: data-order seed.
        cache_batch: batch size used to capture unit inputs and targets.
        cache_placement: where each unit's input/target cache lives: ``device``, ``host`` (pinned memory),
            ``disk`` (a safetensors file under ``cache_dir``, written while the cache is filled, read
            memory-mapped, the reconstruction's next batches read ahead by a background thread; removed when
            the unit ends), or ``auto``: the device if the cache fits in half of its free memory, else the
            host if it fits in ``cache_host_share`` of the free host memory, else the disk.
        cache_dir: the folder of the disk caches; None: ``<run_dir>/cache``.
        cache_device_max_gib: ``auto`` keeps a unit's cache on the device only when it takes at most this many GiB
            (and half the free device memory); a larger one goes to the host, where its batches are staged to
            the device (:class:`~gaq.calib.cache.DeviceWindow`). None: no limit but the free memory. Bounds the
            calibration's peak GPU memory at about this plus the unit's working memory *(ours)*.
        cache_host_share: the share of the free host memory (``os.sysconf``'s free pages) that ``auto`` lets a
            host-placed cache take; a larger cache goes to disk.
        cache_read_ahead: batches of a disk cache read ahead of the step that uses them (pinned host buffers).
        cache_dtype: the dtype the unit caches store floating-point inputs and FP targets in:
            ``float32`` (exact), or ``bfloat16`` / ``float16`` (half the memory; batches are handed to
            the unit in the dtype they were captured in, so only the stored values are rounded) *(ours)*.
        time_unit: reconstruct the time-embedding path jointly (TFMQ-DM); else layer by layer.
        log_every: log losses every this many iterations.
        act_iters: iterations per unit of the activation step-size phase, which runs where the
            preset learns activation step sizes (``act_learn_step``, Q-Diffusion): after every unit's
            weights are reconstructed and the activation ranges calibrated, each unit's step sizes are
            tuned on the same block-output loss with weights and activations quantized. None: a
            quarter of ``iters`` (Q-Diffusion's 5,000 against 20,000) *(ours)*; 0: no such phase.
        act_lr: Adam learning rate on the activation step sizes (BRECQ's 4e-5 for LSQ step sizes).
        tf32: which float32 CUDA operations of the calibration (cache building, reconstruction, GAC's meta
            steps, activation calibration) may run on TF32 tensor cores: ``conv`` (PyTorch's defaults:
            cuDNN convolutions do, matmuls do not), ``all`` (matmuls too: linear layers, attention; the
            transformer units of LDMs and DiTs run on tensor cores like the convolutions of a UNet) or
            ``none`` (IEEE float32 everywhere, the slowest) *(ours)*. No effect on the CPU.
    """

    iters: int = 20000
    batch_size: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    ckpt_every: int = 1000
    iters_per_step: int = 10
    cuda_graph: Literal["auto", "on", "off"] = "auto"
    seed: int = 0
    cache_batch: int = 256
    cache_placement: Placement = "auto"
    cache_dir: str | None = None
    cache_device_max_gib: float | None = None
    cache_host_share: float = 0.75
    cache_read_ahead: int = 2
    cache_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    time_unit: bool = True
    log_every: int = 50
    act_iters: int | None = None
    act_lr: float = 4e-5
    tf32: Literal["conv", "all", "none"] = "conv"

    def __post_init__(self):
        check(self.iters >= 0, f"recon.iters must be >= 0, got {self.iters}")
        check(self.batch_size >= 1, f"recon.batch_size must be >= 1, got {self.batch_size}")
        check(0.0 <= self.warmup < 1.0, f"recon.warmup must be in [0, 1), got {self.warmup}")
        check(self.lr > 0, f"recon.lr must be > 0, got {self.lr}")
        check(self.iters_per_step >= 1, f"recon.iters_per_step must be >= 1, got {self.iters_per_step}")
        check(self.ckpt_every >= 0, f"recon.ckpt_every must be >= 0, got {self.ckpt_every}")
        check(self.act_iters is None or self.act_iters >= 0, f"recon.act_iters must be >= 0, got {self.act_iters}")
        check(self.act_lr > 0, f"recon.act_lr must be > 0, got {self.act_lr}")
        check(self.cache_dtype in ("float32", "bfloat16", "float16"),
              f"recon.cache_dtype must be 'float32', 'bfloat16' or 'float16', got {self.cache_dtype!r}")
        check(self.cache_placement in ("auto", "device", "host", "disk"),
              f"recon.cache_placement must be 'auto', 'device', 'host' or 'disk', got {self.cache_placement!r}")
        check(self.cache_device_max_gib is None or self.cache_device_max_gib >= 0,
              f"recon.cache_device_max_gib must be >= 0 or null, got {self.cache_device_max_gib}")
        check(0.0 < self.cache_host_share <= 1.0,
              f"recon.cache_host_share must be in (0, 1], got {self.cache_host_share}")
        check(self.cache_read_ahead >= 1, f"recon.cache_read_ahead must be >= 1, got {self.cache_read_ahead}")
        check(self.tf32 in ("conv", "all", "none"), f"recon.tf32 must be 'conv', 'all' or 'none', got {self.tf32!r}")
        check(self.cuda_graph in ("auto", "on", "off"),
              f"recon.cuda_graph must be 'auto', 'on' or 'off', got {self.cuda_graph!r}")


def cache_store_dtype(cfg: ReconConfig) -> torch.dtype | None:
    """The dtype of ``recon.cache_dtype`` for :func:`gaq.calib.cache.build_unit_cache` (None: as captured)."""
    return None if cfg.cache_dtype == "float32" else getattr(torch, cfg.cache_dtype)


def act_phase_config(cfg: ReconConfig) -> ReconConfig:
    """The settings of the activation step-size phase: ``act_iters`` iterations at ``act_lr``."""
    iters = cfg.iters // 4 if cfg.act_iters is None else cfg.act_iters
    return replace(cfg, iters=iters, lr=cfg.act_lr)


def beta_at(it: int, cfg: ReconConfig) -> float | None:
    """AdaRound's beta at iteration ``it`` (:class:`gaq.quant.BetaSchedule`: BRECQ's linear decay after the
    warm-up); None during the warm-up, where the regulariser is off."""
    schedule = BetaSchedule(cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end)
    return schedule(it) if schedule.active(it) else None


def per_sample_error(out: Tensor, target: Tensor) -> Tensor:
    """Squared error per sample: summed over channels, averaged over space / tokens. Shape ``(B,)``.

    Channels are dim 1 for images ``(B, C, H, W)`` and the last dim for tokens ``(B, L, D)`` and
    vectors ``(B, D)``.
    """
    sq = (out.float() - target.float()).pow(2)
    if sq.ndim == 4:
        return sq.sum(1).flatten(1).mean(1)
    return sq.sum(-1).flatten(1).mean(1) if sq.ndim > 2 else sq.sum(-1)


@dataclass
class MetaPhase:
    """What the GAC meta steps of one unit need (attached by :class:`gaq.calib.gac_driver.GACHooks`).

    Attributes:
        weights: the learned sample weights (a module holding ``s``; checkpointed with the unit).
        cfg: the GAC settings.
        val_groups: global indices of the validation tuples of each timestep group.
    """

    weights: nn.Module
    cfg: Any
    val_groups: list[Tensor]


WeightFn = Callable[[Tensor], Tensor]


@dataclass(eq=False)
class ReconUnit:
    """One unit as :class:`UnitReconstruction` fits it (what :meth:`UnitReconstruction.bind` attaches).

    Attributes:
        name: the unit's name, for logs and errors.
        module: the module holding the unit's parameters (registered so Lightning moves and checkpoints it).
        call: runs the unit on cached ``(*args, **kwargs)`` and returns its output tensor.
        learned: the parameters the fit learns (only these get gradients): AdaRound's rounding logits in
            the weight phase, the activation step sizes in the activation phase.
        regulariser: ``beta -> sum of (1 - |2h - 1|^beta)`` over the unit's rounding variables (a
            constant zero where nothing is rounded).
        cache: inputs, FP targets and sampling steps of every calibration tuple.
        data: the calibration DataModule: its split's training tuples are what the fit trains on (its
            :meth:`~gaq.data.datamodule.CalibrationDataModule.unit_train_dataloader` serves them per step).
        weights: per-sample weight of global indices; uniform by default (a GAC meta phase replaces it).
        set_step: sets the per-sample sampling step for per-step activation quantizers (None: the unit
            has none).
    """

    name: str
    module: nn.Module
    call: Callable[..., Tensor]
    learned: list[nn.Parameter]
    regulariser: Callable[[float], Tensor]
    cache: UnitCache
    data: CalibrationDataModule
    weights: WeightFn = UniformWeights().weights
    set_step: Callable[[Tensor | None], None] | None = None


_CAPTURE_FAILED: list[str] = []  # a failed capture can leave the allocator's graph pools unusable


def graph_capture_failures() -> list[str]:
    """The units of this process whose CUDA-graph capture failed, in order (after the first, every later
    unit runs eagerly)."""
    return list(_CAPTURE_FAILED)


def _capture_or_false(unit_name: str, what: str, strict: bool, capture: Callable[[], Any]) -> Any:
    """``capture()``, or False (run eagerly) when this unit's code cannot be captured as a CUDA graph
    (``strict``: raise instead). After one failure every later unit of the process runs eagerly too.
    """
    if _CAPTURE_FAILED:
        return False
    try:
        return capture()
    except RuntimeError as err:  # e.g. an operation that synchronises with the host inside the unit
        if strict:
            raise
        _CAPTURE_FAILED.append(unit_name)
        first = err.__context__ or err  # the error inside the capture, not the one that ended it
        log.warning("unit %s: the %s could not be captured as a CUDA graph (%s: %s); this and every later unit "
                    "runs eagerly", unit_name, what, type(first).__name__, str(first).splitlines()[0] if str(first) else "")
        return False


class UnitReconstruction(pl.LightningModule):
    """AdaRound reconstruction of one unit (created per unit by the calibration driver), with an
    optional GAC meta phase that learns the per-sample weights first (or interleaved).

    Args:
        recon: reconstruction settings.

    ``bind`` attaches the unit, its trainable parameters, its cache and the weight source before
    ``fit``; ``enable_meta`` adds the meta phase. Work is counted in meta steps and reconstruction
    iterations, ``recon.iters_per_step`` of them per Lightning step: with a meta phase run before the
    reconstruction (``interleave_every = 0``), the first ``ceil(M / K)`` Lightning steps run the M
    meta steps and the rest the ``recon.iters`` iterations; with interleaving, each iteration is
    preceded by the meta steps the schedule puts there. The counters are checkpointed, so a resumed
    run does exactly the work the straight run would have done next.
    """

    def __init__(self, recon: ReconConfig = ReconConfig()):  # noqa: B008 - a frozen-by-convention default
        super().__init__()
        self.recon = recon or ReconConfig()
        self.automatic_optimization = False
        self.step_done = 0   # Lightning steps finished (checkpointed)
        self.meta_done = 0   # meta steps finished (checkpointed)
        self.iters_done = 0  # reconstruction iterations finished (checkpointed)
        self.checkpoint_due = False  # this Lightning step crossed a multiple of recon.ckpt_every
        self.unit_name = "<unbound>"
        self.meta: MetaPhase | None = None
        self._graph = None              # GraphedIteration, False (eager), or None (not decided yet)
        self._meta_graph_state = None   # GraphedMetaStep, False (eager), or None (not decided yet)
        self._first_bad: Tensor | None = None
        self._source = None             # the cache, or its DeviceWindow (made on first use)

    def bind(self, target: ReconUnit) -> "UnitReconstruction":
        """Attach one unit (:class:`ReconUnit`) before ``fit``."""
        self.unit_name, self.unit, self._call = target.name, target.module.eval(), target.call
        self._rounding, self._regulariser, self.cache = target.learned, target.regulariser, target.cache
        self.data, self._weights, self._set_step = target.data, target.weights, target.set_step
        return self

    def enable_meta(self, meta: MetaPhase) -> "UnitReconstruction":
        """Learn the sample weights of this unit with GAC's meta steps (``meta.weights`` becomes a submodule)."""
        self.meta = meta
        self.sample_weights = meta.weights
        self._weights = lambda index: meta.weights.weights(index, validate=False).detach()
        return self

    def train(self, mode: bool = True) -> "UnitReconstruction":
        """Lightning switches the module to training mode for ``fit``; the unit itself stays in eval
        mode (no dropout), as the FP targets were computed, so only the rounding is learned."""
        super().train(mode)
        if isinstance(getattr(self, "unit", None), nn.Module):
            self.unit.eval()
        return self

    # ---- the step plan ------------------------------------------------------------------------
    def schedule(self) -> UnitSchedule:
        """The data plan of this unit's fit: the reconstruction iterations and, with a meta phase, its meta
        steps (all first, or interleaved as :func:`gaq.calib.gac.meta_steps_before` places them)."""
        sch = UnitSchedule(iters=self.recon.iters, iters_per_step=self.recon.iters_per_step,
                           recon_batch=self.recon.batch_size, seed=self.recon.seed)
        if self.meta is None:
            return sch
        cfg = self.meta.cfg
        if cfg.interleave_every == 0:
            return replace(sch, meta_first=cfg.meta_iters, meta_batch=cfg.meta_batch)
        from gaq.calib.gac import meta_steps_before
        return replace(sch, meta_at=tuple(meta_steps_before(cfg, i) for i in range(self.recon.iters)),
                       meta_batch=cfg.meta_batch)

    def train_dataloader(self) -> UnitStepLoader:
        """The DataModule's loader of this unit's steps (this rank's share), resuming after the steps done."""
        rank, world, schedule = self.trainer.global_rank, self.trainer.world_size, self.schedule()
        loader = self.data.unit_train_dataloader(schedule, lambda: self.step_done, rank, world)
        # a disk cache reads the remaining iterations' batches ahead, in a thread of its own: from a copy
        # of the plan, so that the thread shares no state with the loader
        plan = self.data.unit_train_dataloader(schedule, lambda: self.step_done, rank, world).dataset
        self.cache.read_ahead(plan.iteration_batches(self.iters_done), self.recon.cache_read_ahead)
        return loader

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # the indices go where the cache gathers (the meta steps' stay on the host, as GAC reads them there; a
        # cache off the device stages its batches from host indices)
        if self.cache.off_device:
            return batch
        return {**batch, "recon": batch["recon"].to(self.cache.device, non_blocking=True)}

    def batches(self):
        """Where this unit's batches are gathered: the cache when it is on the training device, else its
        :class:`~gaq.calib.cache.DeviceWindow` (GAC's validation tuples resident on the device, each step's
        training batch staged before the step), so that a host or disk cache replays CUDA graphs too."""
        if self._source is None:
            resident = torch.cat(list(self.meta.val_groups)) if self.meta is not None else None
            batch = max(self.recon.batch_size, self.meta.cfg.meta_batch if self.meta is not None else 0)
            self._source = self.cache.window(resident, batch)
        return self._source

    def cache_reads(self) -> dict[str, int]:
        """How the batches of a cache off the device arrived: ``read_ahead`` (gathered ahead by the cache's
        thread) and ``direct`` (gathered on the spot), and ``landed`` (copied ahead to the device by the
        window's side stream); empty for a cache on the device."""
        if not self.cache.off_device:
            return {}
        stats = dict(self.cache.read_stats)
        if self._source is not None and self._source is not self.cache:
            stats["landed"] = int(self._source.landed_hits)
        return stats

    # ---- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        fused = self.device.type == "cuda"  # one kernel for the whole update on a GPU
        opts = [torch.optim.Adam(self._rounding, lr=self.recon.lr, fused=fused or None)]
        if self.meta is not None:  # created here, after the module reached its device (s is a buffer)
            opts.append(torch.optim.Adam([self.meta.weights.s], lr=self.meta.cfg.meta_lr))
        return opts

    def unit_error(self, index: Tensor, call: Callable[..., Tensor] | None = None) -> Tensor:
        """Per-sample reconstruction error ``(B,)`` of the tuples ``index`` (global calibration indices)."""
        args, kwargs, target, step = self.batches().batch(index)
        if self._set_step is not None:
            self._set_step(step)
        out = (call or self._call)(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        return per_sample_error(out, target)

    def loss_terms(self, index: Tensor, beta: Tensor | float, reg_on: Tensor | bool) -> tuple[Tensor, Tensor]:
        """``(weighted reconstruction loss, rounding regulariser)`` of the batch ``index``; the
        regulariser is only computed where ``reg_on`` (a bool, or a 0/1 tensor in a CUDA graph)."""
        err = self.unit_error(index)
        w = self._weights(index).to(err.device, err.dtype)
        rec = (w * err).mean()
        if isinstance(reg_on, bool) and not reg_on:
            return rec, rec.new_zeros(())
        return rec, self._regulariser(beta)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One Lightning step: the meta steps and reconstruction iterations of the DataModule's item ``batch``
        (its indices are this rank's share of each global batch)."""
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        world = self.trainer.world_size
        step, iters, metas = int(batch["step"]), batch["iters"].tolist(), batch["meta_steps"].tolist()
        first_iter = iters[0] if iters else self.iters_done
        if step != self.step_done or first_iter != self.iters_done or (metas and metas[0] != self.meta_done):
            raise GaqError(f"unit {self.unit_name}: the data loader served step {step} (iteration {first_iter}, meta "
                           f"step {metas[0] if metas else '-'}) after {self.step_done} steps ({self.iters_done} iterations,"
                           f" {self.meta_done} meta steps); delete the run folder's lightning/ checkpoints of this unit")
        work_before, m = self.meta_done + self.iters_done, 0
        if not iters:  # the leading meta phase
            for m in range(len(metas)):
                self._meta_step(opts[1], metas[m], batch["meta"][m], world)
        for i, it in enumerate(iters):
            for _ in range(int(batch["meta_before"][i])):
                self._meta_step(opts[1], metas[m], batch["meta"][m], world)
                m += 1
            self._recon_step(opts[0], it, batch["recon"][i], world)
            self.iters_done = it + 1
        if iters:
            self._check_finite()
        self.step_done += 1
        every = self.recon.ckpt_every
        self.checkpoint_due = every > 0 and (self.meta_done + self.iters_done) // every > work_before // every

    def _recon_step(self, opt, it: int, index: Tensor, world: int) -> None:
        self.batches().stage(index)
        graph = self._iteration_graph(index.shape[0])
        if graph is not None:
            graph.run(index, it)
            if world > 1:  # the replayed backward bypasses DDP's hooks: average the gradients in place
                for p in self._rounding:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
            opt.step()
            rec, reg, beta = graph.rec, graph.reg, graph.beta.clone()
        else:
            beta_f = beta_at(it, self.recon)
            rec, reg = self.loss_terms(index, beta_f if beta_f is not None else 0.0, beta_f is not None)
            loss = rec + self.recon.reg_weight * reg
            self._first_bad = torch.where((self._first_bad < 0) & ~torch.isfinite(loss.detach()), it, self._first_bad)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt.step()
            beta = float(beta_f or 0.0)
        if it % self.recon.log_every == 0 or it + 1 == self.recon.iters:
            self.log_dict({"rec_loss": rec.detach().clone(), "round_reg": reg.detach().clone(), "beta": beta},
                          prog_bar=True, on_step=True, batch_size=index.shape[0])

    def _iteration_graph(self, batch: int):
        """The CUDA graph of one iteration (captured on first use), or None where the eager path runs."""
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        if self._graph is None:
            from gaq.calib.graphed import GraphedIteration
            self._graph = self._may_capture("iteration") and _capture_or_false(
                self.unit_name, "iteration", self.recon.cuda_graph == "on", lambda: GraphedIteration(
                    self.loss_terms, self.recon.reg_weight, self._rounding, *self._beta_tables(), batch, self.device))
            if self._graph:
                self._first_bad = self._graph.first_bad
        return self._graph or None

    def _beta_tables(self) -> tuple[Tensor, Tensor]:
        """Per iteration: AdaRound's beta (``beta_start`` in the warm-up) and whether the regulariser is on."""
        betas = [beta_at(i, self.recon) for i in range(self.recon.iters)]
        return (torch.tensor([b if b is not None else self.recon.beta_start for b in betas]),
                torch.tensor([float(b is not None) for b in betas]))

    def _may_capture(self, what: str) -> bool:
        """Whether ``what`` may run as a CUDA graph here (``recon.cuda_graph``, device, cache, precision)."""
        if self.recon.cuda_graph == "off":
            return False
        from gaq.calib.graphed import graph_unavailable_reason
        reason = graph_unavailable_reason(self.device, self.batches().placement, self.trainer.precision)
        if reason is None:
            return True
        check(self.recon.cuda_graph != "on", f"recon.cuda_graph is 'on' but {reason}; set it to 'auto' or 'off'")
        log.info("unit %s: the %s runs eagerly: %s", self.unit_name, what, reason)
        return False

    def _check_finite(self) -> None:
        """Raise if an iteration of this Lightning step had a non-finite loss (one host sync per step)."""
        if self._first_bad is None:
            return
        bad = int(self._first_bad)
        if bad >= 0:
            raise GaqError(f"unit {self.unit_name}, iteration {bad}: the reconstruction loss is not finite "
                           "(NaN or Inf); lower model.recon.lr or check the calibration set; finished units are kept")

    def on_train_end(self) -> None:
        for graph in (self._graph, self._meta_graph_state):
            if graph:
                graph.release()
        self._graph = self._meta_graph_state = None

    def unbind(self) -> None:
        """Drop the unit's cache, streams and graphs once the driver is done with the unit: the module and
        its Trainer refer to each other, so without this the cache (gigabytes on the device) lives on until
        Python's cycle collector runs, and the caches of several units pile up."""
        self.on_train_end()
        self.cache = self.data = self._source = None
        self._weights = self._call = self._regulariser = self._set_step = None

    def _meta_inputs(self, index: Tensor, val: list[Tensor], m: int):
        """GAC's :class:`gaq.calib.gac.MetaStepInputs` of meta step ``m`` on the meta batch ``index`` and the
        validation batches ``val`` (the batches are global indices into the unit's cache)."""
        from gaq.calib.gac import MetaStepInputs
        return MetaStepInputs(unit=self.unit, theta=self._rounding, per_sample_loss=self._meta_loss, train_batch=index,
                              val_batches=val, cfg=self.meta.cfg, unit_name=self.unit_name, step=m)

    def _meta_step(self, opt, m: int, index: Tensor, world: int) -> None:
        """Meta step ``m`` on the meta batch ``index`` (this rank's share, global calibration indices)."""
        from gaq.calib.gac import check_meta_parts, meta_stats, meta_step
        val = self._val_batches(m)
        self.batches().stage(index)
        graph = self._meta_graph(index, val)
        if graph is not None:
            grad_s, parts = graph.run(index, val)
            check_meta_parts(grad_s, parts, self.unit_name, m)
            stats = meta_stats(parts)
        else:
            grad_s, stats = meta_step(self._meta_inputs(index, val, m), self.meta.weights, index)
        if world > 1:  # autograd.grad bypasses DDP's hooks: average the hypergradient explicitly
            grad_s = self.trainer.strategy.reduce(grad_s.clone(), reduce_op="mean")
        self.meta.weights.s.grad = grad_s.to(self.meta.weights.s.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.meta_done = m + 1
        if m % self.recon.log_every == 0 or m + 1 == self.meta.cfg.meta_iters:
            self.log_dict({f"meta/{k}": v.clone() for k, v in stats.items() if torch.is_tensor(v) and v.numel() == 1},
                          on_step=True, batch_size=index.shape[0])

    def _val_batches(self, m: int) -> list[Tensor]:
        """Meta step ``m``'s validation tuples per group: all of them, or ``gac.val_per_group`` drawn
        from each group as a pure function of (seed, m), identical on every DDP rank."""
        k = self.meta.cfg.val_per_group
        if k is None:
            return self.meta.val_groups
        g = torch.Generator().manual_seed(self.recon.seed * 1_000_003 + 7_919 * (m + 1))
        return [v[torch.randperm(len(v), generator=g)[:k]] for v in self.meta.val_groups]

    def _meta_graph(self, index: Tensor, val: list[Tensor]):
        """The CUDA graph of one meta step's hypergradient (captured on first use), or None (eager)."""
        if self._meta_graph_state is None:
            from gaq.calib.gac import meta_hypergradient_parts
            from gaq.calib.graphed import GraphedMetaStep

            def hyper(idx: Tensor, vb: list[Tensor]):
                return meta_hypergradient_parts(self._meta_inputs(idx, vb, self.meta_done), self.meta.weights, idx)

            self._meta_graph_state = self._may_capture("meta step") and _capture_or_false(
                self.unit_name, "meta step", self.recon.cuda_graph == "on",
                lambda: GraphedMetaStep(hyper, index, val, self.device))
        return self._meta_graph_state or None

    def _meta_loss(self, fmodel: Callable[..., Any], index: Tensor) -> Tensor:
        """GAC's ``per_sample_loss`` contract: the unit run through ``fmodel`` at the evaluated parameters."""
        return self.unit_error(index, call=fmodel)

    # ---- checkpoint state -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["gaq_unit"] = {"name": self.unit_name, "step_done": self.step_done, "meta_done": self.meta_done,
                                  "iters_done": self.iters_done}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("gaq_unit", {})
        if state.get("name") != self.unit_name:
            raise GaqError(f"the Lightning checkpoint belongs to unit {state.get('name')!r}, not {self.unit_name!r}; "
                           "delete the run folder's lightning/ checkpoints to restart that unit")
        self.step_done, self.meta_done = int(state["step_done"]), int(state["meta_done"])
        self.iters_done = int(state["iters_done"])
