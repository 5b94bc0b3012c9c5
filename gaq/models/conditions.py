"""Prompt conditions of text models: a table of per-prompt model inputs, read from an embeddings file
or made by the pipeline's text encoder from a prompt list (:mod:`gaq.models.prompts`).

A text model (``cond_kind == "text"``) is called with ``encoder_hidden_states``; an SDXL-style UNet
(``addition_embed_type="text_time"``) also with ``added_cond_kwargs={"text_embeds", "time_ids"}``, and
a PixArt transformer with ``use_additional_conditions`` with ``added_cond_kwargs={"resolution",
"aspect_ratio"}`` (made from the image size).
A :class:`PromptTable` holds these inputs for ``P`` prompts as a flat condition dictionary
(:mod:`gaq.models.denoiser`: ``added_cond_kwargs.text_embeds`` ...), plus the unconditional
(empty-prompt) row of classifier-free guidance.

The embeddings file (safetensors) holds:

- ``cond``: prompt embeddings ``(P, L, D)`` (or ``(L, D)`` for one prompt; ``D`` is the model's
  ``cross_attention_dim``, or PixArt's ``caption_channels``), and optionally
  ``uncond`` ``(L, D)`` / ``(1, L, D)``, the empty prompt's;
- for ``text_time`` models: ``text_embeds`` ``(P, E)`` (the pooled text embedding) and, with
  ``uncond``, ``uncond_text_embeds`` ``(E,)`` / ``(1, E)``; optionally ``time_ids`` ``(P, K)`` or
  ``(K,)`` (the size and crop conditioning, shared by both halves), by default SDXL's
  ``(H, W, 0, 0, H, W)`` of the model's image size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from gaq.errors import GaqError, check

ENCODER_STATES = "encoder_hidden_states"
TEXT_EMBEDS = "added_cond_kwargs.text_embeds"
TIME_IDS = "added_cond_kwargs.time_ids"
RESOLUTION = "added_cond_kwargs.resolution"
ASPECT_RATIO = "added_cond_kwargs.aspect_ratio"


@dataclass
class PromptTable:
    """Per-prompt model inputs.

    Attributes:
        cond: flat condition dictionary, every tensor with leading dim ``P`` (one row per prompt).
        uncond: the same keys with leading dim 1 (the empty prompt), or None when the file has none.
    """

    cond: dict[str, Tensor]
    uncond: dict[str, Tensor] | None = None

    @property
    def num_prompts(self) -> int:
        return int(self.cond[ENCODER_STATES].shape[0])

    def rows(self, idx: Tensor) -> dict[str, Tensor]:
        """The conditions of prompts ``idx`` ``(B,)``."""
        return {k: v[idx] for k, v in self.cond.items()}

    def uncond_rows(self, n: int) -> dict[str, Tensor] | None:
        """The unconditional inputs repeated ``n`` times (leading dim ``n``), or None."""
        if self.uncond is None:
            return None
        return {k: v.expand(n, *v.shape[1:]) for k, v in self.uncond.items()}


def text_time_width(model: nn.Module) -> int | None:
    """``projection_class_embeddings_input_dim`` of a ``text_time`` UNet (text_embeds + time ids), else None."""
    cfg = getattr(model, "config", None) or {}
    if cfg.get("addition_embed_type") != "text_time":
        return None
    return int(cfg["projection_class_embeddings_input_dim"])


def size_conditions(model: nn.Module, image_hw: tuple[int, int]) -> dict[str, Tensor]:
    """PixArt's ``added_cond_kwargs`` when it uses them (``use_additional_conditions``, PixArt-alpha at
    1024 px): ``resolution`` ``(1, 2)`` = ``(H, W)`` and ``aspect_ratio`` ``(1, 1)`` = ``H / W``, as its
    pipeline passes them; empty for every other model."""
    if not getattr(model, "use_additional_conditions", False):
        return {}
    h, w = image_hw
    return {RESOLUTION: torch.tensor([[h, w]], dtype=torch.float32),
            ASPECT_RATIO: torch.tensor([[h / w]], dtype=torch.float32)}


def default_time_ids(image_hw: tuple[int, int]) -> Tensor:
    """SDXL's size conditioning of an uncropped image of size ``(H, W)``: ``(H, W, 0, 0, H, W)``."""
    h, w = image_hw
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)


def _rows(t: Tensor, ndim: int) -> Tensor:
    """``t`` with a leading row dim when it has ``ndim - 1`` dims."""
    return t.unsqueeze(0) if t.ndim == ndim - 1 else t


def load_prompt_table(path: str | None, model: nn.Module, image_hw: tuple[int, int], setting: str) -> PromptTable:
    """Read an embeddings file (see the module docstring) for ``model``.

    Args:
        path: the safetensors file.
        model: the text model (its ``cross_attention_dim`` and ``text_time`` widths are checked).
        image_hw: ``(H, W)`` of the model's images, for the default ``time_ids``.
        setting: the config key naming the file, for messages (``calib.cond_embeddings``).
    """
    from safetensors.torch import load_file

    check(path is not None, f"text-conditional models need {setting}: a safetensors file with a 'cond' tensor "
                            "(P, L, D) of prompt embeddings and optionally 'uncond' (L, D)")
    check(os.path.isfile(path), f"{setting} file {path} does not exist; point it to a safetensors file")
    try:
        tensors = load_file(path)
    except Exception as err:
        raise GaqError(f"{setting} file {path} is not a readable safetensors file ({type(err).__name__})") from None
    return prompt_table(tensors, model, image_hw, f"{setting} file {path}")


def prompt_table(tensors: Mapping[str, Tensor], model: nn.Module, image_hw: tuple[int, int], where: str) -> PromptTable:
    """The :class:`PromptTable` of ``model`` from tensors keyed as in the embeddings file (module docstring).

    Both ways of giving prompts end here: an embeddings file (:func:`load_prompt_table`) and a prompt
    list run through the pipeline's text encoder (:mod:`gaq.models.prompts`).

    Args:
        tensors: ``cond`` and optionally ``uncond``, ``text_embeds``, ``uncond_text_embeds``, ``time_ids``.
        model: the text model (its ``cross_attention_dim`` and ``text_time`` widths are checked).
        image_hw: ``(H, W)`` of the model's images, for the default ``time_ids``.
        where: what the tensors came from, for messages (``calib.cond_embeddings file emb.safetensors``).
    """
    check("cond" in tensors, f"{where} has no 'cond' tensor (keys: {sorted(tensors)})")
    cond = _rows(tensors["cond"], 3)
    check(cond.ndim == 3 and cond.shape[0] >= 1,
          f"'cond' of {where} must have shape (P, L, D) or (L, D), got {tuple(tensors['cond'].shape)}")
    p = cond.shape[0]
    uncond = tensors.get("uncond")
    if uncond is not None:
        uncond = _rows(uncond, 3)
        check(uncond.shape == (1,) + tuple(cond.shape[1:]),
              f"'uncond' of {where} must have shape {tuple(cond.shape[1:])}, got {tuple(tensors['uncond'].shape)}")
    config = getattr(model, "config", None) or {}
    want_d = config.get("caption_channels") or config.get("cross_attention_dim")  # PixArt projects its captions
    check(want_d is None or not isinstance(want_d, int) or cond.shape[-1] == want_d,
          f"prompt embeddings of {where} have width {cond.shape[-1]} but the model expects {want_d}")
    table = PromptTable({ENCODER_STATES: cond}, None if uncond is None else {ENCODER_STATES: uncond})
    for key, value in size_conditions(model, image_hw).items():  # PixArt-alpha at 1024 px: from the image size
        table.cond[key] = value.expand(p, -1).clone()
        if table.uncond is not None:
            table.uncond[key] = value.clone()
    width = text_time_width(model)
    if width is None:
        extra = sorted({"text_embeds", "uncond_text_embeds", "time_ids"} & tensors.keys())
        check(not extra, f"{where} holds {extra}, but the model takes no added_cond_kwargs "
                         "(addition_embed_type is not text_time): remove them")
        return table
    check("text_embeds" in tensors, f"the model is SDXL-style (addition_embed_type text_time): add a 'text_embeds' "
                                    f"tensor (P, E) of pooled prompt embeddings to {where}")
    text = _rows(tensors["text_embeds"], 2)
    check(text.ndim == 2 and text.shape[0] == p,
          f"'text_embeds' of {where} must have shape ({p}, E), one row per prompt, got {tuple(tensors['text_embeds'].shape)}")
    ids = _rows(tensors["time_ids"], 2) if "time_ids" in tensors else default_time_ids(image_hw)
    check(ids.ndim == 2 and ids.shape[0] in (1, p),
          f"'time_ids' of {where} must have shape (K,) or ({p}, K), got {tuple(ids.shape)}")
    time_dim = int(model.config["addition_time_embed_dim"])
    check(text.shape[1] + ids.shape[1] * time_dim == width,
          f"'text_embeds' ({text.shape[1]} wide) and {ids.shape[1]} time ids of {time_dim} channels make "
          f"{text.shape[1] + ids.shape[1] * time_dim}, but the model's projection_class_embeddings_input_dim is {width}")
    ids = ids.float()
    table.cond[TEXT_EMBEDS], table.cond[TIME_IDS] = text, ids.expand(p, -1).clone()
    if table.uncond is not None:
        check("uncond_text_embeds" in tensors, f"{where} has 'uncond' but no 'uncond_text_embeds' "
                                               f"({text.shape[1]},): add the empty prompt's pooled embedding")
        u_text = _rows(tensors["uncond_text_embeds"], 2)
        check(u_text.shape == (1, text.shape[1]),
              f"'uncond_text_embeds' of {where} must have shape ({text.shape[1]},), got {tuple(tensors['uncond_text_embeds'].shape)}")
        table.uncond[TEXT_EMBEDS], table.uncond[TIME_IDS] = u_text, ids[:1].clone()
    return table
