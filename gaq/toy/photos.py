"""The data of the CIFAR-shaped testbed: 32x32 random crops of the colour photographs inside scikit-learn
and scikit-image.

Why this data. The testbed must be a *trained* network of the paper's CIFAR-10 architecture (so its
weight and activation statistics are those of a real model), trained by the project with no download.
CIFAR-10 itself is a download. The wheels of two dependencies carry ten natural colour photographs:
scikit-learn's ``china`` and ``flower`` (``sklearn.datasets.load_sample_images``) and scikit-image's
``astronaut``, ``chelsea`` (a cat), ``coffee``, ``hubble_deep_field``, ``immunohistochemistry``,
``retina``, ``rocket`` and the left view of ``stereo_motorcycle`` (``skimage.data``; these eight lie in
the wheel's ``skimage/data`` folder, the others of ``skimage.data`` are downloads or grey). Random
crops of them at random positions and scales, resized to 32x32, look like CIFAR's small natural
images: objects, faces, textures, sky, at many scales. Ten photographs give ten classes (the source
photograph of a crop), as CIFAR-10 has ten: the testbed's feature network is a classifier of the
source photograph, and its penultimate features are the FID features.

How a crop is made (deterministic from a seed): each photograph is resized (antialiased) so that its
short side takes each of ``num_scales`` log-spaced values between ``min_side`` and ``max_side``; a crop
picks a photograph (round-robin, so classes are balanced), a scale, an integer position and a
horizontal flip from a seeded ``torch.Generator``, and cuts a 32x32 window. The resize happens once
per scale, so a crop is a plain slice: no interpolation aliasing and no per-crop cost. The training
set and the held-out set (FID reference) are drawn with different seeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from gaq.errors import check
from gaq.models.batches import ImageSplit, image_loader

#: the photographs, in class order: (library, loader name)
PHOTO_SOURCES: tuple[tuple[str, str], ...] = (
    ("sklearn", "china"), ("sklearn", "flower"), ("skimage", "astronaut"), ("skimage", "chelsea"),
    ("skimage", "coffee"), ("skimage", "hubble_deep_field"), ("skimage", "immunohistochemistry"),
    ("skimage", "retina"), ("skimage", "rocket"), ("skimage", "stereo_motorcycle"),
)
PHOTO_NAMES: tuple[str, ...] = tuple(name for _, name in PHOTO_SOURCES)
NUM_PHOTO_CLASSES = len(PHOTO_SOURCES)


def _load_photo(library: str, name: str) -> np.ndarray:
    """One photograph as uint8 ``(H, W, 3)``, read from inside the library's wheel."""
    if library == "sklearn":
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    image = getattr(skimage.data, name)()
    image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)
    return np.asarray(image)[..., :3]


@lru_cache(maxsize=1)
def load_photos() -> tuple[Tensor, ...]:
    """The ten photographs as float32 ``(3, H, W)`` tensors in [-1, 1], in :data:`PHOTO_SOURCES` order."""
    photos = []
    for library, name in PHOTO_SOURCES:
        arr = _load_photo(library, name)
        check(arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8,
              f"photograph {library}:{name} is not an 8-bit RGB image (shape {arr.shape}, {arr.dtype})")
        photos.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0)
    return tuple(photos)


@dataclass
class PhotoCrops:
    """Which crops: their size, scales and seeds.

    Attributes:
        image_size: crop side in pixels (the model's ``sample_size``).
        min_side / max_side: short side of a photograph, in pixels, at the smallest / largest scale
            (a crop then sees ``image_size / side`` of the short side).
        num_scales: log-spaced scales between them.
        num_train: crops of the training set.
        num_held_out: crops of the held-out set (FID reference, classifier accuracy).
        train_seed / held_out_seed: seeds of the two sets.
    """

    image_size: int = 32
    min_side: int = 36
    max_side: int = 256
    num_scales: int = 8
    num_train: int = 50_000
    num_held_out: int = 10_000
    train_seed: int = 0
    held_out_seed: int = 1

    def __post_init__(self):
        check(self.image_size >= 8, f"data.image_size must be >= 8, got {self.image_size}")
        check(self.image_size <= self.min_side <= self.max_side,
              f"photo crops need image_size <= min_side <= max_side, got {self.image_size}, {self.min_side}, {self.max_side}")
        check(self.num_scales >= 1, f"data.num_scales must be >= 1, got {self.num_scales}")
        check(self.num_train >= 1 and self.num_held_out >= 2, "data.num_train must be >= 1 and data.num_held_out >= 2")

    def sides(self) -> list[int]:
        """The short side of a photograph at each scale, smallest first."""
        return sorted({int(round(s)) for s in np.geomspace(self.min_side, self.max_side, self.num_scales)})


def photo_pyramid(cfg: PhotoCrops) -> list[list[Tensor]]:
    """``pyramid[c][k]``: photograph ``c`` resized (bilinear, antialiased) to short side ``cfg.sides()[k]``
    (computed once per crop size and scales: the training and held-out sets share it; do not modify)."""
    return _pyramid(cfg.image_size, tuple(cfg.sides()))


@lru_cache(maxsize=2)
def _pyramid(image_size: int, sides: tuple[int, ...]) -> list[list[Tensor]]:
    pyramid = []
    for photo in load_photos():
        h, w = photo.shape[1:]
        levels = []
        for side in sides:
            scale = side / min(h, w)
            size = (max(image_size, round(h * scale)), max(image_size, round(w * scale)))
            levels.append(F.interpolate(photo[None], size=size, mode="bilinear", antialias=True,
                                        align_corners=False)[0].clamp(-1, 1))
        pyramid.append(levels)
    return pyramid


def make_crops(cfg: PhotoCrops, count: int, seed: int) -> tuple[Tensor, Tensor]:
    """``count`` crops drawn with ``seed`` (see the module docstring).

    Returns:
        images: float32 ``(count, 3, S, S)`` in [-1, 1], ``S = cfg.image_size``.
        labels: int64 ``(count,)``, the source photograph (``i % 10``: balanced).
    """
    pyramid = photo_pyramid(cfg)
    gen = torch.Generator().manual_seed(int(seed))
    s = cfg.image_size
    labels = torch.arange(count) % NUM_PHOTO_CLASSES
    level = torch.randint(0, len(cfg.sides()), (count,), generator=gen)
    u = torch.rand(count, 2, generator=gen, dtype=torch.float64)
    flip = torch.rand(count, generator=gen) < 0.5
    out = torch.empty(count, 3, s, s)
    for i in range(count):
        img = pyramid[int(labels[i])][int(level[i])]
        top = int(u[i, 0] * (img.shape[1] - s + 1))
        left = int(u[i, 1] * (img.shape[2] - s + 1))
        crop = img[:, top:top + s, left:left + s]
        out[i] = crop.flip(-1) if bool(flip[i]) else crop
    return out, labels


class PhotoCropsDataModule(pl.LightningDataModule):
    """Batches ``(images (B, 3, S, S) in [-1, 1], labels (B,))`` of the photo-crop training set.

    Args:
        image_size / min_side / max_side / num_scales / num_train / num_held_out / train_seed /
            held_out_seed: see :class:`PhotoCrops`.
        batch_size: images per batch (per device).
        samples_per_epoch: images per epoch (repeated random permutations); 0: one pass.
        hflip: probability of a random horizontal flip of a training image.
        num_workers: DataLoader workers (0: the data is in memory already).
    """

    def __init__(
        self,
        image_size: int = 32,
        min_side: int = 36,
        max_side: int = 256,
        num_scales: int = 8,
        num_train: int = 50_000,
        num_held_out: int = 10_000,
        train_seed: int = 0,
        held_out_seed: int = 1,
        batch_size: int = 256,
        samples_per_epoch: int = 0,
        hflip: float = 0.5,
        num_workers: int = 0,
    ):
        super().__init__()
        check(batch_size >= 1, f"data.batch_size must be >= 1, got {batch_size}")
        check(0.0 <= hflip <= 1.0, f"data.hflip must be in [0, 1], got {hflip}")
        self.crops = PhotoCrops(image_size, min_side, max_side, num_scales, num_train, num_held_out, train_seed, held_out_seed)
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.hflip = hflip
        self.num_workers = num_workers
        self.train_split: ImageSplit | None = None
        self.held_out: ImageSplit | None = None

    def with_batch_size(self, batch_size: int) -> "PhotoCropsDataModule":
        """The same data (splits shared, not redrawn) at another batch size, one pass per epoch."""
        other = PhotoCropsDataModule(**vars(self.crops), batch_size=batch_size, hflip=self.hflip,
                                     num_workers=self.num_workers)
        self.setup()
        other.train_split, other.held_out = self.train_split, self.held_out
        return other

    def setup(self, stage: str | None = None) -> None:
        if self.train_split is None:
            c = self.crops
            self.train_split = ImageSplit(*make_crops(c, c.num_train, c.train_seed))
            self.held_out = ImageSplit(*make_crops(c, c.num_held_out, c.held_out_seed))

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return image_loader(self.train_split, self.batch_size, self.samples_per_epoch, self.hflip, self.num_workers)
