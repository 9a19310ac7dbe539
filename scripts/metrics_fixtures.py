#!/usr/bin/env python3
"""Reference fixtures for cwseg-metrics, computed with MONAI (and nnU-Net's formulas).

Run from the repository root with numpy, scipy, torch, monai and nibabel installed:
    python scripts/metrics_fixtures.py
Writes crates/metrics/tests/fixtures/{cases.npz,reference.json}. Volumes are [z, y, x] (or
[y, x]), spacing in the same order. The real cases of ../shared/data are not copied: only
MONAI's numbers on them are stored, and the Rust test rebuilds the perturbed prediction.
"""
import json
import os
import sys

import monai
import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
import torch
from monai.metrics import (DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric,
                           compute_average_surface_distance)
from monai.metrics.utils import do_metric_reduction

OUT = os.path.join("crates", "metrics", "tests", "fixtures")
SHARED = os.path.join("..", "shared", "data")
rng = np.random.default_rng(7)
TOLERANCES = (1.0, 2.0)


def multiclass(shape, classes, sigma=2.0, level=0.15):
    fields = np.stack([ndi.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(classes)])
    labels = fields.argmax(0).astype(np.uint8) + 1
    labels[fields.max(0) < level] = 0
    return labels


def perturb(labels, classes, flip=0.08):
    """A plausible prediction: the label with some voxels relabelled near boundaries."""
    noise = ndi.gaussian_filter(rng.standard_normal(labels.shape), 1.0)
    pred = labels.copy()
    pred[noise > np.quantile(noise, 1 - flip)] = 0
    grow = ndi.grey_dilation(labels, size=(3,) * labels.ndim)
    pred[noise < np.quantile(noise, flip)] = grow[noise < np.quantile(noise, flip)]
    return pred


def real_prediction(labels):
    """The perturbation the Rust test rebuilds: shift by (1, 2, -3), zero-filled, then label 2
    removed where (z + y + x) % 7 == 0."""
    pred = np.zeros_like(labels)
    pred[1:, 2:, :-3] = labels[:-1, :-2, 3:]
    z, y, x = np.meshgrid(*[np.arange(s) for s in labels.shape], indexing="ij")
    pred[(pred == 2) & ((z + y + x) % 7 == 0)] = 0
    return pred


def onehot(labels, class_sets):
    return torch.from_numpy(np.stack([np.isin(labels, s) for s in class_sets])[None].astype(np.float32))


def monai_metrics(pred, label, spacing, class_sets):
    p, g = onehot(pred, class_sets), onehot(label, class_sets)
    sp = list(spacing)
    out = {}
    out["monai_dice_ignore_empty"] = DiceMetric(include_background=True, reduction="none")(p, g)[0]
    out["monai_dice"] = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, g)[0]
    out["monai_hd95"] = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(p, g, spacing=sp)[0]
    out["monai_hd"] = HausdorffDistanceMetric(include_background=True, reduction="none")(p, g, spacing=sp)[0]
    out["monai_assd"] = compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=sp)[0]
    for tau in TOLERANCES:
        metric = SurfaceDiceMetric(class_thresholds=[tau] * len(class_sets), include_background=True, reduction="none")
        out[f"monai_nsd_{tau}"] = metric(p, g, spacing=sp)[0]
    # nnU-Net v2 (evaluation/evaluate_predictions.py compute_metrics): from TP, FP, FN.
    pb, gb = p[0].numpy() > 0, g[0].numpy() > 0
    axes = tuple(range(1, pb.ndim))
    tp = (pb & gb).sum(axes).astype(np.float64)
    fp = (pb & ~gb).sum(axes).astype(np.float64)
    fn = (~pb & gb).sum(axes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["nnunet_dice"] = np.where(tp + fp + fn == 0, np.nan, 2 * tp / (2 * tp + fp + fn))
        out["nnunet_iou"] = np.where(tp + fp + fn == 0, np.nan, tp / (tp + fp + fn))
    return {k: [encode(v) for v in np.asarray(t, dtype=np.float64).ravel()] for k, t in out.items()}


def encode(v):
    """JSON has no NaN or infinity: they are written as strings."""
    if np.isnan(v):
        return "nan"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return float(v)


def synthetic_cases():
    cases = {}
    y = multiclass((24, 28, 26), 3)
    cases["blobs"] = (perturb(y, 3), y, (1.0, 1.0, 1.0))
    y = multiclass((20, 30, 28), 3)
    cases["anisotropic"] = (perturb(y, 3), y, (2.5, 0.8, 0.9))
    y = multiclass((16, 20, 22), 2)
    p = y.copy()
    p[p == 1] = 0  # class 1 missed entirely; class 3 absent from both
    cases["empty_prediction"] = (p, y, (1.0, 1.2, 1.2))
    y = multiclass((16, 20, 22), 1)
    p = perturb(y, 1)
    p[2:6, 3:8, 4:9] = 2  # class 2 predicted, absent from the label
    cases["empty_label"] = (p, y, (1.0, 1.0, 1.0))
    y = np.zeros((9, 10, 11), np.uint8)
    p = y.copy()
    y[4, 5, 5] = 1
    p[5, 7, 5] = 1  # one-voxel objects, disjoint
    y[1, 1, 1] = 2
    p[1, 1, 1] = 2  # one voxel, exact
    cases["one_voxel"] = (p, y, (2.0, 0.7, 0.5))
    y = np.zeros((12, 14, 16), np.uint8)
    y[2:6, 3:8, 2:7] = 1
    p = np.zeros_like(y)
    p[7:10, 8:12, 9:14] = 1  # present in both, no overlap: DSC 0, finite distances
    y[0:3, 0:4, 10:16] = 2  # touches the array border
    p[0:3, 0:5, 11:16] = 2
    cases["disjoint_and_border"] = (p, y, (1.5, 1.0, 1.0))
    y = multiclass((40, 44), 3, sigma=2.5)
    cases["image2d"] = (perturb(y, 3), y, (0.7, 1.2))
    return cases


def aggregates(per_case, n):
    """Means per class under the three conventions, from the reference per-case values."""
    def arr(key):
        return np.array([[np.nan if isinstance(v, str) and v == "nan" else (np.inf if v == "inf" else v)
                          for v in c[key]] for c in per_case], dtype=np.float64)
    monai = do_metric_reduction(torch.from_numpy(arr("monai_dice_ignore_empty")), "mean_batch")[0].numpy()
    nn = arr("nnunet_dice")
    label_present = np.array([c["label_present"] for c in per_case])
    with np.errstate(invalid="ignore"):
        nnunet = np.nanmean(nn, axis=0)
        failed = label_present & (nn == 0)
        paper_vals = np.where(failed | np.isnan(nn), np.nan, nn)
        paper = np.nanmean(paper_vals, axis=0)
    def clean(v):
        return [float(x) if np.isfinite(x) else None for x in v]
    return {"monai": clean(monai), "nnunet": clean(nnunet), "paper": clean(paper),
            "paper_failures": failed.sum(0).tolist()}


def main():
    os.makedirs(OUT, exist_ok=True)
    arrays, reference = {}, {"synthetic": {}, "real": {}}
    class_sets = [[1], [2], [3]]
    for name, (p, y, spacing) in synthetic_cases().items():
        arrays[f"{name}__prediction"] = p
        arrays[f"{name}__label"] = y
        arrays[f"{name}__spacing"] = np.array(spacing)
        entry = monai_metrics(p, y, spacing, class_sets)
        entry["label_present"] = [bool(np.isin(y, s).any()) for s in class_sets]
        reference["synthetic"][name] = entry
    cases = [reference["synthetic"][k] for k in ("blobs", "anisotropic", "empty_prediction", "empty_label", "one_voxel", "disjoint_and_border")]
    reference["aggregate_3d"] = aggregates(cases, 3)
    np.savez_compressed(os.path.join(OUT, "cases.npz"), **arrays)

    real = {
        "brats": (os.path.join("brats18", "Brats18_2013_11_1", "Brats18_2013_11_1_seg.nii.gz"),
                  {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4], "1": [1], "2": [2], "4": [4]}),
        "totalseg": (os.path.join("totalseg-ct", "example_seg.nii.gz"), None),
    }
    for name, (path, sets) in real.items():
        img = nib.load(os.path.join(SHARED, path))
        y = np.asarray(img.dataobj).T.astype(np.int64)
        spacing = tuple(float(s) for s in img.header.get_zooms()[:3][::-1])
        if sets is None:
            sets = {str(v): [int(v)] for v in np.unique(y) if v != 0}
        p = real_prediction(y)
        entry = monai_metrics(p, y, spacing, list(sets.values()))
        entry.update({"path": path, "classes": list(sets.keys()), "labels": list(sets.values()), "spacing": spacing})
        reference["real"][name] = entry
        print(name, "done", flush=True)

    reference["versions"] = {"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__,
                             "monai": monai.__version__, "nibabel": nib.__version__,
                             "nnunet": "formulas of nnunetv2 evaluate_predictions.compute_metrics (not installed)"}
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1)
    print("fixtures written to", OUT)


if __name__ == "__main__":
    main()
