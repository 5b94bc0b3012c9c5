"""Fake-quantized convolution and linear layers, created from FP layers through a registry keyed by class.

A :class:`QuantLayer` keeps the FP ``weight`` / ``bias`` as buffers (never trainable), a weight
quantizer (:class:`AdaRoundQuantizer`) and an input quantizer (:class:`ActQuantizer`, a
:class:`SplitActQuantizer` for split shortcut inputs, or None when its input stays FP). Activations
are quantized at the layer *input*, as in Q-Diffusion and TFMQ-DM.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gaq.errors import check
from gaq.quant.adaround import AdaRoundQuantizer
from gaq.quant.config import FP_ACT_BITS, QuantSettings
from gaq.quant.quantizer import ActQuantizer, SplitActQuantizer
from gaq.quant.step_context import StepContext


@dataclass
class LayerSpec:
    """How one layer is quantized (the plan entry of a layer; saved with exported models).

    Attributes:
        path: module path in the model.
        fp_class: class name of the FP layer.
        role: the layer's role (see :data:`gaq.quant.config.ROLES`).
        w_bits: weight bits.
        a_bits: input-activation bits (32 = the input stays FP).
        split: input-channel group sizes of a split shortcut input, or None.
    """

    path: str
    fp_class: str
    role: str
    w_bits: int
    a_bits: int
    split: list[int] | None = None


def make_act_quantizer(bits: int, settings: QuantSettings, context: StepContext, name: str,
                       device: torch.device | None = None) -> ActQuantizer:
    """An activation quantizer configured as ``settings`` says (per-step scales, symmetry, LSQ), on ``device``."""
    return ActQuantizer(bits, symmetric=settings.act_symmetric,
                        num_steps=context.num_steps if settings.per_step_act else 1,
                        learn_step=settings.act_learn_step, momentum=settings.act_ema_momentum,
                        context=context, name=name, device=device)


class QuantLayer(nn.Module):
    """Base of the fake-quantized layers.

    Attributes:
        weight: the FP weight (buffer). bias: the FP bias (buffer) or None.
        weight_quantizer: :class:`AdaRoundQuantizer` of ``weight``.
        input_quantizer: :class:`ActQuantizer`, :class:`SplitActQuantizer` or None.
        spec: the :class:`LayerSpec` it was built from.
    """

    weight: Tensor
    bias: Tensor | None

    def __init__(self, fp: nn.Module, spec: LayerSpec, settings: QuantSettings, context: StepContext,
                 *, init_range: bool = True):
        super().__init__()
        self.spec = spec
        self.register_buffer("weight", fp.weight.detach())
        self.register_buffer("bias", None if fp.bias is None else fp.bias.detach())
        self.weight_quantizer = AdaRoundQuantizer(self.weight, spec.w_bits, range_cfg=settings.w_range,
                                                  in_splits=spec.split, init_range=init_range)
        self.input_quantizer: nn.Module | None = None
        if spec.a_bits != FP_ACT_BITS:
            if spec.split:
                parts = [make_act_quantizer(spec.a_bits, settings, context, f"{spec.path}.input_quantizer.parts.{i}",
                                            self.weight.device) for i in range(len(spec.split))]
                self.input_quantizer = SplitActQuantizer(spec.split, parts)
            else:
                self.input_quantizer = make_act_quantizer(spec.a_bits, settings, context, f"{spec.path}.input_quantizer",
                                                          self.weight.device)

    def set_quant_state(self, weight: bool, act: bool) -> None:
        """Turn weight and input quantization on or off."""
        self.weight_quantizer.enabled = bool(weight)
        if self.input_quantizer is not None:
            for m in self.input_quantizer.modules():
                if isinstance(m, ActQuantizer):
                    m.enabled = bool(act)

    def quantized_weight(self) -> Tensor:
        """The weight used in forward: fake-quantized when weight quantization is on, else FP."""
        return self.weight_quantizer(self.weight) if self.weight_quantizer.enabled else self.weight

    def integer_codes(self) -> Tensor:
        """The hard integer codes of the weight, uint8 of the weight's shape."""
        return self.weight_quantizer.integer_codes(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._op(x, self.quantized_weight())

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError


class QuantConv2d(QuantLayer):
    """Fake-quantized ``nn.Conv2d`` (any padding mode)."""

    def __init__(self, fp: nn.Conv2d, spec: LayerSpec, settings: QuantSettings, context: StepContext,
                 *, init_range: bool = True):
        super().__init__(fp, spec, settings, context, init_range=init_range)
        self.in_channels, self.out_channels = fp.in_channels, fp.out_channels
        self.kernel_size, self.stride, self.padding = fp.kernel_size, fp.stride, fp.padding
        self.dilation, self.groups, self.padding_mode = fp.dilation, fp.groups, fp.padding_mode
        self._reversed_padding_repeated_twice = fp._reversed_padding_repeated_twice

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"w_bits={self.spec.w_bits}, a_bits={self.spec.a_bits}")

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class QuantLinear(QuantLayer):
    """Fake-quantized ``nn.Linear``."""

    def __init__(self, fp: nn.Linear, spec: LayerSpec, settings: QuantSettings, context: StepContext,
                 *, init_range: bool = True):
        super().__init__(fp, spec, settings, context, init_range=init_range)
        self.in_features, self.out_features = fp.in_features, fp.out_features

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, w_bits={self.spec.w_bits}, a_bits={self.spec.a_bits}"

    def _op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)


#: FP layer class -> its quantized class. Subclasses (e.g. diffusers' LoRACompatibleConv) are found by MRO.
QUANT_LAYERS: dict[type[nn.Module], type[QuantLayer]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def register_quant_layer(fp_class: type[nn.Module]) -> Callable[[type[QuantLayer]], type[QuantLayer]]:
    """Class decorator: register a :class:`QuantLayer` subclass as the quantized form of ``fp_class``."""
    def deco(cls: type[QuantLayer]) -> type[QuantLayer]:
        check(issubclass(cls, QuantLayer), f"{cls.__name__} must subclass QuantLayer")
        QUANT_LAYERS[fp_class] = cls
        return cls
    return deco


def quant_class_for(module: nn.Module) -> type[QuantLayer] | None:
    """The quantized class of ``module`` (MRO lookup), or None if it is not quantizable."""
    if isinstance(module, QuantLayer):
        return None
    for cls in type(module).__mro__:
        if cls in QUANT_LAYERS:
            return QUANT_LAYERS[cls]
    return None
