"""Labelled images held in memory, served a whole batch at a time: the training data of the shipped models.

:class:`ImageSplit` holds one split; :func:`image_loader` serves it as shuffled batches through
DataLoader's ``__getitems__`` path (one gather per batch instead of one indexing call and a collate per
image, which matters when a small model trains at hundreds of steps a second), with an optional random
horizontal flip per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from gaq.errors import check


@dataclass
class ImageSplit:
    """Images and labels of one split: ``images`` ``(N, C, S, S)`` in [-1, 1], ``labels`` ``(N,)``."""

    images: Tensor
    labels: Tensor


class _BatchedImages(Dataset):
    """``(images, labels)`` of a whole batch of indices at a time; each image flipped horizontally with
    probability ``hflip`` (a torch RNG draw: seeded by Lightning)."""

    def __init__(self, split: ImageSplit, hflip: float = 0.0):
        self.split, self.hflip = split, hflip

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, idx: list[int]) -> tuple[Tensor, Tensor]:
        i = torch.as_tensor(idx, dtype=torch.long)
        x = self.split.images[i]
        if self.hflip > 0:
            flip = torch.rand(len(i)) < self.hflip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.split.labels[i]


def _stacked(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """collate_fn of :class:`_BatchedImages`: the batch is already stacked."""
    return batch


def image_loader(split: ImageSplit, batch_size: int, samples_per_epoch: int = 0, hflip: float = 0.0,
                 num_workers: int = 0) -> DataLoader:
    """Shuffled batches ``(images (B, C, S, S), labels (B,))`` of ``split``.

    Args:
        split: the images.
        batch_size: images per batch (the last partial batch is dropped).
        samples_per_epoch: images per epoch, drawn as repeated random permutations; 0: one pass.
        hflip: probability of a random horizontal flip of each image.
        num_workers: DataLoader workers (0: the data is in memory already).
    """
    dataset = _BatchedImages(split, hflip)
    num = samples_per_epoch or len(dataset)
    check(num >= batch_size, f"data.samples_per_epoch ({num}) must be >= data.batch_size ({batch_size})")
    return DataLoader(dataset, batch_size=batch_size, sampler=RandomSampler(dataset, num_samples=num), drop_last=True,
                      collate_fn=_stacked, num_workers=num_workers, persistent_workers=num_workers > 0)
