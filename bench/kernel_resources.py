"""Registers, spills and shared memory of gaq's Triton kernels on a target GPU, compiled offline (no GPU needed).

Each autotune candidate of the one-kernel quantized attention (:data:`gaq.deploy.triton_attention.ATTENTION_CONFIGS`)
and of the linear kernel (:data:`gaq.deploy.triton_kernels.GEMM_SHAPES`, int8 activations, with and without the
feed-forward epilogue) is compiled by Triton for ``--arch`` (default sm_90, the H200) and read back with the
``cuobjdump`` Triton ships: registers per thread, stack bytes (spills), shared memory, and counts of the SASS
instructions that tell spills (``STL`` / ``LDL``), byte shuffles (``PRMT``) and tensor-core ops apart. A
candidate that spills is slow however the autotuner times it; this tells so before any device time is spent.

    python bench/kernel_resources.py --out bench/results/deploy/kernel_resources_sm90
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gaq.deploy import triton_attention, triton_kernels  # noqa: E402
from gaq.provenance import git_commit  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
SASS_OPS = ("STL", "LDL", "PRMT", "LDG", "LDS", "STS", "MUFU")


def compile_resources(fn, pointers: dict[str, str], floats: set[str], constexprs: dict, warps: int, stages: int,
                      arch: int) -> dict:
    """Compile ``fn`` (a ``triton.jit`` function) for ``sm_<arch>`` and read its resources from the cubin."""
    params = list(inspect.signature(fn.fn).parameters)
    signature = {p: "constexpr" if p in constexprs else pointers.get(p, "fp32" if p in floats else "i32")
                 for p in params}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage.replace("\n", " "))
    ops = Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M))
    mma = sum(n for op, n in ops.items() if "MMA" in op)
    regs, stack = (int(g) for g in found.groups()) if found else (None, None)
    return {"registers": regs, "stack_bytes": stack, "shared_bytes": int(kernel.metadata.shared), "mma_ops": mma,
            **{op.lower(): sum(n for o, n in ops.items() if o.split(".")[0] == op) for op in SASS_OPS},
            "sass_lines": sass.count("\n"), "spills": bool(stack)}


def attention_rows(arch: int, head_dim: int) -> list[dict]:
    pointers = {"q_ptr": "*i8", "k_ptr": "*i8", "v_ptr": "*i8", "o_ptr": "*bf16", "grid_ptr": "*fp32",
                "ksum_ptr": "*i32", "vsum_ptr": "*i32"}
    rows = []
    for m, n, w, s in triton_attention.ATTENTION_CONFIGS:
        one_pass = n >= 256
        consts = {"ONE_PASS": one_pass, "BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": max(32, triton.next_power_of_2(head_dim))}
        res = compile_resources(triton_attention._attention_kernel, pointers, {"sm_scale", "pmin", "pmax"}, consts, w, s,
                                arch)
        rows.append({"kernel": "attention", "config": f"BLOCK_M {m}, BLOCK_N {n}, warps {w}, stages {s}",
                     "one_pass_for_256_keys": one_pass, **res})
    return rows


def linear_rows(arch: int) -> list[dict]:
    pointers = {"x_ptr": "*i8", "w_ptr": "*i8", "out_ptr": "*bf16", "bias_ptr": "*fp32", "sx_ptr": "*fp32",
                "zx_ptr": "*i32", "rs_ptr": "*i32", "sw_ptr": "*fp32", "zw_ptr": "*i32", "cs_ptr": "*i32",
                "os_ptr": "*fp32", "oz_ptr": "*fp32", "ors_ptr": "*i32"}
    rows = []
    for act in (0, triton_kernels.ACTIVATIONS["gelu_tanh"]):
        ptrs = {**pointers, "out_ptr": "*i8"} if act else pointers
        for m, n, k, w, s in triton_kernels.GEMM_SHAPES:
            consts = {"W4": False, "INTEGER": True, "ZW": False, "HAS_BIAS": True, "ACT": act, "QOUT": bool(act),
                      "QROWSUM": False, "EVEN_K": True, "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}
            res = compile_resources(triton_kernels._linear_kernel, ptrs, {"oqmin", "oqmax", "ooffset"}, consts, w, s,
                                    arch)
            rows.append({"kernel": "linear, GELU + codes epilogue" if act else "linear",
                         "config": f"BLOCK_M {m}, BLOCK_N {n}, BLOCK_K {k}, warps {w}, stages {s}", **res})
    return rows


def markdown(res: dict) -> str:
    lines = [f"# Resources of gaq's Triton kernels on sm_{res['arch']} (compiled offline; commit {res['commit']})", "",
             f"`{res['command']}`; triton {res['triton']} (the version of the machine that compiled: the H200's "
             "torch 2.11 ships triton 3.6, whose allocation can differ). Registers per thread (255 is the limit), "
             "stack bytes (non-zero: spills), shared memory (dynamic, Triton's), SASS counts.", "",
             "| kernel | config | registers | stack B | shared B | MMA ops | STL | LDL | PRMT |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['kernel']} | {r['config']} | {r['registers']} | {r['stack_bytes']} | {r['shared_bytes']} | "
                     f"{r['mma_ops']} | {r['stl']} | {r['ldl']} | {r['prmt']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/deploy/kernel_resources_sm90"))
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--head_dim", type=int, default=72, help="the attention's head dim (DiT-XL/2: 72)")
    ap.add_argument("--kernels", nargs="+", default=["attention", "linear"], choices=["attention", "linear"])
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles the kernels for a GPU")
    rows = (attention_rows(args.arch, args.head_dim) if "attention" in args.kernels else []) + (
        linear_rows(args.arch) if "linear" in args.kernels else [])
    res = {"command": "python " + " ".join(sys.argv), "commit": git_commit(), "triton": triton.__version__,
           "arch": args.arch, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
