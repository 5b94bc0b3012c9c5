"""Image grids as PNG files (Pillow; no torchvision)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from gaq.errors import check


def make_grid(images: Tensor, nrow: int, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile images into one array.

    Args:
        images: ``(N, C, H, W)`` in [-1, 1]; ``C`` 1 (grey) or 3 (RGB). Other channel counts are shown
            through :func:`displayable_channels` (a latent model without an autoencoder samples 4).
        nrow: images per grid row.
        pad: pixels between images (and around the grid).
        pad_value: padding value in [-1, 1] (1 = white).

    Returns:
        uint8 array ``(rows*(H+pad)+pad, nrow*(W+pad)+pad)`` for one channel, with a trailing
        channel axis of 3 for RGB.
    """
    check(images.ndim == 4 and images.shape[1] >= 1, f"save_grid needs (N, C, H, W) images, got {tuple(images.shape)}")
    images = displayable_channels(images)
    check(nrow >= 1 and len(images) >= 1, "save_grid needs nrow >= 1 and at least one image")
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = np.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=np.float32)
    x = images.detach().float().cpu().clamp(-1, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = x[i]
    grid = np.round((grid + 1.0) * 127.5).astype(np.uint8)
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def displayable_channels(images: Tensor) -> Tensor:
    """``(N, C, H, W)`` images as grey or RGB: 1 or 3 channels as they are, the first 3 of more, the first of 2."""
    c = images.shape[1]
    return images if c in (1, 3) else images[:, : 3 if c > 3 else 1]


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int, scale: int = 4, pad: int = 1, pad_value: float = 1.0) -> Path:
    """Write ``images`` ``(N, C, H, W)`` in [-1, 1] as a PNG grid of ``nrow`` images per row.

    Args:
        images: images in [-1, 1] (clamped), ``C`` 1 (grey) or 3 (RGB); other counts as in :func:`make_grid`.
        path: PNG file to write (parent folders are created).
        nrow: images per row.
        scale: integer nearest-neighbour enlargement of the whole grid, so small images are visible.
        pad / pad_value: see :func:`make_grid`.
    """
    check(scale >= 1, f"grid scale must be >= 1, got {scale}")
    grid = make_grid(images, nrow, pad, pad_value)
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
