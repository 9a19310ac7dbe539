#!/usr/bin/env python3
"""Digests of scipy's whole-volume contour maps of real BraTS labels, for the test that each
training patch's map equals the whole volume's map cropped (SPEC §1, "training on patches").

Run from the repository root with numpy, scipy and nibabel installed (outside the repo):
    python scripts/patch_contour_fixtures.py
Writes crates/data/tests/fixtures/whole_volume_contours.json (digests only: the volumes stay
in ../shared/data). The maps are those of the paper's public code: per class
`S & ~binary_erosion(S, np.ones((k,)*3), iterations=n)` (border value 0), union over the
foreground classes, or over every class with the background; the replicate border is
n grey erosions with mode="nearest".
"""
import json
import os
import sys

import nibabel as nib
import numpy as np
import scipy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from morphology_fixtures import contour_reference, cube  # noqa: E402

OUT = os.path.join("crates", "data", "tests", "fixtures", "whole_volume_contours.json")
SHARED = os.path.join("..", "shared", "data")
CASES = ["Brats18_2013_11_1", "Brats18_TCIA02_135_1"]


def contour_union(labels, k, n, border, include_background):
    """The union contour map of scipy, as the morphology fixtures compute it."""
    return contour_reference(labels, cube(k, 3), n, border, include_background)


def digest(mask):
    """Order-sensitive summary of a boolean volume: count and two index moments (C order)."""
    idx = np.flatnonzero(mask.ravel()).astype(np.int64)
    return [int(idx.size), int(idx.sum()), int(((idx % 1000003) ** 2).sum())]


def main():
    result = {"versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                           "scipy": scipy.__version__, "nibabel": nib.__version__},
              "cases": {}}
    for case in CASES:
        path = os.path.join(SHARED, "brats18", case, f"{case}_seg.nii.gz")
        labels = np.asarray(nib.load(path).dataobj).T.astype(np.int64)  # [z, y, x]
        entry = {"path": os.path.relpath(path, SHARED), "shape": list(labels.shape), "maps": {}}
        for k in (2, 3):
            for n in (1, 3, 6):
                for border in ("background", "replicate"):
                    for bg in (False, True):
                        key = f"k{k}_n{n}_{border}_bg{int(bg)}"
                        entry["maps"][key] = digest(contour_union(labels, k, n, border, bg))
                        print(case, key, entry["maps"][key][0], flush=True)
        result["cases"][case] = entry
    with open(OUT, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
