"""Prompt lists: a Stable-Diffusion-style pipeline folder (tiny random UNet, CLIP text encoder and tokenizer,
autoencoder, all built here) conditioned from a text file of prompts through its own text encoder."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_cond_unet, one_line
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gaq.data.calibset import CalibrationSet, CalibSetConfig, cache_key, expected_meta, generate_calibration_set, load_or_generate
from gaq.eval.generation import Conditioning, SamplingConfig, generate
from gaq.models.sampling import SamplerConfig
from gaq.models import prompts as prompt_lists
from gaq.models.loading import Denoiser, load_denoiser

pytestmark = pytest.mark.filterwarnings("ignore:.*are truncated:UserWarning")
PROMPTS = ["a red cat", "two dogs on grass", "a boat"]
MAX_LEN = 8  # the tokenizer's model_max_length (CLIP's is 77)
CALIB = dict(steps=4, interval=2, samples_per_step=3, batch_size=3, guidance_scale=2.0, spacing="uniform",
             classes=[0, 1, 2])  # trajectory i gets prompt i


def make_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (no merges), built offline from a vocab.json and merges.txt."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LEN)


def make_text_encoder(vocab_size: int, hidden: int = 16, cls: type = CLIPTextModel, seed: int = 2, **extra):
    torch.manual_seed(seed)
    return cls(CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=MAX_LEN, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, **extra)).eval()


def make_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                         latent_channels=4)


def make_scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                         clip_sample=False)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The pipeline folder (diffusers' own save_pretrained layout), its loaded Denoiser and a prompt file."""
    root = tmp_path_factory.mktemp("sd")
    tokenizer = make_tokenizer(root / "bpe")
    pipe = StableDiffusionPipeline(vae=make_vae(), text_encoder=make_text_encoder(len(tokenizer)), tokenizer=tokenizer,
                                   unet=make_tiny_cond_unet(), scheduler=make_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join([PROMPTS[0], "", PROMPTS[1], "   ", PROMPTS[2]]) + "\n")  # blank lines are skipped
    return root / "pipe", load_denoiser(root / "pipe"), prompts


def diffusers_embeddings(folder: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What diffusers' own pipeline feeds the UNet: ``encode_prompt`` of the saved folder."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    cond, uncond = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    return cond, uncond[:1]



def test_calibration_set_holds_the_text_encoders_output(sd):
    folder, den, prompts = sd
    prompt_lists._TABLES.clear()  # encode here, not from an earlier test's table
    with pytest.warns(UserWarning, match="2 of 3 prompts are longer than the tokenizer's 8 tokens"):
        cs = generate_calibration_set(den, CalibSetConfig(**CALIB, prompts=str(prompts)), progress=False)
    cond, uncond = diffusers_embeddings(folder, PROMPTS)  # diffusers truncates them too
    assert cond.shape == (3, MAX_LEN, 16)
    ehs = cs.cond["encoder_hidden_states"].view(2, 2, 3, MAX_LEN, 16)  # kept steps, CFG halves, trajectories
    for step in range(2):
        torch.testing.assert_close(ehs[step, 0], cond, rtol=0, atol=1e-6)  # trajectory i: prompt i
        torch.testing.assert_close(ehs[step, 1], uncond.expand(3, -1, -1), rtol=0, atol=1e-6)  # the empty prompt
    assert cs.meta["prompts_sha256"] and cs.meta["text_encoder_sha256"]


def test_cache_key_follows_the_prompt_file(sd, tmp_path):
    from gaq.eval.fp_samples import fp_samples_identity

    _, den, prompts = sd
    mine = tmp_path / "prompts.txt"
    shutil.copy(prompts, mine)
    cfg = CalibSetConfig(**{**CALIB, "guidance_scale": 1.0}, prompts=str(mine))
    cs, path, reused = load_or_generate(den, cfg, tmp_path / "cache", progress=False)
    assert not reused and load_or_generate(den, cfg, tmp_path / "cache", progress=False)[2]
    key = cache_key(den, cfg)
    fp_ident = fp_samples_identity(den, SamplingConfig(prompts=str(mine)), 1, torch.device("cpu"))
    mine.write_text("a red cat\ntwo dogs on grass\na ship\n")
    assert cache_key(den, cfg) != key
    assert fp_samples_identity(den, SamplingConfig(prompts=str(mine)), 1, torch.device("cpu")) != fp_ident  # FP samples too
    again, new_path, reused = load_or_generate(den, cfg, tmp_path / "cache", progress=False)
    assert not reused and new_path != path
    assert not torch.equal(again.cond["encoder_hidden_states"], cs.cond["encoder_hidden_states"])
    # a config without a prompt list keeps the keys it had before prompt lists existed
    assert "prompts" not in expected_meta(den, CalibSetConfig(cond_embeddings="e.safetensors"))["config"]


def test_evaluation_samples_from_a_prompt_list(sd, tmp_path, capsys):
    from PIL import Image

    from gaq.cli import main as gaq_main

    folder, den, prompts = sd
    sampling = SamplingConfig(num_samples=3, batch_size=3, sampler=SamplerConfig(steps=2, guidance_scale=2.0),
                              prompts=str(prompts))
    cond = Conditioning.of(den, sampling)
    want, want_uncond = diffusers_embeddings(folder, PROMPTS)
    torch.testing.assert_close(cond.prompts.cond["encoder_hidden_states"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.prompts.uncond["encoder_hidden_states"], want_uncond, rtol=0, atol=1e-6)
    images = torch.cat([img for _, _, img in generate(den.model, den, sampling, progress=False)])
    assert images.shape == (3, 3, 16, 16) and torch.isfinite(images).all()  # decoded by the pipeline's vae

    cfg = {"source": str(folder), "num_samples": 3, "batch_size": 3, "sampler": {"steps": 2, "guidance_scale": 2.0},
           "prompts": str(prompts), "reference": {"cache_dir": str(tmp_path / "cache")},
           "grid": {"per_class": 3, "scale": 1}, "timestep_error": {"enabled": False},
           "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}}
    (tmp_path / "ev.yaml").write_text(yaml.safe_dump(cfg))
    gaq_main(["evaluate", "--config", str(tmp_path / "ev.yaml"), "--out_dir", str(tmp_path / "out")])
    capsys.readouterr()
    assert (tmp_path / "out" / "metrics.json").is_file()
    assert Image.open(tmp_path / "out" / "samples_grid.png").size[0] > 0


def test_calib_data_cli_takes_a_prompt_list(sd, tmp_path, capsys):
    import gaq.cli

    folder, _, prompts = sd
    cfg = {"data": {"source": str(folder), "cache_dir": str(tmp_path / "sets"),
                    "calib": {"steps": 4, "interval": 2, "samples_per_step": 3, "batch_size": 3, "spacing": "uniform",
                              "guidance_scale": 2.0},
                    "split": {"val_fraction": 0.25, "num_groups": 2}},
           "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    gaq.cli.main(["calib-data", "--config", str(tmp_path / "c.yaml"), "--data.calib.prompts", str(prompts)])
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.is_file() and path.parent == tmp_path / "sets"
    cs = CalibrationSet.load(path)
    assert cs.meta["config"]["prompts"] == str(prompts) and cs.meta["prompts_sha256"]
    assert cs.cond["encoder_hidden_states"].shape == (2 * 2 * 3, MAX_LEN, 16)


def test_bad_prompt_input_getsone_line(sd, tmp_path, monkeypatch):
    folder, den, prompts = sd
    both = CalibSetConfig(**CALIB, prompts=str(prompts), cond_embeddings=str(tmp_path / "e.safetensors"))
    assert "keep one" in one_line(lambda: generate_calibration_set(den, both, progress=False))
    assert "calib.prompts" in one_line(lambda: generate_calibration_set(den, CalibSetConfig(**CALIB), progress=False))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "holds no prompts" in one_line(lambda: Conditioning.of(den, SamplingConfig(prompts=str(empty))))
    assert "does not exist" in one_line(lambda: Conditioning.of(den, SamplingConfig(prompts=str(tmp_path / "no.txt"))))

    bare = tmp_path / "no_encoder"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("text_encoder"))
    message = one_line(lambda: Conditioning.of(load_denoiser(bare), SamplingConfig(prompts=str(prompts))))
    assert "has no text_encoder/" in message and "add the pipeline's tokenizer/ and text_encoder/ folders" in message

    memory = Denoiser(den.model, den.alphas_cumprod, den.sample_shape, "text")
    assert "built in memory" in one_line(lambda: Conditioning.of(memory, SamplingConfig(prompts=str(prompts))))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if transformers were not installed
    assert "pip install 'gaq[text]'" in one_line(lambda: Conditioning.of(load_denoiser(bare),
                                                                         SamplingConfig(prompts=str(prompts))))


def test_prompt_list_is_refused_for_other_models(sd, tiny_unet, ddpm_scheduler):
    from diffusers import PixArtTransformer2DModel

    _, _, prompts = sd
    den = Denoiser(tiny_unet, ddpm_scheduler.alphas_cumprod, (1, 16, 16), "class", 10, 10)
    assert "for text models" in one_line(lambda: generate_calibration_set(
        den, CalibSetConfig(steps=2, interval=1, samples_per_step=1, prompts=str(prompts)), progress=False))
    torch.manual_seed(0)
    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
                                      num_layers=1, cross_attention_dim=24, caption_channels=32, sample_size=8,
                                      patch_size=2, norm_num_groups=8).eval()
    den = Denoiser(pixart, ddpm_scheduler.alphas_cumprod, (4, 8, 8), "text")
    assert "give cond_embeddings instead" in one_line(lambda: Conditioning.of(den, SamplingConfig(prompts=str(prompts))))


TEXT_W, TIME_DIM = 12, 4  # SDXL-style: pooled width (text_encoder_2's projection) and time-id channels


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """An SDXL-style pipeline folder: text_time UNet, CLIPTextModel + CLIPTextModelWithProjection (8 + 8 = the
    UNet's cross_attention_dim 16), two tokenizers; saved by StableDiffusionXLPipeline itself."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("sdxl")
    tokenizer = make_tokenizer(root / "bpe")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=TEXT_W + 6 * TIME_DIM).eval()
    pipe = StableDiffusionXLPipeline(
        vae=make_vae(), text_encoder=make_text_encoder(len(tokenizer), 8), tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder_2=make_text_encoder(len(tokenizer), 8, CLIPTextModelWithProjection, 3, projection_dim=TEXT_W),
        unet=unet, scheduler=make_scheduler(), add_watermarker=False)
    pipe.save_pretrained(root / "pipe")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return root / "pipe", load_denoiser(root / "pipe"), prompts


def sdxl_embeddings(folder: Path) -> tuple[torch.Tensor, ...]:
    """diffusers' own SDXL ``encode_prompt``: cond, uncond, pooled, uncond pooled."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    return pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)


def test_sdxl_prompts_use_both_text_encoders(sdxl, tmp_path):
    from gaq.models.conditions import TEXT_EMBEDS, TIME_IDS

    folder, den, prompts = sdxl
    cs = generate_calibration_set(den, CalibSetConfig(**CALIB, prompts=str(prompts)), progress=False)
    cond, uncond, pooled, u_pooled = sdxl_embeddings(folder)
    assert cond.shape == (3, MAX_LEN, 16) and pooled.shape == (3, TEXT_W)
    ehs, text = cs.cond["encoder_hidden_states"].view(2, 2, 3, MAX_LEN, 16), cs.cond[TEXT_EMBEDS].view(2, 2, 3, TEXT_W)
    torch.testing.assert_close(ehs[:, 0], cond.expand(2, -1, -1, -1), rtol=0, atol=1e-6)
    torch.testing.assert_close(text[:, 0], pooled.expand(2, -1, -1), rtol=0, atol=1e-6)
    assert not uncond.any() and not u_pooled.any()  # force_zeros_for_empty_prompt (the pipeline's default) ...
    assert not ehs[:, 1].any() and not text[:, 1].any()  # ... and gaq's unconditional half
    assert cs.cond[TIME_IDS][0].tolist() == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]  # the decoded image's size

    # without force_zeros_for_empty_prompt the empty prompt is encoded, as the pipeline does
    other = tmp_path / "pipe"
    shutil.copytree(folder, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    _, uncond, _, u_pooled = sdxl_embeddings(other)
    table = Conditioning.of(load_denoiser(other), SamplingConfig(prompts=str(prompts))).prompts
    assert uncond.abs().sum() > 0
    torch.testing.assert_close(table.uncond["encoder_hidden_states"], uncond[:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(table.uncond[TEXT_EMBEDS], u_pooled[:1], rtol=0, atol=1e-6)

    shutil.rmtree(other / "text_encoder_2")
    message = one_line(lambda: Conditioning.of(load_denoiser(other), SamplingConfig(prompts=str(prompts))))
    assert "has no text_encoder_2/" in message and "SDXL has two text encoders" in message


@pytest.mark.filterwarnings("ignore::gaq.quant.UncalibratedTimestepWarning")  # the grid samples timesteps it was not calibrated at
def test_calibrate_cli_with_a_prompt_list_and_its_sample_grid(sd, tmp_path, capsys):
    """`gaq calibrate --data.calib.prompts`, in process: RTN on the SD-style folder, then the sample grid of the
    quantized model from the same prompt list (SampleGridCallback's sampling.prompts)."""
    import gaq.cli

    folder, _, prompts = sd
    cfg = {"method": "rtn", "quant": {"w_bits": 4, "a_bits": 8},
           "data": {"source": str(folder), "cache_dir": str(tmp_path / "sets"),
                    "calib": {"steps": 4, "interval": 2, "samples_per_step": 3, "batch_size": 3, "spacing": "uniform",
                              "guidance_scale": 2.0},
                    "split": {"val_fraction": 0.25, "num_groups": 2}},
           "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "callbacks": [{
               "class_path": "gaq.eval.callbacks.SampleGridCallback",
               "init_args": {"per_class": 3, "scale": 1, "sampling": {
                   "batch_size": 3, "prompts": str(prompts), "sampler": {"steps": 2, "guidance_scale": 2.0}}}}]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    gaq.cli.main(["calibrate", "--config", str(tmp_path / "c.yaml"), "--data.calib.prompts", str(prompts),
                  "--run_dir", str(tmp_path / "run")])
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "rtn" and (tmp_path / "run" / "quantized").is_dir()
    assert len(list((tmp_path / "run").rglob("samples_grid.png"))) == 1
