#!/usr/bin/env python3
"""Reference fixtures for cwseg-losses: MONAI's loss classes and a plain PyTorch transcription
of SPEC.md §2-4 (maps from scipy.ndimage, independent of cwseg-morphology).

    python scripts/losses_fixtures.py     # numpy, scipy, torch, monai
Writes crates/losses/tests/fixtures/{losses.npz,versions.json}: per case the logits (float64),
labels (int64), and per loss the value (float64) and the gradient w.r.t. the logits (float32).
"""
import json
import os
import sys

import monai
import numpy as np
import scipy
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss, FocalLoss, GeneralizedDiceLoss, TverskyLoss

OUT = os.path.join("crates", "losses", "tests", "fixtures")
rng = np.random.default_rng(11)
torch.set_default_dtype(torch.float64)


def blobs(shape, classes, sigma=1.2):
    fields = np.stack([ndi.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(classes)])
    return fields.argmax(0).astype(np.int64)


def edge_map(labels, k=3, n=6, include_background=True):
    """SPEC §1 with scipy: union over classes of y==c AND NOT erode^n(y==c), per sample; 2D
    erosion when D == 1."""
    out = np.zeros(labels.shape, bool)
    for i, y in enumerate(labels):
        squeeze = y.shape[0] == 1
        vol = y[0] if squeeze else y
        union = np.zeros(vol.shape, bool)
        for c in np.unique(vol):
            if c == 0 and not include_background:
                continue
            m = vol == c
            union |= m & ~ndi.binary_erosion(m, np.ones((k,) * vol.ndim, bool), iterations=n)
        out[i] = union[None] if squeeze else union
    return out.astype(np.float64)


def dwce_weights(labels, w0=10.0, sigma=5.0):
    out = np.zeros(labels.shape)
    for i, y in enumerate(labels):
        vol = y[0] if y.shape[0] == 1 else y
        structure = ndi.generate_binary_structure(vol.ndim, vol.ndim)
        comps, offset = np.zeros(vol.shape, np.int64), 0
        for c in np.unique(vol):
            if c == 0:
                continue
            lab, n = ndi.label(vol == c, structure)
            comps[lab > 0] = lab[lab > 0] + offset
            offset += n
        classes, counts = np.unique(vol, return_counts=True)
        table = {c: vol.size / (len(classes) * k) for c, k in zip(classes, counts)}
        w = np.vectorize(table.get)(vol).astype(np.float64)
        if offset >= 2:
            d = np.stack([ndi.distance_transform_edt(comps != j) for j in range(1, offset + 1)])
            d.sort(axis=0)
            w = w + w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
        out[i] = w.reshape(y.shape)
    return out


def signed_distances(labels, classes):
    out = np.zeros((labels.shape[0], classes) + labels.shape[1:])
    for i, y in enumerate(labels):
        vol = y[0] if y.shape[0] == 1 else y
        for k in range(classes):
            m = vol == k
            if m.any() and not m.all():
                phi = ndi.distance_transform_edt(~m) - ndi.distance_transform_edt(m)
                out[i, k] = phi.reshape(y.shape)
    return out


def onehot(y, k):
    return F.one_hot(y, k).movedim(-1, 1).to(torch.float64)


def spec_losses(z, y, k, maps):
    """SPEC §2-4 transcribed in PyTorch."""
    E = torch.from_numpy(maps["edges"])
    t = onehot(y, k)
    sums = lambda x: x.flatten(2).sum(-1)  # (N, K)

    def base():
        # Recomputed for every loss: each one gets its own autograd graph.
        logp = F.log_softmax(z, 1)
        return logp, logp.exp(), -(logp * t).sum(1)

    def cwce(preset="paper"):
        _, _, nll = base()
        w = (1 + E) if preset == "paper" else (2 + 2 * E)
        return (w * nll).mean()

    def sdl(preset="paper"):
        _, p, _ = base()
        pf, tf = p[:, 1:], t[:, 1:]
        C = tf * E[:, None]
        R = 1 - C
        if preset == "paper":
            def part(M):
                return 1 - (2 * sums(M * pf * tf) + 1e-5) / (sums(M * pf) + sums(M * tf) + 1e-5)
            return (0.5 * part(C) + 0.5 * part(R)).mean()
        def pooled(M):
            return 1 - (2 * (M * pf * tf).sum() + 1e-3) / ((M * pf).sum() + (M * tf).sum() + 1e-3)
        return pooled(C) + pooled(R)

    out = {
        "cwce": lambda: cwce(),
        "cwce_reference": lambda: cwce("reference"),
        "sdl": lambda: sdl(),
        "sdl_reference": lambda: sdl("reference"),
        "cwcd": lambda: cwce() + sdl(),
        "cwcd_reference": lambda: cwce("reference") + sdl("reference"),
        "dwce": lambda: (torch.from_numpy(maps["dwce"]) * base()[2]).mean(),
        "boundary": lambda: (base()[1][:, 1:] * torch.from_numpy(maps["phi"])[:, 1:]).sum(1).mean(),
    }
    return out


def monai_losses(z, y, k):
    yy = y[:, None]
    focal = lambda: k * FocalLoss(use_softmax=True, gamma=2.0, to_onehot_y=True, include_background=True)(z, yy)
    dice = lambda: DiceLoss(softmax=True, to_onehot_y=True, include_background=False)(z, yy)
    weights = torch.linspace(0.5, 2.0, k)
    return {
        "dl": dice,
        "gdl": lambda: GeneralizedDiceLoss(softmax=True, to_onehot_y=True, include_background=False)(z, yy),
        "cedl": lambda: DiceCELoss(softmax=True, to_onehot_y=True, include_background=False)(z, yy),
        "tversky": lambda: TverskyLoss(softmax=True, to_onehot_y=True, include_background=False)(z, yy),
        "focal": focal,
        "dicefocal": lambda: dice() + focal(),
        "ce": lambda: F.cross_entropy(z, y),
        "ce_weighted": lambda: F.cross_entropy(z, y, weight=weights),
        "ce_ignore": lambda: F.cross_entropy(z, y, ignore_index=1),
    }


def cases():
    c = {}
    y = blobs((1, 6, 7, 8), 2)
    c["binary_b1"] = (rng.standard_normal((1, 2, 6, 7, 8)) * 2, y)
    y = blobs((4, 5, 9, 7), 4)
    c["four_b4"] = (rng.standard_normal((4, 4, 5, 9, 7)) * 2, y)
    y = blobs((2, 3, 8, 8), 6)  # 16 logit channels, labels use 6 of them: empty classes
    y[y == 3] = 11
    c["sixteen_empty_b2"] = (rng.standard_normal((2, 16, 3, 8, 8)), y)
    y = blobs((2, 1, 14, 13), 3)
    c["image2d_b2"] = (rng.standard_normal((2, 3, 1, 14, 13)) * 2, y)
    y = blobs((2, 4, 7, 7), 4)
    c["extreme_b2"] = (np.sign(rng.standard_normal((2, 4, 4, 7, 7))) * 1e4, y)
    c["background_b1"] = (rng.standard_normal((1, 3, 4, 6, 6)), np.zeros((1, 4, 6, 6), np.int64))
    return c


def main():
    os.makedirs(OUT, exist_ok=True)
    arrays = {}
    for name, (z, y) in cases().items():
        k = z.shape[1]
        arrays[f"{name}__logits"] = z
        arrays[f"{name}__labels"] = y
        maps = {"edges": edge_map(y), "dwce": dwce_weights(y), "phi": signed_distances(y, k)}
        arrays[f"{name}__edges"] = maps["edges"].astype(np.uint8)
        zt = torch.tensor(z, requires_grad=True)
        yt = torch.from_numpy(y)
        losses = {**monai_losses(zt, yt, k), **spec_losses(zt, yt, k, maps)}
        for loss, f in losses.items():
            if k < 2 and loss in ("dl", "gdl", "tversky"):
                continue
            zt.grad = None
            value = f()
            value.backward()
            assert torch.isfinite(value), (name, loss, value)
            arrays[f"{name}__{loss}__value"] = np.array(value.item())
            arrays[f"{name}__{loss}__grad"] = zt.grad.numpy().astype(np.float32)
    np.savez_compressed(os.path.join(OUT, "losses.npz"), **arrays)
    versions = {"python": sys.version.split()[0], "numpy": np.__version__, "scipy": scipy.__version__,
                "torch": torch.__version__, "monai": monai.__version__}
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump(versions, f, indent=1)
    print("fixtures written to", OUT, versions)


if __name__ == "__main__":
    main()
