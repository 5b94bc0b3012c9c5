"""Shared fixtures: tiny real diffusers models built here (no downloads)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CI has 2 cores and several tests start 2-process DDP runs: one intra-op thread per process avoids
# oversubscription (subprocesses inherit it through the environment)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# gaq's Triton kernels run under Triton's CPU interpreter in the tests (the mode is fixed when a kernel is
# defined, so before anything imports them)
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402

NUM_CLASSES = 10


def make_tiny_unet(seed: int = 0) -> UNet2DModel:
    """A class-conditional UNet2DModel with one attention down and up block (about 0.7M parameters).

    ``num_class_embeds`` is NUM_CLASSES + 1: the last label is the null class of classifier-free guidance.
    """
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=NUM_CLASSES + 1, attention_head_dim=8,
    ).eval()


def make_tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    """A text-conditional UNet2DConditionModel (cross-attention dim 16) of a few hundred thousand parameters."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


@pytest.fixture
def tiny_unet() -> UNet2DModel:
    return make_tiny_unet()


@pytest.fixture
def tiny_cond_unet() -> UNet2DConditionModel:
    return make_tiny_cond_unet()


@pytest.fixture
def ddpm_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def one_line(call) -> str:
    """The message of the :class:`gaq.errors.GaqError` that ``call()`` raises, checked to be one line."""
    from gaq.errors import GaqError

    with pytest.raises(GaqError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)
