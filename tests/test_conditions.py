"""A UNet2DConditionModel with class labels and SDXL-style added conditioning, end to end on a tiny
random model: loading, the calibration set (stored, reloaded), a short uniform reconstruction, sampling."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from gaq.calib.checkpoints import UnitCheckpoint
from gaq.calib.driver import CalibrationJob, run_calibration
from gaq.calib.recon import ReconConfig
from gaq.data.calibset import CalibrationSet, CalibSetConfig, generate_calibration_set
from gaq.data.datamodule import CalibrationDataModule, SplitConfig
from gaq.errors import GaqError
from gaq.eval.generation import Conditioning, SamplingConfig, generate
from gaq.models.sampling import SamplerConfig
from gaq.models.conditions import TEXT_EMBEDS, TIME_IDS
from gaq.models.denoiser import predict_noise
from gaq.models.loading import Denoiser, load_denoiser, save_denoiser
from gaq.quant import QuantConfig, load_quantized

CLASSES, TEXT_W, TIME_DIM = 3, 12, 4
CALIB = CalibSetConfig(steps=4, interval=2, samples_per_step=4, batch_size=4, guidance_scale=2.0, spacing="uniform")


def make_sdxl_style_unet(seed: int = 0) -> UNet2DConditionModel:
    """Cross-attention UNet with ``num_class_embeds`` and ``addition_embed_type="text_time"`` (SDXL's)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        num_class_embeds=CLASSES, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=TEXT_W + 6 * TIME_DIM,
    ).eval()


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """The model saved and loaded back, and a prompt-embeddings file of 2 prompts with their pooled embeddings."""
    folder = tmp_path_factory.mktemp("sdxl_style")
    sched = DDPMScheduler(num_train_timesteps=1000)
    save_denoiser(Denoiser(make_sdxl_style_unet(), sched.alphas_cumprod, (4, 8, 8), "text", CLASSES), folder / "m", sched)
    torch.manual_seed(1)
    emb = folder / "emb.safetensors"
    save_file({"cond": torch.randn(2, 5, 16), "uncond": torch.zeros(5, 16), "text_embeds": torch.randn(2, TEXT_W),
               "uncond_text_embeds": torch.zeros(TEXT_W)}, str(emb))
    return load_denoiser(folder / "m"), emb


def test_class_labels_and_added_cond_kwargs_reach_the_model(sdxl):
    den, emb = sdxl
    assert (den.cond_kind, den.num_classes, den.null_label) == ("text", CLASSES, None)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "class_labels": torch.tensor([0, 2]),
            TEXT_EMBEDS: torch.randn(2, TEXT_W), TIME_IDS: torch.ones(2, 6)}
    out = predict_noise(den.model, torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), cond)
    other = predict_noise(den.model, torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), dict(cond, **{TIME_IDS: torch.zeros(2, 6)}))
    assert out.shape == (2, 4, 8, 8) and not torch.equal(out, other)  # time_ids are used


def test_calibration_set_stores_every_condition_and_reloads(sdxl, tmp_path):
    den, emb = sdxl
    cs = generate_calibration_set(den, CalibSetConfig(**{**CALIB.__dict__, "cond_embeddings": str(emb)}), progress=False)
    assert set(cs.cond) == {"encoder_hidden_states", "class_labels", TEXT_EMBEDS, TIME_IDS}
    halves = cs.cond["class_labels"].view(2, 2, 4)
    assert torch.equal(halves[:, 0], halves[:, 1])  # no null class: both CFG halves keep the label
    assert bool((cs.cond[TEXT_EMBEDS].view(2, 2, 4, TEXT_W)[:, 1] == 0).all())  # the uncond half's pooled embedding
    assert cs.cond[TIME_IDS][0].tolist() == [8.0, 8.0, 0.0, 0.0, 8.0, 8.0]  # SDXL's default size conditioning
    back = CalibrationSet.load(cs.save(tmp_path / "c.safetensors"))
    assert all(torch.equal(back.cond[k], v) for k, v in cs.cond.items())


def _trainer(unit_dir: Path, _name: str) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                      limit_val_batches=0, enable_checkpointing=False, callbacks=[UnitCheckpoint(unit_dir)])


def test_reconstruction_and_sampling_end_to_end(sdxl, tmp_path):
    den, emb = sdxl
    cfg = CalibSetConfig(**{**CALIB.__dict__, "cond_embeddings": str(emb)})
    calib = generate_calibration_set(den, cfg, progress=False)
    dm = CalibrationDataModule("sdxl", cfg, SplitConfig(val_fraction=0.25, num_groups=2))
    dm.attach(denoiser=den, calib_set=calib).setup("fit")
    job = CalibrationJob(den, dm, QuantConfig(w_bits=4, a_bits=8), "uniform",
                         ReconConfig(iters=2, batch_size=4, ckpt_every=5, cache_batch=8), tmp_path, _trainer,
                         torch.device("cpu"), {"test": "sdxl"}, None)
    summary = run_calibration(job)
    assert summary["num_units"] > 5
    q = load_quantized(tmp_path / "quantized", den.model)
    sampling = SamplingConfig(num_samples=6, batch_size=3, sampler=SamplerConfig(steps=3, guidance_scale=2.0),
                              cond_embeddings=str(emb))
    cond = Conditioning.of(den, sampling)
    assert cond.period == 6 and cond.cond_ids(6).tolist() == list(range(6))  # lcm(2 prompts, 3 classes)
    images = torch.cat([img for _, _, img in generate(q, den, sampling, progress=False)])
    assert images.shape == (6, 4, 8, 8) and torch.isfinite(images).all()


def test_missing_pooled_embeddings_get_one_line(sdxl, tmp_path):
    den, _ = sdxl
    path = tmp_path / "plain.safetensors"
    save_file({"cond": torch.randn(2, 5, 16)}, str(path))
    with pytest.raises(GaqError, match="text_embeds") as info:
        generate_calibration_set(den, CalibSetConfig(**{**CALIB.__dict__, "guidance_scale": 1.0,
                                                        "cond_embeddings": str(path)}), progress=False)
    assert "\n" not in str(info.value)
    save_file({"cond": torch.randn(2, 5, 16), "text_embeds": torch.randn(2, TEXT_W + 1)}, str(path))
    with pytest.raises(GaqError, match="projection_class_embeddings_input_dim"):
        Conditioning.of(den, SamplingConfig(cond_embeddings=str(path)))


def test_unsupported_class_embedding_is_refused(tmp_path):
    sched = DDPMScheduler(num_train_timesteps=1000)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=16,
                                attention_head_dim=8, class_embed_type="timestep",
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.save_pretrained(tmp_path / "u")
    sched.save_pretrained(tmp_path / "u" / "scheduler")
    with pytest.raises(GaqError, match="class_embed_type"):
        load_denoiser(tmp_path / "u")
