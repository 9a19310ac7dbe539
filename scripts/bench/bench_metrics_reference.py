#!/usr/bin/env python3
"""Reference timings for the cwseg-metrics benchmark (BENCHMARKS.md): MONAI, DeepMind's
surface-distance and medpy computing Dice, HD95, ASSD and NSD (1 mm) for the 15 foreground
classes of the same 96x160x160 pair as crates/metrics/benches/metrics.rs.

    python scripts/bench/bench_metrics_reference.py   # numpy, torch, monai; surface-distance, medpy if present
"""
import os
import sys
import time
import warnings

import numpy as np
import torch
import monai
from monai.metrics import (DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric,
                           compute_average_surface_distance)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_morphology_reference import phantom  # noqa: E402

warnings.filterwarnings("ignore")


def perturbed(label):
    pred = np.zeros_like(label)
    pred[1:, 2:, :-3] = label[:-1, :-2, 3:]
    z, y, x = np.meshgrid(*[np.arange(s) for s in label.shape], indexing="ij")
    pred[(pred == 2) & ((z + y + x) % 7 == 0)] = 0
    return pred


def timed(name, f, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    print(f"{name}: {best * 1e3:.1f} ms")
    return out


def main():
    torch.set_num_threads(1)
    label = phantom()
    pred = perturbed(label)
    classes = range(1, 16)
    print(f"torch {torch.__version__}, monai {monai.__version__}, numpy {np.__version__}; torch threads 1")

    def monai_all():
        p = torch.from_numpy(np.stack([pred == c for c in classes])[None].astype(np.float32))
        g = torch.from_numpy(np.stack([label == c for c in classes])[None].astype(np.float32))
        dice = DiceMetric(include_background=True, reduction="none")(p, g)
        hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(p, g, spacing=[1.0] * 3)
        assd = compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=[1.0] * 3)
        nsd = SurfaceDiceMetric(class_thresholds=[1.0] * 15, include_background=True, reduction="none")(p, g, spacing=[1.0] * 3)
        return dice, hd95, assd, nsd

    dice, hd95, assd, nsd = timed("MONAI Dice+HD95+ASSD+NSD, 15 classes", monai_all)
    print(f"  MONAI mean HD95 {hd95.mean().item():.4f} mm")

    try:
        import surface_distance as sd

        def deepmind_all():
            out = []
            for c in classes:
                g, p = label == c, pred == c
                d = sd.compute_surface_distances(g, p, (1.0, 1.0, 1.0))
                out.append((sd.compute_dice_coefficient(g, p), sd.compute_robust_hausdorff(d, 95),
                            sd.compute_average_surface_distance(d), sd.compute_surface_dice_at_tolerance(d, 1.0)))
            return out

        timed("surface-distance (DeepMind) Dice+HD95+ASD+NSD, 15 classes", deepmind_all, repeat=2)
    except ImportError:
        print("surface-distance not installed")
    try:
        from medpy.metric import binary

        def medpy_all():
            return [(binary.dc(pred == c, label == c), binary.hd95(pred == c, label == c, (1.0, 1.0, 1.0)),
                     binary.assd(pred == c, label == c, (1.0, 1.0, 1.0))) for c in classes]

        timed("medpy dc+hd95+assd, 15 classes", medpy_all, repeat=1)
    except ImportError:
        print("medpy not installed")


if __name__ == "__main__":
    main()
