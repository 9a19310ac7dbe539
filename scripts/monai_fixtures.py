#!/usr/bin/env python3
"""MONAI fixtures for `cwseg import monai` / `cwseg export --format monai` (issue: MONAI in both
directions). Orientation-sensitive content on non-cubic volumes: rods along x are class 1,
rods along z class 2 (MONAI's (x, y, z) = nibabel's array order).

    python scripts/monai_fixtures.py                 # torch, monai, nibabel, safetensors
    python scripts/monai_fixtures.py --only unetr_batch   # one fixture folder, the rest kept
    python scripts/monai_fixtures.py --check-export DIR --network unetr|vnet --image IMG \
        --cwseg-probabilities PROBS_DIR               # the reverse direction, by hand

Writes crates/cli/tests/fixtures/monai/:
- image.nii.gz (32 × 48 × 16, x, y, z; identity affine), image_large.nii.gz (64 × 48 × 32),
  truth.nii.gz (the rods' labels of image.nii.gz);
- unetr/: args.json, state.safetensors (a small UNETR trained on the rods in MONAI),
  probabilities.npy (softmax of `sliding_window_inference` on image.nii.gz, (K, x, y, z)
  float32), probabilities_large.npy (on image_large.nii.gz, roi 32 × 48 × 16, overlap 0.25,
  mode "gaussian"; probabilities_large_constant.npy with MONAI's default mode "constant"),
  report.json (Dice per class in MONAI, smallest top-2 margin);
- unetr_batch/: args.json, state.safetensors, probabilities.npy: a smaller UNETR with
  `norm_name="batch"`, seeded initial weights, batch-norm statistics from the image;
- vnet_relu/, vnet_prelu/: args.json, small.safetensors (every tensor of rank ≤ 1, batch-norm
  statistics from the image), probabilities.npy. MONAI's VNet has 45 M parameters (180 MB):
  its kernels are not stored but made by the formula `formula_weights` below, which the Rust
  test repeats bit for bit (splitmix64 of the tensor name's FNV-1a hash plus the index).
"""
import argparse
import json
import os

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNETR, VNet
from safetensors.torch import load_file, save_file

OUT = os.path.join("crates", "cli", "tests", "fixtures", "monai")
SIZE = (32, 48, 16)  # x, y, z
LARGE = (64, 48, 32)
torch.manual_seed(7)
np.random.seed(7)
MASK = (1 << 64) - 1


def rods(size, rng):
    """An image and labels: rods along x (class 1) and along z (class 2), noise."""
    image = rng.normal(0.0, 0.3, size).astype(np.float32)
    label = np.zeros(size, np.uint8)
    x, y, z = size
    for _ in range(3):
        yy, zz = rng.integers(2, y - 2), rng.integers(2, z - 2)
        label[:, yy - 1 : yy + 2, zz - 1 : zz + 2] = 1
        xx, yy = rng.integers(2, x - 2), rng.integers(2, y - 2)
        label[xx - 1 : xx + 2, yy - 1 : yy + 2, :] = 2
    image += (label > 0) * 1.5
    return image, label


def save_nifti(array, path):
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def fnv1a(name):
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def formula_weights(name, shape):
    """He-uniform kernel values from splitmix64(fnv1a(name) + i): bound sqrt(6 / fan_in),
    fan_in = shape[1] · prod(shape[2:]). Computed in float64, rounded to float32."""
    n = int(np.prod(shape))
    with np.errstate(over="ignore"):
        z = np.uint64(fnv1a(name)) + np.arange(n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 * 2.0 - 1.0
    fan_in = shape[1] * int(np.prod(shape[2:]))
    return (u * np.sqrt(6.0 / fan_in)).astype(np.float32).reshape(shape)


def probabilities(net, image, roi, mode="constant"):
    with torch.no_grad():
        x = torch.from_numpy(image)[None, None]
        logits = sliding_window_inference(x, roi, 1, net, overlap=0.25, mode=mode)
        return torch.softmax(logits, 1)[0].numpy().astype(np.float32)


def margin(p):
    top = np.sort(p, axis=0)
    return float((top[-1] - top[-2]).min())


def dice(pred, truth, k):
    a, b = pred == k, truth == k
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def unetr_fixture(image, truth, large):
    args = dict(in_channels=1, out_channels=3, img_size=list(SIZE), feature_size=8,
                hidden_size=48, mlp_dim=96, num_heads=4, qkv_bias=True)
    net = UNETR(**args)
    rng = np.random.default_rng(11)
    batches = [rods(SIZE, rng) for _ in range(8)]
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    net.train()
    for step in range(120):
        img, lab = batches[step % len(batches)]
        logits = net(torch.from_numpy(img)[None, None])
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(lab.astype(np.int64))[None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    out = save_network("unetr", args, net)
    p = probabilities(net, image, SIZE)
    np.save(os.path.join(out, "probabilities.npy"), p)
    pl = probabilities(net, large, SIZE, mode="gaussian")
    np.save(os.path.join(out, "probabilities_large.npy"), pl)
    np.save(os.path.join(out, "probabilities_large_constant.npy"), probabilities(net, large, SIZE))
    pred = p.argmax(0)
    report = {"dice_rods_along_x": dice(pred, truth, 1), "dice_rods_along_z": dice(pred, truth, 2),
              "min_top2_margin": margin(p), "min_top2_margin_large": margin(pl),
              "final_training_loss": float(loss)}
    json.dump(report, open(os.path.join(out, "report.json"), "w"), indent=1)
    print("unetr", report)


def save_network(name, args, net):
    """Writes OUT/name/args.json and the whole state dict as state.safetensors; the folder."""
    out = os.path.join(OUT, name)
    os.makedirs(out, exist_ok=True)
    json.dump(args, open(os.path.join(out, "args.json"), "w"), indent=1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              os.path.join(out, "state.safetensors"))
    return out


def batch_statistics_from(net, image):
    """Running statistics of every BatchNorm3d from one training-mode pass over `image`
    (cumulative average), dropout off for that pass; then evaluation mode."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.momentum = None
            m.reset_running_stats()
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout3d)):
            m.p = 0.0
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(image)[None, None])
    net.eval()


def unetr_batch_fixture(image):
    torch.manual_seed(7)
    args = dict(in_channels=1, out_channels=3, img_size=list(SIZE), feature_size=4,
                hidden_size=24, mlp_dim=48, num_heads=2, qkv_bias=True, norm_name="batch")
    net = UNETR(**args)
    batch_statistics_from(net, image)
    out = save_network("unetr_batch", args, net)
    p = probabilities(net, image, SIZE)
    np.save(os.path.join(out, "probabilities.npy"), p)
    print(f"unetr batch: min top-2 margin {margin(p):.2e}")


def vnet_fixture(act, image):
    args = dict(spatial_dims=3, in_channels=1, out_channels=3, act=act)
    net = VNet(**args)
    state = net.state_dict()
    for name, t in state.items():
        if t.dim() == 5:
            state[name] = torch.from_numpy(formula_weights(name, tuple(t.shape)))
    net.load_state_dict(state)
    batch_statistics_from(net, image)
    out = os.path.join(OUT, f"vnet_{act}")
    os.makedirs(out, exist_ok=True)
    json.dump(args, open(os.path.join(out, "args.json"), "w"), indent=1)
    small = {k: v.contiguous() for k, v in net.state_dict().items() if v.dim() <= 1}
    save_file(small, os.path.join(out, "small.safetensors"))
    p = probabilities(net, image, SIZE)
    np.save(os.path.join(out, "probabilities.npy"), p)
    print(f"vnet {act}: min top-2 margin {margin(p):.2e}")


def check_export(folder, network, image_path, probabilities_dir):
    """Loads `cwseg export --format monai` output in MONAI (strict) and compares its
    probabilities with cwseg's `predict --probabilities` on the same image."""
    args = json.load(open(os.path.join(folder, "args.json")))
    net = (UNETR if network == "unetr" else VNet)(**args)
    net.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=True)
    net.eval()
    image = nib.load(image_path).get_fdata(dtype=np.float32)
    roi = tuple(args["img_size"]) if network == "unetr" else image.shape
    p = probabilities(net, image, roi)
    cw = np.stack([nib.load(os.path.join(probabilities_dir, f)).get_fdata(dtype=np.float32)
                   for f in sorted(os.listdir(probabilities_dir))])
    print(json.dumps({"max_abs_probability_difference": float(np.abs(p - cw).max()),
                      "labels_equal": float((p.argmax(0) == cw.argmax(0)).mean())}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check-export")
    parser.add_argument("--network", default="unetr")
    parser.add_argument("--image")
    parser.add_argument("--cwseg-probabilities")
    parser.add_argument("--only", choices=["unetr_batch"])
    a = parser.parse_args()
    if a.check_export:
        check_export(a.check_export, a.network, a.image, a.cwseg_probabilities)
        return
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(3)
    image, truth = rods(SIZE, rng)
    large, _ = rods(LARGE, rng)
    save_nifti(image, os.path.join(OUT, "image.nii.gz"))
    save_nifti(truth, os.path.join(OUT, "truth.nii.gz"))
    if a.only == "unetr_batch":
        unetr_batch_fixture(image)
        return
    save_nifti(large, os.path.join(OUT, "image_large.nii.gz"))
    unetr_fixture(image, truth, large)
    unetr_batch_fixture(image)
    for act in ["relu", "prelu"]:
        vnet_fixture(act, image)
    versions = {"torch": torch.__version__, "monai": __import__("monai").__version__,
                "nibabel": nib.__version__, "numpy": np.__version__}
    json.dump(versions, open(os.path.join(OUT, "versions.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
