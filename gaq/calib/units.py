"""Reconstruction units: which parts of a quantized noise predictor are tuned together, in forward order.

A unit is a callable sub-network whose output is matched to the FP model's (BRECQ's block-wise
reconstruction). Units come from a registry keyed by module class (never by name or index):

- ``time``: TFMQ-DM's temporal-information block, the time-embedding MLP reconstructed jointly with
  every ResBlock's time projection (``time_emb_proj``); its output is all projections concatenated.
- ``resnet``: ``ResnetBlock2D``;
- ``attention``: ``Attention`` (UNet2DModel's self-attention) and ``Transformer2DModel`` (the spatial
  transformer of UNet2DConditionModel), ``BasicTransformerBlock`` (DiT, PixArt);
- ``sampler``: ``Downsample2D`` / ``Upsample2D``;
- ``time`` also: PixArt's timestep (and image-size) embedding ``PixArtAlphaCombinedTimestepSizeEmbeddings``
  as one unit (its size embedders see two rows a sample, so they cannot be units of their own);
- ``layer``: every quantized layer no unit above owns (e.g. ``conv_in``, ``conv_out``), alone.

Every quantized layer belongs to exactly one unit: the first one, in forward order, that contains it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PixArtAlphaCombinedTimestepSizeEmbeddings, TimestepEmbedding
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import Tensor, nn

from gaq.quant import QuantLayer, iter_quant_layers

# module class -> unit kind. A module of one of these classes (below the root) is one unit; its
# sub-modules are not searched further.
UNIT_KINDS: dict[type[nn.Module], str] = {
    ResnetBlock2D: "resnet",
    Attention: "attention",
    Transformer2DModel: "attention",
    BasicTransformerBlock: "attention",
    Downsample2D: "sampler",
    Upsample2D: "sampler",
    PixArtAlphaCombinedTimestepSizeEmbeddings: "time",
}


def unit_kind(module: nn.Module) -> str | None:
    """The unit kind of a module by its class (MRO lookup, so subclasses count), or None."""
    for cls in type(module).__mro__:
        if cls in UNIT_KINDS:
            return UNIT_KINDS[cls]
    return None


class StopForward(Exception):
    """Raised by a capture hook once a unit's inputs are recorded, to skip the rest of the model."""


@dataclass
class Capture:
    """Inputs of one unit for one batch: positional and keyword arguments as the unit receives them."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class Unit:
    """A reconstruction unit of a (quantized or FP) model.

    Attributes:
        name: a stable name (the module path, or ``time_embedding`` for the time unit).
        kind: ``time``, ``resnet``, ``attention``, ``sampler`` or ``layer``.
        module: the callable that computes the unit's output from its captured inputs.
        layers: the quantized layers this unit owns (empty for an FP model).
    """

    def __init__(self, name: str, kind: str, module: nn.Module):
        self.name, self.kind, self.module = name, kind, module
        self.layers: list[tuple[str, QuantLayer]] = []

    def __repr__(self) -> str:
        return f"Unit({self.name!r}, {self.kind}, {len(self.layers)} quantized layers)"

    def install_capture(self, store: list[Capture], stop: bool) -> list[Any]:
        """Hooks that append this unit's inputs of the next forward pass to ``store``; return their handles."""

        def hook(_module, args, kwargs):
            store.append(Capture(tuple(args), dict(kwargs)))
            if stop:
                raise StopForward

        return [self.module.register_forward_pre_hook(hook, with_kwargs=True)]

    def __call__(self, *args, **kwargs) -> Tensor:
        out = self.module(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)

    @property
    def hooked(self) -> nn.Module:
        """The model's module whose call is this unit's call (for the forward order)."""
        return self.module


class BatchFromTimestep(nn.Module):
    """Calls ``inner(timestep, ..., batch_size=len(timestep))``.

    PixArt's ``PixArtAlphaCombinedTimestepSizeEmbeddings`` takes the batch size as a plain int, which
    a capture replayed on a sub-batch of the cache would get wrong; here it follows the timesteps.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, timestep: Tensor, *args, **kwargs) -> Tensor:
        kwargs.pop("batch_size", None)
        return self.inner(timestep, *args, batch_size=timestep.shape[0], **kwargs)


class BatchFromTimestepUnit(Unit):
    """A unit whose module takes ``batch_size`` as an int: captured without it, called through :class:`BatchFromTimestep`."""

    def __init__(self, name: str, kind: str, module: nn.Module):
        super().__init__(name, kind, BatchFromTimestep(module))

    @property
    def hooked(self) -> nn.Module:
        return self.module.inner

    def install_capture(self, store: list[Capture], stop: bool) -> list[Any]:
        def hook(_module, args, kwargs):
            store.append(Capture(tuple(args), {k: v for k, v in kwargs.items() if k != "batch_size"}))
            if stop:
                raise StopForward

        return [self.hooked.register_forward_pre_hook(hook, with_kwargs=True)]


# module class -> the Unit class that wraps it (default: Unit)
UNIT_CLASSES: dict[type[nn.Module], type[Unit]] = {PixArtAlphaCombinedTimestepSizeEmbeddings: BatchFromTimestepUnit}


def make_unit(name: str, kind: str, module: nn.Module) -> Unit:
    """The unit of ``module``, of the Unit class registered for its class (MRO lookup)."""
    for cls in type(module).__mro__:
        if cls in UNIT_CLASSES:
            return UNIT_CLASSES[cls](name, kind, module)
    return Unit(name, kind, module)


class TimeEmbeddingPath(nn.Module):
    """TFMQ-DM's temporal-information block as one module.

    ``forward(t_emb, offset)`` returns ``cat([proj_r(act_r(time_embedding(t_emb) + offset))])`` over
    every ResBlock ``r`` with a time projection, where ``t_emb`` is the sinusoidal projection of the
    timestep (the input of ``time_embedding``) and ``offset`` is what the model adds to the MLP's
    output before the ResBlocks see it (the class embedding, zero for unconditional models).
    """

    def __init__(self, time_embedding: nn.Module, resnets: list[ResnetBlock2D]):
        super().__init__()
        self.time_embedding = time_embedding
        self.projections = nn.ModuleList(r.time_emb_proj for r in resnets)
        self.activations = nn.ModuleList(nn.Identity() if r.skip_time_act else r.nonlinearity for r in resnets)
        self._first_resnet = [resnets[0]]  # where the capture hook goes (a list: not a submodule)

    def forward(self, t_emb: Tensor, offset: Tensor) -> Tensor:
        emb = self.time_embedding(t_emb) + offset
        return torch.cat([proj(act(emb)) for proj, act in zip(self.projections, self.activations)], dim=1)


class TimeUnit(Unit):
    """The time unit; its inputs are captured at the MLP's input and at the first ResBlock's ``temb``."""

    def __init__(self, path: TimeEmbeddingPath):
        super().__init__("time_embedding", "time", path)

    @property
    def hooked(self) -> nn.Module:
        return self.module.time_embedding

    def install_capture(self, store: list[Capture], stop: bool) -> list[Any]:
        seen: dict[str, Tensor] = {}
        mlp, first = self.module.time_embedding, self.module._first_resnet[0]

        def on_mlp(_m, args, output):
            seen["t_emb"], seen["mlp_out"] = args[0], output

        def on_resnet(_m, args, kwargs):
            temb = kwargs["temb"] if "temb" in kwargs else args[1]
            store.append(Capture((seen["t_emb"], temb - seen["mlp_out"])))
            if stop:
                raise StopForward

        return [mlp.register_forward_hook(on_mlp), first.register_forward_pre_hook(on_resnet, with_kwargs=True)]


def _time_path(model: nn.Module) -> TimeEmbeddingPath | None:
    """The time unit of a diffusers UNet, or None where the model has no such path.

    It exists when the model has a ``TimestepEmbedding`` called ``time_embedding`` whose output (plus
    an additive class embedding) is what every ResBlock receives, i.e. no ``time_embed_act`` in between.
    """
    mlp = getattr(model, "time_embedding", None)
    if not isinstance(mlp, TimestepEmbedding) or getattr(model, "time_embed_act", None) is not None:
        return None
    resnets = [m for m in model.modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None]
    return TimeEmbeddingPath(mlp, resnets) if resnets else None


def forward_order(model: nn.Module, run: Callable[[], Any], modules: list[nn.Module]) -> list[nn.Module]:
    """``modules`` sorted by the time of their first call in one forward pass ``run()``."""
    order: dict[int, int] = {}
    handles = []
    for m in modules:
        def hook(mod, _args, _key=id(m)):
            order.setdefault(_key, len(order))
        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    missing = [m for m in modules if id(m) not in order]
    return sorted((m for m in modules if id(m) in order), key=lambda m: order[id(m)]) + missing


def find_units(model: nn.Module, run: Callable[[], Any], time_unit: bool = True) -> list[Unit]:
    """The reconstruction units of ``model`` in forward order.

    Args:
        model: a diffusers noise predictor, FP or fake-quantized by :func:`gaq.quant.quantize`.
        run: calls the model once on a small example batch (used to find the forward order).
        time_unit: reconstruct the time-embedding path jointly (TFMQ-DM) when the model has one.
    """
    names = {m: n for n, m in model.named_modules()}
    candidates: list[nn.Module] = []

    def walk(module: nn.Module):
        for child in module.children():
            if unit_kind(child) is not None:
                candidates.append(child)
            else:
                walk(child)

    walk(model)
    units: list[Unit] = [make_unit(names[m], unit_kind(m), m) for m in forward_order(model, run, candidates)]
    path = _time_path(model) if time_unit else None
    if path is not None:
        units.insert(0, TimeUnit(path))

    # each quantized layer goes to the first unit (in forward order) containing it
    owner: dict[int, Unit] = {}
    for unit in units:
        for lname, layer in iter_quant_layers(unit.module):
            owner.setdefault(id(layer), unit)
    loose: list[nn.Module] = []
    for lname, layer in iter_quant_layers(model):
        if id(layer) in owner:
            owner[id(layer)].layers.append((lname, layer))
        else:
            loose.append(layer)
    for layer in forward_order(model, run, loose):
        unit = Unit(names[layer], "layer", layer)
        unit.layers.append((names[layer], layer))
        units.append(unit)
    return [u for u in _sort_by_first_call(model, run, units) if u.layers]


def fp_counterpart(unit: Unit, fp_model: nn.Module) -> Unit:
    """The same unit in the FP model (same module path; quantized layers keep their FP names)."""
    if isinstance(unit, TimeUnit):
        path = _time_path(fp_model)
        if path is None:
            raise ValueError("the FP model has no time-embedding path but its quantized copy has")
        return TimeUnit(path)
    return make_unit(unit.name, unit.kind, fp_model.get_submodule(unit.name))


def _sort_by_first_call(model: nn.Module, run: Callable[[], Any], units: list[Unit]) -> list[Unit]:
    """Units sorted by the first call of their hooked module (the time unit by its MLP's)."""
    key_module = {id(u): u.hooked for u in units}
    ordered = forward_order(model, run, list(key_module.values()))
    rank = {id(m): i for i, m in enumerate(ordered)}
    return sorted(units, key=lambda u: rank[id(key_module[id(u)])])


def unit_parameters(unit: Unit, params_of: Callable[[nn.Module], list[nn.Parameter]]) -> list[nn.Parameter]:
    """The parameters ``params_of`` finds in each layer the unit owns (e.g. its rounding logits)."""
    out: list[nn.Parameter] = []
    for _, layer in unit.layers:
        out.extend(params_of(layer))
    return out


def tensor_leaves(value: Any) -> list[Tensor]:
    """Every tensor inside a (possibly nested) tuple / list / dict value."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensor_leaves(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensor_leaves(v)]
    return []
