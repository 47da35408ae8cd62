"""Benchmark: `loratool merge --svd` vs the dense method (sd-scripts' svd_merge_lora) on an SDXL-size pair.

Two synthetic kohya LoRAs over kohya's 722 default modules of the REAL SDXL base UNet config (built on
the meta device): rank 16 / alpha 8 and rank 8 / alpha 4. Ours runs end to end through the CLI in a child
process (peak RSS measured there); the dense method (ΔW materialised, full torch.linalg.svd) is timed on
one module of every distinct shape and extrapolated to all 722. Prints one JSON line.

    python benchmarks/merge.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from loratool.lora import ops
from loratool.lora.io import keymap_for, read_lora, write_lora
from loratool.lora.network import LoraModule, LoraNetwork
from loratool.lora.targets import unet_targets
from loratool.sdxl.reference import BASE_UNET, meta_unet


def synthetic(unet, shapes, rank: int, alpha: float, seed: int) -> LoraNetwork:
    g = torch.Generator().manual_seed(seed)
    network = LoraNetwork()
    for path, (out_f, in_f) in shapes.items():
        down = (torch.randn(rank, in_f, generator=g) / in_f**0.5).half()
        up = (torch.randn(out_f, rank, generator=g) * 0.01).half()
        network.add(LoraModule("unet", path, down, up, alpha))
    return network


def child_peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """Run a command in a child; its wall time and peak RSS (MiB, from the kernel's own accounting)."""
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(args, check=True, capture_output=True, env=os.environ | {"OMP_NUM_THREADS": os.environ["T"]})
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return time.perf_counter() - start, max(peak, before) / 1024


def dense_baseline(a: LoraNetwork, b: LoraNetwork) -> tuple[float, float, dict]:
    """Seconds for the dense method over all modules (one timed per shape) and the sampled modules."""
    by_shape: dict[tuple, str] = {}
    counts = Counter()
    for m in a:
        shape = (m.up.shape[0], m.down.shape[1])
        by_shape.setdefault(shape, m.path)
        counts[shape] += 1
    total, timed = 0.0, {}
    for shape, path in by_shape.items():
        terms = [
            (1.0, a.modules[("unet", path)].up, a.modules[("unet", path)].down, a.modules[("unet", path)].alpha),
            (-1.0, b.modules[("unet", path)].up, b.modules[("unet", path)].down, b.modules[("unet", path)].alpha),
        ]
        t = time.perf_counter()
        ops.dense_svd_merge(terms, rank=24)
        seconds = time.perf_counter() - t
        timed[path] = terms
        total += seconds * counts[shape]
    return total, sum(1 for _ in by_shape), timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ["T"] = str(args.threads)
    torch.set_num_threads(args.threads)

    unet = meta_unet(BASE_UNET)
    targets = unet_targets(unet)
    layers = dict(unet.named_modules())
    shapes = {p: tuple(layers[p].weight.shape) for p in targets}
    keymap = keymap_for(unet)
    a, b = synthetic(unet, shapes, 16, 8.0, 1), synthetic(unet, shapes, 8, 4.0, 2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_lora(a, tmp / "a.safetensors", keymap=keymap)
        write_lora(b, tmp / "b.safetensors", keymap=keymap)
        cli = [
            sys.executable,
            "-m",
            "loratool",
            "merge",
            str(tmp / "a.safetensors:1"),
            str(tmp / "b.safetensors:-1"),
            "--svd",
            "--dtype",
            "fp32",
            "-o",
            str(tmp / "s.safetensors"),
        ]
        # Start-up alone first: RUSAGE_CHILDREN keeps the maximum over all children so far.
        idle = "import torch, loratool.cli, loratool.merge, loratool.lora.ops, safetensors.torch"
        idle_s, idle_mb = child_peak_rss_mb([sys.executable, "-c", idle])
        ours_s, peak_mb = child_peak_rss_mb(cli)
        io_mb = sum((tmp / f).stat().st_size for f in ("a.safetensors", "b.safetensors", "s.safetensors")) / 2**20
        merged = read_lora(tmp / "s.safetensors", keymap)
    dense_s, n_shapes, timed = dense_baseline(a, b)
    max_err = max(
        float((merged.modules[("unet", p)].delta() - ops.dense_delta(terms)).norm() / ops.dense_delta(terms).norm())
        for p, terms in timed.items()
    )
    print(
        json.dumps(
            {
                "benchmark": "merge_svd_sdxl_pair",
                "modules": len(targets),
                "ranks": [16, 8],
                "threads": args.threads,
                "loratool_seconds": round(ours_s, 2),
                "loratool_seconds_minus_startup": round(ours_s - idle_s, 2),
                "dense_seconds_extrapolated": round(dense_s, 1),
                "dense_shapes_timed": n_shapes,
                "speedup": round(dense_s / ours_s, 1),
                "peak_rss_mb": round(peak_mb),
                "startup_rss_mb": round(idle_mb),
                "io_mb": round(io_mb),
                "memory_ratio_vs_io": round((peak_mb - idle_mb) / io_mb, 2),
                "max_rel_error_vs_dense": max_err,
            }
        )
    )


if __name__ == "__main__":
    main()
