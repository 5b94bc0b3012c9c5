"""gaq's Triton kernels (gaq.deploy.triton_kernels) against the exact references in gaq.deploy.kernels.

Run on the CPU under Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``); on a GPU the same
kernels are checked by ``bench/deploy.py``. With int8 activations the kernels accumulate in int32 and must
equal the integer reference bit for bit; weight-only kernels compute in the float dtype and match the float
reference within its rounding.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from gaq.deploy import DeployConfig, DeployedLayer, deploy, kernels, triton_kernels  # noqa: E402
from gaq.errors import GaqError  # noqa: E402

from test_deploy import _calibrated, _rel, _teacher_forced_errors, _timesteps, _unet  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_kernels.AVAILABLE, reason="gaq's Triton kernels cannot be imported here")


def _act_grid(batch, g):
    """A per-sample uint8 activation grid as the deployed layers pass it: (scale, zero, zero - offset, qmin, qmax, offset)."""
    scale = torch.rand(batch, generator=g) * 0.05 + 0.01
    zero = torch.randint(100, 156, (batch,), generator=g).float()
    return scale, zero, (zero - 128).to(torch.int32), 0, 255, 128


def _weights(n, k, bits, g, zero_points=True):
    """Signed weight codes, their kernel form (two int4 per byte or int8, with folded sums), per-channel scale / zero."""
    b = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (n, k), dtype=torch.int8, generator=g)
    zw = torch.randint(-2, 3, (n,), dtype=torch.int32, generator=g) * int(zero_points)
    sw = torch.rand(n, generator=g) * 0.1
    return b, triton_kernels.gemm_weights(b, bits, sw, zw), sw, zw


@pytest.mark.parametrize("bits,zero_points", [(4, True), (8, True), (8, False)])
@pytest.mark.parametrize("batch,rows,k,n,bias", [(2, 5, 37, 20, True), (1, 3, 64, 33, False), (3, 4, 70, 40, True)])
def test_linear_kernel_is_exact_with_int8_activations_and_close_weight_only(bits, zero_points, batch, rows, k, n, bias):
    g = torch.Generator().manual_seed(bits * 100 + k)
    x = torch.randn(batch * rows, k, generator=g)
    b, w, sw, zw = _weights(n, k, bits, g, zero_points)
    assert w.zero_free == (bits == 4 or not zero_points)
    grid = _act_grid(batch, g)
    scale, zero, row_zero = grid[:3]
    bb = torch.randn(n, generator=g) if bias else None
    a = kernels.activation_codes(x.reshape(batch, -1), scale, zero, 0, 255, 128).reshape(-1, k)
    acc = kernels.linear_reference(a, b, kernels.per_row(row_zero, rows), zw)
    ref = kernels.epilogue(acc.to(torch.int32), kernels.per_row(scale, rows), sw, bb, torch.float32)
    assert torch.equal(triton_kernels.linear(a, w, bb, rows, (scale, row_zero), torch.float32), ref)
    if bits == 4:  # unpacked per call (zero point folded into int8 codes), then the plain int8 GEMM
        flat = triton_kernels.unpacked(w)
        assert torch.equal(flat.codes, (b.to(torch.int32) - zw[:, None]).to(torch.int8)) and flat.zero_free
        assert torch.equal(triton_kernels.linear(a, flat, bb, rows, (scale, row_zero), torch.float32), ref)
    if not w.zero_free:  # the caller's row sums, as a deployed layer could pass them
        rowsum = a.sum(1, dtype=torch.int32)
        assert torch.equal(triton_kernels.linear(a, w, bb, rows, (scale, row_zero), torch.float32, rowsum), ref)
    y = triton_kernels.linear(x, w, bb, rows, None, torch.float32)
    w = (b.float() - zw[:, None].float()) * sw[:, None]
    torch.testing.assert_close(y, F.linear(x, w, bb), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,zero_points", [(4, True), (8, True), (8, False)])
@pytest.mark.parametrize("c,h,n,k,stride,pad", [(6, 5, 20, 3, 1, 1), (6, 7, 12, 3, 2, 1), (8, 4, 9, 1, 1, 0), (5, 4, 8, 3, 1, 1),
                                                (128, 3, 8, 3, 1, 1)])  # 128 channels: the unmasked channel loads
def test_conv_kernel_is_exact_with_int8_activations_and_close_weight_only(bits, zero_points, c, h, n, k, stride, pad):
    g = torch.Generator().manual_seed(bits * 100 + c * 10 + h)
    x = torch.randn(2, c, h, h + 1, generator=g).contiguous(memory_format=torch.channels_last)
    b, w, sw, zw = _weights(n, k * k * c, bits, g, zero_points)  # K ordered (kh, kw, c), as deploy stores it
    grid = _act_grid(2, g)
    scale, zero, row_zero = grid[:3]
    bb = torch.randn(n, generator=g)
    geometry = ((k, k), (stride, stride), (pad, pad))
    a = kernels.activation_codes(x, scale, zero, 0, 255, 128)
    acc = kernels.conv2d_reference(a, b, *geometry, row_zero, zw)
    ho, wo = acc.shape[2:]
    flat = acc.permute(0, 2, 3, 1).reshape(-1, n).to(torch.int32)
    ref = kernels.epilogue(flat, kernels.per_row(scale, ho * wo), sw, bb, torch.float32)
    y = triton_kernels.conv2d(a, w, *geometry, bb, (scale, row_zero), torch.float32)  # padding reads the row zero
    assert torch.equal(y, ref.reshape(2, ho, wo, n).permute(0, 3, 1, 2))
    y = triton_kernels.conv2d(x, w, *geometry, bb, None, torch.float32)
    w = ((b.float() - zw[:, None].float()) * sw[:, None]).reshape(n, k, k, c).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, F.conv2d(x, w, bb, stride, pad), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("a_bits,unpack", [(8, "in_kernel"), (8, "per_call"), (32, "in_kernel")])
def test_every_layer_on_the_triton_kernels_computes_its_fake_quantized_layer(a_bits, unpack, monkeypatch):
    q = _calibrated(_unet(), 4, a_bits)
    triton_only = DeployConfig(dtype="float32", linear_kernel="triton", conv_kernel="triton", weight_only_kernel="triton",
                               int4_unpack=unpack)
    d = deploy(copy.deepcopy(q), triton_only)
    calls = {"linear": 0, "conv2d": 0}
    for name in calls:  # count the calls that reach the kernels; the kernels themselves run unchanged
        kernel = getattr(triton_kernels, name)
        monkeypatch.setattr(triton_kernels, name, lambda *a, _k=kernel, _n=name, **kw: calls.__setitem__(_n, calls[_n] + 1)
                            or _k(*a, **kw))
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))  # small: the interpreter is slow
    errors = _teacher_forced_errors(q, d, lambda m: m(x, _timesteps()[1]))
    layers = [m for m in d.modules() if isinstance(m, DeployedLayer)]
    assert len(errors) == len(layers) and max(errors.values()) < 1e-5, max(errors.items(), key=lambda e: e[1])
    assert calls["conv2d"] > 0 and calls["linear"] > 0 and sum(calls.values()) >= len(layers), calls


def test_a_deployed_model_on_the_triton_kernels_compiles_to_the_same_function():
    # torch.compile sees the kernels as custom operators (gaq::triton_linear / gaq::triton_conv2d): Dynamo and
    # AOTAutograd trace them through their fake implementations (the aot_eager backend: Inductor's CPU code generation
    # took 55 s of this test on a cold cache, and it is not what runs on a GPU: bench/deploy.py's *_compile variants run
    # Inductor there, fusing the activation quantization into the ops around the kernels)
    q = _calibrated(_unet(), 4, 8, "qdiff_compat")
    d = deploy(copy.deepcopy(q), DeployConfig(dtype="float32", linear_kernel="triton", conv_kernel="triton"))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t = _timesteps()[1]
    with torch.no_grad():
        assert torch.equal(torch.compile(d, backend="aot_eager", fullgraph=True)(x, t).sample, d(x, t).sample)


def test_4bit_weights_whose_zero_points_do_not_fold_into_int8_run_exactly_in_their_int8_form():
    # a row of weights all of one sign with a narrow range: its zero point lies far outside the 4-bit grid
    g = torch.Generator().manual_seed(11)
    n, k, batch, rows = 12, 40, 2, 3
    b = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    zw = torch.randint(-2, 3, (n,), dtype=torch.int32, generator=g)
    zw[3], zw[7] = -400, 150
    sw = torch.rand(n, generator=g) * 0.1
    w = triton_kernels.gemm_weights(b, 4, sw, zw)
    assert not triton_kernels.int4_foldable(w)
    scale, zero, row_zero = _act_grid(batch, g)[:3]
    a = kernels.activation_codes(torch.randn(batch, rows * k, generator=g), scale, zero, 0, 255, 128).reshape(-1, k)
    acc = kernels.linear_reference(a, b, kernels.per_row(row_zero, rows), zw)
    ref = kernels.epilogue(acc.to(torch.int32), kernels.per_row(scale, rows), sw, None, torch.float32)
    assert torch.equal(triton_kernels.linear(a, triton_kernels.as_int8(w), None, rows, (scale, row_zero), torch.float32),
                       ref)
    from gaq.deploy.layers import _Part  # a deployed layer part with such weights takes the int8 form itself
    part = _Part((b.to(torch.int16) + 8).to(torch.uint8), 4, sw, (zw + 8).float(), None)
    assert not part.foldable and part.gemm().bits == 8 and torch.equal(part.gemm().codes, b)


@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_gemm_epilogue_hands_the_next_layer_its_input_codes(activation, bits):
    # linear_codes: the integer GEMM, the activation and the next quantizer's grid in one kernel; the codes equal
    # quantizing the float32 output (the epilogue multiplies by the reciprocal step: a code may move by one where
    # y / s lies within a rounding of a half-integer) and the row sums are the codes' own
    g = torch.Generator().manual_seed(21)
    batch, rows, k, n = 3, 5, 40, 24
    b, w, sw, zw = _weights(n, k, bits, g)
    scale, zero, row_zero, qmin, qmax, offset = _act_grid(batch, g)
    a = kernels.activation_codes(torch.randn(batch, rows * k, generator=g), scale, zero, qmin, qmax, offset).reshape(-1, k)
    bias = torch.randn(n, generator=g) * 0.1
    y = triton_kernels.linear(a, w, bias, rows, (scale, row_zero), torch.float32)
    y = {"none": y, "gelu": F.gelu(y), "gelu_tanh": F.gelu(y, approximate="tanh")}[activation]
    o_scale = y.reshape(batch, -1).abs().amax(dim=1) / 100
    o_zero = torch.tensor([120.0, 128.0, 131.0])
    ref = kernels.activation_codes(y.reshape(batch, -1), o_scale, o_zero, 0, 255, 128).reshape(-1, n)
    codes, sums = triton_kernels.linear_codes(a, w, bias, rows, (scale, row_zero), activation,
                                              (o_scale, o_zero, 0, 255, 128), True)
    assert codes.dtype == torch.int8 and codes.shape == ref.shape
    assert (codes.int() - ref.int()).abs().max() <= 1 and (codes == ref).float().mean() > 0.99
    assert torch.equal(sums, codes.sum(dim=1, dtype=torch.int32))


@pytest.mark.parametrize("bits,zero_points", [(4, True), (8, True), (8, False)])
@pytest.mark.parametrize("batch,rows,k,n", [(2, 5, 48, 20), (3, 7, 80, 40), (1, 3, 37, 33)])  # K 37: rows not aligned
def test_the_tma_kernel_computes_what_the_pointer_kernel_does(bits, zero_points, batch, rows, k, n, monkeypatch):
    # persistent over 4 programs in the interpreter, so the programs walk several output tiles; rows past M and
    # reduction indices past K read as zeros from the descriptors; a call that does not qualify takes the pointer kernel
    g = torch.Generator().manual_seed(bits * 10 + k)
    b, w, sw, zw = _weights(n, k, bits, g, zero_points)
    w = triton_kernels.unpacked(w) if bits == 4 else w
    scale, zero, row_zero, qmin, qmax, offset = _act_grid(batch, g)
    a = kernels.activation_codes(torch.randn(batch, rows * k, generator=g), scale, zero, qmin, qmax, offset).reshape(-1, k)
    bias = torch.randn(n, generator=g)
    acc = kernels.linear_reference(a, b, kernels.per_row(row_zero, rows), zw)
    ref = kernels.epilogue(acc.to(torch.int32), kernels.per_row(scale, rows), sw, bias, torch.float32)
    assert triton_kernels.tma_ready(a.device)
    launches, run = [], triton_kernels._linear_tma_tuned.run
    monkeypatch.setattr(triton_kernels._linear_tma_tuned, "run", lambda *x, **kw: launches.append(1) or run(*x, **kw))
    assert torch.equal(triton_kernels.linear(a, w, bias, rows, (scale, row_zero), torch.float32, tma=True), ref)
    out_grid = (torch.full((batch,), 0.05), torch.tensor([120.0, 128.0, 131.0])[:batch], qmin, qmax, offset)
    pointer = triton_kernels.linear_codes(a, w, bias, rows, (scale, row_zero), "gelu_tanh", out_grid, True)
    tma = triton_kernels.linear_codes(a, w, bias, rows, (scale, row_zero), "gelu_tanh", out_grid, True, tma=True)
    assert torch.equal(tma[0], pointer[0]) and torch.equal(tma[1], pointer[1])
    assert len(launches) == (0 if k % 16 else 2)


def test_deploy_gemm_loads_is_checked_and_auto_takes_tma_where_it_runs(monkeypatch):
    from types import SimpleNamespace
    from gaq.deploy.layers import DeployedLinear
    with pytest.raises(GaqError, match="gemm_loads"):
        DeployConfig(gemm_loads="cp.async")
    cpu = torch.device("cpu")  # the interpreter counts as a TMA device
    for loads, expected in [("auto", True), ("tma", True), ("pointer", False)]:
        assert DeployedLinear._tma(SimpleNamespace(config=DeployConfig(gemm_loads=loads)), cpu) is expected
    monkeypatch.setattr(triton_kernels, "INTERPRET", False)  # a CPU tensor outside the interpreter: no TMA
    assert not triton_kernels.tma_ready(cpu)
    assert DeployedLinear._tma(SimpleNamespace(config=DeployConfig(gemm_loads="auto")), cpu) is False


def _dit(preset="qdiff_compat", layers=2):
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    fp = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8,
                               num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                               norm_num_groups=8).eval()
    from test_deploy import STEPS
    return _calibrated(fp, preset=preset, shape=(4, 8, 8), cond={"class_labels": torch.arange(STEPS)})


def test_the_one_kernel_quantized_attention_computes_the_explicit_one(monkeypatch):
    from diffusers.models.attention_processor import Attention
    from gaq.deploy import DeployedAttnProcessor, triton_attention
    q = _dit()
    d = deploy(copy.deepcopy(q), DeployConfig(dtype="float32", linear_kernel="triton", attention_kernel="triton"))
    calls = []
    kernel = triton_attention.attention
    monkeypatch.setattr(triton_attention, "attention", lambda *a, **kw: calls.append(a[0].shape) or kernel(*a, **kw))
    attn = next(m for m in d.modules() if isinstance(m, Attention))
    proc = attn.processor
    assert isinstance(proc, DeployedAttnProcessor)
    d.gaq_quant.context.step_index = torch.tensor([0, 3, 1])  # per-sample grids
    g = torch.Generator().manual_seed(4)
    c = attn.to_q.in_features
    # one pass (the keys fit a block: the interpreter's blocks are 32 keys), two passes, keys of another length
    for lq, lk in ((20, 20), (45, 45), (20, 45)):
        h, enc = torch.randn(3, lq, c, generator=g), torch.randn(3, lk, c, generator=g)
        with torch.no_grad():
            proc.kernel = "triton"
            fused = proc.attention(attn, h, enc, None)
            proc.kernel = "explicit"
            ref = proc.attention(attn, h, enc, None)
        assert fused.shape == ref.shape == (3, lq, c)
        assert float((fused - ref).norm() / ref.norm()) < 1e-4
    assert len(calls) == 3
    with pytest.raises(GaqError, match="int8 codes"):
        triton_attention.attention(*(torch.zeros(1, 2, 4, 8),) * 3, torch.zeros(1, 8), 1.0, (0, 255), torch.float32)


def test_a_dit_deployed_with_the_fused_attention_and_feed_forward_predicts_what_the_fake_quantized_one_does():
    from gaq.deploy import DeployedAttnProcessor, DeployedFeedForward
    q = _dit()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t, labels = _timesteps()[1:3], torch.tensor([1, 2])
    with torch.no_grad():
        ref = q(x, timestep=t, class_labels=labels).sample
    fused = deploy(copy.deepcopy(q), DeployConfig(dtype="float32", linear_kernel="triton", attention_kernel="triton",
                                                  fuse_feedforward=True))
    assert sum(isinstance(m, DeployedFeedForward) for m in fused.modules()) == 2
    assert sum(isinstance(m, DeployedAttnProcessor) for m in fused.modules()) == 2
    with torch.no_grad():
        out = fused(x, timestep=t, class_labels=labels).sample
    assert float((out - ref).norm() / ref.norm()) < 1e-4
    plain = deploy(copy.deepcopy(q), DeployConfig(dtype="float32"))  # the defaults: neither fusion
    assert not any(isinstance(m, DeployedFeedForward) for m in plain.modules())
    with pytest.raises(GaqError, match="attention_kernel"):
        DeployConfig(attention_kernel="flash")
    with pytest.raises(GaqError, match="fuse_feedforward"):
        DeployConfig(fuse_feedforward="yes")


@pytest.mark.parametrize("residual,affine,modulate,consumers", [(True, False, True, 3), (False, True, False, 1),
                                                                (True, True, True, 2)])
def test_the_fused_norm_writes_the_codes_of_the_unfused_torch_ops(residual, affine, modulate, consumers):
    from gaq.deploy import triton_norm
    g = torch.Generator().manual_seed(5)
    b, t, c = 3, 5, 40
    x, branch = torch.randn(b * t, c, generator=g), torch.randn(b * t, c, generator=g)
    emb = torch.randn(b, 6 * c, generator=g)  # the chunks of an adaLN output: strided rows, as DiT hands them
    scale, shift, gate = emb[:, :c], emb[:, c:2 * c], emb[:, 2 * c:3 * c]
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    grids = [_act_grid(b, g)[:2] + (0, 255, 128), (torch.rand(1, generator=g) * 0.05 + 0.01, torch.zeros(1), -127, 127, 0),
             _act_grid(b, g)[:2] + (0, 255, 128)][:consumers]
    out = triton_norm.norm_codes(x, t, 1e-6, grids, weight=weight if affine else None, bias=bias if affine else None,
                                 scale=scale if modulate else None, shift=shift if modulate else None,
                                 branch=branch if residual else None, gate=gate if residual else None, rowsum=True,
                                 out_y=True)
    stream = (gate[:, None] * branch.view(b, t, c) + x.view(b, t, c)) if residual else x.view(b, t, c)
    y = F.layer_norm(stream, (c,), weight if affine else None, bias if affine else None, eps=1e-6)
    if modulate:
        y = y * (1 + scale[:, None]) + shift[:, None]
    assert (out.stream is None) != residual and (not residual or torch.equal(out.stream, stream.reshape(b * t, c)))
    torch.testing.assert_close(out.y, y.reshape(b * t, c), rtol=0, atol=1e-5)
    for (s, z, qmin, qmax, offset), codes, rowsum in zip(grids, out.codes, out.rowsums):
        ref = kernels.activation_codes(out.y.view(b, -1), s.expand(b), z.expand(b), qmin, qmax, offset).view(b * t, c)
        assert torch.equal(codes, ref) and torch.equal(rowsum, ref.sum(dim=1, dtype=torch.int32))
    assert len(out.codes) == consumers
    with pytest.raises(GaqError, match="consumers"):
        triton_norm.norm_codes(x, t, 1e-6, grids * 4)
    args = (x, None, None, None, None, None, None, t, 1e-6, [grids[0][0].float()], [grids[0][1].float()], [1], [0.0, 255.0, 128.0],
            False, False)
    torch.library.opcheck(torch.ops.gaq.norm_codes.default, args)  # the custom operator torch.compile sees


def test_a_dit_whose_norms_write_their_consumers_codes_predicts_what_the_unfused_one_does(monkeypatch):
    from gaq.deploy import DeployedAdaNormZeroBlock, triton_norm
    q = _dit("tfmq_compat", layers=1)  # attention operands not quantized: diffusers' processor, which the block runs
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t, labels = _timesteps()[1:3], torch.tensor([1, 2])
    config = dict(dtype="float32", linear_kernel="triton")
    plain = deploy(copy.deepcopy(q), DeployConfig(**config, fuse_norms=False))
    assert not any(isinstance(m, DeployedAdaNormZeroBlock) for m in plain.modules())
    calls = []
    kernel = triton_norm.norm_codes
    monkeypatch.setattr(triton_norm, "norm_codes", lambda *a, **kw: calls.append(len(a[3])) or kernel(*a, **kw))
    with torch.no_grad():
        ref, unfused = (m(x, timestep=t, class_labels=labels).sample for m in (q, plain))
    models, outs = {}, {}
    for fuse_feedforward in (False, True):  # fc1's output in memory, or fc2's codes from fc1's epilogue
        fused = models[fuse_feedforward] = deploy(copy.deepcopy(q), DeployConfig(**config, fuse_feedforward=fuse_feedforward))
        assert sum(isinstance(m, DeployedAdaNormZeroBlock) for m in fused.modules()) == 1
        assert list(fused.state_dict()) == list(plain.state_dict())  # the block adopts its own modules: same paths
        calls.clear()
        with torch.no_grad():
            out = outs[fuse_feedforward] = fused(x, timestep=t, class_labels=labels).sample
        assert calls == [3, 1]  # q / k / v, then the feed-forward's first layer
        # the same integers but where fc1's epilogue GELU (another float32 formula than torch's) rounds a code the
        # other way
        assert _rel(out, unfused) < 1e-4 and _rel(out, ref) < 1e-4
    # one graph under torch.compile, also at a second batch size (a dynamic batch: a graph break there left the norm's
    # launch to Dynamo as a user kernel, which failed to compile on the H200)
    compiled = torch.compile(models[False], backend="aot_eager", fullgraph=True)
    x3, t3, labels3 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4)), _timesteps()[:3], torch.arange(3)
    with torch.no_grad():
        assert _rel(compiled(x, timestep=t, class_labels=labels).sample, outs[False]) < 1e-6
        eager3 = models[False](x3, timestep=t3, class_labels=labels3).sample
        assert _rel(compiled(x3, timestep=t3, class_labels=labels3).sample, eager3) < 1e-6
    calls.clear()
    block = next(m for m in fused.modules() if isinstance(m, DeployedAdaNormZeroBlock))
    block.train()  # training mode: diffusers' forward
    with torch.no_grad():
        block(torch.randn(2, 16, 48), timestep=t, class_labels=labels)
    assert not calls
    with pytest.raises(GaqError, match="fuse_norms"):
        DeployConfig(fuse_norms="yes")
