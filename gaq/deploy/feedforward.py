"""The deployed feed-forward block: its GELU and the second layer's input quantization in the first GEMM's epilogue.

A diffusers ``FeedForward`` with a ``GELU`` activation (DiT, PixArt, the UNets' transformer blocks with
``activation_fn`` ``gelu`` / ``gelu-approximate``) computes ``fc2(gelu(fc1(x)))``; with both layers deployed as
int8-activation GEMMs, fc2 quantizes fc1's activated output at once. :class:`DeployedFeedForward` runs fc1's
GEMM with the GELU and fc2's input quantization in its epilogue
(:meth:`gaq.deploy.layers.DeployedLinear.codes_out`): the hidden activations (4x the model width per token)
reach memory once, as int8 codes, instead of three times in the compute dtype. It keeps the block's ``net``
(module paths unchanged) and runs it module by module where the fused kernel does not apply (another
device, a split layer, training mode).
"""
from __future__ import annotations

from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from torch import Tensor, nn

from gaq.deploy.layers import DeployedLinear
from gaq.quant.wrap import replace_modules

#: diffusers GELU's ``approximate`` -> the kernels' activation (:data:`gaq.deploy.triton_kernels.ACTIVATIONS`).
GELU_ACTIVATIONS = {"none": "gelu", "tanh": "gelu_tanh"}


class DeployedFeedForward(nn.Module):
    """A deployed ``FeedForward`` of ``net = [GELU(proj), Dropout, Linear(, Dropout)]`` (see the module docstring)."""

    def __init__(self, ff: FeedForward):
        super().__init__()
        self.net = ff.net
        self.activation = GELU_ACTIVATIONS[ff.net[0].approximate]

    @staticmethod
    def fusable(module: nn.Module) -> bool:
        """Whether ``module`` is a ``FeedForward`` this class runs: GELU first, both layers deployed with int8
        inputs, dropouts only between and after them."""
        if type(module) is not FeedForward:
            return False
        net = list(module.net)
        return (len(net) in (3, 4) and type(net[0]) is GELU and net[0].approximate in GELU_ACTIVATIONS
                and isinstance(net[0].proj, DeployedLinear) and net[0].proj.integer
                and all(isinstance(m, nn.Dropout) for m in net[1::2])
                and isinstance(net[2], DeployedLinear) and net[2].integer)

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        fc1, fc2 = self.net[0].proj, self.net[2]
        if self.training or not (fc1.fuses_output(hidden_states) and fc2.fuses_output(hidden_states)):
            for module in self.net:
                hidden_states = module(hidden_states)
            return hidden_states
        scale, zero, *code_range = fc2.input_quantizer(hidden_states.shape[0] if hidden_states.ndim > 1 else 1)
        codes, rowsum = fc1.codes_out(hidden_states, self.activation, (scale, zero), tuple(code_range),
                                      fc2.needs_rowsum())  # the dropouts are identities in eval
        return fc2.from_codes(codes, rowsum, hidden_states.shape[:-1])


def deploy_feedforward(model: nn.Module) -> int:
    """Replace every fusable ``FeedForward`` of ``model`` (:meth:`DeployedFeedForward.fusable`) by a
    :class:`DeployedFeedForward`; returns how many."""
    return replace_modules(model, lambda child: DeployedFeedForward(child) if DeployedFeedForward.fusable(child) else None)


__all__ = ["GELU_ACTIVATIONS", "DeployedFeedForward", "deploy_feedforward"]
