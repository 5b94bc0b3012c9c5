"""Throughput of a disk-placed unit cache (``recon.cache_placement: disk``) on this machine.

Writes a cache file of ``--gib`` GiB through gaq's writable map (rows shaped like the ImageNet LDM-4 config's
largest unit: ``--row`` floats of input and of target per tuple), drops the file from the page cache
(fsync + ``posix_fadvise(DONTNEED)``), then gathers seeded random batches of ``--batch`` tuples through gaq's
read-only map, cold (from the disk) and warm (from the page cache), as the reconstruction does. Prints a
Markdown table.

    python bench/disk_cache.py --dir /tmp/gaq-disk-bench --gib 4
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch

from gaq.calib.cache import create_mapped_safetensors, open_mapped_safetensors


def _gather(tensors: dict[str, torch.Tensor], n: int, batch: int, batches: int, seed: int) -> tuple[float, int]:
    """Seconds and bytes of ``batches`` gathers of ``batch`` random rows from every tensor."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    t0, nbytes = time.perf_counter(), 0
    for i in range(batches):
        idx = order[i * batch:(i + 1) * batch]
        nbytes += sum(t[idx].nbytes for t in tensors.values())
    return time.perf_counter() - t0, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="folder of the test file (removed afterwards)")
    ap.add_argument("--gib", type=float, default=4.0, help="size of the cache file")
    ap.add_argument("--row", type=int, nargs="+", default=[192, 64, 64], help="per-tuple shape of input and target")
    ap.add_argument("--batch", type=int, default=32, help="tuples per gathered batch (recon.batch_size)")
    args = ap.parse_args()
    row = torch.Size(args.row)
    per_tuple = 2 * row.numel() * 4
    n = int(args.gib * 2**30 // per_tuple)
    batches = n // args.batch
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / "bench.rank0.safetensors"
    try:
        t0 = time.perf_counter()
        mapped = create_mapped_safetensors(path, {"arg.0": ((n, *row), torch.float32),
                                                  "target": ((n, *row), torch.float32)}, {"bench": "disk_cache"})
        fill = torch.Generator().manual_seed(0)
        for s in range(0, n, 256):  # as the cache is filled: batches of recon.cache_batch tuples
            for t in mapped.values():
                t[s:s + 256].copy_(torch.randn((min(256, n - s), *row), generator=fill))
        del mapped, t
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
            write_s = time.perf_counter() - t0
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        tensors = open_mapped_safetensors(path)
        cold_s, cold_b = _gather(tensors, n, args.batch, batches, seed=1)
        warm_s, warm_b = _gather(tensors, n, args.batch, batches, seed=2)
        size = path.stat().st_size
    finally:
        path.unlink(missing_ok=True)
    mib = 2**20
    print(f"file {size / 2**30:.2f} GiB, {n} tuples of {per_tuple / mib:.1f} MiB (input + target {tuple(row)} fp32), "
          f"batches of {args.batch} ({args.batch * per_tuple / mib:.0f} MiB), {batches} batches per pass, "
          f"{torch.get_num_threads()} torch threads, free disk {shutil.disk_usage(args.dir).free / 2**30:.0f} GiB\n")
    print("| phase | MiB/s | ms per batch |")
    print("|---|---|---|")
    print(f"| write (random fill + fsync, includes generating the data) | {size / mib / write_s:.0f} | "
          f"{write_s / batches * 1e3:.0f} |")
    print(f"| gather, cold (page cache dropped) | {cold_b / mib / cold_s:.0f} | {cold_s / batches * 1e3:.0f} |")
    print(f"| gather, warm (page cache) | {warm_b / mib / warm_s:.0f} | {warm_s / batches * 1e3:.0f} |")


if __name__ == "__main__":
    main()
