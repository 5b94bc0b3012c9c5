"""``gaq train-default``: train the shipped default model (digits DDPM + digit classifier) and report on it.

One LightningCLI: the ``model`` (:class:`~gaq.toy.default_model.DigitsDDPM`), ``data``
(:class:`~gaq.toy.digits.DigitsDataModule`) and ``trainer`` keys configure the DDPM fit;
``classifier`` (:class:`~gaq.toy.classifier.ClassifierTraining`) the classifier fit that follows,
on the same accelerator and device; ``report`` the FP samples drawn for the report. Writes

- ``<out_dir>/``: the DDPM in diffusers pipeline layout (:func:`~gaq.models.loading.save_denoiser`)
  and ``classifier/model.safetensors`` + ``classifier/config.json``;
- ``<bench_dir>/report.json``: command, device, training times, classifier accuracy on held-out
  digits, FID (classifier features) of FP samples vs the real digits and between two halves of the
  real digits (the noise floor), per-class accuracy on FP samples, sampler settings and seeds;
- ``<bench_dir>/samples_grid.png`` (one row per class) and ``<bench_dir>/train_config.yaml``.

The output folder is printed on the last line.
"""
from __future__ import annotations

import json
import shlex
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import diffusers
import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn

from gaq.errors import check
from gaq.eval.features import CLASSIFIER_SUBFOLDER, DigitFeatures, class_accuracy, fid_with_features
from gaq.eval.grid import save_grid
from gaq.models.sampling import SamplerConfig, ddim_sample
from gaq.toy.classifier import ClassifierModule, ClassifierTraining, DigitClassifier, save_classifier
from gaq.toy.default_model import DigitsDDPM
from gaq.toy.digits import DigitsDataModule
from gaq.models.loading import Denoiser, save_denoiser
from gaq.provenance import device_name

REPORT_FILE = "report.json"
GRID_FILE = "samples_grid.png"
CONFIG_FILE = "train_config.yaml"


def _default_sampler() -> SamplerConfig:
    return SamplerConfig(steps=50, guidance_scale=2.0)


@dataclass
class SampleReport:
    """The FP samples of the report.

    Attributes:
        num_samples: samples in all; class-balanced (sample ``i`` asks for class ``i % num_classes``).
        batch_size: samples per DDIM run (guidance doubles the model batch).
        sampler: DDIM settings.
        seed: seed of the starting noise (drawn on the CPU, so the same on every device).
        grid_per_class: samples per class row in the PNG grid.
        grid_scale: pixel enlargement of the PNG grid.
        fid_split_seed: seed of the random halves of the real digits (FID noise floor).
    """

    num_samples: int = 1000
    batch_size: int = 1000
    sampler: SamplerConfig = field(default_factory=_default_sampler)
    seed: int = 1234
    grid_per_class: int = 10
    grid_scale: int = 4
    fid_split_seed: int = 0


class TrainDefaultCLI(LightningCLI):
    """LightningCLI of ``gaq train-default``: adds ``classifier``, ``report`` (a :attr:`report_class`),
    ``out_dir`` and ``bench_dir`` (defaults :attr:`out_dir` / :attr:`bench_dir`)."""

    report_class: type = SampleReport
    out_dir: str = "checkpoints/default"
    bench_dir: str = "bench/default_model"

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(ClassifierTraining, "classifier")
        parser.add_class_arguments(self.report_class, "report")
        parser.add_argument("--out_dir", type=str, default=self.out_dir, help="model output folder")
        parser.add_argument("--bench_dir", type=str, default=self.bench_dir, help="report output folder")


@torch.no_grad()
def sample_classes(
    den: Denoiser, labels: Tensor, sampler: SamplerConfig, seed: int, batch_size: int, device: torch.device
) -> Tensor:
    """Class-conditional DDIM samples of a ``class`` Denoiser.

    Args:
        den: the model (moved to ``device``).
        labels: ``(N,)`` requested classes.
        sampler: DDIM settings; guidance needs ``den.null_label``.
        seed: seed of the CPU generator drawing all ``N`` starting noises at once.
        batch_size: samples per DDIM run.
        device: where the model runs.

    Returns:
        ``(N, C, H, W)`` float32 CPU samples (clamped to [-1, 1]).
    """
    check(den.cond_kind == "class", "sample_classes needs a class-conditional model")
    guided = sampler.guidance_scale != 1.0
    check(not guided or den.null_label is not None, "guidance_scale != 1 needs a model with a null label")
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), *den.sample_shape), generator=gen)
    model = den.model.to(device).eval()
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start : start + batch_size].to(device)
        null = {"class_labels": torch.full_like(y, den.null_label)} if guided else None
        x = ddim_sample(model, den.alphas_cumprod, noise[start : start + batch_size].to(device), sampler,
                        {"class_labels": y}, null, generator=gen)
        out.append(x.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def fit_classifier(
    cfg: ClassifierTraining, clf_data: pl.LightningDataModule, like: pl.Trainer, seed: int
) -> tuple[DigitClassifier, int, float]:
    """Train the feature classifier on ``clf_data`` (the DDPM's training images and labels at the
    classifier's batch size), on the accelerator and device of ``like``.

    Returns:
        ``(classifier in eval mode on the CPU, optimizer steps, training seconds)``.
    """
    pl.seed_everything(seed, verbose=False)
    module = ClassifierModule(cfg)
    root = like.strategy.root_device
    trainer = pl.Trainer(
        accelerator=like.accelerator,
        devices=1 if root.type == "cpu" else like.device_ids,
        max_steps=cfg.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=like.progress_bar_callback is not None,
        default_root_dir=like.default_root_dir,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=clf_data)
    seconds = time.perf_counter() - start
    return module.classifier.cpu().eval().requires_grad_(False), trainer.global_step, seconds




def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _class_rows(labels: Tensor, num_classes: int, per_class: int) -> Tensor:
    """Indices of the first ``per_class`` samples of each class, class by class (one grid row each)."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(num_classes)])


def evaluate_fp(
    den: Denoiser, classifier: DigitClassifier, data: DigitsDataModule, cfg: SampleReport, device: torch.device, bench_dir: Path
) -> dict:
    """Sample the FP model, write the grid and return the report's metrics (see the module docstring)."""
    k = den.num_classes
    labels = torch.arange(cfg.num_samples) % k
    start = time.perf_counter()
    samples = sample_classes(den, labels, cfg.sampler, cfg.seed, cfg.batch_size, device)
    sample_seconds = time.perf_counter() - start

    classifier = classifier.to(device)
    features = DigitFeatures(classifier)
    data.setup()
    real = torch.cat([data.train_split.images, data.held_out.images])
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(cfg.fid_split_seed))
    half = len(real) // 2
    half_b = real[perm[half : 2 * half]]
    acc_real, per_real = class_accuracy(classifier, data.held_out.images, data.held_out.labels, k)
    acc_fp, per_fp = class_accuracy(classifier, samples, labels, k)
    per_row = min(cfg.grid_per_class, cfg.num_samples // k)
    if per_row > 0:
        save_grid(samples[_class_rows(labels, k, per_row)], bench_dir / GRID_FILE, nrow=per_row, scale=cfg.grid_scale)
    return {
        "classifier_held_out": {"accuracy": acc_real, "per_class_accuracy": per_real, "count": len(data.held_out.labels)},
        "fp_samples": {
            "count": cfg.num_samples,
            "sampler": asdict(cfg.sampler),
            "noise_seed": cfg.seed,
            "sampling_seconds": sample_seconds,
            "accuracy": acc_fp,
            "per_class_accuracy": per_fp,
            "grid": GRID_FILE if per_row > 0 else None,
        },
        "fid": {
            "features": f"digit classifier penultimate layer ({features.num_features} dims)",
            "fp_vs_real": fid_with_features(real, samples, features),
            "real_count": len(real),
            "fp_count": cfg.num_samples,
            # noise floor: half A vs half B of the real digits; the FP samples against the same half B
            # with as many samples (comparable to the floor; None when fewer samples than a half)
            "real_half_vs_half": fid_with_features(real[perm[:half]], half_b, features),
            "fp_vs_real_half": fid_with_features(half_b, samples[:half], features) if cfg.num_samples >= half else None,
            "half_count": half,
            "half_split_seed": cfg.fid_split_seed,
        },
    }


def check_image_sizes(cfg) -> None:
    """Raise unless the parsed config's UNet, data and classifier share one image size."""
    check(
        cfg.model.unet.sample_size == cfg.data.image_size == cfg.classifier.model.image_size,
        f"model.unet.sample_size ({cfg.model.unet.sample_size}), data.image_size ({cfg.data.image_size}) and "
        f"classifier.model.image_size ({cfg.classifier.model.image_size}) must be equal",
    )


def main(argv: list[str]) -> None:
    """Entry point of ``gaq train-default`` (``argv`` without the subcommand)."""
    # gaq.cli hands over argv on purpose; LightningCLI would warn that sys.argv holds arguments too.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = TrainDefaultCLI(
        DigitsDDPM,
        DigitsDataModule,
        run=False,
        args=argv,
        seed_everything_default=0,
        save_config_callback=None,
        parser_kwargs={"prog": "gaq train-default", "description": "Train the shipped default model (digits DDPM + classifier)."},
    )
    cfg, init = cli.config, cli.config_init  # raw values / instantiated dataclasses
    check_image_sizes(cfg)
    trainer = cli.trainer
    check(trainer.world_size == 1, "train-default trains on one device (the model is small); set --trainer.devices=1")
    out_dir, bench_dir = Path(cfg.out_dir), Path(cfg.bench_dir)
    seed = int(cfg.seed_everything)

    start = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    ddpm_seconds = time.perf_counter() - start
    d = cli.datamodule.data
    clf_data = DigitsDataModule(d.image_size, d.upsample, d.val_fraction, d.split_seed, batch_size=init.classifier.batch_size)
    classifier, classifier_steps, classifier_seconds = fit_classifier(init.classifier, clf_data, trainer, seed)

    den = cli.model.denoiser()
    save_denoiser(den, out_dir, cli.model.schedule.scheduler())
    save_classifier(classifier, out_dir / CLASSIFIER_SUBFOLDER)

    bench_dir.mkdir(parents=True, exist_ok=True)
    cli.parser.save(cfg, bench_dir / CONFIG_FILE, skip_none=False, overwrite=True, multifile=False)
    device = trainer.strategy.root_device
    metrics = evaluate_fp(den, classifier, cli.datamodule, init.report, device, bench_dir)
    report = {
        "command": shlex.join(["gaq", "train-default", *argv]),
        "device": device_name(device),
        "versions": {"torch": torch.__version__, "lightning": pl.__version__, "diffusers": diffusers.__version__},
        "seed": seed,
        "out_dir": str(out_dir),
        "ddpm": {
            "params": _param_count(den.model),
            "steps": trainer.global_step,
            "batch_size": cli.datamodule.batch_size,
            "precision": str(trainer.precision),
            "train_seconds": ddpm_seconds,
            "epoch_losses": cli.model.epoch_losses,
            "fingerprint": den.fingerprint,
        },
        "classifier": {
            "params": _param_count(classifier),
            "steps": classifier_steps,
            "train_seconds": classifier_seconds,
        },
        "train_seconds": ddpm_seconds + classifier_seconds,
        **metrics,
    }
    (bench_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {bench_dir / REPORT_FILE}")
    print(out_dir)
