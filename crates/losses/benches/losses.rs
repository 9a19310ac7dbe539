//! Forward + backward of CWCD, CEDL and GDL on logits (2, 16, 96, 96, 96), contour maps
//! computed online, on the CPU. `scripts/bench/bench_losses_reference.py` times the PyTorch
//! transcription on the same shapes with the same thread count; BENCHMARKS.md holds both.

use std::hint::black_box;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use cwseg_losses::{LossConfig, Target};

fn benches(c: &mut Criterion) {
    let device = Device::Cpu;
    let (n, k, s) = (2usize, 16usize, 96usize);
    let logits =
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, k, s, s, s), &device).expect("logits"))
            .expect("var");
    // Labels: 16 classes as slabs of different thickness, so that every class has a boundary.
    let labels: Vec<u32> = (0..n * s * s * s)
        .map(|i| {
            let (z, y, x) = ((i / (s * s)) % s, (i / s) % s, i % s);
            ((z / 7 + y / 13 + x / 29) % k) as u32
        })
        .collect();
    let labels = Tensor::from_vec(labels, (n, s, s, s), &device).expect("labels");
    let target = Target::new(labels).expect("target");
    let mut group = c.benchmark_group("losses");
    group.sample_size(10);
    for name in ["cwcd", "cedl", "gdl"] {
        let loss = LossConfig::from_name(name).expect("name").build();
        group.bench_function(
            format!("{name} forward+backward (2,16,96,96,96) f32"),
            |b| {
                b.iter(|| {
                    let value = loss
                        .forward(black_box(logits.as_tensor()), &target)
                        .expect("forward");
                    let grads = value.backward().expect("backward");
                    black_box(grads.get(logits.as_tensor()).map(|g| g.dtype()) == Some(DType::F32))
                })
            },
        );
    }
    group.finish();
}

criterion_group!(losses, benches);
criterion_main!(losses);
