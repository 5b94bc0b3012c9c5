"""Quantizer-level behaviour: AdaRound, the weight-range search, activation quantizers, splits, beta schedule."""
import pytest
import torch

from gaq.errors import GaqError
from gaq.quant import ActQuantizer, AdaRoundQuantizer, BetaSchedule, SplitActQuantizer, StepContext, WeightRangeConfig
from gaq.quant.adaround import adaround_beta
from gaq.quant.quantizer import weight_range


def _weight(shape=(8, 6, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g)


def _nearest_reference(w, q):
    """Nearest rounding written out independently: floor + [residue >= 0.5], clamped, dequantized."""
    s, z = q.expanded(w.ndim)
    xs = w / s
    x_int = torch.floor(xs) + ((xs - torch.floor(xs)) >= 0.5).float()
    return (torch.clamp(x_int + z, 0, 2**q.bits - 1) - z) * s


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_adaround_init_hard_equals_nearest_rounding(bits):
    w = _weight()
    q = AdaRoundQuantizer(w, bits)
    hard = q(w)
    assert torch.equal(hard, _nearest_reference(w, q))
    q.rtn()
    assert torch.equal(q(w), hard)
    # the soft weight at init is the FP weight wherever the clamp does not bite
    q.learned()
    q.soft = True
    s, z = q.expanded(w.ndim)
    inside = (torch.floor(w / s) + z >= 0) & (torch.floor(w / s) + z + 1 <= 2**bits - 1)
    assert inside.float().mean() > 0.5  # 2-bit MSE ranges clip a fair share
    assert torch.allclose(q(w)[inside], w[inside], atol=1e-5)


def test_adaround_hard_rounding_stays_within_floor_and_ceil():
    w = _weight(seed=1)
    q = AdaRoundQuantizer(w, 4)
    with torch.no_grad():
        q.alpha.copy_(torch.randn_like(w) * 4)
    s, z = q.expanded(w.ndim)
    floor = torch.floor(w / s)
    codes = q.integer_codes(w).float()
    lo, hi = torch.clamp(floor + z, 0, 15), torch.clamp(floor + 1 + z, 0, 15)
    assert bool(((codes == lo) | (codes == hi)).all())
    assert bool((codes != lo).any()) and bool((codes != hi).any())  # random alpha rounds both ways
    assert torch.equal(q(w), (codes - z) * s)


def test_round_loss_values():
    w = _weight((4, 5))
    q = AdaRoundQuantizer(w, 4)
    with torch.no_grad():
        q.alpha.fill_(0.0)  # h = 0.5: every variable maximally undecided
    assert q.round_loss(2.0).item() == pytest.approx(w.numel())
    with torch.no_grad():
        q.alpha.copy_(torch.where(torch.rand_like(w) > 0.5, 50.0, -50.0))  # h in {0, 1}
    assert q.round_loss(2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert q.round_loss(20.0).requires_grad


def test_beta_schedule_is_brecq_linear_decay_after_warmup():
    sched = BetaSchedule(total=1000)
    assert sched(0) == 20.0 and sched(199) == 20.0 and not sched.active(199)
    assert sched.active(200) and sched(200) == pytest.approx(20.0)
    assert sched(600) == pytest.approx(11.0)
    assert sched(1000) == pytest.approx(2.0)
    assert adaround_beta(800, 1000, warmup=0.2, start=10, end=2) == pytest.approx(4.0)


def _peer_mse_range(row, bits, grid=80, shrink=0.01, p=2.4):
    """The peers' per-channel loop (one candidate at a time, strict < keeps the first best)."""
    x_min, x_max = row.min(), row.max()
    best, out = float("inf"), None
    for i in range(grid):
        lo, hi = x_min * (1 - i * shrink), x_max * (1 - i * shrink)
        delta = torch.clamp((hi - lo) / (2**bits - 1), min=1e-8)
        zp = torch.round(-lo / delta)
        xq = (torch.clamp(torch.round(row / delta) + zp, 0, 2**bits - 1) - zp) * delta
        score = (xq - row).abs().pow(p).mean().item()
        if score < best:
            best, out = score, (delta, zp)
    return out


@pytest.mark.parametrize("chunk", [1 << 24, 200])
def test_vectorised_mse_range_equals_the_per_channel_loop(chunk):
    w = _weight((6, 20), seed=3)
    w[2] = w[2].abs() + 0.1  # an all-positive channel
    scale, zp = weight_range(w, 4, WeightRangeConfig(chunk_elements=chunk))
    for c in range(w.shape[0]):
        delta, z = _peer_mse_range(w[c], 4)
        assert scale[c].item() == pytest.approx(delta.item(), rel=1e-6)
        assert zp[c].item() == z.item()


def test_split_weight_quantizer_equals_two_independent_quantizers():
    w = _weight((8, 10, 3, 3), seed=4)
    w[:, 6:] *= 5  # the two input groups have very different ranges
    split = AdaRoundQuantizer(w, 4, in_splits=[6, 4])
    a, b = AdaRoundQuantizer(w[:, :6].contiguous(), 4), AdaRoundQuantizer(w[:, 6:].contiguous(), 4)
    assert torch.equal(split(w), torch.cat([a(w[:, :6]), b(w[:, 6:])], dim=1))
    with torch.no_grad():
        split.alpha.copy_(torch.randn_like(w))
        a.alpha.copy_(split.alpha[:, :6])
        b.alpha.copy_(split.alpha[:, 6:])
    for soft in (True, False):
        for q in (split, a, b):
            q.soft = soft
        assert torch.allclose(split(w), torch.cat([a(w[:, :6]), b(w[:, 6:])], dim=1), atol=0, rtol=0)
    assert torch.equal(split.integer_codes(w), torch.cat([a.integer_codes(w[:, :6]), b.integer_codes(w[:, 6:])], 1))
    assert split.round_loss(3.0).item() == pytest.approx((a.round_loss(3.0) + b.round_loss(3.0)).item(), rel=1e-6)


def test_split_act_quantizer_equals_two_independent_quantizers():
    split = SplitActQuantizer([3, 5], [ActQuantizer(8), ActQuantizer(8)])
    a, b = ActQuantizer(8), ActQuantizer(8)
    batches = [torch.randn(4, 8, 5, 5) * torch.tensor([1.0] * 3 + [10.0] * 5).view(1, 8, 1, 1) for _ in range(3)]
    for q in (*split.parts, a, b):
        q.observing = True
    for x in batches:
        split(x), a(x[:, :3]), b(x[:, 3:])
    for q in (*split.parts, a, b):
        q.observing, q.enabled, q.ready = False, True, True
    x = batches[0]
    assert torch.equal(split(x), torch.cat([a(x[:, :3]), b(x[:, 3:])], dim=1))
    assert split.parts[1].scale.item() > 5 * split.parts[0].scale.item()
    with pytest.raises(GaqError):
        split(torch.randn(2, 7, 3, 3))


def test_act_quantizer_ema_range_and_grid():
    q = ActQuantizer(8, momentum=0.95)
    q.observing = True
    x1, x2 = torch.linspace(-1.0, 3.0, 50).view(2, 25), torch.linspace(-2.0, 1.0, 50).view(2, 25)
    q(x1)
    assert (q.x_min.item(), q.x_max.item()) == pytest.approx((-1.0, 3.0))  # first batch taken as is
    q(x2)
    assert q.x_min.item() == pytest.approx(0.95 * -1.0 + 0.05 * -2.0)
    assert q.x_max.item() == pytest.approx(0.95 * 3.0 + 0.05 * 1.0)
    scale = (q.x_max - q.x_min) / 255
    assert q.scale.item() == pytest.approx(scale.item())
    assert q.zero_point.item() == torch.round(-q.x_min / scale).item()
    q.observing, q.enabled, q.ready = False, True, True
    out = q(x1)
    levels = (out / q.scale + q.zero_point).round()
    assert torch.allclose(out / q.scale + q.zero_point, levels, atol=1e-3)
    assert (out - x1).abs().max() <= q.scale.item() / 2 + 1e-6 + (x1.max() - q.x_max).clamp(min=0)


def test_symmetric_act_quantizer_has_signed_grid_and_zero_point_zero():
    q = ActQuantizer(4, symmetric=True)
    q.observing, q.enabled = True, True
    x = torch.linspace(-3, 7, 101).view(1, -1)
    q(x)
    q.observing, q.ready = False, True
    assert q.zero_point.item() == 0 and q.scale.item() == pytest.approx(7 / 7)
    codes = (q(x) / q.scale).round()
    assert codes.min().item() == -3 and codes.max().item() == 7


def test_per_step_scales_select_each_samples_step():
    ctx = StepContext(torch.tensor([900, 500, 100]))
    q = ActQuantizer(8, num_steps=3, context=ctx)
    q.observing = True
    x = torch.stack([torch.full((2, 3), v) for v in (1.0, 10.0, 100.0, -5.0)])  # (4, 2, 3)
    x[:, 0, 0] = 0.0
    ctx.set(torch.tensor([0, 1, 2, 1]))
    q(x)
    assert q.x_max.tolist() == pytest.approx([1.0, 10.0, 100.0])
    assert q.x_min.tolist() == pytest.approx([0.0, -5.0, 0.0])
    assert q.count.tolist() == [1, 1, 1]
    q.observing, q.enabled, q.ready = False, True, True
    ctx.set(torch.tensor([2, 0, 1, 1]))
    y = torch.randn(4, 2, 3) * 20
    out = q(y)
    for i, s in enumerate([2, 0, 1, 1]):
        single = ActQuantizer(8)
        single.x_min.fill_(q.x_min[s].item())
        single.x_max.fill_(q.x_max[s].item())
        single.refresh_scale()
        single.enabled = single.ready = True
        assert torch.equal(out[i], single(y[i:i + 1])[0])
    ctx.set(None)
    with pytest.raises(GaqError, match="no step is set"):
        q(y)


def test_learned_step_size_gets_a_gradient_and_uncalibrated_use_fails():
    q = ActQuantizer(8, learn_step=True)
    assert isinstance(q.scale, torch.nn.Parameter)
    q.enabled = True
    with pytest.raises(GaqError, match="not calibrated"):
        q(torch.randn(3, 4))
    q.observing = True
    q(torch.randn(3, 4))
    q.observing, q.ready = False, True
    q(torch.randn(3, 4) * 2).pow(2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0


def test_step_context_maps_nearest_timestep_and_repeats_to_the_first():
    ctx = StepContext(torch.tensor([999, 500, 3, 0, 0, 0]))
    assert ctx.steps_for_timesteps(torch.tensor([0, 999, 2, 600, 1])).tolist() == [3, 0, 2, 1, 3]
    ctx.set(torch.tensor([4, 5, 1]))
    assert ctx.step_index.tolist() == [3, 3, 1]
    with pytest.raises(GaqError, match="step indices"):
        ctx.set(torch.tensor([6]))


def test_cached_hard_weight_follows_every_change():
    w = _weight(seed=5)
    q = AdaRoundQuantizer(w, 4)
    with torch.no_grad():
        first = q(w)
        assert q(w) is first  # cached while nothing changes
        q.alpha.neg_()  # flips every rounding decision
        flipped = q(w)
        assert not torch.equal(flipped, first)
        q.rtn()
        assert torch.equal(q(w), first)
        q.scale.mul_(2)
        assert not torch.equal(q(w), first)
    q.learned()
    q.soft = True
    out = q(w)  # soft with grad enabled: a fresh graph to alpha every call
    out.sum().backward()
    assert q.alpha.grad is not None and q(w) is not out
