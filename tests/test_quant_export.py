"""Saving and loading quantized models: bit-exact round trip, and clear errors for the wrong file or model."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_tiny_unet
from gaq.errors import GaqError
from gaq.models.denoiser import predict_noise
from gaq.quant import (QuantConfig, WeightRangeConfig, calibrate_activations, iter_act_quantizers, iter_quant_layers,
                       load_quantized, quantize, rounding_parameters, save_quantized, stored_weight_bytes)
from gaq.quant.export import pack_codes, packed_size, unpack_codes

TS = torch.tensor([900, 600, 300, 0, 0])
FAST = WeightRangeConfig(method="minmax")


def _batches(n=2):
    g = torch.Generator().manual_seed(7)
    return [{"x": torch.randn(5, 1, 16, 16, generator=g), "t": TS, "step": torch.arange(5),
             "cond": {"class_labels": torch.arange(5)}} for _ in range(n)]


def _calibrated(fp, preset, w_bits=4, a_bits=8):
    q = quantize(fp, QuantConfig(w_bits=w_bits, a_bits=a_bits, preset=preset, w_range=FAST), timesteps=TS)
    with torch.no_grad():  # learned rounding that is not nearest rounding, as after reconstruction
        for alpha in rounding_parameters(q):
            alpha.add_(torch.randn_like(alpha) * 2)
    calibrate_activations(q, _batches())
    return q


def _output(model):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 16, 16, generator=g)
    with torch.no_grad():
        return predict_noise(model, x, torch.tensor([0, 900, 600, 300]), {"class_labels": torch.tensor([1, 2, 3, 10])})


@pytest.mark.parametrize("preset", ["tfmq_compat", "qdiff_compat"])
def test_save_load_round_trip_is_bit_exact(tiny_unet, tmp_path, preset):
    q = _calibrated(tiny_unet, preset)
    ref = _output(q)
    save_quantized(q, tmp_path / "q", base_source="tests/tiny", config=QuantConfig(preset=preset), extra_meta={"k": 1})
    meta = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert meta["preset"] == preset and meta["w_bits"] == 4 and meta["base_source"] == "tests/tiny"
    assert meta["extra"] == {"k": 1} and meta["gaq_version"]
    loaded = load_quantized(tmp_path / "q", make_tiny_unet())
    assert torch.equal(_output(loaded), ref)
    for (n, a), (m, b) in zip(iter_quant_layers(q), iter_quant_layers(loaded)):
        assert n == m and torch.equal(a.integer_codes(), b.integer_codes())
    assert len(list(iter_act_quantizers(loaded))) == len(list(iter_act_quantizers(q)))
    # packed 4-bit codes: the file is far smaller than the FP weights
    size = (tmp_path / "q" / "quantized.safetensors").stat().st_size
    assert size < sum(p.numel() * 4 for p in tiny_unet.parameters()) / 4


def test_load_refuses_other_models_and_damaged_files(tiny_unet, tiny_cond_unet, tmp_path):
    q = _calibrated(tiny_unet, "tfmq_compat")
    folder = save_quantized(q, tmp_path / "q", base_source="tests/tiny", config=QuantConfig())
    with pytest.raises(GaqError, match="not the architecture"):
        load_quantized(folder, tiny_cond_unet)
    with pytest.raises(GaqError, match="weights .* differ"):
        load_quantized(folder, make_tiny_unet(seed=1))
    with pytest.raises(GaqError, match="not a gaq quantized-model folder"):
        load_quantized(tmp_path / "nothing", tiny_unet)

    st = folder / "quantized.safetensors"
    tensors = {k: v.clone() for k, v in load_file(str(st)).items()}  # no views of the file we damage below
    with safe_open(str(st), framework="pt") as f:
        header_meta = f.metadata()
    good = st.read_bytes()
    st.write_bytes(good[: len(good) // 2])
    with pytest.raises(GaqError, match="truncated or corrupt"):
        load_quantized(folder, tiny_unet)
    extra = dict(tensors, **{"up_blocks.9.conv.weight_codes": torch.zeros(3, dtype=torch.uint8)})
    save_file(extra, str(st), metadata=header_meta)
    with pytest.raises(GaqError, match="has 1 tensors the base model has no place for"):
        load_quantized(folder, tiny_unet)
    missing = {k: v for k, v in tensors.items() if k != "up_blocks.0.resnets.0.conv1.weight_codes"}
    save_file(missing, str(st), metadata=header_meta)
    with pytest.raises(GaqError, match="lacks 1 tensors"):
        load_quantized(folder, tiny_unet)
    reshaped = dict(tensors)
    reshaped["up_blocks.0.resnets.0.conv1.weight_scale"] = torch.ones(3, 1)
    save_file(reshaped, str(st), metadata=header_meta)
    with pytest.raises(GaqError, match="has shape"):
        load_quantized(folder, tiny_unet)
    save_file(tensors, str(st), metadata={**header_meta, "plan_sha256": "0" * 64})
    with pytest.raises(GaqError, match="different exports"):
        load_quantized(folder, tiny_unet)
    (folder / "quant_config.json").write_text("{not json")
    with pytest.raises(GaqError, match="corrupt"):
        load_quantized(folder, tiny_unet)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_code_packing_round_trip(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == packed_size(1001, bits)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_stored_weight_bytes_counts_bits_scales_and_fp_parts(tiny_unet):
    fp_bytes = sum(t.numel() * t.element_size() for t in tiny_unet.state_dict().values())
    for w_bits in (4, 8):
        q = quantize(tiny_unet, QuantConfig(w_bits=w_bits, a_bits=32, preset="brecq_compat", w_range=FAST))
        quant, fp = stored_weight_bytes(q)
        assert fp == fp_bytes
        layers = dict(iter_quant_layers(q))
        weight_fp_bytes = sum(4 * layer.weight.numel() for layer in layers.values())
        expected = fp_bytes - weight_fp_bytes + sum(
            packed_size(layer.weight.numel(), 8 if name in ("conv_in", "conv_out") else w_bits)
            + 2 * 4 * layer.weight.shape[0] for name, layer in layers.items())
        assert quant == expected
        assert quant < fp / (32 / w_bits) * 1.5
