"""One AdaRound iteration's forward and backward replayed as a CUDA graph.

A reconstruction unit at batch 32 is a few hundred small kernels per iteration (fake-quantized
weights, norms, convolutions and their backward): far too little arithmetic to hide the CPU cost of
launching them one by one, so eager PyTorch is launch-bound there. Capturing the iteration once and
replaying it makes the whole forward and backward one launch.

What changes between iterations lives in static device tensors the graph reads:

* the batch's global sample indices (copied in before each replay; the cache gathers on the device),
* the iteration number (filled in before each replay), from which the graph reads
  AdaRound's beta and whether the regulariser is on, out of tables computed with the eager path's
  own schedule (:func:`gaq.calib.recon.beta_at`),
* the rounding logits and the sample-weight logits, updated in place by their optimizers.

The graph writes the rounding logits' gradients (the same tensors every replay, so the optimizer
outside the graph reads them), the loss terms for logging, and the first iteration whose loss was
not finite (-1 while all were), so a NaN is found with one host sync per Lightning step instead of
one per iteration.

The optimizer step stays outside the graph: under DDP the gradients are averaged between replay
and step, and Lightning keeps counting optimizer steps.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

#: eager iterations run on a side stream before capture (lets cuDNN / cuBLAS pick and allocate)
WARMUP_ITERS = 3


class GraphedIteration:
    """Forward and backward of one reconstruction iteration, captured on the current CUDA device.

    Args:
        loss_terms: ``(index, beta, reg_on) -> (rec, reg)``: the weighted reconstruction loss and the
            rounding regulariser of the batch ``index`` (global sample indices on the device), with
            ``beta`` and ``reg_on`` as 0-dim device tensors.
        reg_weight: weight of the regulariser in the loss.
        params: the rounding logits (their ``.grad`` become graph outputs).
        betas / reg_on: per-iteration beta and regulariser switch (0 or 1), ``(iters,)`` float32.
        batch: number of samples per replay (this rank's share of the global batch).
        device: the CUDA device.
    """

    def __init__(self, loss_terms: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]], reg_weight: float,
                 params: list[nn.Parameter], betas: Tensor, reg_on: Tensor, batch: int, device: torch.device):
        self._loss_terms, self.reg_weight, self.params = loss_terms, float(reg_weight), params
        self.index = torch.zeros(batch, dtype=torch.long, device=device)
        self.it = torch.zeros((), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.rec = torch.zeros((), device=device)
        self.reg = torch.zeros((), device=device)
        self.beta = torch.zeros((), device=device)
        self._betas, self._reg_on = betas.to(device, torch.float32), reg_on.to(device, torch.float32)
        self.graph = self._capture(device)

    def _body(self) -> None:
        # index_select, not ``table[i]``: indexing with a 0-dim tensor reads its value on the host
        i = self.it.clamp(max=self._betas.numel() - 1).reshape(1)
        beta, on = self._betas.index_select(0, i).squeeze(0), self._reg_on.index_select(0, i).squeeze(0)
        rec, reg = self._loss_terms(self.index, beta, on)
        loss = rec + self.reg_weight * on * reg
        torch.autograd.backward(loss, inputs=self.params)
        self.rec.copy_(rec.detach())
        self.reg.copy_((on * reg).detach())
        self.beta.copy_(beta * on)
        bad = (self.first_bad < 0) & ~torch.isfinite(loss.detach())
        self.first_bad.copy_(torch.where(bad, self.it, self.first_bad))

    def _capture(self, device: torch.device) -> torch.cuda.CUDAGraph:
        def drop_grads() -> None:  # the captured backward then allocates the gradients from the graph's pool
            for p in self.params:
                p.grad = None

        graph, _ = capture_graph(self._body, device, before_each=drop_grads)  # warm-up: gradients only
        self.first_bad.fill_(-1)
        return graph

    def run(self, index: Tensor, it: int) -> None:
        """Replay the iteration ``it`` on the samples ``index`` (device or host LongTensor)."""
        self.index.copy_(index, non_blocking=True)
        self.it.fill_(it)
        self.graph.replay()

    def release(self) -> None:
        """Drop the graph and the gradients it owns (their memory belongs to its pool)."""
        for p in self.params:
            p.grad = None
        self.graph = None


def capture_graph(fn: Callable[[], Any], device: torch.device,
                  before_each: Callable[[], None] = lambda: None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Capture ``fn()`` as a CUDA graph after :data:`WARMUP_ITERS` eager runs on a side stream (which
    let cuDNN and cuBLAS choose and allocate); returns the graph and the outputs of the captured call
    (overwritten by every replay). ``before_each`` runs before each warm-up run and before capture."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_ITERS):
            before_each()
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    before_each()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_unavailable_reason(device: torch.device, cache_device: torch.device, precision: str) -> str | None:
    """Why one iteration cannot run as a CUDA graph here, or None when it can."""
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if cache_device.type != "cuda":
        return "the unit's cache is in host memory (gathering from it is a host-side copy)"
    if str(precision) not in ("32-true", "32", "64-true", "64"):
        return f"precision {precision} runs under autocast, whose weight cache cannot be captured"
    return None


class GraphedMetaStep:
    """One GAC meta step's hypergradient (three levels of autograd) captured as a CUDA graph.

    Args:
        hypergradient: ``(train_index, val_indices) -> (grad_s, parts)``:
            :func:`gaq.calib.gac.meta_hypergradient_parts` bound to the unit and the settings, taking
            the meta batch and one index tensor per validation group (all on the device).
        index / val: the first meta step's indices (the shapes every replay has).
        device: the CUDA device.

    ``run(index, val)`` copies the step's indices in and returns the same output tensors every time
    (overwritten by each replay): the hypergradient ``grad_s`` and the outer loss's detached pieces.
    """

    def __init__(self, hypergradient: Callable[[Tensor, list[Tensor]], tuple[Tensor, dict[str, Tensor]]],
                 index: Tensor, val: list[Tensor], device: torch.device):
        # the graph reads every tensor the function closes over at the addresses they had during
        # capture: hold the function, and so keep them alive
        self._hypergradient = hypergradient
        self.index = index.to(device).clone()
        self.val = [v.to(device).clone() for v in val]
        # the hypergradient changes no state, so the warm-up runs are free
        self.graph, (self.grad_s, self.parts) = capture_graph(lambda: hypergradient(self.index, self.val), device)

    def run(self, index: Tensor, val: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        self.index.copy_(index, non_blocking=True)
        for static, v in zip(self.val, val):
            static.copy_(v, non_blocking=True)
        self.graph.replay()
        return self.grad_s, self.parts

    def release(self) -> None:
        self.graph = self._hypergradient = None
