"""The deployed DiT block: each of its norms hands the layers after it their int8 input codes in one kernel.

A diffusers ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"`` (DiT) computes

    shift, scale, gate (x2) = adaLN(emb);  h = LN(x) * (1 + scale_msa) + shift_msa;  x = x + gate_msa * attn(h)
    h = LN(x) * (1 + scale_mlp) + shift_mlp;  x = x + gate_mlp * ff(h)

and with the attention's query / key / value projections and the feed-forward's first layer deployed as int8-input
GEMMs, each ``h`` exists only to be quantized by the layers reading it. :class:`DeployedAdaNormZeroBlock` computes
each norm (the second with the residual update before it) as one :func:`gaq.deploy.triton_norm.norm_codes` kernel
that writes the consumers' codes, so ``h`` never reaches memory in the compute dtype; the projections run
:meth:`gaq.deploy.layers.DeployedLinear.from_codes` and the attention itself is PyTorch's
``scaled_dot_product_attention``, as diffusers' ``AttnProcessor2_0`` runs it. It is the block itself (a subclass
adopting the instance's state: module paths and ``state_dict`` unchanged) and runs diffusers' forward wherever the
fused path does not apply (another device or kernel choice, an attention mask, training mode).

Which blocks: ``ada_norm_zero`` without cross-attention, positional embedding or chunked feed-forward, the attention
on diffusers' ``AttnProcessor2_0`` (its operands not quantized: presets such as ``tfmq_compat``) without group /
spatial / query-key norms, and a GELU feed-forward (:class:`gaq.deploy.feedforward.DeployedFeedForward` or
diffusers' own), all four input layers integer deployed layers.
"""
from __future__ import annotations

import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import Tensor, nn

from gaq.deploy import triton_norm
from gaq.deploy.feedforward import GELU_ACTIVATIONS, DeployedFeedForward
from gaq.deploy.layers import DeployedLinear
from gaq.quant.wrap import replace_modules


def _integer(layer: nn.Module) -> bool:
    return isinstance(layer, DeployedLinear) and layer.integer and len(layer.parts) == 1


def _gelu_feedforward(ff: nn.Module) -> bool:
    """Whether ``ff`` is a GELU feed-forward whose two layers are integer deployed layers."""
    if type(ff) not in (FeedForward, DeployedFeedForward):
        return False
    net = list(ff.net)
    return (len(net) in (3, 4) and type(net[0]) is GELU and net[0].approximate in GELU_ACTIVATIONS
            and _integer(net[0].proj) and _integer(net[2])
            and all(isinstance(m, nn.Dropout) for m in net[1::2]))


class DeployedAdaNormZeroBlock(BasicTransformerBlock):
    """A DiT block whose norms quantize for the layers after them (see the module docstring)."""

    @classmethod
    def adopt(cls, block: BasicTransformerBlock) -> "DeployedAdaNormZeroBlock":
        """This class over ``block``'s own submodules, parameters and settings (``block`` is replaced by it)."""
        new = cls.__new__(cls)
        new.__dict__.update(block.__dict__)
        return new

    @staticmethod
    def fusable(block: nn.Module) -> bool:
        """Whether ``block`` is a block this class runs (see the module docstring)."""
        if type(block) is not BasicTransformerBlock or block.norm_type != "ada_norm_zero":
            return False
        attn = block.attn1
        return (block.attn2 is None and block.pos_embed is None and block._chunk_size is None
                and not block.only_cross_attention and not hasattr(block, "fuser")
                and type(block.norm1.norm) is nn.LayerNorm and type(block.norm3) is nn.LayerNorm
                and type(attn.processor) is AttnProcessor2_0 and attn.spatial_norm is None
                and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None
                and not attn.residual_connection and attn.rescale_output_factor == 1.0
                and all(_integer(p) for p in (attn.to_q, attn.to_k, attn.to_v)) and _gelu_feedforward(block.ff))

    def _fuses(self, x: Tensor, attention_mask, cross_attention_kwargs) -> bool:
        """Whether this call runs the fused path."""
        attn = self.attn1
        layers = (attn.to_q, attn.to_k, attn.to_v, self.ff.net[0].proj, self.ff.net[2])
        return (not self.training and attention_mask is None and not cross_attention_kwargs and x.ndim == 3
                and triton_norm.AVAILABLE
                and type(self.attn1.processor) is AttnProcessor2_0 and all(p.fuses_output(x) for p in layers))

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                timestep: Tensor | None = None, cross_attention_kwargs: dict | None = None,
                class_labels: Tensor | None = None, added_cond_kwargs: dict | None = None) -> Tensor:
        if not self._fuses(hidden_states, attention_mask, cross_attention_kwargs):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        b, t, c = hidden_states.shape
        norm1, attn = self.norm1, self.attn1
        emb = norm1.linear(norm1.silu(norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        x = hidden_states.reshape(b * t, c)

        projections = (attn.to_q, attn.to_k, attn.to_v)
        qkv = triton_norm.norm_codes(x, t, norm1.norm.eps, [p.input_quantizer(b) for p in projections],
                                     weight=norm1.norm.weight, bias=norm1.norm.bias, scale=scale_msa, shift=shift_msa,
                                     rowsum=any(p.needs_rowsum() for p in projections))
        q, k, v = (p.from_codes(a, s, (b, t)) for p, a, s in zip(projections, qkv.codes, qkv.rowsums))
        head = k.shape[-1] // attn.heads
        q, k, v = (u.view(b, -1, attn.heads, head).transpose(1, 2) for u in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        o = attn.to_out[0](o.transpose(1, 2).reshape(b, -1, attn.heads * head).to(q.dtype))
        o = attn.to_out[1](o)

        fc1, fc2 = self.ff.net[0].proj, self.ff.net[2]
        mlp = triton_norm.norm_codes(x, t, self.norm3.eps, [fc1.input_quantizer(b)], weight=self.norm3.weight,
                                     bias=self.norm3.bias, scale=scale_mlp, shift=shift_mlp, branch=o.reshape(b * t, c),
                                     gate=gate_msa, rowsum=fc1.needs_rowsum())
        a, rowsum = mlp.codes[0], mlp.rowsums[0]
        if isinstance(self.ff, DeployedFeedForward):  # the GELU and fc2's codes in fc1's epilogue
            scale, zero, *code_range = fc2.input_quantizer(b)
            h, h_rowsum = fc1.codes_out_of_codes(a, rowsum, b, self.ff.activation, (scale, zero), tuple(code_range),
                                                 fc2.needs_rowsum())
            ff = fc2.from_codes(h, h_rowsum, (b, t))
        else:  # fc1's output in memory; its GELU and fc2's input quantization fused by torch.compile: measured on an
            # H200 (bench/results/deploy/h200_dit_norms.md), Inductor's kernel took 3.75 ms in its 28 launches against
            # 4.44 ms for gaq's one-pass GELU + quantization kernel (DiT-XL/2 W4A8, batch 64)
            ff = self.ff.net[0].gelu(fc1.from_codes(a, rowsum, (b, t)))
            for module in self.ff.net[1:]:
                ff = module(ff)
        return gate_mlp.unsqueeze(1) * ff + mlp.stream.view(b, t, c)


def deploy_transformer_blocks(model: nn.Module) -> int:
    """Make every block of ``model`` that :meth:`DeployedAdaNormZeroBlock.fusable` accepts a
    :class:`DeployedAdaNormZeroBlock`; returns how many."""
    return replace_modules(model, lambda child: DeployedAdaNormZeroBlock.adopt(child)
                           if DeployedAdaNormZeroBlock.fusable(child) else None)


__all__ = ["DeployedAdaNormZeroBlock", "deploy_transformer_blocks"]
