"""Sample-quality metrics on feature vectors, and the feature extractors that make them.

Every metric here works on per-image outputs of a feature network (:class:`FeatureStats`), so the
reference set's outputs can be cached and the generated set's accumulated batch by batch:

- FID (Heusel et al. 2017) through torchmetrics' ``FrechetInceptionDistance``, fed with features
  through :class:`FeaturePassthrough` (a custom "feature module" that is the identity);
- sFID (Nash et al. 2021): the same Fréchet distance on a spatial feature map (the first
  channels of an early feature map, flattened), where the extractor provides one;
- improved precision and recall (Kynkäänniemi et al. 2019): k-nearest-neighbour balls in feature
  space, computed with ``torch.cdist`` in chunks;
- class accuracy, overall and per class (torchmetrics), of a classifier's predictions against the
  requested class labels;
- Inception Score (torchmetrics ``InceptionScore`` on Inception logits), only with Inception.

Feature extractors: :class:`ClassifierExtractor` (the default model's digit classifier, offline)
and :class:`InceptionExtractor` (torch-fidelity's Inception v3; optional, used only when
torch-fidelity is installed and its weights file is already on disk: nothing is downloaded).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy
from torchmetrics.image.fid import FrechetInceptionDistance

from gaq.atomic import atomic_write
from gaq.provenance import json_digest
from gaq.errors import check
from gaq.toy.classifier import DigitClassifier, load_classifier

InceptionMode = Literal["auto", "off"]

#: torch-fidelity's Inception v3 weights file name (as torch.hub caches it under ``<hub dir>/checkpoints``).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


@dataclass
class MetricsConfig:
    """Which metrics, with which settings.

    Attributes:
        k: neighbours of improved precision / recall (Kynkäänniemi et al. use 3).
        sfid_channels: channels of the extractor's spatial map kept for sFID (Nash et al. keep 7);
            0 turns sFID off.
        inception: ``auto`` computes FID-Inception and IS when torch-fidelity is installed and its
            weights are on disk (otherwise says so in one line and skips them); ``off`` never does.
        inception_weights: path of torch-fidelity's Inception weights; default: the torch hub cache
            (``<torch.hub.get_dir()>/checkpoints/weights-inception-2015-12-05-6726825d.pth``).
        is_splits: splits of the Inception Score.
        pr_equal_sizes: precision / recall on sets of equal size, as Kynkäänniemi et al. measure
            them (the k-NN radii shrink as a set grows): the larger set is cut to the smaller one's
            size (generated: the first images, class-balanced; reference: a seeded random subset).
        batch_size: images per feature-extractor call.
        chunk_size: rows per ``torch.cdist`` block of precision / recall (memory only).
    """

    k: int = 3
    sfid_channels: int = 7
    inception: InceptionMode = "auto"
    inception_weights: str | None = None
    is_splits: int = 10
    pr_equal_sizes: bool = True
    batch_size: int = 500
    chunk_size: int = 1024


@dataclass
class FeatureStats:
    """Per-image outputs of one feature extractor over one image set (CPU, float32).

    Attributes:
        features: ``(N, F)`` pooled features (FID, precision / recall).
        spatial: ``(N, S)`` flattened spatial features (sFID), or None.
        logits: ``(N, K)`` class logits (class accuracy, or IS for Inception), or None.
    """

    features: Tensor
    spatial: Tensor | None = None
    logits: Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    @staticmethod
    def cat(parts: list["FeatureStats"]) -> "FeatureStats":
        """Concatenate the outputs of several batches."""
        check(len(parts) > 0, "no feature batches to concatenate (no images were seen)")

        def join(name: str) -> Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return FeatureStats(join("features"), join("spatial"), join("logits"))

    def rows(self, index: Tensor) -> "FeatureStats":
        """The outputs of images ``index`` ``(K,)`` (long), in that order."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return FeatureStats(self.features[index], pick(self.spatial), pick(self.logits))


# --------------------------------------------------------------------------------------------
# Metrics on features
# --------------------------------------------------------------------------------------------


class FeaturePassthrough(nn.Module):
    """The identity, as a torchmetrics "feature module": lets FID / IS take precomputed features.

    Input and output: ``(B, num_features)``.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x


def frechet_distance(real: Tensor, fake: Tensor, chunk_size: int = 4096) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (torchmetrics' FID computation).

    Args:
        real: reference features ``(N, F)``, N >= 2.
        fake: generated features ``(M, F)``, M >= 2.
        chunk_size: rows per metric update (memory only).
    """
    check(real.ndim == 2 and fake.ndim == 2 and real.shape[1] == fake.shape[1],
          f"FID needs two (N, F) feature sets of the same width, got {tuple(real.shape)} and {tuple(fake.shape)}")
    check(len(real) >= 2 and len(fake) >= 2, f"FID needs at least 2 images per set, got {len(real)} real and {len(fake)} generated")
    metric = FrechetInceptionDistance(feature=FeaturePassthrough(real.shape[1])).to(real.device)
    for flag, feats in ((True, real), (False, fake)):
        for s in range(0, len(feats), chunk_size):
            metric.update(feats[s:s + chunk_size].to(real.device, torch.float64), real=flag)
    return float(metric.compute())


def knn_radii(features: Tensor, k: int, chunk_size: int = 1024) -> Tensor:
    """Distance of every point to its ``k``-th nearest neighbour in the same set (itself excluded).

    Args:
        features: ``(N, F)``, N > k.
        k: neighbour rank.
        chunk_size: rows per distance block.

    Returns:
        ``(N,)`` radii, float32, on the features' device.
    """
    check(k >= 1 and len(features) > k, f"precision/recall with k={k} needs more than {k} images per set, got {len(features)}")
    x = features.float()
    radii = []
    for s in range(0, len(x), chunk_size):
        dist = torch.cdist(x[s:s + chunk_size], x)  # (c, N); the point itself is at distance ~0
        radii.append(dist.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(points: Tensor, centres: Tensor, radii: Tensor, chunk_size: int = 1024) -> float:
    """Share of ``points`` ``(M, F)`` inside at least one ball ``(centres (N, F), radii (N,))``."""
    x, c, r = points.float(), centres.float(), radii.float().unsqueeze(0)
    inside = 0
    for s in range(0, len(x), chunk_size):
        inside += int((torch.cdist(x[s:s + chunk_size], c) <= r).any(dim=1).sum())
    return inside / max(len(x), 1)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    The real manifold is the union of balls around each real feature with radius its ``k``-th
    nearest-neighbour distance among the real features; likewise for the generated set.
    Precision: share of generated features inside the real manifold (fidelity). Recall: share of
    real features inside the generated manifold (coverage / diversity).

    Args:
        real: reference features ``(N, F)``.
        fake: generated features ``(M, F)``.
        k: neighbour rank (3 in the paper).
        chunk_size: rows per ``torch.cdist`` block (memory only; distances use the matmul path,
            so exact duplicates may sit ~1e-6 away from each other).
    """
    check(real.ndim == 2 and fake.ndim == 2 and real.shape[1] == fake.shape[1],
          f"precision/recall needs two (N, F) feature sets of the same width, got {tuple(real.shape)} and {tuple(fake.shape)}")
    fake = fake.to(real.device)
    precision = manifold_coverage(fake, real, knn_radii(real, k, chunk_size), chunk_size)
    recall = manifold_coverage(real, fake, knn_radii(fake, k, chunk_size), chunk_size)
    return precision, recall


def class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Accuracy of ``argmax(logits)`` ``(N, K)`` against ``labels`` ``(N,)``: overall and per class.

    A class with no image gets NaN in the per-class list.
    """
    check(len(logits) == len(labels) and len(labels) > 0, "class accuracy needs one label per image, at least one image")
    check(logits.shape[1] >= num_classes, f"the classifier has {logits.shape[1]} classes, the model {num_classes}")
    preds, labels = logits.argmax(1).cpu(), labels.cpu().long()
    overall = multiclass_accuracy(preds, labels, num_classes=logits.shape[1], average="micro")
    per = multiclass_accuracy(preds, labels, num_classes=logits.shape[1], average="none")
    present = torch.bincount(labels, minlength=logits.shape[1]) > 0
    per_class = [float(per[c]) if bool(present[c]) else float("nan") for c in range(num_classes)]
    return float(overall), per_class


def inception_score(logits: Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``; std 0 for one split) of Inception logits ``(N, 1008)`` via torchmetrics.

    torchmetrics shuffles the images before splitting; the shuffle is seeded here.
    """
    import warnings

    from torchmetrics.image.inception import InceptionScore

    check(len(logits) >= splits, f"the Inception Score with {splits} splits needs at least {splits} images")
    with warnings.catch_warnings():
        # "will save all extracted features in buffer" (intended) and, for one split, "std(): degrees of freedom"
        warnings.simplefilter("ignore")
        metric = InceptionScore(feature=FeaturePassthrough(logits.shape[1]), splits=splits)
        metric.update(logits.double())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mean, std = metric.compute()
    return float(mean), (float(std) if splits > 1 else 0.0)


# --------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------


class FeatureExtractor(nn.Module):
    """A frozen network mapping images ``(B, C, H, W)`` in [-1, 1] to :class:`FeatureStats`.

    Attributes:
        name: key of its metrics (``classifier`` / ``inception``).
        description: one line for the results file.
    """

    name: str = "features"
    description: str = ""

    def identity(self) -> dict:
        """What its outputs depend on (weights hash, settings): part of the reference cache key."""
        raise NotImplementedError

    def extract(self, images: Tensor) -> FeatureStats:
        """Outputs of one batch, moved to the CPU as float32."""
        raise NotImplementedError

    def check_channels(self, channels: int) -> None:
        """Raise :class:`GaqError` unless images with ``channels`` channels can be measured."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Stays in eval mode: extractors are frozen."""
        return super().train(False)


def _module_device(module: nn.Module) -> torch.device:
    p = next(iter(module.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _classifier_fingerprint(classifier: DigitClassifier) -> str:
    """16 hex digits of a classifier's architecture config and weights."""
    h = hashlib.sha256(json.dumps(asdict(classifier.config), sort_keys=True, default=str).encode())
    for name, tensor in classifier.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _first_downsampling_conv(module: nn.Module) -> nn.Conv2d | None:
    """The first ``nn.Conv2d`` with a stride above 1 in module order (the first downsampled map)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            return m
    return None


class ClassifierExtractor(FeatureExtractor):
    """A project-trained classifier as feature network (offline FID features): the digits model's digit
    classifier, or the testbed's source-photograph classifier.

    Outputs: ``features`` = its penultimate activations (``feature_dim`` values); ``logits`` = its
    class logits; ``spatial`` = the first ``sfid_channels`` channels of the output of its first
    stride-2 convolution (its first downsampled feature map), flattened: the analogue of sFID's
    Inception ``mixed_6/conv`` channels. Images of another size are resized (bilinear, antialiased)
    to the classifier's input size.

    Args:
        classifier: a trained :class:`DigitClassifier`.
        sfid_channels: channels kept for sFID (0: no spatial output).
    """

    name = "classifier"

    def __init__(self, classifier: DigitClassifier, sfid_channels: int = 7):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.image_size = classifier.config.image_size
        self.num_features = classifier.config.feature_dim
        self.fingerprint = _classifier_fingerprint(classifier)
        self.sfid_channels = int(sfid_channels)
        self._spatial_layer = _first_downsampling_conv(classifier) if sfid_channels > 0 else None
        self._captured: Tensor | None = None
        if self._spatial_layer is not None:
            self._spatial_layer.register_forward_hook(self._capture)
        n_classes = classifier.config.num_classes
        self.description = (f"{n_classes}-class classifier {self.fingerprint}: penultimate layer ({self.num_features} dims)"
                            + (f"; sFID on the first {self.sfid_channels} channels of its first downsampled map"
                               if self._spatial_layer is not None else ""))

    def _capture(self, module: nn.Module, args, output: Tensor) -> None:
        self._captured = output

    def check_channels(self, channels: int) -> None:
        want = self.classifier.config.in_channels
        check(channels == want, f"the features classifier takes {want}-channel images but the model samples {channels} "
                                "channels; set features: null")

    def identity(self) -> dict:
        return {"kind": "digit_classifier", "fingerprint": self.fingerprint, "image_size": self.image_size,
                "sfid_channels": self.sfid_channels if self._spatial_layer is not None else 0}

    @torch.no_grad()
    def extract(self, images: Tensor) -> FeatureStats:
        x = images.to(_module_device(self), torch.float32)
        check(x.ndim == 4 and x.shape[1] == self.classifier.config.in_channels,
              f"the classifier takes {self.classifier.config.in_channels}-channel images, got shape {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        self._captured = None
        feats = self.classifier.features(x)
        logits = self.classifier.head(feats)
        spatial = None
        if self._captured is not None:
            spatial = self._captured[:, : self.sfid_channels].flatten(1).float().cpu()
        return FeatureStats(feats.float().cpu(), spatial, logits.float().cpu())


class InceptionExtractor(FeatureExtractor):
    """torch-fidelity's Inception v3 (the FID reference network): 2048-d pool features and logits (IS).

    Images in [-1, 1] are converted to uint8 RGB (grey images repeated over 3 channels), as
    torchmetrics does with ``normalize=True``; torch-fidelity resizes them to 299x299 itself.

    Args:
        weights: path of the weights file (never downloaded here).
    """

    name = "inception"

    def __init__(self, weights: str):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights = weights
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=weights)
        self.num_features = 2048
        self.description = "Inception v3 (torch-fidelity), pool3 features (2048 dims)"

    def check_channels(self, channels: int) -> None:
        check(channels in (1, 3), f"Inception takes grey or RGB images, the model samples {channels} channels (latents?); "
                                  "set metrics.inception: off")

    def identity(self) -> dict:
        path = Path(self.weights)
        return {"kind": "inception_v3_torch_fidelity", "weights": path.name, "weights_bytes": path.stat().st_size}

    @torch.no_grad()
    def extract(self, images: Tensor) -> FeatureStats:
        x = images.to(_module_device(self), torch.float32)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        check(x.shape[1] == 3, f"Inception takes grey or RGB images, got {x.shape[1]} channels")
        x = ((x.clamp(-1, 1) + 1) / 2 * 255).byte()
        feats, logits = self.net(x)
        return FeatureStats(feats.float().cpu(), None, logits.float().cpu())


def inception_weights_path(configured: str | None) -> Path:
    """Where the Inception weights are expected: the configured file, else torch hub's cache."""
    if configured:
        return Path(configured).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def build_extractors(features: str | None, cfg: MetricsConfig) -> tuple[list[FeatureExtractor], list[str]]:
    """The feature extractors of an evaluation and one-line notes on what is skipped and why.

    Args:
        features: folder of the default model's classifier (``model.safetensors`` + ``config.json``),
            a model folder holding it in ``classifier/``, or None.
        cfg: metric settings (Inception mode and weights, sFID channels).

    Raises:
        GaqError: ``features`` is set but holds no classifier.
    """
    from gaq.eval.features import classifier_folder

    extractors: list[FeatureExtractor] = []
    notes: list[str] = []
    if features:
        check(Path(features).is_dir(), f"features folder '{features}' does not exist; point `features` to the default "
                                       "model's classifier folder (e.g. checkpoints/default/classifier) or set it to null")
        extractors.append(ClassifierExtractor(load_classifier(classifier_folder(features)), cfg.sfid_channels))
    else:
        notes.append("classifier metrics skipped: no `features` classifier folder configured")
    if cfg.inception == "off":
        notes.append("FID-Inception and IS skipped: metrics.inception is off")
        return extractors, notes
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        notes.append("FID-Inception and IS skipped: torch-fidelity is not installed (pip install torch-fidelity)")
        return extractors, notes
    except Exception as err:  # e.g. a torchvision built for another torch fails at import time
        notes.append(f"FID-Inception and IS skipped: torch-fidelity cannot be imported ({type(err).__name__}: "
                     f"{str(err).splitlines()[0][:120] if str(err) else ''})")
        return extractors, notes
    weights = inception_weights_path(cfg.inception_weights)
    if not weights.is_file():
        notes.append(f"FID-Inception and IS skipped: Inception weights not found at {weights} (gaq never downloads; "
                     "set metrics.inception_weights)")
        return extractors, notes
    extractors.append(InceptionExtractor(str(weights)))
    return extractors, notes


@torch.no_grad()
def extract_all(extractor: FeatureExtractor, images: Tensor, batch_size: int) -> FeatureStats:
    """Outputs of ``extractor`` over ``images`` ``(N, C, H, W)``, ``batch_size`` at a time."""
    return FeatureStats.cat([extractor.extract(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])


def compute_metrics(
    extractor: FeatureExtractor, real: FeatureStats, fake: FeatureStats, labels: Tensor | None,
    num_classes: int | None, cfg: MetricsConfig,
) -> dict[str, float | list[float] | None]:
    """All metrics one extractor supports, for one generated set against one reference set.

    Args:
        extractor: the network the stats came from (decides which metrics exist and their names).
        real: reference outputs.
        fake: generated outputs.
        labels: ``(M,)`` class each generated image was asked for (class models), or None.
        num_classes: real classes of the model (class models), or None.
        cfg: metric settings.

    Returns:
        classifier: ``fid``, ``sfid``, ``precision``, ``recall``, ``accuracy``, ``per_class_accuracy``;
        inception: ``fid_inception``, ``precision_inception``, ``recall_inception``,
        ``inception_score``, ``inception_score_std``. Metrics that cannot be computed are None.
    """
    device = _module_device(extractor)
    out: dict[str, float | list[float] | None] = {}
    suffix = "" if extractor.name == "classifier" else f"_{extractor.name}"
    out[f"fid{suffix}"] = frechet_distance(real.features.to(device), fake.features.to(device))
    real_pr, fake_pr = real.features, fake.features
    if cfg.pr_equal_sizes and len(real_pr) != len(fake_pr):
        n = min(len(real_pr), len(fake_pr))
        keep = torch.randperm(len(real_pr), generator=torch.Generator().manual_seed(0))[:n].sort().values
        real_pr, fake_pr = (real_pr[keep], fake_pr) if len(real_pr) > n else (real_pr, fake_pr[:n])
    p, r = precision_recall(real_pr.to(device), fake_pr, cfg.k, cfg.chunk_size)
    out[f"precision{suffix}"], out[f"recall{suffix}"] = p, r
    if extractor.name == "classifier":
        has_spatial = real.spatial is not None and fake.spatial is not None
        out["sfid"] = frechet_distance(real.spatial.to(device), fake.spatial.to(device)) if has_spatial else None
        if labels is not None and num_classes is not None and fake.logits is not None and fake.logits.shape[1] >= num_classes:
            out["accuracy"], out["per_class_accuracy"] = class_accuracy(fake.logits, labels, num_classes)
        else:
            out["accuracy"], out["per_class_accuracy"] = None, None
    elif extractor.name == "inception" and fake.logits is not None and len(fake) >= cfg.is_splits:
        out["inception_score"], out["inception_score_std"] = inception_score(fake.logits, cfg.is_splits)
    return out


def stats_digest(identity: dict) -> str:
    """16 hex digits of a JSON-able dict (cache keys)."""
    return json_digest(identity)


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Write ``tensors`` to a safetensors file with ``meta`` (JSON, key ``gaq_meta``) in its header, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(
        tensors, str(tmp), metadata={"gaq_meta": json.dumps(meta, sort_keys=True, default=str)}))


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict] | None:
    """The tensors and meta of a file written by :func:`save_tensors`, or None if it is missing or unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["gaq_meta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # truncated or foreign file: treated as absent and rewritten
        return None
    return tensors, meta


def save_stats(path: str | os.PathLike, stats: FeatureStats, meta: dict) -> Path:
    """Write ``stats`` to a safetensors file with ``meta`` (JSON) in its header, atomically."""
    tensors = {"features": stats.features}
    if stats.spatial is not None:
        tensors["spatial"] = stats.spatial
    if stats.logits is not None:
        tensors["logits"] = stats.logits
    return save_tensors(path, tensors, meta)


def load_stats(path: str | os.PathLike) -> tuple[FeatureStats, dict] | None:
    """The stats and meta of a file written by :func:`save_stats`, or None if it is missing or unreadable."""
    loaded = load_tensors(path)
    if loaded is None or "features" not in loaded[0]:
        return None
    tensors, meta = loaded
    return FeatureStats(tensors["features"], tensors.get("spatial"), tensors.get("logits")), meta


__all__ = [
    "ClassifierExtractor", "FeatureExtractor", "FeaturePassthrough", "FeatureStats", "InceptionExtractor",
    "MetricsConfig", "build_extractors", "class_accuracy", "compute_metrics", "extract_all", "frechet_distance",
    "inception_score", "inception_weights_path", "knn_radii", "load_stats", "load_tensors", "manifold_coverage",
    "precision_recall", "save_stats", "save_tensors", "stats_digest",
]
