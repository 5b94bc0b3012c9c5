"""Layer roles and shortcut split points, derived from model structure (never from names or indices).

Two registries keyed by class:

- :data:`ROOT_ROLES`: root-model class -> function naming model-level layers (the model's first and
  last layer, the time-embedding MLP), read from the model class's own attributes
  (``UNet2DModel.conv_in`` and so on);
- :data:`BLOCK_ROLES`: block class -> ``{attribute path: role}`` for layers a block owns
  (``ResnetBlock2D.conv_shortcut`` is a shortcut, ``Downsample2D.conv`` a downsample conv, ...).

:data:`SPLIT_POINTS` maps a root-model class to a function giving, for the ResBlocks of its decoder
that receive ``cat([decoder, skip])``, the decoder's channel count (Q-Diffusion's split point).
"""
from __future__ import annotations

from typing import Callable

from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets import unet_2d_blocks as blocks
from diffusers.models.upsampling import Upsample2D
from torch import nn

from gaq.errors import check

RoleFn = Callable[[nn.Module], dict[int, str]]  # root model -> {id(layer): role}
SplitFn = Callable[[nn.Module], dict[int, list[int]]]  # root model -> {id(layer): [decoder, skip] channels}

BLOCK_ROLES: dict[type[nn.Module], dict[str, str]] = {
    ResnetBlock2D: {"conv_shortcut": "shortcut", "time_emb_proj": "time_proj"},
    Downsample2D: {"conv": "downsample"},
    Upsample2D: {"conv": "upsample"},
    Attention: {"to_q": "attn_qkv", "to_k": "attn_qkv", "to_v": "attn_qkv", "to_out.0": "attn_out"},
}

ROOT_ROLES: dict[type[nn.Module], RoleFn] = {}
SPLIT_POINTS: dict[type[nn.Module], SplitFn] = {}

#: diffusers up blocks whose ResBlock ``i`` receives ``cat([hidden_states, res_hidden_states])`` with
#: ``prev_output_channel`` decoder channels for ``i == 0`` and ``out_channels`` after (their __init__).
CONCAT_UP_BLOCKS: tuple[type[nn.Module], ...] = (
    blocks.UpBlock2D, blocks.AttnUpBlock2D, blocks.CrossAttnUpBlock2D, blocks.SkipUpBlock2D,
    blocks.AttnSkipUpBlock2D, blocks.ResnetUpsampleBlock2D, blocks.SimpleCrossAttnUpBlock2D,
)


def register_root_roles(cls: type[nn.Module]) -> Callable[[RoleFn], RoleFn]:
    """Decorator: register the role function of a root-model class."""
    def deco(fn: RoleFn) -> RoleFn:
        ROOT_ROLES[cls] = fn
        return fn
    return deco


def register_split_points(cls: type[nn.Module]) -> Callable[[SplitFn], SplitFn]:
    """Decorator: register the split-point function of a root-model class."""
    def deco(fn: SplitFn) -> SplitFn:
        SPLIT_POINTS[cls] = fn
        return fn
    return deco


def _lookup(registry: dict, model: nn.Module):
    for cls in type(model).__mro__:
        if cls in registry:
            return registry[cls]
    return None


@register_root_roles(UNet2DModel)
@register_root_roles(UNet2DConditionModel)
def _unet_roles(model: nn.Module) -> dict[int, str]:
    roles = {id(model.conv_in): "first_layer", id(model.conv_out): "last_layer"}
    if isinstance(model.time_embedding, TimestepEmbedding):
        roles[id(model.time_embedding.linear_1)] = "time_embed_first"
        roles[id(model.time_embedding.linear_2)] = "time_embed_second"
    return roles


def _dit_roles(model: nn.Module) -> dict[int, str]:
    """DiT: patch embedding in, ``proj_out_2`` out; every block's timestep MLP (AdaLayerNormZero)."""
    roles = {id(model.pos_embed.proj): "first_layer", id(model.proj_out_2): "last_layer"}
    for block in model.transformer_blocks:
        for m in block.modules():
            if isinstance(m, TimestepEmbedding):
                roles[id(m.linear_1)] = "time_embed_first"
                roles[id(m.linear_2)] = "time_embed_second"
    return roles


try:  # DiT exists in every diffusers version gaq supports, but keep the UNet path independent of it
    from diffusers import DiTTransformer2DModel
    register_root_roles(DiTTransformer2DModel)(_dit_roles)
except ImportError:  # pragma: no cover
    pass


def _pixart_roles(model: nn.Module) -> dict[int, str]:
    """PixArt: patch embedding in, ``proj_out`` out; the timestep MLP of the shared ``adaln_single``."""
    mlp = model.adaln_single.emb.timestep_embedder  # beside it: the size embedders of PixArt-alpha at 1024 px
    return {id(model.pos_embed.proj): "first_layer", id(model.proj_out): "last_layer",
            id(mlp.linear_1): "time_embed_first", id(mlp.linear_2): "time_embed_second"}


try:
    from diffusers import PixArtTransformer2DModel
    register_root_roles(PixArtTransformer2DModel)(_pixart_roles)
except ImportError:  # pragma: no cover
    pass


@register_split_points(UNet2DModel)
@register_split_points(UNet2DConditionModel)
def _unet_split_points(model: nn.Module) -> dict[int, list[int]]:
    """Follows ``UNet2DModel.__init__``: up block ``i`` gets ``prev_output_channel = reversed(block_out_channels)[max(i-1, 0)]``."""
    reversed_out = list(reversed(model.config.block_out_channels))
    splits: dict[int, list[int]] = {}
    for i, block in enumerate(model.up_blocks):
        if not isinstance(block, CONCAT_UP_BLOCKS):
            continue
        prev_output_channel = reversed_out[max(i - 1, 0)]
        for j, resnet in enumerate(block.resnets):
            decoder = prev_output_channel if j == 0 else resnet.out_channels
            skip = resnet.in_channels - decoder
            check(skip > 0 and resnet.conv1.in_channels == resnet.in_channels,
                  f"cannot derive the shortcut split of up block {i} resnet {j}: set split_shortcut: false")
            splits[id(resnet.conv1)] = [decoder, skip]
            if resnet.conv_shortcut is not None:
                splits[id(resnet.conv_shortcut)] = [decoder, skip]
    return splits


def layer_roles(model: nn.Module) -> dict[str, str]:
    """``{path: role}`` for every module path ``model`` assigns a role (others are ``body``)."""
    by_id: dict[int, str] = {}
    for _, module in model.named_modules():
        table = _lookup(BLOCK_ROLES, module)
        if table is None:
            continue
        for attr, role in table.items():
            try:
                child = module.get_submodule(attr)
            except AttributeError:
                continue
            if child is not None:
                by_id[id(child)] = role
    root_fn = _lookup(ROOT_ROLES, model)
    if root_fn is not None:
        by_id.update(root_fn(model))  # model-level roles win
    return {name: by_id[id(m)] for name, m in model.named_modules(remove_duplicate=False) if id(m) in by_id}


def has_root_roles(model: nn.Module) -> bool:
    """Whether ``model``'s class has a registered root-role function."""
    return _lookup(ROOT_ROLES, model) is not None


def shortcut_splits(model: nn.Module) -> dict[str, list[int]]:
    """``{path: [decoder_channels, skip_channels]}`` of the split-shortcut layers of ``model`` (may be empty)."""
    fn = _lookup(SPLIT_POINTS, model)
    if fn is None:
        return {}
    by_id = fn(model)
    return {name: by_id[id(m)] for name, m in model.named_modules(remove_duplicate=False) if id(m) in by_id}
