"""Deployed quantized layers: integer weight codes resident on the device, integer GEMMs at run time.

A :class:`DeployedLinear` / :class:`DeployedConv2d` is built from a calibrated fake-quantized layer
(:class:`gaq.quant.QuantLinear` / :class:`gaq.quant.QuantConv2d`) and computes the same function:

- the weight is held as its integer codes, ``b = q_w - 2^(b-1)``: int8, or for 4-bit weights two codes
  per byte (:mod:`gaq.deploy.packing`), with a float32 step and an integer zero point per output
  channel (per input-channel group of a split layer);
- the input is quantized with the calibrated static scales (per sampling step: the step index the root
  model's timestep hook put in the shared :class:`gaq.quant.StepContext`, on the device) to int8 codes,
  and an int8 GEMM gives the exact integer accumulator, scaled back in float32 and returned in the
  compute dtype: on a CUDA device with Triton a one-pass quantization of the input
  (:mod:`gaq.deploy.triton_quant`) and one GEMM kernel of :mod:`gaq.deploy.triton_kernels` (4-bit
  unpacking in registers, corrections and scales in its epilogue), elsewhere the separate ops of
  :mod:`gaq.deploy.kernels` around ``torch._int_mm``;
- a layer whose input stays FP (a_bits 32) runs weight-only: on CUDA with Triton the codes are
  dequantized inside the GEMM (W4A16 / W8A16), elsewhere per call before PyTorch's own op; a
  convolution the integer kernels do not cover (groups or dilation other than 1) dequantizes its codes
  per call and runs PyTorch's own op in the compute dtype (on the calibrated fake-quantized input where
  it has an input quantizer).

Integer buffers and float32 scales keep their dtype under ``model.to(dtype)``; only their device moves.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gaq.deploy import kernels, triton_kernels, triton_quant
from gaq.deploy.config import DeployConfig
from gaq.deploy.packing import pack_int4, unpack_int4
from gaq.errors import GaqError, check
from gaq.quant.layers import QuantConv2d, QuantLayer, QuantLinear
from gaq.quant.quantizer import MIN_SCALE, ActQuantizer, SplitActQuantizer
from gaq.quant.step_context import StepContext, one_or_per_sample

#: Smallest M (rows) ``torch._int_mm`` accepts on CUDA is 17; K and N must be multiples of 8.
INT_MM_MIN_ROWS, INT_MM_MULTIPLE = 17, 8


def triton_ready(device: torch.device, explicit: bool) -> bool:
    """Whether gaq's Triton kernels run on ``device``: CUDA with triton installed, or (asked for explicitly, as
    the CPU tests do) Triton's interpreter."""
    return triton_kernels.AVAILABLE and (device.type == "cuda" or (explicit and triton_kernels.INTERPRET))


def use_triton(which: str, device: torch.device, what: str, key: str) -> bool:
    """Whether a call on ``device`` runs gaq's Triton kernel by the setting ``deploy.<key>`` = ``which`` (``triton``:
    always, refused where Triton cannot run; ``auto``: where it runs on a CUDA device; anything else: never);
    ``what`` names the caller in the refusal."""
    if which == "triton":
        check(triton_ready(device, explicit=True), f"{what}: the Triton kernel needs a CUDA device and triton "
              f"installed; set deploy.{key}: auto")
        return True
    return which == "auto" and triton_ready(device, explicit=False)


def _one_pass(x: Tensor) -> bool:
    """Whether ``x`` is quantized by a one-pass Triton kernel of :mod:`gaq.deploy.triton_quant`: on a CUDA device with
    triton, outside torch.compile (which fuses the torch ops into the op producing ``x`` instead)."""
    return x.is_cuda and triton_quant.AVAILABLE and not torch.compiler.is_compiling()


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels-last for a 4-D channels-last (not also contiguous) tensor, else contiguous."""
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class _KeepDtype(nn.Module):
    """A module whose tensors keep their dtype under ``.to(dtype)`` / ``.half()`` (only devices move)."""

    def _apply(self, fn, recurse=True):
        return super()._apply(lambda t: fn(t).to(t.dtype), recurse)


class _StaticGrid(_KeepDtype):
    """The calibrated static grid of an activation quantizer, per sampling step where it has per-step scales.

    Buffers: ``scale`` float32 ``(S,)``; ``zero_point`` float32 ``(S,)`` (the fake quantizer's ``z_x``).
    S = calibrated steps (1 without per-step scales).
    """

    def __init__(self, q: ActQuantizer):
        super().__init__()
        self.bits, self.qmin, self.qmax, self.name = q.bits, q.qmin, q.qmax, q.name
        self.offset = 0 if q.symmetric else 2 ** (q.bits - 1)  # codes q_x - offset fit int8 (bits <= 8)
        self.context: StepContext | None = q.context if q.num_steps > 1 else None
        scale = q.scale.detach().float()
        if q.learn_step:  # the fake quantizer clamps a learned step the same way
            scale = scale.clamp_min(MIN_SCALE)
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", q.zero_point.detach().float().clone())

    def steps(self, batch: int) -> Tensor | None:
        """The step index per sample (``(B,)`` or ``(1,)``) on the scales' device, or None for one scale."""
        if self.context is None:
            return None
        step = self.context.step_index
        if step is None:
            raise GaqError(f"deployed layer input {self.name}: per-step scales but no step is set: call the root model "
                           "(its timestep sets the step) or gaq.quant.set_step_index first")
        check(one_or_per_sample(step.shape[0], batch),
              f"{self.name}: {step.shape[0]} step indices for a batch of {batch}")
        return step.to(self.scale.device, non_blocking=True)

    def per_sample(self, batch: int, *grids: Tensor) -> tuple[Tensor, ...]:
        """The per-step buffers ``grids`` at each sample's step, each ``(B,)`` or ``(1,)``."""
        step = self.steps(batch)
        return grids if step is None else tuple(g[step] for g in grids)

    def step_grid(self, batch: int) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` per sample, each ``(B,)`` or ``(1,)``."""
        return self.per_sample(batch, self.scale, self.zero_point)


class DeployedFakeQuant(_StaticGrid):
    """A quantized operand a deployed model keeps in floating point (attention's queries, keys, values and
    probabilities): ``x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s`` computed in float32, as the fake
    quantizer computes it at float32, and returned in ``x``'s dtype; one Triton pass on a CUDA device (under
    torch.compile the torch ops, which it fuses into the op producing ``x``)."""

    def forward(self, x: Tensor) -> Tensor:
        scale, zero = self.step_grid(x.shape[0])
        if _one_pass(x):
            return triton_quant.fake_quantize(x, scale, zero, self.qmin, self.qmax)
        shape = (scale.shape[0],) + (1,) * (x.ndim - 1)
        s, z = scale.view(shape), zero.view(shape)
        q = torch.clamp(torch.round(x.float() / s) + z, self.qmin, self.qmax)
        return ((q - z) * s).to(x.dtype)


class DeployedActQuant(_StaticGrid):
    """Static input quantizer of a deployed layer: float input -> int8 codes ``a`` and per-sample grid.

    Buffers: those of the grid, and ``row_zero`` int32 ``(S,)`` = ``z_x - offset``.
    """

    def __init__(self, q: ActQuantizer):
        check(q.bits <= 8, f"{q.name}: {q.bits}-bit activations have no int8 kernel; deploy keeps a_bits <= 8 inputs only")
        super().__init__(q)
        self.register_buffer("row_zero", (q.zero_point.detach().round() - self.offset).to(torch.int32))

    def grid(self, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(scale, zero_point, row_zero)`` per sample, each ``(B,)`` or ``(1,)``."""
        return self.per_sample(batch, self.scale, self.zero_point, self.row_zero)

    def codes(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """int8 codes ``a = clamp(round(x / s) + z, qmin, qmax) - offset`` (batch first), in float32 as the fake
        quantizer computes them at float32."""
        if _one_pass(x):  # same codes as the torch ops below
            return triton_quant.quantize_codes(x, scale, zero, self.qmin, self.qmax, self.offset)
        a = kernels.activation_codes(x, scale, zero, self.qmin, self.qmax, self.offset)
        return a.contiguous(memory_format=_memory_format(x))

    def rows(self, x: Tensor, scale: Tensor, zero: Tensor, rows: int, rowsum: bool) -> tuple[Tensor, Tensor | None]:
        """int8 codes of a linear layer's rows ``x`` ``(M, K)`` (sample ``i`` owns rows ``i*rows ...``) and, with
        ``rowsum``, the int32 sums of each row's codes (one pass on the GPU)."""
        if triton_ready(x.device, explicit=True) and not torch.compiler.is_compiling():
            return triton_quant.quantize_rows(x, scale, zero, rows, self.qmin, self.qmax, self.offset, rowsum)
        a = self.codes(x.reshape(scale.shape[0], -1), scale, zero).reshape(x.shape)
        return a, a.sum(dim=1, dtype=torch.int32) if rowsum else None

    def dequantize(self, a: Tensor, scale: Tensor, row_zero: Tensor, dtype: torch.dtype) -> Tensor:
        """``x_hat = (a - zx) * s`` in ``dtype``."""
        shape = (scale.shape[0],) + (1,) * (a.ndim - 1)
        return ((a.float() - row_zero.view(shape).float()) * scale.view(shape)).to(dtype)


class _Part(_KeepDtype):
    """One input-channel group of a deployed layer: its weight codes, grid and input quantizer.

    Buffers: ``codes`` (uint8 ``(N, ceil(K/2))`` for 4-bit, int8 ``(N, K)`` otherwise; K in the kernels'
    reduction order), ``col_scale`` float32 ``(N,)``, ``col_zero`` int32 ``(N,)`` = ``z_w - 2^(b-1)``,
    ``col_sum`` int32 ``(N,)`` = ``sum_k b``; for 4-bit weights also the Triton kernels' folded form
    (:class:`gaq.deploy.triton_kernels.GemmWeights`): ``nibble_zero`` = ``z_w`` and ``folded_sum`` =
    ``sum_k (b - zw)``.
    """

    def __init__(self, codes: Tensor, bits: int, scale: Tensor, zero: Tensor, act: DeployedActQuant | None):
        super().__init__()
        centre = 2 ** (bits - 1)
        b = (codes.to(torch.int16) - centre).to(torch.int8)  # (N, K)
        self.bits, self.k = int(bits), int(b.shape[1])
        self.register_buffer("codes", pack_int4(b) if bits == 4 else b.contiguous())
        self.register_buffer("col_scale", scale.detach().float().contiguous())
        self.register_buffer("col_zero", (zero.detach().round() - centre).to(torch.int32).contiguous())
        self.register_buffer("col_sum", b.sum(dim=1, dtype=torch.int32))
        w = triton_kernels.gemm_weights(b, bits, self.col_scale, self.col_zero, self.codes)
        if bits == 4:
            self.register_buffer("nibble_zero", w.zero)
            self.register_buffer("folded_sum", w.col_sum)
        self.zero_free, self.foldable = w.zero_free, triton_kernels.int4_foldable(w)
        self.act = act

    def gemm(self) -> triton_kernels.GemmWeights:
        """The weight as gaq's Triton kernels take it (the buffers on their current device); 4-bit weights whose
        zero points do not fold into int8 codes are unpacked per call to their int8 form."""
        if self.bits == 4:
            w = triton_kernels.GemmWeights(self.codes, 4, self.k, self.col_scale, self.nibble_zero, self.folded_sum,
                                           True)
            return w if self.foldable else triton_kernels.as_int8(w)
        return triton_kernels.GemmWeights(self.codes, 8, self.k, self.col_scale, self.col_zero, self.col_sum,
                                          self.zero_free)

    def needs_no_rowsum(self) -> bool:
        """Whether the integer GEMM of this part's weights needs no row sums of its input codes (4-bit weights, and
        8-bit ones without zero points)."""
        return self.zero_free and (self.bits != 4 or self.foldable)

    def weight_codes(self) -> Tensor:
        """int8 ``b`` ``(N, K)``."""
        return unpack_int4(self.codes, self.k) if self.bits == 4 else self.codes

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """``w_hat = (b - zw) * s_w`` ``(N, K)`` in ``dtype``."""
        return ((self.weight_codes().float() - self.col_zero.float()[:, None]) * self.col_scale[:, None]).to(dtype)

    def check_accumulator(self, path: str) -> None:
        """Refuse a layer whose exact accumulator could overflow int32."""
        if self.act is None:
            return
        a_span = int((self.act.row_zero.abs() + 128).max())
        b_span = int((self.col_zero.abs() + 2 ** (self.bits - 1)).max())
        bound = kernels.accumulator_bound(self.k, a_span, b_span)
        check(bound <= kernels.INT32_MAX, f"layer {path}: its integer accumulator can reach {bound}, beyond int32; "
              "deploy it weight-only (set its role's a_bits to 32) or split its input")


def _int_mm_acc(a: Tensor, part: _Part, row_zero: Tensor) -> Tensor:
    """Exact int32 accumulator ``(M, N)`` of rows ``a`` (int8 ``(M, K)``) through ``torch._int_mm``."""
    b = part.weight_codes()
    m, k = a.shape
    n = b.shape[0]
    pad_k, pad_n = -k % INT_MM_MULTIPLE, -n % INT_MM_MULTIPLE
    pad_m = max(0, INT_MM_MIN_ROWS - m) if a.is_cuda else 0
    ap = F.pad(a, (0, pad_k, 0, pad_m)) if (pad_k or pad_m) else a
    bp = F.pad(b, (0, pad_k, 0, pad_n)) if (pad_k or pad_n) else b
    ab = kernels.int_mm(ap, bp)[:m, :n]
    rowsum = a.sum(dim=1, dtype=torch.int32)
    zx = row_zero.to(torch.int32)[:, None]
    zw = part.col_zero[None, :]
    return ab - zw * rowsum[:, None] - zx * part.col_sum[None, :] + k * zx * zw


class DeployedLayer(_KeepDtype):
    """Base of the deployed layers: the parts (one per input-channel group), bias and kernel choice.

    Attributes:
        parts: one :class:`_Part` per input-channel group (one without a split).
        bias: float32 ``(N,)`` or None.
        out_dtype: the dtype outputs are returned in (the deployment's compute dtype).
        kernels: the kernel decision.
        path: the layer's module path, for messages.
    """

    bias: Tensor | None

    def __init__(self, layer: QuantLayer, config: DeployConfig, path: str, reduction_codes):
        super().__init__()
        check(layer.weight_quantizer.enabled, f"layer {path} has weight quantization off: deploy a calibrated model "
              "(gaq.quant.set_quant_state(qmodel, weight=True, act=True))")
        self.path, self.out_dtype = path, config.torch_dtype
        wq = layer.weight_quantizer
        codes = reduction_codes(wq.integer_codes(layer.weight))  # (N, K) in the kernels' order
        splits = list(wq.in_splits) if wq.in_splits is not None else None
        acts = self._input_quantizers(layer, splits)
        parts = []
        if splits is None:
            parts.append(_Part(codes(None), wq.bits, wq.scale[:, 0], wq.zero_point[:, 0], acts[0]))
        else:
            c0 = 0
            for g, c in enumerate(splits):
                parts.append(_Part(codes((c0, c0 + c)), wq.bits, wq.scale[:, g], wq.zero_point[:, g], acts[g]))
                c0 += c
        self.parts = nn.ModuleList(parts)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.integer = all(p.act is not None for p in parts)
        for p in parts:
            if self.integer:
                p.check_accumulator(path)
        self.config = config

    @staticmethod
    def _input_quantizers(layer: QuantLayer, splits: list[int] | None) -> list[DeployedActQuant | None]:
        q = layer.input_quantizer
        groups = 1 if splits is None else len(splits)
        if q is None:
            return [None] * groups
        qs = list(q.parts) if isinstance(q, SplitActQuantizer) else [q]
        if not all(isinstance(a, ActQuantizer) and a.enabled for a in qs):
            return [None] * groups  # activation quantization off: the fake layer's input stays FP
        check(all(a.ready for a in qs), f"layer {layer.spec.path}: its input quantizer is not calibrated: run "
              "gaq.quant.calibrate_activations (or calibrate the model) before deploying it")
        if splits is not None and len(qs) == 1:  # one input quantizer over a split weight: the same grid per group
            qs = qs * groups
        check(len(qs) == groups, f"layer {layer.spec.path}: {len(qs)} input quantizers for {groups} weight groups")
        return [DeployedActQuant(a) for a in qs]

    def _use_triton(self, device: torch.device, key: str) -> bool:
        """Whether this call runs gaq's Triton kernel, by ``deploy.<key>`` (``auto``, ``triton`` or a torch path)."""
        return use_triton(getattr(self.config, key), device, f"layer {self.path}", key)

    def _integer_weights(self, part: _Part) -> triton_kernels.GemmWeights:
        """The weight of an int8-activation Triton GEMM: 4-bit codes unpacked per call where ``deploy.int4_unpack``
        says ``per_call``."""
        w = part.gemm()  # bits 8 already where the 4-bit zero points do not fold
        return triton_kernels.unpacked(w) if w.bits == 4 and self.config.int4_unpack == "per_call" else w

    _kernel_key = ""

    def extra_repr(self) -> str:
        kind = "int8 GEMM" if self.integer else "weight-only"
        return f"w_bits={self.parts[0].bits}, {kind}, out={self.out_dtype}"


class DeployedLinear(DeployedLayer):
    """Deployed ``nn.Linear`` (input ``(..., K)``, batch first)."""

    _kernel_key = "linear_kernel"

    def __init__(self, layer: QuantLinear, config: DeployConfig, path: str):
        self.in_features, self.out_features = layer.in_features, layer.out_features

        def reduction_codes(codes: Tensor):
            return lambda span: codes if span is None else codes[:, span[0]:span[1]]

        super().__init__(layer, config, path, reduction_codes)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        batch = x.shape[0] if x.ndim > 1 else 1
        out = None
        c0 = 0
        for i, part in enumerate(self.parts):
            xi = x[..., c0:c0 + part.k] if len(self.parts) > 1 else x
            c0 += part.k
            bias = self.bias if i == 0 else None
            dtype = self.out_dtype if len(self.parts) == 1 else torch.float32
            y = self._part(xi, part, bias, batch, dtype)
            out = y if out is None else out + y
        return out.to(self.out_dtype).reshape(*lead, self.out_features)

    def _part(self, x: Tensor, part: _Part, bias: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor:
        x2 = x.reshape(-1, part.k)
        if part.act is None:
            if self._use_triton(x.device, "weight_only_kernel"):
                return triton_kernels.linear(x2.to(dtype), part.gemm(), bias, x2.shape[0], None, dtype)
            return F.linear(x2.to(dtype), part.dequantized_weight(dtype), None if bias is None else bias.to(dtype))
        grid = part.act.grid(batch)  # (scale, zero, row_zero) per sample
        if self._use_triton(x.device, "linear_kernel"):  # codes in one pass first: measured faster on the H200
            # than quantizing in the GEMM's prologue, which repeats the work for every column block
            w = self._integer_weights(part)
            a, rowsum = self._input_codes(x2, part, grid, w)
            return self._gemm(a, rowsum, grid, w, bias, dtype)
        scale, zero, row_zero = grid
        rows = x2.shape[0] // scale.shape[0]
        a = part.act.codes(x.reshape(scale.shape[0], -1), scale, zero).reshape(-1, part.k)
        acc = _int_mm_acc(a, part, kernels.per_row(row_zero, rows))
        return kernels.epilogue(acc, kernels.per_row(scale, rows), part.col_scale, bias, dtype)

    @staticmethod
    def _input_codes(x2: Tensor, part: _Part, grid: tuple[Tensor, Tensor, Tensor],
                     w: triton_kernels.GemmWeights) -> tuple[Tensor, Tensor | None]:
        """int8 codes of rows ``x2`` ``(M, K)`` in ``part``'s input ``grid``, and their row sums where ``w`` needs
        them."""
        scale, zero, _ = grid
        return part.act.rows(x2, scale, zero, x2.shape[0] // scale.shape[0], rowsum=not w.zero_free)

    def _gemm(self, a: Tensor, rowsum: Tensor | None, grid: tuple[Tensor, Tensor, Tensor],
              w: triton_kernels.GemmWeights, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The Triton GEMM of input codes ``a`` in ``grid``."""
        scale, _, row_zero = grid
        return triton_kernels.linear(a, w, bias, a.shape[0] // scale.shape[0], (scale, row_zero), dtype, rowsum,
                                     self._tma(a.device))

    def _tma(self, device: torch.device) -> bool:
        """Whether the linear kernel reads its operands through TMA descriptors (``deploy.gemm_loads``)."""
        loads = self.config.gemm_loads
        return loads == "tma" or (loads == "auto" and triton_kernels.tma_ready(device))

    def fuses_output(self, x: Tensor) -> bool:
        """Whether this layer's output can leave its kernel as the next layer's int8 codes
        (:meth:`codes_out`, :meth:`from_codes`): one part, int8 input, the Triton GEMM on ``x``'s device."""
        return len(self.parts) == 1 and self.integer and self._use_triton(x.device, "linear_kernel")

    def codes_out(self, x: Tensor, activation: str, grid: tuple[Tensor, Tensor], code_range: tuple[int, int, int],
                  rowsum: bool) -> tuple[Tensor, Tensor | None]:
        """The int8 codes ``clamp(round(y / s) + z, qmin, qmax) - offset`` of ``y = activation(self(x))`` ``(M, N)``
        in one GEMM (:func:`gaq.deploy.triton_kernels.linear_codes`), and with ``rowsum`` their row sums: the
        next layer's input without ``y`` in memory. Only where :meth:`fuses_output`.

        Args:
            grid: the next quantizer's ``(scale, zero)`` per sample (``(B,)`` or ``(1,)``).
            code_range: its ``(qmin, qmax, offset)``.
        """
        part = self.parts[0]
        batch = x.shape[0] if x.ndim > 1 else 1
        w = self._integer_weights(part)
        a, in_rowsum = self._input_codes(x.reshape(-1, part.k), part, part.act.grid(batch), w)
        return self.codes_out_of_codes(a, in_rowsum, batch, activation, grid, code_range, rowsum, w)

    def codes_out_of_codes(self, a: Tensor, in_rowsum: Tensor | None, batch: int, activation: str,
                           grid: tuple[Tensor, Tensor], code_range: tuple[int, int, int], rowsum: bool,
                           w: triton_kernels.GemmWeights | None = None) -> tuple[Tensor, Tensor | None]:
        """:meth:`codes_out` of this layer's input codes ``a`` ``(M, K)`` (from :meth:`input_quantizer`'s grid, with
        their row sums where :meth:`needs_rowsum`) for a batch of ``batch`` samples."""
        part = self.parts[0]
        scale, _, row_zero = part.act.grid(batch)
        w = w if w is not None else self._integer_weights(part)
        return triton_kernels.linear_codes(a, w, self.bias, a.shape[0] // scale.shape[0], (scale, row_zero), activation,
                                           (*grid, *code_range), rowsum, in_rowsum, self._tma(a.device))

    def input_quantizer(self, batch: int) -> tuple[Tensor, Tensor, int, int, int]:
        """``(scale, zero, qmin, qmax, offset)`` of this layer's input grid for a batch of ``batch`` samples: what a
        producer quantizing for it needs (a layer where :meth:`fuses_output`)."""
        act = self.parts[0].act
        scale, zero, _ = act.grid(batch)
        return scale, zero, act.qmin, act.qmax, act.offset

    def needs_rowsum(self) -> bool:
        """Whether this layer's GEMM takes the row sums of its input codes (8-bit weights with zero points)."""
        return not self.parts[0].needs_no_rowsum()

    def from_codes(self, a: Tensor, rowsum: Tensor | None, lead: torch.Size) -> Tensor:
        """This layer's output ``(*lead, N)`` of its input codes ``a`` ``(M, K)`` from :meth:`codes_out` (``lead``: the
        input's leading shape, batch first)."""
        part = self.parts[0]
        grid = part.act.grid(lead[0] if len(lead) else 1)
        y = self._gemm(a, rowsum, grid, self._integer_weights(part), self.bias, self.out_dtype)
        return y.reshape(*lead, self.out_features)


class DeployedConv2d(DeployedLayer):
    """Deployed ``nn.Conv2d``; outputs are channels-last (NHWC strides) from the integer kernels."""

    _kernel_key = "conv_kernel"

    def __init__(self, layer: QuantConv2d, config: DeployConfig, path: str):
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride, self.padding = tuple(layer.kernel_size), tuple(layer.stride), layer.padding
        self.dilation, self.groups, self.padding_mode = tuple(layer.dilation), layer.groups, layer.padding_mode
        self._pad_twice = layer._reversed_padding_repeated_twice
        check(not isinstance(self.padding, str) or self.padding == "valid" or layer.stride == (1, 1),
              f"layer {path}: padding={self.padding!r} with stride {layer.stride}")
        if isinstance(self.padding, str):  # 'same' / 'valid' as explicit numbers (stride 1)
            self.padding = (0, 0) if self.padding == "valid" else tuple(
                (d * (k - 1)) // 2 for d, k in zip(self.dilation, self.kernel_size))

        def reduction_codes(codes: Tensor):  # (N, C, kh, kw) -> (N, kh * kw * C_group), channels fastest
            def part(span):
                c = codes if span is None else codes[:, span[0]:span[1]]
                return c.permute(0, 2, 3, 1).reshape(c.shape[0], -1)
            return part

        super().__init__(layer, config, path, reduction_codes)
        # the integer kernels cover groups 1, dilation 1; others run the dequantized path
        self.integer = self.integer and self.groups == 1 and self.dilation == (1, 1)

    def _zero_padding(self) -> tuple[int, int]:
        """The zero padding the kernel applies (after any non-zero padding mode was applied to the input)."""
        return (0, 0) if self.padding_mode != "zeros" else tuple(self.padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":  # elementwise quantization commutes with padding: pad the float input
            x = F.pad(x, self._pad_twice, mode=self.padding_mode)
        out = None
        c0 = 0
        for i, part in enumerate(self.parts):
            c = part.k // (self.kernel_size[0] * self.kernel_size[1])  # the group's input channels
            xi = x[:, c0:c0 + c] if len(self.parts) > 1 else x
            c0 += c
            dtype = self.out_dtype if len(self.parts) == 1 else torch.float32
            y = self._part(xi, part, self.bias if i == 0 else None, dtype)
            out = y if out is None else out + y
        return out.to(self.out_dtype)

    def _weight4d(self, part: _Part, dtype: torch.dtype) -> Tensor:
        kh, kw = self.kernel_size
        w = part.dequantized_weight(dtype)
        return w.reshape(w.shape[0], kh, kw, -1).permute(0, 3, 1, 2)

    def _part(self, x: Tensor, part: _Part, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
        pad = self._zero_padding()
        plain = self.groups == 1 and self.dilation == (1, 1)  # what gaq's kernels cover
        if part.act is not None:
            scale, zero, row_zero = part.act.grid(x.shape[0])
        elif plain and self._use_triton(x.device, "weight_only_kernel"):
            return triton_kernels.conv2d(x.to(dtype), part.gemm(), self.kernel_size, self.stride, pad, bias, None,
                                         dtype)
        if part.act is None or not self.integer:
            if part.act is not None:  # the calibrated fake-quantized input, then the FP op
                x = part.act.dequantize(part.act.codes(x, scale, zero), scale, row_zero, dtype)
            return F.conv2d(x.to(dtype), self._weight4d(part, dtype), None if bias is None else bias.to(dtype),
                            self.stride, pad, self.dilation, self.groups)
        batch = x.shape[0]
        if self._use_triton(x.device, "conv_kernel"):  # codes in one pass first, as DeployedLinear's
            a = part.act.codes(x.contiguous(memory_format=torch.channels_last), scale, zero)
            return triton_kernels.conv2d(a, self._integer_weights(part), self.kernel_size, self.stride, pad, bias,
                                         (scale, row_zero), dtype)
        scale, row_zero = scale.expand(batch), row_zero.expand(batch)
        a = part.act.codes(x.contiguous(memory_format=torch.channels_last), scale.contiguous(), zero.expand(batch))
        cols, (ho, wo) = im2col(a, self.kernel_size, self.stride, pad, row_zero)
        rows = ho * wo
        acc = _int_mm_acc(cols, part, kernels.per_row(row_zero, rows))
        y = kernels.epilogue(acc, kernels.per_row(scale, rows), part.col_scale, bias, dtype)
        return y.reshape(batch, ho, wo, -1).permute(0, 3, 1, 2)


def im2col(a: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
           row_zero: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Rows ``(B * H_out * W_out, KH * KW * C)`` of int8 codes ``a`` ``(B, C, H, W)`` in the kernels'
    ``(kh, kw, c)`` order, padded with each sample's ``zx`` (``row_zero`` ``(B,)``); and ``(H_out, W_out)``."""
    b, c, h, w = a.shape
    kh, kw = kernel_size
    sh, sw = stride
    ph, pw = padding
    nhwc = a.permute(0, 2, 3, 1)
    if ph or pw:
        padded = row_zero.to(torch.int8).view(b, 1, 1, 1).expand(b, h + 2 * ph, w + 2 * pw, c).clone()
        padded[:, ph:ph + h, pw:pw + w] = nhwc
        nhwc = padded
    win = nhwc.unfold(1, kh, sh).unfold(2, kw, sw)  # (B, H_out, W_out, C, kh, kw)
    ho, wo = win.shape[1], win.shape[2]
    return win.permute(0, 1, 2, 4, 5, 3).reshape(b * ho * wo, kh * kw * c), (ho, wo)


#: Fake-quantized layer class -> its deployed class.
DEPLOYED_LAYERS: dict[type[QuantLayer], type[DeployedLayer]] = {QuantConv2d: DeployedConv2d, QuantLinear: DeployedLinear}


__all__ = ["DEPLOYED_LAYERS", "DeployedActQuant", "DeployedConv2d", "DeployedFakeQuant", "DeployedLayer", "DeployedLinear", "im2col"]
