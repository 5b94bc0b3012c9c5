"""4-bit weight codes two per byte, with torch ops that run on any device.

``b`` are signed 4-bit codes in ``[-8, 7]`` (int8 ``(N, K)``); a packed byte holds the unsigned codes
``q = b + 8`` of two neighbouring reduction indices, the even one in the low nibble. An odd K is
padded with ``b = 0``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pack_int4(b: Tensor) -> Tensor:
    """uint8 ``(N, ceil(K/2))`` of int8 codes ``b`` ``(N, K)`` in ``[-8, 7]``."""
    q = (b.to(torch.int16) + 8).to(torch.uint8)
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1), value=8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor, k: int) -> Tensor:
    """int8 ``(N, k)`` codes in ``[-8, 7]`` of :func:`pack_int4`'s bytes."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=2).reshape(packed.shape[0], -1)[:, :k]
