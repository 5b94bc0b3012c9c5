"""A quantizing attention processor for diffusers' ``Attention``.

diffusers' default processor calls ``scaled_dot_product_attention``, so the attention matmul
operands are unreachable; :class:`QuantAttnProcessor` computes the scores explicitly and quantizes
the query, key, softmax output and value (Q-Diffusion's attention quantization). The projections
``to_q`` / ``to_k`` / ``to_v`` / ``to_out[0]`` are ordinary :class:`~gaq.quant.layers.QuantLinear`.
Installed per module with ``Attention.set_processor`` (UNet2DModel has no ``set_attn_processor``).
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from gaq.errors import check
from gaq.quant.config import QuantSettings
from gaq.quant.layers import make_act_quantizer
from gaq.quant.quantizer import ActQuantizer
from gaq.quant.step_context import StepContext


def supports_quant_attention(attn: Attention) -> bool:
    """Whether :class:`QuantAttnProcessor` reproduces ``attn``'s default processor (plain q/k/v attention)."""
    return getattr(attn, "added_kv_proj_dim", None) is None and not getattr(attn, "is_causal", False)


class QuantAttnProcessor(nn.Module):
    """Attention with explicit scores and fake-quantized matmul operands.

    Operand tensors are batch first: q / k / v ``(B, heads, L, head_dim)`` and the softmax output
    ``(B, heads, L_q, L_k)``, so per-step scales select per sample. With every quantizer off the
    output equals diffusers' ``AttnProcessor2_0`` (up to float rounding of the explicit softmax).

    Submodules: ``q_quantizer``, ``k_quantizer``, ``v_quantizer`` (activation bits) and
    ``softmax_quantizer`` (softmax bits, asymmetric: its range starts at 0).
    """

    def __init__(self, bits: int, softmax_bits: int, settings: QuantSettings, context: StepContext, name: str = "",
                 device: torch.device | None = None):
        super().__init__()
        self.q_quantizer = make_act_quantizer(bits, settings, context, f"{name}.q_quantizer", device)
        self.k_quantizer = make_act_quantizer(bits, settings, context, f"{name}.k_quantizer", device)
        self.v_quantizer = make_act_quantizer(bits, settings, context, f"{name}.v_quantizer", device)
        self.softmax_quantizer = ActQuantizer(
            softmax_bits, symmetric=False, num_steps=self.q_quantizer.num_steps, learn_step=settings.act_learn_step,
            momentum=settings.act_ema_momentum, context=context, name=f"{name}.softmax_quantizer", device=device)

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, **kwargs) -> Tensor:
        # an explicit signature: Attention.forward drops keyword arguments its processor's __call__ does not name
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def set_quant_state(self, act: bool) -> None:
        for q in (self.q_quantizer, self.k_quantizer, self.v_quantizer, self.softmax_quantizer):
            q.enabled = bool(act)

    def forward(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        hidden_states = self.attention(attn, hidden_states, encoder_hidden_states, attention_mask)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attention(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor,
                  attention_mask: Tensor | None) -> Tensor:
        """Projections and attention with the operands fake-quantized, ``(B, L, C)`` -> ``(B, L_q, heads * head_dim)``
        in the query's dtype (before the output projection)."""
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out_dtype = query.dtype
        query, key = self.q_quantizer(query), self.k_quantizer(key)
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        if attn.upcast_softmax:
            scores = scores.float()
        probs = scores.softmax(dim=-1).to(out_dtype)
        probs, value = self.softmax_quantizer(probs), self.v_quantizer(value)
        hidden_states = torch.matmul(probs, value)
        return hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(out_dtype)


def install_quant_attention(attn: Attention, bits: int, softmax_bits: int, settings: QuantSettings,
                            context: StepContext, name: str) -> QuantAttnProcessor:
    """Set a :class:`QuantAttnProcessor` on ``attn`` (it becomes the submodule ``attn.processor``)."""
    check(supports_quant_attention(attn), f"attention operand quantization does not support the attention at {name!r} "
          "(added key/value projections or causal masking): set quantize_attention: false")
    device = next((t.device for t in attn.parameters()), next((t.device for t in attn.buffers()), None))
    proc = QuantAttnProcessor(bits, softmax_bits, settings, context, name=f"{name}.processor", device=device)
    attn.set_processor(proc)
    return proc
