"""``quantize(model, config)``: a deep-copied, fake-quantized model, plus the helpers that drive it.

The plan (:class:`QuantPlan`) says, for every convolution / linear layer, whether it is quantized
and how (bits, split); it is derived from layer roles and the config's overrides, and saved with
exported models so that loading rebuilds exactly the same structure.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from gaq.errors import check
from gaq.quant.adaround import AdaRoundQuantizer
from gaq.quant.attention import install_quant_attention
from gaq.quant.config import FP_ACT_BITS, QuantConfig, QuantSettings, resolve_config
from gaq.quant.layers import LayerSpec, QuantLayer, quant_class_for
from gaq.quant.quantizer import ActQuantizer
from gaq.quant.roles import has_root_roles, layer_roles, shortcut_splits
from gaq.quant.step_context import StepContext, install_timestep_hook

#: Roles found by a root-model role function (a model class without one cannot honour them).
ROOT_LEVEL_ROLES = ("first_layer", "last_layer", "time_embed_first", "time_embed_second")


@dataclass
class QuantPlan:
    """Which layers are quantized and how.

    Attributes:
        layers: the quantized layers, by path.
        kept_fp: paths of convolution / linear layers left in floating point.
        attention: paths of the ``Attention`` modules whose matmul operands are quantized.
        softmax_bits: bits of the softmax-output quantizers.
        attention_bits: bits of the q / k / v quantizers.
    """

    layers: dict[str, LayerSpec] = field(default_factory=dict)
    kept_fp: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    softmax_bits: int = 8
    attention_bits: int = 8

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        data = dict(data)
        data["layers"] = {k: LayerSpec(**v) for k, v in data["layers"].items()}
        return cls(**data)


@dataclass
class QuantInfo:
    """What a quantized model remembers about how it was made (``qmodel.gaq_quant``).

    Attributes:
        settings: the resolved config.
        plan: the per-layer plan.
        context: the step context shared by its activation quantizers.
        base_fingerprint / base_arch: fingerprints of the FP model it was made from (weights+config,
            architecture only), checked when a saved model is loaded onto a base model.
        config: the user's config as given (for metadata).
        source: where the FP model was loaded from (its diffusers ``_name_or_path``), for metadata.
    """

    settings: QuantSettings
    plan: QuantPlan
    context: StepContext
    base_fingerprint: str = ""
    base_arch: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def _ancestor_classes(model: nn.Module, path: str) -> set[str]:
    names: set[str] = set()
    parts = path.split(".")
    for i in range(len(parts) + 1):
        module = model.get_submodule(".".join(parts[:i])) if i else model
        names.update(c.__name__ for c in type(module).__mro__)
    return names


def plan_quantization(model: nn.Module, settings: QuantSettings) -> QuantPlan:
    """The plan for ``model`` under ``settings`` (roles, then overrides in order)."""
    roles = layer_roles(model)
    missing_root = [r for r in settings.keep_fp_roles + list(settings.role_w_bits) + list(settings.role_a_bits)
                    if r in ROOT_LEVEL_ROLES]
    check(not missing_root or has_root_roles(model),
          f"the preset names model-level roles {sorted(set(missing_root))} but {type(model).__name__} has no role map: "
          "register one with gaq.quant.roles.register_root_roles, or remove those roles")
    splits = shortcut_splits(model)
    candidates = [(name, m) for name, m in model.named_modules() if quant_class_for(m) is not None]
    check(candidates, f"{type(model).__name__} has no convolution or linear layer to quantize")

    state: dict[str, dict[str, Any]] = {}
    for name, m in candidates:
        role = roles.get(name, "body")
        state[name] = dict(
            path=name, fp_class=type(m).__name__, role=role, keep_fp=role in settings.keep_fp_roles,
            w_bits=settings.role_w_bits.get(role, settings.w_bits), a_bits=settings.role_a_bits.get(role, settings.a_bits),
            split=splits.get(name) if settings.split_shortcut else None)

    for i, o in enumerate(settings.overrides):
        if o.pattern is not None:
            matched = [n for n, _ in candidates if fnmatch.fnmatchcase(n, o.pattern)]
        elif o.module_class is not None:
            matched = [n for n, _ in candidates if o.module_class in _ancestor_classes(model, n)]
        else:
            matched = [n for n, _ in candidates if state[n]["role"] == o.role]
        check(matched, f"overrides[{i}] ({o.describe()}) matches no convolution or linear layer of "
              f"{type(model).__name__}; fix or remove it")
        for n in matched:
            s = state[n]
            if o.keep_fp is not None:
                s["keep_fp"] = o.keep_fp
            if o.w_bits is not None:
                s["w_bits"] = o.w_bits
            if o.a_bits is not None:
                s["a_bits"] = o.a_bits
            if o.split is not None:
                check(not o.split or n in splits, f"overrides[{i}] asks to split {n!r}, which has no shortcut split point")
                s["split"] = splits[n] if o.split else None

    plan = QuantPlan(softmax_bits=settings.softmax_bits, attention_bits=settings.a_bits)
    for name, _ in candidates:
        s = state[name]
        if s.pop("keep_fp"):
            plan.kept_fp.append(name)
        else:
            plan.layers[name] = LayerSpec(**s)
    if settings.quantize_attention and settings.quantize_activations:
        plan.attention = [name for name, m in model.named_modules() if isinstance(m, Attention)]
    return plan


def replace_modules(model: nn.Module, replacement) -> int:
    """Put ``replacement(child)`` in place of every submodule of ``model`` for which it is not None (each occurrence:
    an aliased module is asked once per parent); returns how many were replaced."""
    count = 0
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            new = None if child is None else replacement(child)
            if new is not None:
                parent._modules[key] = new
                count += 1
    return count


def _replace_modules(model: nn.Module, new_by_id: dict[int, nn.Module]) -> None:
    """Replace every occurrence (aliases included) of the modules keyed by id."""
    replace_modules(model, lambda child: new_by_id.get(id(child)))


def _uses_per_step(plan: QuantPlan, settings: QuantSettings) -> bool:
    return settings.per_step_act and (bool(plan.attention) or any(s.a_bits != FP_ACT_BITS for s in plan.layers.values()))


def build_quantized(model: nn.Module, settings: QuantSettings, plan: QuantPlan, timesteps: Tensor | None,
                    *, init_ranges: bool = True) -> nn.Module:
    """Turn ``model`` (modified in place: pass a copy) into its fake-quantized form under ``plan``.

    Quantized layers start with weight quantization on (AdaRound's initial state, i.e. nearest
    rounding) and activation quantization off until :func:`gaq.quant.calibrate_activations` runs.
    """
    check(not any(isinstance(m, QuantLayer) for m in model.modules()), "the model is already quantized")
    per_step = _uses_per_step(plan, settings)
    if per_step:
        check(timesteps is not None, f"preset {settings.preset!r} keeps activation scales per sampling step: pass "
              "timesteps= (the calibrated sampling timesteps, in sampling order) or set per_step_act: false")
    context = StepContext(timesteps if per_step else None)
    modules = dict(model.named_modules())
    new_by_id: dict[int, nn.Module] = {}
    for path, spec in plan.layers.items():
        check(path in modules, f"quantization plan names layer {path!r}, which {type(model).__name__} does not have")
        fp = modules[path]
        cls = quant_class_for(fp)
        check(cls is not None and type(fp).__name__ == spec.fp_class,
              f"layer {path!r} is a {type(fp).__name__}, the quantization plan expects a {spec.fp_class}")
        new_by_id[id(fp)] = cls(fp, spec, settings, context, init_range=init_ranges)
    _replace_modules(model, new_by_id)
    for path in plan.attention:
        attn = modules.get(path)
        check(isinstance(attn, Attention), f"quantization plan names attention {path!r}, which the model does not have")
        install_quant_attention(attn, plan.attention_bits, plan.softmax_bits, settings, context, path)
    if per_step:
        install_timestep_hook(model, context)
    from gaq.quant.pretrained import install_save_pretrained  # late import: it saves through gaq.quant.export
    install_save_pretrained(model)
    model.requires_grad_(False)
    for q in _modules_of(model, AdaRoundQuantizer):
        q.alpha.requires_grad_(True)
    for q in _modules_of(model, ActQuantizer):
        if q.learn_step:
            q.scale.requires_grad_(True)
    model.gaq_quant = QuantInfo(settings=settings, plan=plan, context=context)
    return model


def quantize(model: nn.Module, config: QuantConfig, *, timesteps: Tensor | None = None) -> nn.Module:
    """A deep-copied, fake-quantized ``model`` (the FP model is untouched).

    Args:
        model: a diffusers noise predictor (UNet2DModel, UNet2DConditionModel, DiT, ...).
        config: bits, preset and overrides.
        timesteps: the calibrated sampling timesteps in sampling order, one per step (needed when the
            preset keeps activation scales per step): step ``i`` of the per-step scales is ``timesteps[i]``.

    Returns:
        the quantized copy: weights fake-quantized (AdaRound, initialised to nearest rounding),
        activation quantizers present but off until :func:`gaq.quant.calibrate_activations`. The
        rounding logits (``alpha``) and learnable activation steps require grad; nothing else does.
    """
    from gaq.quant.export import architecture_fingerprint
    from gaq.models.loading import model_fingerprint

    check(isinstance(model, nn.Module), f"quantize needs a torch module (a diffusers noise predictor), got {type(model).__name__}")
    settings = resolve_config(config)
    check(not any(isinstance(m, QuantLayer) for m in model.modules()), "the model is already quantized")
    bad = next((n for n, t in [*model.named_parameters(), *model.named_buffers()]
                if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    check(bad is None, f"the model's {bad} holds NaN or Inf values: quantize a model with finite weights")
    if timesteps is not None:
        ts = torch.as_tensor(timesteps)
        check(ts.ndim == 1 and ts.numel() > 0 and (not ts.is_floating_point() or bool((ts == ts.round()).all())),
              "timesteps must be a 1-D list of the calibrated integer timesteps in sampling order, got "
              f"shape {tuple(ts.shape)} {ts.dtype}")
    qmodel = copy.deepcopy(model)
    plan = plan_quantization(qmodel, settings)
    build_quantized(qmodel, settings, plan, timesteps)
    info: QuantInfo = qmodel.gaq_quant
    info.base_fingerprint, info.base_arch = model_fingerprint(model), architecture_fingerprint(model)
    info.config = dataclasses.asdict(config)
    info.source = str(dict(getattr(model, "config", None) or {}).get("_name_or_path") or "")
    return qmodel


# ---------------------------------------------------------------- helpers the calibration engine uses

def _modules_of(module: nn.Module, cls: type) -> Iterator[Any]:
    for m in module.modules():
        if isinstance(m, cls):
            yield m


def quant_info(qmodel: nn.Module) -> QuantInfo:
    """The :class:`QuantInfo` of a model made by :func:`quantize` or :func:`gaq.quant.load_quantized`."""
    info = getattr(qmodel, "gaq_quant", None)
    check(isinstance(info, QuantInfo), f"{type(qmodel).__name__} is not a gaq-quantized model (use gaq.quant.quantize)")
    return info


def iter_quant_layers(module: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    """``(path, layer)`` of every :class:`QuantLayer` under ``module`` (itself included)."""
    for name, m in module.named_modules():
        if isinstance(m, QuantLayer):
            yield name, m


def iter_act_quantizers(module: nn.Module) -> Iterator[tuple[str, ActQuantizer]]:
    """``(path, quantizer)`` of every activation quantizer under ``module`` (layer inputs and attention operands)."""
    for name, m in module.named_modules():
        if isinstance(m, ActQuantizer):
            yield name, m


def set_quant_state(module: nn.Module, weight: bool, act: bool) -> None:
    """Turn weight and activation quantization on or off everywhere under ``module``."""
    for m in module.modules():
        if isinstance(m, AdaRoundQuantizer):
            m.enabled = bool(weight)
        elif isinstance(m, ActQuantizer):
            m.enabled = bool(act)


def rounding_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every AdaRound rounding logit tensor (``alpha``) under ``module``."""
    return [q.alpha for q in _modules_of(module, AdaRoundQuantizer)]


def act_step_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every learnable activation step size under ``module`` (empty unless ``act_learn_step``)."""
    return [q.scale for q in _modules_of(module, ActQuantizer) if q.learn_step]


def set_adaround_soft(module: nn.Module, soft: bool) -> None:
    """Soft (learning) or hard rounding for every AdaRound quantizer under ``module``."""
    for q in _modules_of(module, AdaRoundQuantizer):
        q.soft = bool(soft)


def set_rounding_mode(module: nn.Module, mode: str) -> None:
    """``nearest`` (RTN) or ``learned`` (AdaRound) for every weight quantizer under ``module``."""
    check(mode in ("nearest", "learned"), f"rounding mode must be 'nearest' or 'learned', got {mode!r}")
    for q in _modules_of(module, AdaRoundQuantizer):
        q.rtn() if mode == "nearest" else q.learned()


__all__ = [
    "QuantInfo", "QuantPlan", "act_step_parameters", "build_quantized", "iter_act_quantizers", "iter_quant_layers",
    "plan_quantization", "quant_info", "quantize", "replace_modules", "rounding_parameters",
    "set_adaround_soft", "set_quant_state", "set_rounding_mode",
]
