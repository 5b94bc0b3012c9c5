"""The shipped default model: digits data, classifier features and FID, grids, EMA, and train-default end to end."""
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import gaq.cli
from gaq.eval.features import DigitFeatures, class_accuracy, fid_with_features, load_digit_features
from gaq.eval.grid import save_grid
from gaq.toy.classifier import ClassifierConfig, DigitClassifier, load_classifier, random_shift, save_classifier
from gaq.toy.default_model import EMAWeights, warmup_cosine
from gaq.models.denoiser import predict_noise
from gaq.toy.digits import DigitsDataModule, load_digit_images, split_indices
from gaq.models.loading import load_denoiser

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "configs" / "default" / "train_quick.yaml")


@pytest.fixture(scope="module")
def digits():
    return load_digit_images(16)


def test_digit_images_shape_range_and_labels(digits):
    images, labels = digits
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() == -1.0 and images.max() <= 1.0 and images.max() > 0.9
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    nearest, _ = load_digit_images(16, "nearest")
    # nearest: every 2x2 block is constant; bilinear is smooth, not blocky
    assert torch.equal(nearest[:, :, ::2, ::2], nearest[:, :, 1::2, 1::2])
    assert not torch.equal(images[:, :, ::2, ::2], images[:, :, 1::2, 1::2])
    assert torch.allclose(images.mean(), nearest.mean(), atol=1e-2)


def test_split_is_deterministic_stratified_and_a_partition(digits):
    _, labels = digits
    train, val = split_indices(labels, 0.15, seed=0)
    train2, val2 = split_indices(labels, 0.15, seed=0)
    _, val_other = split_indices(labels, 0.15, seed=1)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert not torch.equal(val, val_other)
    assert len(set(train.tolist()) | set(val.tolist())) == 1797 and not set(train.tolist()) & set(val.tolist())
    assert abs(len(val) - 0.15 * 1797) <= 1
    counts = torch.bincount(labels[val], minlength=10).float()
    assert counts.min() >= 0.8 * counts.mean()  # stratified: every class held out in proportion


def test_datamodule_batches():
    dm = DigitsDataModule(batch_size=32, samples_per_epoch=96)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (32, 1, 16, 16) and y.shape == (32,) and y.dtype == torch.int64
    assert len(dm.train_split.labels) + len(dm.held_out.labels) == 1797


def test_random_shift_moves_content_and_fills_background():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 6, 6) * 2 - 1
    shifted = random_shift(x, 1)
    for img, out in zip(x, shifted):
        matches = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                expect = torch.full_like(img, -1.0)
                src = img[:, max(0, dy): 6 + min(0, dy), max(0, dx): 6 + min(0, dx)]
                expect[:, max(0, -dy): 6 + min(0, -dy), max(0, -dx): 6 + min(0, -dx)] = src
                matches.append(torch.equal(out, expect))
        assert sum(matches) == 1
    assert not torch.equal(shifted, x)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(digits):
    torch.manual_seed(0)
    features = DigitFeatures(DigitClassifier(ClassifierConfig()))
    images = digits[0][:400]
    same = fid_with_features(images, images, features)
    slight = fid_with_features(images, (images + 0.05).clamp(-1, 1), features)
    shifted = fid_with_features(images, (images + 0.5).clamp(-1, 1), features)
    assert abs(same) < 1e-4
    assert 0 < slight < shifted
    with pytest.raises(Exception):
        fid_with_features(images[:1], images, features)


def test_digit_features_frozen_resizing_and_round_trip(tmp_path, digits):
    torch.manual_seed(0)
    clf = DigitClassifier(ClassifierConfig(feature_dim=32))
    save_classifier(clf, tmp_path / "m" / "classifier")
    features = load_digit_features(tmp_path / "m")
    assert features.num_features == 32
    assert not any(p.requires_grad for p in features.parameters())
    features.train()
    assert not features.training
    x = digits[0][:8]
    assert torch.equal(features(x), clf.features(x))
    assert features(torch.nn.functional.interpolate(x, size=32, mode="bilinear")).shape == (8, 32)
    assert torch.equal(load_classifier(tmp_path / "m" / "classifier")(x), clf(x))


class _ByMean(nn.Module):
    """A 'classifier' reading the class off the image mean (image filled with its class id)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return nn.functional.one_hot(x.mean(dim=(1, 2, 3)).round().long(), 4).float()


def test_class_accuracy_overall_and_per_class():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    fill = torch.tensor([0, 1, 1, 1, 0, 2, 2, 2])  # one 0 and one 1 misread
    images = fill.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    overall, per_class = class_accuracy(_ByMean(), images, labels, num_classes=4, batch_size=3)
    assert overall == pytest.approx(6 / 8)
    assert per_class[:3] == pytest.approx([0.5, 2 / 3, 1.0]) and math.isnan(per_class[3])


def test_save_grid_layout(tmp_path):
    images = -torch.ones(6, 1, 16, 16)
    images[1] = 1.0
    path = save_grid(images, tmp_path / "g" / "grid.png", nrow=3, scale=2)
    img = Image.open(path)
    assert img.size == ((3 * 17 + 1) * 2, (2 * 17 + 1) * 2) and img.mode == "L"
    pixels = torch.tensor(list(img.getdata())).view(img.height, img.width)
    assert pixels[0, 0] == 255  # padding
    assert pixels[2 * 2, 2 * 2] == 0  # image 0: -1 -> black
    assert pixels[2 * 2, (1 + 17 + 1) * 2] == 255  # image 1: +1 -> white
    rgb = save_grid(torch.zeros(2, 3, 4, 4), tmp_path / "rgb.png", nrow=2, scale=1)
    assert Image.open(rgb).mode == "RGB"


def test_ema_update_warms_up_then_reaches_its_decay():
    import lightning.pytorch as pl

    module = pl.LightningModule()
    module.w = nn.Parameter(torch.zeros(3))
    ema = EMAWeights(decay=0.5)

    class _Trainer:
        global_step = 0

    trainer = _Trainer()
    ema.on_fit_start(trainer, module)
    values = []
    for step in range(1, 4):
        with torch.no_grad():
            module.w.fill_(float(step))
        trainer.global_step = step
        ema.on_train_batch_end(trainer, module, None, None, step)
        ema.on_train_batch_end(trainer, module, None, None, step)  # same step again: no update
        values.append(ema._ema[0][0].item())
    # decays: min(0.5, 2/11) = 2/11, min(0.5, 3/12) = 1/4, min(0.5, 4/13) = 4/13
    e1 = (1 - 2 / 11) * 1
    e2 = e1 + (1 - 1 / 4) * (2 - e1)
    e3 = e2 + (1 - 4 / 13) * (3 - e2)
    assert values == pytest.approx([e1, e2, e3])
    ema.on_train_end(trainer, module)
    assert torch.allclose(module.w, torch.full((3,), e3))


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert 0.1 < warmup_cosine(55, 10, 100, 0.1) < 1.0


def test_train_default_quick_end_to_end(tmp_path, capsys):
    out, bench = tmp_path / "ckpt", tmp_path / "bench"
    gaq.cli.main(["train-default", "--config", QUICK, "--out_dir", str(out), "--bench_dir", str(bench)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)

    den = load_denoiser(out)
    assert (den.cond_kind, den.num_classes, den.null_label, den.sample_shape) == ("class", 10, 10, (1, 16, 16))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        eps = predict_noise(den.model, x, torch.tensor([10, 900]), {"class_labels": torch.tensor([3, 10])})
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    assert load_digit_features(out).num_features == 32

    report = json.loads((bench / "report.json").read_text())
    for key in ("command", "device", "seed", "train_seconds", "ddpm", "classifier", "classifier_held_out", "fp_samples", "fid"):
        assert key in report
    assert report["command"].startswith("gaq train-default --config")
    assert report["device"] == "cpu" and report["seed"] == 0
    assert report["ddpm"]["steps"] == 16 and report["ddpm"]["fingerprint"] == den.fingerprint
    losses = report["ddpm"]["epoch_losses"]
    assert len(losses) == 2 and losses[-1] < losses[0]  # the loss goes down
    assert report["fp_samples"]["count"] == 20 and report["fp_samples"]["sampler"]["steps"] == 5
    assert len(report["fp_samples"]["per_class_accuracy"]) == 10
    assert 0.0 <= report["classifier_held_out"]["accuracy"] <= 1.0 and report["classifier_held_out"]["count"] == 270
    fid = report["fid"]
    assert fid["fp_vs_real"] > 0 and fid["real_half_vs_half"] > 0 and fid["real_count"] == 1797
    grid = Image.open(bench / report["fp_samples"]["grid"])
    assert grid.size == ((2 * 17 + 1) * 4, (10 * 17 + 1) * 4)  # 2 samples per class row, 10 rows
    assert (bench / "train_config.yaml").is_file()


def test_train_default_print_config_and_size_mismatch(capsys):
    with pytest.raises(SystemExit) as info:
        gaq.cli.main(["train-default", "--config", QUICK, "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "classifier:" in printed and "report:" in printed and "out_dir:" in printed

    with pytest.raises(SystemExit) as info:
        gaq.cli.main(["train-default", "--config", QUICK, "--data.image_size", "12"])
    assert info.value.code == 2
    assert "must be equal" in capsys.readouterr().err


def test_shipped_default_model_draws_the_requested_digits():
    """checkpoints/default (committed) loads offline and its FP samples are read as the asked-for digits."""
    from gaq.models.sampling import SamplerConfig
    from gaq.train.default import sample_classes

    folder = REPO / "checkpoints" / "default"
    den = load_denoiser(folder)
    assert (den.cond_kind, den.num_classes, den.null_label, den.sample_shape) == ("class", 10, 10, (1, 16, 16))
    report = json.loads((REPO / "bench" / "default_model" / "report.json").read_text())
    assert den.fingerprint == report["ddpm"]["fingerprint"]  # the report describes this very model
    labels = torch.arange(30) % 10
    samples = sample_classes(den, labels, SamplerConfig(steps=10, guidance_scale=2.0), seed=0, batch_size=30,
                             device=torch.device("cpu"))
    accuracy, _ = class_accuracy(load_digit_features(folder).classifier, samples, labels, 10)
    assert accuracy >= 0.9
