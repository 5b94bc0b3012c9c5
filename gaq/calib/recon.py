"""One reconstruction unit as a LightningModule in manual-optimization mode.

AdaRound block reconstruction (BRECQ): Adam on the unit's rounding logits minimises
``mean_i w_i * ||f_Q(x_i) - f_FP(x_i)||^2 + lambda * sum(1 - |2h(alpha) - 1|^beta)``,
with the per-sample error summed over channels and averaged over space, and per-sample
weights ``w_i`` from a weight source (all ones for the uniform baseline, learned for GAC).

Data order is a pure function of (seed, iteration), held in the module's own state, so a run
resumed from a Lightning checkpoint continues exactly where the straight run would be. Under
DDP every global batch is split evenly between ranks, so the averaged gradient equals the
single-process gradient of the same global batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from gaq.calib.cache import Placement, UnitCache
from gaq.calib.weights import UniformWeights
from gaq.errors import GaqError, check


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
        ckpt_every: write a resumable Lightning checkpoint every this many iterations (0: none).
        seed: data-order seed.
        cache_batch: batch size used to capture unit inputs and targets.
        cache_placement: ``auto`` (device if it fits in half of the free memory), ``device`` or ``host``.
        time_unit: reconstruct the time-embedding path jointly (TFMQ-DM); else layer by layer.
        log_every: log losses every this many iterations.
    """

    iters: int = 20000
    batch_size: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    ckpt_every: int = 1000
    seed: int = 0
    cache_batch: int = 256
    cache_placement: Placement = "auto"
    time_unit: bool = True
    log_every: int = 50

    def __post_init__(self):
        check(self.iters >= 0, f"recon.iters must be >= 0, got {self.iters}")
        check(self.batch_size >= 1, f"recon.batch_size must be >= 1, got {self.batch_size}")
        check(0.0 <= self.warmup < 1.0, f"recon.warmup must be in [0, 1), got {self.warmup}")
        check(self.lr > 0, f"recon.lr must be > 0, got {self.lr}")


def beta_at(it: int, cfg: ReconConfig) -> float | None:
    """AdaRound's beta at iteration ``it`` (BRECQ's linear decay after warm-up); None during warm-up."""
    start = cfg.warmup * cfg.iters
    if it < start:
        return None
    rel = (it - start) / max(cfg.iters - start, 1)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - rel)


def per_sample_error(out: Tensor, target: Tensor) -> Tensor:
    """Squared error per sample: summed over channels, averaged over space / tokens. Shape ``(B,)``.

    Channels are dim 1 for images ``(B, C, H, W)`` and the last dim for tokens ``(B, L, D)`` and
    vectors ``(B, D)``.
    """
    sq = (out.float() - target.float()).pow(2)
    if sq.ndim == 4:
        return sq.sum(1).flatten(1).mean(1)
    return sq.sum(-1).flatten(1).mean(1) if sq.ndim > 2 else sq.sum(-1)


class IndexStream:
    """Deterministic global batches: batch ``i`` is slice ``i mod nb`` of a permutation of the
    training positions drawn from ``(seed, epoch = i // nb)``; a pure function of ``i``, so resumed
    runs see the same data as straight ones."""

    def __init__(self, train_indices: Tensor, batch_size: int, seed: int, world: int = 1):
        check(batch_size % world == 0, f"batch size {batch_size} must be divisible by the {world} DDP ranks")
        check(len(train_indices) >= batch_size,
              f"batch size {batch_size} is larger than the training split ({len(train_indices)} tuples)")
        self.train_indices, self.batch, self.seed = train_indices, batch_size, seed
        self.per_epoch = len(train_indices) // batch_size
        self._perm_epoch, self._perm = -1, None

    def global_batch(self, i: int) -> Tensor:
        epoch, pos = divmod(i, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.train_indices), generator=g), epoch
        return self.train_indices[self._perm[pos * self.batch:(pos + 1) * self.batch]]

    def rank_batch(self, i: int, rank: int, world: int) -> Tensor:
        """Rank ``rank``'s share of global batch ``i`` (every ``world``-th element)."""
        return self.global_batch(i)[rank::world]


class StepSlots(Dataset):
    """One item per Lightning step of the unit (``total`` in all); the items carry no data.

    The module takes each step's number from its own checkpointed counter, not from the item:
    on resume Lightning restores how many batches of the epoch were done and runs only the rest,
    whether or not it skips the loader's first items, so the counter is what stays exact.
    """

    def __init__(self, total: int):
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, j: int) -> int:
        return j


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


class UnitReconstruction(pl.LightningModule):
    """AdaRound reconstruction of one unit (created per unit by the calibration driver), with an
    optional GAC meta phase that learns the per-sample weights first (or interleaved).

    Args:
        recon: reconstruction settings.

    ``bind`` attaches the unit, its trainable parameters, its cache and the weight source before
    ``fit``; ``enable_meta`` adds the meta phase. Lightning steps: with a meta phase run before the
    reconstruction (``interleave_every = 0``), steps ``0 .. M-1`` are meta steps and the next
    ``recon.iters`` are reconstruction iterations; with interleaving, each step is one
    reconstruction iteration preceded by the meta steps the schedule puts there.
    """

    def __init__(self, recon: ReconConfig | None = None):
        super().__init__()
        self.recon = recon or ReconConfig()
        self.automatic_optimization = False
        self.step_done = 0   # Lightning steps finished (checkpointed)
        self.meta_done = 0   # meta steps finished (checkpointed)
        self.unit_name = "<unbound>"
        self.meta: MetaPhase | None = None

    def bind(self, unit_name: str, unit: nn.Module, call: Callable[..., Tensor], rounding: list[nn.Parameter],
             regulariser: Callable[[float], Tensor], cache: UnitCache, train_indices: Tensor,
             weights: WeightFn = UniformWeights().weights, set_step: Callable[[Tensor | None], None] | None = None):
        """Attach one unit.

        Args:
            unit_name: the unit's name, for logs and errors.
            unit: the module holding the unit's parameters (registered so Lightning moves and checkpoints it).
            call: runs the unit on cached ``(*args, **kwargs)`` and returns its output tensor.
            rounding: the rounding logits to learn (only these get gradients).
            regulariser: ``beta -> sum of (1 - |2h - 1|^beta)`` over the unit's rounding variables.
            cache: inputs, FP targets and sampling steps of every calibration tuple.
            train_indices: global indices of the training tuples.
            weights: per-sample weight of global indices, e.g. uniform (the meta phase replaces it).
            set_step: sets the per-sample sampling step for per-step activation quantizers.
        """
        self.unit_name, self.unit, self._call = unit_name, unit.eval(), call
        self._rounding, self._regulariser, self.cache = rounding, regulariser, cache
        self.train_indices, self._weights, self._set_step = train_indices, weights, set_step
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
    @property
    def _meta_first(self) -> int:
        """Lightning steps spent on a meta phase that runs before the reconstruction."""
        return self.meta.cfg.meta_iters if self.meta is not None and self.meta.cfg.interleave_every == 0 else 0

    @property
    def total_steps(self) -> int:
        return self._meta_first + self.recon.iters

    def train_dataloader(self) -> DataLoader:
        world = self.trainer.world_size
        self._recon_stream = IndexStream(self.train_indices, self.recon.batch_size, self.recon.seed, world)
        if self.meta is not None:
            self._meta_stream = IndexStream(self.train_indices, self.meta.cfg.meta_batch, self.recon.seed + 1, world)
        return DataLoader(StepSlots(self.total_steps), batch_size=None, shuffle=False)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # slots carry no data; the cache moves what it gathers

    # ---- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        opts = [torch.optim.Adam(self._rounding, lr=self.recon.lr)]
        if self.meta is not None:  # created here, after the module reached its device (s is a buffer)
            opts.append(torch.optim.Adam([self.meta.weights.s], lr=self.meta.cfg.meta_lr))
        return opts

    def unit_error(self, index: Tensor, call: Callable[..., Tensor] | None = None) -> Tensor:
        """Per-sample reconstruction error ``(B,)`` of the tuples ``index`` (global calibration indices)."""
        args, kwargs, target, step = self.cache.batch(index)
        if self._set_step is not None:
            self._set_step(step)
        out = (call or self._call)(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        return per_sample_error(out, target)

    def training_step(self, _slot: int, batch_idx: int) -> None:
        step = self.step_done
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if step < self._meta_first:
            self._meta_step(opts[1], self.meta_done, rank, world)
        else:
            it = step - self._meta_first
            if self.meta is not None and self._meta_first == 0:
                from gaq.calib.gac import meta_steps_before
                for _ in range(meta_steps_before(self.meta.cfg, it)):
                    self._meta_step(opts[1], self.meta_done, rank, world)
            self._recon_step(opts[0], it, self._recon_stream.rank_batch(it, rank, world))
        self.step_done = step + 1

    def _recon_step(self, opt, it: int, index: Tensor) -> None:
        err = self.unit_error(index)
        w = self._weights(index).to(err.device, err.dtype)
        rec = (w * err).mean()
        beta = beta_at(it, self.recon)
        reg = self._regulariser(beta) if beta is not None else rec.new_zeros(())
        loss = rec + self.recon.reg_weight * reg
        if not torch.isfinite(loss):
            raise GaqError(f"unit {self.unit_name}, iteration {it}: the reconstruction loss is {loss.item()} "
                           "(not finite); lower model.recon.lr or check the calibration set; finished units are kept")
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        if it % self.recon.log_every == 0 or it + 1 == self.recon.iters:
            self.log_dict({"rec_loss": rec.detach(), "round_reg": reg.detach(), "beta": float(beta or 0.0)},
                          prog_bar=True, on_step=True, batch_size=index.shape[0])

    def _meta_step(self, opt, m: int, rank: int, world: int) -> None:
        from gaq.calib.gac import meta_step
        index = self._meta_stream.rank_batch(m, rank, world)
        grad_s, stats = meta_step(
            self.meta.weights, index, self.unit, self._rounding, self._meta_loss, index, self.meta.val_groups,
            self.meta.cfg, unit_name=self.unit_name, step=m)
        if world > 1:  # autograd.grad bypasses DDP's hooks: average the hypergradient explicitly
            grad_s = self.trainer.strategy.reduce(grad_s, reduce_op="mean")
        self.meta.weights.s.grad = grad_s.to(self.meta.weights.s.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.meta_done = m + 1
        if m % self.recon.log_every == 0 or m + 1 == self.meta.cfg.meta_iters:
            self.log_dict({f"meta/{k}": v for k, v in stats.items() if torch.is_tensor(v) and v.numel() == 1},
                          on_step=True, batch_size=index.shape[0])

    def _meta_loss(self, fmodel: Callable[..., Any], index: Tensor) -> Tensor:
        """GAC's ``per_sample_loss`` contract: the unit run through ``fmodel`` at the evaluated parameters."""
        return self.unit_error(index, call=fmodel)

    # ---- checkpoint state -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["gaq_unit"] = {"name": self.unit_name, "step_done": self.step_done, "meta_done": self.meta_done}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("gaq_unit", {})
        if state.get("name") != self.unit_name:
            raise GaqError(f"the Lightning checkpoint belongs to unit {state.get('name')!r}, not {self.unit_name!r}; "
                           "delete the run folder's lightning/ checkpoints to restart that unit")
        self.step_done, self.meta_done = int(state["step_done"]), int(state["meta_done"])
