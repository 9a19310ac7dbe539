#!/usr/bin/env python3
"""The reference for `cwseg predict` timing (BENCHMARKS.md, issue 19): the same prediction of a
cwseg BraTS model on BraTS case folders in nibabel + scipy + MONAI + PyTorch.

    python scripts/bench/predict_reference.py --model RUN/best --input CASES --output OUT [--threads 2]

Per case: nibabel reads the 4 modalities (float32, as [z, y, x], cwseg's axis order, so the
same weights apply), crop to the box of non-zero voxels, trilinear resampling to the card's
spacing (scipy `affine_transform`, cwseg's grid: voxel i at input coordinate i·ratio), MONAI's
`NormalizeIntensity(nonzero=True, channel_wise=True)`, MONAI's `sliding_window_inference`
(the card's window, overlap 0.5, Gaussian weights, 2 windows per batch) of the softmax of the
PyTorch U-Net of `networks_fixtures.py` with the model's weights, each class's probability
back to the crop (scipy, trilinear, as `cwseg predict` does since it resamples probabilities
rather than labels), argmax, uncrop, class → stored label value, nibabel writes `CASE.nii.gz`.
No post-processing (compare with `cwseg predict --no-postprocess`). Prints the wall time of
the whole loop and per case; `--precision bf16` runs the network under
`torch.autocast("cpu", dtype=torch.bfloat16)` (compare with `cwseg predict --precision bf16`);
`--compare DIR` also prints the voxel agreement with cwseg's
labels in DIR.
"""
import argparse
import json
import os
import sys
import time

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import NormalizeIntensity
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from networks_fixtures import UNet  # noqa: E402


def load_network(model_dir):
    card = json.load(open(os.path.join(model_dir, "config.json")))
    m = card["model"]
    assert m["name"] == "unet", "the reference transcribes cwseg's U-Net only"
    net = UNet(m["in_channels"], m["classes"], m["filters"], m["depth"], m["norm"]["kind"], m["residual"])
    net.load_state_dict(load_file(os.path.join(model_dir, "model.safetensors")), strict=False)
    net.eval()
    return card, net


def read_case(folder, modalities):
    name = os.path.basename(folder.rstrip("/"))
    images = [nib.load(os.path.join(folder, f"{name}_{m}.nii.gz")) for m in modalities]
    # nibabel's (x, y, z) reversed: cwseg's [z, y, x]
    data = np.stack([np.asarray(i.dataobj, dtype=np.float32).transpose(2, 1, 0) for i in images])
    return name, data, images[0]


def predict(card, net, data, spacing_in, precision="f32"):
    nonzero = np.argwhere((data != 0).any(0))
    lo, hi = nonzero.min(0), nonzero.max(0) + 1
    crop = data[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    ratio = np.asarray(card["preprocessing"]["spacing"]) / spacing_in
    shape = tuple(int(np.round(n / r)) for n, r in zip(crop.shape[1:], ratio))
    pre = np.stack([ndi.affine_transform(c, np.diag(ratio), output_shape=shape, order=1, mode="nearest")
                    for c in crop])
    pre = NormalizeIntensity(nonzero=True, channel_wise=True)(torch.from_numpy(pre))
    bf16 = precision == "bf16"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        probs = sliding_window_inference(pre[None].float(), tuple(card["patch"]), 2,
                                         lambda x: torch.softmax(net(x).float(), 1), overlap=0.5,
                                         mode="gaussian")
    # each class's probability back to the crop (trilinear, the same grid), then the argmax
    back = np.stack([ndi.affine_transform(c, np.diag(1.0 / ratio), output_shape=crop.shape[1:],
                                          order=1, mode="nearest")
                     for c in probs[0].numpy()]).argmax(0).astype(np.uint8)
    full = np.zeros(data.shape[1:], np.uint8)
    full[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = back
    return np.asarray(card["label_values"], np.uint8)[full]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare")
    p.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.output, exist_ok=True)
    start = time.perf_counter()
    card, net = load_network(a.model)
    for folder in sorted(os.listdir(a.input)):
        t = time.perf_counter()
        name, data, first = read_case(os.path.join(a.input, folder), card["modalities"])
        spacing = np.asarray(first.header.get_zooms()[:3])[::-1]
        labels = predict(card, net, data, spacing, a.precision)
        out = nib.Nifti1Image(labels.transpose(2, 1, 0), first.affine)
        out.set_data_dtype(np.uint8)
        nib.save(out, os.path.join(a.output, f"{name}.nii.gz"))
        print(f"{name}: {time.perf_counter() - t:.2f} s")
    print(f"total: {time.perf_counter() - start:.2f} s ({a.threads} threads, {a.precision})")
    if a.compare:
        for f in sorted(os.listdir(a.output)):
            ours = np.asarray(nib.load(os.path.join(a.output, f)).dataobj)
            theirs = np.asarray(nib.load(os.path.join(a.compare, f)).dataobj)
            print(f"{f}: {(ours != theirs).sum()} of {ours.size} voxels labelled differently")


if __name__ == "__main__":
    main()
