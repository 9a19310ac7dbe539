#!/usr/bin/env python3
"""Reference timings for the cwseg-losses benchmark (BENCHMARKS.md): forward + backward of
CWCD (PyTorch transcription of docs/formulas.md, contour map by separable max-pooling), CEDL
(MONAI DiceCELoss) and GDL (MONAI GeneralizedDiceLoss) on logits (2, 16, 96, 96, 96), CPU.

    python scripts/bench/bench_losses_reference.py --threads 2
"""
import argparse
import time

import torch
import torch.nn.functional as F
import monai
from monai.losses import DiceCELoss, GeneralizedDiceLoss


def labels_volume(n, k, s):
    z, y, x = torch.meshgrid(*[torch.arange(s)] * 3, indexing="ij")
    one = (z // 7 + y // 13 + x // 29) % k
    return one.expand(n, s, s, s).clone()


def edges_online(y, k=3, n=6):
    """Box of side n*(k-1)+1 not uniform, or leaving the volume (background border): separable
    sliding max/min (three 1D max-pools each), the fastest PyTorch form we found."""
    w = n * (k - 1) + 1
    pad = w // 2

    def box_max(v, fill):
        for axis in range(3):
            kernel = [1, 1, 1]
            kernel[axis] = w
            padding = [0, 0, 0, 0, 0, 0]
            padding[4 - 2 * axis] = padding[5 - 2 * axis] = pad
            v = F.max_pool3d(F.pad(v, padding, value=fill), kernel, stride=1)
        return v

    v = y[:, None].float()
    lo = -box_max(-v, 1.0)
    hi = box_max(v, 1e9)
    return (lo != hi)[:, 0].float()


def cwcd(z, y, E=None):
    k = z.shape[1]
    logp = F.log_softmax(z, 1)
    p = logp.exp()
    t = F.one_hot(y, k).movedim(-1, 1).float()
    E = edges_online(y) if E is None else E
    nll = -(logp * t).sum(1)
    cwce = ((1 + E) * nll).mean()
    pf, tf = p[:, 1:], t[:, 1:]
    C = tf * E[:, None]
    R = 1 - C
    sums = lambda x: x.flatten(2).sum(-1)
    part = lambda M: 1 - (2 * sums(M * pf * tf) + 1e-5) / (sums(M * pf) + sums(M * tf) + 1e-5)
    return cwce + (0.5 * part(C) + 0.5 * part(R)).mean()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, k, s = 2, 16, 96
    z = torch.randn(n, k, s, s, s, requires_grad=True)
    y = labels_volume(n, k, s)
    losses = {
        "cwcd": lambda: cwcd(z, y),
        "cwcd (contour map precomputed, not timed)": lambda E=edges_online(y): cwcd(z, y, E),
        "cedl": lambda: DiceCELoss(softmax=True, to_onehot_y=True, include_background=False)(z, y[:, None]),
        "gdl": lambda: GeneralizedDiceLoss(softmax=True, to_onehot_y=True, include_background=False)(z, y[:, None]),
    }
    print(f"torch {torch.__version__}, monai {monai.__version__}, threads {torch.get_num_threads()}")
    for name, f in losses.items():
        best = float("inf")
        for _ in range(5):
            z.grad = None
            t = time.perf_counter()
            f().backward()
            best = min(best, time.perf_counter() - t)
        print(f"{name} forward+backward (2,16,96,96,96) f32: {best * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
