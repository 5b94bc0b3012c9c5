"""The sampler's speed options (gaq.models.runner) on tiny real models, on the CPU.

Tolerances (relative L2 difference of the final DDIM samples against the default path, same noise):
channels-last on the FP model < 1e-4 (float reassociation only); bf16 autocast < 5e-2 (bfloat16
has 8 significant bits; about 1e-2 per model call here). On a W4A8 model an activation that sits on
a rounding boundary can flip one quantization step under a different kernel, so there the options
must move the samples less than a quarter of what quantization itself moves them. CUDA graphs and
torch.compile's generated kernels need the GPU: bench/sampling_throughput.py runs and checks them;
here a test checks that Dynamo captures a quantized model whole.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import NUM_CLASSES, make_tiny_cond_unet, make_tiny_unet

from gaq.errors import GaqError
from gaq.eval.generation import SamplingConfig, generate
from gaq.models.runner import ModelRunner, cuda_tf32
from gaq.models.sampling import SamplerConfig, ddim_sample, sampling_timesteps
from gaq.models.denoiser import predict_noise
from gaq.models.loading import Denoiser
from gaq.quant import QuantConfig, quantize_rtn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def _reference_ddim(model, alphas_cumprod, noise, cfg, cond, null_cond):
    """The DDIM loop as it was before the speed options (eta = 0): predict_noise, float64 update."""
    acp = alphas_cumprod.double()
    ts = sampling_timesteps(len(acp), cfg.steps, cfg.spacing).tolist()
    guided = cfg.guidance_scale != 1.0
    x = noise
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x_in = torch.cat([x, x]) if guided else x
        c_in = {k: torch.cat([cond[k], null_cond[k]]) for k in cond} if guided else dict(cond)
        eps = predict_noise(model, x_in, torch.full((x_in.shape[0],), t, dtype=torch.long), c_in)
        if guided:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + cfg.guidance_scale * (eps_c - eps_u)
        a_t = acp[t]
        a_prev = acp[t_prev] if t_prev >= 0 else torch.ones((), dtype=torch.float64)
        x64, eps64 = x.double(), eps.double()
        x0 = (x64 - (1 - a_t).sqrt() * eps64) / a_t.sqrt()
        if cfg.clip_sample:
            x0 = x0.clamp(-1, 1)
            eps64 = (x64 - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = (a_prev.sqrt() * x0 + (1 - a_prev).clamp(min=0).sqrt() * eps64).to(noise.dtype)
    return x


def _class_inputs(n: int = 8):
    noise = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.arange(n) % NUM_CLASSES}
    null = {"class_labels": torch.full((n,), NUM_CLASSES)}
    return noise, cond, null


def _text_inputs(n: int = 4):
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(n, 4, 8, 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(n, 3, 16, generator=g)}
    null = {"encoder_hidden_states": torch.zeros(n, 3, 16)}
    return noise, cond, null


@pytest.mark.parametrize("kind", ["class", "text"])
def test_default_options_are_the_plain_ddim_loop(kind, ddpm_scheduler):
    model = make_tiny_unet() if kind == "class" else make_tiny_cond_unet()
    noise, cond, null = _class_inputs() if kind == "class" else _text_inputs()
    cfg = SamplerConfig(steps=6, guidance_scale=2.0)
    assert (cfg.precision, cfg.channels_last, cfg.cuda_graph, cfg.compile) == ("fp32", False, False, False)
    out = ddim_sample(model, ddpm_scheduler.alphas_cumprod, noise, cfg, cond, null)
    assert torch.equal(out, _reference_ddim(model, ddpm_scheduler.alphas_cumprod, noise, cfg, cond, null))
    # a reused default runner is the same call
    runner = ModelRunner(model)
    assert torch.equal(ddim_sample(runner, ddpm_scheduler.alphas_cumprod, noise, cfg, cond, null), out)


@pytest.mark.parametrize("kind", ["class", "text"])
def test_speed_options_on_cpu_match_the_default(kind, ddpm_scheduler):
    make = make_tiny_unet if kind == "class" else make_tiny_cond_unet
    noise, cond, null = _class_inputs() if kind == "class" else _text_inputs()
    acp = ddpm_scheduler.alphas_cumprod
    cfg = SamplerConfig(steps=6, guidance_scale=2.0)
    ref = ddim_sample(make(), acp, noise, cfg, cond, null)
    # tf32 only touches CUDA kernels: on the CPU it is exactly fp32
    assert torch.equal(ddim_sample(make(), acp, noise, replace(cfg, precision="tf32"), cond, null), ref)
    model = make()
    layouts = []

    def on_step(*_):
        layouts.append(model.conv_in.weight.is_contiguous(memory_format=torch.channels_last))

    cl = ddim_sample(model, acp, noise, replace(cfg, channels_last=True), cond, null, on_step=on_step)
    assert layouts == [True] * cfg.steps and model.conv_in.weight.is_contiguous()  # given back contiguous
    assert cl.is_contiguous() and _rel(cl, ref) < 1e-4
    bf16 = ddim_sample(make(), acp, noise, replace(cfg, precision="bf16"), cond, null)
    assert bf16.dtype == torch.float32 and 0 < _rel(bf16, ref) < 5e-2
    both = ddim_sample(make(), acp, noise, replace(cfg, precision="bf16", channels_last=True), cond, null)
    assert _rel(both, ref) < 5e-2


def test_bf16_runs_the_model_under_autocast_and_returns_the_input_dtype(ddpm_scheduler):
    model = make_tiny_unet()
    noise, cond, _ = _class_inputs(4)
    t = torch.full((4,), 500, dtype=torch.long)
    seen = []
    hook = model.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    eps = ModelRunner(model, precision="bf16")(noise, t, cond)
    hook.remove()
    assert seen == [torch.bfloat16] and eps.dtype == torch.float32
    with torch.no_grad():
        ref = predict_noise(model, noise, t, cond)
    assert 0 < _rel(eps, ref) < 3e-2


def test_tf32_context_restores_the_flags():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with cuda_tf32():
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_quantized_model_with_speed_options(ddpm_scheduler):
    fp = make_tiny_unet()
    acp = ddpm_scheduler.alphas_cumprod
    noise, cond, _ = _class_inputs()
    cfg = SamplerConfig(steps=6)
    batches = []

    def on_step(i, t, x, c):
        batches.append({"x": x.clone(), "t": t.clone(), "step": torch.full_like(t, i), "cond": dict(c)})

    ref_fp = ddim_sample(fp, acp, noise, cfg, cond, on_step=on_step)
    q = quantize_rtn(fp, QuantConfig(w_bits=4, a_bits=8, preset="tfmq_compat"), batches)
    ref = ddim_sample(q, acp, noise, cfg, cond)
    quant_error = _rel(ref, ref_fp)
    assert quant_error > 1e-2
    for options in ({"channels_last": True}, {"precision": "bf16"}, {"precision": "bf16", "channels_last": True}):
        out = ddim_sample(copy.deepcopy(q), acp, noise, replace(cfg, **options), cond)
        assert _rel(out, ref) < 0.25 * quant_error, options


def test_quantized_model_traces_as_one_graph_for_torch_compile(ddpm_scheduler):
    """AdaRound's weight cache (keyed by data pointers) is bypassed under torch.compile, so Dynamo
    captures the whole W4A8 model call without a graph break, and the compiled call (autograd
    tracing, no code generation) gives what the eager one gives."""
    fp = make_tiny_unet()
    noise, cond, _ = _class_inputs()
    batches = []
    ddim_sample(fp, ddpm_scheduler.alphas_cumprod, noise, SamplerConfig(steps=3), cond,
                on_step=lambda i, t, x, c: batches.append({"x": x.clone(), "t": t.clone(),
                                                           "step": torch.full_like(t, i), "cond": dict(c)}))
    q = quantize_rtn(fp, QuantConfig(w_bits=4, a_bits=8, preset="tfmq_compat"), batches).eval()
    x, t = batches[1]["x"], batches[1]["t"]

    def call(x, t):
        return predict_noise(q, x, t, cond)

    torch._dynamo.reset()
    with torch.no_grad():  # fullgraph=True raises at the first graph break: one trace checks both
        eager = call(x, t)
        compiled = torch.compile(call, backend="aot_eager", fullgraph=True)(x, t)
    torch._dynamo.reset()
    assert _rel(compiled, eager) < 1e-5


def test_cuda_graph_on_cpu_is_a_clear_error(ddpm_scheduler):
    noise, cond, _ = _class_inputs(2)
    with pytest.raises(GaqError, match="cuda_graph needs a model on a CUDA device"):
        ddim_sample(make_tiny_unet(), ddpm_scheduler.alphas_cumprod, noise, SamplerConfig(steps=2, cuda_graph=True),
                    cond)


def test_unknown_precision_or_compile_mode_is_rejected():
    with pytest.raises(GaqError, match="sampler.precision must be one of fp32, tf32, bf16"):
        SamplerConfig(precision="fp16")
    with pytest.raises(GaqError, match="sampler.compile_mode must be one of default, max-autotune-no-cudagraphs"):
        SamplerConfig(compile=True, compile_mode="max-autotune")
    cfg = SamplerConfig(steps=7, precision="bf16", channels_last=True, cuda_graph=True, compile=True,
                        compile_mode="max-autotune-no-cudagraphs")
    assert cfg.eager() == SamplerConfig(steps=7)


def test_generate_keeps_one_runner_and_matches_the_default(ddpm_scheduler):
    den = Denoiser(make_tiny_unet(), ddpm_scheduler.alphas_cumprod, (1, 16, 16), "class", NUM_CLASSES, NUM_CLASSES)
    sampler = SamplerConfig(steps=3, guidance_scale=2.0)
    ref = torch.cat([im for _, _, im in generate(den.model, den, SamplingConfig(20, 8, 0, sampler), progress=False)])
    fast = SamplingConfig(20, 8, 0, replace(sampler, channels_last=True))
    out = torch.cat([im for _, _, im in generate(den.model, den, fast, progress=False)])
    assert out.shape == (20, 1, 16, 16) and _rel(out, ref) < 1e-4


def test_evaluate_cli_reads_the_speed_options():
    from gaq.eval.cli import build_parser

    cfg = build_parser().parse_args(["--sampler.precision", "bf16", "--sampler.channels_last", "true",
                                     "--sampler.cuda_graph", "true", "--sampler.compile", "false"])
    assert (cfg.sampler.precision, cfg.sampler.channels_last, cfg.sampler.cuda_graph, cfg.sampler.compile) == (
        "bf16", True, True, False)
    from jsonargparse import ArgumentError

    with pytest.raises(ArgumentError, match="fp16"):  # gaq evaluate turns it into one line (test_evaluate.py)
        build_parser().parse_args(["--sampler.precision", "fp16"])


def test_sampling_module_builds_one_runner_and_gives_the_model_back(ddpm_scheduler, tmp_path):
    import lightning.pytorch as pl

    from gaq.eval.generation import SamplingModule

    den = Denoiser(make_tiny_unet(), ddpm_scheduler.alphas_cumprod, (1, 16, 16), "class", NUM_CLASSES, NUM_CLASSES)
    sampler = SamplerConfig(steps=3, guidance_scale=2.0)
    images = {}
    for name, cfg in (("default", sampler), ("fast", replace(sampler, channels_last=True, precision="bf16"))):
        module = SamplingModule(den.model, den, SamplingConfig(20, 8, 0, cfg), tmp_path)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, inference_mode=False)
        out = trainer.predict(module, dataloaders=module.dataloader())
        images[name] = torch.cat([o["images"] for o in out])
        assert module._runner is None and den.model.conv_in.weight.is_contiguous()  # released after predict
    assert images["fast"].shape == (20, 1, 16, 16) and 0 < _rel(images["fast"], images["default"]) < 5e-2


def test_graph_state_key_sees_replaced_and_modified_tensors():
    from gaq.models.runner import _state_key

    model = make_tiny_unet()
    key = _state_key(model)
    assert _state_key(model) == key
    with torch.no_grad():
        model.conv_in.weight.mul_(1.0)  # in place: same address, new version
    assert _state_key(model) != key
    key = _state_key(model)
    model.conv_in.weight = torch.nn.Parameter(model.conv_in.weight.detach().clone())  # replaced
    assert _state_key(model) != key
