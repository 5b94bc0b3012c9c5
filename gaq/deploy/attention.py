"""The deployed attention processor: quantized attention in one kernel where it can, the explicit form elsewhere.

:class:`DeployedAttnProcessor` takes the place of a calibrated :class:`gaq.quant.QuantAttnProcessor`. Its
query / key / value / softmax quantizers become :class:`gaq.deploy.layers.DeployedFakeQuant` (as every
quantized operand a deployed model keeps in floating point), and on a CUDA device with Triton (per
``deploy.attention_kernel``) the projections hand int8 codes to one kernel that computes the whole quantized
attention, :func:`gaq.deploy.triton_attention.attention`; calls it does not cover (an attention mask, query /
key normalisation, projections that are not integer deployed layers, a head dim above 256, grids above 8
bits) and other devices run the processor's explicit form with the deployed fake quantizers.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from gaq.deploy import triton_attention
from gaq.deploy.config import DeployConfig
from gaq.deploy.layers import DeployedFakeQuant, DeployedLinear, use_triton
from gaq.errors import check
from gaq.quant.attention import QuantAttnProcessor
from gaq.quant.quantizer import ActQuantizer

_OPERANDS = ("q_quantizer", "k_quantizer", "v_quantizer")


class DeployedAttnProcessor(QuantAttnProcessor):
    """A deployed :class:`QuantAttnProcessor` (same submodules, each quantizer a :class:`DeployedFakeQuant`).

    Fused path: the projections ``to_q`` / ``to_k`` / ``to_v`` quantize their outputs in their GEMMs' epilogue with
    the operand grids (int8 codes ``c - offset``, :meth:`gaq.deploy.layers.DeployedLinear.codes_out`) and
    :func:`gaq.deploy.triton_attention.attention` takes the codes.
    """

    def __init__(self, proc: QuantAttnProcessor, config: DeployConfig, path: str):
        nn.Module.__init__(self)
        for name in _OPERANDS + ("softmax_quantizer",):
            q = getattr(proc, name)
            check(isinstance(q, ActQuantizer) and q.enabled and q.ready,
                  f"attention {path}: its {name} is off or not calibrated: calibrate the model's activations first")
            setattr(self, name, DeployedFakeQuant(q))
        self.kernel, self.path = config.attention_kernel, path

    def set_quant_state(self, act: bool) -> None:
        check(bool(act), "a deployed model's attention quantization cannot be turned off: set the quantization state "
              "on the quantized model before gaq.deploy")

    def _fused(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor,
               attention_mask: Tensor | None) -> bool:
        """Whether this call runs the one-kernel attention (see :class:`DeployedAttnProcessor`)."""
        if not use_triton(self.kernel, hidden_states.device, f"attention {self.path}", "attention_kernel"):
            return False
        projections = (attn.to_q, attn.to_k, attn.to_v)
        if attention_mask is not None or attn.norm_q is not None or attn.norm_k is not None or not all(
                isinstance(p, DeployedLinear) and p.fuses_output(hidden_states) for p in projections):
            return False
        quantizers = [getattr(self, n) for n in _OPERANDS + ("softmax_quantizer",)]
        return (attn.to_q.out_features == attn.to_k.out_features == attn.to_v.out_features
                and triton_attention.supported(attn.to_k.out_features // attn.heads, encoder_hidden_states.shape[1],
                                               tuple(q.bits for q in quantizers)))

    def attention(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor,
                  attention_mask: Tensor | None) -> Tensor:
        if not self._fused(attn, hidden_states, encoder_hidden_states, attention_mask):
            return super().attention(attn, hidden_states, encoder_hidden_states, attention_mask)
        batch, heads = hidden_states.shape[0], attn.heads
        codes, columns = [], []
        for name, proj, x in zip(_OPERANDS, (attn.to_q, attn.to_k, attn.to_v),
                                 (hidden_states, encoder_hidden_states, encoder_hidden_states)):
            q = getattr(self, name)
            scale, zero = q.step_grid(batch)
            offset = q.offset
            a, _ = proj.codes_out(x, "none", (scale, zero), (q.qmin, q.qmax, offset), False)
            codes.append(a.view(batch, -1, heads, a.shape[-1] // heads).transpose(1, 2))
            columns += [scale.expand(batch), (offset - zero).expand(batch)]
        p = self.softmax_quantizer
        scale, zero = p.step_grid(batch)
        grids = torch.stack(columns + [scale.expand(batch), zero.expand(batch)], dim=1).float()
        return triton_attention.attention(*codes, grids, attn.scale, (p.qmin, p.qmax), hidden_states.dtype)


def deploy_attention(model: nn.Module, config: DeployConfig) -> int:
    """Replace every calibrated :class:`QuantAttnProcessor` of ``model`` (its quantizers on) by a
    :class:`DeployedAttnProcessor`; returns how many. Processors with the quantizers off stay as they are."""
    count = 0
    for path, attn in model.named_modules():
        proc = getattr(attn, "processor", None)
        if isinstance(attn, Attention) and type(proc) is QuantAttnProcessor and proc.q_quantizer.enabled:
            attn.set_processor(DeployedAttnProcessor(proc, config, path))
            count += 1
    return count


__all__ = ["DeployedAttnProcessor", "deploy_attention"]
