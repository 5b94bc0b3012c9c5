"""The FP model's samples a quantized run is compared with: drawn once per setting, cached with their identity.

The FP samples use the evaluation's own :class:`~gaq.eval.generation.SamplingConfig` (the identical
sampler, speed options included, the same batches) and are drawn under the same numerics context
as the quantized samples (the Trainer's precision plugin), so sample ``i`` of both models starts
from the same noise, condition and sampler. The cache file
``<cache_dir>/fp-samples-<model fingerprint>-<key>.safetensors`` holds ``images`` ``(N, C, H, W)``
float32 in [-1, 1] and, in its header, the identity the key hashes: the FP model's fingerprint (and
its latent decoder's), the noise schedule, the conditioning (kind, classes, prompt-embeddings file
hash), the sampler settings (speed options change the numerics: precision, channels-last, CUDA
graphs, compile), seed, batch size, sample count, and the runtime (device, Trainer precision, torch
version). A file is used only when its stored identity equals the one asked for.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor

import gaq
from gaq.data.calibset import file_sha256
from gaq.errors import check
from gaq.eval.generation import SamplingConfig, generate
from gaq.eval.reference import same_json
from gaq.eval.metrics import load_tensors, save_tensors, stats_digest
from gaq.models.loading import Denoiser, model_fingerprint
from gaq.models.prompts import text_encoder_digest
from gaq.provenance import device_name

FP_SAMPLES_FORMAT = 1  # bump when the sampling code changes what the FP samples are


def fp_samples_identity(den: Denoiser, sampling: SamplingConfig, count: int, device: torch.device,
                        precision: str = "32-true") -> dict:
    """What the first ``count`` FP samples of ``sampling`` depend on (the cache key's content).

    Args:
        den: the FP model.
        sampling: the evaluation's sampling settings.
        count: samples ``0..count-1``.
        device: where they are drawn.
        precision: the Trainer precision they are drawn under (``trainer.precision``).
    """
    decoder = None
    if den.decoder is not None:
        decoder = {"fingerprint": model_fingerprint(den.decoder), "scaling_factor": den.decoder.scaling_factor}
    emb = sampling.cond_embeddings
    conditioning = {"kind": den.cond_kind, "num_classes": den.num_classes, "null_label": den.null_label,
                    "cond_embeddings_sha256": file_sha256(emb) if den.cond_kind == "text" and emb else None}
    if den.cond_kind == "text" and sampling.prompts:  # a prompt list: its content and the text encoder's files
        conditioning.update(prompts_sha256=file_sha256(sampling.prompts), text_encoder_sha256=text_encoder_digest(den.source))
    return {
        "format": FP_SAMPLES_FORMAT,
        "model": den.fingerprint,
        "decoder": decoder,
        "schedule": stats_digest({"alphas_cumprod": den.alphas_cumprod.double().tolist()}),
        "sample_shape": list(den.sample_shape),
        "conditioning": conditioning,
        "sampler": asdict(sampling.sampler),
        "seed": sampling.seed,
        "batch_size": sampling.batch_size,
        "count": count,
        "runtime": {"device": device_name(device), "trainer_precision": str(precision), "torch": torch.__version__},
    }


def fp_samples(den: Denoiser, sampling: SamplingConfig, count: int, cache_dir: str | None, device: torch.device,
               precision: str = "32-true", context: contextlib.AbstractContextManager | None = None,
               progress: bool = True) -> tuple[Tensor, dict]:
    """The FP model's samples ``0..count-1`` of ``sampling``, from the cache when its identity matches.

    Args:
        den: the FP model (moved to ``device`` to sample).
        sampling: the evaluation's sampling settings (only its first ``count`` samples are drawn).
        count: how many, at most ``sampling.num_samples``.
        cache_dir: folder of the cache (None: no cache).
        device: where to sample.
        precision: the Trainer precision (recorded in the identity).
        context: the numerics context to sample in (the Trainer's ``precision_plugin.predict_step_context()``).
        progress: show a progress bar.

    Returns:
        ``(images (count, C, H, W) float32 in [-1, 1] on the CPU, info)``; ``info`` holds ``count``,
        ``cache`` (``hit`` / ``miss`` / ``off``), ``file``, ``seconds`` and the ``identity``.
    """
    check(1 <= count <= sampling.num_samples, f"fidelity.num_samples must be in [1, {sampling.num_samples}], got {count}")
    ident = fp_samples_identity(den, sampling, count, device, precision)
    path = Path(cache_dir) / f"fp-samples-{den.fingerprint}-{stats_digest(ident)}.safetensors" if cache_dir else None
    t0 = time.perf_counter()
    if path is not None:
        cached = load_tensors(path)
        if cached is not None and same_json(cached[1].get("identity"), ident) and "images" in cached[0]:
            images = cached[0]["images"]
            if images.shape[0] == count:
                return images, {"count": count, "cache": "hit", "file": str(path), "seconds": time.perf_counter() - t0,
                                "identity": ident}
    subset = replace(sampling, num_samples=count)  # round-robin conditions: the first `count` are the same
    model = den.model.to(device).eval()
    with context or contextlib.nullcontext():
        images = torch.cat([x.float().cpu() for _, _, x in generate(model, den, subset, progress=progress)])
    if path is not None:
        save_tensors(path, {"images": images}, {"identity": ident, "gaq_version": gaq.__version__})
    return images, {"count": count, "cache": "off" if path is None else "miss",
                    "file": None if path is None else str(path), "seconds": time.perf_counter() - t0, "identity": ident}
