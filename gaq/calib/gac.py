"""The meta step of gradient-aligned calibration (GAC, the paper's Algorithm 2) for one unit.

The reconstruction LightningModule owns the loop; this module gives it the maths of one meta step:

* :class:`MetaStepInputs` holds what one meta step is computed on (the unit, what it learns, its loss,
  the batches, the settings);
* :func:`meta_outer_loss` builds the outer loss ``L_VAL = gm_coef * L_GM2 + val_coef * mean_g L_g``
  as a differentiable function of the batch weights ``w`` (and thus of the logits ``s``);
* :func:`meta_step` turns it into the hypergradient ``d L_VAL / d s`` for the engine's Adam on ``s``;
* :func:`meta_steps_before` says how many meta steps to run before a reconstruction iteration.

Three levels of autograd: the inner gradient ``grad_theta sum_i w_i l_i / B`` (``create_graph``), the
weight-gradients ``G_g = dL_g(theta*)/dw`` (``create_graph``), and the final backward to ``s``.
The inner step is plain SGD as in the paper's Eq. 1: a fresh Adam inside the differentiable step
gives a meta-gradient ~1e7 times larger (its first step is sign-like; FACTS.md).

The unit and the per-sample loss (the contract of ``per_sample_loss``):
    ``per_sample_loss(fmodel, batch) -> Tensor[B]`` returns the per-sample reconstruction losses
    ``l_i = ||f_Q(x_i) - f_FP(x_i)||^2`` of a batch. ``fmodel(*args, **kwargs)`` runs the unit's
    forward with the parameters of the point being evaluated (``theta`` or the updated
    ``theta*``; every other parameter and buffer of the unit as it is). The callable must run
    the quantized unit *through* ``fmodel`` (not through the unit object) and must not detach
    its output; the FP targets come from the batch or from a separate FP module. ``batch`` is
    whatever the engine's DataModule yields: this module never looks inside it.

Backends (identical results): ``functional`` runs ``torch.func.functional_call`` with a parameter
dict in which only ``theta`` is replaced; ``higher`` runs ``higher.patch.monkeypatch`` with the
updated fast weights (non-theta parameters passed through untouched). ``auto`` tries ``higher``
and falls back to ``functional`` for modules higher cannot patch: diffusers' ``UNetMidBlock2D``
(and anything that contains one, such as a whole ``UNet2DModel``) slices a ``ModuleList``, which
builds a new instance of higher's patched class and fails with ``MonkeyPatched.__init__()
missing ... 'root'`` (FACTS.md). The fallback is remembered per unit.

Attention: the outer loss runs under ``sdpa_kernel(SDPBackend.MATH)``, because the fused kernels of
``scaled_dot_product_attention`` (flash, memory-efficient, CPU flash) have no double backward
("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented").

Distributed data parallel: every rank holds the whole ``s``; each rank computes the hypergradient on
its own meta batch with :func:`meta_step`; the engine averages ``grad_s`` over the ranks (e.g.
``self.trainer.strategy.reduce(grad_s, reduce_op="mean")``: DDP's hooks never see a gradient from
``torch.autograd.grad``), writes it to ``weights.s.grad`` and steps the same Adam on every rank, so
``omega`` stays identical everywhere.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gaq.calib.weights import LearnedSampleWeights
from gaq.errors import GaqError, check

log = logging.getLogger(__name__)

Backend = Literal["auto", "higher", "functional"]
# per_sample_loss(fmodel, batch) -> per-sample losses (B,); see the module docstring.
PerSampleLoss = Callable[[Callable[..., Any], Any], Tensor]
# extra_loss() -> scalar term of the inner objective that does not depend on the weights
# (e.g. the AdaRound rounding regulariser), evaluated at the current theta.
ExtraLoss = Callable[[], Tensor]
# at(unit, theta, theta_star) -> fmodel: the unit evaluated with theta replaced by theta_star
# (the look-ahead of one backend, see the module docstring).
LookAhead = Callable[[nn.Module, Sequence[Tensor], Sequence[Tensor]], Callable[..., Any]]


@dataclass
class GACConfig:
    """Settings of gradient-aligned calibration; paper values are the defaults, *(ours)* marks choices the paper leaves open.

    Attributes:
        meta_iters: meta steps per unit (paper: 1500); 0 turns the weighting off (uniform weights).
        meta_lr: Adam learning rate on the logits ``s`` (paper: 5e-6).
        inner_lr: eta of the differentiable inner SGD step *(ours)*. Default 1e-3, the learning
            rate of the reconstruction's own Adam on the rounding logits, so the look-ahead ``theta*``
            moves on the scale the reconstruction moves; the cosine term is invariant to eta to first
            order, eta only scales the validation term's hypergradient.
        meta_batch: training tuples per meta step, B (paper: 32).
        tau: softmax temperature of ``omega = softmax(s / tau)`` (paper: 1).
        s_init: initial value of every logit (paper: 1/32).
        alignment: ``cosine`` (default *(ours)*) or raw ``dot`` between the groups' weight-gradients
            ``G_g``; raw dots are ~eta-small and vanish next to the validation term.
        align_eps: floor of ``||G_g||`` in the cosine *(ours)*; only a zero vector ever reaches it.
        gm_coef: coefficient of ``L_GM2`` in the outer loss (paper: 1).
        val_coef: coefficient of ``mean_g L_g`` in the outer loss (paper: 1).
        carry_over: keep ``s`` from one unit to the next instead of resetting it *(ours)*.
        weight_per: what one learned logit weighs: ``sample`` (the paper: one per training tuple),
            ``step`` (one per kept timestep, shared by its tuples) or ``group`` (one per contiguous
            timestep group, ``data.split.num_groups``) *(ours)*. Adam moves each logit by at most
            about ``meta_lr`` per step whatever it weighs, so tying does not let the weights move
            further; it pools the hypergradient of many tuples into fewer, less noisy directions.
        weight_time_unit: learn weights for the time-embedding unit too (default: uniform) *(ours)*.
        grouping: ``contiguous`` timestep groups (paper) or ``adaptive`` (by gradient similarity) *(ours)*;
            the number of groups G (paper: 5) is the DataModule's ``split.num_groups``, and ``L_GM2``
            needs G >= 2 unless ``gm_coef`` is 0.
        adaptive_contiguous: adaptive groups are contiguous runs of kept steps *(ours)*.
        val_per_group: validation tuples per timestep group in each meta step, drawn afresh every step
            (a stochastic estimate of the group losses, cheaper by about the same factor); None: all
            of the group's validation tuples, as the paper *(ours)*.
        interleave_every: 0 runs all meta steps before the unit's reconstruction (paper); k > 0 runs
            one meta step every k reconstruction iterations, at most ``meta_iters`` in all *(ours)*.
        backend: ``auto``, ``higher`` or ``functional`` (see the module docstring).
        hypergradient: ``factored`` (default) computes the exact hypergradient from
            ``G_g = -(eta/B) J u_g`` and its derivative ``(eta/B)^2 J H_g J^T`` (see
            :func:`_factored_grad_w`), without the third-order graph, always through
            ``torch.func.functional_call``: the same gradient as ``nested`` (to 1e-9 in float64, tested)
            at about 0.4-0.7 of its time; ``nested`` differentiates through the look-ahead step (three
            levels of autograd, with ``backend``: ``higher`` or ``functional``; the paper's Algorithm 2 as
            written) *(ours)*.
        batched_products: ``factored`` only: run the per-group products ``J u_g`` and ``J^T c_g`` as one
            vmapped backward each (``torch.autograd.grad(..., is_grads_batched=True)``) instead of one
            backward per group; with ``jacobian_products: forward``, ``J u_g`` as one vmapped forward-mode
            product. The same numbers. ``true`` raises a one-line error where PyTorch cannot batch a unit's
            ops (some CPU backward ops); ``auto`` (default) batches where the meta step runs on CUDA and falls
            back to one product per group, once per unit, where batching fails *(ours)*.
        jacobian_products: ``factored`` only: how the products ``J z`` with the per-sample Jacobian of the
            training losses are computed. ``reverse``: the double-VJP trick (a backward through a
            backward graph per direction); ``forward``: forward-mode AD (``torch.func.jvp``: one forward
            pass carrying the tangent ``z`` per direction, no graph of the training backward). The same
            numbers (tested). Default ``forward``: on an H200, with ``batched_products``, a CIFAR ResBlock's meta
            step took 29.9 ms against 33.4 ms (double-VJP, batched or not) *(ours)*.
    """

    meta_iters: int = 1500
    meta_lr: float = 5e-6
    inner_lr: float = 1e-3
    meta_batch: int = 32
    tau: float = 1.0
    s_init: float = 1.0 / 32
    alignment: Literal["cosine", "dot"] = "cosine"
    align_eps: float = 1e-12
    gm_coef: float = 1.0
    val_coef: float = 1.0
    carry_over: bool = False
    weight_per: Literal["sample", "step", "group"] = "sample"
    weight_time_unit: bool = False
    grouping: Literal["contiguous", "adaptive"] = "contiguous"
    adaptive_contiguous: bool = True
    interleave_every: int = 0
    val_per_group: int | None = None
    backend: Backend = "auto"
    hypergradient: Literal["nested", "factored"] = "factored"
    batched_products: bool | Literal["auto"] = "auto"
    jacobian_products: Literal["reverse", "forward"] = "forward"

    def __post_init__(self) -> None:
        check(self.meta_iters >= 0, f"gac.meta_iters must be >= 0, got {self.meta_iters}")
        check(self.meta_lr > 0, f"gac.meta_lr must be > 0, got {self.meta_lr}")
        check(self.inner_lr > 0, f"gac.inner_lr must be > 0, got {self.inner_lr}")
        check(self.meta_batch >= 1, f"gac.meta_batch must be >= 1, got {self.meta_batch}")
        check(self.tau > 0, f"gac.tau must be > 0, got {self.tau}")
        check(self.alignment in ("cosine", "dot"), f"gac.alignment must be 'cosine' or 'dot', got {self.alignment!r}")
        check(self.align_eps > 0, f"gac.align_eps must be > 0, got {self.align_eps}")
        check(self.gm_coef >= 0 and self.val_coef >= 0, "gac.gm_coef and gac.val_coef must be >= 0")
        check(self.gm_coef > 0 or self.val_coef > 0, "gac.gm_coef and gac.val_coef cannot both be 0 (nothing to learn)")
        check(self.weight_per in ("sample", "step", "group"),
              f"gac.weight_per must be 'sample', 'step' or 'group', got {self.weight_per!r}")
        check(self.grouping in ("contiguous", "adaptive"),
              f"gac.grouping must be 'contiguous' or 'adaptive', got {self.grouping!r}")
        check(self.interleave_every >= 0, f"gac.interleave_every must be >= 0, got {self.interleave_every}")
        check(self.val_per_group is None or self.val_per_group >= 1,
              f"gac.val_per_group must be >= 1 or null (all), got {self.val_per_group}")
        check(self.hypergradient in ("nested", "factored"),
              f"gac.hypergradient must be 'nested' or 'factored', got {self.hypergradient!r}")
        check(self.batched_products in (True, False, "auto"),
              f"gac.batched_products must be true, false or 'auto', got {self.batched_products!r}")
        check(self.jacobian_products in ("reverse", "forward"),
              f"gac.jacobian_products must be 'reverse' or 'forward', got {self.jacobian_products!r}")
        check(self.backend in ("auto", "higher", "functional"),
              f"gac.backend must be 'auto', 'higher' or 'functional', got {self.backend!r}")


@dataclass(frozen=True, eq=False)
class MetaStepInputs:
    """What one GAC meta step is computed on: everything but the sample weights being differentiated.

    Attributes:
        unit: the reconstruction unit (quantized block) in its current state.
        theta: the parameters the reconstruction learns (AdaRound rounding logits, step sizes), a
            subset of ``unit.parameters()``; the unit may hold other frozen parameters and buffers.
            Left unchanged: the look-ahead ``theta*`` exists only inside the graph.
        per_sample_loss: ``per_sample_loss(fmodel, batch) -> (B,)``, see the module docstring.
        train_batch: the B training tuples of the meta batch.
        val_batches: one batch of validation tuples per timestep group, in group order.
        cfg: the GAC settings (``inner_lr``, ``alignment``, coefficients, ``backend``, ``hypergradient``).
        extra_loss: a term of the inner objective that does not depend on the weights (the AdaRound
            regulariser), evaluated at ``theta``; None: no such term.
        unit_name: names the unit in error messages.
        step: the meta step's number, for error messages.
    """

    unit: nn.Module
    theta: Sequence[Tensor]
    per_sample_loss: PerSampleLoss
    train_batch: Any
    val_batches: Sequence[Any]
    cfg: GACConfig
    extra_loss: ExtraLoss | None = None
    unit_name: str = "unit"
    step: int = 0


def meta_steps_before(cfg: GACConfig, recon_iter: int) -> int:
    """How many meta steps the engine runs just before reconstruction iteration ``recon_iter`` (0-based).

    ``interleave_every == 0``: all ``meta_iters`` before iteration 0, none after. ``k > 0``: one
    before every k-th iteration (0, k, 2k, ...) until ``meta_iters`` have run. ``meta_iters == 0``
    gives 0 everywhere: the weights stay uniform.
    """
    if cfg.interleave_every == 0:
        return cfg.meta_iters if recon_iter == 0 else 0
    k = cfg.interleave_every
    return int(recon_iter % k == 0 and recon_iter // k < cfg.meta_iters)


# ----------------------------------------------------------------------------------------------
# Evaluating the unit at the look-ahead parameters theta*
# ----------------------------------------------------------------------------------------------

class _FunctionalUnit:
    """Calls ``unit`` with some of its parameters replaced (``torch.func.functional_call``)."""

    def __init__(self, unit: nn.Module, params: dict[str, Tensor]):
        self.unit, self.params = unit, params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.unit, self.params, args, kwargs)


def _theta_names(unit: nn.Module, theta: Sequence[Tensor]) -> list[str]:
    """Parameter name of each tensor of ``theta`` inside ``unit``."""
    name_of = {id(p): n for n, p in unit.named_parameters()}
    missing = [i for i, p in enumerate(theta) if id(p) not in name_of]
    if missing:
        raise ValueError(f"theta[{missing[0]}] is not a parameter of the unit {type(unit).__name__}")
    return [name_of[id(p)] for p in theta]


def _functional_at(unit: nn.Module, theta: Sequence[Tensor], theta_star: Sequence[Tensor]) -> Callable[..., Any]:
    return _FunctionalUnit(unit, dict(zip(_theta_names(unit, theta), theta_star)))


def _higher_at(unit: nn.Module, theta: Sequence[Tensor], theta_star: Sequence[Tensor]) -> Callable[..., Any]:
    import higher  # optional at import time: ``auto`` works without it

    position = {id(p): i for i, p in enumerate(unit.parameters())}
    _theta_names(unit, theta)  # same error as the functional backend for a foreign tensor
    fast = list(unit.parameters())
    for p, p_star in zip(theta, theta_star):
        fast[position[id(p)]] = p_star
    fmodel = higher.patch.monkeypatch(unit, copy_initial_weights=False, track_higher_grads=True)
    fmodel.update_params(fast)
    return fmodel


def _is_higher_patch_failure(err: BaseException) -> bool:
    return isinstance(err, TypeError) and "MonkeyPatched" in str(err)


# units on which higher failed once under backend="auto"; they go straight to functional after
_HIGHER_UNSUPPORTED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _higher_available() -> bool:
    try:
        import higher  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# The outer loss
# ----------------------------------------------------------------------------------------------

def _pairwise_alignment(G: Tensor, cfg: GACConfig) -> Tensor:
    """Mean over pairs g < h of cos(G_g, G_h) (or the raw dot); ``G`` is ``(num_groups, B)``."""
    if cfg.alignment == "cosine":
        G = G / torch.linalg.vector_norm(G, dim=1, keepdim=True).clamp_min(cfg.align_eps)
    gram = G @ G.T
    i, j = torch.triu_indices(G.shape[0], G.shape[0], offset=1, device=G.device)
    return gram[i, j].mean()


def _train_losses(unit: nn.Module, per_sample_loss: PerSampleLoss, train_batch: Any, w: Tensor) -> Tensor:
    """The per-sample losses of the meta batch at ``theta``, one per weight."""
    losses = per_sample_loss(unit, train_batch)
    if losses.shape != w.shape:
        raise ValueError(f"per_sample_loss returned shape {tuple(losses.shape)} for weights of shape {tuple(w.shape)}")
    return losses


def _check_val_batches(inputs: MetaStepInputs) -> None:
    """One validation batch per group, and at least two groups when the gradient-matching term is on."""
    val_batches, cfg = inputs.val_batches, inputs.cfg
    check(len(val_batches) >= 1, "GAC needs at least one validation batch per meta step; enlarge the validation split")
    check(len(val_batches) >= 2 or cfg.gm_coef == 0,
          "GAC's gradient-matching term needs validation batches of at least 2 timestep groups (or set gac.gm_coef: 0)")


def _outer_parts(inputs: MetaStepInputs, w: Tensor, at: LookAhead) -> dict[str, Tensor]:
    """Every differentiable piece of the outer loss at the weights ``w``, evaluated with the look-ahead builder ``at``."""
    unit, theta, per_sample_loss, cfg = inputs.unit, inputs.theta, inputs.per_sample_loss, inputs.cfg
    train_batch, val_batches, extra_loss = inputs.train_batch, inputs.val_batches, inputs.extra_loss
    # 1. inner step: theta* = theta - eta * grad_theta (sum_i w_i l_i / B + extra)
    losses = _train_losses(unit, per_sample_loss, train_batch, w)
    inner = (w * losses).sum() / w.numel()
    objective = inner if extra_loss is None else inner + extra_loss()
    grads = torch.autograd.grad(objective, list(theta), create_graph=True, allow_unused=True, materialize_grads=True)
    theta_star = [p - cfg.inner_lr * g for p, g in zip(theta, grads)]
    fmodel = at(unit, theta, theta_star)
    # 2. per-group validation losses at theta*
    val = torch.stack([per_sample_loss(fmodel, vb).mean() for vb in val_batches])
    parts = {"inner": inner, "val": val}
    # 3.-4. weight-gradients G_g = dL_g/dw and their pairwise alignment
    if cfg.gm_coef > 0:
        G = torch.stack([
            torch.autograd.grad(L_g, w, create_graph=True, retain_graph=True, allow_unused=True, materialize_grads=True)[0]
            for L_g in val
        ])
        alignment = _pairwise_alignment(G, cfg)
        parts["alignment"] = alignment
        parts["weight_grad_norm"] = torch.linalg.vector_norm(G.detach(), dim=1).mean()
        gm = -alignment
    else:
        gm = val.new_zeros(())
    parts["gm"] = gm
    # 5. outer loss
    parts["outer"] = cfg.gm_coef * gm + cfg.val_coef * val.mean()
    return parts


def _vjp_then_jvp(losses: Tensor, theta: Sequence[Tensor],
                  batched: bool = False) -> Callable[[Sequence[Sequence[Tensor]]], Tensor]:
    """``[z_1, ..., z_n] -> [J z_1, ..., J z_n]`` (``(n, B)``) for the per-sample Jacobian
    ``J = d losses / d theta`` (``(B, P)``), by the double-VJP trick: ``J^T v`` is linear in ``v``, so
    ``J z`` is the gradient of ``<J^T v, z>`` with respect to ``v``. One backward per direction, or with
    ``batched`` all directions in one vmapped backward (``is_grads_batched``; PyTorch has no batching rule
    for some ops of real units on the CPU)."""
    v = torch.zeros_like(losses, requires_grad=True)
    jt_v = torch.autograd.grad(losses, list(theta), grad_outputs=v, create_graph=True, allow_unused=True,
                               materialize_grads=True)

    def jvp(zs: Sequence[Sequence[Tensor]]) -> Tensor:
        if batched:
            return _batched_grad(jt_v, [v], [torch.stack([z[i] for z in zs]) for i in range(len(jt_v))])[0]
        return torch.stack([torch.autograd.grad(sum((a * b).sum() for a, b in zip(jt_v, z)), v, retain_graph=True)[0]
                            for z in zs])

    return jvp


def _forward_jvp(inputs: MetaStepInputs, batched: bool = False) -> Callable[[Sequence[Sequence[Tensor]]], Tensor]:
    """``[z_1, ..., z_n] -> [J z_1, ..., J z_n]`` (``(n, B)``) like :func:`_vjp_then_jvp`, by forward-mode
    AD: ``J z`` is the directional derivative of the per-sample training losses at ``theta`` along ``z``
    (``torch.func.jvp``), one forward pass with tangents per direction, or with ``batched`` all directions
    in one vmapped pass."""
    unit, per_sample_loss, train_batch = inputs.unit, inputs.per_sample_loss, inputs.train_batch
    names = _theta_names(unit, inputs.theta)
    primals = tuple(p.detach() for p in inputs.theta)

    def losses_at(*params: Tensor) -> Tensor:
        return per_sample_loss(_FunctionalUnit(unit, dict(zip(names, params))), train_batch)

    def one(*z: Tensor) -> Tensor:
        return torch.func.jvp(losses_at, primals, z)[1]

    def jvp(zs: Sequence[Sequence[Tensor]]) -> Tensor:
        if not batched:
            return torch.stack([one(*z) for z in zs])
        try:
            return torch.func.vmap(one)(*[torch.stack([z[i] for z in zs]) for i in range(len(primals))])
        except RuntimeError as err:
            raise _unbatchable("forward-mode product", err) from err

    return jvp


def _unbatchable(what: str, err: RuntimeError) -> GaqError:
    return GaqError(f"gac.batched_products: PyTorch cannot batch this unit's {what} here "
                    f"({str(err).splitlines()[0][:120]}); set gac.batched_products: false")


def _batched_grad(outputs: Sequence[Tensor], inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor]) -> tuple:
    """``torch.autograd.grad`` with a leading batch of ``grad_outputs``, as one vmapped backward."""
    try:
        return torch.autograd.grad(list(outputs), list(inputs), grad_outputs=list(grad_outputs), retain_graph=True,
                                   allow_unused=True, materialize_grads=True, is_grads_batched=True)
    except RuntimeError as err:
        raise _unbatchable("backward", err) from err


# units on which the batched products failed once under batched_products="auto"; they run one product per group
_UNBATCHABLE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _factored_grad_w(inputs: MetaStepInputs, w: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`_factored_grad_w_at` with ``gac.batched_products`` resolved (``auto``: batched on CUDA, looped
    for good on a unit where batching failed once)."""
    setting = inputs.cfg.batched_products
    if setting != "auto":
        return _factored_grad_w_at(inputs, w, bool(setting))
    if w.device.type != "cuda" or inputs.unit in _UNBATCHABLE:
        return _factored_grad_w_at(inputs, w, False)
    try:
        return _factored_grad_w_at(inputs, w, True)
    except GaqError as err:
        log.info("unit %r: batched GAC products failed (%s); one product per group from now on", inputs.unit_name, err)
        _UNBATCHABLE.add(inputs.unit)
        return _factored_grad_w_at(inputs, w, False)


def _factored_grad_w_at(inputs: MetaStepInputs, w: Tensor, batched: bool) -> tuple[Tensor, dict[str, Tensor]]:
    """``d L_VAL / d w`` and the outer loss's pieces at the weights ``w``, without differentiating through
    the look-ahead step.

    With ``theta* = theta - eta (sum_i w_i grad l_i(theta) / B + grad extra)``, ``J`` the per-sample
    Jacobian of the training losses at ``theta``, ``u_g = grad L_g(theta*)`` and ``H_g`` its Hessian:

    * ``G_g = dL_g/dw = -(eta/B) J u_g`` (exact: ``theta*`` is linear in ``w``);
    * ``d/dw (c . G_g) = (eta/B)^2 J H_g J^T c`` for any ``c`` (``J`` does not depend on ``w``);

    so ``dL_VAL/dw = gm_coef * (eta/B)^2 J (sum_g H_g J^T c_g) + val_coef * mean_g G_g`` with
    ``c_g = d(-alignment)/dG_g``. Every product is one pass: ``J z`` a forward-mode product
    (:func:`_forward_jvp`) or a double backward (:func:`_vjp_then_jvp`), per ``gac.jacobian_products``;
    ``J^T c`` a VJP; ``H_g v`` a Hessian-vector product through group g's
    validation losses. Equals the nested autograd of :func:`_outer_parts` (tested), at a fraction of
    its cost: no third-order graph over the validation set.
    """
    unit, theta, per_sample_loss, cfg = inputs.unit, inputs.theta, inputs.per_sample_loss, inputs.cfg
    train_batch, val_batches, extra_loss = inputs.train_batch, inputs.val_batches, inputs.extra_loss
    w_ = w.detach()
    k = cfg.inner_lr / w_.numel()
    losses = _train_losses(unit, per_sample_loss, train_batch, w_)
    inner = (w_ * losses).sum() / w_.numel()
    objective = inner if extra_loss is None else inner + extra_loss()
    grads = torch.autograd.grad(objective, list(theta), retain_graph=True, allow_unused=True, materialize_grads=True)
    theta_star = [(p.detach() - cfg.inner_lr * g).requires_grad_(True) for p, g in zip(theta, grads)]
    fmodel = _functional_at(unit, theta, theta_star)
    val, u = [], []
    for vb in val_batches:  # u_g = grad L_g(theta*), kept differentiable for H_g v
        L_g = per_sample_loss(fmodel, vb).mean()
        u.append(torch.autograd.grad(L_g, theta_star, create_graph=True, allow_unused=True, materialize_grads=True))
        val.append(L_g.detach())
    val = torch.stack(val)
    if cfg.jacobian_products == "forward":
        jvp = _forward_jvp(inputs, batched=batched)
    else:
        jvp = _vjp_then_jvp(losses, theta, batched=batched)
    G = -k * jvp([[x.detach() for x in u_g] for u_g in u])  # (num_groups, B)
    parts = {"inner": inner.detach(), "val": val}
    grad_w = cfg.val_coef * G.mean(0)
    if cfg.gm_coef > 0:
        G_leaf = G.detach().requires_grad_(True)
        alignment = _pairwise_alignment(G_leaf, cfg)
        (c,) = torch.autograd.grad(-alignment, G_leaf)
        # J^T c_g per group, then sum_g H_g J^T c_g in one backward through every u_g; J is linear, so one
        # J product serves every group
        if batched:
            batched_jt_c = _batched_grad([losses], theta, [c])
            jt_c = [[x[g] for x in batched_jt_c] for g in range(len(u))]
        else:
            jt_c = [torch.autograd.grad(losses, list(theta), grad_outputs=c[g], retain_graph=True, allow_unused=True,
                                        materialize_grads=True) for g in range(len(u))]
        h_sum = torch.autograd.grad([x for u_g in u for x in u_g], theta_star,
                                    grad_outputs=[x for jt_c_g in jt_c for x in jt_c_g], retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
        grad_w = grad_w + cfg.gm_coef * k * k * jvp([h_sum])[0]
        parts.update(alignment=alignment.detach(), weight_grad_norm=torch.linalg.vector_norm(G, dim=1).mean(),
                     gm=-alignment.detach())
    else:
        parts["gm"] = val.new_zeros(())
    parts["outer"] = cfg.gm_coef * parts["gm"] + cfg.val_coef * val.mean()
    return grad_w, parts


def _outer_parts_by_backend(inputs: MetaStepInputs, w: Tensor) -> dict[str, Tensor]:
    """:func:`_outer_parts` with the look-ahead of ``cfg.backend`` (``auto``: higher, else functional)."""
    unit, unit_name, cfg = inputs.unit, inputs.unit_name, inputs.cfg
    if cfg.backend == "functional":
        return _outer_parts(inputs, w, at=_functional_at)
    if cfg.backend == "higher":
        check(_higher_available(), "the 'higher' package is not installed: install it or set gac.backend: functional")
        try:
            return _outer_parts(inputs, w, at=_higher_at)
        except TypeError as err:
            if _is_higher_patch_failure(err):
                raise GaqError(f"higher cannot patch unit {unit_name!r} ({type(unit).__name__}): "
                               "set gac.backend to 'functional' or 'auto'") from err
            raise
    if _higher_available() and unit not in _HIGHER_UNSUPPORTED:
        try:
            return _outer_parts(inputs, w, at=_higher_at)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # higher cannot run this unit: remember it, use functional from now on
            level = logging.INFO if _is_higher_patch_failure(err) else logging.WARNING
            log.log(level, "higher cannot run unit %r (%s: %s); using torch.func.functional_call for it",
                    unit_name, type(err).__name__, err)
            _HIGHER_UNSUPPORTED.add(unit)
    return _outer_parts(inputs, w, at=_functional_at)


def _check_finite(parts: dict[str, Tensor], unit_name: str, step: int) -> None:
    """One host sync; names the first non-finite piece."""
    if bool(torch.isfinite(torch.cat([v.detach().reshape(-1).float() for v in parts.values()])).all()):
        return
    labels = {"inner": "inner (weighted training) loss", "val": "validation loss", "alignment": "gradient alignment",
              "weight_grad_norm": "weight-gradient", "gm": "gradient-matching loss", "outer": "outer loss"}
    what = next(labels[k] for k, v in parts.items() if not bool(torch.isfinite(v.detach()).all()))
    raise GaqError(f"non-finite {what} in GAC meta step {step} of unit {unit_name!r}: "
                   "lower gac.inner_lr or gac.meta_lr, or check this unit's calibration data")


def meta_outer_loss(inputs: MetaStepInputs, w: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The outer loss of one GAC meta step, differentiable with respect to ``w``.

    Args:
        inputs: the unit, its learned parameters ``theta``, the per-sample loss, the meta batch, the
            validation batches, the settings and the names for errors (:class:`MetaStepInputs`).
        w: the mean-one weights ``N * omega[idx]`` of the training tuples, ``(B,)``, attached to the
            graph of ``s``.

    Returns:
        ``outer`` (scalar) ``= gm_coef * L_GM2 + val_coef * mean_g L_g`` with
        ``L_GM2 = -mean_{g<h} cos(G_g, G_h)``, ``G_g = dL_g(theta*)/dw``; and detached scalar
        stats: ``outer``, ``inner_loss``, ``val_loss``, ``val_loss_group{g}``, ``gm_loss`` and, with
        at least two groups and ``gm_coef > 0``, ``alignment`` (mean pairwise cosine or dot) and
        ``weight_grad_norm`` (mean ``||G_g||``).

    Raises:
        GaqError: a loss or the alignment is NaN or infinite (names ``inputs.unit_name`` and
            ``inputs.step``), or ``backend='higher'`` on a unit higher cannot patch.
    """
    _check_val_batches(inputs)
    if not w.requires_grad:
        raise ValueError("w must be attached to the graph of the logits s (use LearnedSampleWeights.weights(index, s=s_leaf))")
    # The fused attention kernels (flash, memory-efficient, CPU flash) have no double backward; the
    # math kernel of scaled_dot_product_attention does, so units with attention run it here.
    with sdpa_kernel([SDPBackend.MATH]):
        parts = _outer_parts_by_backend(inputs, w)
    _check_finite(parts, inputs.unit_name, inputs.step)
    return parts["outer"], meta_stats(parts)


def meta_stats(parts: dict[str, Tensor]) -> dict[str, Tensor]:
    """The detached scalar statistics of an outer loss's pieces (see :func:`meta_outer_loss`)."""
    stats = {"outer": parts["outer"].detach(), "inner_loss": parts["inner"].detach(),
             "val_loss": parts["val"].detach().mean(), "gm_loss": parts["gm"].detach()}
    stats.update({f"val_loss_group{g}": v for g, v in enumerate(parts["val"].detach())})
    for key in ("alignment", "weight_grad_norm"):
        if key in parts:
            stats[key] = parts[key].detach()
    return stats


def meta_step(inputs: MetaStepInputs, weights: LearnedSampleWeights,
              index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The hypergradient ``d L_VAL / d s`` of one meta step; commits nothing.

    Args:
        inputs: what the meta step is computed on (:class:`MetaStepInputs`).
        weights: the learned weights; ``weights.s`` is read, never written.
        index: global indices ``(B,)`` of the tuples in ``inputs.train_batch``.

    Returns:
        ``grad_s``, shape ``(N,)`` like ``weights.s``, and the stats of :func:`meta_outer_loss`.
        The engine averages ``grad_s`` over DDP ranks, then
        ``weights.s.grad = grad_s; adam_on_s.step()`` (Adam over ``[weights.s]``, lr ``cfg.meta_lr``).

    Raises:
        GaqError: non-finite losses or hypergradient (names ``inputs.unit_name`` and ``inputs.step``).
    """
    if inputs.cfg.hypergradient == "factored":
        _check_val_batches(inputs)
        weights.slots(index)  # every index must be a training tuple (the check weights(index) makes below)
        grad_s, parts = meta_hypergradient_parts(inputs, weights, index)
        check_meta_parts(grad_s, parts, inputs.unit_name, inputs.step)
        return grad_s, meta_stats(parts)
    s = weights.s.detach().clone().requires_grad_(True)
    w = weights.weights(index, s=s)
    outer, stats = meta_outer_loss(inputs, w)
    (grad_s,) = torch.autograd.grad(outer, s)
    check_hypergradient(grad_s, inputs.unit_name, inputs.step)
    return grad_s, stats


def check_hypergradient(grad_s: Tensor, unit_name: str, step: int) -> None:
    """One host sync: refuse a non-finite hypergradient with a message naming the unit and step."""
    check(bool(torch.isfinite(grad_s).all()),
          f"non-finite hypergradient in GAC meta step {step} of unit {unit_name!r}: lower gac.inner_lr or gac.meta_lr")


def meta_hypergradient_parts(inputs: MetaStepInputs, weights: LearnedSampleWeights,
                             index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`meta_step`'s arithmetic with no host synchronisation, for capture in a CUDA graph:
    ``index`` and the batches must already be on the device; the functional backend runs (higher's
    fallback is found by catching its failure, which a capture cannot survive) and nothing is
    checked. The caller checks the returned pieces with :func:`check_meta_parts`."""
    s = weights.s.detach().clone().requires_grad_(True)
    w = weights.weights(index, s=s, validate=False)
    with sdpa_kernel([SDPBackend.MATH]):
        if inputs.cfg.hypergradient == "factored":
            grad_w, parts = _factored_grad_w(inputs, w)
            (grad_s,) = torch.autograd.grad(w, s, grad_outputs=grad_w)
        else:
            parts = _outer_parts(inputs, w, at=_functional_at)
            (grad_s,) = torch.autograd.grad(parts["outer"], s)
    return grad_s, {k: v.detach() for k, v in parts.items()}


def check_meta_parts(grad_s: Tensor, parts: dict[str, Tensor], unit_name: str, step: int) -> None:
    """The checks of :func:`meta_step` on the outputs of :func:`meta_hypergradient_parts`."""
    _check_finite(parts, unit_name, step)
    check_hypergradient(grad_s, unit_name, step)
