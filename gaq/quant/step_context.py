"""Which calibrated sampling step each sample is at, shared by every quantizer of one quantized model.

With per-step activation scales (TFMQ-DM) an activation quantizer holds one scale per calibrated
sampling step and picks, per sample, the scale of that sample's step. The step of each sample lives
in one :class:`StepContext` per quantized model:

- a forward pre-hook on the root model (:class:`TimestepHook`) maps the model's timestep argument to
  step indices (the nearest calibrated timestep; where timesteps repeat, e.g. quadratic spacing
  repeats 0, the first such step in sampling order). A timestep that is not one of the calibrated
  ones (a sampler with other steps than the calibration's) gets the scales of the nearest calibrated
  step, and the hook says so with an :class:`UncalibratedTimestepWarning`, once per distinct timestep;
- code that runs a single block sets the steps itself with :func:`set_step_index`.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from gaq.errors import check

#: Names the root model's forward may give its timestep parameter, tried in this order.
TIMESTEP_ARG_NAMES: tuple[str, ...] = ("timestep", "timesteps", "t")


class UncalibratedTimestepWarning(UserWarning):
    """A model with per-step activation scales ran at a timestep it was not calibrated at."""


class StepContext:
    """The per-sample step index of the batch being run.

    Attributes:
        timesteps: calibrated timesteps in sampling order, float64 ``(S,)`` on the CPU, or None when
            the model has no per-step scales.
        canonical: for each step, the first step with the same timestep, LongTensor ``(S,)``.
        step_index: LongTensor ``(B,)`` (or ``(1,)``, broadcast over the batch) of step indices into
            ``timesteps``, or None when unset.
    """

    def __init__(self, timesteps: Tensor | None = None):
        self.timesteps: Tensor | None = None
        self.canonical: Tensor | None = None
        self.step_index: Tensor | None = None
        self._device_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._warned: set[float] = set()  # uncalibrated timesteps already warned about
        self.check_device_timesteps = True  # False: skip the check for timesteps on a device (a host sync per call)
        if timesteps is not None:
            ts = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1)
            check(ts.numel() >= 1, "timesteps must hold at least one calibrated sampling timestep")
            check(bool(torch.isfinite(ts).all()), "timesteps must be finite numbers")
            first = (ts[:, None] == ts[None, :]).int().argmax(dim=1)  # first index with the same value
            self.timesteps, self.canonical = ts, first.long()

    @property
    def num_steps(self) -> int:
        """S, the number of calibrated steps (1 without per-step scales)."""
        return 1 if self.timesteps is None else int(self.timesteps.numel())

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        cached = self._device_cache.get(device)
        if cached is None:
            cached = (self.timesteps.to(device), self.canonical.to(device))
            # not kept from inside torch.compile: there the copies are a compiled graph's outputs, whose memory CUDA
            # graphs reuse on the next replay (a later call would read overwritten values; :meth:`keep_on` instead)
            if not torch.compiler.is_compiling():
                self._device_cache[device] = cached
        return cached

    def keep_on(self, device: torch.device | str) -> None:
        """Hold the calibrated timesteps on ``device`` for the calls to come (call it outside torch.compile: the
        model's calls then read these copies instead of making their own)."""
        if self.timesteps is not None:
            self._on(torch.device(device))

    def __deepcopy__(self, memo):  # device caches are not state
        new = StepContext.__new__(StepContext)
        memo[id(self)] = new
        new.timesteps = None if self.timesteps is None else self.timesteps.clone()
        new.canonical = None if self.canonical is None else self.canonical.clone()
        new.step_index = None if self.step_index is None else self.step_index.clone()
        new._device_cache = {}
        new._warned = set(self._warned)
        new.check_device_timesteps = self.check_device_timesteps
        return new

    def steps_for_timesteps(self, t: Tensor) -> Tensor:
        """Step indices ``(B,)`` of timesteps ``t`` ``(B,)``: the nearest calibrated timestep, first on ties."""
        check(self.timesteps is not None, "this quantized model has no per-step activation scales")
        ts, _ = self._on(t.device)
        dist = (t.reshape(-1, 1).to(torch.float64) - ts.reshape(1, -1)).abs()
        return dist.argmin(dim=1)  # argmin returns the first minimal index

    def warn_uncalibrated(self, t: Tensor, steps: Tensor) -> None:
        """Warn (once per distinct timestep) about timesteps ``t`` that are not calibrated ones;
        ``steps`` are the steps :meth:`steps_for_timesteps` gave them. Skipped during CUDA graph capture and
        while ``torch.compile`` traces (a host read there would break the graph), and for device timesteps when
        :attr:`check_device_timesteps` is off (a deployed model: the read would synchronise every call)."""
        if t.is_meta or torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
            return  # a meta-device model (shape checks) has no values to compare
        if t.device.type != "cpu" and not self.check_device_timesteps:
            return
        requested = t.detach().reshape(-1).to("cpu", torch.float64)
        steps = steps.reshape(-1).to("cpu")
        nearest = self.timesteps[steps]
        for i in torch.nonzero(requested != nearest).reshape(-1).tolist():
            value = float(requested[i])
            if value in self._warned:
                continue
            self._warned.add(value)
            warnings.warn(
                f"timestep {value:g} is not one of the {self.num_steps} calibrated timesteps of this quantized model "
                f"(range {float(self.timesteps.min()):g}..{float(self.timesteps.max()):g}): it uses the activation scales "
                f"of the nearest calibrated step, timestep {float(nearest[i]):g} (step {int(steps[i])}); calibrate with "
                "the sampler's timesteps to avoid this", UncalibratedTimestepWarning, stacklevel=2)

    def set(self, step: Tensor | None) -> None:
        """Set the step indices of the next forward passes (None clears them).

        ``step`` is LongTensor ``(B,)`` or ``(1,)`` of indices into ``timesteps``. Steps that share a
        timestep with an earlier step are mapped to that earlier step, as the timestep hook does.
        """
        if step is None or self.timesteps is None:
            self.step_index = None
            return
        step = torch.as_tensor(step)
        check(not step.is_floating_point() and not step.is_complex(), "step indices must be an integer tensor")
        step = step.reshape(-1).long()
        if step.device.type == "cpu":  # range check without a device sync
            check(step.numel() == 0 or (int(step.min()) >= 0 and int(step.max()) < self.num_steps),
                  f"step indices must be in [0, {self.num_steps}) (positions in the quantized model's "
                  f"timesteps), got range [{int(step.min())}, {int(step.max())}]")
        _, canonical = self._on(step.device)
        self.step_index = canonical[step]


class TimestepHook:
    """Root-model forward pre-hook that sets the step context from the model's timestep argument."""

    def __init__(self, context: StepContext, position: int, name: str):
        self.context, self.position, self.name = context, position, name

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.name in kwargs:
            t = kwargs[self.name]
        elif len(args) > self.position:
            t = args[self.position]
        else:
            t = None
        if t is None:
            self.context.step_index = None
            return
        device = next((a.device for a in args if isinstance(a, Tensor)), None)
        t = torch.as_tensor(t, device=device) if not isinstance(t, Tensor) else t
        if torch.compiler.is_compiling() and device is not None and t.device != device:
            # inside a compiled graph the lookup runs on the model's device (its timesteps kept there by
            # StepContext.keep_on): measured on an H200 with torch 2.11, a host lookup of a pipeline's CPU timestep
            # feeding CUDA ops failed in Inductor's post-grad passes ("Unhandled FakeTensor Device Propagation for
            # aten.sub.Tensor, found two different devices cuda:0, cpu"); the host check of the timestep is skipped
            # there anyway (warn_uncalibrated)
            t = t.to(device)
        steps = self.context.steps_for_timesteps(t.reshape(-1))
        self.context.warn_uncalibrated(t, steps)
        if device is not None and steps.device != device:  # once per call, not once per layer
            steps = steps.to(device, non_blocking=True)
        self.context.step_index = steps


def one_or_per_sample(n: int, batch: int) -> bool:
    """Whether ``n`` entries (step indices, grids) are one for the whole batch or one per sample of ``batch``. Written as
    two ``==`` (not ``n in (1, batch)``, which Dynamo evaluated as False for a dynamic batch in torch 2.11: the check
    raised while tracing and the model fell back to eager)."""
    return n == 1 or n == batch


def timestep_argument(model: nn.Module) -> tuple[int, str] | None:
    """``(position, name)`` of the timestep parameter of ``model.forward`` (self excluded), or None."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = [p.name for p in params]
    for name in TIMESTEP_ARG_NAMES:
        if name in names:
            return names.index(name), name
    return None


def install_timestep_hook(model: nn.Module, context: StepContext) -> Any:
    """Register the timestep hook on the root ``model``; returns the hook handle."""
    arg = timestep_argument(model)
    check(arg is not None, f"{type(model).__name__}.forward has no timestep argument ({', '.join(TIMESTEP_ARG_NAMES)}): "
          "per-step activation scales need one; set per_step_act: false")
    return model.register_forward_pre_hook(TimestepHook(context, *arg), with_kwargs=True)


def find_step_context(module: nn.Module) -> StepContext | None:
    """The step context shared by the activation quantizers under ``module`` (None if it has none)."""
    info = getattr(module, "gaq_quant", None)
    if info is not None:
        return info.context
    for m in module.modules():
        ctx = getattr(m, "context", None)
        if isinstance(ctx, StepContext):
            return ctx
    return None


def set_step_index(qmodel: nn.Module, step: Tensor | None) -> None:
    """Set the per-sample step indices (LongTensor ``(B,)``, positions in the ``timesteps`` given to
    :func:`gaq.quant.quantize`) for code that calls blocks of ``qmodel`` directly; None clears them.

    A call of the root model sets them itself from its timestep argument. No-op for models without
    per-step activation scales.
    """
    ctx = find_step_context(qmodel)
    if ctx is not None:
        ctx.set(step)
