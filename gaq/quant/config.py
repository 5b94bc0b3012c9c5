"""What to quantize and how: the user-facing :class:`QuantConfig` and its resolved form :class:`QuantSettings`.

A config names a *preset* (a YAML file shipped in ``gaq/quant/preset_files/``, e.g. ``tfmq_compat`` or
``qdiff_compat``) that fixes the protocol: which layer roles stay FP, whether attention operands and
shortcut splits are quantized, whether activation scales are kept per sampling step. Every preset key
can be overridden field by field in the config (a field left at ``None`` takes the preset's value),
and per-layer :class:`LayerOverride` entries (by module class or by an fnmatch pattern over module
paths, ModelOpt style) come last and win.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from gaq.errors import check

#: The layer roles a preset or override can name (see :mod:`gaq.quant.roles` for how each is found).
ROLES: tuple[str, ...] = (
    "first_layer",  # the model's input layer (UNet ``conv_in``, DiT patch-embedding conv)
    "last_layer",  # the model's output layer (UNet ``conv_out``, DiT ``proj_out_2``)
    "time_embed_first",  # the first linear of the timestep-embedding MLP
    "time_embed_second",  # the second linear of the timestep-embedding MLP
    "time_proj",  # a ResBlock's projection of the time embedding (``time_emb_proj``)
    "shortcut",  # a ResBlock's 1x1 skip convolution (``conv_shortcut``)
    "downsample",  # the convolution of a ``Downsample2D``
    "upsample",  # the convolution of an ``Upsample2D``
    "attn_qkv",  # ``to_q`` / ``to_k`` / ``to_v`` of an ``Attention``
    "attn_out",  # ``to_out[0]`` of an ``Attention``
    "body",  # every other convolution or linear layer
)

W_BITS_RANGE = (2, 8)  # integer weight codes are stored in (packed) uint8
A_BITS_RANGE = (4, 8)  # as documented: below 4 bits no diffusion PTQ protocol (Q-Diffusion, TFMQ-DM, GAC) quantizes activations
SOFTMAX_BITS_RANGE = (2, 16)  # Q-Diffusion uses 16-bit softmax for Stable Diffusion
FP_ACT_BITS = 32  # "activations stay in floating point"


@dataclass
class WeightRangeConfig:
    """How the per-output-channel weight range is chosen before AdaRound.

    Attributes:
        method: ``mse`` (BRECQ / Q-Diffusion / TFMQ-DM: the candidate range with the least Lp error)
            or ``minmax`` (the channel's min and max).
        grid: number of candidate ranges for ``mse``; candidate ``i`` is ``(1 - i * shrink) * [min, max]``.
        shrink: shrink step between candidates (peers: 80 candidates, 0.01).
        norm_p: exponent of the Lp error (peers: 2.4, after LAPQ).
        chunk_elements: memory bound of the vectorised search (elements of one candidate x channel x
            weight block); only changes speed and memory, never the result.
    """

    method: Literal["mse", "minmax"] = "mse"
    grid: int = 80
    shrink: float = 0.01
    norm_p: float = 2.4
    chunk_elements: int = 1 << 24


@dataclass
class LayerOverride:
    """A per-layer exception, applied after the preset's roles (later overrides win).

    Exactly one of ``pattern`` / ``module_class`` / ``role`` selects layers; it must match at least
    one convolution or linear layer of the model.

    Attributes:
        pattern: fnmatch pattern over layer paths, e.g. ``up_blocks.*.resnets.0.conv1``.
        module_class: a class name; matches a layer if the layer or any module containing it is an
            instance of a class of that name (e.g. ``Conv2d``, ``TimestepEmbedding``, ``Attention``).
        role: a layer role (see :data:`ROLES`).
        keep_fp: True leaves the matched layers in floating point; False quantizes them.
        w_bits: weight bits of the matched layers.
        a_bits: input-activation bits of the matched layers (32 = FP input).
        split: quantize the input (and weight ranges) of the matched layers as two channel groups at
            the shortcut split point; only layers with a known split point (up-block ResBlock
            ``conv1`` / ``conv_shortcut``) can be split.
    """

    pattern: str | None = None
    module_class: str | None = None
    role: str | None = None
    keep_fp: bool | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    split: bool | None = None

    def describe(self) -> str:
        """``pattern='...'`` / ``module_class='...'`` / ``role='...'``, for messages."""
        for key in ("pattern", "module_class", "role"):
            if getattr(self, key) is not None:
                return f"{key}={getattr(self, key)!r}"
        return "<empty selector>"


# Keys a preset YAML may set (each is also a QuantConfig field that defaults to None = "preset's value").
PRESET_KEYS: tuple[str, ...] = (
    "keep_fp_roles", "role_w_bits", "role_a_bits", "quantize_attention", "softmax_bits", "per_step_act",
    "split_shortcut", "act_symmetric", "act_learn_step", "act_ema_momentum", "act_unobserved_steps", "w_range",
)


@dataclass
class QuantConfig:
    """How to quantize a noise predictor (YAML-friendly; ``None`` fields take the preset's value).

    Attributes:
        w_bits: weight bits (2..8), per output channel, asymmetric.
        a_bits: activation bits (4..8), per tensor; 32 keeps activations in floating point.
        preset: a preset name (a YAML file in ``gaq/quant/preset_files/``) or a path to a preset YAML.
        overrides: per-layer exceptions, applied in order after the preset.
        keep_fp_roles: layer roles left in floating point (e.g. ``[first_layer, last_layer]``).
        role_w_bits: weight bits per role, e.g. ``{first_layer: 8, last_layer: 8}`` (BRECQ).
        role_a_bits: input-activation bits per role.
        quantize_attention: quantize the attention matmul operands (q, k, softmax output, v).
        softmax_bits: bits of the softmax-output quantizer.
        per_step_act: one activation scale per calibrated sampling step (TFMQ-DM) instead of one set.
        split_shortcut: quantize the skip concatenation of up-block ResBlocks as two tensors (Q-Diffusion).
        act_symmetric: symmetric (signed, zero point 0) activation quantizers instead of asymmetric.
        act_learn_step: make activation step sizes learnable (LSQ-style, Q-Diffusion).
        act_ema_momentum: momentum of the running min/max of activation calibration (peers: 0.95).
        act_unobserved_steps: with per-step scales, what a step the calibration data never visited
            gets: ``nearest`` (the range of the observed step nearest in timestep) or ``error``.
        w_range: how weight ranges are searched.
    """

    w_bits: int = 4
    a_bits: int = 8
    preset: str = "tfmq_compat"
    overrides: list[LayerOverride] = field(default_factory=list)
    keep_fp_roles: list[str] | None = None
    role_w_bits: dict[str, int] | None = None
    role_a_bits: dict[str, int] | None = None
    quantize_attention: bool | None = None
    softmax_bits: int | None = None
    per_step_act: bool | None = None
    split_shortcut: bool | None = None
    act_symmetric: bool | None = None
    act_learn_step: bool | None = None
    act_ema_momentum: float | None = None
    act_unobserved_steps: Literal["nearest", "error"] | None = None
    w_range: WeightRangeConfig | None = None


@dataclass
class QuantSettings:
    """A :class:`QuantConfig` with the preset applied: every value concrete and checked.

    Attributes are those of :class:`QuantConfig` (none of them None); ``preset`` is the preset's
    name and ``preset_path`` the file it was read from.
    """

    w_bits: int
    a_bits: int
    preset: str
    preset_path: str
    keep_fp_roles: list[str]
    role_w_bits: dict[str, int]
    role_a_bits: dict[str, int]
    quantize_attention: bool
    softmax_bits: int
    per_step_act: bool
    split_shortcut: bool
    act_symmetric: bool
    act_learn_step: bool
    act_ema_momentum: float
    act_unobserved_steps: str
    w_range: WeightRangeConfig
    overrides: list[LayerOverride] = field(default_factory=list)

    @property
    def quantize_activations(self) -> bool:
        """False for weight-only quantization (``a_bits == 32``)."""
        return self.a_bits != FP_ACT_BITS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSettings:
        data = dict(data)
        data["w_range"] = WeightRangeConfig(**data["w_range"])
        data["overrides"] = [LayerOverride(**o) for o in data.get("overrides", [])]
        return cls(**data)


def _check_bits(value: Any, what: str, lo_hi: tuple[int, int], allow_fp: bool) -> None:
    lo, hi = lo_hi
    ok = isinstance(value, int) and not isinstance(value, bool) and (lo <= value <= hi or (allow_fp and value == FP_ACT_BITS))
    extra = f" or {FP_ACT_BITS} (floating point)" if allow_fp else ""
    check(ok, f"{what} must be an integer in {lo}..{hi}{extra}, got {value!r}")


def _check_role(role: Any, what: str) -> None:
    check(role in ROLES, f"{what}: unknown layer role {role!r}; choose from {', '.join(ROLES)}")


def _coerce_w_range(value: Any) -> WeightRangeConfig:
    if isinstance(value, WeightRangeConfig):
        return value
    check(isinstance(value, dict), f"w_range must be a mapping of {[f.name for f in dataclasses.fields(WeightRangeConfig)]}")
    known = {f.name for f in dataclasses.fields(WeightRangeConfig)}
    unknown = set(value) - known
    check(not unknown, f"w_range has unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
    return WeightRangeConfig(**value)


def _check_override(o: LayerOverride, i: int) -> None:
    selectors = [k for k in ("pattern", "module_class", "role") if getattr(o, k) is not None]
    check(len(selectors) == 1, f"overrides[{i}] must set exactly one of pattern / module_class / role, got {selectors or 'none'}")
    if o.role is not None:
        _check_role(o.role, f"overrides[{i}].role")
    if o.w_bits is not None:
        _check_bits(o.w_bits, f"overrides[{i}].w_bits", W_BITS_RANGE, allow_fp=False)
    if o.a_bits is not None:
        _check_bits(o.a_bits, f"overrides[{i}].a_bits", A_BITS_RANGE, allow_fp=True)
    check(any(getattr(o, k) is not None for k in ("keep_fp", "w_bits", "a_bits", "split")),
          f"overrides[{i}] ({o.describe()}) changes nothing: set keep_fp, w_bits, a_bits or split")


def resolve_config(config: QuantConfig) -> QuantSettings:
    """Apply the preset to ``config`` and check every value; raise :class:`GaqError` on bad input."""
    from gaq.quant.presets import load_preset  # late import: presets imports this module

    check(isinstance(config, QuantConfig), f"expected a QuantConfig, got {type(config).__name__}")
    _check_bits(config.w_bits, "w_bits", W_BITS_RANGE, allow_fp=False)
    _check_bits(config.a_bits, "a_bits", A_BITS_RANGE, allow_fp=True)
    name, path, preset = load_preset(config.preset)
    values: dict[str, Any] = {}
    for key in PRESET_KEYS:
        mine = getattr(config, key)
        values[key] = mine if mine is not None else preset[key]

    values["keep_fp_roles"] = list(values["keep_fp_roles"] or [])
    for role in values["keep_fp_roles"]:
        _check_role(role, "keep_fp_roles")
    for key, rng, allow_fp in (("role_w_bits", W_BITS_RANGE, False), ("role_a_bits", A_BITS_RANGE, True)):
        values[key] = dict(values[key] or {})
        for role, bits in values[key].items():
            _check_role(role, key)
            _check_bits(bits, f"{key}[{role}]", rng, allow_fp=allow_fp)
    _check_bits(values["softmax_bits"], "softmax_bits", SOFTMAX_BITS_RANGE, allow_fp=False)
    for key in ("quantize_attention", "per_step_act", "split_shortcut", "act_symmetric", "act_learn_step"):
        check(isinstance(values[key], bool), f"{key} must be true or false, got {values[key]!r}")
    m = values["act_ema_momentum"]
    check(isinstance(m, (int, float)) and 0.0 <= m < 1.0, f"act_ema_momentum must be in [0, 1), got {m!r}")
    values["act_ema_momentum"] = float(m)
    check(values["act_unobserved_steps"] in ("nearest", "error"),
          f"act_unobserved_steps must be 'nearest' or 'error', got {values['act_unobserved_steps']!r}")
    wr = _coerce_w_range(values["w_range"])
    check(wr.method in ("mse", "minmax"), f"w_range.method must be 'mse' or 'minmax', got {wr.method!r}")
    check(wr.grid >= 1 and wr.shrink >= 0 and 1.0 - (wr.grid - 1) * wr.shrink > 0,
          f"w_range: grid ({wr.grid}) and shrink ({wr.shrink}) must keep every candidate range positive")
    check(wr.norm_p > 0 and wr.chunk_elements >= 1, "w_range.norm_p and w_range.chunk_elements must be positive")
    values["w_range"] = wr

    overrides = [o if isinstance(o, LayerOverride) else LayerOverride(**o) for o in (config.overrides or [])]
    for i, o in enumerate(overrides):
        _check_override(o, i)
    return QuantSettings(w_bits=config.w_bits, a_bits=config.a_bits, preset=name, preset_path=str(path),
                         overrides=overrides, **values)


__all__ = ["ROLES", "LayerOverride", "QuantConfig", "QuantSettings", "WeightRangeConfig", "resolve_config",
           "PRESET_KEYS", "FP_ACT_BITS"]
