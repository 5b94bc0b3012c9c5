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
from typing import Any, Callable, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from gaq.calib.cache import Placement, UnitCache
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


class IterationBatches(Dataset):
    """Item ``j`` is the index batch of iteration ``start + j`` for one rank.

    The global batch of iteration ``i`` is slice ``i mod nb`` of a permutation of the training
    positions drawn from ``(seed, epoch = i // nb)``; rank ``r`` of ``world`` takes every
    ``world``-th element of it. Yields global calibration-set indices (``train_indices[pos]``).
    """

    def __init__(self, train_indices: Tensor, batch_size: int, total: int, start: int, seed: int,
                 rank: int = 0, world: int = 1):
        check(batch_size % world == 0, f"recon.batch_size ({batch_size}) must be divisible by the {world} DDP ranks")
        check(len(train_indices) >= batch_size,
              f"recon.batch_size ({batch_size}) is larger than the training split ({len(train_indices)} tuples)")
        self.train_indices, self.batch, self.total, self.start = train_indices, batch_size, total, start
        self.seed, self.rank, self.world = seed, rank, world
        self.per_epoch = len(train_indices) // batch_size
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def global_batch(self, i: int) -> Tensor:
        epoch, pos = divmod(i, self.per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.train_indices), generator=g), epoch
        return self.train_indices[self._perm[pos * self.batch:(pos + 1) * self.batch]]

    def __getitem__(self, j: int) -> Tensor:
        return self.global_batch(self.start + j)[self.rank::self.world]


WeightFn = Callable[[Tensor], Tensor]


def uniform_weights(index: Tensor) -> Tensor:
    """The uniform-weight baseline: every sample weighs 1."""
    return torch.ones(index.shape[0])


class UnitReconstruction(pl.LightningModule):
    """AdaRound reconstruction of one unit (created per unit by the calibration driver).

    Args:
        recon: reconstruction settings.
    ``bind`` attaches the unit, its trainable parameters, its cache and the weight source before ``fit``.
    """

    def __init__(self, recon: ReconConfig | None = None):
        super().__init__()
        self.recon = recon or ReconConfig()
        self.automatic_optimization = False
        self.iteration = 0
        self.unit_name = "<unbound>"

    def bind(self, unit_name: str, unit: nn.Module, call: Callable[..., Tensor], rounding: list[nn.Parameter],
             regulariser: Callable[[float], Tensor], cache: UnitCache, train_indices: Tensor,
             weights: WeightFn = uniform_weights, set_step: Callable[[Tensor | None], None] | None = None):
        """Attach one unit.

        Args:
            unit_name: the unit's name, for logs and errors.
            unit: the module holding the unit's parameters (registered so Lightning moves and checkpoints it).
            call: runs the unit on cached ``(*args, **kwargs)`` and returns its output tensor.
            rounding: the rounding logits to learn (only these get gradients).
            regulariser: ``beta -> sum of (1 - |2h - 1|^beta)`` over the unit's rounding variables.
            cache: inputs, FP targets and sampling steps of every calibration tuple.
            train_indices: global indices of the training tuples.
            weights: per-sample weight of global indices (on the host), e.g. uniform or learned.
            set_step: sets the per-sample sampling step for per-step activation quantizers.
        """
        self.unit_name, self.unit, self._call = unit_name, unit, call
        self._rounding, self._regulariser, self.cache = rounding, regulariser, cache
        self.train_indices, self._weights, self._set_step = train_indices, weights, set_step
        return self

    # ---- data -------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        data = IterationBatches(self.train_indices, self.recon.batch_size, self.recon.iters, self.iteration,
                                self.recon.seed, rank, world)
        return DataLoader(data, batch_size=None, shuffle=False, num_workers=0)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # indices stay on the host; the cache moves what it gathers

    # ---- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        return torch.optim.Adam(self._rounding, lr=self.recon.lr)

    def unit_error(self, index: Tensor, call: Callable[..., Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample reconstruction error ``(B,)`` of the tuples ``index`` and their sampling steps."""
        args, kwargs, target, step = self.cache.batch(index)
        if self._set_step is not None:
            self._set_step(step)
        out = (call or self._call)(*args, **kwargs)
        return per_sample_error(out, target), step

    def training_step(self, index: Tensor, batch_idx: int) -> None:
        it = self.iteration
        err, _ = self.unit_error(index)
        w = self._weights(index).to(err.device, err.dtype)
        rec = (w * err).mean()
        beta = beta_at(it, self.recon)
        reg = self._regulariser(beta) if beta is not None else rec.new_zeros(())
        loss = rec + self.recon.reg_weight * reg
        if not torch.isfinite(loss):
            raise GaqError(f"unit {self.unit_name}, iteration {it}: the reconstruction loss is {loss.item()} "
                           "(not finite); lower recon.lr or check the calibration set; finished units are kept")
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        self.iteration = it + 1
        if it % self.recon.log_every == 0 or self.iteration == self.recon.iters:
            self.log_dict({"rec_loss": rec.detach(), "round_reg": reg.detach(), "beta": beta or 0.0},
                          prog_bar=True, on_step=True, batch_size=index.shape[0])

    # ---- checkpoint state -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["gaq_unit"] = {"name": self.unit_name, "iteration": self.iteration}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("gaq_unit", {})
        if state.get("name") != self.unit_name:
            raise GaqError(f"the Lightning checkpoint belongs to unit {state.get('name')!r}, not {self.unit_name!r}; "
                           "delete the run folder's unit checkpoints to restart")
        self.iteration = int(state["iteration"])

