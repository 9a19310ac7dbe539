//! The loss-sum CUDA kernels (`src/cuda/loss_sums.cu`) without a GPU: compiled for the CPU by
//! `cwseg-cuda-emulate` (its `harness/loss_sums.cpp` launches them with `loss_sums_cuda.rs`'s grid
//! shapes) and compared with the CPU op of [`crate::loss_sums::reduce`] on the same inputs: the
//! `(N, K, 7)` sums and the logits' gradient of `Σ g·sums`, f64 within 1e-9 and f32 within 1e-5
//! of the largest value, with and without edge and weight maps. Runs in every build, so CI
//! checks the kernel file although no GPU runs it; skips with a message where no C++ compiler
//! starts.
// Calling the emulation's C function is FFI.
#![allow(unsafe_code)]

use candle_core::{DType, Device, Tensor, Var};
use cwseg_cuda_emulate::{Kernels, emulation};

use crate::loss_sums::{STATS, reduce};

/// `emu_loss_sums(f64, z, labels, e, w, n, k, v, g, sums, dz)` of `harness/loss_sums.cpp`.
type LossSumsFn = unsafe extern "C" fn(
    i32,
    *const f64,
    *const u32,
    *const f64,
    *const f64,
    i32,
    i32,
    i64,
    *const f64,
    *mut f64,
    *mut f64,
);

/// `n` values of a fixed pseudo-random sequence, uniform in `[lo, hi)`.
fn uniform(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            lo + (hi - lo) * (state >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

fn within(want: &[f64], got: &[f64], tolerance: f64, what: &str) {
    assert_eq!(want.len(), got.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-300);
    let worst = want
        .iter()
        .zip(got)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0f64,
            |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        )
        / scale;
    assert!(
        worst <= tolerance,
        "{what}: differs by {worst:.2e} (tolerance {tolerance:.0e})"
    );
}

/// The CPU op's sums and logits gradient, in `dtype`, as f64.
fn cpu(
    z: &[f64],
    shape: (usize, usize, [usize; 3]),
    labels: &[u32],
    maps: Option<(&[f64], &[f64])>,
    g: &[f64],
    dtype: DType,
) -> (Vec<f64>, Vec<f64>) {
    let (n, k, [d, h, w]) = shape;
    let cpu = Device::Cpu;
    let z = Var::from_tensor(
        &Tensor::from_slice(z, (n, k, d, h, w), &cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("z"),
    )
    .expect("z");
    let labels = Tensor::from_slice(labels, (n, d, h, w), &cpu).expect("labels");
    let map = |m: &[f64]| Tensor::from_slice(m, (n, d, h, w), &cpu).and_then(|t| t.to_dtype(dtype));
    let (edges, weights) = match maps {
        Some((e, w)) => (Some(map(e).expect("e")), Some(map(w).expect("w"))),
        None => (None, None),
    };
    let sums = reduce(z.as_tensor(), &labels, edges.as_ref(), weights.as_ref()).expect("sums");
    let g = Tensor::from_slice(g, (n, k, STATS), &cpu).expect("g");
    let sums = sums.to_dtype(DType::F64).expect("f64");
    let grads = (&sums * &g)
        .and_then(|t| t.sum_all())
        .and_then(|t| t.backward())
        .expect("∂");
    let values = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values")
    };
    (values(&sums), values(grads.get(z.as_tensor()).expect("∂z")))
}

#[test]
fn emulated_cuda_loss_sums_match_the_cpu_op() {
    let Some(emulation) = emulation(Kernels::LossSums).expect("the emulated loss sums") else {
        eprintln!("skipped: no C++ compiler to emulate the CUDA kernels");
        return;
    };
    // SAFETY: the type is `emu_loss_sums`'s signature in harness/loss_sums.cpp.
    let loss_sums: LossSumsFn =
        unsafe { emulation.function(b"emu_loss_sums") }.expect("emu_loss_sums");
    for (n, k, dims, with_maps) in [
        (2usize, 3usize, [5usize, 6, 7], true),
        (2, 5, [10, 15, 20], true),
        (1, 2, [4, 4, 4], false),
    ] {
        let v: usize = dims.iter().product();
        let z = uniform(n * k * v, 1, -4.0, 4.0);
        let labels: Vec<u32> = uniform(n * v, 2, 0.0, k as f64)
            .iter()
            .map(|&x| x as u32)
            .collect();
        let (e, w) = (uniform(n * v, 3, 0.0, 1.0), uniform(n * v, 4, 0.5, 1.5));
        let g = uniform(n * k * STATS, 5, -1.0, 1.0);
        let maps = with_maps.then_some((e.as_slice(), w.as_slice()));
        for (dtype, f64_kernels, tolerance) in [(DType::F64, 1, 1e-9), (DType::F32, 0, 1e-5)] {
            let (want_sums, want_dz) = cpu(&z, (n, k, dims), &labels, maps, &g, dtype);
            let (mut sums, mut dz) = (vec![0.0; n * k * STATS], vec![0.0; n * k * v]);
            let null = std::ptr::null();
            // SAFETY: z and dz hold n·k·v values, labels, e and w n·v (or null), g and sums
            // n·k·7, as the harness reads and writes them.
            unsafe {
                loss_sums(
                    f64_kernels,
                    z.as_ptr(),
                    labels.as_ptr(),
                    if with_maps { e.as_ptr() } else { null },
                    if with_maps { w.as_ptr() } else { null },
                    n as i32,
                    k as i32,
                    v as i64,
                    g.as_ptr(),
                    sums.as_mut_ptr(),
                    dz.as_mut_ptr(),
                )
            };
            let what = format!("{dtype:?} N={n} K={k} V={v} maps={with_maps}");
            within(&want_sums, &sums, tolerance, &format!("{what}: sums"));
            within(
                &want_dz,
                &dz,
                tolerance,
                &format!("{what}: logits gradient"),
            );
        }
    }
}
