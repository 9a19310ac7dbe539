#!/usr/bin/env python3
"""Reference fixtures for cwseg-models' 3D operations, computed with PyTorch (float64).

    python scripts/models_fixtures.py        # numpy, torch
Writes crates/models/tests/fixtures/ops3d.npz: per case the inputs, the output, and the
gradients of sum(output * g) for a random g, w.r.t. every input; layers.npz likewise; and
conv_bf16.npz, the bf16 convolution (`bf16_fixtures`).
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

OUT = os.path.join("crates", "models", "tests", "fixtures")
torch.manual_seed(3)
torch.set_default_dtype(torch.float64)


def record(arrays, name, inputs, f, params):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = f(**leaves)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    for k, v in leaves.items():
        arrays[f"{name}__{k}"] = v.detach().numpy()
        arrays[f"{name}__grad_{k}"] = v.grad.numpy()
    arrays[f"{name}__out"] = y.detach().numpy()
    arrays[f"{name}__upstream"] = g.numpy()
    arrays[f"{name}__params"] = np.array(params, dtype=np.int64)


def layers_fixtures():
    """Normalisations and activations: outputs, gradients, running statistics."""
    a = {}
    shape = (3, 4, 3, 4, 5)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    for training in (True, False):
        name = f"batch_norm_{'train' if training else 'eval'}"
        r_mean, r_var = rm.clone(), rv.clone()
        record(a, name, {"x": torch.randn(shape), "w": torch.randn(4), "b": torch.randn(4)},
               lambda x, w, b: F.batch_norm(x, r_mean, r_var, w, b, training=training, momentum=0.1, eps=1e-5),
               [int(training)])
        a[f"{name}__running_mean_in"], a[f"{name}__running_var_in"] = rm.numpy(), rv.numpy()
        a[f"{name}__running_mean_out"], a[f"{name}__running_var_out"] = r_mean.numpy(), r_var.numpy()
    record(a, "instance_norm", {"x": torch.randn(shape), "w": torch.randn(4), "b": torch.randn(4)},
           lambda x, w, b: F.instance_norm(x, weight=w, bias=b, eps=1e-5), [])
    record(a, "group_norm", {"x": torch.randn(shape), "w": torch.randn(4), "b": torch.randn(4)},
           lambda x, w, b: F.group_norm(x, 2, w, b, eps=1e-5), [2])
    record(a, "layer_norm", {"x": torch.randn(2, 7, 12), "w": torch.randn(12), "b": torch.randn(12)},
           lambda x, w, b: F.layer_norm(x, (12,), w, b, eps=1e-5), [])
    record(a, "softmax", {"x": 3 * torch.randn(2, 5, 9)}, lambda x: F.softmax(x, -1), [])
    record(a, "leaky_relu", {"x": torch.randn(shape)}, lambda x: F.leaky_relu(x, 0.01), [])
    record(a, "prelu", {"x": torch.randn(shape), "w": torch.rand(4)}, lambda x, w: F.prelu(x, w), [])
    record(a, "elu", {"x": torch.randn(shape)}, lambda x: F.elu(x, 1.0), [])
    np.savez_compressed(os.path.join(OUT, "layers.npz"), **a)


def bf16_fixtures():
    """conv3d in bf16 precision, as PyTorch's CPU autocast computes it: the stored input,
    weight and upstream gradient are float32 values, the reference rounds them to bf16 and
    sums the products in (here) float64, so that an f32 convolution of the stored values
    misses it by ~1e-3 and a bf16 one matches it to f32 rounding. Shapes that take cwseg's
    direct path (planes of >= 64 voxels, padded volume within twice the output): 18 input
    channels (a partial tile of channel pairs) and 40 (two tiles, the second mostly zeros)."""
    gen = torch.Generator().manual_seed(11)
    bf16 = lambda t: t.to(torch.bfloat16).to(torch.float64)
    f32 = lambda t: t.to(torch.float32).to(torch.float64)
    a = {}
    cases = {"c18": ((1, 18, 6, 10, 12), 20), "c40": ((1, 40, 5, 10, 12), 17)}
    for name, (xs, o) in cases.items():
        x = f32(torch.randn(xs, generator=gen))
        w = f32(0.2 * torch.randn((o, xs[1], 3, 3, 3), generator=gen))
        xr, wr = bf16(x).requires_grad_(True), bf16(w).requires_grad_(True)
        y = F.conv3d(xr, wr, padding=1)
        g = f32(torch.randn(y.shape, generator=gen))
        (y * bf16(g)).sum().backward()
        a[f"{name}__x"], a[f"{name}__w"] = x.numpy(), w.numpy()
        a[f"{name}__grad_x"], a[f"{name}__grad_w"] = xr.grad.numpy(), wr.grad.numpy()
        a[f"{name}__out"] = y.detach().numpy()
        a[f"{name}__upstream"] = g.numpy()
        a[f"{name}__params"] = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1], dtype=np.int64)
    np.savez_compressed(os.path.join(OUT, "conv_bf16.npz"), **a)


def main():
    os.makedirs(OUT, exist_ok=True)
    a = {}
    convs = {
        # name: (x shape, w shape, stride, padding, dilation, bias)
        "k3_pad1_b2_c1": ((2, 1, 7, 9, 8), (3, 1, 3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), True),
        "k3_stride2_pad1": ((1, 4, 9, 8, 7), (5, 4, 3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), True),
        "k5_pad2_vnet": ((2, 3, 11, 10, 9), (2, 3, 5, 5, 5), (1, 1, 1), (2, 2, 2), (1, 1, 1), True),
        "k3_dilation2": ((1, 3, 9, 9, 9), (4, 3, 3, 3, 3), (1, 1, 1), (2, 2, 2), (2, 2, 2), False),
        "k133_anisotropic": ((2, 2, 5, 9, 11), (3, 2, 1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 1, 1), True),
        "mixed_strides": ((1, 2, 8, 9, 10), (2, 2, 2, 3, 2), (2, 1, 2), (1, 0, 1), (1, 1, 1), True),
        "k2_stride2_down": ((2, 8, 8, 8, 8), (16, 8, 2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), False),
        "k1_many_channels": ((1, 16, 5, 6, 7), (32, 16, 1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1), True),
        # taps that read only padding (cut by cwseg): depth's outer taps, none in height or width
        "dilation_past_map": ((1, 3, 4, 5, 6), (2, 3, 3, 3, 3), (1, 1, 1), (5, 2, 2), (5, 2, 2), True),
        # every outer tap reads padding only, with stride 2 (as an ASPP rate past the map)
        "dilation_stride2_centre": ((1, 2, 5, 5, 5), (3, 2, 3, 3, 3), (2, 2, 2), (6, 6, 6), (6, 6, 6), False),
    }
    for name, (xs, ws, s, p, d, bias) in convs.items():
        inputs = {"x": torch.randn(xs), "w": torch.randn(ws)}
        if bias:
            inputs["b"] = torch.randn(ws[0])
        record(a, "conv__" + name, inputs,
               lambda x, w, b=None: F.conv3d(x, w, b, stride=s, padding=p, dilation=d), list(s) + list(p) + list(d))
    transposed = {
        # name: (x shape, w shape (C_in, C_out, k...), stride, padding, output_padding, dilation, bias)
        "k2_stride2_unet_up": ((2, 8, 4, 5, 3), (8, 4, 2, 2, 2), (2, 2, 2), (0, 0, 0), (0, 0, 0), (1, 1, 1), True),
        "k3_stride2_pad1_outpad1": ((1, 3, 4, 3, 5), (3, 2, 3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), (1, 1, 1), True),
        "k3_stride1_pad1": ((2, 2, 5, 6, 4), (2, 3, 3, 3, 3), (1, 1, 1), (1, 1, 1), (0, 0, 0), (1, 1, 1), False),
        "anisotropic_122": ((1, 4, 3, 4, 4), (4, 2, 1, 2, 2), (1, 2, 2), (0, 0, 0), (0, 0, 0), (1, 1, 1), True),
    }
    for name, (xs, ws, s, p, op, d, bias) in transposed.items():
        inputs = {"x": torch.randn(xs), "w": torch.randn(ws)}
        if bias:
            inputs["b"] = torch.randn(ws[1])
        record(a, "convt__" + name, inputs,
               lambda x, w, b=None: F.conv_transpose3d(x, w, b, stride=s, padding=p, output_padding=op, dilation=d),
               list(s) + list(p) + list(op) + list(d))
    pools = {
        "max_k2_s2": ("max", (2, 3, 8, 9, 10), 2, 2, 0),
        "max_k3_s2_p1": ("max", (1, 2, 9, 8, 7), 3, 2, 1),
        "avg_k3_s1_p1": ("avg", (2, 2, 6, 7, 5), 3, 1, 1),
        "avg_k2_s2": ("avg", (1, 4, 8, 8, 8), 2, 2, 0),
    }
    for name, (kind, xs, k, s, p) in pools.items():
        f = F.max_pool3d if kind == "max" else F.avg_pool3d
        record(a, "pool__" + name, {"x": torch.randn(xs)}, lambda x: f(x, k, s, p), [k, s, p])
    ups = {
        "nearest_x2": ((2, 3, 4, 5, 6), (8, 10, 12), "nearest", None),
        "nearest_odd": ((1, 2, 3, 4, 5), (7, 9, 11), "nearest", None),
        "trilinear_x2": ((2, 2, 4, 5, 3), (8, 10, 6), "trilinear", False),
        "trilinear_align": ((1, 3, 3, 4, 5), (5, 7, 6), "trilinear", True),
    }
    for name, (xs, size, mode, align) in ups.items():
        kwargs = {} if mode == "nearest" else {"align_corners": align}
        record(a, "up__" + name, {"x": torch.randn(xs)},
               lambda x: F.interpolate(x, size=size, mode=mode, **kwargs), list(size) + [int(bool(align))])
    np.savez_compressed(os.path.join(OUT, "ops3d.npz"), **a)
    layers_fixtures()
    bf16_fixtures()
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump({"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__}, f, indent=1)
    print("fixtures written to", OUT)


if __name__ == "__main__":
    main()
