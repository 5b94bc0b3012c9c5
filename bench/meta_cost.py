"""What a GAC meta step costs next to a reconstruction iteration, and how ``gac.val_per_group`` changes it.

One ResBlock of the google/ddpm-cifar10-32 architecture (random weights, W4 AdaRound, soft rounding),
random inputs and FP targets: times one reconstruction iteration (forward + backward at batch 32)
and one meta step's hypergradient (:func:`gaq.calib.gac.meta_hypergradient_parts`: inner step,
per-group validation losses, weight-gradients, final backward to ``s``) with the paper's validation
split (5% of 5,120 tuples = 256, 5 groups) and with ``val_per_group`` subsamples, for both forms of
``gac.hypergradient`` (``nested`` autograd through the look-ahead, ``factored``). Eager, so on a GPU
it measures launch-bound time; the ratio on a CPU follows the arithmetic.

    python bench/meta_cost.py --device cpu --out bench/results/meta_cost/cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import UNet2DModel

sys.path.insert(0, str(Path(__file__).parent))
from speed_cifar import CIFAR_UNET  # noqa: E402

from gaq.calib.gac import GACConfig, MetaStepInputs, meta_hypergradient_parts  # noqa: E402
from gaq.calib.recon import per_sample_error  # noqa: E402
from gaq.calib.weights import LearnedSampleWeights  # noqa: E402
from gaq.provenance import device_name, git_commit  # noqa: E402
from gaq.quant import QuantConfig, quantize, rounding_parameters, set_adaround_soft  # noqa: E402


def _time(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/meta_cost/cpu.json")
    ap.add_argument("--block", default="down_blocks.0.resnets.0", help="module path of the ResBlock")
    ap.add_argument("--val", type=int, default=256, help="validation tuples (5%% of 5,120)")
    ap.add_argument("--groups", type=int, default=5)
    ap.add_argument("--per_group", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hypergradient", nargs="+", default=["nested", "factored"],
                    choices=["nested", "factored", "factored+batched", "factored+forward", "factored+forward+batched"],
                    help="gac.hypergradient; +forward: gac.jacobian_products forward; +batched: gac.batched_products")
    ap.add_argument("--graph", action="store_true", help="time CUDA-graph replays (as the engine runs them)")
    ap.add_argument("--cudnn_benchmark", action="store_true", help="let cuDNN time its algorithms per shape")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    fp = UNet2DModel(**CIFAR_UNET).eval()
    qmodel = quantize(fp, QuantConfig(w_bits=4, a_bits=32)).to(device).eval().requires_grad_(False)
    fp_block = fp.get_submodule(args.block).to(device)
    block = qmodel.get_submodule(args.block)
    set_adaround_soft(block, True)
    theta = rounding_parameters(block)
    for p in theta:
        p.requires_grad_(True)
    shapes = {}  # the block's input shapes, from one forward pass of the model
    hook = fp_block.register_forward_pre_hook(lambda m, a: shapes.update(x=a[0].shape[1:], temb=a[1].shape[1:]))
    with torch.no_grad():
        fp.to(device)(torch.randn(1, 3, 32, 32, device=device), torch.tensor([10], device=device))
    hook.remove()
    n_train = 64
    n = n_train + args.val
    x = torch.randn(n, *shapes["x"], device=device)
    temb = torch.randn(n, *shapes["temb"], device=device)
    with torch.no_grad():
        target = fp_block(x, temb)

    def per_sample_loss(f, idx):
        return per_sample_error(f(x[idx], temb[idx]), target[idx])

    train = torch.arange(n_train, device=device)
    weights = LearnedSampleWeights(train.cpu()).to(device)
    val = torch.arange(n_train, n, device=device)
    groups = list(val.chunk(args.groups))
    batch = train[:32]
    cfg = replace(GACConfig(), backend="functional")

    def recon_iteration():
        loss = per_sample_loss(block, batch).mean()
        torch.autograd.grad(loss, theta)

    def meta(val_batches, form):
        hyper, *options = form.split("+")
        c = replace(cfg, hypergradient=hyper, batched_products="batched" in options,
                    jacobian_products="forward" if "forward" in options else "reverse")
        inputs = MetaStepInputs(unit=block, theta=theta, per_sample_loss=per_sample_loss, train_batch=batch,
                                val_batches=val_batches, cfg=c)
        fn = lambda: meta_hypergradient_parts(inputs, weights, batch)  # noqa: E731
        grads[(form, len(val_batches[0]))] = fn()[0].detach().clone()
        if not args.graph:
            return fn
        from gaq.calib.graphed import capture_graph
        graph, _ = capture_graph(fn, device)
        return graph.replay

    grads: dict = {}
    rows = {"recon_iteration": _time(recon_iteration, args.repeats, sync)}
    if args.graph:
        from gaq.calib.graphed import capture_graph
        g_iter, _ = capture_graph(recon_iteration, device)
        rows["recon_iteration"] = _time(g_iter.replay, args.repeats, sync)
    for form in args.hypergradient:
        rows[f"{form}_meta_step_val_{args.val}"] = _time(meta(groups, form), args.repeats, sync)
        for k in args.per_group:
            rows[f"{form}_meta_step_val_per_group_{k}"] = _time(meta([g[:k] for g in groups], form), args.repeats, sync)
    # every form's hypergradient against the first form's, at the same validation tuples
    ref = args.hypergradient[0]
    agreement = {f"{form} vs {ref}, {n} per group": float((g - grads[(ref, n)]).norm() / grads[(ref, n)].norm())
                 for (form, n), g in grads.items() if form != ref}
    base = rows["recon_iteration"]
    result = {"device": device_name(device), "torch": torch.__version__, "git_commit": git_commit(),
              "command": "python bench/meta_cost.py " + " ".join(sys.argv[1:]), "block": args.block,
              "graph": args.graph, "cudnn_benchmark": args.cudnn_benchmark, "seconds": rows, "in_recon_iterations": {k: v / base for k, v in rows.items()},
              "relative_difference_of_the_hypergradient": agreement}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
