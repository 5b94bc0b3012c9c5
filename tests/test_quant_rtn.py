"""Round-to-nearest PTQ end to end on the tiny UNet: real behaviour, not mocks."""
import pytest
import torch

from gaq.errors import GaqError
from gaq.models.sampling import SamplerConfig, ddim_sample
from gaq.models.denoiser import predict_noise
from gaq.quant import QuantConfig, iter_act_quantizers, iter_quant_layers, quant_info, quantize_rtn
from gaq.quant.rtn import timesteps_from_batches


def _trajectory_batches(model, ddpm_scheduler, steps=5, batch=8):
    """Calibration batches from the FP model's own DDIM trajectory (as the calibration set is built)."""
    out = []
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, 1, 16, 16, generator=g)
    cond = {"class_labels": torch.arange(batch) % 10}

    def on_step(i, t, x, c):
        out.append({"x": x.clone(), "t": t.clone(), "step": torch.full_like(t, i), "cond": dict(c)})

    ddim_sample(model, ddpm_scheduler.alphas_cumprod, noise, SamplerConfig(steps=steps), cond, on_step=on_step)
    return out


def _rel_error(q, fp, batches):
    num = den = 0.0
    with torch.no_grad():
        for b in batches:
            ref = predict_noise(fp, b["x"], b["t"], b["cond"])
            num += (predict_noise(q, b["x"], b["t"], b["cond"]) - ref).pow(2).sum().item()
            den += ref.pow(2).sum().item()
    return (num / den) ** 0.5


@pytest.mark.parametrize("preset", ["tfmq_compat", "qdiff_compat"])
def test_rtn_w8a8_is_close_to_fp_and_w4_is_worse(tiny_unet, ddpm_scheduler, preset):
    batches = _trajectory_batches(tiny_unet, ddpm_scheduler)
    errors = {}
    for w_bits, a_bits in ((8, 8), (4, 8), (4, 32)):
        q = quantize_rtn(tiny_unet, QuantConfig(w_bits=w_bits, a_bits=a_bits, preset=preset), batches)
        assert all(layer.weight_quantizer.mode == "nearest" for _, layer in iter_quant_layers(q))
        if a_bits < 32:
            assert all(a.ready and a.enabled for _, a in iter_act_quantizers(q))
        errors[(w_bits, a_bits)] = _rel_error(q, tiny_unet, batches)
    assert errors[(8, 8)] < 0.05
    assert errors[(4, 8)] > 2 * errors[(8, 8)]
    assert errors[(4, 32)] > errors[(8, 8)]


def test_rtn_reads_per_step_timesteps_from_the_batches(tiny_unet, ddpm_scheduler):
    batches = _trajectory_batches(tiny_unet, ddpm_scheduler, steps=4, batch=2)
    ts = timesteps_from_batches(batches)
    assert ts.tolist() == [b["t"][0].item() for b in batches]
    q = quantize_rtn(tiny_unet, QuantConfig(preset="tfmq_compat"), batches)
    assert torch.equal(quant_info(q).context.timesteps, ts)
    with pytest.raises(GaqError, match="cover every step"):
        timesteps_from_batches(batches[1:])
