"""gaq.deploy: integer weights resident, integer GEMMs, the same function as the fake-quantized model.

The fake-quantized model is the reference. On the CPU the deployed model runs ``torch._int_mm`` and an
int8 im2col (the Triton kernels are tested in test_deploy_kernels.py under Triton's interpreter).
"""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DiTTransformer2DModel, UNet2DModel

import gaq
from gaq.deploy import DeployConfig, DeployedConv2d, DeployedLayer, DeployedLinear, deploy
from gaq.deploy import kernels
from gaq.deploy.layers import _int_mm_acc, _Part, im2col
from gaq.errors import GaqError
from gaq.quant import QuantConfig, QuantLayer, UncalibratedTimestepWarning, WeightRangeConfig, calibrate_activations, quantize, rounding_parameters

DEFAULT_UNET = Path(__file__).resolve().parents[1] / "checkpoints" / "default" / "unet"

FAST = WeightRangeConfig(method="minmax")
STEPS = 4


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
    ).eval()


def _timesteps():
    s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    s.set_timesteps(STEPS)
    return s.timesteps.clone()


def _calibrated(fp, w_bits=4, a_bits=8, preset="tfmq_compat", shape=(1, 16, 16), cond=None):
    ts = _timesteps()
    torch.manual_seed(1)
    q = quantize(fp, QuantConfig(w_bits=w_bits, a_bits=a_bits, preset=preset, w_range=FAST), timesteps=ts)
    with torch.no_grad():  # rounding off nearest, as after reconstruction
        for alpha in rounding_parameters(q):
            alpha.add_(torch.randn_like(alpha) * 2)
    g = torch.Generator().manual_seed(7)
    if a_bits < 32:
        calibrate_activations(q, [{"x": torch.randn(STEPS, *shape, generator=g), "t": ts, "step": torch.arange(STEPS),
                                   "cond": cond or {}} for _ in range(2)])
    return q


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _teacher_forced_errors(q, d, call):
    """Relative error of every deployed layer of ``d`` run on the input its fake-quantized twin in ``q`` saw
    during ``call(q)``, against that twin's output (with the step context ``q`` had)."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, (i[0], o)) and None)
             for n, m in q.named_modules() if isinstance(m, QuantLayer)]
    with torch.no_grad():
        call(q)
    for h in hooks:
        h.remove()
    d.gaq_quant.context.step_index = q.gaq_quant.context.step_index
    deployed = dict(d.named_modules())
    with torch.no_grad():
        return {n: _rel(deployed[n](i), o) for n, (i, o) in seen.items()}


@pytest.mark.parametrize("w_bits,a_bits,preset", [(4, 8, "tfmq_compat"), (8, 8, "tfmq_compat"), (4, 8, "qdiff_compat"),
                                                  (4, 32, "tfmq_compat")])
def test_every_deployed_layer_computes_its_fake_quantized_layer(w_bits, a_bits, preset):
    q = _calibrated(_unet(), w_bits, a_bits, preset)
    d = deploy(copy.deepcopy(q), DeployConfig(dtype="float32"))
    layers = [m for m in d.modules() if isinstance(m, DeployedLayer)]
    assert layers and all(m.integer for m in layers) == (a_bits == 8) and any(m.integer for m in layers) == (a_bits == 8)
    if preset == "qdiff_compat":
        assert any(len(m.parts) > 1 for m in layers)  # split shortcut inputs: one part per channel group
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    for t in _timesteps()[[0, 2]]:
        errors = _teacher_forced_errors(q, d, lambda m: m(x, t))
        assert len(errors) == len(layers) and max(errors.values()) < 1e-5, max(errors.items(), key=lambda e: e[1])


def test_deployed_default_model_predicts_what_the_fake_quantized_one_does():
    """End to end on the shipped (trained) model: within the fake model's own sensitivity to float32 rounding
    (an activation code at a rounding boundary may flip; integer accumulation itself is exact)."""
    fp = UNet2DModel.from_pretrained(str(DEFAULT_UNET)).eval()
    size, labels = fp.config.sample_size, torch.arange(STEPS)
    q = _calibrated(fp, shape=(1, size, size), cond={"class_labels": labels})
    d = deploy(copy.deepcopy(q), DeployConfig(dtype="float32"))
    x = torch.randn(STEPS, 1, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in _timesteps():
            assert _rel(d(x, t, class_labels=labels).sample, q(x, t, class_labels=labels).sample) < 5e-3


def test_deployed_codes_and_accumulators_are_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (5, 27), dtype=torch.int8, generator=g)  # M < 17, K not a multiple of 8
    b = torch.randint(-8, 8, (6, 27), dtype=torch.int8, generator=g)
    codes = (b.to(torch.int16) + 8).to(torch.uint8)
    part = _Part(codes, 4, torch.rand(6) + 0.1, torch.randint(0, 16, (6,)).float(), None)
    assert part.codes.dtype == torch.uint8 and part.codes.shape == (6, 14)  # two 4-bit codes per byte
    row_zero = torch.randint(-128, 128, (5,), dtype=torch.int32, generator=g)
    acc = _int_mm_acc(a, part, row_zero)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.double(), kernels.linear_reference(a, b, row_zero, part.col_zero))
    x = torch.randint(-128, 128, (2, 5, 7, 9), dtype=torch.int8, generator=g)
    w = torch.randint(-8, 8, (4, 3 * 3 * 5), dtype=torch.int8, generator=g)
    zx = torch.tensor([3, -20], dtype=torch.int32)
    cpart = _Part((w.to(torch.int16) + 8).to(torch.uint8), 4, torch.ones(4), torch.randint(0, 16, (4,)).float(), None)
    for stride, pad in [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((1, 2), (0, 1))]:
        cols, (ho, wo) = im2col(x, (3, 3), stride, pad, zx)
        acc = _int_mm_acc(cols, cpart, kernels.per_row(zx, ho * wo)).reshape(2, ho, wo, 4).permute(0, 3, 1, 2)
        assert torch.equal(acc.double(), kernels.conv2d_reference(x, w, (3, 3), stride, pad, zx, cpart.col_zero))


def test_weights_stay_resident_in_their_stored_form():
    q = _calibrated(_unet())
    fp_bytes = sum(layer.weight.numel() for _, layer in gaq.quant.iter_quant_layers(q)) * 2  # as bf16
    d = deploy(copy.deepcopy(q))
    code_bytes = sum(p.codes.numel() * p.codes.element_size() for m in d.modules() if isinstance(m, DeployedConv2d)
                     or isinstance(m, DeployedLinear) for p in m.parts)
    w8 = {n for n, _ in gaq.quant.iter_quant_layers(q) if _.spec.w_bits == 8}
    assert code_bytes <= fp_bytes / 3.5 or w8
    assert not any(isinstance(m, gaq.quant.QuantLayer) for m in d.modules())
    kinds = {t.dtype for n, t in d.named_buffers() if n.endswith(".codes")}
    assert kinds <= {torch.uint8, torch.int8}
    assert all(t.dtype == torch.bfloat16 for n, t in d.named_parameters())  # the FP parts in the compute dtype


def test_deployed_bf16_model_drops_into_a_ddim_pipeline():
    q = _calibrated(_unet())
    d = deploy(copy.deepcopy(q), DeployConfig(dtype="bfloat16"))

    def sample(unet):
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear"))
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            images = pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                          output_type="pt").images  # a bf16 model gives bf16 images, which numpy cannot hold
            return images.float().numpy()

    ref, out = sample(q), sample(d)
    mse = float(np.mean((ref - out) ** 2))
    assert np.isfinite(out).all() and 10 * np.log10(1.0 / max(mse, 1e-12)) > 30  # PSNR in dB, images in [0, 1]


def test_every_deployed_dit_layer_computes_its_fake_quantized_layer():
    torch.manual_seed(0)
    fp = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                               norm_num_groups=8).eval()
    q = _calibrated(fp, preset="qdiff_compat", shape=(4, 8, 8), cond={"class_labels": torch.arange(STEPS)})
    d = deploy(copy.deepcopy(q), DeployConfig(dtype="float32"))
    assert any(isinstance(m, DeployedLinear) and m.integer for m in d.modules())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = _timesteps()[1].expand(2)
    errors = _teacher_forced_errors(q, d, lambda m: m(x, timestep=t, class_labels=torch.tensor([1, 2])))
    assert max(errors.values()) < 1e-5


def test_deploy_refuses_what_it_cannot_run():
    q = _calibrated(_unet())
    d = deploy(copy.deepcopy(q))
    with pytest.raises(GaqError, match="already deployed"):
        deploy(d)
    with pytest.raises(GaqError, match="save the quantized model before gaq.deploy"):
        d.save_pretrained("/nonexistent")
    with pytest.raises(GaqError, match="not a gaq-quantized model"):
        deploy(_unet())
    with pytest.raises(GaqError, match="deploy.dtype"):
        DeployConfig(dtype="int8")
    uncal = quantize(_unet(), QuantConfig(w_bits=4, a_bits=8, w_range=FAST), timesteps=_timesteps())
    gaq.quant.set_quant_state(uncal, weight=True, act=True)
    with pytest.raises(GaqError, match="not calibrated"):
        deploy(uncal)


def test_triton_activation_quantizer_gives_the_reference_codes():
    pytest.importorskip("triton")
    from gaq.deploy import triton_quant
    if not triton_quant.AVAILABLE:
        pytest.skip("triton did not import")
    q = _calibrated(_unet())
    act = next(m for m in deploy(copy.deepcopy(q), DeployConfig(dtype="float32")).modules()
               if isinstance(m, DeployedLayer) and m.parts[0].act is not None).parts[0].act
    g = torch.Generator().manual_seed(0)
    for step in (torch.tensor([2]), torch.tensor([0, 3, 1])):
        q.gaq_quant.context.step_index = step
        act.context = q.gaq_quant.context
        scale, zero, _ = act.grid(3)
        x = torch.randn(3, 5, 6, 7, generator=g) * 3
        x[0, 0, 0, :3] = torch.tensor([0.5, 1.5, -2.5]) * scale[0]  # ties round to even
        for x_in in (x, x.contiguous(memory_format=torch.channels_last), x.to(torch.bfloat16)):
            out = triton_quant.quantize_codes(x_in, scale, zero, act.qmin, act.qmax, act.offset)
            shape = (scale.shape[0], 1, 1, 1)
            ref = (torch.clamp(torch.round(x_in.float() / scale.view(shape)) + zero.view(shape), act.qmin, act.qmax)
                   - act.offset).to(torch.int8)
            assert out.dtype == torch.int8 and torch.equal(out, ref) and out.stride() == x_in.stride()
            rows_in = x_in.reshape(3 * 5, 42)  # the rows of a linear layer: 5 per sample, with their sums
            codes, sums = triton_quant.quantize_rows(rows_in, scale, zero, 5, act.qmin, act.qmax, act.offset, True)
            assert torch.equal(codes, ref.reshape(15, 42)) and torch.equal(sums, ref.reshape(15, 42).sum(1, dtype=torch.int32))


def test_a_bf16_deployed_model_takes_float32_inputs_and_keeps_the_timestep_exact():
    q = _calibrated(_unet())
    d = deploy(copy.deepcopy(q), DeployConfig(dtype="bfloat16"))
    x = torch.randn(2, 1, 16, 16)
    seen = {}
    d.time_proj.register_forward_pre_hook(lambda m, args: seen.update(t=args[0]))
    with torch.no_grad(), pytest.warns(UncalibratedTimestepWarning):  # host timesteps are still checked
        out = d(x, torch.tensor([999.0, 1.0])).sample  # 999 is 1000 in bfloat16
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert seen["t"].dtype == torch.float32 and seen["t"].tolist() == [999.0, 1.0]


def test_the_step_lookup_holds_its_device_timesteps_from_deploy_not_from_a_compiled_call():
    # copies made inside torch.compile are a compiled graph's outputs: under CUDA graphs their memory is reused by the
    # next replay, so the lookup must not keep them (a later call read overwritten timesteps, seen on an H200)
    from gaq.quant.step_context import StepContext
    from gaq.quant.wrap import quant_info
    ctx = StepContext(torch.tensor([999.0, 500.0, 1.0]))
    lookup = torch.compile(ctx.steps_for_timesteps, backend="eager")
    assert lookup(torch.tensor([480.0, 2.0])).tolist() == [1, 2] and ctx._device_cache == {}
    ctx.keep_on("cpu")
    assert list(ctx._device_cache) == [torch.device("cpu")]
    d = deploy(copy.deepcopy(_calibrated(_unet())), DeployConfig(dtype="float32"))
    assert list(quant_info(d).context._device_cache) == [torch.device("cpu")]


def test_quantized_attention_operands_are_fake_quantized_in_one_pass_as_the_fake_quantizer_does():
    from gaq.deploy import DeployedFakeQuant, triton_quant
    from gaq.quant.quantizer import ActQuantizer
    q = _calibrated(_unet(), 4, 8, "qdiff_compat")
    fakes = {n: m for n, m in q.named_modules() if isinstance(m, ActQuantizer) and m.enabled and ".processor." in n}
    assert fakes, "the preset quantizes attention operands"
    d = deploy(copy.deepcopy(q), DeployConfig(dtype="bfloat16"))
    deployed = dict(d.named_modules())
    assert all(isinstance(deployed[n], DeployedFakeQuant) and deployed[n].scale.dtype == torch.float32 for n in fakes)
    g = torch.Generator().manual_seed(5)
    step = torch.tensor([0, 3, 1])
    q.gaq_quant.context.step_index = d.gaq_quant.context.step_index = step
    for name, fake in fakes.items():
        x = torch.randn(3, 2, 9, 8, generator=g) * 2
        ref = fake(x)  # float32, the reference
        assert torch.equal(deployed[name](x), ref) and deployed[name](x.to(torch.bfloat16)).dtype == torch.bfloat16
        if triton_quant.AVAILABLE:  # the one-pass kernel (Triton's interpreter here)
            s, z = deployed[name].step_grid(3)
            assert torch.equal(triton_quant.fake_quantize(x, s, z, fake.qmin, fake.qmax), ref)
