#!/usr/bin/env python3
"""Reference fixtures for cwseg-models' networks: a PyTorch transcription of the paper's U-Net
(SPEC §6) with cwseg's parameter names, its weights as safetensors, and its outputs.

    python scripts/networks_fixtures.py        # numpy, torch, safetensors
Writes crates/models/tests/fixtures/{unet_<case>.safetensors, networks.npz, networks.json}.
For each case: the input, the output in eval mode, the output in train mode (batch
statistics) and the running statistics after that one training forward, in float32; and the
parameter count of the paper configuration.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

OUT = os.path.join("crates", "models", "tests", "fixtures")
torch.manual_seed(5)


def norm(kind, c):
    if kind == "batch":
        return nn.BatchNorm3d(c)
    if kind == "instance":
        return nn.GroupNorm(c, c)  # instance norm with affine parameters
    return nn.GroupNorm(kind, c)


class Block(nn.Module):
    def __init__(self, cin, cout, kind, residual):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm1 = norm(kind, cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1)
        self.norm2 = norm(kind, cout)
        self.residual = residual
        if residual and cin != cout:
            self.skip = nn.Conv3d(cin, cout, 1)

    def forward(self, x):
        h = torch.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        if self.residual:
            h = h + (self.skip(x) if hasattr(self, "skip") else x)
        return torch.relu(h)


class UNet(nn.Module):
    def __init__(self, cin, classes, filters=16, depth=4, kind="batch", residual=False):
        super().__init__()
        w = [filters << l for l in range(depth + 1)]
        self.encoders = nn.ModuleList([Block(cin if l == 0 else w[l - 1], w[l], kind, residual) for l in range(depth)])
        self.bottleneck = Block(w[depth - 1], w[depth], kind, residual)
        self.ups = nn.ModuleList([nn.ConvTranspose3d(w[l + 1], w[l], 2, stride=2) for l in range(depth)])
        self.decoders = nn.ModuleList([Block(2 * w[l], w[l], kind, residual) for l in range(depth)])
        self.head = nn.Conv3d(w[0], classes, 1)
        self.depth = depth

    def forward(self, x):
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = torch.max_pool3d(x, 2, 2)
        x = self.bottleneck(x)
        for l in reversed(range(self.depth)):
            x = self.decoders[l](torch.cat([skips[l], self.ups[l](x)], 1))
        return self.head(x)


class Basic(nn.Module):
    def __init__(self, cin, cout, stride, dilation):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (self.downsample(x) if hasattr(self, "downsample") else x))


class DeepLabV3(nn.Module):
    """torchvision's DeepLabV3 layout in 3D with basic blocks, output stride 8 (cwseg's)."""

    def __init__(self, cin, classes, widths=(32, 64, 128, 256), blocks=(2, 2, 2, 2), aspp=128, rates=(6, 12, 18)):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.conv1 = nn.Conv3d(cin, widths[0], 3, 2, padding=1, bias=False)
        self.backbone.bn1 = nn.BatchNorm3d(widths[0])
        c = widths[0]
        for s, (stride, dilation) in enumerate(((1, 1), (2, 1), (2, 1), (1, 2))):
            layers = []
            for i in range(blocks[s]):
                layers.append(Basic(c, widths[s], stride if i == 0 else 1, dilation))
                c = widths[s]
            setattr(self.backbone, f"layer{s + 1}", nn.Sequential(*layers))
        convs = [nn.Sequential(nn.Conv3d(c, aspp, 1, bias=False), nn.BatchNorm3d(aspp), nn.ReLU())]
        for r in rates:
            convs.append(nn.Sequential(nn.Conv3d(c, aspp, 3, padding=r, dilation=r, bias=False), nn.BatchNorm3d(aspp), nn.ReLU()))
        convs.append(nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Conv3d(c, aspp, 1, bias=False), nn.BatchNorm3d(aspp), nn.ReLU()))
        head0 = nn.Module()
        head0.convs = nn.ModuleList(convs)
        head0.project = nn.Sequential(nn.Conv3d(5 * aspp, aspp, 1, bias=False), nn.BatchNorm3d(aspp), nn.ReLU(), nn.Dropout(0.5))
        self.classifier = nn.Sequential(head0, nn.Conv3d(aspp, aspp, 3, padding=1, bias=False), nn.BatchNorm3d(aspp), nn.ReLU(),
                                        nn.Conv3d(aspp, classes, 1))

    def forward(self, x):
        size = x.shape[2:]
        b = self.backbone
        f = torch.relu(b.bn1(b.conv1(x)))
        f = b.layer4(b.layer3(b.layer2(b.layer1(f))))
        head0 = self.classifier[0]
        outs = [m(f) for m in head0.convs[:4]]
        pooled = head0.convs[4](f)
        outs.append(F.interpolate(pooled, size=f.shape[2:], mode="trilinear", align_corners=False))
        y = head0.project(torch.cat(outs, 1))
        for m in list(self.classifier)[1:]:
            y = m(y)
        return F.interpolate(y, size=size, mode="trilinear", align_corners=False)


def formula_weights(names, shapes):
    """Deterministic weights both sides compute: tensor k (in sorted name order), element i:
    s = sin(0.37 i + 1.3 k); 1-D `weight` → 1 + 0.2 s, 1-D `bias` → 0.1 s, `running_mean` →
    0.1 s, `running_var` → 1.25 + 0.25 s, `position_embeddings` → 0.02 s, others → s/√fan_in
    with fan_in the product of all axes but the first (in float64, then float32)."""
    out = {}
    for k, n in enumerate(names):
        shape = shapes[n]
        i = np.arange(int(np.prod(shape)), dtype=np.float64)
        s = np.sin(0.37 * i + 1.3 * k)
        if n.endswith("running_mean"):
            v = 0.1 * s
        elif n.endswith("running_var"):
            v = 1.25 + 0.25 * s
        elif n.endswith("position_embeddings"):
            v = 0.02 * s
        elif len(shape) == 1 and n.endswith("weight"):
            v = 1.0 + 0.2 * s
        elif len(shape) == 1:
            v = 0.1 * s
        else:
            v = s / np.sqrt(np.prod(shape[1:]))
        out[n] = torch.from_numpy(v.astype(np.float32).reshape(shape))
    return out


def main():
    # only the fixture writer needs safetensors (scripts/bench_models_reference.py imports the
    # networks on machines without it)
    import safetensors
    from safetensors.torch import save_file

    os.makedirs(OUT, exist_ok=True)
    arrays, meta = {}, {"versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                                     "numpy": np.__version__, "safetensors": safetensors.__version__}, "cases": {}}
    cases = {
        # name: (cin, classes, filters, depth, norm, residual, input shape)
        "batch_d2": (2, 3, 4, 2, "batch", False, (2, 2, 8, 12, 16)),
        "instance_residual_d1": (1, 4, 3, 1, "instance", True, (1, 1, 6, 4, 8)),
        "group_d3": (3, 2, 4, 3, 2, False, (2, 3, 8, 8, 16)),
    }
    for name, (cin, k, f, d, kind, res, shape) in cases.items():
        net = UNet(cin, k, f, d, kind, res)
        # non-trivial batch-norm statistics and affine parameters
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm3d, nn.GroupNorm)):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        state = {k2: v.detach().clone().contiguous() for k2, v in net.state_dict().items() if "num_batches_tracked" not in k2}
        save_file(state, os.path.join(OUT, f"unet_{name}.safetensors"))
        x = torch.randn(shape)
        net.eval()
        with torch.no_grad():
            arrays[f"{name}__eval"] = net(x).numpy()
        net.train()
        with torch.no_grad():
            arrays[f"{name}__train"] = net(x).numpy()
        arrays[f"{name}__x"] = x.numpy()
        for k2, v in net.state_dict().items():
            if "running" in k2:
                arrays[f"{name}__after__{k2}"] = v.numpy()
        meta["cases"][name] = {"in_channels": cin, "classes": k, "filters": f, "depth": d,
                               "norm": kind if isinstance(kind, str) else {"groups": kind}, "residual": res,
                               "parameters": sum(p.numel() for p in net.parameters())}
    # MONAI's VNet and UNETR with their own parameter names. Their weights (180 MB for V-Net)
    # are not committed: both sides fill every tensor with the same formula (formula_weights),
    # the Rust test writes them to a safetensors file under MONAI's names and loads it.
    from monai.networks.nets import UNETR, VNet
    import monai
    meta["versions"]["monai"] = monai.__version__
    cases = {
        "vnet_elu": (lambda: VNet(spatial_dims=3, in_channels=1, out_channels=3, act="elu"), (2, 1, 16, 16, 32)),
        "vnet_prelu_2ch": (lambda: VNet(spatial_dims=3, in_channels=2, out_channels=2, act="prelu"), (1, 2, 32, 16, 16)),
        "unetr_small": (lambda: UNETR(in_channels=1, out_channels=3, img_size=(32, 32, 32), feature_size=8,
                                      hidden_size=96, mlp_dim=192, num_heads=4), (2, 1, 32, 32, 32)),
    }
    meta["formula_cases"] = {}
    for name, (make, shape) in cases.items():
        net = make()
        state = {k2: v for k2, v in net.state_dict().items() if not k2.endswith("num_batches_tracked")}
        names = sorted(state)
        net.load_state_dict({**net.state_dict(), **formula_weights(names, {k2: tuple(v.shape) for k2, v in state.items()})})
        x = torch.randn(shape)
        net.eval()
        with torch.no_grad():
            arrays[f"{name}__eval"] = net(x).numpy()
        arrays[f"{name}__x"] = x.numpy()
        meta["formula_cases"][name] = {"tensors": [[n, list(state[n].shape)] for n in names],
                               "parameters": sum(p.numel() for p in net.parameters())}
    # DeepLabV3-3D: a PyTorch transcription (no MONAI equivalent), small widths
    net = DeepLabV3(2, 3, widths=(8, 12, 16, 16), blocks=(1, 2, 1, 1), aspp=8)
    state = {k2: v for k2, v in net.state_dict().items() if not k2.endswith("num_batches_tracked")}
    names = sorted(state)
    net.load_state_dict({**net.state_dict(), **formula_weights(names, {k2: tuple(v.shape) for k2, v in state.items()})})
    x = torch.randn(2, 2, 16, 24, 32)
    net.eval()
    with torch.no_grad():
        arrays["deeplab_small__eval"] = net(x).numpy()
    arrays["deeplab_small__x"] = x.numpy()
    meta["formula_cases"]["deeplab_small"] = {"tensors": [[n, list(state[n].shape)] for n in names],
                                      "parameters": sum(p.numel() for p in net.parameters()),
                                      "in_channels": 2, "classes": 3, "widths": [8, 12, 16, 16], "blocks": [1, 2, 1, 1],
                                      "aspp_channels": 8}
    meta["deeplab_1_16_parameters"] = sum(p.numel() for p in DeepLabV3(1, 16).parameters())
    meta["formula_cases"]["vnet_elu"].update({"in_channels": 1, "classes": 3, "activation": "elu"})
    meta["formula_cases"]["vnet_prelu_2ch"].update({"in_channels": 2, "classes": 2, "activation": "prelu"})
    meta["formula_cases"]["unetr_small"].update({"in_channels": 1, "classes": 3, "img_size": [32, 32, 32], "feature_size": 8,
                                         "hidden_size": 96, "mlp_dim": 192, "num_heads": 4})
    meta["monai_vnet_1_16_parameters"] = sum(p.numel() for p in VNet(spatial_dims=3, in_channels=1, out_channels=16).parameters())
    meta["monai_unetr_1_14_96_parameters"] = sum(p.numel() for p in UNETR(in_channels=1, out_channels=14, img_size=(96, 96, 96)).parameters())
    paper = UNet(1, 16)
    meta["paper_unet_parameters"] = sum(p.numel() for p in paper.parameters())
    np.savez_compressed(os.path.join(OUT, "networks.npz"), **arrays)
    with open(os.path.join(OUT, "networks.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    print("wrote", OUT, meta["paper_unet_parameters"])


if __name__ == "__main__":
    main()
