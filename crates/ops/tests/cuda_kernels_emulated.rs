//! The layers' CUDA kernels (`src/cuda/layers.cu`) without a GPU: compiled as host C++ with
//! the CPU emulation of `cwseg-cuda-emulate` (threads for a block's threads, barriers, warp
//! shuffles through a buffer, atomics under a lock) and driven as `src/cuda_layers.rs` drives
//! them (its `harness/layers.cpp`: the same launch shapes and kernel sequence), against this
//! crate's CPU layers (themselves checked against PyTorch) on the same inputs: output, input
//! gradient and parameter gradients, in f32 (within 1e-4 of the largest value) and with the
//! inputs rounded to bf16 and f16 (3e-2). Runs in every build, so a change to a kernel file is
//! checked by CI although no GPU runs it; `tests/cuda.rs` checks the same layers on a GPU, and
//! `scripts/gpu/emulate_cuda_layers.py` the same emulation against PyTorch (with the loss sums).
//!
//! Needs a C++20 compiler with `_Float16` (`$CXX`, else `g++`, ≥ 12); without one the test
//! says so and checks nothing.
// Calling the emulation's C functions is FFI.
#![allow(unsafe_code)]

use std::sync::MutexGuard;

use candle_core::{Device, Tensor, Var};
use cwseg_cuda_emulate::{Emulation, Kernels};
use cwseg_ops::layers;

type ActivationFn =
    unsafe extern "C" fn(i32, i32, f32, *const f32, *const f32, i64, *mut f32, *mut f32);
type PreluFn = unsafe extern "C" fn(
    i32,
    *const f32,
    *const f32,
    *const f32,
    i64,
    i32,
    i64,
    i32,
    *mut f32,
    *mut f32,
    *mut f32,
);
type NormFn = unsafe extern "C" fn(
    i32,
    *const f32,
    *const f32,
    *const f32,
    *const f32,
    i64,
    i32,
    i64,
    i32,
    i32,
    i32,
    f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
    *mut f32,
);
type SoftmaxFn = unsafe extern "C" fn(i32, *const f32, *const f32, i64, i64, *mut f32, *mut f32);

/// Element types of the emulated kernels: the harness's `dtype` code and the tolerance.
const DTYPES: [(&str, i32, f32); 3] = [("f32", 0, 1e-4), ("bf16", 1, 3e-2), ("f16", 2, 3e-2)];

/// The emulated layer kernels, locked for this test; `None` (with a message) where no C++
/// compiler starts.
fn emulation() -> Option<MutexGuard<'static, Emulation>> {
    let emulation = cwseg_cuda_emulate::emulation(Kernels::Layers).expect("the emulated layers");
    if emulation.is_none() {
        eprintln!("skipped: no C++ compiler to emulate the CUDA kernels");
    }
    emulation
}

/// The harness's function `name` of C signature `T`.
///
/// # Safety
/// `T` must be `name`'s signature in `crates/cuda-emulate/harness/layers.cpp`.
unsafe fn function<T: Copy>(emulation: &Emulation, name: &[u8]) -> T {
    // SAFETY: passed on to the caller.
    unsafe { emulation.function(name) }.expect("an emulated kernel's entry point")
}

/// Output, input gradient and parameter gradients of one layer.
#[derive(Debug, Default)]
struct Results {
    y: Vec<f32>,
    dx: Vec<f32>,
    dparams: Vec<Vec<f32>>,
}

/// The CPU layers' results: `f(x, params)` and the gradients of `Σ f·g`.
fn reference(
    x: &Tensor,
    params: &[Tensor],
    g: &Tensor,
    f: impl Fn(&Tensor, &[Tensor]) -> Tensor,
) -> Results {
    let xv = Var::from_tensor(x).expect("x");
    let pv: Vec<Var> = params
        .iter()
        .map(|p| Var::from_tensor(p).expect("p"))
        .collect();
    let ps: Vec<Tensor> = pv.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(xv.as_tensor(), &ps);
    let grads = (&y * g)
        .expect("y·g")
        .sum_all()
        .expect("Σ")
        .backward()
        .expect("backward");
    Results {
        y: values(&y),
        dx: values(grads.get(xv.as_tensor()).expect("∂x")),
        dparams: pv
            .iter()
            .map(|p| values(grads.get(p.as_tensor()).expect("∂p")))
            .collect(),
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().expect("flat").to_vec1().expect("values")
}

/// `got` within `tolerance` of `want`, relative to the largest `|want|`.
fn within(want: &[f32], got: &[f32], tolerance: f32, what: &str) {
    assert_eq!(want.len(), got.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = want
        .iter()
        .zip(got)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
        / scale;
    assert!(
        worst <= tolerance,
        "{what}: differs by {worst:.2e} (tolerance {tolerance:.0e})"
    );
}

fn compare(want: &Results, got: &Results, tolerance: f32, what: &str) {
    within(&want.y, &got.y, tolerance, &format!("{what}: output"));
    within(
        &want.dx,
        &got.dx,
        tolerance,
        &format!("{what}: input gradient"),
    );
    for (i, (w, g)) in want.dparams.iter().zip(&got.dparams).enumerate() {
        within(
            w,
            g,
            tolerance,
            &format!("{what}: gradient of parameter {i}"),
        );
    }
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // candle's CPU randn is not seeded: a fixed pseudo-random sequence instead
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            // sum of 4 uniforms, centred and scaled to unit variance
            let mut s = 0f32;
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s += (state >> 40) as f32 / (1u64 << 24) as f32;
            }
            (s - 2.0) * 3f32.sqrt()
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

#[test]
fn activations_match_the_cpu_layers() {
    let Some(emulation) = emulation() else {
        return;
    };
    // SAFETY: the type is the entry point's signature in harness/layers.cpp.
    let activation: ActivationFn = unsafe { function(&emulation, b"emu_activation") };
    let x = randn(&[2, 4, 5, 6, 7], 1);
    let g = randn(&[2, 4, 5, 6, 7], 2);
    type Layer = fn(&Tensor) -> Tensor;
    let cases: [(&str, i32, f32, Layer); 4] = [
        ("relu", 0, 0.0, |x| layers::relu(x).expect("relu")),
        ("leaky_relu", 1, 0.01, |x| {
            layers::leaky_relu(x, 0.01).expect("leaky")
        }),
        ("elu", 2, 0.7, |x| layers::elu(x, 0.7).expect("elu")),
        ("gelu", 3, 0.0, |x| layers::gelu(x).expect("gelu")),
    ];
    let (xs, gs) = (values(&x), values(&g));
    for (name, kind, p, f) in cases {
        let want = reference(&x, &[], &g, |x, _| f(x));
        for (dtype, code, tolerance) in DTYPES {
            let mut got = Results {
                y: vec![0.0; xs.len()],
                dx: vec![0.0; xs.len()],
                dparams: vec![],
            };
            // SAFETY: x, g, y and dx hold n values each.
            unsafe {
                activation(
                    code,
                    kind,
                    p,
                    xs.as_ptr(),
                    gs.as_ptr(),
                    xs.len() as i64,
                    got.y.as_mut_ptr(),
                    got.dx.as_mut_ptr(),
                )
            };
            compare(&want, &got, tolerance, &format!("{dtype} {name}"));
        }
    }
}

#[test]
fn prelu_matches_the_cpu_layer() {
    let Some(emulation) = emulation() else {
        return;
    };
    // SAFETY: the type is the entry point's signature in harness/layers.cpp.
    let prelu: PreluFn = unsafe { function(&emulation, b"emu_prelu") };
    for (shape, slopes) in [
        (vec![2, 4, 210], 4usize),
        (vec![2, 4, 210], 1),
        (vec![8, 6], 6),
    ] {
        let x = randn(&shape, 3);
        let g = randn(&shape, 4);
        let a = (randn(&[slopes], 5).abs().expect("|a|") * 0.2).expect("a");
        let want = reference(&x, std::slice::from_ref(&a), &g, |x, p| {
            layers::prelu(x, &p[0]).expect("prelu")
        });
        let (xs, gs, av) = (values(&x), values(&g), values(&a));
        let (samples, channels) = (shape[0], shape[1]);
        let spatial = xs.len() / (samples * channels);
        for (dtype, code, tolerance) in DTYPES {
            let mut got = Results {
                y: vec![0.0; xs.len()],
                dx: vec![0.0; xs.len()],
                dparams: vec![vec![0.0; slopes]],
            };
            // SAFETY: x, g, y, dx hold samples·channels·spatial values, a and da `slopes`.
            unsafe {
                prelu(
                    code,
                    xs.as_ptr(),
                    av.as_ptr(),
                    gs.as_ptr(),
                    samples as i64,
                    channels as i32,
                    spatial as i64,
                    slopes as i32,
                    got.y.as_mut_ptr(),
                    got.dx.as_mut_ptr(),
                    got.dparams[0].as_mut_ptr(),
                )
            };
            compare(
                &want,
                &got,
                tolerance,
                &format!("{dtype} prelu {shape:?} {slopes} slopes"),
            );
        }
    }
}

/// One normalisation: the input's `(N, C, S)`, the kernels' grouping `(per_sample, per_stat)`,
/// ReLU after it, and the CPU layer.
struct NormCase {
    name: &'static str,
    shape: Vec<usize>,
    dims: (usize, usize, usize),
    grouping: (i32, i32),
    relu: bool,
    layer: fn(&Tensor, &Tensor, &Tensor) -> Tensor,
}

fn batch_norm(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool) -> Tensor {
    let c = x.dim(1).expect("C");
    let zeros = Tensor::zeros(c, x.dtype(), x.device()).expect("zeros");
    let ones = zeros.ones_like().expect("ones");
    let norm = if relu {
        layers::batch_norm_relu
    } else {
        layers::batch_norm
    };
    norm(x, &zeros, &ones, Some(w), Some(b), true, 0.1, 1e-5)
        .expect("batch norm")
        .0
}

fn norm_cases() -> Vec<NormCase> {
    vec![
        NormCase {
            name: "batch_norm",
            shape: vec![2, 4, 5, 6, 7],
            dims: (2, 4, 210),
            grouping: (0, 1),
            relu: false,
            layer: |x, w, b| batch_norm(x, w, b, false),
        },
        NormCase {
            name: "batch_norm + relu",
            shape: vec![2, 4, 5, 6, 7],
            dims: (2, 4, 210),
            grouping: (0, 1),
            relu: true,
            layer: |x, w, b| batch_norm(x, w, b, true),
        },
        NormCase {
            // rows of 4200 values: two chunks per row, joined by the atomics
            name: "batch_norm long rows",
            shape: vec![2, 2, 4200],
            dims: (2, 2, 4200),
            grouping: (0, 1),
            relu: false,
            layer: |x, w, b| batch_norm(x, w, b, false),
        },
        NormCase {
            name: "instance_norm",
            shape: vec![2, 4, 5, 6, 7],
            dims: (2, 4, 210),
            grouping: (4, 1),
            relu: false,
            layer: |x, w, b| layers::instance_norm(x, Some(w), Some(b), 1e-5).expect("instance"),
        },
        NormCase {
            name: "group_norm 2 groups",
            shape: vec![2, 4, 5, 6, 7],
            dims: (2, 4, 210),
            grouping: (2, 2),
            relu: false,
            layer: |x, w, b| layers::group_norm(x, 2, Some(w), Some(b), 1e-5).expect("group"),
        },
        NormCase {
            name: "layer_norm (12, 70)",
            shape: vec![12, 70],
            dims: (12, 70, 1),
            grouping: (1, 70),
            relu: false,
            layer: |x, w, b| layers::layer_norm(x, Some(w), Some(b), 1e-5).expect("layer"),
        },
        NormCase {
            name: "layer_norm (10, 11)",
            shape: vec![10, 11],
            dims: (10, 11, 1),
            grouping: (1, 11),
            relu: false,
            layer: |x, w, b| layers::layer_norm(x, Some(w), Some(b), 1e-5).expect("layer"),
        },
    ]
}

#[test]
fn normalisations_match_the_cpu_layers() {
    let Some(emulation) = emulation() else {
        return;
    };
    // SAFETY: the type is the entry point's signature in harness/layers.cpp.
    let norm: NormFn = unsafe { function(&emulation, b"emu_norm") };
    for case in norm_cases() {
        let x = (randn(&case.shape, 6) * 2.0)
            .expect("x")
            .affine(1.0, 0.5)
            .expect("x");
        let g = randn(&case.shape, 7);
        let c = case.dims.1;
        let w = randn(&[c], 8).affine(0.3, 1.0).expect("w");
        let b = randn(&[c], 9).affine(0.3, 0.0).expect("b");
        let want = reference(&x, &[w.clone(), b.clone()], &g, |x, p| {
            (case.layer)(x, &p[0], &p[1])
        });
        let (xs, gs, ws, bs) = (values(&x), values(&g), values(&w), values(&b));
        let (samples, channels, spatial) = case.dims;
        let stats = if case.grouping.0 == 0 {
            channels
        } else {
            samples * case.grouping.0 as usize
        };
        for (dtype, code, tolerance) in DTYPES {
            let mut got = Results {
                y: vec![0.0; xs.len()],
                dx: vec![0.0; xs.len()],
                dparams: vec![vec![0.0; c], vec![0.0; c]],
            };
            let (mut mean, mut var) = (vec![0f32; stats], vec![0f32; stats]);
            let (dgamma, dbeta) = got.dparams.split_at_mut(1);
            // SAFETY: x, g, y, dx hold N·C·S values, γ, β and their gradients C, mean and
            // var one value per statistic.
            unsafe {
                norm(
                    code,
                    xs.as_ptr(),
                    ws.as_ptr(),
                    bs.as_ptr(),
                    gs.as_ptr(),
                    samples as i64,
                    channels as i32,
                    spatial as i64,
                    case.grouping.0,
                    case.grouping.1,
                    case.relu as i32,
                    1e-5,
                    got.y.as_mut_ptr(),
                    got.dx.as_mut_ptr(),
                    dgamma[0].as_mut_ptr(),
                    dbeta[0].as_mut_ptr(),
                    mean.as_mut_ptr(),
                    var.as_mut_ptr(),
                )
            };
            compare(&want, &got, tolerance, &format!("{dtype} {}", case.name));
        }
    }
}

#[test]
fn softmax_matches_the_cpu_layer() {
    let Some(emulation) = emulation() else {
        return;
    };
    // SAFETY: the type is the entry point's signature in harness/layers.cpp.
    let softmax: SoftmaxFn = unsafe { function(&emulation, b"emu_softmax") };
    for (rows, len) in [(30usize, 50usize), (9, 11)] {
        let x = (randn(&[rows, len], 10) * 3.0).expect("x");
        let g = randn(&[rows, len], 11);
        let want = reference(&x, &[], &g, |x, _| {
            layers::softmax_last(x).expect("softmax")
        });
        let (xs, gs) = (values(&x), values(&g));
        for (dtype, code, tolerance) in DTYPES {
            let mut got = Results {
                y: vec![0.0; xs.len()],
                dx: vec![0.0; xs.len()],
                dparams: vec![],
            };
            // SAFETY: x, g, y and dx hold rows·len values.
            unsafe {
                softmax(
                    code,
                    xs.as_ptr(),
                    gs.as_ptr(),
                    rows as i64,
                    len as i64,
                    got.y.as_mut_ptr(),
                    got.dx.as_mut_ptr(),
                )
            };
            compare(
                &want,
                &got,
                tolerance,
                &format!("{dtype} softmax ({rows}, {len})"),
            );
        }
    }
}
