"""How a calibrated model is deployed: compute dtype and the kernel of each layer kind."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from gaq.errors import check

#: Compute dtypes a deployed model can run its FP parts (norms, attention, activations) in.
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class DeployConfig:
    """Settings of :func:`gaq.deploy.deploy`.

    Attributes:
        dtype: the dtype of everything that is not an integer GEMM (norms, attention, the non-quantized
            layers, the layer outputs); ``float32`` gives a model that matches the fake-quantized one to
            float32 rounding, ``bfloat16`` the fast one.
        linear_kernel: integer GEMM of quantized linear layers: ``triton`` (gaq's int8 kernel with the
            4-bit weights unpacked in registers and the zero-point corrections fused), ``int_mm``
            (``torch._int_mm``, cuBLAS' int8 GEMM, with the 4-bit weights unpacked per call and the
            corrections as separate ops), or ``auto``: ``triton`` on a CUDA device where Triton is
            installed, else ``int_mm`` (which also runs on the CPU).
        conv_kernel: integer convolution: ``triton`` (gaq's implicit-GEMM int8 kernel, channels-last),
            ``im2col`` (an explicit int8 im2col and ``torch._int_mm``), or ``auto`` (as above).
        weight_only_kernel: the layers whose input stays FP (W4A32 / W8A32, or a_bits 32 for a role):
            ``triton`` (gaq's GEMM / implicit-GEMM kernel with the codes dequantized to ``dtype`` in
            registers: W4A16 / W8A16, only the codes read from memory), ``dequantize`` (the packed
            weight dequantized to ``dtype`` per call and run through PyTorch's own conv / linear; only
            the packed codes stay resident), or ``auto``: ``triton`` on a CUDA device where Triton is
            installed, else ``dequantize``.
        int4_unpack: how the Triton GEMM of an int8-activation layer reads 4-bit weights: ``in_kernel`` (two
            codes per byte unpacked in registers inside the GEMM's loop) or ``per_call`` (unpacked once per call
            into a temporary int8 matrix with the zero point subtracted, one pass, then the plain int8 GEMM: the
            resident weights stay packed, the temporary lives for one layer call).
        gemm_loads: how gaq's Triton linear kernel reads its int8 operands (int8 activations with 8-bit or per-call
            unpacked 4-bit weights): ``pointer`` (per-thread loads, a program per output tile, any GPU), ``tma``
            (tensor-memory-accelerator descriptors, persistent over the output tiles, GPUs of compute capability 9.0
            and later; other calls and devices take the pointer kernel), or ``auto``: ``tma`` where it runs.
        attention_kernel: attention whose query, key, value and probabilities are quantized: ``triton`` (the
            projections quantize their outputs in their GEMMs and one kernel computes the quantized attention on the
            int8 codes, :mod:`gaq.deploy.triton_attention`, where it covers the call: no mask, no query / key norm,
            head dim <= 256, grids <= 8 bits; the explicit form otherwise), ``explicit`` (the fake-quantized
            processor's matmuls and softmax in ``dtype``), or ``auto``: ``triton`` on a CUDA device where Triton and
            gaq's linear kernel run, else ``explicit``.
        fuse_feedforward: run a GELU feed-forward block's activation and its second layer's input quantization in the
            first layer's GEMM epilogue (:mod:`gaq.deploy.feedforward`; where gaq's Triton linear kernel runs).
        fuse_norms: run a DiT block's norms as one kernel each that writes the int8 input codes of the layers after it
            (the second with the block's residual update; :mod:`gaq.deploy.transformer_block`, where gaq's Triton
            linear kernel runs and the block's attention operands are not quantized).
        check_device_timesteps: warn about uncalibrated timesteps also when the timestep arrives as a
            device tensor (that check reads it back to the host, a synchronisation per model call);
            timesteps on the host, as diffusers pipelines pass them, are always checked.
    """

    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    linear_kernel: Literal["auto", "triton", "int_mm"] = "auto"
    conv_kernel: Literal["auto", "triton", "im2col"] = "auto"
    # default dequantize: measured on an H200, DiT-XL/2 W4A32 at batch 64 ran one call in 102.9 ms on the Triton
    # weight-only kernel against 73.5 ms dequantizing per call into cuBLAS (bench/results/deploy/)
    weight_only_kernel: Literal["auto", "triton", "dequantize"] = "dequantize"
    # default per_call, measured on an H200 (bench/results/deploy/h200_dit_per_call.md), DiT-XL/2 W4A8 at batch 64
    # under torch.compile: the GEMM kernels took 19.3 ms per call with the codes unpacked per call against 29.5 ms
    # unpacking in the loop (52.6 against 54.0 ms per call); eager and the UNets' convs were not measured this way
    int4_unpack: Literal["in_kernel", "per_call"] = "per_call"
    # default auto, measured on an H200 (bench/results/deploy/h200_dit_tfmq.md), DiT-XL/2 W4A8 at batch 64 under
    # torch.compile with CUDA graphs: the GEMMs took 16.7 ms per call with every one on the TMA kernel, 17.5 ms with
    # the 1152 x 1152 ones on the pointer kernel (which a single-GEMM timing had put ahead there), 19.2 ms all on the
    # pointer kernel (an earlier run, qdiff_compat)
    gemm_loads: Literal["auto", "pointer", "tma"] = "auto"
    # default explicit, measured on an H200 (bench/results/deploy/h200_dit_fused.md), DiT-XL/2 W4A8 at batch 64 under
    # torch.compile with CUDA graphs: 53.5 ms per call with the one-kernel attention (16.3 ms in its 28 launches, its
    # one-pass blocks spill registers) against 44.0 ms with the explicit form
    attention_kernel: Literal["auto", "triton", "explicit"] = "explicit"
    # default off, measured there too: the GELU + quantization epilogue added 3.7 ms to the GEMMs and saved the 3.4 ms
    # of the separate GELU + quantization kernels
    fuse_feedforward: bool = False
    # default on, measured on an H200 (bench/results/deploy/h200_dit_norms.md), DiT-XL/2 W4A8 at batch 64 under
    # torch.compile with CUDA graphs: the norms and their quantization took 3.7 ms in 56 launches of the chunked kernel
    # against 7.8 ms in Inductor's kernels unfused; 34.4 ms per call against 37.5 unfused (another machine, a session
    # earlier) and 38.3 with the first, one-tile form of the kernel
    fuse_norms: bool = True
    check_device_timesteps: bool = False

    def __post_init__(self):
        check(self.dtype in DTYPES, f"deploy.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.linear_kernel in ("auto", "triton", "int_mm"),
              f"deploy.linear_kernel must be 'auto', 'triton' or 'int_mm', got {self.linear_kernel!r}")
        check(self.conv_kernel in ("auto", "triton", "im2col"),
              f"deploy.conv_kernel must be 'auto', 'triton' or 'im2col', got {self.conv_kernel!r}")
        check(self.weight_only_kernel in ("auto", "triton", "dequantize"),
              f"deploy.weight_only_kernel must be 'auto', 'triton' or 'dequantize', got {self.weight_only_kernel!r}")
        check(self.gemm_loads in ("auto", "pointer", "tma"),
              f"deploy.gemm_loads must be 'auto', 'pointer' or 'tma', got {self.gemm_loads!r}")
        check(self.attention_kernel in ("auto", "triton", "explicit"),
              f"deploy.attention_kernel must be 'auto', 'triton' or 'explicit', got {self.attention_kernel!r}")
        check(isinstance(self.fuse_feedforward, bool),
              f"deploy.fuse_feedforward must be true or false, got {self.fuse_feedforward!r}")
        check(isinstance(self.fuse_norms, bool), f"deploy.fuse_norms must be true or false, got {self.fuse_norms!r}")
        check(self.int4_unpack in ("in_kernel", "per_call"),
              f"deploy.int4_unpack must be 'in_kernel' or 'per_call', got {self.int4_unpack!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


__all__ = ["DTYPES", "DeployConfig"]
