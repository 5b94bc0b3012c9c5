"""Deployment: a calibrated fake-quantized model turned into one that stores and computes in integers.

``dmodel = gaq.deploy(qmodel, DeployConfig(dtype="bfloat16"))`` replaces, in place, every fake-quantized
convolution / linear layer of ``qmodel`` (:mod:`gaq.quant.layers`) by its deployed form
(:mod:`gaq.deploy.layers`): 4-bit weights resident two per byte and 8-bit ones as int8, inputs quantized
with the calibrated static scales (per sampling step, selected on the device) and int8 GEMMs with exact
integer accumulation (``torch._int_mm`` or gaq's Triton kernels, :mod:`gaq.deploy.triton_kernels`).
Everything else of the model (norms, attention, layers kept FP) runs in ``dtype``; the quantized
operands it keeps in floating point (attention's queries, keys, values and probabilities) are
fake-quantized in one pass each (:class:`gaq.deploy.layers.DeployedFakeQuant`, float32 inside), and on a GPU
the quantized attention can run as one kernel (``attention_kernel``,
:class:`gaq.deploy.attention.DeployedAttnProcessor`) and a GELU feed-forward block's hidden activations leave
the first GEMM as the second's int8 codes (``fuse_feedforward``, :class:`gaq.deploy.feedforward.DeployedFeedForward`).
The
deployed model is a drop-in for the FP model in a diffusers pipeline.

Where it sits in the pipeline: it reads only the quantized model (``gaq.quant``), so evaluation can run
a deployed model; it is the runtime form of a quantized model, not a file format: save the quantized
model (``qmodel.save_pretrained``) before deploying, and deploy again after :func:`gaq.from_pretrained`.
"""
from __future__ import annotations

import torch
from torch import nn

from gaq.deploy.attention import DeployedAttnProcessor, deploy_attention
from gaq.deploy.config import DTYPES, DeployConfig
from gaq.deploy.feedforward import DeployedFeedForward, deploy_feedforward
from gaq.deploy.layers import DEPLOYED_LAYERS, DeployedConv2d, DeployedFakeQuant, DeployedLayer, DeployedLinear
from gaq.deploy.transformer_block import DeployedAdaNormZeroBlock, deploy_transformer_blocks
from gaq.errors import GaqError, check
from gaq.quant.quantizer import ActQuantizer
from gaq.quant.step_context import timestep_argument
from gaq.quant.wrap import iter_quant_layers, quant_info, replace_modules


class InputCast:
    """Root-model forward pre-hook of a deployed model: floating-point inputs to the compute dtype (the
    timestep argument excepted: a float timestep keeps its precision), so callers may pass float32."""

    def __init__(self, dtype: torch.dtype, timestep: tuple[int, str] | None):
        self.dtype, self.timestep = dtype, timestep

    def _cast(self, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(self.dtype)
        if isinstance(value, dict):
            return {k: self._cast(v) for k, v in value.items()}
        return value

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        pos, name = self.timestep if self.timestep is not None else (-1, None)
        args = tuple(a if i == pos else self._cast(a) for i, a in enumerate(args))
        kwargs = {k: v if k == name else self._cast(v) for k, v in kwargs.items()}
        return args, kwargs


class DeployedSavePretrained:
    """``save_pretrained`` of a deployed model: refused with the way to save it."""

    def __call__(self, *args, **kwargs):
        raise GaqError("a deployed model does not save: save the quantized model before gaq.deploy "
                       "(qmodel.save_pretrained(folder)), then gaq.deploy(gaq.from_pretrained(folder)) where it runs")


def deploy(qmodel: nn.Module, config: DeployConfig | None = None) -> nn.Module:
    """Turn a calibrated fake-quantized model into its deployed form, in place.

    Args:
        qmodel: a model from :func:`gaq.quantize` / :func:`gaq.calibrate` / :func:`gaq.from_pretrained` with
            weight quantization on and its activation quantizers calibrated; on the device it will run on
            (move it first: the packed codes are built where the layers are).
        config: compute dtype and kernels (:class:`DeployConfig`); default bfloat16 with the fastest kernels.

    Returns:
        ``qmodel`` itself: its quantized layers replaced by :class:`DeployedLinear` / :class:`DeployedConv2d`,
        its other floating-point tensors cast to ``config.dtype``, in eval mode; it takes inputs of any
        floating dtype (cast to ``config.dtype``, the timestep excepted) and returns ``config.dtype``.

    Raises:
        GaqError: not a gaq-quantized model, already deployed, a layer with weight quantization off or an
            uncalibrated input quantizer, or a quantized layer class without a deployed form.
    """
    config = config or DeployConfig()
    check(isinstance(config, DeployConfig), f"deploy's config must be a gaq.deploy.DeployConfig, got {type(config).__name__}")
    check(not any(isinstance(m, DeployedLayer) for m in qmodel.modules()), "this model is already deployed")
    info = quant_info(qmodel)
    layers = list(iter_quant_layers(qmodel))
    check(layers, f"{type(qmodel).__name__} has no quantized layers to deploy")
    deployed: dict[int, nn.Module] = {}
    for path, layer in layers:
        cls = DEPLOYED_LAYERS.get(type(layer))
        check(cls is not None, f"layer {path} is a {type(layer).__name__}, which has no deployed form "
              f"(deployable: {', '.join(c.__name__ for c in DEPLOYED_LAYERS)})")
        deployed[id(layer)] = cls(layer, config, path)
    replace_modules(qmodel, lambda child: deployed.get(id(child)))
    deploy_attention(qmodel, config)  # quantized attention: one kernel where it runs
    if config.fuse_feedforward:  # GELU feed-forward blocks: the activation and fc2's codes in fc1's epilogue
        deploy_feedforward(qmodel)
    if config.fuse_norms:  # DiT blocks: each norm writes its consumers' int8 codes
        deploy_transformer_blocks(qmodel)
    replace_modules(qmodel, lambda child: DeployedFakeQuant(child)  # other quantized operands kept in FP: one pass
                    if isinstance(child, ActQuantizer) and child.enabled and child.ready else None)
    dtype = config.torch_dtype
    keep = {id(m) for d in qmodel.modules() if isinstance(d, (DeployedLayer, DeployedFakeQuant)) for m in d.modules()}
    for module in qmodel.modules():  # the FP parts to the compute dtype; deployed layers keep their dtypes
        if id(module) in keep:
            continue
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None and t.is_floating_point():
                t.data = t.data.to(dtype)
    if info.context is not None:
        info.context.check_device_timesteps = config.check_device_timesteps
        device = next((t.device for t in qmodel.buffers()), None)
        if device is not None:  # the step lookup's timesteps on the device before any compiled call
            info.context.keep_on(device)
    qmodel.register_forward_pre_hook(InputCast(dtype, timestep_argument(qmodel)), with_kwargs=True)
    qmodel.save_pretrained = DeployedSavePretrained()
    qmodel.gaq_deploy = config
    return qmodel.eval()


__all__ = ["DTYPES", "DeployConfig", "DeployedAdaNormZeroBlock", "DeployedAttnProcessor", "DeployedFeedForward", "DeployedConv2d", "DeployedFakeQuant", "DeployedLayer", "DeployedLinear", "deploy"]
