"""The real images FID is measured against (a folder, an image file, or the project's own digits / photo
crops) and their cached feature statistics."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

import gaq
from gaq.errors import GaqError, check
from gaq.eval.metrics import FeatureExtractor, FeatureStats, extract_all, load_stats, save_stats, stats_digest
from gaq.toy.digits import DigitsData, Upsample, load_digit_images, split_indices
from gaq.toy.photos import PhotoCrops, make_crops


REFERENCE_FORMAT = 1                # bump when the reference images' preprocessing changes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class ReferenceConfig:
    """Where the real images of the reference statistics come from, and where their features are cached.

    Attributes:
        kind: ``digits`` (the default model's data, ``gaq.toy.digits``, at the model's resolution),
            ``photo_crops`` (the testbed's held-out photo crops, ``gaq.toy.photos``, drawn as
            ``photo_crops`` says) or ``images`` (a file or folder, see ``path``).
        photo_crops: photo_crops only: the crops (the testbed's training settings; the held-out set
            of ``num_held_out`` crops from ``held_out_seed`` is the reference).
        split: digits only: ``all`` 1,797 images, ``train`` or ``held_out`` (the train-default split).
        upsample: digits only: interpolation from 8x8 (as the default model was trained).
        val_fraction / split_seed: digits only: the held-out split (as in train-default).
        path: images only: a ``.npz`` (``arr_0`` or ``images``: uint8 ``(N, H, W, C)``, the usual FID
            reference batch), a ``.safetensors`` file (``images``: ``(N, C, H, W)`` uint8, or float in
            [-1, 1]) or a folder of PNG / JPEG files.
        max_images: use only the first this many images (None: all).
        cache_dir: folder of the cached reference features (None: no cache). A cache file is keyed by
            a hash of the reference's and the feature network's identity and holds them as metadata:
            it is reused when they match and recomputed when they do not.
    """

    kind: Literal["digits", "photo_crops", "images"] = "digits"
    photo_crops: PhotoCrops = field(default_factory=PhotoCrops)
    split: Literal["all", "train", "held_out"] = "all"
    upsample: Upsample = "bilinear"
    val_fraction: float = 0.15
    split_seed: int = 0
    path: str | None = None
    max_images: int | None = None
    cache_dir: str | None = "runs/eval_cache"


def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _to_unit_range(images: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` or float ``[-1, 1]`` images -> float32 ``[-1, 1]``."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images.float().clamp(-1, 1)


def _load_image_source(path: Path) -> tuple[Tensor, dict]:
    """Images ``(N, C, H, W)`` in [-1, 1] and the identity of an image file or folder."""
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        check(len(files) > 0, f"reference.path folder {path} holds no {', '.join(IMAGE_SUFFIXES)} images")
        arrays = [np.asarray(Image.open(f)) for f in files]
        check(len({a.shape for a in arrays}) == 1, f"reference images in {path} differ in size or mode; make them uniform")
        x = torch.from_numpy(np.stack(arrays))
        x = x.unsqueeze(-1) if x.ndim == 3 else x
        ident = {"folder": str(path.resolve()), "files": len(files),
                 "bytes": sum(f.stat().st_size for f in files), "mtime_ns": max(f.stat().st_mtime_ns for f in files)}
        return _to_unit_range(x.permute(0, 3, 1, 2).contiguous()), ident
    check(path.is_file(), f"reference.path {path} does not exist")
    if path.suffix == ".npz":
        data = np.load(path)
        key = next((k for k in ("images", "arr_0") if k in data.files), None)
        check(key is not None, f"reference file {path} has neither 'images' nor 'arr_0' (keys: {data.files})")
        x = torch.from_numpy(np.asarray(data[key]))
        check(x.ndim == 4, f"reference images in {path} must be (N, H, W, C), got {tuple(x.shape)}")
        return _to_unit_range(x.permute(0, 3, 1, 2).contiguous()), _file_identity(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        check("images" in tensors, f"reference file {path} has no 'images' tensor (keys: {sorted(tensors)})")
        x = tensors["images"]
        check(x.ndim == 4, f"reference images in {path} must be (N, C, H, W), got {tuple(x.shape)}")
        return _to_unit_range(x), _file_identity(path)
    raise GaqError(f"reference.path {path}: use a .npz, a .safetensors file or a folder of images")


def load_reference_images(cfg: ReferenceConfig, sample_shape: tuple[int, int, int]) -> tuple[Tensor, dict]:
    """The reference images ``(N, C, H, W)`` in [-1, 1] and their identity (for the cache key).

    Args:
        cfg: where they come from.
        sample_shape: ``(C, H, W)`` of the model's images (``Denoiser.image_shape``: decoded latents for
            latent models); digits are made at this resolution.
    """
    c, h, w = sample_shape
    if cfg.kind == "digits":
        check(c == 1 and h == w, f"reference.kind digits needs a 1-channel square model, this one samples {tuple(sample_shape)}; "
                                 "use reference.kind: images")
        images, labels = load_digit_images(h, cfg.upsample)
        if cfg.split != "all":
            data = DigitsData(h, cfg.upsample, cfg.val_fraction, cfg.split_seed)
            train, held = split_indices(labels, data.val_fraction, data.split_seed)
            images = images[train if cfg.split == "train" else held]
        ident = {"kind": "digits", "image_size": h, "upsample": cfg.upsample, "split": cfg.split}
        if cfg.split != "all":
            ident.update(val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
    elif cfg.kind == "photo_crops":
        crops = cfg.photo_crops
        check((c, h, w) == (3, crops.image_size, crops.image_size),
              f"reference.kind photo_crops makes 3x{crops.image_size}x{crops.image_size} crops, the model samples "
              f"{tuple(sample_shape)}; set reference.photo_crops.image_size to the model's size")
        images, _ = make_crops(crops, crops.num_held_out, crops.held_out_seed)
        ident = {"kind": "photo_crops", **asdict(crops)}
    else:
        check(cfg.path is not None, "reference.kind images needs reference.path (a .npz, .safetensors or image folder)")
        images, ident = _load_image_source(Path(cfg.path).expanduser())
        ident = {"kind": "images", **ident}
        check(images.shape[1] == c, f"reference images have {images.shape[1]} channels, the model samples {c}")
    if cfg.max_images is not None:
        check(cfg.max_images >= 2, f"reference.max_images must be >= 2, got {cfg.max_images}")
        images = images[: cfg.max_images]
    ident.update(count=len(images), max_images=cfg.max_images, format=REFERENCE_FORMAT)
    return images, ident


def reference_stats(cfg: ReferenceConfig, extractor: FeatureExtractor, sample_shape: tuple[int, int, int],
                    batch_size: int) -> tuple[FeatureStats, dict]:
    """The extractor's outputs on the reference images, from the cache when its metadata matches.

    Returns:
        ``(stats, info)``; ``info`` holds ``count``, ``cache`` (``hit`` / ``miss`` / ``off``), ``file``
        and the reference ``identity``.
    """
    images, ident = load_reference_images(cfg, sample_shape)
    meta = {"reference": ident, "extractor": extractor.identity(), "gaq_version": gaq.__version__}
    key_meta = {"reference": ident, "extractor": extractor.identity()}
    path = None
    if cfg.cache_dir:
        path = Path(cfg.cache_dir) / f"ref-{extractor.name}-{stats_digest(key_meta)}.safetensors"
        cached = load_stats(path)
        if cached is not None and same_json(cached[1].get("reference"), ident) and same_json(cached[1].get("extractor"), extractor.identity()):
            return cached[0], {"count": len(cached[0]), "cache": "hit", "file": str(path), "identity": ident}
    stats = extract_all(extractor, images, batch_size)
    if path is not None:
        save_stats(path, stats, meta)
    return stats, {"count": len(stats), "cache": "off" if path is None else "miss",
                   "file": None if path is None else str(path), "identity": ident}


def same_json(a: Any, b: Any) -> bool:
    """Whether two JSON-able values serialise alike (cache metadata comparisons)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------
