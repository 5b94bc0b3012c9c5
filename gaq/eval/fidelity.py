"""Fidelity to the FP model: how far a quantized model's samples are from the FP model's own samples.

A quantized run and its FP model sampled with one :class:`~gaq.eval.generation.SamplingConfig` start
sample ``i`` from the same noise (seeded by ``(seed, i)``), under the same condition and sampler, so
the FP sample ``i`` is the quantized sample ``i``'s target and their difference is what quantization
changed. Metrics against real data (FID & co.) cannot see this once they saturate.

Per sample (images in [-1, 1], data range 2): the MSE over pixels, PSNR (torchmetrics; capped at
``psnr_cap_db``, since identical images have an infinite PSNR, with the count of capped samples
reported) and SSIM (torchmetrics, Gaussian 11x11 window). Each is summarised as its mean over the
samples with a 95% t-interval (:func:`gaq.eval.intervals.mean_ci`). On the feature network of the
other metrics, the Fréchet distance between the quantized and the FP samples (``fid_to_fp``, and
``sfid_to_fp`` on the spatial features).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from gaq.errors import check
from gaq.eval.intervals import mean_ci
from gaq.eval.metrics import FeatureStats, frechet_distance

DATA_RANGE = 2.0  # images in [-1, 1]


@dataclass
class FidelityConfig:
    """The fidelity of a quantized run's samples to the FP model's samples (only for ``gaq evaluate --run``).

    Attributes:
        enabled: measure it (the FP model then also samples, once per setting: the FP samples are
            cached in ``reference.cache_dir``).
        num_samples: compare the first this many evaluation samples (at most ``num_samples``);
            None: all of them.
        psnr_cap_db: a sample's PSNR is capped here (identical images: infinite PSNR);
            ``psnr_capped`` in metrics.json counts the samples at the cap.
    """

    enabled: bool = True
    num_samples: int | None = None
    psnr_cap_db: float = 100.0

    def __post_init__(self):
        check(self.num_samples is None or self.num_samples >= 2,
              f"fidelity.num_samples must be >= 2 (FID to FP needs two samples) or null, got {self.num_samples}")
        check(self.psnr_cap_db > 0, f"fidelity.psnr_cap_db must be > 0, got {self.psnr_cap_db}")

    def count(self, num_samples: int) -> int:
        """How many of ``num_samples`` evaluation samples are compared."""
        return num_samples if self.num_samples is None else min(self.num_samples, num_samples)


@torch.no_grad()
def per_sample_fidelity(images: Tensor, reference: Tensor, psnr_cap_db: float = 100.0) -> dict[str, Tensor]:
    """Per-sample distances of ``images`` to ``reference``, both ``(B, C, H, W)`` in [-1, 1].

    Returns:
        ``mse`` (mean squared pixel difference), ``psnr`` (dB, data range 2, at most ``psnr_cap_db``),
        ``capped`` (bool: the PSNR hit the cap), ``ssim``; each ``(B,)`` float64 on the CPU.
    """
    check(images.shape == reference.shape and images.ndim == 4,
          f"fidelity needs two (B, C, H, W) image batches of one shape, got {tuple(images.shape)} and {tuple(reference.shape)}")
    x, r = images.detach().double(), reference.detach().to(images.device, torch.float64)
    mse = (x - r).pow(2).flatten(1).mean(1)
    psnr = peak_signal_noise_ratio(x, r, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))
    capped = psnr >= psnr_cap_db  # identical images: +inf
    ssim = structural_similarity_index_measure(x, r, data_range=DATA_RANGE, reduction="none")
    return {"mse": mse.cpu(), "psnr": psnr.clamp(max=psnr_cap_db).cpu(), "capped": capped.cpu(), "ssim": ssim.cpu()}


def summarize_fidelity(per_sample: dict[str, Tensor]) -> dict[str, float | int | None]:
    """metrics.json entries of per-sample fidelity (as :func:`per_sample_fidelity` returns, all samples):
    ``psnr`` / ``ssim`` / ``sample_mse`` (means over samples), their 95% half-widths ``*_ci95``,
    ``psnr_capped`` (samples at the PSNR cap) and ``fidelity_samples``."""
    out: dict[str, float | int | None] = {}
    for key, name in (("psnr", "psnr"), ("ssim", "ssim"), ("mse", "sample_mse")):
        out[name], out[f"{name}_ci95"] = mean_ci(per_sample[key].tolist())
    out["psnr_capped"] = int(per_sample["capped"].sum())
    out["fidelity_samples"] = int(len(per_sample["mse"]))
    return out


def distances_to_fp(extractor_name: str, fp: FeatureStats, fake: FeatureStats) -> dict[str, float | None]:
    """Fréchet distances of generated features to the FP samples' features of one extractor.

    Keys as in :func:`gaq.eval.metrics.compute_metrics`: ``fid_to_fp`` and ``sfid_to_fp`` for the
    classifier (``sfid_to_fp`` None without spatial features), ``fid_to_fp_<name>`` for another one.
    """
    if extractor_name != "classifier":
        return {f"fid_to_fp_{extractor_name}": frechet_distance(fp.features, fake.features)}
    spatial = fp.spatial is not None and fake.spatial is not None
    return {"fid_to_fp": frechet_distance(fp.features, fake.features),
            "sfid_to_fp": frechet_distance(fp.spatial, fake.spatial) if spatial else None}


@dataclass
class FidelityMeter:
    """Accumulates :func:`per_sample_fidelity` of generated batches against the FP samples of the same indices.

    Attributes:
        fp_images: the FP model's samples ``0..N-1``, ``(N, C, H, W)`` in [-1, 1] (CPU).
        psnr_cap_db: the PSNR cap.
        info: where the FP samples came from (cache hit / miss, file), for metrics.json.
    """

    fp_images: Tensor
    psnr_cap_db: float = 100.0
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.fp_images)
        self._per_sample = {k: torch.zeros(n, dtype=torch.float64) for k in ("mse", "psnr", "ssim")}
        self._per_sample["capped"] = torch.zeros(n, dtype=torch.bool)
        self._seen = torch.zeros(n, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.fp_images)

    def update(self, index: Tensor, images: Tensor) -> None:
        """Compare generated samples ``index`` ``(B,)`` (``images`` ``(B, C, H, W)``) with their FP samples;
        samples past the FP set are ignored."""
        index = index.cpu().long()
        keep = (index < len(self.fp_images)).nonzero().flatten()
        if len(keep) == 0:
            return
        idx = index[keep]
        part = per_sample_fidelity(images[keep.to(images.device)], self.fp_images[idx], self.psnr_cap_db)
        for key, values in part.items():
            self._per_sample[key][idx] = values
        self._seen[idx] = True

    def compute(self) -> dict[str, float | int | None]:
        """:func:`summarize_fidelity` over every FP sample; raises unless each one was compared."""
        seen = int(self._seen.sum())
        check(seen == len(self.fp_images),
              f"fidelity: {seen} of the {len(self.fp_images)} FP samples have a generated counterpart")
        return summarize_fidelity(self._per_sample)
