"""``gaq train-testbed``: train the CIFAR-shaped testbed (an unconditional DDPM with google/ddpm-cifar10-32's
architecture on 32x32 photo crops) and its feature classifier, and report on them.

The testbed exists because the digits default quantizes almost losslessly: it is a trained network of
the paper's CIFAR-10 shape (``configs/paper/cifar10_ddpm_w4a8.yaml`` runs on it with only
``--data.source`` changed), at base width 64 instead of 128 so that its weights (about 9M parameters,
stored in float16: about 18 MB) fit in the repository. Data: :mod:`gaq.toy.photos`.

One LightningCLI: ``model`` (:class:`~gaq.toy.default_model.DigitsDDPM`, unconditional), ``data``
(:class:`~gaq.toy.photos.PhotoCropsDataModule`) and ``trainer`` configure the DDPM fit;
``classifier`` the source-photograph classifier fit that follows on the same crops (its penultimate
features are the testbed's FID features); ``report`` the FP samples of the report; ``storage_dtype``
the precision the weights are stored in. Writes

- ``<out_dir>/``: the DDPM in diffusers pipeline layout, weights in ``storage_dtype`` (they load as
  float32: the FP reference is the stored weights run in float32), and ``classifier/``;
- ``<bench_dir>/report.json``: command, device, times, parameters, the classifier's held-out accuracy,
  FID of FP samples against the held-out crops next to the noise floor (as many training crops
  against the same held-out crops), the classes the classifier reads in the FP samples;
- ``<bench_dir>/samples_grid.png`` (FP samples), ``<bench_dir>/data_grid.png`` (training crops, one
  column per photograph) and ``<bench_dir>/train_config.yaml``.

The report is measured on the model as saved (reloaded from ``<out_dir>``). The output folder is
printed on the last line.
"""
from __future__ import annotations

import json
import math
import shlex
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import diffusers
import lightning.pytorch as pl
import torch

from gaq.errors import check
from gaq.eval.generation import SamplingConfig, generate
from gaq.eval.features import CLASSIFIER_SUBFOLDER, class_accuracy, fid_with_features, load_digit_features
from gaq.eval.grid import save_grid
from gaq.models.sampling import SamplerConfig
from gaq.toy.classifier import save_classifier
from gaq.toy.default_model import DigitsDDPM
from gaq.models.loading import load_denoiser, save_denoiser
from gaq.toy.photos import NUM_PHOTO_CLASSES, PHOTO_NAMES, PhotoCropsDataModule
from gaq.train.default import (CONFIG_FILE, GRID_FILE, REPORT_FILE, TrainDefaultCLI, _param_count,
                                     check_image_sizes, fit_classifier)
from gaq.provenance import device_name

DATA_GRID_FILE = "data_grid.png"
StorageDtype = Literal["float32", "float16", "bfloat16"]


def _default_sampler() -> SamplerConfig:
    # the paper's CIFAR-10 sampler: DDIM 100 quadratic, eta 0, x0 not clipped
    return SamplerConfig(steps=100, spacing="quadratic", guidance_scale=1.0, clip_sample=False)


@dataclass
class TestbedReport:
    """The FP samples of the report.

    Attributes:
        num_samples: samples in all (unconditional).
        batch_size: samples per DDIM run.
        sampler: DDIM settings.
        seed: noise seed (sample ``i`` from ``(seed, i)``, as ``gaq evaluate`` draws it).
        grid_rows: the PNG grids are ``grid_rows`` x 10 images.
        grid_scale: pixel enlargement of the PNG grids.
    """

    num_samples: int = 2000
    batch_size: int = 500
    sampler: SamplerConfig = field(default_factory=_default_sampler)
    seed: int = 1234
    grid_rows: int = 10
    grid_scale: int = 3


class TrainTestbedCLI(TrainDefaultCLI):
    """LightningCLI of ``gaq train-testbed``: train-default's keys (with its own report and folders) and ``storage_dtype``."""

    report_class = TestbedReport
    out_dir = "checkpoints/testbed"
    bench_dir = "bench/testbed"

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--storage_dtype", type=StorageDtype, default="float16", help="dtype of the stored weights")


def _check_config(cfg) -> None:
    check_image_sizes(cfg)
    unet, clf = cfg.model.unet, cfg.classifier.model
    check(unet.in_channels == 3 and clf.in_channels == 3,
          "the photo crops are RGB: set model.unet.in_channels and classifier.model.in_channels to 3")
    check(unet.num_classes is None, "the testbed is unconditional (as google/ddpm-cifar10-32): set model.unet.num_classes: null")
    check(clf.num_classes == NUM_PHOTO_CLASSES,
          f"the classifier tells the {NUM_PHOTO_CLASSES} source photographs apart: set classifier.model.num_classes: {NUM_PHOTO_CLASSES}")


def evaluate_testbed(folder: Path, data: PhotoCropsDataModule, cfg: TestbedReport, device: torch.device,
                     bench_dir: Path) -> dict:
    """Sample the saved testbed in ``folder``, write the grids and return the report's measurements."""
    den = load_denoiser(folder)
    features = load_digit_features(folder).to(device)
    data.setup()
    sampling = SamplingConfig(cfg.num_samples, cfg.batch_size, cfg.seed, cfg.sampler)
    start = time.perf_counter()
    samples = torch.cat([images.cpu() for _, _, images in generate(den.model.to(device).eval(), den, sampling, progress=False)])
    sample_seconds = time.perf_counter() - start
    held, train = data.held_out, data.train_split
    n = min(cfg.num_samples, len(train.images))
    acc, per_class = class_accuracy(features.classifier, held.images, held.labels, NUM_PHOTO_CLASSES)
    with torch.no_grad():
        read = torch.cat([features.classifier(s.to(device)).argmax(1).cpu() for s in samples.split(cfg.batch_size)])
    shares = (torch.bincount(read, minlength=NUM_PHOTO_CLASSES).double() / len(read))
    entropy = float(-(shares[shares > 0] * shares[shares > 0].log()).sum() / math.log(NUM_PHOTO_CLASSES))
    cells = cfg.grid_rows * NUM_PHOTO_CLASSES
    save_grid(samples[:cells], bench_dir / GRID_FILE, nrow=NUM_PHOTO_CLASSES, scale=cfg.grid_scale)
    by_photo = torch.stack([train.images[train.labels == c][:cfg.grid_rows] for c in range(NUM_PHOTO_CLASSES)], 1)
    save_grid(by_photo.flatten(0, 1), bench_dir / DATA_GRID_FILE, nrow=NUM_PHOTO_CLASSES, scale=cfg.grid_scale)
    return {
        "fingerprint": den.fingerprint,
        "classifier_held_out": {"accuracy": acc, "per_class_accuracy": per_class, "count": len(held.labels),
                                "classes": list(PHOTO_NAMES)},
        "fp_samples": {"count": cfg.num_samples, "sampler": asdict(cfg.sampler), "noise_seed": cfg.seed,
                       "sampling_seconds": sample_seconds, "grid": GRID_FILE, "data_grid": DATA_GRID_FILE,
                       "classifier_reads": {name: float(s) for name, s in zip(PHOTO_NAMES, shares)},
                       "classifier_reads_entropy": entropy},
        "fid": {
            "features": f"source-photograph classifier, penultimate layer ({features.num_features} dims)",
            "fp_vs_held_out": fid_with_features(held.images, samples, features),
            # noise floor: as many real training crops against the same held-out crops
            "train_vs_held_out": fid_with_features(held.images, train.images[:n], features),
            "held_out_count": len(held.images), "fp_count": cfg.num_samples, "train_count": n,
        },
    }


def main(argv: list[str]) -> None:
    """Entry point of ``gaq train-testbed`` (``argv`` without the subcommand)."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = TrainTestbedCLI(
        DigitsDDPM, PhotoCropsDataModule, run=False, args=argv, seed_everything_default=0, save_config_callback=None,
        parser_kwargs={"prog": "gaq train-testbed",
                       "description": "Train the CIFAR-shaped testbed (DDPM on photo crops + source-photograph classifier)."},
    )
    cfg, init = cli.config, cli.config_init
    _check_config(cfg)
    trainer = cli.trainer
    check(trainer.world_size == 1, "train-testbed trains on one device; set --trainer.devices=1")
    out_dir, bench_dir = Path(cfg.out_dir), Path(cfg.bench_dir)
    seed = int(cfg.seed_everything)

    cli.datamodule.setup()  # draw the crops first: train_seconds then times the training alone
    start = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    ddpm_seconds = time.perf_counter() - start
    clf_data = cli.datamodule.with_batch_size(init.classifier.batch_size)
    classifier, classifier_steps, classifier_seconds = fit_classifier(init.classifier, clf_data, trainer, seed)

    den = cli.model.denoiser()
    # nn.Module.to, not ModelMixin.to: diffusers warns on a dtype cast there (it wants torch_dtype at load time)
    torch.nn.Module.to(den.model, "cpu", getattr(torch, cfg.storage_dtype))
    save_denoiser(den, out_dir, cli.model.schedule.scheduler())
    save_classifier(classifier, out_dir / CLASSIFIER_SUBFOLDER)

    bench_dir.mkdir(parents=True, exist_ok=True)
    cli.parser.save(cfg, bench_dir / CONFIG_FILE, skip_none=False, overwrite=True, multifile=False)
    device = trainer.strategy.root_device
    metrics = evaluate_testbed(out_dir, cli.datamodule, init.report, device, bench_dir)
    report = {
        "command": shlex.join(["gaq", "train-testbed", *argv]),
        "device": device_name(device),
        "versions": {"torch": torch.__version__, "lightning": pl.__version__, "diffusers": diffusers.__version__},
        "seed": seed,
        "out_dir": str(out_dir),
        "storage_dtype": cfg.storage_dtype,
        "fp_reference": f"the {cfg.storage_dtype} weights in {out_dir}, loaded and run in float32",
        "data": {**vars(cli.datamodule.crops), "sides": cli.datamodule.crops.sides(), "photographs": list(PHOTO_NAMES)},
        "ddpm": {"params": _param_count(den.model), "steps": trainer.global_step, "batch_size": cli.datamodule.batch_size,
                 "precision": str(trainer.precision), "train_seconds": ddpm_seconds,
                 "epoch_losses": cli.model.epoch_losses},
        "classifier": {"params": _param_count(classifier), "steps": classifier_steps, "train_seconds": classifier_seconds},
        "train_seconds": ddpm_seconds + classifier_seconds,
        **metrics,
    }
    (bench_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {bench_dir / REPORT_FILE}")
    print(out_dir)
