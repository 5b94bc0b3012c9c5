"""Timestep grouping and GAC diagnostics: conflict matrices, weight statistics, plots."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from gaq.calib.diagnostics import (
    gradient_conflict_matrix, mean_conflict, per_sample_alignment, plot_conflict_matrix, plot_weight_by_step,
    plot_weight_vs_alignment, unit_weight_stats, validation_gradient, weight_vs_alignment,
)
from gaq.calib.grouping import adaptive_groups, contiguous_groups, make_groups, per_step_gradients
from gaq.calib.weights import LearnedSampleWeights
from gaq.errors import GaqError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def mse_per_sample(fmodel, batch):
    x, y = batch
    return ((fmodel(x) - y) ** 2).flatten(1).mean(1)


def planted_gradients(pattern: list[int], dim: int = 40, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """One row per step: the direction of its planted cluster plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(pattern) + 1, dim, generator=gen, dtype=torch.float64)
    rows = [centres[c] + noise * torch.randn(dim, generator=gen, dtype=torch.float64) for c in pattern]
    return torch.stack(rows) * torch.linspace(0.5, 3.0, len(pattern), dtype=torch.float64)[:, None]


# ---------------------------------------------------------------------------------------------- grouping

@pytest.mark.parametrize("S, G", [(20, 5), (20, 3), (7, 7), (5, 1), (11, 4)])
def test_contiguous_groups_cover_all_steps_in_order_with_balanced_sizes(S, G):
    groups = contiguous_groups(S, G)
    assert groups.shape == (S,) and groups.dtype == torch.long
    assert bool((groups[1:] >= groups[:-1]).all())
    sizes = torch.bincount(groups, minlength=G)
    assert sizes.numel() == G and int(sizes.sum()) == S
    assert int(sizes.max() - sizes.min()) <= 1 and int(sizes.min()) >= 1
    assert torch.equal(make_groups("contiguous", S, G), groups)


def test_contiguous_groups_reject_more_groups_than_steps():
    with pytest.raises(GaqError, match="gac.num_groups"):
        contiguous_groups(4, 5)


def test_adaptive_groups_recover_planted_contiguous_clusters():
    pattern = [0] * 3 + [1] * 5 + [2] * 4  # uneven runs: contiguous_groups would cut them elsewhere
    groups = adaptive_groups(planted_gradients(pattern), 3)
    assert groups.tolist() == pattern
    assert make_groups("adaptive", 12, 3, planted_gradients(pattern)).tolist() == pattern


def test_adaptive_groups_without_contiguity_recover_interleaved_clusters():
    pattern = [0, 1, 0, 1, 1, 0, 0, 1, 0, 1]
    grads = planted_gradients(pattern, seed=3)
    assert adaptive_groups(grads, 2, contiguous=False).tolist() == pattern
    runs = adaptive_groups(grads, 2, contiguous=True)
    assert bool((runs[1:] >= runs[:-1]).all())  # contiguity forces runs even when the data is interleaved


def test_adaptive_groups_reject_zero_gradients():
    grads = planted_gradients([0, 0, 1, 1])
    grads[2] = 0
    with pytest.raises(GaqError, match="gac.grouping"):
        adaptive_groups(grads, 2)


def test_per_step_gradients_are_the_mean_loss_gradient_of_each_step():
    torch.manual_seed(0)
    unit = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    theta = [unit[0].weight, unit[2].weight]
    batches = [(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)) for _ in range(3)]
    grads = per_step_gradients(unit, theta, mse_per_sample, batches)
    assert grads.shape == (3, 12 + 8)
    for k, (x, y) in enumerate(batches):
        unit.zero_grad()
        ((unit(x) - y) ** 2).flatten(1).mean(1).mean().backward()
        assert torch.allclose(grads[k], torch.cat([unit[0].weight.grad.flatten(), unit[2].weight.grad.flatten()]))
    assert torch.equal(validation_gradient(unit, theta, mse_per_sample, batches), grads.mean(0))


# ---------------------------------------------------------------------------------------------- conflicts

def test_conflict_matrix_properties():
    grads = torch.randn(6, 30)
    grads[1] = 2.5 * grads[0]  # same direction
    grads[2] = -grads[0]  # opposite
    dist = gradient_conflict_matrix(grads)
    assert dist.shape == (6, 6)
    assert torch.equal(dist, dist.T)
    assert bool((dist.diagonal() == 0).all())
    assert bool((dist >= 0).all()) and bool((dist <= 2).all())
    assert float(dist[0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert float(dist[0, 2]) == pytest.approx(2.0, abs=1e-12)
    orth = gradient_conflict_matrix(torch.eye(3))
    assert torch.allclose(orth, 1 - torch.eye(3, dtype=torch.float64))
    assert mean_conflict(orth) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- weights vs alignment

def test_per_sample_alignment_matches_per_sample_gradients():
    torch.manual_seed(1)
    unit = nn.Linear(4, 1, bias=False).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    ref = torch.randn(4, dtype=torch.float64)
    cos = per_sample_alignment(unit, [unit.weight], mse_per_sample, (x, y), ref)
    residual = (x @ unit.weight.detach().T - y).squeeze(1)
    per_sample_grad = 2 * residual[:, None] * x  # d (a.x - y)^2 / da
    expected = torch.nn.functional.cosine_similarity(per_sample_grad, ref[None], dim=1)
    assert torch.allclose(cos, expected)


def test_weight_vs_alignment_table_bins_by_weight():
    gen = torch.Generator().manual_seed(0)
    weights = 1 + 0.1 * torch.randn(200, generator=gen)
    alignment = (weights - 1) * 5 + 0.05 * torch.randn(200, generator=gen)  # planted: heavier = better aligned
    table = weight_vs_alignment(weights, alignment, bins=4)
    assert [r["bin"] for r in table] == [0, 1, 2, 3]
    assert sum(r["count"] for r in table) == 200
    assert all(a["weight_max"] <= b["weight_min"] for a, b in zip(table, table[1:]))
    means = [r["alignment_mean"] for r in table]
    assert means == sorted(means) and means[0] < 0 < means[-1]
    json.dumps(table)


def test_unit_weight_stats_are_json_and_average_per_step():
    # global indices 0..11: steps 0,0,0,1,1,1,2,2,2,3,3,3; the training split holds every index but 1 and 7
    step_of_index = torch.arange(12) // 3
    train = torch.tensor([0, 2, 3, 4, 5, 6, 8, 9, 10, 11])
    weights = LearnedSampleWeights(train)
    with torch.no_grad():
        weights.s.copy_(torch.linspace(-1, 1, 10))
    stats = unit_weight_stats(weights, step_of_index)
    json.dumps(stats)
    w = weights.all_weights().double()
    steps = step_of_index[train]
    expected = [float(w[steps == k].mean()) for k in range(4)]
    assert stats["mean_weight_per_step"] == pytest.approx(expected)
    assert stats["count_per_step"] == [2, 3, 2, 3]
    assert stats["num_samples"] == 10
    assert stats["max_min_ratio"] == pytest.approx(float(w.max() / w.min()))
    assert 0 < stats["normalized_entropy"] < 1
    uniform = unit_weight_stats(LearnedSampleWeights(train), step_of_index, num_steps=5)
    assert uniform["mean_weight_per_step"] == [1.0, 1.0, 1.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------- plots

def test_plots_are_written_as_png(tmp_path):
    before = gradient_conflict_matrix(torch.randn(5, 20))
    after = gradient_conflict_matrix(torch.randn(5, 20))
    table = weight_vs_alignment(torch.rand(50), torch.rand(50) * 2 - 1, bins=5)
    paths = [
        plot_conflict_matrix(before, after, tmp_path / "conflict.png", labels=[str(t) for t in range(5)]),
        plot_conflict_matrix(before, None, tmp_path / "conflict_before.png"),
        plot_weight_by_step([1.01, 0.99, 1.0, 1.02], tmp_path / "sub" / "weights.png"),
        plot_weight_vs_alignment(table, tmp_path / "align.png"),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
