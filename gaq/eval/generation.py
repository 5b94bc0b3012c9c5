"""Sampling for evaluation: what to sample (:class:`SamplingConfig`, :class:`Conditioning`), per-sample
seeded starting noise, and the sampling itself (:func:`sample_images`, :func:`generate`, and
:class:`SamplingModule` for ``Trainer.predict``).

Sample ``i``'s starting noise comes from its own generator seeded by ``(seed, i)``: samples do not
depend on the batch size or device count (with ``eta > 0`` the per-step noise is drawn per batch and
does depend on the batching).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from gaq.errors import check
from gaq.models.runner import ModelRunner
from gaq.models.sampling import SamplerConfig, ddim_sample
from gaq.models.conditions import PromptTable
from gaq.models.prompts import text_conditions
from gaq.models.loading import Denoiser


def default_sampler() -> SamplerConfig:
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
    sampler: SamplerConfig = field(default_factory=default_sampler)
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
        kind = "unconditional" if den.cond_kind == "none" else f"{den.cond_kind}-conditional"
        for key in ("prompts", "cond_embeddings"):  # ignored without a word before
            check(den.cond_kind == "text" or getattr(sampling, key) is None,
                  f"{key} is for text-conditional models and this model is {kind}: remove {key}")
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
