"""How the sampler calls the noise predictor: precision, memory format, CUDA graphs, torch.compile.

:class:`ModelRunner` computes exactly what :func:`gaq.models.denoiser.predict_noise` computes, with
the speed options of :class:`~gaq.models.sampling.SamplerConfig`:

- ``precision``: ``fp32`` calls the model as it is (PyTorch's global TF32 settings untouched: by
  default cuDNN convolutions may use TF32, matmuls do not); ``tf32`` lets CUDA matmuls and
  convolutions use TF32 during the call; ``bf16`` runs the call under ``torch.autocast`` with
  bfloat16 (normalisations and softmax stay float32 as autocast decides). The noise prediction is
  returned in the input's dtype, so the DDIM update stays float32 / float64 as before.
- ``channels_last``: the model's 4-D weights and buffers are converted to channels-last in place
  (values unchanged) until :meth:`ModelRunner.release`, which makes them contiguous again (safetensors
  saves only contiguous tensors); every 4-D input is passed channels-last, outputs come back contiguous.
- ``cuda_graph``: one model call per distinct input shape is captured with ``torch.cuda.CUDAGraph``
  on static input buffers and replayed afterwards. The timestep is a tensor input, so one graph
  serves every step of a run. A quantized model's per-step activation scales are picked on the GPU
  from that timestep (its timestep hook runs inside the graph), and AdaRound's cached fake-quantized
  weights, computed in the warm-up before capture, are read from fixed addresses. Graphs are dropped
  and recaptured when a parameter or buffer of the model is replaced or changed in place; change
  Python-level switches (quantizers on/off, rounding mode) only before building a runner.
- ``compile``: the call is wrapped in ``torch.compile`` (one compilation per input shape), with
  ``compile_mode`` as its ``mode``. A fake-quantized model is captured whole: AdaRound's weight cache
  is bypassed under compilation, so the compiled code recomputes (and fuses) the quantized weights.

Every option off, the call is ``predict_noise(model, x, t, cond)`` and nothing else.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Literal, Mapping

import torch
from torch import Tensor, nn

from gaq.errors import check
from gaq.models.denoiser import predict_noise

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")
CompileMode = Literal["default", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = ("default", "max-autotune-no-cudagraphs")

# fn(x, t, cond) -> eps: what a CUDA graph captures
ModelCall = Callable[[Tensor, Tensor, Mapping[str, Tensor]], Tensor]


@contextlib.contextmanager
def tf32_flags(matmul: bool, conv: bool) -> Iterator[None]:
    """Let CUDA matmuls (``matmul``) and cuDNN convolutions (``conv``) use TF32 inside the block, or keep them
    IEEE float32; the flags are restored after."""
    m, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    old = (m.allow_tf32, cudnn.allow_tf32)
    m.allow_tf32, cudnn.allow_tf32 = bool(matmul), bool(conv)
    try:
        yield
    finally:
        m.allow_tf32, cudnn.allow_tf32 = old


def cuda_tf32() -> contextlib.AbstractContextManager:
    """Let CUDA matmuls and cuDNN convolutions use TF32 inside the block (the flags are restored after)."""
    return tf32_flags(matmul=True, conv=True)


def _to_channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _model_call(model: nn.Module, x: Tensor, t: Tensor, cond: Mapping[str, Tensor], channels_last: bool,
                upcast: bool) -> Tensor:
    """The model call proper: compiled with ``compile``, captured with ``cuda_graph``."""
    if channels_last:
        x = _to_channels_last(x)
    eps = predict_noise(model, x, t, cond)
    if upcast:
        eps = eps.to(x.dtype)  # the guidance mix and the DDIM update run in the sample's dtype or wider
    if channels_last:
        eps = eps.contiguous()
    return eps


_compiled_model_calls: dict[str, Callable] = {}


def compiled_model_call(mode: str = "default") -> Callable:
    """``torch.compile`` of :func:`_model_call` with ``mode``, made once per process and mode, so that a
    runner built after another one for the same model can reuse its compiled code instead of starting
    a new cache."""
    if mode not in _compiled_model_calls:
        _compiled_model_calls[mode] = torch.compile(_model_call, dynamic=False, mode=mode)
    return _compiled_model_calls[mode]


def _state_key(model: nn.Module) -> tuple:
    """Address and in-place version of every parameter and buffer (cheap, no device sync; inference
    tensors have no version counter and count by address only)."""
    tensors = (*model.parameters(), *model.buffers())
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)


def _set_memory_format(model: nn.Module, memory_format: torch.memory_format) -> None:
    """Convert the model's 4-D tensors in place; outside inference mode, so they stay ordinary tensors."""
    with torch.inference_mode(False), torch.no_grad():
        model.to(memory_format=memory_format)


class CudaGraphCall:
    """One model call captured as a CUDA graph on static inputs of fixed shapes.

    The static buffers are allocated outside the graph's memory pool; the output lives in the pool and
    is cloned after every replay, so no caller ever holds memory a later replay overwrites.
    """

    def __init__(self, fn: ModelCall, x: Tensor, t: Tensor, cond: Mapping[str, Tensor], warmup: int = 2):
        self.x = torch.empty_like(x)
        self.x.copy_(x)
        self.t = t.clone()
        self.cond = {k: v.clone() for k, v in cond.items()}
        device = x.device
        was = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)  # cached casts made during capture would dangle after it
        try:
            with torch.no_grad():
                side = torch.cuda.Stream(device=device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):  # warm-up: lazy init, cuDNN/cuBLAS setup, AdaRound's weight cache
                    for _ in range(warmup):
                        fn(self.x, self.t, self.cond)
                torch.cuda.current_stream(device).wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.out = fn(self.x, self.t, self.cond)
        finally:
            torch.set_autocast_cache_enabled(was)

    def __call__(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        for k, v in self.cond.items():
            v.copy_(cond[k])
        self.graph.replay()
        return self.out.clone()


class ModelRunner:
    """Calls ``model`` as :func:`predict_noise` does, with the given speed options (see the module docstring).

    Build one per model and sampling job and reuse it across batches (graphs and compiled code live
    in it); :meth:`release` ends its use: it frees them and restores the model's memory format.

    Args:
        model: the noise predictor (FP or fake-quantized), already on its device and in eval mode.
        precision: ``fp32`` (default), ``tf32`` or ``bf16``.
        channels_last: run in channels-last memory format (converts the model's 4-D tensors in place
            until :meth:`release`).
        cuda_graph: capture and replay CUDA graphs (CUDA models only).
        compile: wrap the call in ``torch.compile``.
        compile_mode: its ``mode`` (see :data:`COMPILE_MODES`).
    """

    def __init__(self, model: nn.Module, *, precision: Precision = "fp32", channels_last: bool = False,
                 cuda_graph: bool = False, compile: bool = False, compile_mode: CompileMode = "default"):
        check(precision in PRECISIONS, f"sampler.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        check(compile_mode in COMPILE_MODES,
              f"sampler.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
        first = next(iter(model.parameters()), None)
        first = first if first is not None else next(iter(model.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
        check(not cuda_graph or device.type == "cuda",
              f"sampler.cuda_graph needs a model on a CUDA device, this one is on {device.type}: "
              "set sampler.cuda_graph: false")
        self.model, self.device = model, device
        self.precision, self.channels_last = precision, channels_last
        self.cuda_graph, self.compile, self.compile_mode = cuda_graph, compile, compile_mode
        if channels_last:
            _set_memory_format(model, torch.channels_last)  # a no-op for tensors already channels-last
        self._model_call = compiled_model_call(compile_mode) if compile else _model_call
        self._graphs: dict[tuple, CudaGraphCall] = {}
        self._graph_state: tuple | None = None

    @classmethod
    def for_sampler(cls, model: nn.Module, cfg) -> "ModelRunner":
        """The runner of ``model`` under a :class:`~gaq.models.sampling.SamplerConfig`'s speed options."""
        return cls(model, precision=cfg.precision, channels_last=cfg.channels_last, cuda_graph=cfg.cuda_graph,
                   compile=cfg.compile, compile_mode=cfg.compile_mode)

    def options(self) -> dict:
        return {"precision": self.precision, "channels_last": self.channels_last, "cuda_graph": self.cuda_graph,
                "compile": self.compile, "compile_mode": self.compile_mode}

    def _precision_context(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        if self.precision == "tf32" and self.device.type == "cuda":
            return cuda_tf32()
        return contextlib.nullcontext()

    def _call(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        return self._model_call(self.model, x, t, cond, self.channels_last, self.precision == "bf16")

    def begin(self) -> None:
        """Start a sampling run: drop the graphs if the model's tensors changed since they were captured."""
        if self.cuda_graph:
            state = _state_key(self.model)
            if state != self._graph_state:
                self._graphs.clear()
                self._graph_state = state

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor] | None = None) -> Tensor:
        """The noise prediction ``(B, C, H, W)`` (no autograd), contiguous, in ``x``'s dtype under ``bf16``."""
        cond = dict(cond or {})
        if not self.cuda_graph:
            with self._precision_context():
                return self._call(x, t, cond)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if self._graph_state is None:
            self.begin()
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype,
               tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(cond.items())))
        graph = self._graphs.get(key)
        if graph is None:  # the static input keeps x's layout: the call converts it as it does eagerly
            with self._precision_context():  # the graph records the kernels this context selects
                graph = self._graphs[key] = CudaGraphCall(self._call, x, t, cond)
        return graph(x, t, cond)

    def release(self) -> None:
        """Free the captured graphs and give the model back contiguous (after ``channels_last``)."""
        self._graphs.clear()
        self._graph_state = None
        if self.channels_last:
            _set_memory_format(self.model, torch.contiguous_format)
