#!/usr/bin/env python3
"""Reference fixtures for cwseg-morphology, computed with scipy.ndimage.

Run from the repository root with numpy, scipy and nibabel installed (outside the repo):
    python scripts/morphology_fixtures.py
Writes crates/morphology/tests/fixtures/*.npz (small, committed). The Rust tests read them
without Python. Every array is indexed [z, y, x] (3D) or [y, x] (2D), C order.
"""
import json
import os
import sys

import numpy as np
import scipy
import scipy.ndimage as ndi

OUT = os.path.join("crates", "morphology", "tests", "fixtures")
SHARED = os.path.join("..", "shared", "data")
rng = np.random.default_rng(20261126)


def blobs(shape, threshold, sigma=2.0):
    noise = rng.standard_normal(shape)
    return ndi.gaussian_filter(noise, sigma) > threshold


def multiclass(shape, classes, sigma=2.5):
    """Label volume: argmax of smoothed noise fields, background where all are low."""
    fields = np.stack([ndi.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(classes)])
    labels = fields.argmax(0).astype(np.uint8) + 1
    labels[fields.max(0) < 0.12] = 0
    return labels


def cube(k, ndim):
    return np.ones((k,) * ndim, dtype=bool)


def cross(ndim):
    return ndi.generate_binary_structure(ndim, 1)


def erosion_fixtures():
    masks = {
        "random3d": rng.random((11, 13, 12)) < 0.8,
        "blob3d": blobs((14, 15, 16), 0.0),
        "random2d": rng.random((19, 17)) < 0.8,
        "blob2d": blobs((24, 21), -0.05),
        "thin3d": rng.random((1, 12, 13)) < 0.85,  # size-1 axis, treated as 3D
    }
    out = {}
    for name, m in masks.items():
        out[f"{name}__mask"] = m
        nd = m.ndim
        elements = [("cube", k, cube(k, nd)) for k in range(1, 6)] + [("cross", 3, cross(nd))]
        for element, k, structure in elements:
            for n in range(1, 7):
                key = f"{name}__{element}{k}__n{n}"
                out[key + "__erode"] = ndi.binary_erosion(m, structure, iterations=n)
                out[key + "__dilate"] = ndi.binary_dilation(m, structure, iterations=n)
                # Replicate border: grey erosion with mode="nearest", repeated n times.
                r = m.astype(np.uint8)
                for _ in range(n):
                    r = ndi.grey_erosion(r, footprint=structure, mode="nearest")
                out[key + "__erode_replicate"] = r.astype(bool)
    np.savez_compressed(os.path.join(OUT, "erosion.npz"), **out)


def contour_reference(labels, structure, n, border, include_background):
    classes = np.unique(labels)
    union = np.zeros(labels.shape, bool)
    for c in classes:
        if c == 0 and not include_background:
            continue
        m = labels == c
        if border == "background":
            eroded = ndi.binary_erosion(m, structure, iterations=n)
        else:
            eroded = m.astype(np.uint8)
            for _ in range(n):
                eroded = ndi.grey_erosion(eroded, footprint=structure, mode="nearest")
            eroded = eroded.astype(bool)
        union |= m & ~eroded
    return union


def contour_fixtures():
    volumes = {"labels3d": multiclass((20, 22, 24), 5), "labels2d": multiclass((40, 36), 4)}
    out = {}
    for name, y in volumes.items():
        out[f"{name}__labels"] = y
        for element, k in [("cube", 2), ("cube", 3), ("cube", 4), ("cross", 3)]:
            structure = cube(k, y.ndim) if element == "cube" else cross(y.ndim)
            for n in (1, 3, 6):
                for border in ("background", "replicate"):
                    for bg in (False, True):
                        key = f"{name}__{element}{k}__n{n}__{border}__bg{int(bg)}"
                        out[key] = contour_reference(y, structure, n, border, bg)
    np.savez_compressed(os.path.join(OUT, "contour.npz"), **out)


def edt_fixtures():
    masks = {
        "blob3d": blobs((18, 20, 22), 0.05),
        "random3d": rng.random((9, 10, 11)) < 0.9,
        "blob2d": blobs((30, 33), 0.0),
        "sparse3d": rng.random((12, 14, 13)) < 0.998,  # few background voxels: long distances
    }
    samplings = {3: [None, (2.5, 1.0, 0.7)], 2: [None, (0.5, 1.3)]}
    out = {}
    for name, m in masks.items():
        out[f"{name}__mask"] = m
        for i, sampling in enumerate(samplings[m.ndim]):
            d = ndi.distance_transform_edt(m, sampling=sampling)
            out[f"{name}__s{i}__edt"] = d
            out[f"{name}__s{i}__signed"] = ndi.distance_transform_edt(~m, sampling=sampling) - d
            out[f"{name}__s{i}__spacing"] = np.array(sampling if sampling else [], dtype=np.float64)
    np.savez_compressed(os.path.join(OUT, "edt.npz"), **out)


def multiclass_components(labels, structure):
    """Components of every class, connecting equal labels; numbered in raster order."""
    combined = np.zeros(labels.shape, np.int64)
    offset = 0
    for c in np.unique(labels):
        if c == 0:
            continue
        comp, n = ndi.label(labels == c, structure)
        combined[comp > 0] = comp[comp > 0] + offset
        offset += n
    return combined, offset


def component_fixtures():
    out = {}
    masks = {"blob3d": blobs((16, 17, 18), 0.1, sigma=1.2), "blob2d": blobs((40, 37), 0.1, sigma=1.2)}
    for name, m in masks.items():
        out[f"{name}__mask"] = m
        for c in range(1, m.ndim + 1):
            labels, n = ndi.label(m, ndi.generate_binary_structure(m.ndim, c))
            out[f"{name}__c{c}__labels"] = labels.astype(np.int64)
    y = multiclass((16, 18, 20), 3, sigma=1.5)
    out["multi3d__labels"] = y
    for c in (1, 3):
        comp, n = multiclass_components(y, ndi.generate_binary_structure(3, c))
        out[f"multi3d__c{c}__components"] = comp
    np.savez_compressed(os.path.join(OUT, "components.npz"), **out)


def dwce_reference(labels, sampling, w0, sigma, balance=True):
    structure = ndi.generate_binary_structure(labels.ndim, labels.ndim)
    comp, n = multiclass_components(labels, structure)
    classes, counts = np.unique(labels, return_counts=True)
    weights = np.ones(labels.shape)
    if balance:
        table = {c: labels.size / (len(classes) * k) for c, k in zip(classes, counts)}
        weights = np.vectorize(table.get)(labels).astype(np.float64)
    if n < 2:
        return weights
    distances = np.stack([ndi.distance_transform_edt(comp != i, sampling=sampling) for i in range(1, n + 1)])
    distances.sort(axis=0)
    d1, d2 = distances[0], distances[1]
    return weights + w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def dwce_fixtures():
    out = {}
    cases = {
        "multi3d": (multiclass((18, 30, 28), 3, sigma=1.8), None, 10.0, 5.0),
        "multi3d_spacing": (multiclass((14, 26, 24), 2, sigma=1.8), (2.0, 0.8, 0.8), 10.0, 3.0),
        "multi2d": (multiclass((48, 44), 3, sigma=1.8), None, 10.0, 5.0),
    }
    for name, (y, sampling, w0, sigma) in cases.items():
        out[f"{name}__labels"] = y
        out[f"{name}__spacing"] = np.array(sampling if sampling else [], dtype=np.float64)
        out[f"{name}__params"] = np.array([w0, sigma])
        out[f"{name}__weights"] = dwce_reference(y, sampling, w0, sigma)
        out[f"{name}__weights_unbalanced"] = dwce_reference(y, sampling, w0, sigma, balance=False)
    np.savez_compressed(os.path.join(OUT, "dwce.npz"), **out)


def digest(mask):
    """Order-sensitive summary of a boolean volume: count and two index moments."""
    idx = np.flatnonzero(mask.ravel()).astype(np.int64)
    return [int(idx.size), int(idx.sum()), int(((idx % 1000003) ** 2).sum())]


def real_data_fixtures():
    """Digests of scipy results on ../shared/data (the volumes themselves stay out of the repo)."""
    import nibabel as nib

    cases = {
        "brats_seg": os.path.join(SHARED, "brats18", "Brats18_2013_11_1", "Brats18_2013_11_1_seg.nii.gz"),
        "totalseg_seg": os.path.join(SHARED, "totalseg-ct", "example_seg.nii.gz"),
    }
    result = {}
    for name, path in cases.items():
        img = nib.load(path)
        labels = np.asarray(img.dataobj).T.astype(np.int64)  # [z, y, x]
        spacing = tuple(float(s) for s in img.header.get_zooms()[:3][::-1])
        entry = {"path": os.path.relpath(path, SHARED), "shape": list(labels.shape), "spacing": spacing}
        for bg in (False, True):
            entry[f"contour_bg{int(bg)}"] = digest(contour_reference(labels, cube(3, 3), 6, "background", bg))
        entry["contour_replicate"] = digest(contour_reference(labels, cube(3, 3), 6, "replicate", False))
        fg = labels > 0
        d = ndi.distance_transform_edt(fg, sampling=spacing)
        entry["edt_fg"] = {"sum": float(d.sum()), "max": float(d.max()), "nonzero": int((d > 0).sum())}
        comp, n = ndi.label(fg, ndi.generate_binary_structure(3, 3))
        entry["components26"] = sorted(np.bincount(comp.ravel())[1:].tolist(), reverse=True)
        result[name] = entry
    with open(os.path.join(OUT, "real_data.json"), "w") as f:
        json.dump(result, f, indent=1)


def main():
    os.makedirs(OUT, exist_ok=True)
    erosion_fixtures()
    contour_fixtures()
    edt_fixtures()
    component_fixtures()
    dwce_fixtures()
    real_data_fixtures()
    versions = {"python": sys.version.split()[0], "numpy": np.__version__, "scipy": scipy.__version__}
    try:
        import nibabel

        versions["nibabel"] = nibabel.__version__
    except ImportError:
        pass
    with open(os.path.join(OUT, "VERSIONS.json"), "w") as f:
        json.dump(versions, f, indent=1)
    print("fixtures written to", OUT, versions)


if __name__ == "__main__":
    main()
