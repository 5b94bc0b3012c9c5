"""The CIFAR-shaped testbed: photo-crop data, its architecture (google/ddpm-cifar10-32's at base 64), and
``gaq train-testbed`` end to end on a tiny width."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

import gaq.cli
from gaq.calib.units import find_units
from gaq.toy.default_model import DigitsUNetConfig, build_digits_unet
from gaq.models.denoiser import predict_noise
from gaq.models.loading import load_denoiser
from gaq.toy.photos import NUM_PHOTO_CLASSES, PhotoCrops, PhotoCropsDataModule, load_photos, make_crops, photo_pyramid
from gaq.quant import QuantConfig
from gaq.quant.config import resolve_config
from gaq.quant.wrap import build_quantized, plan_quantization

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from paper_archs import CIFAR10_DDPM  # noqa: E402

QUICK = str(REPO / "configs" / "testbed" / "train_quick.yaml")
SMALL = PhotoCrops(image_size=16, min_side=20, max_side=64, num_scales=3, num_train=60, num_held_out=20)


def test_the_ten_photographs_ship_offline_as_rgb():
    photos = load_photos()
    assert len(photos) == NUM_PHOTO_CLASSES == 10
    for p in photos:
        assert p.ndim == 3 and p.shape[0] == 3 and min(p.shape[1:]) >= 256
        assert p.min() >= -1 and p.max() <= 1 and p.std() > 0.1  # real photographs, not blank images
    # ten different photographs
    means = torch.stack([p.mean((1, 2)) for p in photos])
    assert torch.cdist(means, means).fill_diagonal_(1).min() > 1e-3


def test_crops_are_seeded_balanced_slices_of_the_resized_photographs():
    x, y = make_crops(SMALL, 60, seed=3)
    x2, y2 = make_crops(SMALL, 60, seed=3)
    x3, _ = make_crops(SMALL, 60, seed=4)
    assert x.shape == (60, 3, 16, 16) and torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert torch.equal(torch.bincount(y), torch.full((10,), 6)) and x.min() >= -1 and x.max() <= 1
    # every crop is an exact 16x16 window (possibly mirrored) of its own photograph at one of the scales
    pyramid = photo_pyramid(SMALL)
    for i in (0, 7, 33):
        found = False
        for level in pyramid[int(y[i])]:
            win = level.unfold(1, 16, 1).unfold(2, 16, 1)  # (3, H', W', 16, 16)
            for crop in (x[i], x[i].flip(-1)):
                d = (win - crop[:, None, None]).abs().amax(dim=(0, 3, 4))
                found |= bool((d == 0).any())
        assert found, f"crop {i} is not a window of photograph {int(y[i])}"
    assert SMALL.sides() == [20, 36, 64]


def test_datamodule_splits_and_batches():
    dm = PhotoCropsDataModule(**vars(SMALL), batch_size=8, samples_per_epoch=24, hflip=1.0)
    dm.setup()
    assert len(dm.train_split.labels) == 60 and len(dm.held_out.labels) == 20
    assert not torch.equal(dm.train_split.images[:20], dm.held_out.images)  # drawn with another seed
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and y.shape == (8,)
    # hflip 1: every image of the batch is a mirrored training crop
    flat = dm.train_split.images.flip(-1).flatten(1)
    assert all(bool((flat == xi.flatten()).all(1).any()) for xi in x)
    other = dm.with_batch_size(4)
    assert other.batch_size == 4 and other.train_split is dm.train_split
    with pytest.raises(Exception, match="hflip"):
        PhotoCropsDataModule(hflip=2.0)


def test_testbed_config_is_the_cifar10_ddpm_architecture_at_base_64():
    cfg = yaml.safe_load((REPO / "configs" / "testbed" / "train.yaml").read_text())
    model = build_digits_unet(DigitsUNetConfig(**cfg["model"]["unet"]))
    built = {k: v for k, v in model.config.items() if not k.startswith("_")}
    from diffusers import UNet2DModel

    reference = UNet2DModel(**{**CIFAR10_DDPM, "block_out_channels": (64, 128, 128, 128)})
    want = {k: v for k, v in reference.config.items() if not k.startswith("_")}
    assert built == want
    assert sum(p.numel() for p in model.parameters()) == 8_952_067  # about 18 MB in float16
    # the paper protocol's reconstruction units are those of google/ddpm-cifar10-32: 32 under tfmq_compat
    settings = resolve_config(QuantConfig(preset="tfmq_compat"))
    qmodel = build_quantized(model.eval(), settings, plan_quantization(model, settings), torch.arange(10))
    x = torch.zeros(1, 3, 32, 32)
    units = find_units(qmodel, lambda: predict_noise(qmodel, x, torch.zeros(1, dtype=torch.long), {}))
    assert dict(Counter(u.kind for u in units)) == {"time": 1, "resnet": 22, "attention": 6, "sampler": 3}


@pytest.fixture(scope="module")
def quick_testbed(tmp_path_factory):
    """A tiny testbed trained by ``gaq train-testbed`` (configs/testbed/train_quick.yaml): (model folder, bench folder, stdout)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("testbed")
    out, bench = root / "ckpt", root / "bench"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        gaq.cli.main(["train-testbed", "--config", QUICK, "--out_dir", str(out), "--bench_dir", str(bench)])
    return out, bench, stdout.getvalue()


def test_train_testbed_quick_end_to_end(quick_testbed):
    out, bench, stdout = quick_testbed
    assert stdout.strip().splitlines()[-1] == str(out)

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # stored in float16
    den = load_denoiser(out)
    assert (den.cond_kind, den.num_classes, den.sample_shape) == ("none", None, (3, 16, 16))
    assert next(den.model.parameters()).dtype == torch.float32  # ... and run in float32

    report = json.loads((bench / "report.json").read_text())
    assert report["storage_dtype"] == "float16" and report["fingerprint"] == den.fingerprint
    assert report["ddpm"]["steps"] == 6 and len(report["data"]["photographs"]) == 10
    assert report["fid"]["fp_vs_held_out"] > 0 and report["fid"]["train_vs_held_out"] > 0
    assert report["fid"]["held_out_count"] == 40 and report["fid"]["train_count"] == 20
    reads = report["fp_samples"]["classifier_reads"]
    assert len(reads) == 10 and sum(reads.values()) == pytest.approx(1.0)
    assert 0.0 <= report["classifier_held_out"]["accuracy"] <= 1.0
    with Image.open(bench / "samples_grid.png") as grid, Image.open(bench / "data_grid.png") as data:
        assert grid.size == data.size == ((10 * 17 + 1) * 2, (2 * 17 + 1) * 2)  # 2 rows of 10, scale 2
    assert (bench / "train_config.yaml").is_file()


def test_train_testbed_refuses_a_class_conditional_unet(capsys):
    with pytest.raises(SystemExit) as info:
        gaq.cli.main(["train-testbed", "--config", QUICK, "--model.unet.num_classes", "10"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unconditional" in err and len(err.strip().splitlines()) == 1


def test_testbed_calibrate_and_evaluate_configs_run_on_a_trained_testbed(quick_testbed, tmp_path):
    """configs/testbed/{calibrate,evaluate}.yaml on the tiny trained testbed (only sizes overridden): the run
    quantizes, and the evaluation measures FID against the held-out photo crops and fidelity to FP."""
    out, _, _ = quick_testbed
    run = tmp_path / "run"
    gaq.cli.main(["calibrate", "--config", str(REPO / "configs/testbed/calibrate.yaml"), "--method", "gac",
                  "--data.source", str(out), "--data.cache_dir", str(tmp_path / "calib"), "--data.calib.steps", "10",
                  "--data.calib.interval", "2", "--data.calib.samples_per_step", "8", "--data.calib.batch_size", "8",
                  "--data.split.val_fraction", "0.25", "--model.recon.iters", "2", "--model.recon.batch_size", "4",
                  "--gac.meta_iters", "1", "--gac.meta_batch", "4", "--diagnostics.enabled", "false",
                  "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--run_dir", str(run)])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "gac"
    crops = ["--reference.photo_crops.image_size", "16", "--reference.photo_crops.min_side", "20",
             "--reference.photo_crops.max_side", "64", "--reference.photo_crops.num_held_out", "40"]
    gaq.cli.main(["evaluate", "--config", str(REPO / "configs/testbed/evaluate.yaml"), "--source", str(out),
                  "--features", str(out / "classifier"), "--run", str(run), "--num_samples", "20", "--batch_size", "20",
                  "--sampler.steps", "4", "--timestep_error.num_samples", "4", "--timestep_error.batch_size", "4",
                  "--reference.cache_dir", str(tmp_path / "cache"), *crops, "--trainer.accelerator", "cpu",
                  "--trainer.enable_progress_bar", "false"])
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["reference"]["classifier"]["identity"]["kind"] == "photo_crops"
    assert metrics["reference"]["classifier"]["count"] == 40
    values = metrics["metrics"]
    assert values["fid"] > 0 and values["accuracy"] is None  # unconditional: no requested classes
    assert values["fid_to_fp"] >= 0 and 0 < values["ssim"] <= 1 and values["sample_mse"] >= 0


def test_shipped_testbed_is_the_reported_model_and_samples_photographs():
    """checkpoints/testbed (committed, trained on one H200) loads offline in float32 from its float16
    storage, is the model bench/testbed/report.json describes, and its FP samples are natural-image
    crops that its classifier reads as several different photographs; the classifier tells held-out
    crops apart."""
    from gaq.eval.generation import SamplingConfig, generate
    from gaq.eval.features import class_accuracy, load_digit_features
    from gaq.models.sampling import SamplerConfig

    folder = REPO / "checkpoints" / "testbed"
    report = json.loads((REPO / "bench" / "testbed" / "report.json").read_text())
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    den = load_denoiser(folder)
    assert (den.cond_kind, den.sample_shape) == ("none", (3, 32, 32))
    assert next(den.model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in den.model.parameters()) == report["ddpm"]["params"] == 8_952_067
    assert den.fingerprint == report["fingerprint"]
    features = load_digit_features(folder)
    held_x, held_y = make_crops(PhotoCrops(**{k: report["data"][k] for k in (
        "image_size", "min_side", "max_side", "num_scales")}), 100, seed=report["data"]["held_out_seed"])
    accuracy, _ = class_accuracy(features.classifier, held_x, held_y, NUM_PHOTO_CLASSES)
    assert accuracy >= 0.95
    sampling = SamplingConfig(16, 16, 0, SamplerConfig(steps=10, spacing="quadratic", clip_sample=False))
    samples = torch.cat([images for _, _, images in generate(den.model.eval(), den, sampling, progress=False)])
    assert samples.shape == (16, 3, 32, 32) and torch.isfinite(samples).all()
    assert samples.std() > 0.2  # images, not a flat field
    read = features.classifier(samples).argmax(1)
    assert len(set(read.tolist())) >= 4
