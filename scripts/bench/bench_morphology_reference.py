#!/usr/bin/env python3
"""Reference timings for the cwseg-morphology benchmarks (BENCHMARKS.md): scipy.ndimage and
the `edt` package (seung-lab) on the same 96x160x160 volume as benches/morphology.rs.

    python scripts/bench/bench_morphology_reference.py        # numpy, scipy, edt installed
"""
import sys
import time

import numpy as np
import scipy
import scipy.ndimage as ndi

import edt as edt_pkg


def phantom():
    shape = (96, 160, 160)
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.int64) for s in shape], indexing="ij")
    labels = np.zeros(shape, np.uint8)
    for c in range(1, 16):
        cz, cy, cx = 10 + (c * 37) % 76, 15 + (c * 53) % 130, 15 + (c * 71) % 130
        rz = 6 + (c * 13) % 20
        ry, rx = rz + rz // 3, rz - rz // 5
        a, b, d = ry * ry * rx * rx, rz * rz * rx * rx, rz * rz * ry * ry
        inside = (z - cz) ** 2 * a + (y - cy) ** 2 * b + (x - cx) ** 2 * d <= rz * rz * ry * ry * rx * rx
        labels[inside] = c
    return labels


def best(f, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return min(times), out


def contour_loop(labels):
    """formulas §1 the way a scipy user writes it: one erosion per class."""
    union = np.zeros(labels.shape, bool)
    for c in range(1, int(labels.max()) + 1):
        m = labels == c
        union |= m & ~ndi.binary_erosion(m, np.ones((3, 3, 3), bool), iterations=6)
    return union


def contour_minmax(labels):
    """The fastest scipy form we know: one 13^3 min and max filter for all classes."""
    lo = ndi.minimum_filter(labels, size=13, mode="constant", cval=0)
    hi = ndi.maximum_filter(labels, size=13, mode="constant", cval=255)
    return (lo != hi) & (labels > 0)


def main():
    labels = phantom()
    mask = labels > 0
    print(f"numpy {np.__version__}, scipy {scipy.__version__}, python {sys.version.split()[0]}")
    print(f"classes {len(np.unique(labels))}, foreground {int(mask.sum())}")
    t, loop = best(lambda: contour_loop(labels), 3)
    print(f"contour_map scipy per-class binary_erosion loop: {t * 1e3:.1f} ms, {int(loop.sum())} voxels")
    t, mm = best(lambda: contour_minmax(labels), 3)
    assert (mm == loop).all()
    print(f"contour_map scipy 13^3 min/max filters: {t * 1e3:.1f} ms")
    t, _ = best(lambda: ndi.binary_erosion(mask, np.ones((3, 3, 3), bool), iterations=6), 3)
    print(f"erode cube k3 n6 scipy binary_erosion: {t * 1e3:.1f} ms")
    t, d_scipy = best(lambda: ndi.distance_transform_edt(mask), 5)
    print(f"edt scipy distance_transform_edt: {t * 1e3:.1f} ms")
    for threads in (1, 2):
        t, d = best(lambda: edt_pkg.edt(mask, parallel=threads), 10)
        assert np.allclose(d, d_scipy, rtol=1e-5)
        print(f"edt seung-lab edt parallel={threads}: {t * 1e3:.1f} ms")
    t, _ = best(lambda: ndi.distance_transform_edt(mask, sampling=(2.0, 0.8, 0.8)), 5)
    print(f"edt anisotropic scipy: {t * 1e3:.1f} ms")
    for threads in (1, 2):
        t, _ = best(lambda: edt_pkg.edt(mask, anisotropy=(2.0, 0.8, 0.8), parallel=threads), 10)
        print(f"edt anisotropic seung-lab edt parallel={threads}: {t * 1e3:.1f} ms")
    t, _ = best(lambda: ndi.label(mask, np.ones((3, 3, 3), bool)), 5)
    print(f"connected_components 26 scipy label: {t * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
