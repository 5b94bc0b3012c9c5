"""What GAC did to a unit: gradient conflicts between timesteps, the learned weights, and their link to alignment.

Tables and stats are plain Python (JSON-serialisable, for ``summary.json``); plots are PNGs drawn
on a bare :class:`matplotlib.figure.Figure` (Agg canvas), so the process-wide matplotlib backend is
never touched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from gaq.calib.grouping import flat_gradient
from gaq.calib.weights import LearnedSampleWeights
from gaq.errors import check


def gradient_conflict_matrix(grads: Tensor) -> Tensor:
    """Pairwise cosine distance ``1 - cos(g_a, g_b)`` between per-step gradients.

    Args:
        grads: ``(S, P)`` flattened gradients, one row per kept step (zero rows count as
            orthogonal to everything).

    Returns:
        ``(S, S)`` float64, symmetric, zero diagonal, values in [0, 2] (0 = same direction,
        1 = orthogonal, 2 = opposite).
    """
    check(grads.ndim == 2, f"gradients must be (steps, params), got shape {tuple(grads.shape)}")
    g = grads.detach().double()
    g = g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    cos = g @ g.T
    dist = (1.0 - 0.5 * (cos + cos.T)).clamp(0.0, 2.0)
    dist.fill_diagonal_(0.0)
    return dist


def mean_conflict(dist: Tensor) -> float:
    """Mean off-diagonal entry of a conflict matrix (0 for a single step)."""
    S = dist.shape[0]
    return float(dist.sum() / (S * (S - 1))) if S > 1 else 0.0


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def plot_conflict_matrix(before: Tensor, after: Tensor | None, path: str | Path,
                         labels: Sequence[str] | None = None) -> Path:
    """Heatmaps of the conflict matrix before and (optionally) after GAC's reconstruction, one colour scale.

    Args:
        before, after: ``(S, S)`` matrices from :func:`gradient_conflict_matrix`; ``after`` may be None.
        path: PNG to write.
        labels: tick label of each kept step (e.g. its timestep), default its index.
    """
    mats = [("before", before)] + ([("after", after)] if after is not None else [])
    vmax = max(float(m.max()) for _, m in mats) or 1.0
    fig = Figure(figsize=(5 * len(mats) + 1, 4.5))
    axes = fig.subplots(1, len(mats), squeeze=False)[0]
    for ax, (name, m) in zip(axes, mats):
        im = ax.imshow(m.detach().cpu().numpy(), vmin=0.0, vmax=vmax, cmap="viridis")
        ax.set_title(f"{name}: mean cosine distance {mean_conflict(m):.3f}")
        ax.set_xlabel("kept step")
        ax.set_ylabel("kept step")
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
    fig.colorbar(im, ax=list(axes), label="1 - cos")
    return _save(fig, path)


def plot_weight_by_step(mean_weight_per_step: Sequence[float] | Tensor, path: str | Path,
                        labels: Sequence[str] | None = None) -> Path:
    """Bar chart of the mean learned (mean-one) weight of each kept step, with the uniform level 1.0."""
    values = torch.as_tensor(mean_weight_per_step, dtype=torch.float64).tolist()
    fig = Figure(figsize=(max(4.0, 0.3 * len(values) + 2), 3.5))
    ax = fig.subplots()
    ax.bar(range(len(values)), [v - 1.0 for v in values], bottom=1.0, color="tab:blue")  # bars from uniform
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="uniform")
    lo, hi = min(values + [1.0]), max(values + [1.0])
    pad = max(hi - lo, 1e-6) * 0.2
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("kept step (sampling order)")
    ax.set_ylabel("mean weight N * omega")
    ax.set_xticks(range(len(values)), list(labels) if labels is not None else [str(k) for k in range(len(values))],
                  rotation=90, fontsize=6)
    ax.legend()
    return _save(fig, path)


def per_sample_alignment(unit: nn.Module | Any, theta: Sequence[Tensor], per_sample_loss: Any, batch: Any,
                         reference_grad: Tensor) -> Tensor:
    """Cosine between each sample's reconstruction gradient and a reference (validation) gradient.

    Args:
        unit, theta, per_sample_loss: as in :mod:`gaq.calib.gac` (``per_sample_loss(unit, batch) -> (B,)``).
        batch: B calibration tuples.
        reference_grad: ``(P,)`` flattened gradient, e.g. :func:`gaq.calib.grouping.flat_gradient`
            of the validation set.

    Returns:
        ``(B,)`` float64 cosines (one backward per sample: a diagnostic, not for the training loop).
    """
    losses = per_sample_loss(unit, batch)
    ref = reference_grad.detach().double().reshape(-1)
    ref = ref / ref.norm().clamp_min(torch.finfo(torch.float64).tiny)
    out = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], list(theta), retain_graph=i + 1 < losses.shape[0],
                                    allow_unused=True, materialize_grads=True)
        g = torch.cat([x.detach().double().reshape(-1) for x in grads])
        out.append(g @ ref / g.norm().clamp_min(torch.finfo(torch.float64).tiny))
    return torch.stack(out)


def validation_gradient(unit: nn.Module | Any, theta: Sequence[Tensor], per_sample_loss: Any,
                        val_batches: Sequence[Any]) -> Tensor:
    """Mean over validation batches of the flattened loss gradient, ``(P,)`` (the reference of Figure 2)."""
    check(len(val_batches) >= 1, "need at least one validation batch")
    return torch.stack([flat_gradient(unit, theta, per_sample_loss, b) for b in val_batches]).mean(0)


def weight_vs_alignment(weights: Tensor, alignment: Tensor, bins: int = 5) -> list[dict[str, float]]:
    """The paper's Figure 2 as a table: samples in equal-count bins of learned weight, alignment per bin.

    Args:
        weights: learned weight of each sample, ``(N,)``.
        alignment: cosine between each sample's gradient and the validation gradient, ``(N,)``.
        bins: number of bins (by weight quantile, lowest weights first).

    Returns:
        One dict per bin: ``bin``, ``count``, ``weight_min``, ``weight_max``, ``weight_mean``,
        ``alignment_mean``, ``alignment_std``.
    """
    weights, alignment = weights.detach().double().reshape(-1).cpu(), alignment.detach().double().reshape(-1).cpu()
    check(weights.numel() == alignment.numel(), "weights and alignment must have one entry per sample")
    check(1 <= bins <= weights.numel(), f"bins must be in [1, {weights.numel()}], got {bins}")
    order = torch.argsort(weights, stable=True)
    table = []
    for b, part in enumerate(torch.tensor_split(order, bins)):
        w, a = weights[part], alignment[part]
        table.append({
            "bin": b, "count": int(part.numel()),
            "weight_min": float(w.min()), "weight_max": float(w.max()), "weight_mean": float(w.mean()),
            "alignment_mean": float(a.mean()), "alignment_std": float(a.std()) if a.numel() > 1 else 0.0,
        })
    return table


def plot_weight_vs_alignment(table: list[dict[str, float]], path: str | Path) -> Path:
    """Mean (and std) alignment per weight bin, from :func:`weight_vs_alignment`."""
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    x = range(len(table))
    ax.bar(x, [r["alignment_mean"] for r in table], yerr=[r["alignment_std"] for r in table],
           color="tab:orange", capsize=3)
    ax.set_xticks(list(x), [f"{r['weight_min']:.4g}-{r['weight_max']:.4g}" for r in table], rotation=45, fontsize=7)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("learned weight (bin)")
    ax.set_ylabel("cos(sample grad, validation grad)")
    return _save(fig, path)


def unit_weight_stats(weights: LearnedSampleWeights, step_of_index: Tensor,
                      num_steps: int | None = None) -> dict[str, Any]:
    """JSON-serialisable summary of one unit's learned weights.

    Args:
        weights: the learned weights after the unit's meta phase.
        step_of_index: kept step (0..S-1, sampling order) of every global sample index, a long
            tensor indexed by global index (covering at least the training indices).
        num_steps: S; default ``max(step) + 1`` over the training tuples.

    Returns:
        :meth:`LearnedSampleWeights.spread` (entropy, normalized entropy, max/min ratio, max and min
        weight) plus ``num_samples``, ``mean_weight_per_step`` (list of S floats; NaN-free: a step
        without training tuples gets 0.0) and ``count_per_step``.
    """
    steps = torch.as_tensor(step_of_index).long().cpu()[weights.indices.cpu()]
    S = int(steps.max()) + 1 if num_steps is None else int(num_steps)
    check(bool((steps >= 0).all()) and bool((steps < S).all()), f"step ids must be in [0, {S})")
    w = weights.all_weights().detach().double().cpu()
    counts = torch.bincount(steps, minlength=S)
    sums = torch.bincount(steps, weights=w, minlength=S)
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    stats: dict[str, Any] = dict(weights.spread())
    stats.update({
        "num_samples": weights.num_samples,
        "mean_weight_per_step": [float(v) for v in means],
        "count_per_step": [int(c) for c in counts],
    })
    check(all(math.isfinite(v) for v in stats["mean_weight_per_step"]), "non-finite learned weights")
    return stats
