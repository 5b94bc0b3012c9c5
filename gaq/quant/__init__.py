"""The quantization engine: quantizers, AdaRound, quantized layers and attention, presets, RTN, save/load.

``qmodel = gaq.quant.quantize(unet, QuantConfig(w_bits=4, a_bits=8, preset="tfmq_compat"), timesteps=ts)``
gives a deep-copied, fake-quantized model; the calibration engine (``gaq.calib``) tunes its rounding
logits block by block and :func:`calibrate_activations` sets its activation ranges.
"""
from gaq.quant.act_calib import act_observer_buffers, calibrate_activations, finalize_act_calibration
from gaq.quant.adaround import AdaRoundQuantizer, BetaSchedule, adaround_beta
from gaq.quant.attention import QuantAttnProcessor
from gaq.quant.config import ROLES, LayerOverride, QuantConfig, QuantSettings, WeightRangeConfig, resolve_config
from gaq.quant.export import load_quantized, read_quant_config, save_quantized, stored_weight_bytes
from gaq.quant.layers import QUANT_LAYERS, LayerSpec, QuantConv2d, QuantLayer, QuantLinear, register_quant_layer
from gaq.quant.presets import available_presets
from gaq.quant.pretrained import from_pretrained
from gaq.quant.quantizer import ActQuantizer, SplitActQuantizer
from gaq.quant.rtn import quantize_rtn
from gaq.quant.step_context import StepContext, UncalibratedTimestepWarning, set_step_index
from gaq.quant.wrap import (QuantInfo, QuantPlan, act_step_parameters, iter_act_quantizers, iter_quant_layers,
                            plan_quantization, quant_info, quantize, rounding_parameters, set_adaround_soft,
                            set_quant_state, set_rounding_mode)

__all__ = [
    "ROLES", "QUANT_LAYERS", "ActQuantizer", "AdaRoundQuantizer", "BetaSchedule", "LayerOverride", "LayerSpec",
    "QuantAttnProcessor", "QuantConfig", "QuantConv2d", "QuantInfo", "QuantLayer", "QuantLinear", "QuantPlan",
    "QuantSettings", "SplitActQuantizer", "StepContext", "UncalibratedTimestepWarning", "WeightRangeConfig",
    "act_observer_buffers", "act_step_parameters", "adaround_beta", "available_presets", "calibrate_activations",
    "finalize_act_calibration", "from_pretrained", "iter_act_quantizers", "iter_quant_layers", "load_quantized",
    "plan_quantization", "quant_info", "quantize", "quantize_rtn", "read_quant_config", "register_quant_layer",
    "resolve_config", "rounding_parameters", "save_quantized", "set_adaround_soft", "set_quant_state",
    "set_rounding_mode", "set_step_index", "stored_weight_bytes",
]
