"""Latent diffusion models: the autoencoder is loaded with the noise predictor and decodes samples into images."""
import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel, VQModel

from gaq.errors import GaqError
from gaq.eval.evaluate import Conditioning, SamplingConfig, sample_images
from gaq.eval.sampling import SamplerConfig
from gaq.models.latent import LatentDecoder
from gaq.models.loading import Denoiser, load_denoiser, save_denoiser


def _tiny_vq() -> VQModel:
    torch.manual_seed(0)
    return VQModel(in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=32, block_out_channels=(8, 8, 8),
                   down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                   layers_per_block=1, norm_num_groups=4, sample_size=32).eval()


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.fixture
def ldm_folder(tmp_path):
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    den = Denoiser(_tiny_unet(), sched.alphas_cumprod, (3, 8, 8), decoder=LatentDecoder(_tiny_vq(), 1.0))
    return save_denoiser(den, tmp_path / "ldm", sched)


def test_decoder_divides_by_the_scale_and_clamps():
    vq = _tiny_vq()
    z = 3 * torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = vq.decode(z / 0.5).sample.clamp(-1, 1)
    assert torch.allclose(LatentDecoder(vq, 0.5)(z), want, atol=1e-5)
    assert LatentDecoder(vq, 0.5).image_shape((3, 8, 8)) == (3, 32, 32)  # three blocks: factor 4


def test_pipeline_folder_round_trip_keeps_the_autoencoder_and_its_scale(ldm_folder):
    index = json.loads((ldm_folder / "model_index.json").read_text())
    assert index["vqvae"] == ["diffusers", "VQModel"] and (ldm_folder / "vqvae" / "config.json").is_file()
    den = load_denoiser(ldm_folder)
    # gaq.json's latent_scaling_factor wins over the VQModel config's default 0.18215
    assert den.decoder is not None and den.decoder.scaling_factor == 1.0
    assert (den.sample_shape, den.image_shape) == ((3, 8, 8), (3, 32, 32))
    meta = json.loads((ldm_folder / "gaq.json").read_text())
    del meta["latent_scaling_factor"]
    (ldm_folder / "gaq.json").write_text(json.dumps(meta))
    assert load_denoiser(ldm_folder).decoder.scaling_factor == pytest.approx(0.18215)


def test_sampled_latents_come_back_as_images(ldm_folder):
    den = load_denoiser(ldm_folder)
    sampling = SamplingConfig(num_samples=2, batch_size=2, sampler=SamplerConfig(steps=3, clip_sample=False))
    images = sample_images(den.model, den, torch.arange(2), torch.zeros(2, dtype=torch.long), sampling,
                           Conditioning.of(den, sampling))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32 and images.abs().max() <= 1


def test_pixel_models_have_no_decoder(tmp_path):
    sched = DDIMScheduler()
    save_denoiser(Denoiser(_tiny_unet(), sched.alphas_cumprod, (3, 8, 8)), tmp_path / "px", sched)
    den = load_denoiser(tmp_path / "px")
    assert den.decoder is None and den.image_shape == den.sample_shape == (3, 8, 8)
    assert "latent_scaling_factor" not in json.loads((tmp_path / "px" / "gaq.json").read_text())


def test_decoder_errors_are_one_line():
    with pytest.raises(GaqError, match="must be one of VQModel, AutoencoderKL"):
        LatentDecoder(_tiny_unet(), 1.0)
    with pytest.raises(GaqError, match="must be > 0"):
        LatentDecoder(_tiny_vq(), 0.0)
    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4)
    with pytest.raises(GaqError, match="samples 3 channels but its autoencoder decodes 4"):
        LatentDecoder(kl, 0.18215).image_shape((3, 8, 8))
