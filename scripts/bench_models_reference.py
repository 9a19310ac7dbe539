#!/usr/bin/env python3
"""PyTorch reference for the cwseg-models conv3d benchmark: 2x32x64^3, 32 -> 32, k=3, pad 1.

    python scripts/bench_models_reference.py --threads 2
"""
import argparse
import time

import torch
import torch.nn.functional as F


def best(f, repeat=3):
    t_best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    torch.set_num_threads(ap.parse_args().threads)
    x = torch.randn(2, 32, 64, 64, 64, requires_grad=True)
    w = (0.1 * torch.randn(32, 32, 3, 3, 3)).requires_grad_(True)
    with torch.no_grad():
        fwd = best(lambda: F.conv3d(x, w, padding=1))
    both = best(lambda: F.conv3d(x, w, padding=1).sum().backward())
    flops = 2 * 2 * 32 * 64**3 * 32 * 27
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"conv3d forward: {fwd * 1e3:.1f} ms ({flops / fwd / 1e9:.1f} GFLOP/s)")
    print(f"conv3d forward+backward: {both * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
