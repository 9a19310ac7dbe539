#!/usr/bin/env python3
"""cwseg's CUDA kernels run on the CPU against PyTorch: the layers' (crates/ops/src/cuda/
layers.cu) and the loss sums' (crates/ops/src/cuda/loss_sums.cu).

Where no GPU is lent, this checks the kernels' arithmetic and indexing: crates/cuda-emulate/
compiles layers.cu as host C++ with a small emulation of CUDA's threads, barriers, warp
shuffles and atomics (cuda_shim.h) and drives the kernels as crates/ops/src/cuda_layers.rs
does (harness/layers.cpp: the same launch shapes and sequence). Every layer with a kernel, in the
variants the networks use, in f32, bf16 and f16, is compared with PyTorch in f64 on the same
inputs: output, input gradient, parameter gradients and (norms) the batch statistics, within
1e-4 (f32) or 3e-2 (bf16, f16) of the largest reference value — the tolerances of
crates/models/tests/cuda.rs, which checks the same layers on a GPU. The loss sums (the seven
per-sample, per-class sums of crates/ops/src/loss_sums.rs and their gradient with respect to the
logits, harness/loss_sums.cpp with loss_sums_cuda.rs's launch shapes) are compared with the same sums
written out in PyTorch f64 and its autograd, within 1e-5 (f32 kernels) or 1e-9 (f64).

What it cannot check: the Rust side's launches (argument order, the `Rows` struct's layout:
checked by reading the PTX's parameter lists) and anything of the GPU itself (scheduling,
real atomics, the device's erf/exp). Needs g++ ≥ 12 (C++20, _Float16) and torch.

    python scripts/gpu/emulate_cuda_layers.py          # exit status 1 on any failure
"""
import ctypes
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
EMU = ROOT / "crates" / "cuda-emulate"
DTYPES = {"f32": (0, 1e-4), "bf16": (1, 3e-2), "f16": (2, 3e-2)}
KINDS = {"relu": 0, "leaky_relu": 1, "elu": 2, "gelu": 3}


def build(harness: str, *flags: str) -> ctypes.CDLL:
    out = pathlib.Path(tempfile.mkdtemp()) / "emu.so"
    subprocess.run(
        ["g++", "-std=c++20", "-O2", "-fPIC", "-shared", "-x", "c++", "-I", str(EMU / "include"),
         "-include", "cuda_shim.h", *flags, str(EMU / "harness" / harness), "-o", str(out),
         "-pthread"],
        check=True)
    return ctypes.CDLL(str(out))


def build_loss_sums() -> ctypes.CDLL:
    """loss_sums.cu with `extern __shared__ T name[];` rewritten for cuda_shim.h."""
    source = (ROOT / "crates/ops/src/cuda/loss_sums.cu").read_text()
    rewritten, count = re.subn(r"extern __shared__ (\w+) (\w+)\[\];",
                               r"\1* \2 = emu_dynamic_shared<\1>();", source)
    assert count == 1, "loss_sums.cu: expected one dynamic shared array"
    path = pathlib.Path(tempfile.mkdtemp()) / "loss_sums_emulated.cu"
    path.write_text(rewritten)
    return build("loss_sums.cpp", f'-DLOSS_SUMS_CU="{path}"')


def ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).numpy())


def empty(n) -> np.ndarray:
    return np.zeros(n, dtype=np.float32)


failures = []


def compare(name: str, dtype: str, got: np.ndarray, want: torch.Tensor):
    want = want.detach().double().numpy().ravel()
    got = got.astype(np.float64).ravel()
    scale = max(np.abs(want).max(), 1e-12)
    worst = np.abs(got - want).max() / scale
    tolerance = DTYPES[dtype][1]
    ok = worst <= tolerance and np.isfinite(got).all()
    print(f"{'ok  ' if ok else 'FAIL'} {dtype:4} {name:42} {worst:.2e}")
    if not ok:
        failures.append(f"{dtype} {name}")


def reference(fn, *inputs):
    """fn on f64 copies of the inputs; returns the output and a closure for gradients."""
    leaves = [t.double().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    return y, leaves


def check_activations(lib, dtype):
    x = torch.randn(2, 4, 9, 10, 11)
    g = torch.randn_like(x)
    n = x.numel()
    cases = {
        "relu": (0.0, F.relu),
        "leaky_relu": (0.01, lambda t: F.leaky_relu(t, 0.01)),
        "elu": (0.7, lambda t: F.elu(t, 0.7)),
        "gelu": (0.0, lambda t: F.gelu(t)),
    }
    for name, (p, fn) in cases.items():
        y, dx = empty(n), empty(n)
        lib.emu_activation(DTYPES[dtype][0], KINDS[name], ctypes.c_float(p), ptr(f32(x)),
                           ptr(f32(g)), ctypes.c_int64(n), ptr(y), ptr(dx))
        want, (xl,) = reference(fn, x)
        (want * g.double()).sum().backward()
        compare(f"{name} output", dtype, y, want)
        compare(f"{name} input gradient", dtype, dx, xl.grad)


def check_prelu(lib, dtype):
    for shape, slopes in [((2, 4, 990), 4), ((2, 4, 990), 1), ((8, 6), 6)]:
        x = torch.randn(shape)
        g = torch.randn_like(x)
        a = torch.rand(slopes) * 0.3 + 0.1
        n, (samples, channels) = x.numel(), shape[:2]
        spatial = n // (samples * channels)
        y, dx, da = empty(n), empty(n), empty(slopes)
        lib.emu_prelu(DTYPES[dtype][0], ptr(f32(x)), ptr(f32(a)), ptr(f32(g)),
                      ctypes.c_int64(samples), channels, ctypes.c_int64(spatial), slopes,
                      ptr(y), ptr(dx), ptr(da))
        want, (xl, al) = reference(F.prelu, x, a)
        (want * g.double()).sum().backward()
        label = f"prelu {tuple(shape)} {slopes} slope(s)"
        compare(f"{label} output", dtype, y, want)
        compare(f"{label} input gradient", dtype, dx, xl.grad)
        compare(f"{label} slope gradient", dtype, da, al.grad)


def norm_case(lib, dtype, label, x, grouping, relu, fn, stats_axes):
    """x (N, C, S); grouping (per_sample, per_stat) as cuda_layers.rs's Grouping."""
    samples, channels = x.shape[:2]
    spatial = x.numel() // (samples * channels)
    per_sample, per_stat = grouping
    stats = channels // per_stat if per_sample == 0 else samples * per_sample
    g = torch.randn_like(x)
    w = torch.rand(channels) + 0.5
    b = torch.rand(channels) - 0.5
    n = x.numel()
    y, dx, dw, db = empty(n), empty(n), empty(channels), empty(channels)
    mean, var = empty(stats), empty(stats)
    lib.emu_norm(DTYPES[dtype][0], ptr(f32(x)), ptr(f32(w)), ptr(f32(b)), ptr(f32(g)),
                 ctypes.c_int64(samples), channels, ctypes.c_int64(spatial), per_sample,
                 per_stat, int(relu), ctypes.c_float(1e-5), ptr(y), ptr(dx), ptr(dw), ptr(db),
                 ptr(mean), ptr(var))
    out, (xl, wl, bl) = reference(lambda x_, w_, b_: fn(x_, w_, b_), x, w, b)
    if relu:
        out = F.relu(out)
    (out * g.double()).sum().backward()
    compare(f"{label} output", dtype, y, out)
    compare(f"{label} input gradient", dtype, dx, xl.grad)
    compare(f"{label} weight gradient", dtype, dw, wl.grad)
    compare(f"{label} bias gradient", dtype, db, bl.grad)
    xs = stats_axes(x.double())
    compare(f"{label} mean", dtype, mean, xs.mean(-1))
    compare(f"{label} biased variance", dtype, var, xs.var(-1, unbiased=False))


def check_norms(lib, dtype):
    eps = 1e-5
    for spatial, relu in [(990, False), (990, True), (5000, False)]:
        x = torch.randn(2, 4, spatial) * 2 + 0.5
        norm_case(lib, dtype, f"batch_norm S={spatial}{' + relu' if relu else ''}", x, (0, 1),
                  relu, lambda x_, w, b: F.batch_norm(x_, None, None, w, b, True, 0.1, eps),
                  lambda t: t.transpose(0, 1).reshape(t.shape[1], -1))
    x = torch.randn(2, 4, 990) + 1.0
    norm_case(lib, dtype, "instance_norm", x, (4, 1), False,
              lambda x_, w, b: F.instance_norm(x_, weight=w, bias=b, eps=eps),
              lambda t: t.reshape(8, -1))
    for groups in (2, 1):
        norm_case(lib, dtype, f"group_norm {groups} group(s)", x, (groups, 4 // groups), False,
                  lambda x_, w, b, groups=groups: F.group_norm(x_, groups, w, b, eps),
                  lambda t, groups=groups: t.reshape(2 * groups, -1))
    for rows, features in [(30, 11), (20, 768)]:
        xl = torch.randn(rows, features, 1) * 3
        norm_case(lib, dtype, f"layer_norm ({rows}, {features})", xl, (1, features), False,
                  lambda x_, w, b, f=features: F.layer_norm(x_[..., 0], (f,), w, b, eps)[..., None],
                  lambda t: t.reshape(t.shape[0], -1))


def check_softmax(lib, dtype):
    for rows, length in [(40, 216), (33, 11), (5, 1000)]:
        x = torch.randn(rows, length) * 3
        g = torch.randn_like(x)
        y, dx = empty(x.numel()), empty(x.numel())
        lib.emu_softmax(DTYPES[dtype][0], ptr(f32(x)), ptr(f32(g)), ctypes.c_int64(rows),
                        ctypes.c_int64(length), ptr(y), ptr(dx))
        want, (xl,) = reference(lambda t: torch.softmax(t, -1), x)
        (want * g.double()).sum().backward()
        compare(f"softmax ({rows}, {length}) output", dtype, y, want)
        compare(f"softmax ({rows}, {length}) input gradient", dtype, dx, xl.grad)


def check_loss_sums(lib):
    dptr = lambda a: a.ctypes.data_as(ctypes.POINTER(ctypes.c_double))  # noqa: E731
    for (n, k, shape), maps in [((2, 3, (5, 6, 7)), True), ((2, 5, (10, 15, 20)), True),
                                ((1, 2, (4, 4, 4)), False)]:
        v = int(np.prod(shape))
        z = torch.randn(n, k, v, dtype=torch.float64) * 2
        labels = torch.randint(0, k, (n, v))
        e = torch.rand(n, v, dtype=torch.float64) if maps else None
        w = torch.rand(n, v, dtype=torch.float64) + 0.5 if maps else None
        g = torch.randn(n, k, 7, dtype=torch.float64)
        for f64, tolerance, dtype in [(0, 1e-5, "f32"), (1, 1e-9, "f64")]:
            zt = z if f64 else z.float().double()
            zl = zt.clone().requires_grad_(True)
            p, logp = torch.softmax(zl, 1), torch.log_softmax(zl, 1)
            t = F.one_hot(labels, k).permute(0, 2, 1).double()
            et = (e if f64 else e.float().double())[:, None] if maps else torch.zeros(n, 1, v)
            wt = (w if f64 else w.float().double())[:, None] if maps else torch.zeros(n, 1, v)
            want = torch.stack([(t * p).sum(-1), p.sum(-1), (p * p).sum(-1), t.sum(-1),
                                (t * p * et).sum(-1), (t * et).sum(-1),
                                -(t * wt * logp).sum(-1)], -1)
            (want * g).sum().backward()
            sums, dz = np.zeros(n * k * 7), np.zeros(n * k * v)
            arrays = [np.ascontiguousarray(a.numpy()) if a is not None else None
                      for a in (z, e, w, g)]
            lab = np.ascontiguousarray(labels.numpy().astype(np.uint32))
            lib.emu_loss_sums(f64, dptr(arrays[0]),
                              lab.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
                              dptr(arrays[1]) if maps else None, dptr(arrays[2]) if maps else None,
                              n, k, ctypes.c_longlong(v), dptr(arrays[3]), dptr(sums), dptr(dz))
            label = f"loss sums N={n} K={k} V={v}{' E w' if maps else ''}"
            for what, got, ref in [("sums", sums, want), ("logit gradient", dz, zl.grad)]:
                ref = ref.detach().numpy().ravel()
                worst = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)
                ok = worst <= tolerance
                print(f"{'ok  ' if ok else 'FAIL'} {dtype:4} {label + ' ' + what:42} {worst:.2e}")
                if not ok:
                    failures.append(f"{dtype} {label} {what}")


def main():
    torch.manual_seed(0)
    lib = build("layers.cpp")
    for dtype in DTYPES:
        for check in (check_activations, check_prelu, check_norms, check_softmax):
            check(lib, dtype)
    check_loss_sums(build_loss_sums())
    print(f"torch {torch.__version__}; {len(failures)} failure(s)")
    if failures:
        print("failed:", ", ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
