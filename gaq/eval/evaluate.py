"""Evaluation of an FP model or a quantized run: sampling, reference statistics, and the whole job.

``gaq evaluate`` (see :mod:`gaq.eval.cli`) calls :func:`run_evaluation`, which

1. loads the FP model (``source``) and, with ``run``, the run's quantized model on top of it;
2. with ``run``, measures the per-step noise-prediction error of the quantized model against the FP
   model on the FP model's DDIM trajectories, per step and per timestep group
   (:mod:`gaq.eval.timestep_error`);
3. with ``run`` and ``fidelity.enabled``, draws (or reads from the cache) the FP model's samples of
   the same sampling settings (:mod:`gaq.eval.fp_samples`), the targets of the fidelity metrics
   (PSNR / SSIM / MSE per sample, FID to FP: :mod:`gaq.eval.fidelity`);
4. samples ``num_samples`` images with ``Trainer.predict`` over a :class:`SamplingModule` (the
   Trainer owns the device, precision and progress bar); class-conditional models get the classes
   round-robin (sample ``i`` asks for class ``i % num_classes``; ``num_samples`` must be a multiple
   of the class count, so every class gets the same number of samples);
5. lets :class:`~gaq.eval.callbacks.MetricsCallback` and
   :class:`~gaq.eval.callbacks.SampleGridCallback` turn the samples into ``metrics.json`` /
   ``metrics.csv`` and ``samples_grid.png``.

Sample ``i``'s starting noise comes from its own generator seeded by ``(seed, i)``: samples do not
depend on the batch size or device count (with ``eta > 0`` the per-step noise is drawn per batch and
does depend on the batching).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import gaq
from gaq.errors import GaqError, check
from gaq.eval.fidelity import FidelityConfig
from gaq.eval.metrics import FeatureExtractor, FeatureStats, MetricsConfig, extract_all, load_stats, save_stats, stats_digest
from gaq.eval.runner import ModelRunner
from gaq.eval.sampling import SamplerConfig, ddim_sample
from gaq.eval.timestep_error import TimestepErrorConfig
from gaq.models.digits import DigitsData, Upsample, load_digit_images, split_indices
from gaq.models.photos import PhotoCrops, make_crops
from gaq.models.conditions import PromptTable
from gaq.models.prompts import text_conditions
from gaq.models.loading import Denoiser
from gaq.provenance import device_name, git_commit

RUN_QUANTIZED_DIR = "quantized"     # where gaq calibrate saves the quantized model inside a run folder
RUN_SUMMARY_FILE = "summary.json"   # gaq calibrate's summary inside a run folder
RUN_EVAL_DIR = "eval"               # default output folder of `gaq evaluate --run R`: R/eval
FP_EVAL_DIR = "runs/eval-fp"        # default output folder of an FP evaluation
REFERENCE_FORMAT = 1                # bump when the reference images' preprocessing changes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _default_sampler() -> SamplerConfig:
    return SamplerConfig(steps=50, guidance_scale=1.0)


@dataclass
class SamplingConfig:
    """Which samples to draw.

    Attributes:
        num_samples: images in all.
        batch_size: images per DDIM run (guidance doubles the model batch).
        seed: base seed; sample ``i``'s starting noise is seeded by ``(seed, i)``.
        sampler: DDIM steps, eta, spacing and classifier-free guidance.
        cond_embeddings: text models only: safetensors file with ``cond`` ``(P, L, D)`` prompt
            embeddings (sample ``i`` gets prompt ``i % P``) and, for guidance, ``uncond`` ``(L, D)``;
            SDXL-style models also ``text_embeds`` (:mod:`gaq.models.conditions`).
        prompts: text models only, instead of ``cond_embeddings``: a text file, one prompt per line
            (sample ``i`` gets prompt ``i % P``), encoded with the model folder's own tokenizer(s) and text
            encoder(s) as the diffusers pipeline does (:mod:`gaq.models.prompts`).
    """

    num_samples: int = 1000
    batch_size: int = 250
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=_default_sampler)
    cond_embeddings: str | None = None
    prompts: str | None = None

    def __post_init__(self):
        check(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


# --------------------------------------------------------------------------------------------
# Conditioning and sampling
# --------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """How each sample is conditioned; ``cond_id`` is a class id, a prompt index, or 0 (unconditional).

    Attributes:
        kind: the model's ``cond_kind`` (``none`` / ``class`` / ``text``).
        num_classes: real classes (class models, and text models with class embeddings).
        null_label: the null class of guidance, or None.
        prompts: the per-prompt model inputs (text models), or None.

    A text model with class embeddings cycles prompts and classes together: ``cond_id`` runs over
    ``lcm(P, num_classes)`` and sample ``cond_id`` gets prompt ``cond_id % P`` and class
    ``cond_id % num_classes`` (the unconditional half: the null class, or the same class).
    """

    kind: str
    num_classes: int | None = None
    null_label: int | None = None
    prompts: PromptTable | None = None

    @staticmethod
    def of(den: Denoiser, sampling: SamplingConfig) -> "Conditioning":
        """The conditioning of ``den`` under ``sampling`` (reads or encodes the prompts of text models)."""
        guided = sampling.sampler.guidance_scale != 1.0
        if den.cond_kind == "class":
            check(den.num_classes is not None and den.num_classes >= 1, "the class-conditional model has no num_classes")
            check(not guided or den.null_label is not None,
                  "sampler.guidance_scale != 1 needs a null class but the model has none: set sampler.guidance_scale: 1")
            return Conditioning("class", den.num_classes, den.null_label)
        if den.cond_kind == "text":
            table = text_conditions(den, sampling.prompts, sampling.cond_embeddings)
            check(not guided or table.uncond is not None,
                  f"sampler.guidance_scale != 1 needs an 'uncond' tensor in {sampling.cond_embeddings}")
            return Conditioning("text", den.num_classes, den.null_label, table)
        check(not guided, "sampler.guidance_scale must be 1 for an unconditional model")
        return Conditioning("none")

    @property
    def period(self) -> int:
        """How many distinct conditions the round-robin cycles through."""
        if self.kind == "class":
            return self.num_classes
        if self.kind == "text":
            return math.lcm(self.prompts.num_prompts, self.num_classes or 1)
        return 1

    def check_balanced(self, n: int, what: str = "num_samples") -> None:
        """Raise unless ``n`` samples give every class (or prompt) the same count."""
        k = self.period
        which = "classes" if self.kind == "class" else ("prompts x classes" if self.num_classes else "prompts")
        check(n % k == 0, f"{what} ({n}) must be a multiple of the model's {k} {which} so that each gets the same "
                          "number of samples")

    def cond_ids(self, n: int) -> Tensor:
        """Round-robin condition ids of samples ``0..n-1``, LongTensor ``(n,)``."""
        return torch.arange(n) % self.period

    def build(self, cond_id: Tensor, device: torch.device, dtype: torch.dtype
              ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """Model keyword inputs for ``cond_id`` ``(B,)`` and the matching null condition (or None)."""
        if self.kind == "class":
            y = cond_id.to(device)
            null = None if self.null_label is None else {"class_labels": torch.full_like(y, self.null_label)}
            return {"class_labels": y}, null
        if self.kind == "text":
            ids = cond_id.cpu()
            cond = self.prompts.rows(ids % self.prompts.num_prompts)
            null = self.prompts.uncond_rows(len(ids))
            if self.num_classes is not None:
                cond["class_labels"] = ids % self.num_classes
                if null is not None:
                    null["class_labels"] = (cond["class_labels"] if self.null_label is None
                                            else torch.full_like(ids, self.null_label))
            return _on(cond, device, dtype), (None if null is None else _on(null, device, dtype))
        return {}, None


def _on(cond: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """A condition dictionary on ``device``, its float tensors in ``dtype``."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in cond.items()}


def sample_noise(seed: int, index: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Starting noise ``(B, *shape)`` of samples ``index`` ``(B,)``: sample ``i`` from a CPU generator
    seeded by ``(seed, i)``, so it is the same whatever the batch and device."""
    out = torch.empty((len(index), *shape))
    for row, i in enumerate(index.tolist()):
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i)) % (2**63))
        out[row] = torch.randn(shape, generator=gen)
    return out


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else torch.float32


def module_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def sample_images(model: nn.Module | ModelRunner, den: Denoiser, index: Tensor, cond_id: Tensor,
                  sampling: SamplingConfig, conditioning: Conditioning) -> Tensor:
    """DDIM samples of ``model`` for samples ``index`` ``(B,)`` with conditions ``cond_id`` ``(B,)``.

    ``model`` is the noise predictor or a :class:`ModelRunner` of it (kept across batches, so CUDA
    graphs and compiled code are built once). Runs where the model is. Returns float32
    ``(B, C, H, W)`` on that device, clamped to [-1, 1].
    """
    net = model.model if isinstance(model, ModelRunner) else model
    device, dtype = module_device(net), _model_dtype(net)
    noise = sample_noise(sampling.seed, index.cpu(), tuple(den.sample_shape)).to(device, dtype)
    cond, null = conditioning.build(cond_id, device, dtype)
    guided = sampling.sampler.guidance_scale != 1.0
    eta_gen = torch.Generator().manual_seed((int(sampling.seed) * 7919 + int(index[0])) % (2**63))
    x = ddim_sample(model, den.alphas_cumprod, noise, sampling.sampler, cond, null if guided else None, generator=eta_gen)
    if den.decoder is not None:  # a latent model: the images are the decoded latents
        x = den.decoder.to(device)(x)
    return x.float().clamp(-1, 1)


def generate(model: nn.Module, den: Denoiser, sampling: SamplingConfig, cond_ids: Tensor | None = None,
             progress: bool = True) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Sample batch by batch without a Trainer (used after calibration, where no Trainer is free).

    Args:
        model: the noise predictor, on the device to sample on.
        den: schedule, sample shape and conditioning metadata.
        sampling: what to sample (``num_samples`` is ignored when ``cond_ids`` is given).
        cond_ids: explicit condition ids ``(N,)``; default round-robin over ``num_samples``.
        progress: show a transient rich progress bar.

    Yields:
        ``(index (B,), cond_id (B,), images (B, C, H, W) float32 in [-1, 1] on the model's device)``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    conditioning = Conditioning.of(den, sampling)
    ids = conditioning.cond_ids(sampling.num_samples) if cond_ids is None else cond_ids.long()
    index = torch.arange(len(ids))
    bar = Progress(TextColumn("[bold]sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not progress, transient=True)
    runner = ModelRunner.for_sampler(model, sampling.sampler)
    try:
        with bar:
            task = bar.add_task("sampling", total=len(ids))
            for s in range(0, len(ids), sampling.batch_size):
                idx, cid = index[s:s + sampling.batch_size], ids[s:s + sampling.batch_size]
                images = sample_images(runner, den, idx, cid, sampling, conditioning)
                bar.advance(task, len(idx))
                yield idx, cid, images
    finally:
        runner.release()


class SamplingModule(pl.LightningModule):
    """``Trainer.predict`` over sample indices: each batch ``(index (B,), cond_id (B,))`` becomes DDIM samples.

    ``predict_step`` returns ``{"index": (B,), "cond_id": (B,), "images": (B, C, H, W) float32 in
    [-1, 1]}``; callbacks consume them in ``on_predict_batch_end``.

    Args:
        model: the noise predictor to sample (FP or quantized); moved by the Trainer.
        denoiser: the FP model's metadata (schedule, sample shape, conditioning).
        sampling: what to sample.
        out_dir: where the evaluation's files go (read by the callbacks).
    """

    def __init__(self, model: nn.Module, denoiser: Denoiser, sampling: SamplingConfig, out_dir: str | os.PathLike):
        super().__init__()
        self.model = model
        self.denoiser = denoiser  # metadata only: not a submodule (its model may be a different one)
        self.sampling = sampling
        self.conditioning = Conditioning.of(denoiser, sampling)
        self.conditioning.check_balanced(sampling.num_samples)
        self.out_dir = Path(out_dir)
        self._runner: ModelRunner | None = None  # built on the first batch, once the Trainer has placed the model

    def cond_ids(self) -> Tensor:
        """Condition id of every sample, ``(num_samples,)``."""
        return self.conditioning.cond_ids(self.sampling.num_samples)

    def dataloader(self) -> DataLoader:
        """Batches ``(index, cond_id)`` of all samples, in order."""
        ids = self.cond_ids()
        return DataLoader(TensorDataset(torch.arange(len(ids)), ids), batch_size=self.sampling.batch_size, shuffle=False)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int = 0) -> dict[str, Tensor]:
        index, cond_id = batch
        if self._runner is None:
            self._runner = ModelRunner.for_sampler(self.model, self.sampling.sampler)
        images = sample_images(self._runner, self.denoiser, index, cond_id, self.sampling, self.conditioning)
        return {"index": index, "cond_id": cond_id, "images": images}

    def on_predict_end(self) -> None:
        if self._runner is not None:
            self._runner.release()
            self._runner = None


# --------------------------------------------------------------------------------------------
# Reference statistics (cached)
# --------------------------------------------------------------------------------------------


@dataclass
class ReferenceConfig:
    """Where the real images of the reference statistics come from, and where their features are cached.

    Attributes:
        kind: ``digits`` (the default model's data, ``gaq.models.digits``, at the model's resolution),
            ``photo_crops`` (the testbed's held-out photo crops, ``gaq.models.photos``, drawn as
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


@dataclass
class GridConfig:
    """The sample grid: ``per_class`` samples per row, one row per class (at most ``max_rows``)."""

    per_class: int = 10
    max_rows: int = 10
    scale: int = 4


@dataclass
class EvaluateConfig:
    """Everything ``gaq evaluate`` reads (the ``trainer`` section aside).

    Attributes:
        source: the FP model (folder or hub id). With ``run`` and no ``source``, the run's base model.
        run: a ``gaq calibrate`` run folder: evaluate its ``quantized/`` model on top of ``source``.
            Without it, the FP model is evaluated.
        out_dir: output folder; default ``<run>/eval``, or ``runs/eval-fp`` for the FP model.
        num_samples / batch_size / seed / sampler / cond_embeddings / prompts: see :class:`SamplingConfig`.
        features: the default model's classifier folder (FID / sFID / precision / recall / accuracy
            features), e.g. ``checkpoints/default/classifier``; None: no classifier metrics.
        reference: the real images of the reference statistics and their cache.
        metrics: metric settings (k, sFID channels, Inception).
        grid: the sample grid.
        timestep_error: the per-step error of a quantized run against the FP model.
        fidelity: PSNR / SSIM / MSE / FID of a quantized run's samples against the FP model's samples
            from the same noise (FP samples cached in ``reference.cache_dir``).
    """

    source: str | None = None
    run: str | None = None
    out_dir: str | None = None
    num_samples: int = 1000
    batch_size: int = 250
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=_default_sampler)
    cond_embeddings: str | None = None
    prompts: str | None = None
    features: str | None = None
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    timestep_error: TimestepErrorConfig = field(default_factory=TimestepErrorConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.num_samples, self.batch_size, self.seed, self.sampler, self.cond_embeddings,
                              self.prompts)

    def output_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        return Path(self.run) / RUN_EVAL_DIR if self.run else Path(FP_EVAL_DIR)


def load_models(cfg: EvaluateConfig) -> tuple[Denoiser, nn.Module, dict]:
    """The FP :class:`Denoiser`, the model to evaluate (FP or quantized) and what it is (for metrics.json)."""
    from gaq.models.loading import load_denoiser
    from gaq.quant import load_quantized, read_quant_config

    source, info = cfg.source, {"run": cfg.run}
    if cfg.run:
        run = Path(cfg.run)
        check(run.is_dir(), f"run folder '{run}' does not exist; give a folder written by gaq calibrate")
        check((run / RUN_QUANTIZED_DIR).is_dir(),
              f"run folder '{run}' has no {RUN_QUANTIZED_DIR}/ (the calibration did not finish); rerun gaq calibrate")
        qcfg = read_quant_config(run / RUN_QUANTIZED_DIR)
        source = source or qcfg["base_source"]
        info.update(preset=qcfg.get("preset"), w_bits=qcfg.get("w_bits"), a_bits=qcfg.get("a_bits"),
                    method=qcfg.get("extra", {}).get("method"))
        summary = run / RUN_SUMMARY_FILE
        if summary.is_file():
            s = json.loads(summary.read_text())
            info.update(calibration_seconds=s.get("calibration_seconds"), peak_memory_bytes=s.get("peak_memory_bytes"),
                        calibration_device=s.get("device"))
    check(source is not None, "set `source` (the FP model folder or hub id) or `run` (a gaq calibrate run folder)")
    den = load_denoiser(source)
    info["source"] = source
    model = load_quantized(Path(cfg.run) / RUN_QUANTIZED_DIR, den.model) if cfg.run else den.model
    info["model"] = "quantized" if cfg.run else "fp"
    return den, model.eval(), info


def run_evaluation(cfg: EvaluateConfig, trainer_kwargs: dict[str, Any], command: str = "") -> dict:
    """Evaluate as described in the module docstring; returns the content of ``metrics.json``.

    Args:
        cfg: what to evaluate and how.
        trainer_kwargs: ``pl.Trainer`` arguments (the YAML's ``trainer`` section, callbacks
            instantiated); gaq's metrics and grid callbacks are added in front of its callbacks.
        command: the command line, recorded in ``metrics.json``.
    """
    from gaq.eval.callbacks import MetricsCallback, SampleGridCallback
    from gaq.eval.fidelity import FidelityMeter
    from gaq.eval.fp_samples import fp_samples
    from gaq.eval.timestep_error import save_timestep_error, timestep_error

    out_dir = cfg.output_dir()
    sampling = cfg.sampling()
    metrics_cb = MetricsCallback(features=cfg.features, reference=cfg.reference, metrics=cfg.metrics, sampling=sampling)
    grid_cb = SampleGridCallback(per_class=cfg.grid.per_class, max_rows=cfg.grid.max_rows, scale=cfg.grid.scale,
                                 sampling=sampling)
    den, model, info = load_models(cfg)
    conditioning = Conditioning.of(den, sampling)
    conditioning.check_balanced(sampling.num_samples)
    kwargs = dict(trainer_kwargs)
    user_callbacks = list(kwargs.get("callbacks") or [])
    kwargs["callbacks"] = [metrics_cb, grid_cb, *user_callbacks]
    progress = kwargs.get("enable_progress_bar") is not False
    if progress and not any(isinstance(cb, ProgressBar) for cb in user_callbacks):
        kwargs["callbacks"].append(RichProgressBar(leave=False))
    kwargs.setdefault("default_root_dir", str(out_dir))
    trainer = pl.Trainer(**kwargs)
    check(trainer.world_size == 1, "gaq evaluate samples on one device; set trainer.devices: 1")
    device = trainer.strategy.root_device
    out_dir.mkdir(parents=True, exist_ok=True)

    ts_summary = None
    if cfg.run and cfg.timestep_error.enabled:
        t0 = time.perf_counter()
        result = timestep_error(den.model.to(device), model.to(device), den, cfg.sampler, conditioning,
                                cfg.timestep_error, cfg.seed)
        title = f"{info.get('method')} W{info.get('w_bits')}A{info.get('a_bits')} ({info.get('preset')}) vs FP"
        json_path, png_path = save_timestep_error(result, out_dir, title)
        ts_summary = {"mean_mse": result["mean_mse"], "mean_rel_mse": result["mean_rel_mse"],
                      "max_mse": result["max_mse"], "num_groups": result["num_groups"], "group_mse": result["group_mse"],
                      "group_steps": result["group_steps"], "seconds": time.perf_counter() - t0,
                      "json": json_path.name, "png": png_path.name}
    notes = []
    if cfg.run and cfg.fidelity.enabled:
        fp_images, fp_info = fp_samples(den, sampling, cfg.fidelity.count(sampling.num_samples), cfg.reference.cache_dir,
                                        device, str(trainer.precision), trainer.precision_plugin.predict_step_context(),
                                        progress)
        metrics_cb.fidelity = FidelityMeter(fp_images, cfg.fidelity.psnr_cap_db, fp_info)
    else:
        notes.append("fidelity to FP skipped: " + ("no run (FP evaluation)" if not cfg.run else "fidelity.enabled is false"))
    metrics_cb.meta = {
        "command": command, "model": info, "device": device_name(device), "git_commit": git_commit(),
        "gaq_version": gaq.__version__, "timestep_error": ts_summary,
        "sampling": {"num_samples": sampling.num_samples, "batch_size": sampling.batch_size, "seed": sampling.seed,
                     "sampler": asdict(sampling.sampler), "cond_kind": den.cond_kind},
    }
    if ts_summary is None:
        notes.append("timestep error skipped: " + ("no run (FP evaluation)" if not cfg.run
                                                   else "timestep_error.enabled is false"))
    if den.decoder is None and den.image_shape[0] not in (1, 3):
        notes.append(f"the samples are {den.image_shape[0]}-channel latents (no vae/ or vqvae/ in the model folder): "
                     "the grid shows their first channels; add the autoencoder to see images")
    metrics_cb.notes_extra = notes
    module = SamplingModule(model, den, sampling, out_dir)
    trainer.predict(module, dataloaders=module.dataloader(), return_predictions=False)
    return metrics_cb.written
