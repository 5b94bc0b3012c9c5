"""Fidelity to the FP model on known inputs: per-sample PSNR / SSIM / MSE and FID to FP of identical and
noised image sets, the t-interval helper, the FP-sample cache, and the per-group step error."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDPMScheduler
from scipy.stats import t as student_t

from gaq.errors import GaqError
from gaq.eval.generation import Conditioning, SamplingConfig, generate
from gaq.eval.fidelity import FidelityMeter, distances_to_fp, per_sample_fidelity, summarize_fidelity
from gaq.eval.fp_samples import fp_samples, fp_samples_identity
from gaq.eval.intervals import mean_ci
from gaq.eval.metrics import ClassifierExtractor, save_tensors
from gaq.models.sampling import SamplerConfig
from gaq.eval.timestep_error import TimestepErrorConfig, timestep_error
from gaq.toy.classifier import ClassifierConfig, DigitClassifier
from gaq.models.loading import Denoiser
from gaq.quant import QuantConfig, quantize_rtn

CPU = torch.device("cpu")


def mid_range_images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Images in [-0.5, 0.5]: noise of std <= 0.1 stays inside [-1, 1], so nothing is clamped."""
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) - 0.5


def noised(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


def extractor() -> ClassifierExtractor:
    torch.manual_seed(0)
    return ClassifierExtractor(DigitClassifier(ClassifierConfig(channels=(8, 16), feature_dim=16)))


def test_mean_ci_matches_the_t_table_and_drops_missing_values():
    mean, half = mean_ci([1, 2, 3, 4, 5])
    # s = sqrt(2.5), t_{0.975, 4} = 2.776 (table): 2.776 * sqrt(2.5) / sqrt(5) = 1.963
    assert mean == 3.0 and half == pytest.approx(1.963, abs=1e-3)
    assert half == pytest.approx(student_t.ppf(0.975, 4) * math.sqrt(2.5 / 5), rel=1e-12)
    assert mean_ci([1, 2, 3, 4, 5], confidence=0.9)[1] == pytest.approx(2.132 * math.sqrt(0.5), abs=1e-3)
    assert mean_ci([2.0, None, float("nan"), 4.0, float("inf")]) == pytest.approx((3.0, 12.706), abs=1e-3)  # s = sqrt(2), n = 2
    assert mean_ci([7.0]) == (7.0, None) and mean_ci([]) == (None, None)
    with pytest.raises(GaqError, match="confidence"):
        mean_ci([1, 2], confidence=1.0)


def test_identical_samples_are_capped_perfect_and_at_distance_zero():
    x = mid_range_images(40)
    per = per_sample_fidelity(x, x.clone(), psnr_cap_db=100.0)
    assert torch.equal(per["mse"], torch.zeros(40)) and bool(per["capped"].all())
    assert torch.equal(per["psnr"], torch.full((40,), 100.0, dtype=torch.float64))
    torch.testing.assert_close(per["ssim"], torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-6)
    summary = summarize_fidelity(per)
    assert summary["psnr_capped"] == 40 and summary["fidelity_samples"] == 40
    assert summary["psnr"] == 100.0 and summary["sample_mse"] == 0.0 and summary["sample_mse_ci95"] == 0.0
    assert summary["ssim"] == pytest.approx(1.0, abs=1e-6)
    ex = extractor()
    dist = distances_to_fp("classifier", ex.extract(x), ex.extract(x.clone()))
    assert abs(dist["fid_to_fp"]) < 1e-3 and abs(dist["sfid_to_fp"]) < 1e-3


def test_noise_of_known_std_gives_the_expected_mse_and_psnr_and_more_noise_scores_worse():
    x = mid_range_images(64)
    sigma = 0.05
    per = per_sample_fidelity(noised(x, sigma), x)
    assert float(noised(x, sigma).abs().max()) < 1.0                       # no clamping involved
    summary = summarize_fidelity(per)
    assert summary["sample_mse"] == pytest.approx(sigma ** 2, rel=0.03)
    assert summary["psnr"] == pytest.approx(10 * math.log10(4 / sigma ** 2), abs=0.3)   # 32.04 dB
    assert summary["psnr_capped"] == 0 and 0 < summary["psnr_ci95"] < 0.3
    torch.testing.assert_close(per["mse"], (noised(x, sigma) - x).double().pow(2).flatten(1).mean(1))
    worse = summarize_fidelity(per_sample_fidelity(noised(x, 2 * sigma), x))
    assert worse["sample_mse"] == pytest.approx(4 * sigma ** 2, rel=0.03)
    assert worse["psnr"] == pytest.approx(summary["psnr"] - 10 * math.log10(4), abs=0.1)  # 6 dB less
    assert worse["ssim"] < summary["ssim"] < 1.0
    ex = extractor()
    fp = ex.extract(x)
    fid_small = distances_to_fp("classifier", fp, ex.extract(noised(x, sigma)))["fid_to_fp"]
    fid_large = distances_to_fp("classifier", fp, ex.extract(noised(x, 4 * sigma)))["fid_to_fp"]
    assert 0 < fid_small < fid_large


def test_fidelity_meter_pairs_samples_by_index_and_needs_every_fp_sample():
    x = mid_range_images(10)
    y = noised(x, 0.05)
    meter = FidelityMeter(x, info={"cache": "off"})
    meter.update(torch.tensor([7, 8, 9, 10, 11]), torch.cat([y[7:], y[:2]]))   # 10, 11: past the FP set, ignored
    with pytest.raises(GaqError, match="3 of the 10"):
        meter.compute()
    meter.update(torch.arange(7), y[:7])
    assert meter.compute() == summarize_fidelity(per_sample_fidelity(y, x))


@pytest.fixture(scope="module")
def den() -> Denoiser:
    sched = DDPMScheduler(num_train_timesteps=1000)
    return Denoiser(make_tiny_unet(), sched.alphas_cumprod, (1, 16, 16), "class", 10, 10)


SAMPLER = SamplerConfig(steps=3, guidance_scale=2.0)


def test_fp_samples_are_cached_by_identity_and_match_a_fresh_sampling(tmp_path, den):
    cache = str(tmp_path / "cache")
    sampling = SamplingConfig(num_samples=20, batch_size=5, seed=3, sampler=SAMPLER)
    first, info = fp_samples(den, sampling, 10, cache, CPU, progress=False)
    assert info["cache"] == "miss" and first.shape == (10, 1, 16, 16) and info["identity"]["count"] == 10
    again, info2 = fp_samples(den, sampling, 10, cache, CPU, progress=False)
    assert info2["cache"] == "hit" and info2["file"] == info["file"] and torch.equal(again, first)
    # the same samples the evaluation draws: compared with themselves, every PSNR is at the cap
    drawn = torch.cat([imgs for _, _, imgs in generate(den.model, den, sampling, progress=False)])
    meter = FidelityMeter(again)
    meter.update(torch.arange(20), drawn)
    assert meter.compute()["psnr_capped"] == 10
    # another seed, sampler, count or runtime: another file
    other_seed = SamplingConfig(num_samples=20, batch_size=5, seed=4, sampler=SAMPLER)
    assert fp_samples(den, other_seed, 10, cache, CPU, progress=False)[1]["cache"] == "miss"
    other_sampler = SamplingConfig(num_samples=20, batch_size=5, seed=3, sampler=SamplerConfig(steps=4, guidance_scale=2.0))
    x4, info4 = fp_samples(den, other_sampler, 10, cache, CPU, progress=False)
    assert info4["cache"] == "miss" and not torch.allclose(x4, first)
    assert fp_samples(den, sampling, 5, cache, CPU, progress=False)[1]["cache"] == "miss"
    ident = fp_samples_identity(den, sampling, 10, CPU)
    bf16 = SamplingConfig(num_samples=20, batch_size=5, seed=3, sampler=SamplerConfig(steps=3, guidance_scale=2.0,
                                                                                     precision="bf16"))
    assert fp_samples_identity(den, bf16, 10, CPU) != ident
    assert fp_samples_identity(den, sampling, 10, CPU, precision="bf16-mixed") != ident
    # a file whose stored identity does not match is not trusted
    save_tensors(info["file"], {"images": first + 1}, {"identity": {**ident, "seed": 99}})
    fixed, info5 = fp_samples(den, sampling, 10, cache, CPU, progress=False)
    assert info5["cache"] == "miss" and torch.equal(fixed, first)
    assert fp_samples(den, sampling, 10, None, CPU, progress=False)[1]["cache"] == "off"


def test_timestep_error_per_group_is_the_mean_of_its_contiguous_steps(den):
    sampler = SamplerConfig(steps=6, guidance_scale=2.0)
    cond = Conditioning.of(den, SamplingConfig(sampler=sampler))
    w4 = quantize_rtn(den.model, QuantConfig(w_bits=4, a_bits=32), [])
    res = timestep_error(den.model, w4, den, sampler, cond, TimestepErrorConfig(num_samples=2, batch_size=2, num_groups=3), 0)
    mse = [s["mse"] for s in res["steps"]]
    assert res["num_groups"] == 3 and res["group_steps"] == [[0, 1], [2, 3], [4, 5]]
    assert res["group_mse"] == pytest.approx([(mse[0] + mse[1]) / 2, (mse[2] + mse[3]) / 2, (mse[4] + mse[5]) / 2])
    # more groups than steps: one group per step
    many = timestep_error(den.model, w4, den, sampler, cond, TimestepErrorConfig(num_samples=2, batch_size=2, num_groups=9), 0)
    assert many["num_groups"] == 6 and many["group_mse"] == pytest.approx(mse)
    with pytest.raises(GaqError, match="timestep_error.num_groups"):
        TimestepErrorConfig(num_groups=0)
