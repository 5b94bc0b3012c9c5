"""GAC's sample weights and meta step (Algorithm 2) on tiny real blocks, in float64 where gradients are checked."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D
from torch import nn

from gaq.calib.gac import GACConfig, MetaStepInputs, meta_outer_loss, meta_step, meta_steps_before
from gaq.calib.weights import LearnedSampleWeights, UniformWeights
from gaq.errors import GaqError

F64 = torch.float64


def mse_per_sample(fmodel, batch):
    """Per-sample block loss: mean squared error between the unit's output and the FP target."""
    *inputs, target = batch
    return ((fmodel(*inputs) - target) ** 2).flatten(1).mean(1)


def perturbed_copy(fp: nn.Module, scale: float = 0.05) -> nn.Module:
    """A 'quantized' copy of ``fp``: same architecture, perturbed weights, everything frozen."""
    q = copy.deepcopy(fp)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(scale * torch.randn_like(p))
    for p in q.parameters():
        p.requires_grad_(False)
    return q


def make_problem(fp: nn.Module, inputs: list[torch.Tensor], n_train: int, num_groups: int, val_per_group: int,
                 batch_index: list[int], theta_of):
    """Training/validation batches of a block, learned weights with non-uniform logits, theta of the copy."""
    with torch.no_grad():
        target = fp(*inputs)
    q = perturbed_copy(fp)
    theta = theta_of(q)
    for p in theta:
        p.requires_grad_(True)
    idx = torch.tensor(batch_index)
    train = (*[x[idx] for x in inputs], target[idx])
    val = []
    for g in range(num_groups):
        sl = slice(n_train + g * val_per_group, n_train + (g + 1) * val_per_group)
        val.append((*[x[sl] for x in inputs], target[sl]))
    weights = LearnedSampleWeights(torch.arange(n_train)).to(F64)
    with torch.no_grad():
        weights.s.copy_(0.5 * torch.randn(n_train, dtype=F64))
    return dict(unit=q, theta=theta, train=train, val=val, idx=idx, weights=weights)


@pytest.fixture
def resnet_problem():
    """A diffusers ResnetBlock2D with time embedding; theta = its two conv weights (biases, norms frozen)."""
    torch.manual_seed(0)
    fp = ResnetBlock2D(in_channels=4, out_channels=4, temb_channels=8, groups=2).to(F64).eval()
    n_train, G, V = 10, 3, 2
    x = torch.randn(n_train + G * V, 4, 6, 6, dtype=F64)
    temb = torch.randn(n_train + G * V, 8, dtype=F64)
    return make_problem(fp, [x, temb], n_train, G, V, [0, 2, 3, 5, 7, 9],
                        lambda q: [q.conv1.weight, q.conv2.weight])


class SoftRoundConv(nn.Module):
    """An AdaRound-shaped layer: weight = scale * (floor + h(alpha)); alpha is the only learnable tensor."""

    def __init__(self, conv: nn.Conv2d, n_bits: int = 4):
        super().__init__()
        w = conv.weight.detach()
        scale = (w.amax(dim=(1, 2, 3), keepdim=True) - w.amin(dim=(1, 2, 3), keepdim=True)) / (2 ** n_bits - 1)
        self.register_buffer("scale", scale)
        self.register_buffer("w_floor", torch.floor(w / scale))
        rest = w / scale - self.w_floor
        self.alpha = nn.Parameter(-torch.log((1.2 - 0.1) / (rest + 0.1) - 1))  # h(alpha) = rest
        self.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.padding = conv.padding

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.alpha) * 1.2 - 0.1).clamp(0, 1)

    def forward(self, x):
        return nn.functional.conv2d(x, self.scale * (self.w_floor + self.h()), self.bias, padding=self.padding)

    def regulariser(self, beta: float = 2.0) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs() ** beta).sum()


@pytest.fixture
def adaround_problem():
    """Two soft-rounded convs with a SiLU; theta = the rounding logits; the AdaRound regulariser as extra loss."""
    torch.manual_seed(1)
    fp = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 3, 3, padding=1)).to(F64)
    q = nn.Sequential(SoftRoundConv(fp[0], n_bits=2), nn.SiLU(), SoftRoundConv(fp[2], n_bits=2))
    n_train, G, V = 8, 2, 3
    x = torch.randn(n_train + G * V, 3, 5, 5, dtype=F64)
    with torch.no_grad():
        for w in fp.parameters():  # targets further away than the rounding error alone
            w.add_(0.1 * torch.randn_like(w))
        target = fp(x)
    idx = torch.tensor([1, 2, 4, 6, 7])
    val = [(x[n_train + g * V: n_train + (g + 1) * V], target[n_train + g * V: n_train + (g + 1) * V]) for g in range(G)]
    weights = LearnedSampleWeights(torch.arange(n_train)).to(F64)
    with torch.no_grad():
        weights.s.copy_(0.5 * torch.randn(n_train, dtype=F64))
    return dict(unit=q, theta=[q[0].alpha, q[2].alpha], train=(x[idx], target[idx]), val=val, idx=idx,
                weights=weights, extra=lambda: 0.01 * (q[0].regulariser() + q[2].regulariser()))


def inputs_of(p, cfg, extra=None, val=None, **names):
    """The meta step's inputs of a test problem ``p`` (its own validation batches unless ``val``)."""
    return MetaStepInputs(unit=p["unit"], theta=p["theta"], per_sample_loss=mse_per_sample, train_batch=p["train"],
                          val_batches=p["val"] if val is None else val, cfg=cfg, extra_loss=extra, **names)


def outer_of_s(p, cfg, s, extra=None):
    w = p["weights"].weights(p["idx"], s=s.detach().clone().requires_grad_(True))
    outer, _ = meta_outer_loss(inputs_of(p, cfg, extra), w)
    return float(outer.detach())


def fd_gradient(p, cfg, extra=None, h=1e-5):
    s0 = p["weights"].s.detach()
    fd = torch.zeros_like(s0)
    for i in range(s0.numel()):
        e = torch.zeros_like(s0)
        e[i] = h
        fd[i] = (outer_of_s(p, cfg, s0 + e, extra) - outer_of_s(p, cfg, s0 - e, extra)) / (2 * h)
    return fd


def hypergrad(p, cfg, extra=None):
    return meta_step(inputs_of(p, cfg, extra), p["weights"], p["idx"])


# ---------------------------------------------------------------------------------------------- weights

@pytest.mark.parametrize("n", [1, 3, 49, 1000, 5120])
def test_uniform_logits_reproduce_uniform_weights_bit_for_bit(n):
    weights = LearnedSampleWeights(torch.arange(n))
    idx = torch.randint(0, n, (32,))
    w = weights.weights(idx)
    assert w.dtype == torch.float32 and bool((w == 1.0).all())
    losses = torch.rand(32) * 3
    uniform = UniformWeights().weights(idx)
    assert torch.equal((w * losses).mean(), (uniform * losses).mean())
    assert torch.equal((w * losses).mean(), losses.mean())
    assert torch.allclose(weights.all_weights(), n * weights.omega())


def test_weights_follow_global_indices_of_a_training_subset():
    train_idx = torch.tensor([3, 7, 10, 11, 20])  # the other indices are validation tuples
    weights = LearnedSampleWeights(train_idx)
    with torch.no_grad():
        weights.s.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0]))
    w = weights.weights(torch.tensor([7, 20, 3]))
    expected = 5 * torch.softmax(weights.s, 0)[torch.tensor([1, 4, 0])]
    assert torch.allclose(w, expected)
    assert abs(float(weights.all_weights().mean()) - 1.0) < 1e-6
    with pytest.raises(GaqError, match="not in the GAC training split"):
        weights.weights(torch.tensor([3, 4]))
    with pytest.raises(GaqError, match="not in the GAC training split"):
        weights.weights(torch.tensor([21]))


def test_weights_state_dict_reset_spread_and_adam_on_the_buffer():
    weights = LearnedSampleWeights(torch.tensor([0, 2, 4, 6]), s_init=1 / 32, tau=0.5)
    assert "s" in weights.state_dict() and "indices" in weights.state_dict()
    assert not any(True for _ in weights.parameters())  # never a parameter: DDP must not wait for its grad
    spread = weights.spread()
    assert spread["max_min_ratio"] == 1.0 and spread["normalized_entropy"] == pytest.approx(1.0)
    assert spread["entropy"] == pytest.approx(math.log(4))
    opt = torch.optim.Adam([weights.s], lr=0.1)
    weights.s.grad = torch.tensor([1.0, -1.0, 0.0, 0.0])
    opt.step()
    assert weights.s[1] > weights.s[2] > weights.s[0]
    spread = weights.spread()
    assert spread["max_min_ratio"] > 1.0 and spread["normalized_entropy"] < 1.0
    restored = LearnedSampleWeights(torch.tensor([0, 2, 4, 6]), tau=0.5)
    restored.load_state_dict(weights.state_dict())
    assert torch.equal(restored.weights(torch.tensor([2, 6])), weights.weights(torch.tensor([2, 6])))
    weights.reset()
    assert bool((weights.s == 1 / 32).all())


# ---------------------------------------------------------------------------------------------- meta step

@pytest.mark.parametrize("backend", ["higher", "functional"])
@pytest.mark.parametrize("alignment", ["cosine", "dot"])
def test_hypergradient_matches_finite_differences_on_a_resnet_block(resnet_problem, backend, alignment):
    cfg = GACConfig(hypergradient="nested", inner_lr=0.5, alignment=alignment, backend=backend,
                    gm_coef=1.0 if alignment == "cosine" else 1e4)
    grad, stats = hypergrad(resnet_problem, cfg)
    fd = fd_gradient(resnet_problem, cfg)
    assert grad.shape == resnet_problem["weights"].s.shape
    assert float(grad.norm()) > 1e-6
    assert float((grad - fd).norm() / grad.norm()) < 1e-5
    assert set(stats) >= {"outer", "inner_loss", "val_loss", "gm_loss", "alignment", "val_loss_group2"}


@pytest.mark.parametrize("backend", ["higher", "functional"])
def test_hypergradient_matches_finite_differences_with_adaround_logits_and_regulariser(adaround_problem, backend):
    p = adaround_problem
    cfg = GACConfig(hypergradient="nested", inner_lr=50.0, backend=backend)
    grad, _ = hypergrad(p, cfg, extra=p["extra"])
    fd = fd_gradient(p, cfg, extra=p["extra"])
    assert float(grad.norm()) > 1e-6
    assert float((grad - fd).norm() / grad.norm()) < 1e-5
    # the regulariser moves theta*, so it changes the hypergradient
    grad_plain, _ = hypergrad(p, cfg)
    assert not torch.allclose(grad, grad_plain)


def test_backends_agree(resnet_problem, adaround_problem):
    for p, cfg_kw, extra in [(resnet_problem, dict(inner_lr=0.5), None),
                             (adaround_problem, dict(inner_lr=50.0), adaround_problem["extra"])]:
        g_h, st_h = hypergrad(p, GACConfig(hypergradient="nested", backend="higher", **cfg_kw), extra)
        g_f, st_f = hypergrad(p, GACConfig(hypergradient="nested", backend="functional", **cfg_kw), extra)
        assert torch.allclose(g_h, g_f, rtol=1e-10, atol=1e-14)
        for k in st_h:
            assert torch.allclose(st_h[k], st_f[k], rtol=1e-10, atol=1e-14), k


def test_auto_backend_falls_back_to_functional_where_higher_cannot_patch():
    torch.manual_seed(2)
    fp = UNetMidBlock2D(in_channels=8, temb_channels=8, resnet_groups=4, attention_head_dim=4).to(F64).eval()
    x = torch.randn(10, 8, 4, 4, dtype=F64)
    temb = torch.randn(10, 8, dtype=F64)
    p = make_problem(fp, [x, temb], 6, 2, 2, [0, 1, 3, 5],
                     lambda q: [q.resnets[0].conv1.weight, q.attentions[0].to_q.weight])
    with pytest.raises(GaqError, match="gac.backend"):
        hypergrad(p, GACConfig(hypergradient="nested", backend="higher"))
    g_auto, _ = hypergrad(p, GACConfig(hypergradient="nested", backend="auto"))
    g_func, _ = hypergrad(p, GACConfig(hypergradient="nested", backend="functional"))
    assert float(g_func.norm()) > 1e-6
    assert torch.equal(g_auto, g_func)
    # attention runs on the math kernel inside the meta step: the fused ones have no double backward
    fd = fd_gradient(p, GACConfig(hypergradient="nested", backend="functional"))
    assert float((g_func - fd).norm() / g_func.norm()) < 1e-5


def test_meta_step_commits_nothing(resnet_problem):
    p = resnet_problem
    theta_before = [t.detach().clone() for t in p["theta"]]
    s_before = p["weights"].s.detach().clone()
    state_before = {k: v.clone() for k, v in p["unit"].state_dict().items()}
    hypergrad(p, GACConfig())
    assert all(torch.equal(a, b) for a, b in zip(theta_before, p["theta"]))
    assert all(t.grad is None for t in p["theta"])
    assert torch.equal(p["weights"].s, s_before) and p["weights"].s.grad is None
    assert all(torch.equal(v, p["unit"].state_dict()[k]) for k, v in state_before.items())


def test_adam_on_s_lowers_the_outer_loss(resnet_problem):
    p = resnet_problem
    cfg = GACConfig(inner_lr=0.5, meta_lr=0.05)
    opt = torch.optim.Adam([p["weights"].s], lr=cfg.meta_lr)
    first = None
    for step in range(15):
        grad_s, stats = hypergrad(p, cfg)
        first = float(stats["outer"]) if first is None else first
        p["weights"].s.grad = grad_s
        opt.step()
        opt.zero_grad()
    last = float(hypergrad(p, cfg)[1]["outer"])
    assert last < first - 1e-3


def test_meta_schedule_and_zero_meta_iters_keep_uniform_weights():
    assert [meta_steps_before(GACConfig(meta_iters=7), i) for i in range(3)] == [7, 0, 0]
    inter = GACConfig(meta_iters=3, interleave_every=4)
    assert [i for i in range(20) if meta_steps_before(inter, i)] == [0, 4, 8]
    off = GACConfig(meta_iters=0)
    assert sum(meta_steps_before(off, i) for i in range(100)) == 0
    assert sum(meta_steps_before(GACConfig(meta_iters=0, interleave_every=2), i) for i in range(100)) == 0
    weights = LearnedSampleWeights(torch.arange(40), s_init=off.s_init, tau=off.tau)
    assert bool((weights.weights(torch.arange(40)) == 1.0).all())


def test_non_finite_loss_names_the_unit_and_the_meta_step(resnet_problem):
    p = resnet_problem
    x, temb, y = p["val"][1]
    p["val"][1] = (x, temb, torch.full_like(y, float("nan")))
    with pytest.raises(GaqError, match=r"non-finite validation loss in GAC meta step 7 of unit 'down_blocks.0.resnets.0'"):
        meta_step(inputs_of(p, GACConfig(), unit_name="down_blocks.0.resnets.0", step=7), p["weights"], p["idx"])


@pytest.mark.parametrize("kwargs, key", [
    (dict(tau=0.0), "gac.tau"), (dict(meta_iters=-1), "gac.meta_iters"), (dict(inner_lr=0.0), "gac.inner_lr"),
    (dict(alignment="sine"), "gac.alignment"), (dict(meta_batch=0), "gac.meta_batch"),
    (dict(backend="jax"), "gac.backend"), (dict(jacobian_products="sideways"), "gac.jacobian_products"),
    (dict(batched_products="yes"), "gac.batched_products"), (dict(gm_coef=0.0, val_coef=0.0), "gac.gm_coef"),
])
def test_config_errors_are_one_line_and_name_the_key(kwargs, key):
    with pytest.raises(GaqError, match=key) as err:
        GACConfig(**kwargs)
    assert "\n" not in str(err.value)
    assert GACConfig(gm_coef=0.0).val_coef == 1.0


def test_one_validation_group_needs_the_gradient_matching_term_off(resnet_problem):
    p = resnet_problem
    one = [p["val"][0]]
    with pytest.raises(GaqError, match="gac.gm_coef"):
        meta_step(inputs_of(p, GACConfig(), val=one), p["weights"], p["idx"])
    grad, stats = meta_step(inputs_of(p, GACConfig(gm_coef=0.0, inner_lr=0.5), val=one), p["weights"], p["idx"])
    assert "alignment" not in stats and float(stats["outer"]) == float(stats["val_loss_group0"])
    assert float(grad.norm()) > 0


@pytest.mark.parametrize("alignment, gm_coef", [("cosine", 1.0), ("dot", 1e4), ("cosine", 0.0)])
def test_factored_hypergradient_equals_the_nested_one(resnet_problem, adaround_problem, alignment, gm_coef):
    """gac.hypergradient: factored computes the nested autograd's gradient from J, u_g and H_g products."""
    for p, inner_lr, extra in [(resnet_problem, 0.5, None), (adaround_problem, 50.0, adaround_problem["extra"])]:
        kw = dict(inner_lr=inner_lr, alignment=alignment, gm_coef=gm_coef, backend="functional")
        g_n, st_n = hypergrad(p, GACConfig(hypergradient="nested", **kw), extra)
        g_f, st_f = hypergrad(p, GACConfig(hypergradient="factored", **kw), extra)
        assert float(g_n.norm()) > 1e-8
        torch.testing.assert_close(g_f, g_n, rtol=1e-9, atol=1e-13)
        assert st_f.keys() == st_n.keys()
        for k in st_n:
            torch.testing.assert_close(st_f[k], st_n[k], rtol=1e-9, atol=1e-13, msg=k)


@pytest.mark.parametrize("batched", [False, True])
def test_forward_mode_jacobian_products_give_the_factored_hypergradient(resnet_problem, adaround_problem, batched):
    """gac.jacobian_products: forward computes J z by forward-mode AD (torch.func.jvp, vmapped with
    batched_products) and gives the double-VJP trick's hypergradient and stats."""
    for p, inner_lr, extra in [(resnet_problem, 0.5, None), (adaround_problem, 50.0, adaround_problem["extra"])]:
        g_rev, st_rev = hypergrad(p, GACConfig(inner_lr=inner_lr, jacobian_products="reverse"), extra)
        try:
            g_fwd, st_fwd = hypergrad(p, GACConfig(inner_lr=inner_lr, jacobian_products="forward",
                                                   batched_products=batched), extra)
        except GaqError as err:  # no batching rule for an op of the unit on this device
            assert batched and "gac.batched_products: false" in str(err) and "\n" not in str(err)
            continue
        assert float(g_rev.norm()) > 1e-8
        torch.testing.assert_close(g_fwd, g_rev, rtol=1e-9, atol=1e-13)
        for k in st_rev:
            torch.testing.assert_close(st_fwd[k], st_rev[k], rtol=1e-9, atol=1e-13, msg=k)


def test_batched_products_give_the_factored_hypergradient_or_one_clear_error(resnet_problem, adaround_problem):
    """gac.batched_products: the per-group products as one vmapped backward each give the looped numbers
    where PyTorch can batch the unit's backward (CUDA); where it cannot (some CPU ops), one GaqError."""
    for p, inner_lr, extra in [(resnet_problem, 0.5, None), (adaround_problem, 50.0, adaround_problem["extra"])]:
        g_loop, _ = hypergrad(p, GACConfig(inner_lr=inner_lr, jacobian_products="reverse", batched_products=False), extra)
        try:
            g_batched, _ = hypergrad(p, GACConfig(inner_lr=inner_lr, jacobian_products="reverse", batched_products=True),
                                     extra)
        except GaqError as err:
            assert "gac.batched_products: false" in str(err) and "\n" not in str(err)
            continue
        torch.testing.assert_close(g_batched, g_loop, rtol=1e-9, atol=1e-13)


# ---------------------------------------------------------------------------------------------- tied weights

def test_tied_logits_share_weights_and_pool_their_gradients():
    """gac.weight_per step/group: one logit per tie class; tuples of a class weigh the same, uniform logits
    are exactly 1, and the gradient of a tied logit is the sum of its tuples' untied gradients."""
    tie = torch.tensor([0, 0, 1, 2, 2, 2])
    tied, free = LearnedSampleWeights(torch.arange(6), tie=tie), LearnedSampleWeights(torch.arange(6))
    assert (tied.num_logits, tied.num_samples) == (3, 6)
    assert bool((tied.all_weights() == 1.0).all())
    with torch.no_grad():
        tied.s.copy_(torch.tensor([0.3, -0.2, 0.1]))
    w = tied.all_weights()
    assert torch.allclose(w[:2], w[0].expand(2)) and torch.allclose(w[3:], w[3].expand(3))
    assert abs(float(w.mean()) - 1.0) < 1e-6
    # the same weights as untied logits set to each tuple's shared value
    with torch.no_grad():
        free.s.copy_(tied.s[tie])
    assert torch.allclose(free.all_weights(), w)
    losses = torch.rand(6, dtype=torch.float64)
    s_tied = tied.s.detach().double().requires_grad_(True)
    s_free = tied.s.detach().double()[tie].requires_grad_(True)
    (g_tied,) = torch.autograd.grad((tied.all_weights(s_tied) * losses).sum(), s_tied)
    (g_free,) = torch.autograd.grad((free.all_weights(s_free) * losses).sum(), s_free)
    assert torch.allclose(g_tied, torch.zeros(3, dtype=torch.float64).index_add_(0, tie, g_free))
    with pytest.raises(GaqError, match="tie map"):
        LearnedSampleWeights(torch.arange(3), tie=torch.tensor([0, 2, 2]))  # logit 1 unused
    with pytest.raises(GaqError, match="weight_per"):
        GACConfig(weight_per="pixel")
