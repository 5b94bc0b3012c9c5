"""Transformer noise predictors end to end on tiny random models: PixArt (``PixArtTransformer2DModel``) from a
bare transformer/ + scheduler/ folder (roles, the calibration set, a short uniform reconstruction under
qdiff_compat with the timestep by keyword, sampling) and DiT (``DiTTransformer2DModel``)."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, PixArtTransformer2DModel
from safetensors.torch import save_file

from gaq.calib.checkpoints import UnitCheckpoint
from gaq.calib.driver import CalibrationJob, run_calibration
from gaq.calib.recon import ReconConfig
from gaq.data.calibset import CalibSetConfig, generate_calibration_set
from gaq.data.datamodule import CalibrationDataModule, SplitConfig
from gaq.errors import GaqError
from gaq.eval.generation import SamplingConfig, generate
from gaq.models.sampling import SamplerConfig
from gaq.models.conditions import ASPECT_RATIO, RESOLUTION
from gaq.models.loading import Denoiser, load_denoiser, save_denoiser
from gaq.quant import QuantConfig, load_quantized, quant_info, quantize

CAPTION = 12


def make_tiny_pixart(seed: int = 0, size_conditions: bool = True) -> PixArtTransformer2DModel:
    """2 blocks, inner width 24, captions 12 wide; with PixArt-alpha-1024's resolution / aspect-ratio conditioning."""
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=24, caption_channels=CAPTION, sample_size=8, patch_size=2, norm_num_groups=8,
        use_additional_conditions=size_conditions,
    ).eval()


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixart")
    make_tiny_pixart().save_pretrained(folder / "m" / "transformer")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "m" / "scheduler")
    torch.manual_seed(1)
    save_file({"cond": torch.randn(2, 5, CAPTION), "uncond": torch.zeros(5, CAPTION)}, str(folder / "emb.safetensors"))
    return load_denoiser(folder / "m"), folder / "emb.safetensors"


def test_pixart_loads_as_a_text_model_with_its_roles(pixart):
    den, _ = pixart
    assert isinstance(den.model, PixArtTransformer2DModel)
    assert (den.cond_kind, den.num_classes, den.sample_shape) == ("text", None, (4, 8, 8))
    q = quantize(den.model, QuantConfig(preset="tfmq_compat"), timesteps=torch.tensor([999, 500, 0]))
    assert set(quant_info(q).plan.kept_fp) == {"pos_embed.proj", "proj_out", "adaln_single.emb.timestep_embedder.linear_1"}


def _trainer(unit_dir: Path, _name: str) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                      limit_val_batches=0, enable_checkpointing=False, callbacks=[UnitCheckpoint(unit_dir)])


def _calibrate(den, cfg, preset, tmp_path):
    """Calibration set, then a 2-iteration uniform reconstruction; returns (set, summary, quantized model)."""
    calib = generate_calibration_set(den, cfg, progress=False)
    dm = CalibrationDataModule("tiny", cfg, SplitConfig(val_fraction=0.25, num_groups=2))
    dm.attach(denoiser=den, calib_set=calib).setup("fit")
    job = CalibrationJob(den, dm, QuantConfig(w_bits=4, a_bits=8, preset=preset), "uniform",
                         ReconConfig(iters=2, batch_size=4, ckpt_every=5, cache_batch=8), tmp_path, _trainer,
                         torch.device("cpu"), {"test": preset}, None)
    summary = run_calibration(job)
    return calib, summary, load_quantized(tmp_path / "quantized", den.model)


def test_qdiff_compat_reconstruction_and_sampling(pixart, tmp_path):
    den, emb = pixart
    cfg = CalibSetConfig(steps=4, interval=2, samples_per_step=4, batch_size=4, guidance_scale=2.0, spacing="uniform",
                         cond_embeddings=str(emb))
    calib, summary, q = _calibrate(den, cfg, "qdiff_compat", tmp_path)
    assert calib.cond[RESOLUTION][0].tolist() == [8.0, 8.0] and calib.cond[ASPECT_RATIO][0].tolist() == [1.0]
    kinds = {u["kind"] for u in summary["units"]}
    assert {"time", "attention", "layer"} <= kinds  # the timestep + size embedding is one unit
    sampling = SamplingConfig(num_samples=4, batch_size=2, sampler=SamplerConfig(steps=3, guidance_scale=2.0),
                              cond_embeddings=str(emb))
    images = torch.cat([img for _, _, img in generate(q, den, sampling, progress=False)])
    assert images.shape == (4, 4, 8, 8) and torch.isfinite(images).all()


def test_caption_width_is_checked(pixart, tmp_path):
    den, _ = pixart
    path = tmp_path / "wide.safetensors"
    save_file({"cond": torch.randn(2, 5, 24)}, str(path))  # the inner width, not the caption width
    with pytest.raises(GaqError, match=f"model expects {CAPTION}"):
        generate_calibration_set(den, CalibSetConfig(steps=2, interval=1, samples_per_step=2, cond_embeddings=str(path)),
                                 progress=False)


def test_dit_reconstruction_and_guided_sampling(tmp_path):
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=3, norm_num_groups=8).eval()
    sched = DDPMScheduler(num_train_timesteps=1000)
    save_denoiser(Denoiser(dit, sched.alphas_cumprod, (4, 8, 8), "class", 3, 3), tmp_path / "dit", sched)
    den = load_denoiser(tmp_path / "dit")
    cfg = CalibSetConfig(steps=4, interval=2, samples_per_step=4, batch_size=4, guidance_scale=2.0, spacing="uniform")
    _, summary, q = _calibrate(den, cfg, "tfmq_compat", tmp_path / "run")
    assert "attention" in {u["kind"] for u in summary["units"]}
    sampling = SamplingConfig(num_samples=3, batch_size=3, sampler=SamplerConfig(steps=3, guidance_scale=2.0))
    images = torch.cat([img for _, _, img in generate(q, den, sampling, progress=False)])
    assert images.shape == (3, 4, 8, 8) and torch.isfinite(images).all()
