#!/usr/bin/env python3
"""Reference timings for cwseg-data's example `bench_data`, on the same BraTS case:
nibabel load of 4 modalities + labels, resampling to 2 mm (scipy.ndimage.zoom, order 1 for
images, 0 for labels), z-score over the brain voxels; then MONAI's patch pipeline
(RandCropByPosNegLabeld 64³, RandRotated ±15° p 0.2 in the axial plane, RandFlipd p 0.2).

    python scripts/bench/bench_data_reference.py [--threads 2]
"""
import argparse
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
os.environ["OMP_NUM_THREADS"] = str(args.threads)

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import scipy.ndimage as ndi  # noqa: E402
import torch  # noqa: E402
import monai  # noqa: E402
from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, RandRotated  # noqa: E402

torch.set_num_threads(args.threads)
CASE = os.path.join("..", "shared", "data", "brats18", "Brats18_2013_11_1")


def load():
    images = [nib.load(os.path.join(CASE, f"Brats18_2013_11_1_{m}.nii.gz")).get_fdata(dtype=np.float32)
              for m in ("flair", "t1", "t1ce", "t2")]
    label = np.asarray(nib.load(os.path.join(CASE, "Brats18_2013_11_1_seg.nii.gz")).dataobj)
    zoom = 0.5
    images = [ndi.zoom(i, zoom, order=1) for i in images]
    label = ndi.zoom(label, zoom, order=0)
    out = []
    for i in images:
        mask = i != 0
        mean, sd = i[mask].mean(), i[mask].std()
        out.append(np.where(mask, (i - mean) / (sd if sd > 0 else 1.0), 0.0).astype(np.float32))
    return np.stack(out), label


times = []
for _ in range(5):
    start = time.perf_counter()
    image, label = load()
    times.append(time.perf_counter() - start)
print(f"nibabel + scipy load + resample 2 mm + z-score ({args.threads} threads): median {np.median(times) * 1e3:.1f} ms")

label = np.where(label == 4, 3, label)[None]
pipeline = Compose([
    RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=(64, 64, 64), pos=1, neg=1, num_samples=1),
    RandRotated(keys=["image", "label"], range_x=np.deg2rad(15), prob=0.2, mode=("bilinear", "nearest")),
    RandFlipd(keys=["image", "label"], prob=0.2, spatial_axis=0),
])
pipeline.set_random_state(0)
rates = []
for _ in range(3):
    start = time.perf_counter()
    for _ in range(80):
        pipeline({"image": image, "label": label})
    rates.append(80 / (time.perf_counter() - start))
print(f"MONAI patch pipeline, 64³ (one process, torch threads {args.threads}): median {np.median(rates):.1f} patches/s (monai {monai.__version__})")
