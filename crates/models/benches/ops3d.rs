//! conv3d on 2×32×64³ (32 → 32, k = 3, pad 1): forward, and forward + backward. The PyTorch
//! figure of the same shapes comes from `scripts/bench_models_reference.py`.

use std::hint::black_box;

use candle_core::{Device, Tensor, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use cwseg_models::ops3d::{Conv3dConfig, conv3d, conv3d_composite};

fn benches(c: &mut Criterion) {
    let device = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 32, 64, 64, 64), &device).expect("x"))
        .expect("var");
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (32, 32, 3, 3, 3), &device).expect("w"))
        .expect("var");
    let config = Conv3dConfig {
        padding: [1; 3],
        ..Default::default()
    };
    let mut group = c.benchmark_group("ops3d");
    group.sample_size(10);
    type Conv = fn(&Tensor, &Tensor, Option<&Tensor>, &Conv3dConfig) -> candle_core::Result<Tensor>;
    let paths: [(&str, Conv); 2] = [("vol2col+gemm", conv3d), ("composite", conv3d_composite)];
    for (path, conv) in paths {
        group.bench_function(format!("conv3d forward 2x32x64^3 k3 pad1 ({path})"), |b| {
            b.iter(|| conv(black_box(x.as_tensor()), w.as_tensor(), None, &config).expect("conv3d"))
        });
        group.bench_function(
            format!("conv3d forward+backward 2x32x64^3 k3 pad1 ({path})"),
            |b| {
                b.iter(|| {
                    let y = conv(black_box(x.as_tensor()), w.as_tensor(), None, &config)
                        .expect("conv3d");
                    y.sum_all().expect("sum").backward().expect("backward")
                })
            },
        );
    }
    group.finish();
}

criterion_group!(ops3d, benches);
criterion_main!(ops3d);
