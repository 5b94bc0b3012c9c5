"""A small CNN digit classifier: judge of class fidelity and FID feature network of the default model.

:class:`DigitClassifier` maps images in [-1, 1] to class logits; its penultimate activations
(:meth:`DigitClassifier.features`, ``feature_dim`` values per image) play the role Inception's
pool features play for natural images. :class:`ClassifierModule` trains it with small random
shifts and Gaussian pixel noise, so that generated digits (slightly off-centre, slightly noisy) are
judged on their shape. Saved as ``model.safetensors`` + ``config.json`` in a folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gaq.errors import GaqError, check
from gaq.toy.digits import NUM_DIGIT_CLASSES

CLASSIFIER_WEIGHTS = "model.safetensors"
CLASSIFIER_CONFIG = "config.json"


@dataclass
class ClassifierConfig:
    """Architecture of the digit classifier.

    Attributes:
        image_size: input side the classifier was trained at.
        in_channels: image channels.
        channels: conv channels per stage; every stage halves the resolution.
        feature_dim: width of the penultimate layer (the FID feature dimension).
        num_classes: output classes.
        norm_groups: GroupNorm groups (must divide every entry of ``channels``).
    """

    image_size: int = 16
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    num_classes: int = NUM_DIGIT_CLASSES
    norm_groups: int = 8


class DigitClassifier(nn.Module):
    """Conv stages (conv3x3-GN-SiLU, conv3x3 stride 2-GN-SiLU), global average pool, then
    ``Linear -> SiLU`` (the features) and ``Linear`` (the logits).

    SiLU rather than ReLU before the features, so no feature is exactly zero for every image
    (a dead unit would add a zero-variance direction to the FID covariances).
    """

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        check(all(c % cfg.norm_groups == 0 for c in cfg.channels), "classifier.model.norm_groups must divide every channels entry")
        self.config = cfg
        layers: list[nn.Module] = []
        c_in = cfg.in_channels
        for c in cfg.channels:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(cfg.norm_groups, c), nn.SiLU(),
                nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(cfg.norm_groups, c), nn.SiLU(),
            ]
            c_in = c
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.neck = nn.Sequential(nn.Linear(c_in, cfg.feature_dim), nn.SiLU())
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(B, feature_dim)`` of images ``x`` ``(B, C, H, W)`` in [-1, 1]."""
        return self.neck(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` of images ``x`` ``(B, C, H, W)`` in [-1, 1]."""
        return self.head(self.features(x))


def save_classifier(model: DigitClassifier, folder: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (created)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / CLASSIFIER_WEIGHTS))
    (out / CLASSIFIER_CONFIG).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    return out


def load_classifier(folder: str | os.PathLike) -> DigitClassifier:
    """A classifier saved by :func:`save_classifier`, in eval mode with gradients off."""
    path = Path(folder)
    weights, config = path / CLASSIFIER_WEIGHTS, path / CLASSIFIER_CONFIG
    if not (weights.is_file() and config.is_file()):
        raise GaqError(f"no classifier in '{path}' (needs {CLASSIFIER_WEIGHTS} and {CLASSIFIER_CONFIG}); run gaq train-default")
    raw = json.loads(config.read_text())
    raw["channels"] = tuple(raw["channels"])
    model = DigitClassifier(ClassifierConfig(**raw))
    model.load_state_dict(load_file(str(weights)))
    return model.eval().requires_grad_(False)


@dataclass
class ClassifierTraining:
    """How the digit classifier is trained (after the DDPM, on the same training split).

    Attributes:
        model: architecture.
        max_steps: optimizer steps.
        batch_size: images per batch.
        lr: AdamW peak learning rate (cosine-decayed to zero).
        weight_decay: AdamW weight decay.
        max_shift: random translation of training images, in pixels (each direction).
        noise_std: standard deviation of the Gaussian pixel noise added to training images.
        label_smoothing: cross-entropy label smoothing.
    """

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    max_steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1
    noise_std: float = 0.05
    label_smoothing: float = 0.0


def random_shift(x: Tensor, max_shift: int, fill: float = -1.0) -> Tensor:
    """Translate each image of ``x`` ``(B, C, H, W)`` by its own random offset in ``[-max_shift, max_shift]``
    pixels per axis, filling the uncovered border with ``fill`` (the background value)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), device=x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), device=x.device)
    rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, h, 1)
    cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    # (B, H+2s, W+2s, C) gathered at (batch, rows, cols) -> (B, H, W, C)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of :class:`DigitClassifier` on ``(images, labels)`` batches, with
    random shifts and pixel noise (see :class:`ClassifierTraining`)."""

    def __init__(self, cfg: ClassifierTraining = ClassifierTraining()):
        super().__init__()
        self.cfg = cfg
        self.classifier = DigitClassifier(cfg.model)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        x = random_shift(x, self.cfg.max_shift)
        if self.cfg.noise_std > 0:
            x = x + self.cfg.noise_std * torch.randn_like(x)
        logits = self.classifier(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        self.log("classifier/loss", loss, prog_bar=True)
        self.log("classifier/train_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.classifier.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
