"""The data of the shipped default model: scikit-learn's handwritten digits, upsampled to 16x16.

``sklearn.datasets.load_digits()`` ships inside the scikit-learn wheel (1,797 images of 8x8 pixels,
values 0-16, labels 0-9), so the default model trains and evaluates with no download.

Images are scaled to [-1, 1] and upsampled by **bilinear** interpolation (``align_corners=False``).
Nearest-neighbour upsampling would make every training image exactly piecewise constant on 2x2
blocks, a hard structure the DDPM would have to reproduce pixel-exactly (any deviation then reads as
noise to the FID features); bilinear gives smooth strokes, like a natural low-resolution image.
Bilinear weights are convex, so the range stays inside [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader

from gaq.errors import check
from gaq.models.batches import ImageSplit, image_loader

NUM_DIGIT_CLASSES = 10
DIGITS_MAX_VALUE = 16.0  # load_digits() pixel values are integers in [0, 16]
Upsample = Literal["bilinear", "nearest"]


@dataclass
class DigitsData:
    """Which digits images, at which size, split how.

    Attributes:
        image_size: side of the square images (the 8x8 originals are interpolated to it).
        upsample: ``bilinear`` (default, see the module docstring) or ``nearest``.
        val_fraction: share of the 1,797 images held out (stratified by class) for evaluation.
        split_seed: seed of the held-out split; the same seed always gives the same split.
    """

    image_size: int = 16
    upsample: Upsample = "bilinear"
    val_fraction: float = 0.15
    split_seed: int = 0


def load_digit_images(image_size: int = 16, upsample: Upsample = "bilinear") -> tuple[Tensor, Tensor]:
    """All 1,797 digits as images.

    Returns:
        images: float32 ``(N, 1, image_size, image_size)`` in [-1, 1] (0 = ink-free background at -1).
        labels: int64 ``(N,)`` in 0..9.
    """
    check(image_size >= 8, f"digits image_size must be >= 8 (the originals are 8x8), got {image_size}")
    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / (DIGITS_MAX_VALUE / 2) - 1.0
    if image_size != x.shape[-1]:
        kwargs = {"align_corners": False} if upsample == "bilinear" else {}
        x = F.interpolate(x, size=(image_size, image_size), mode=upsample, **kwargs)
    return x.clamp(-1.0, 1.0).contiguous(), torch.from_numpy(bunch.target.astype(np.int64))


def split_indices(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A deterministic stratified train / held-out split.

    Args:
        labels: ``(N,)`` class ids.
        val_fraction: share held out, in (0, 1).
        seed: split seed.

    Returns:
        ``(train_idx, val_idx)``: sorted int64 index tensors that partition ``range(N)``.
    """
    check(0.0 < val_fraction < 1.0, f"val_fraction must be in (0, 1), got {val_fraction}")
    idx = np.arange(len(labels))
    train, val = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=labels.numpy())
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(val))


def load_digits_splits(data: DigitsData) -> tuple[ImageSplit, ImageSplit]:
    """The ``(train, held_out)`` splits described by ``data``."""
    images, labels = load_digit_images(data.image_size, data.upsample)
    train, val = split_indices(labels, data.val_fraction, data.split_seed)
    return ImageSplit(images[train], labels[train]), ImageSplit(images[val], labels[val])


class DigitsDataModule(pl.LightningDataModule):
    """Batches ``(images (B, 1, S, S) in [-1, 1], labels (B,))`` of the digits training split.

    The dataset is small (about 1,500 training images), so an "epoch" is ``samples_per_epoch`` images
    drawn as repeated random permutations: Lightning's per-epoch work then runs rarely.

    Args:
        image_size / upsample / val_fraction / split_seed: see :class:`DigitsData`.
        batch_size: images per batch (per device).
        samples_per_epoch: images per epoch; 0 means one pass over the training split.
        num_workers: DataLoader workers (0: the data is in memory already).
    """

    def __init__(
        self,
        image_size: int = 16,
        upsample: Upsample = "bilinear",
        val_fraction: float = 0.15,
        split_seed: int = 0,
        batch_size: int = 256,
        samples_per_epoch: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        check(batch_size >= 1, f"data.batch_size must be >= 1, got {batch_size}")
        self.data = DigitsData(image_size, upsample, val_fraction, split_seed)
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.num_workers = num_workers
        self.train_split: ImageSplit | None = None
        self.held_out: ImageSplit | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_split is None:
            self.train_split, self.held_out = load_digits_splits(self.data)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return image_loader(self.train_split, self.batch_size, self.samples_per_epoch, num_workers=self.num_workers)
