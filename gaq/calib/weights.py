"""Per-sample weights of the reconstruction loss: uniform (the baseline) or learned by GAC.

Both kinds answer ``weights(index) -> Tensor[B]`` for a batch of *global* calibration-sample
indices (the DataModule's index of each tuple), so the reconstruction step is the same code for
both: ``loss = (weights(index) * per_sample_loss).mean()``.

GAC's weights (the paper's Algorithm 2) are ``w_i = N * omega_i`` with ``omega = softmax(s / tau)``
over the N training tuples: mean one over the whole training set, so a uniform ``s`` gives
weights of exactly 1.0 and reproduces the uniform baseline bit for bit.

Where ``s`` lives (the DDP question): ``s`` is a persistent *buffer* of
:class:`LearnedSampleWeights` that does **not** require grad. It therefore

* is saved in checkpoints and moved by ``.to()`` with the module that owns it;
* is not a parameter of the LightningModule, so plain DDP never waits for a gradient of it
  (its gradient comes from ``torch.autograd.grad``, which DDP's hooks never see: FACTS.md);
* is still a leaf tensor, so ``torch.optim.Adam([weights.s], lr=...)`` can step it once the
  engine has written ``weights.s.grad = grad_s``.

To differentiate through the weights, :func:`gaq.calib.gac.meta_step` takes a detached
``requires_grad`` copy of ``s`` and passes it as ``weights(index, s=s_leaf)``; the returned
gradient is the engine's to average over DDP ranks and hand to Adam. Create that Adam after the
module has reached its final device and dtype (Lightning does: ``configure_optimizers`` runs
after the move), since ``.to()`` replaces the buffer tensor. Keep ``s`` in float32 (or float64):
under a ``*-true`` half precision Lightning casts buffers too, and bf16 cannot resolve the
~1e-3 moves of ``s`` around 1/32.
"""
from __future__ import annotations

import math
import torch
from torch import Tensor, nn

from gaq.errors import check


class UniformWeights:
    """The uniform-weight baseline: every sample weighs exactly 1.0.

    Args:
        dtype: dtype of the returned weights.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype

    def weights(self, index: Tensor) -> Tensor:
        """Ones of shape ``(B,)`` on the device of ``index`` (global sample indices, ``(B,)``)."""
        return torch.ones(index.shape[0], dtype=self.dtype, device=index.device)


class LearnedSampleWeights(nn.Module):
    """GAC's learned weights ``w_i = N * softmax(s / tau)_i`` over the N training tuples.

    Args:
        indices: global indices of the N training tuples, shape ``(N,)``, distinct and >= 0 (the
            training split of the calibration set; validation tuples have no weight).
        s_init: initial (uniform) value of every logit ``s_i`` (paper: 1/32).
        tau: softmax temperature (paper: 1).
        tie: optional ``(N,)`` long map from each training tuple (in the order of ``indices``) to one
            of K shared logits ``0..K-1`` *(ours)*: tuples that share a logit share a weight (e.g. the
            kept step or the timestep group of each tuple: one weight per step or per group). None:
            one logit per tuple (the paper). The weights stay ``N * softmax`` over the N tuples of the
            tied logits, so their mean over the tuples is one.

    Buffers (all in the state dict except the derived ``tie`` and ``slot_of``):
        s: logits, ``(K,)`` float32: one per training tuple in the order of ``indices`` (K = N), or one
            per tie class.
        indices: the global index of each slot, ``(N,)`` long.
        tie: the logit of each slot, ``(N,)`` long (``arange(N)`` without tying).
        slot_of: slot of each global index (``-1`` where the index is not a training tuple),
            ``(max(indices) + 1,)`` long.
    """

    s: Tensor
    indices: Tensor
    tie: Tensor
    slot_of: Tensor

    def __init__(self, indices: Tensor, s_init: float = 1.0 / 32, tau: float = 1.0, tie: Tensor | None = None):
        super().__init__()
        indices = torch.as_tensor(indices).flatten().long()
        check(indices.numel() > 0, "the GAC sample weights need at least one training tuple; enlarge the calibration set")
        check(bool((indices >= 0).all()), "calibration sample indices must be >= 0")
        check(indices.unique().numel() == indices.numel(), "calibration sample indices of the training split must be distinct")
        check(tau > 0, f"gac.tau must be > 0, got {tau}")
        self.s_init = float(s_init)
        self.tau = float(tau)
        self.tied = tie is not None
        tie = torch.arange(indices.numel()) if tie is None else torch.as_tensor(tie).flatten().long()
        check(tie.numel() == indices.numel(), f"the weight tie map has {tie.numel()} entries for {indices.numel()} training tuples")
        check(bool((tie >= 0).all()) and tie.unique().numel() == int(tie.max()) + 1,
              "the weight tie map must use every shared logit 0..K-1 at least once")
        slot_of = torch.full((int(indices.max()) + 1,), -1, dtype=torch.long)
        slot_of[indices] = torch.arange(indices.numel())
        self.register_buffer("s", torch.full((int(tie.max()) + 1,), self.s_init, dtype=torch.float32))
        self.register_buffer("indices", indices.clone())
        self.register_buffer("tie", tie.clone(), persistent=False)
        self.register_buffer("slot_of", slot_of, persistent=False)

    @property
    def num_samples(self) -> int:
        """N, the number of training tuples."""
        return self.indices.numel()

    @property
    def num_logits(self) -> int:
        """K, the number of learned logits (N without tying)."""
        return self.s.numel()

    def slots(self, index: Tensor, validate: bool = True) -> Tensor:
        """Slots ``(B,)`` of the global sample indices ``index`` ``(B,)``.

        ``validate`` checks that every index is a training tuple (one host sync); without it an
        unknown index is an index error on the CPU and a device-side assert on a GPU.
        """
        index = index.to(self.slot_of.device).long()
        if validate:
            known = (index >= 0) & (index < self.slot_of.numel())
            ok = bool(known.all()) and bool((self.slot_of[index.clamp(0, self.slot_of.numel() - 1)] >= 0).all())
            check(ok, "a batch holds calibration samples that are not in the GAC training split; "
                      "build LearnedSampleWeights from the DataModule's training indices")
        return self.slot_of[index]

    def _per_slot(self, s: Tensor | None) -> Tensor:
        """The logit of every slot, ``(N,)``: ``s`` (default the stored logits) through the tie map."""
        s = self.s if s is None else s
        return s[self.tie] if self.tied else s

    def omega(self, s: Tensor | None = None) -> Tensor:
        """``softmax`` over the N tuples of their logits ``/ tau``, shape ``(N,)``; ``s`` defaults to the stored logits."""
        return torch.softmax(self._per_slot(s) / self.tau, dim=0)

    def all_weights(self, s: Tensor | None = None) -> Tensor:
        """Mean-one weights ``N * omega`` of all N training tuples, ``(N,)``, in slot order.

        Computed as ``e / mean(e)`` with ``e = exp(s / tau - max)``, which equals ``N * omega``
        and is exactly 1.0 everywhere when ``s`` is uniform (``N * (1 / N)`` need not be).
        """
        z = self._per_slot(s) / self.tau
        e = torch.exp(z - z.max().detach())
        return e / e.mean()

    def weights(self, index: Tensor, s: Tensor | None = None, validate: bool = True) -> Tensor:
        """Weights ``(B,)`` of the samples with global indices ``index`` ``(B,)``.

        Args:
            index: global calibration-sample indices (training tuples only).
            s: logits to use instead of the stored ones, e.g. a ``requires_grad`` copy for the
                hypergradient; the result is differentiable with respect to it.
            validate: check that every index is a training tuple (see :meth:`slots`).
        """
        return self.all_weights(s)[self.slots(index, validate)]

    @torch.no_grad()
    def reset(self) -> None:
        """Set every logit back to ``s_init`` (uniform weights); used between units without carry-over."""
        self.s.fill_(self.s_init)

    @torch.no_grad()
    def spread(self) -> dict[str, float]:
        """How far the weights are from uniform.

        Returns:
            ``entropy`` of omega (nats), ``normalized_entropy`` (entropy / log N, 1 = uniform),
            ``max_min_ratio`` of the weights, ``max_weight`` and ``min_weight`` of the mean-one
            weights ``N * omega`` (1.0 = uniform).
        """
        omega = self.omega().double()
        n = omega.numel()
        entropy = float(-(omega * torch.log(omega.clamp_min(torch.finfo(torch.float64).tiny))).sum())
        w = self.all_weights().double()
        return {
            "entropy": entropy,
            "normalized_entropy": entropy / math.log(n) if n > 1 else 1.0,
            "max_min_ratio": float(w.max() / w.min()),
            "max_weight": float(w.max()),
            "min_weight": float(w.min()),
        }
