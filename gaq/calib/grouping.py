"""Timestep groups of GAC's validation set: contiguous (the paper) or adaptive (by gradient similarity).

A *kept step* is one of the S sampling steps whose latents the calibration set keeps, numbered
0..S-1 in sampling order (noisiest first). A grouping is a long tensor ``(S,)`` holding the group
id of each kept step; group ids are 0..G-1, numbered in order of their first kept step.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from gaq.data.datamodule import contiguous_step_groups
from gaq.errors import check

Grouping = Literal["contiguous", "adaptive"]


def contiguous_groups(num_kept_steps: int, num_groups: int) -> Tensor:
    """Split S kept steps, in sampling order, into G contiguous groups whose sizes differ by at most 1.

    Returns:
        Group id of each kept step, ``(S,)`` long, non-decreasing, every id in 0..G-1 used.
    """
    check(num_kept_steps >= 1, f"need at least one kept timestep, got {num_kept_steps}")
    check(1 <= num_groups <= num_kept_steps,
          f"gac.num_groups must be in [1, {num_kept_steps}] (the number of kept timesteps), got {num_groups}")
    return contiguous_step_groups(num_kept_steps, num_groups)


def adaptive_groups(grad_per_step: Tensor, num_groups: int, contiguous: bool = True) -> Tensor:
    """Cluster kept steps whose reconstruction gradients point the same way.

    Agglomerative clustering (scikit-learn, average linkage) on the cosine distance between the
    steps' gradients. With ``contiguous`` (default) only neighbouring segments of kept steps may
    merge (a chain connectivity graph), so every group is a run of consecutive steps like the
    paper's groups, only with data-chosen boundaries; without it, groups may mix distant steps.

    Args:
        grad_per_step: flattened reconstruction gradient of each kept step, ``(S, P)``, rows
            non-zero (see :func:`per_step_gradients`).
        num_groups: G, in 1..S.
        contiguous: restrict groups to runs of consecutive kept steps.

    Returns:
        Group id of each kept step, ``(S,)`` long, ids numbered by first appearance.
    """
    from sklearn.cluster import AgglomerativeClustering

    check(grad_per_step.ndim == 2, f"grad_per_step must be (steps, params), got shape {tuple(grad_per_step.shape)}")
    S = grad_per_step.shape[0]
    check(1 <= num_groups <= S, f"gac.num_groups must be in [1, {S}] (the number of kept timesteps), got {num_groups}")
    X = grad_per_step.detach().double().cpu()
    check(bool(torch.isfinite(X).all()), "per-step gradients hold NaN or Inf; check the unit's calibration data")
    check(bool((X.norm(dim=1) > 0).all()),
          "a kept timestep has a zero reconstruction gradient; use gac.grouping: contiguous for this unit")
    if num_groups == S:
        return torch.arange(S)
    if num_groups == 1:
        return torch.zeros(S, dtype=torch.long)
    connectivity = None
    if contiguous:
        connectivity = np.eye(S, k=1) + np.eye(S, k=-1)
    labels = AgglomerativeClustering(
        n_clusters=num_groups, metric="cosine", linkage="average", connectivity=connectivity,
    ).fit_predict(X.numpy())
    return _renumber(torch.as_tensor(labels, dtype=torch.long))


def _renumber(labels: Tensor) -> Tensor:
    """Relabel so that group ids appear in increasing order along the kept steps."""
    order: dict[int, int] = {}
    for lab in labels.tolist():
        order.setdefault(lab, len(order))
    return torch.tensor([order[lab] for lab in labels.tolist()], dtype=torch.long)


def make_groups(kind: Grouping, num_kept_steps: int, num_groups: int,
                grad_per_step: Tensor | None = None, contiguous: bool = True) -> Tensor:
    """The grouping ``kind`` asks for: :func:`contiguous_groups` or :func:`adaptive_groups` (needs ``grad_per_step``)."""
    if kind == "contiguous":
        return contiguous_groups(num_kept_steps, num_groups)
    check(kind == "adaptive", f"gac.grouping must be 'contiguous' or 'adaptive', got {kind!r}")
    check(grad_per_step is not None and grad_per_step.shape[0] == num_kept_steps,
          "adaptive grouping needs one gradient per kept timestep")
    return adaptive_groups(grad_per_step, num_groups, contiguous)


def flat_gradient(unit: nn.Module | Any, theta: Sequence[Tensor], per_sample_loss: Any, batch: Any) -> Tensor:
    """Gradient of the mean per-sample loss of ``batch`` with respect to ``theta``, flattened to ``(P,)``.

    ``per_sample_loss(unit, batch) -> (B,)`` follows the contract of :mod:`gaq.calib.gac`.
    Parameters the loss does not reach contribute zeros.
    """
    loss = per_sample_loss(unit, batch).mean()
    grads = torch.autograd.grad(loss, list(theta), allow_unused=True, materialize_grads=True)
    return torch.cat([g.detach().reshape(-1) for g in grads])


def per_step_gradients(unit: nn.Module, theta: Sequence[Tensor], per_sample_loss: Any,
                       batches_by_step: Sequence[Any]) -> Tensor:
    """Flattened reconstruction gradient of each kept step.

    Args:
        unit: the reconstruction unit.
        theta: the parameters the gradient is taken with respect to (P elements in all).
        per_sample_loss: ``per_sample_loss(unit, batch) -> (B,)`` (contract of :mod:`gaq.calib.gac`).
        batches_by_step: one batch of calibration tuples per kept step, in sampling order.

    Returns:
        ``(S, P)``: row k is the gradient of the mean loss of step k's batch.
    """
    check(len(batches_by_step) >= 1, "per_step_gradients needs at least one kept timestep")
    return torch.stack([flat_gradient(unit, theta, per_sample_loss, b) for b in batches_by_step])
