"""Offline FID and class accuracy with the default model's digit classifier.

The usual FID feature network (Inception v3) needs torch-fidelity and downloaded weights. For the
shipped digits model the trained digit classifier's penultimate features serve instead, plugged
into torchmetrics' ``FrechetInceptionDistance`` as a custom feature module (torchmetrics passes a
custom module's inputs through unchanged, so images stay in [-1, 1] float).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from gaq.errors import check
from gaq.toy.classifier import CLASSIFIER_WEIGHTS, DigitClassifier, load_classifier

CLASSIFIER_SUBFOLDER = "classifier"  # where train-default puts the classifier inside a model folder


class DigitFeatures(nn.Module):
    """Frozen FID feature extractor: penultimate features of a :class:`DigitClassifier`.

    Input: images ``(B, C, H, W)`` in [-1, 1], any float dtype; images of another size than the
    classifier's are resized (bilinear, antialiased) to it. Output: float32 ``(B, num_features)``.

    Attributes:
        num_features: feature dimension (read by torchmetrics' FID).
    """

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.config.feature_dim
        self.image_size = classifier.config.image_size

    def train(self, mode: bool = True) -> "DigitFeatures":
        """Stays in eval mode: the extractor is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return self.classifier.features(x).float()


def classifier_folder(folder: str | os.PathLike) -> Path:
    """The classifier folder of a model folder (``<folder>/classifier``), or ``folder`` itself if it holds one."""
    path = Path(folder)
    return path if (path / CLASSIFIER_WEIGHTS).is_file() else path / CLASSIFIER_SUBFOLDER


def load_digit_features(folder: str | os.PathLike) -> DigitFeatures:
    """The FID feature extractor of a model folder written by ``gaq train-default`` (or of its classifier folder)."""
    return DigitFeatures(load_classifier(classifier_folder(folder)))


def _batches(x: Tensor, batch_size: int):
    return (x[i : i + batch_size] for i in range(0, len(x), batch_size))


def _device_of(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def fid_with_features(real: Tensor, fake: Tensor, feature: nn.Module, batch_size: int = 512) -> float:
    """Fréchet distance between the feature statistics of two image sets (torchmetrics FID).

    Args:
        real: reference images ``(N, C, H, W)`` in the feature module's input range ([-1, 1] for
            :class:`DigitFeatures`); at least 2.
        fake: generated images, same layout; at least 2.
        feature: module mapping images to ``(B, F)`` features with a ``num_features`` attribute.
        batch_size: images per feature-extraction call.

    Returns:
        The FID (float). Images are moved to the feature module's device batch by batch.
    """
    check(len(real) >= 2 and len(fake) >= 2, f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} fake")
    device = _device_of(feature)
    metric = FrechetInceptionDistance(feature=feature, normalize=True).to(device)
    for real_flag, images in ((True, real), (False, fake)):
        for chunk in _batches(images, batch_size):
            metric.update(chunk.to(device, torch.float32), real=real_flag)
    return float(metric.compute())


@torch.no_grad()
def class_accuracy(
    classifier: nn.Module, images: Tensor, labels: Tensor, num_classes: int | None = None, batch_size: int = 512
) -> tuple[float, list[float]]:
    """Share of ``images`` that ``classifier`` assigns to their ``labels``.

    Args:
        classifier: images ``(B, C, H, W)`` -> logits ``(B, K)``.
        images: ``(N, C, H, W)``.
        labels: ``(N,)`` int class ids.
        num_classes: length of the per-class list (default: ``max(labels) + 1``).
        batch_size: images per classifier call.

    Returns:
        ``(overall, per_class)``: overall accuracy and one accuracy per class id (NaN for a class
        with no image).
    """
    check(len(images) == len(labels) and len(images) > 0, "class_accuracy needs as many labels as images, at least one")
    device = _device_of(classifier)
    preds = torch.cat([classifier(chunk.to(device, torch.float32)).argmax(1).cpu() for chunk in _batches(images, batch_size)])
    labels = labels.cpu().long()
    correct = (preds == labels).float()
    k = num_classes if num_classes is not None else int(labels.max()) + 1
    per_class = [float(correct[labels == c].mean()) if bool((labels == c).any()) else math.nan for c in range(k)]
    return float(correct.mean()), per_class
