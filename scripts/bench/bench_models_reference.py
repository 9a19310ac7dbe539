#!/usr/bin/env python3
"""PyTorch reference for `cargo run --release -p cwseg-models --example bench_models`: conv3d
forward and forward+backward on 2x32x64^3 (32 -> 32, k 3, pad 1) and on the paper U-Net's level
shapes, and one training step of the same U-Net (scripts/fixtures/networks_fixtures.py's transcription;
batch 2, 1x64^3, 16 classes, cross-entropy, Adam) with the peak resident memory.

    python scripts/bench/bench_models_reference.py --threads 2
"""
import argparse
import contextlib
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from networks_fixtures import UNet  # noqa: E402


def best(f, repeat=3):
    f()
    t_best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        t_best = min(t_best, time.perf_counter() - t)
    return t_best


def median(f, repeat=3):
    """Median time of `repeat` calls after one warm-up call."""
    f()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (network steps only)")
    ap.add_argument("--size", type=int, default=64, help="side of the network step's input")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16", "f16"],
                    help="bf16: torch.autocast(device, dtype=torch.bfloat16) around forward and loss; "
                         "f16: autocast with torch.float16 and a GradScaler (CUDA)")
    ap.add_argument("what", nargs="?", default="conv", help="conv, unet, vnet, deeplabv3, unetr, segresnet, dynunet or swinunetr (one network per process; on CUDA a comma-separated list), "
                    "layers-deeplabv3 or layers-vnet (each distinct convolution)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(args.precision)
    cast = (lambda: torch.autocast(args.device.split(":")[0], dtype=dtype)) if dtype is not None \
        else contextlib.nullcontext
    if args.what.startswith("layers-"):
        return layers(args.what[len("layers-"):], cast)
    if args.what != "conv":
        if args.device.startswith("cuda"):
            # cuDNN's autotuner, as users run it; true f32 (PyTorch's default lets cuDNN's
            # f32 convolutions run in TF32, cwseg's f32 does not)
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        for name in args.what.split(","):  # on CUDA several networks per process
            network_step(name, args.device, args.size, cast, args.precision)
        return
    print(f"precision {args.precision}")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    shapes = [(32, 64, "2x32x64^3 32->32"), (16, 64, "level 0: 2x16x64^3 16->16"), (32, 32, "level 1: 2x32x32^3 32->32"),
              (64, 16, "level 2: 2x64x16^3 64->64"), (128, 8, "level 3: 2x128x8^3 128->128"), (256, 4, "level 4: 2x256x4^3 256->256")]
    for c, n, name in shapes:
        fwd, both = time_conv((2, c, n, n, n), (c, c, 3, 3, 3), dict(padding=1), cast)
        flops = 2 * 2 * c * c * 27 * n ** 3
        print(f"conv3d {name}: forward {fwd * 1e3:.1f} ms ({flops / fwd / 1e9:.1f} GFLOP/s), forward+backward {both * 1e3:.1f} ms")

def time_conv(x_shape, w_shape, conv_args, cast):
    """Seconds of F.conv3d on random x and w (both requiring grad): forward alone and forward +
    backward, best of 3 each."""
    x = torch.randn(*x_shape, requires_grad=True)
    w = (0.1 * torch.randn(*w_shape)).requires_grad_(True)
    def forward():
        with cast():
            return F.conv3d(x, w, **conv_args)
    with torch.no_grad():
        fwd = best(forward)
    both = best(lambda: forward().float().sum().backward())
    return fwd, both

# (name, in, out, side, kernel, stride, dilation), batch 2, padding dilation*(kernel-1)/2:
# the same table as bench_models.rs.
LAYERS = {
    "deeplabv3": [("stem 1→32 s2", 1, 32, 64, 3, 2, 1), ("layer1 32→32", 32, 32, 32, 3, 1, 1),
                  ("layer2.0 32→64 s2", 32, 64, 32, 3, 2, 1), ("layer2 64→64", 64, 64, 16, 3, 1, 1),
                  ("layer3.0 64→128 s2", 64, 128, 16, 3, 2, 1), ("layer3 128→128", 128, 128, 8, 3, 1, 1),
                  ("layer4.0 128→256 d2", 128, 256, 8, 3, 1, 2), ("layer4 256→256 d2", 256, 256, 8, 3, 1, 2),
                  ("aspp 256→128 d6", 256, 128, 8, 3, 1, 6), ("head 128→128", 128, 128, 8, 3, 1, 1)],
    "vnet": [("in 1→16 k5", 1, 16, 64, 5, 1, 1), ("down 16→32 k2 s2", 16, 32, 64, 2, 2, 1),
             ("32→32 k5", 32, 32, 32, 5, 1, 1), ("down 32→64 k2 s2", 32, 64, 32, 2, 2, 1),
             ("64→64 k5", 64, 64, 16, 5, 1, 1), ("down 64→128 k2 s2", 64, 128, 16, 2, 2, 1),
             ("128→128 k5", 128, 128, 8, 5, 1, 1), ("256→256 k5", 256, 256, 4, 5, 1, 1),
             ("up 256→256 k5", 256, 256, 8, 5, 1, 1), ("up 128→128 k5", 128, 128, 16, 5, 1, 1),
             ("up 64→64 k5", 64, 64, 32, 5, 1, 1), ("up 32→32 k5", 32, 32, 64, 5, 1, 1),
             ("out 32→16 k5", 32, 16, 64, 5, 1, 1)],
}

def layers(network, cast):
    print(f"threads {torch.get_num_threads()}")
    for name, cin, cout, n, k, s, d in LAYERS[network]:
        fwd, both = time_conv((2, cin, n, n, n), (cout, cin, k, k, k),
                              dict(stride=s, padding=d * (k - 1) // 2, dilation=d), cast)
        print(f"{network} {name} on {n}³: forward {fwd * 1e3:.2f} ms, forward+backward {both * 1e3:.2f} ms")

# cwseg's default DynUNet (`DynUNetConfig::default()`): 5 levels, 3³ kernels, 4 down-sampling
# steps, MONAI's default widths (32, 64, 128, 256, 320)
DYNUNET_DEFAULT = dict(kernel_size=[3] * 5, strides=[1] + [2] * 4, upsample_kernel_size=[2] * 4)


def network_step(name, device="cpu", n=64, cast=contextlib.nullcontext, precision="f32"):
    from networks_fixtures import DeepLabV3

    def monai(cls, **kw):  # MONAI only for the networks that need it
        import monai.networks.nets as nets
        return getattr(nets, cls)(**kw)
    net = {"unet": lambda: UNet(1, 16), "vnet": lambda: monai("VNet", spatial_dims=3, in_channels=1, out_channels=16),
           "deeplabv3": lambda: DeepLabV3(1, 16),
           "unetr": lambda: monai("UNETR", in_channels=1, out_channels=16, img_size=(n, n, n)),
           # the zoo's networks at MONAI's defaults (cwseg's defaults are the same)
           "segresnet": lambda: monai("SegResNet", spatial_dims=3, in_channels=1, out_channels=16),
           "dynunet": lambda: monai("DynUNet", spatial_dims=3, in_channels=1, out_channels=16,
                                    **DYNUNET_DEFAULT),
           "swinunetr": lambda: monai("SwinUNETR", in_channels=1, out_channels=16)}[name]()
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    x = torch.randn(2, 1, n, n, n, device=device)
    y = (torch.arange(2 * n ** 3, device=device) % 16).reshape(2, n, n, n)

    # f16: dynamic loss scaling, as cwseg's trainer does it
    scaler = torch.amp.GradScaler(device.split(":")[0]) if precision == "f16" else None

    def step():
        opt.zero_grad()
        with cast():
            loss = F.cross_entropy(net(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        t = median(step, repeat=5)  # the warm-up call: cuDNN autotuning and the caching allocator
        peak = torch.cuda.max_memory_allocated() / 2**20
        precision = {"bf16": "bf16 autocast", "f16": "f16 autocast + GradScaler"}.get(precision, "f32 (no TF32)")
        print(f"{name} training step on {torch.cuda.get_device_name()}, batch 2, 1x{n}^3, 16 classes, {precision}: "
              f"{t * 1e3:.1f} ms (median of 5), peak GPU memory {peak:.0f} MiB, torch {torch.__version__}")
        return
    t = median(step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{name} training step, batch 2, 1x{n}^3, 16 classes: {t:.2f} s (median of 3), peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
