"""Metrics on known inputs: FID, improved precision / recall, k-NN radii, class accuracy, IS, the
classifier feature extractor, and the feature-stats files."""
from __future__ import annotations

import math

import pytest
import torch

from gaq.errors import GaqError
from gaq.eval.metrics import (ClassifierExtractor, FeatureStats, MetricsConfig, build_extractors, class_accuracy,
                              compute_metrics, frechet_distance, inception_score, knn_radii, load_stats,
                              precision_recall, save_stats)
from gaq.toy.classifier import ClassifierConfig, DigitClassifier, save_classifier


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_fid_of_identical_sets_is_zero_and_a_shift_gives_its_squared_length():
    x = gaussian(400, 8, 0)
    assert abs(frechet_distance(x, x)) < 1e-6
    # same covariance, means apart by c: FID = ||c||^2 exactly
    shift = torch.tensor([1.0, -2.0, 0.5, 0, 0, 0, 0, 3.0])
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-6)
    assert frechet_distance(x, x + 2 * shift) > frechet_distance(x, x + shift)


def test_fid_matches_the_closed_form_for_scaled_gaussians():
    # N(0, I) vs N(0, 4 I) in d dims: FID = trace(I + 4I - 2*2I) = d
    a, b = gaussian(20000, 4, 1), 2 * gaussian(20000, 4, 2)
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)


def test_fid_rejects_too_few_samples():
    with pytest.raises(GaqError, match="at least 2"):
        frechet_distance(gaussian(1, 3, 0), gaussian(5, 3, 1))


def test_knn_radii_on_a_line():
    x = torch.arange(6, dtype=torch.float32).unsqueeze(1)   # 0, 1, ..., 5
    assert torch.equal(knn_radii(x, 1), torch.ones(6))
    assert torch.equal(knn_radii(x, 2, chunk_size=4), torch.tensor([2.0, 1, 1, 1, 1, 2]))
    with pytest.raises(GaqError, match="more than 6"):
        knn_radii(x, 6)


def test_precision_recall_of_a_set_against_itself_is_one_and_of_far_sets_zero():
    x = gaussian(300, 6, 3)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    far = gaussian(200, 6, 4) + 100.0
    assert precision_recall(x, far, k=3) == (0.0, 0.0)


def test_precision_counts_generated_points_inside_the_real_manifold():
    real = gaussian(200, 5, 5)
    fake = torch.cat([real[:50], gaussian(50, 5, 6) + 100.0])    # half copies, half far away
    p, r = precision_recall(real, fake, k=3)
    assert p == 0.5
    assert 0.0 < r < 1.0
    # chunking changes nothing
    assert precision_recall(real, fake, k=3, chunk_size=7) == (p, r)


def test_class_accuracy_overall_and_per_class():
    logits = torch.eye(4)[[0, 1, 1, 3, 3, 3]]        # predictions 0 1 1 3 3 3
    labels = torch.tensor([0, 1, 2, 3, 3, 0])
    overall, per_class = class_accuracy(logits, labels, 4)
    assert overall == pytest.approx(4 / 6)
    assert per_class[:2] == [0.5, 1.0] and per_class[2] == 0.0 and per_class[3] == 1.0
    _, with_missing = class_accuracy(logits[:2], labels[:2], 4)
    assert with_missing[:2] == [1.0, 1.0] and math.isnan(with_missing[2]) and math.isnan(with_missing[3])


def test_inception_score_on_known_logits():
    # every image certain of its own class, classes evenly used: IS = number of classes (one split)
    confident = 50.0 * torch.eye(10).repeat(20, 1)
    mean, _ = inception_score(confident, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-3)
    # every image the same distribution: IS = 1
    mean, _ = inception_score(torch.randn(1, 10).repeat(200, 1), splits=2)
    assert mean == pytest.approx(1.0, abs=1e-6)


def small_classifier(seed: int = 0) -> DigitClassifier:
    torch.manual_seed(seed)
    return DigitClassifier(ClassifierConfig(channels=(8, 16), feature_dim=16))


def test_classifier_extractor_outputs_and_identity():
    ex = ClassifierExtractor(small_classifier(), sfid_channels=7)
    images = torch.rand(5, 1, 16, 16) * 2 - 1
    stats = ex.extract(images)
    assert stats.features.shape == (5, 16) and stats.logits.shape == (5, 10)
    assert stats.spatial.shape == (5, 7 * 8 * 8)          # first stride-2 map of a 16x16 input: 8x8
    # the features and logits are the classifier's own
    torch.testing.assert_close(stats.logits, ex.classifier(images))
    # other image sizes are resized to the classifier's
    assert ex.extract(torch.zeros(2, 1, 32, 32)).features.shape == (2, 16)
    assert ex.identity() == ClassifierExtractor(small_classifier(), 7).identity()
    assert ex.identity() != ClassifierExtractor(small_classifier(seed=1), 7).identity()
    assert ClassifierExtractor(small_classifier(), sfid_channels=0).extract(images).spatial is None
    ex.check_channels(1)
    with pytest.raises(GaqError, match="set features: null"):
        ex.check_channels(4)                              # e.g. a latent-space model


def test_compute_metrics_of_a_set_against_itself():
    ex = ClassifierExtractor(small_classifier())
    images = torch.rand(40, 1, 16, 16) * 2 - 1
    stats = ex.extract(images)
    labels = stats.logits.argmax(1)                       # ask for what the classifier sees: accuracy 1
    out = compute_metrics(ex, stats, stats, labels, 10, MetricsConfig())
    assert abs(out["fid"]) < 1e-3 and abs(out["sfid"]) < 1e-3
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["accuracy"] == 1.0
    assert len(out["per_class_accuracy"]) == 10


def test_build_extractors_needs_an_existing_classifier_and_explains_skipped_inception(tmp_path):
    save_classifier(small_classifier(), tmp_path / "model" / "classifier")
    extractors, notes = build_extractors(str(tmp_path / "model"), MetricsConfig(inception="auto"))
    assert [e.name for e in extractors][0] == "classifier"
    if "inception" not in [e.name for e in extractors]:       # torch-fidelity or its weights are absent here
        assert any("FID-Inception and IS skipped" in n for n in notes)
    _, notes = build_extractors(None, MetricsConfig(inception="off"))
    assert any("classifier metrics skipped" in n for n in notes) and any("inception is off" in n for n in notes)
    with pytest.raises(GaqError, match="does not exist"):
        build_extractors(str(tmp_path / "nowhere"), MetricsConfig())


def test_stats_file_round_trip_and_corrupt_file(tmp_path):
    stats = FeatureStats(torch.randn(4, 3), None, torch.randn(4, 2))
    save_stats(tmp_path / "s.safetensors", stats, {"a": 1})
    loaded, meta = load_stats(tmp_path / "s.safetensors")
    assert meta == {"a": 1} and torch.equal(loaded.features, stats.features) and loaded.spatial is None
    (tmp_path / "s.safetensors").write_bytes(b"not a safetensors file")
    assert load_stats(tmp_path / "s.safetensors") is None
    assert load_stats(tmp_path / "missing.safetensors") is None
