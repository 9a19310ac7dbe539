#!/usr/bin/env python3
"""Reference fixtures for cwseg-data, computed with nibabel, scipy and MONAI.

Run from the repository root with numpy, scipy, nibabel, torch, monai and nnunetv2 installed
(`pip install --no-deps nnunetv2` is enough: only its normalisation module is imported):
    python scripts/data_fixtures.py
Writes crates/data/tests/fixtures/: small NIfTI files written by nibabel (several datatypes,
scaling, sform / qform / no transform, 4D) with what nibabel reads from them (data in [z, y, x],
affine, canonical orientation), and arrays.npz with scipy's and MONAI's answers for resampling,
rotation, percentiles, normalisation, pad-or-crop, sliding-window positions and the Gaussian
importance map, nnU-Net's CT normalisation with foreground statistics pooled over cases (also
over ../shared/data/totalseg-ct when present). Arrays are [z, y, x] (C order) as in the Rust crate.
"""
import json
import os

import monai
import nibabel as nib
import numpy as np
import scipy
import scipy.ndimage as ndi
import torch
from monai.data.utils import dense_patch_slices
from monai.data.utils import compute_importance_map
from monai.inferers.utils import _get_scan_interval
from monai.transforms import NormalizeIntensity, ResizeWithPadOrCrop, ScaleIntensityRange
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

OUT = os.path.join("crates", "data", "tests", "fixtures")
rng = np.random.default_rng(11)
arrays = {}
meta = {"versions": {"numpy": np.__version__, "scipy": scipy.__version__, "nibabel": nib.__version__,
                     "monai": monai.__version__, "torch": torch.__version__}, "nifti": {}}


def foreground_properties(images, labels):
    """nnU-Net's foreground intensity properties of the voxels with label > 0, pooled."""
    v = np.concatenate([i[l > 0] for i, l in zip(images, labels)])
    p00_5, median, p99_5 = np.percentile(v, (0.5, 50.0, 99.5))
    return {"voxels": int(v.size), "mean": float(np.mean(v, dtype=np.float64)),
            "std": float(np.std(v, dtype=np.float64)), "median": float(median),
            "min": float(v.min()), "max": float(v.max()),
            "percentile_00_5": float(p00_5), "percentile_99_5": float(p99_5)}


def rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def save(name, img):
    path = os.path.join(OUT, name)
    nib.save(img, path)
    back = nib.load(path)
    data = np.asarray(back.dataobj).astype(np.float64) * 1.0
    data = back.get_fdata(dtype=np.float64)
    zyx = np.ascontiguousarray(data.T) if data.ndim == 3 else np.ascontiguousarray(np.transpose(data, (3, 2, 1, 0)))
    key = name.replace(".nii.gz", "").replace(".nii", "")
    arrays[f"{key}_data"] = zyx
    arrays[f"{key}_affine"] = back.affine.astype(np.float64)
    canon = nib.as_closest_canonical(back)
    cdata = canon.get_fdata(dtype=np.float64)
    arrays[f"{key}_canonical"] = np.ascontiguousarray(cdata.T) if cdata.ndim == 3 else np.ascontiguousarray(np.transpose(cdata, (3, 2, 1, 0)))
    arrays[f"{key}_canonical_affine"] = canon.affine.astype(np.float64)
    meta["nifti"][key] = {"file": name, "axcodes": "".join(nib.aff2axcodes(back.affine)),
                          "zooms_zyx": [float(z) for z in back.header.get_zooms()[:3][::-1]]}


SHARED = os.path.join("..", "shared", "data")


def real_data_digests():
    """What nibabel reads from the real volumes of ../shared/data (never copied): shape, affine,
    zooms, sums and the values at seeded voxels, in [z, y, x] order."""
    files = [os.path.join("brats18", "Brats18_2013_11_1", f"Brats18_2013_11_1_{m}.nii.gz")
             for m in ("flair", "t1", "t1ce", "t2", "seg")]
    files += [os.path.join("totalseg-ct", "example_ct.nii.gz"),
              os.path.join("totalseg-ct", "example_seg_full112_v1.nii.gz")]
    real = []
    pick = np.random.default_rng(5)
    for rel in files:
        path = os.path.join(SHARED, rel)
        if not os.path.exists(path):
            print("skipping absent", path)
            continue
        img = nib.load(path)
        data = np.ascontiguousarray(img.get_fdata(dtype=np.float64).T)
        coords = [[int(pick.integers(0, n)) for n in data.shape] for _ in range(64)]
        real.append({
            "file": rel.replace(os.sep, "/"),
            "dtype": str(img.get_data_dtype()),
            "shape_zyx": list(data.shape),
            "affine": img.affine.tolist(),
            "zooms_zyx": [float(z) for z in img.header.get_zooms()[:3][::-1]],
            "sum": float(data.sum()),
            "sum_squares": float((data ** 2).sum()),
            "coords": coords,
            "values": [float(data[tuple(c)]) for c in coords],
        })
    meta["real"] = real


def main():
    os.makedirs(OUT, exist_ok=True)
    # int16 with scaling; sform with a rotation and flips (LPS-like)
    raw = rng.integers(-500, 1500, size=(7, 6, 5)).astype(np.int16)
    aff = np.eye(4)
    aff[:3, :3] = rotation(0.1, -0.05, 0.3) @ np.diag([-0.8, -1.1, 2.5])
    aff[:3, 3] = [10.0, -20.0, 5.0]
    img = nib.Nifti1Image(raw, aff)
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(2.5, -3.0)
    save("int16_scaled.nii.gz", img)
    # uint8 labels, axis-permuted affine (x voxel axis points to world S)
    lab = rng.integers(0, 6, size=(5, 8, 6)).astype(np.uint8)
    aff = np.array([[0, 0, -1.2, 30], [0, 1.5, 0, -4], [2.0, 0, 0, 7], [0, 0, 0, 1]], dtype=float)
    save("uint8_label.nii.gz", nib.Nifti1Image(lab, aff))
    # float64-stored labels, plain affine
    lab64 = rng.integers(0, 4, size=(6, 5, 4)).astype(np.float64)
    save("float64_label.nii.gz", nib.Nifti1Image(lab64, np.diag([1.0, 1.0, 3.0, 1.0])))
    # qform only, oblique, qfac -1
    data = rng.standard_normal((6, 7, 5)).astype(np.float32)
    img = nib.Nifti1Image(data, None)
    q_aff = np.eye(4)
    q_aff[:3, :3] = rotation(0.2, 0.1, -0.4) @ np.diag([1.5, 2.0, -2.5])
    q_aff[:3, 3] = [-3.0, 4.0, 12.0]
    img.header.set_qform(q_aff, code=1)
    img.header.set_sform(None, code=0)
    save("qform_only.nii", img)
    # no transform at all: nibabel's base affine
    img = nib.Nifti1Image(rng.standard_normal((5, 4, 3)).astype(np.float32), None)
    img.header.set_zooms((1.5, 2.0, 2.5))
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    save("no_xform.nii", img)
    # 4D: channels last on disk
    save("four_d.nii.gz", nib.Nifti1Image(rng.standard_normal((5, 4, 3, 2)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])))
    # a label map with a non-integer value
    bad = np.zeros((4, 4, 4), dtype=np.float32)
    bad[1, 2, 3] = 1.5
    nib.save(nib.Nifti1Image(bad, np.eye(4)), os.path.join(OUT, "bad_label.nii.gz"))

    # resampling to a spacing: our grid keeps the first voxel centre; output index o maps to
    # input index o * new / old per axis. scipy map_coordinates is the interpolation reference.
    vol = rng.standard_normal((7, 9, 11))
    labels = rng.integers(0, 5, size=(7, 9, 11)).astype(np.uint8)
    old, new = np.array([1.5, 1.0, 0.8]), np.array([1.0, 1.3, 0.7])
    shape = np.maximum(np.round(np.array(vol.shape) * old / new).astype(int), 1)
    grid = np.meshgrid(*[np.arange(n) * new[a] / old[a] for a, n in enumerate(shape)], indexing="ij")
    arrays["resample_input"] = vol
    arrays["resample_labels"] = labels
    arrays["resample_linear"] = ndi.map_coordinates(vol, grid, order=1, mode="nearest")
    arrays["resample_nearest"] = ndi.map_coordinates(labels, grid, order=0, mode="nearest")
    meta["resample"] = {"old": old.tolist(), "new": new.tolist()}
    # in-plane rotation and zoom about the plane centre: scipy's affine_transform with the
    # matrix of cwseg's convention (input = c + R (o - c)/zoom in (y, x), R = [[cos, sin], [-sin, cos]])
    angle, zoom = np.deg2rad(12.0), 1.1
    c = (np.array(vol.shape) - 1) / 2.0
    cos, sin = np.cos(angle), np.sin(angle)
    m = np.array([[1, 0, 0], [0, cos / zoom, sin / zoom], [0, -sin / zoom, cos / zoom]])
    offset = c - m @ c
    offset[0] = 0.0
    arrays["rotate_linear"] = ndi.affine_transform(vol, m, offset=offset, order=1, mode="nearest")
    meta["rotate"] = {"degrees": 12.0, "zoom": zoom}
    # scipy.ndimage.rotate with axes (1, 2) at the same angle: which way is positive
    arrays["rotate_scipy"] = ndi.rotate(vol, 12.0, axes=(1, 2), reshape=False, order=1, mode="nearest")

    # percentiles and normalisation
    x = rng.standard_normal((5, 6, 7)).astype(np.float32) * 3 + 1
    x[x < 0] = 0  # many zeros for the non-zero z-score
    arrays["intensity_input"] = x.copy()
    qs = [0.0, 0.5, 12.3, 50.0, 99.5, 100.0]
    arrays["percentile_q"] = np.array(qs)
    arrays["percentile"] = np.array([np.percentile(x, q) for q in qs])
    arrays["zscore"] = NormalizeIntensity()(torch.from_numpy(x.copy())).numpy()
    arrays["zscore_nonzero"] = NormalizeIntensity(nonzero=True)(torch.from_numpy(x.copy())).numpy()
    # fixed windows (MONAI's ScaleIntensityRange), clipped and not, one inverting
    windows = [
        {"a_min": 0.5, "a_max": 4.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
        {"a_min": -1.0, "a_max": 6.0, "b_min": -1.0, "b_max": 1.0, "clip": False},
        {"a_min": 3.0, "a_max": 1.0, "b_min": 0.0, "b_max": 2.0, "clip": True},
    ]
    meta["scale_range"] = windows
    for i, w in enumerate(windows):
        arrays[f"scale_range_{i}"] = ScaleIntensityRange(**w)(torch.from_numpy(x.copy())).numpy()
    # nnU-Net's CT normalisation: foreground (label > 0) statistics pooled over two cases, as the
    # data set fingerprint computes them from all voxels, then CTNormalization of the first case
    y = (np.random.default_rng(12).standard_normal((4, 6, 5)) * 40 + 60).astype(np.float32)
    labels = [(x > 1.5).astype(np.uint8) * 2, (y > 50).astype(np.uint8)]
    arrays["ct_input_b"] = y
    arrays["ct_label_a"], arrays["ct_label_b"] = labels
    meta["ct_properties"] = foreground_properties([x, y], labels)
    arrays["nnunet_ct"] = CTNormalization(intensityproperties=meta["ct_properties"]).run(x.copy())
    ct = "../shared/data/totalseg-ct"
    if os.path.isdir(ct):
        image = np.asarray(nib.load(f"{ct}/example_ct.nii.gz").dataobj, dtype=np.float32)
        seg = np.asarray(nib.load(f"{ct}/example_seg_full112_v1.nii.gz").dataobj)
        meta["totalseg_ct_properties"] = foreground_properties([image], [seg])

    # pad or crop, centred
    small = rng.standard_normal((1, 5, 8, 9)).astype(np.float32)
    for i, size in enumerate([(8, 6, 9), (3, 11, 4), (5, 8, 9), (6, 7, 12)]):
        arrays[f"padcrop_{i}"] = ResizeWithPadOrCrop(size)(torch.from_numpy(small)).numpy()[0]
        meta.setdefault("padcrop", []).append(list(size))
    arrays["padcrop_input"] = small[0]

    # sliding window starts and importance maps
    sw = []
    for shape, roi, overlap in [((40, 37, 64), (16, 16, 16), 0.5), ((16, 20, 33), (16, 8, 10), 0.25),
                                 ((96, 96, 96), (64, 64, 64), 0.5), ((17, 17, 17), (16, 16, 16), 0.0)]:
        interval = _get_scan_interval(shape, roi, 3, (overlap,) * 3)
        slices = dense_patch_slices(shape, roi, interval)
        starts = [[int(s.start) for s in sl] for sl in slices]
        sw.append({"shape": list(shape), "window": list(roi), "overlap": overlap, "starts": starts})
    meta["sliding"] = sw
    for w in [(16, 16, 16), (9, 12, 7)]:
        imp = compute_importance_map(w, mode="gaussian", sigma_scale=0.125, device="cpu")
        arrays["importance_" + "x".join(map(str, w))] = imp.numpy().astype(np.float32)

    real_data_digests()
    np.savez_compressed(os.path.join(OUT, "arrays.npz"), **arrays)
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
