"""Model-level behaviour of gaq.quant.quantize on tiny real diffusers models."""
import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from gaq.errors import GaqError
from gaq.models.denoiser import predict_noise
from gaq.quant import (LayerOverride, QuantAttnProcessor, QuantConfig, QuantLayer, WeightRangeConfig, calibrate_activations,
                       iter_act_quantizers, iter_quant_layers, quant_info, quantize, resolve_config, rounding_parameters, set_quant_state,
                       set_step_index)
from gaq.quant.roles import CONCAT_UP_BLOCKS
from gaq.quant.step_context import UncalibratedTimestepWarning

TS = torch.tensor([900, 600, 300, 0])
FAST = WeightRangeConfig(method="minmax")  # for tests that are not about the range search


def _inputs(model, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, UNet2DConditionModel):
        x = torch.randn(batch, 4, 8, 8, generator=g)
        return x, {"encoder_hidden_states": torch.randn(batch, 5, 16, generator=g)}
    return torch.randn(batch, 1, 16, 16, generator=g), {"class_labels": torch.arange(batch) % 11}


def _batches(model, n=3, t=TS):
    out = []
    for i in range(n):
        x, cond = _inputs(model, len(t), seed=10 + i)
        out.append({"x": x, "t": t, "step": torch.arange(len(t)), "cond": cond})
    return out


def _conv_linear_paths(model):
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("which", ["tiny_unet", "tiny_cond_unet"])
def test_quantization_off_equals_fp_exactly(which, request):
    fp = request.getfixturevalue(which)
    x, cond = _inputs(fp)
    with torch.no_grad():
        ref = predict_noise(fp, x, TS, cond)
        q = quantize(fp, QuantConfig(preset="brecq_compat", w_range=FAST))
        assert len(list(iter_quant_layers(q))) == len(_conv_linear_paths(fp))
        set_quant_state(q, weight=False, act=False)
        assert torch.equal(predict_noise(q, x, TS, cond), ref)
        # with the quantizing attention processor the scores are computed explicitly: equal within 1e-5
        q2 = quantize(fp, QuantConfig(preset="qdiff_compat", w_range=FAST))
        set_quant_state(q2, weight=False, act=False)
        assert torch.allclose(predict_noise(q2, x, TS, cond), ref, atol=1e-5, rtol=0)
        set_quant_state(q2, weight=True, act=False)
        assert not torch.allclose(predict_noise(q2, x, TS, cond), ref, atol=1e-4)
    assert not any(isinstance(m, QuantLayer) for m in fp.modules())  # the FP model is untouched
    assert not fp._forward_pre_hooks_with_kwargs


@pytest.mark.parametrize("which", ["tiny_unet", "tiny_cond_unet"])
def test_quant_attention_processor_with_quantization_off_matches_diffusers(which, request):
    model = request.getfixturevalue(which)
    x, cond = _inputs(model)
    inputs = {}

    def grab(name):
        def hook(_m, args, kwargs):
            inputs.setdefault(name, (args, kwargs))
        return hook

    attns = {n: m for n, m in model.named_modules() if isinstance(m, Attention)}
    handles = [m.register_forward_pre_hook(grab(n), with_kwargs=True) for n, m in attns.items()]
    with torch.no_grad():
        predict_noise(model, x, TS, cond)
    for h in handles:
        h.remove()
    settings = resolve_config(QuantConfig(preset="qdiff_compat"))
    from gaq.quant.step_context import StepContext
    for name, attn in attns.items():
        args, kwargs = inputs[name]
        assert isinstance(attn.processor, AttnProcessor2_0)
        with torch.no_grad():
            ref = attn(*args, **kwargs)
            attn.set_processor(QuantAttnProcessor(8, 8, settings, StepContext()))
            out = attn(*args, **kwargs)
            attn.set_processor(AttnProcessor2_0())
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), name
    # cross-attention with a mask too
    cross = next(m for m in attns.values() if m.is_cross_attention) if which == "tiny_cond_unet" else None
    if cross is not None:
        h, enc = torch.randn(2, 6, 32), torch.randn(2, 5, 16)
        mask = torch.ones(2, 5)
        mask[0, 3:] = 0
        with torch.no_grad():
            ref = cross(h, encoder_hidden_states=enc, attention_mask=(mask - 1) * 1e4)
            cross.set_processor(QuantAttnProcessor(8, 8, settings, StepContext()))
            out = cross(h, encoder_hidden_states=enc, attention_mask=(mask - 1) * 1e4)
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_tfmq_preset_keeps_exactly_its_roles_fp(tiny_unet):
    q = quantize(tiny_unet, QuantConfig(preset="tfmq_compat", w_range=FAST), timesteps=TS)
    expected_fp = {"conv_in", "conv_out", "time_embedding.linear_1"}
    for name, m in tiny_unet.named_modules():
        if isinstance(m, ResnetBlock2D) and m.conv_shortcut is not None:
            expected_fp.add(f"{name}.conv_shortcut")
        if isinstance(m, Downsample2D):
            expected_fp.add(f"{name}.conv")
    quantized = {n for n, _ in iter_quant_layers(q)}
    assert quantized == _conv_linear_paths(tiny_unet) - expected_fp
    assert set(quant_info(q).plan.kept_fp) == expected_fp
    for n in expected_fp:
        assert type(q.get_submodule(n)) in (nn.Conv2d, nn.Linear)
    assert not any(isinstance(m, QuantAttnProcessor) for m in q.modules())
    assert all(layer.spec.split is None for _, layer in iter_quant_layers(q))
    assert {a.num_steps for _, a in iter_act_quantizers(q)} == {len(TS)}
    assert {layer.spec.w_bits for _, layer in iter_quant_layers(q)} == {4}
    # only rounding logits require grad
    trainable = [p for p in q.parameters() if p.requires_grad]
    assert trainable and all(any(p is r for r in rounding_parameters(q)) for p in trainable)


def test_qdiff_preset_quantizes_everything_splits_shortcuts_and_attention(tiny_unet):
    q = quantize(tiny_unet, QuantConfig(preset="qdiff_compat", w_range=FAST))
    assert {n for n, _ in iter_quant_layers(q)} == _conv_linear_paths(tiny_unet)
    attn = [m for m in q.modules() if isinstance(m, Attention)]
    assert attn and all(isinstance(m.processor, QuantAttnProcessor) for m in attn)
    assert {a.num_steps for _, a in iter_act_quantizers(q)} == {1}
    assert all(a.learn_step for _, a in iter_act_quantizers(q))
    split = {n: layer.spec.split for n, layer in iter_quant_layers(q) if layer.spec.split}
    up_resnets = [(n, r) for n, b in tiny_unet.named_modules() if isinstance(b, CONCAT_UP_BLOCKS)
                  for n, r in [(f"{n}.resnets.{j}", r) for j, r in enumerate(b.resnets)]]
    assert set(split) == {f"{n}.{c}" for n, _ in up_resnets for c in ("conv1", "conv_shortcut")}
    softmax = [p.softmax_quantizer for p in q.modules() if isinstance(p, QuantAttnProcessor)]
    assert {s.bits for s in softmax} == {8}


@pytest.mark.parametrize("which", ["tiny_unet", "tiny_cond_unet"])
def test_split_point_is_where_the_skip_connection_starts(which, request):
    """Trace the up blocks: the channels after the split point are exactly the popped skip tensor."""
    model = request.getfixturevalue(which)
    q = quantize(model, QuantConfig(preset="qdiff_compat", w_range=FAST))
    set_quant_state(q, weight=False, act=False)
    seen = []

    def on_block(block):
        def hook(_m, args, kwargs):
            skips = list(kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None))
            for resnet in block.resnets:
                conv = resnet.conv_shortcut
                skip = skips.pop()

                def check_input(_c, inp, _skip=skip, _conv=conv):
                    dec, sk = _conv.spec.split
                    assert inp[0].shape[1] == dec + sk
                    assert torch.equal(inp[0][:, dec:], _skip)
                    seen.append(_conv.spec.path)
                handles.append(conv.register_forward_pre_hook(check_input))
        return hook

    handles = []
    for b in q.modules():
        if isinstance(b, CONCAT_UP_BLOCKS):
            handles.append(b.register_forward_pre_hook(on_block(b), with_kwargs=True))
    x, cond = _inputs(model)
    with torch.no_grad():
        predict_noise(q, x, TS, cond)
    assert len(seen) == sum(1 for _, layer in iter_quant_layers(q) if layer.spec.split and "shortcut" in layer.spec.path)


def test_per_step_scales_follow_each_samples_timestep(tiny_unet):
    ts = torch.tensor([900, 600, 300, 0, 0])
    q = quantize(tiny_unet, QuantConfig(w_bits=8, a_bits=4, preset="tfmq_compat", w_range=FAST), timesteps=ts)
    calibrate_activations(q, _batches(tiny_unet, 2, ts))
    ctx = quant_info(q).context
    x, cond = _inputs(tiny_unet, 4)
    t = torch.tensor([0, 900, 620, 300])
    with torch.no_grad():
        with pytest.warns(UncalibratedTimestepWarning, match="timestep 620 .* timestep 600 \\(step 1\\)"):
            mixed = predict_noise(q, x, t, cond)
        assert ctx.step_index.tolist() == [3, 0, 1, 2]  # nearest step; repeated timestep 0 -> first step 3
        singles = torch.cat([predict_noise(q, x[i:i + 1], t[i:i + 1], {"class_labels": cond["class_labels"][i:i + 1]})
                             for i in range(4)])
        assert torch.allclose(mixed, singles, atol=1e-5)
        # the steps differ, so forcing one step for the whole batch changes the output
        quantizer = next(a for _, a in iter_act_quantizers(q))
        assert not torch.equal(quantizer.scale[0], quantizer.scale[2])
    set_step_index(q, torch.tensor([4, 1]))
    assert ctx.step_index.tolist() == [3, 1]
    with pytest.raises(GaqError, match="step indices"):
        set_step_index(q, torch.tensor([5]))


def test_unobserved_steps_take_the_nearest_observed_range(tiny_unet):
    ts = torch.tensor([900, 800, 300, 0])
    q = quantize(tiny_unet, QuantConfig(preset="tfmq_compat", w_range=FAST), timesteps=ts)
    stats = calibrate_activations(q, _batches(tiny_unet, 2, torch.tensor([900, 300, 900, 300])))
    assert stats["filled_steps"] == 2 * stats["quantizers"]
    for _, a in iter_act_quantizers(q):
        assert torch.equal(a.x_min[[1, 3]], a.x_min[[0, 2]]) and torch.equal(a.x_max[1], a.x_max[0])
    strict = quantize(tiny_unet, QuantConfig(preset="tfmq_compat", act_unobserved_steps="error", w_range=FAST),
                      timesteps=ts)
    with pytest.raises(GaqError, match="never appeared"):
        calibrate_activations(strict, _batches(tiny_unet, 1, torch.tensor([900, 300, 900, 300])))


def test_overrides_by_pattern_class_and_role(tiny_unet):
    cfg = QuantConfig(preset="tfmq_compat", w_range=FAST, overrides=[
        LayerOverride(pattern="up_blocks.*.resnets.0.conv1", w_bits=8),
        LayerOverride(module_class="TimestepEmbedding", keep_fp=True),
        LayerOverride(role="attn_qkv", a_bits=32),
        LayerOverride(role="shortcut", keep_fp=False, w_bits=6),
    ])
    q = quantize(tiny_unet, cfg, timesteps=TS)
    layers = dict(iter_quant_layers(q))
    assert layers["up_blocks.0.resnets.0.conv1"].spec.w_bits == 8 and layers["up_blocks.1.resnets.0.conv1"].spec.w_bits == 8
    assert layers["up_blocks.0.resnets.1.conv1"].spec.w_bits == 4
    assert "time_embedding.linear_2" not in layers and "time_embedding.linear_1" not in layers
    qkv = [layer for n, layer in layers.items() if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")]
    assert qkv and all(layer.input_quantizer is None for layer in qkv)
    assert layers["up_blocks.0.resnets.0.conv_shortcut"].spec.w_bits == 6


def test_bad_inputs_give_one_line_gaq_errors(tiny_unet, tmp_path):
    cases = [
        (QuantConfig(w_bits=1), "w_bits must be an integer in 2..8"),
        (QuantConfig(w_bits=9), "w_bits"),
        (QuantConfig(a_bits=16), "a_bits must be an integer in 4..8 or 32"),
        (QuantConfig(a_bits=3), "a_bits must be an integer in 4..8 or 32"),
        (QuantConfig(preset="no_such_preset"), "unknown quant preset 'no_such_preset'; available: .*tfmq_compat"),
        (QuantConfig(overrides=[LayerOverride(pattern="nothing.*", w_bits=8)]), "matches no convolution"),
        (QuantConfig(overrides=[LayerOverride(module_class="NoSuchBlock", keep_fp=True)]), "matches no convolution"),
        (QuantConfig(overrides=[LayerOverride(pattern="*", role="body", w_bits=8)]), "exactly one of"),
        (QuantConfig(overrides=[LayerOverride(pattern="*conv1")]), "changes nothing"),
        (QuantConfig(overrides=[LayerOverride(pattern="conv_in", split=True)]), "no shortcut split point"),
        (QuantConfig(keep_fp_roles=["first_layers"]), "unknown layer role 'first_layers'"),
        (QuantConfig(preset="tfmq_compat"), "pass timesteps="),
        (QuantConfig(act_ema_momentum=1.5), "act_ema_momentum"),
    ]
    for cfg, pattern in cases:
        with pytest.raises(GaqError, match=pattern) as err:
            quantize(tiny_unet, cfg)  # no timesteps
        assert "\n" not in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("keep_fp_roles: []\nfrobnicate: true\n")
    with pytest.raises(GaqError, match="unknown keys"):
        quantize(tiny_unet, QuantConfig(preset=str(bad)))
    q = quantize(tiny_unet, QuantConfig(preset="brecq_compat", w_range=FAST))
    with pytest.raises(GaqError, match="already quantized"):
        quantize(q, QuantConfig(preset="brecq_compat"))
    set_quant_state(q, weight=True, act=True)
    x, cond = _inputs(tiny_unet)
    with pytest.raises(GaqError, match="not calibrated"):
        predict_noise(q, x, TS, cond)


def test_default_state_and_deepcopy(tiny_unet):
    q = quantize(tiny_unet, QuantConfig(w_bits=4, a_bits=32, preset="brecq_compat", w_range=FAST))
    assert not list(iter_act_quantizers(q))  # weight-only
    assert all(layer.weight_quantizer.enabled for _, layer in iter_quant_layers(q))
    layers = dict(iter_quant_layers(q))
    assert layers["conv_in"].spec.w_bits == 8 and layers["conv_out"].spec.w_bits == 8  # BRECQ's 8-bit ends
    # a per-step model copies with its own step context (the root hook and the quantizers share the copy's)
    q = quantize(tiny_unet, QuantConfig(preset="tfmq_compat", w_range=FAST), timesteps=TS)
    calibrate_activations(q, _batches(tiny_unet, 1))
    q2 = copy.deepcopy(q)
    ctx2 = quant_info(q2).context
    assert ctx2 is not quant_info(q).context
    assert all(a.context is ctx2 for _, a in iter_act_quantizers(q2))
    x, cond = _inputs(tiny_unet)
    t = torch.tensor([0, 300, 600, 900])
    with torch.no_grad():
        assert torch.equal(predict_noise(q, x, t, cond), predict_noise(q2, x, t, cond))
    assert ctx2.step_index.tolist() == [3, 2, 1, 0]


def test_dit_roles_follow_the_model_structure():
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=11).eval()
    q = quantize(dit, QuantConfig(preset="tfmq_compat", w_range=FAST), timesteps=TS)
    assert set(quant_info(q).plan.kept_fp) == {
        "pos_embed.proj", "proj_out_2", *(f"transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1" for i in range(2))}
    q = quantize(dit, QuantConfig(preset="qdiff_compat", w_range=FAST))
    set_quant_state(q, weight=False, act=False)
    x, y = torch.randn(2, 4, 8, 8), {"class_labels": torch.tensor([1, 2])}
    with torch.no_grad():
        assert torch.allclose(predict_noise(q, x, TS[:2], y), predict_noise(dit, x, TS[:2], y), atol=1e-5)


def test_quantize_and_save_refuse_bad_input_in_one_line(tmp_path):
    """NaN weights, a non-module, float timesteps and a file where the export folder should go."""
    from conftest import make_tiny_unet

    from gaq.errors import GaqError
    from gaq.quant import save_quantized

    cfg = QuantConfig(w_bits=4, a_bits=8)
    with pytest.raises(GaqError, match="needs a torch module"):
        quantize("not a model", cfg)
    bad = make_tiny_unet()
    with torch.no_grad():
        next(bad.parameters())[0] = float("nan")
    with pytest.raises(GaqError, match="holds NaN or Inf values"):
        quantize(bad, cfg)
    with pytest.raises(GaqError, match="integer timesteps"):
        quantize(make_tiny_unet(), cfg, timesteps=torch.tensor([0.5, 1.5]))
    qmodel = quantize(make_tiny_unet(), QuantConfig(w_bits=4, a_bits=32))
    (tmp_path / "file").write_text("x")
    with pytest.raises(GaqError, match="is a file"):
        save_quantized(qmodel, tmp_path / "file")
