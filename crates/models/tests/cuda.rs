//! CUDA against the CPU for every 3D operation and layer: values and gradients on the same
//! inputs. Built only with the `cuda` feature; skips with a message when no GPU is present.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor, Var};
use cwseg_models::layers;
use cwseg_models::ops3d::{
    Conv3dConfig, ConvTranspose3dConfig, avg_pool3d, conv_transpose3d, conv3d, max_pool3d,
    upsample_nearest3d, upsample_trilinear3d,
};

type Op = Box<dyn Fn(&Tensor, &Tensor) -> Tensor>;

fn run(op: &Op, x: &Tensor, w: &Tensor) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
    let y = op(xv.as_tensor(), wv.as_tensor());
    // Σ y·r with a fixed, non-constant r (Σ y² of a normalised output would not depend on x).
    // Made on the host: the device's fast sin differs for large arguments.
    let r: Vec<f32> = (0..y.elem_count())
        .map(|i| ((i % 97) as f32 * 0.7 + 0.1).sin())
        .collect();
    let r = Tensor::from_vec(r, y.shape(), y.device()).unwrap();
    let grads = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    // (gradients of bf16 inputs are bf16)
    let host = |t: &Tensor| -> Vec<f32> {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let gx = grads.get(xv.as_tensor()).map(host).unwrap_or_default();
    let gw = grads.get(wv.as_tensor()).map(host).unwrap_or_default();
    (host(&y), gx, gw)
}

/// Held by every test: one of them sets the process's precision, which the others read.
static PRECISION: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The first CUDA device and the precision lock, or `None` with a message (the test then
/// checks nothing).
fn gpu() -> Option<(Device, std::sync::MutexGuard<'static, ()>)> {
    let lock = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    Device::new_cuda(0)
        .map_err(|e| eprintln!("skipped: no CUDA device ({e})"))
        .ok()
        .map(|d| (d, lock))
}

fn close(a: &[f32], b: &[f32], what: &str) {
    within(a, b, 1e-4, what);
}

#[test]
fn cuda_matches_cpu() {
    let Some((gpu, _precision)) = gpu() else {
        return;
    };
    let x = Tensor::randn(0f32, 1.0, (2, 4, 9, 10, 11), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 0.3, (6, 4, 3, 3, 3), &Device::Cpu).unwrap();
    let wt = Tensor::randn(0f32, 0.3, (4, 3, 2, 2, 2), &Device::Cpu).unwrap();
    let w5 = Tensor::randn(0f32, 0.1, (5, 4, 5, 5, 5), &Device::Cpu).unwrap();
    let w2 = Tensor::randn(0f32, 0.3, (8, 4, 2, 2, 2), &Device::Cpu).unwrap();
    let w1 = Tensor::randn(0f32, 0.3, (3, 4, 1, 1, 1), &Device::Cpu).unwrap();
    let wt3 = Tensor::randn(0f32, 0.3, (4, 3, 3, 3, 3), &Device::Cpu).unwrap();
    let c = Tensor::rand(0.5f32, 1.5, 4, &Device::Cpu).unwrap();
    let one = Tensor::rand(0.1f32, 0.4, 1, &Device::Cpu).unwrap();
    let features = Tensor::rand(0.5f32, 1.5, 11, &Device::Cpu).unwrap();
    // A fixed bias on the op's device (its gradient is not compared).
    let bias = |n: usize, x: &Tensor| {
        Tensor::arange(0f32, n as f32, x.device())
            .unwrap()
            .affine(0.1, -0.2)
            .unwrap()
    };
    let ops: Vec<(&str, Tensor, Op)> = vec![
        (
            "conv3d k5 p2 bias",
            w5.clone(),
            Box::new(move |x, w| {
                let config = Conv3dConfig {
                    padding: [2; 3],
                    ..Default::default()
                };
                conv3d(x, w, Some(&bias(5, x)), &config).unwrap()
            }),
        ),
        (
            "conv3d k2 s2",
            w2.clone(),
            Box::new(|x, w| {
                let config = Conv3dConfig {
                    stride: [2; 3],
                    ..Default::default()
                };
                conv3d(x, w, None, &config).unwrap()
            }),
        ),
        (
            "conv3d k1",
            w1.clone(),
            Box::new(|x, w| conv3d(x, w, None, &Conv3dConfig::default()).unwrap()),
        ),
        (
            "conv_transpose3d k3 s2 p1 op1",
            wt3.clone(),
            Box::new(|x, w| {
                let config = ConvTranspose3dConfig {
                    stride: [2; 3],
                    padding: [1; 3],
                    output_padding: [1; 3],
                    ..Default::default()
                };
                conv_transpose3d(x, w, None, &config).unwrap()
            }),
        ),
        (
            "conv3d k3 s2 p1",
            w.clone(),
            Box::new(|x, w| {
                conv3d(
                    x,
                    w,
                    None,
                    &Conv3dConfig {
                        stride: [2; 3],
                        padding: [1; 3],
                        ..Default::default()
                    },
                )
                .unwrap()
            }),
        ),
        (
            "conv3d k3 dilation 2",
            w.clone(),
            Box::new(|x, w| {
                conv3d(
                    x,
                    w,
                    None,
                    &Conv3dConfig {
                        padding: [2; 3],
                        dilation: [2; 3],
                        ..Default::default()
                    },
                )
                .unwrap()
            }),
        ),
        (
            "conv_transpose3d k2 s2",
            wt.clone(),
            Box::new(|x, w| {
                conv_transpose3d(
                    x,
                    w,
                    None,
                    &ConvTranspose3dConfig {
                        stride: [2; 3],
                        ..Default::default()
                    },
                )
                .unwrap()
            }),
        ),
        (
            "max_pool3d k2 s2",
            c.clone(),
            Box::new(|x, w| {
                (max_pool3d(x, [2; 3], [2; 3], [0; 3])
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    * w.sum_all().unwrap())
                .unwrap()
            }),
        ),
        (
            "max_pool3d k3 s2 p1",
            c.clone(),
            Box::new(|x, w| {
                let y = max_pool3d(x, [3; 3], [2; 3], [1; 3]).unwrap();
                y.broadcast_mul(&w.reshape((1, 4, 1, 1, 1)).unwrap())
                    .unwrap()
            }),
        ),
        (
            "avg_pool3d k3 s1 p1",
            c.clone(),
            Box::new(|x, _| avg_pool3d(x, [3; 3], [1; 3], [1; 3]).unwrap()),
        ),
        (
            "upsample nearest",
            c.clone(),
            Box::new(|x, _| upsample_nearest3d(x, [18, 20, 22]).unwrap()),
        ),
        (
            "upsample trilinear",
            c.clone(),
            Box::new(|x, _| upsample_trilinear3d(x, [18, 20, 22], false).unwrap()),
        ),
        (
            "batch_norm train",
            c.clone(),
            Box::new(|x, w| {
                let z = Tensor::zeros(4, x.dtype(), x.device()).unwrap();
                layers::batch_norm(
                    x,
                    &z,
                    &z.ones_like().unwrap(),
                    Some(w),
                    None,
                    true,
                    0.1,
                    1e-5,
                )
                .unwrap()
                .0
            }),
        ),
        (
            "instance_norm",
            c.clone(),
            Box::new(|x, w| layers::instance_norm(x, Some(w), None, 1e-5).unwrap()),
        ),
        (
            "group_norm",
            c.clone(),
            Box::new(|x, w| layers::group_norm(x, 2, Some(w), None, 1e-5).unwrap()),
        ),
        (
            "prelu",
            c.clone(),
            Box::new(|x, w| layers::prelu(x, w).unwrap()),
        ),
        (
            "elu",
            c.clone(),
            Box::new(|x, _| layers::elu(x, 1.0).unwrap()),
        ),
        (
            "softmax",
            c.clone(),
            Box::new(|x, _| layers::softmax_last(x).unwrap()),
        ),
    ];
    let ops = ops.into_iter().chain(layer_ops(&c, &one, &features));
    for (name, param, op) in ops {
        let (y_cpu, gx_cpu, gw_cpu) = run(&op, &x, &param);
        let (y_gpu, gx_gpu, gw_gpu) = run(
            &op,
            &x.to_device(&gpu).unwrap(),
            &param.to_device(&gpu).unwrap(),
        );
        close(&y_cpu, &y_gpu, &format!("{name} output"));
        close(&gx_cpu, &gx_gpu, &format!("{name} input gradient"));
        close(&gw_cpu, &gw_gpu, &format!("{name} parameter gradient"));
    }
}

/// The layers with CUDA kernels (`cuda_layers`) in the variants the networks use: with and
/// without affine parameters, ReLU fused into batch norm, one shared PReLU slope, layer norm
/// over the last axis (`features` its parameters). `c` has one value per channel of `(N, 4, …)`.
fn layer_ops(c: &Tensor, one: &Tensor, features: &Tensor) -> Vec<(&'static str, Tensor, Op)> {
    let batch_norm = |relu: bool| -> Op {
        Box::new(move |x: &Tensor, w: &Tensor| {
            let z = Tensor::zeros(4, x.dtype(), x.device()).unwrap();
            let bias = w.affine(-0.5, 0.1).unwrap();
            let norm = if relu {
                layers::batch_norm_relu
            } else {
                layers::batch_norm
            };
            let (y, mean, var) = norm(
                x,
                &z,
                &z.ones_like().unwrap(),
                Some(w),
                Some(&bias),
                true,
                0.1,
                1e-5,
            )
            .unwrap();
            // the running statistics take part, so that they are compared too
            let stats = (mean + var).unwrap().reshape((1, 4, 1, 1, 1)).unwrap();
            y.broadcast_add(&stats).unwrap()
        })
    };
    vec![
        ("batch_norm train affine", c.clone(), batch_norm(false)),
        ("batch_norm + relu train", c.clone(), batch_norm(true)),
        (
            "instance_norm no affine",
            c.clone(),
            Box::new(|x, w| {
                let y = layers::instance_norm(x, None, None, 1e-5).unwrap();
                y.broadcast_mul(&w.reshape((1, 4, 1, 1, 1)).unwrap())
                    .unwrap()
            }),
        ),
        (
            "group_norm 2 groups affine",
            c.clone(),
            Box::new(|x, w| {
                let bias = w.affine(0.3, -0.2).unwrap();
                layers::group_norm(x, 2, Some(w), Some(&bias), 1e-5).unwrap()
            }),
        ),
        (
            "group_norm 1 group",
            c.clone(),
            Box::new(|x, w| layers::group_norm(x, 1, Some(w), None, 1e-5).unwrap()),
        ),
        (
            "layer_norm last axis",
            features.clone(),
            Box::new(|x, w| {
                let bias = w.affine(0.5, -0.25).unwrap();
                layers::layer_norm(x, Some(w), Some(&bias), 1e-5).unwrap()
            }),
        ),
        (
            "prelu one slope",
            one.clone(),
            Box::new(|x, w| layers::prelu(x, w).unwrap()),
        ),
        ("relu", c.clone(), Box::new(|x, _| layers::relu(x).unwrap())),
        (
            "leaky_relu 0.01",
            c.clone(),
            Box::new(|x, _| layers::leaky_relu(x, 0.01).unwrap()),
        ),
        (
            "elu 0.7",
            c.clone(),
            Box::new(|x, _| layers::elu(x, 0.7).unwrap()),
        ),
        ("gelu", c.clone(), Box::new(|x, _| layers::gelu(x).unwrap())),
        (
            "softmax of scaled rows",
            c.clone(),
            Box::new(|x, _| layers::softmax_last(&x.affine(3.0, 1.0).unwrap()).unwrap()),
        ),
    ]
}

/// The layer kernels on bf16 and f16 CUDA values against the CPU's f32: output and both
/// gradients within 3e-2 of the largest f32 value (bf16 keeps 8 significant bits, f16 11; a
/// normalisation's output and gradient carry the rounding of its input, its statistics and
/// the incoming gradient, each about 2⁻⁹ relative in bf16; the sums are f64 on both sides).
#[test]
fn layer_kernels_in_half_precision() {
    use candle_core::DType;
    let Some((gpu, _precision)) = gpu() else {
        return;
    };
    let x = Tensor::randn(0f32, 1.0, (2, 4, 9, 10, 11), &Device::Cpu).unwrap();
    let c = Tensor::rand(0.5f32, 1.5, 4, &Device::Cpu).unwrap();
    let one = Tensor::rand(0.1f32, 0.4, 1, &Device::Cpu).unwrap();
    let features = Tensor::rand(0.5f32, 1.5, 11, &Device::Cpu).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        for (name, param, op) in layer_ops(&c, &one, &features) {
            let (y, gx, gw) = run(&op, &x, &param);
            let half = |t: &Tensor| t.to_device(&gpu).unwrap().to_dtype(dtype).unwrap();
            let to_f32: Op = Box::new(move |x, w| op(x, w).to_dtype(DType::F32).unwrap());
            let (yh, gxh, gwh) = run(&to_f32, &half(&x), &half(&param));
            for (what, a, b) in [
                ("output", &y, &yh),
                ("input gradient", &gx, &gxh),
                ("parameter gradient", &gw, &gwh),
            ] {
                within(a, b, 3e-2, &format!("{dtype:?} {name} {what}"));
            }
        }
    }
}

/// Each network of the zoo, built from the same seed on both devices (the seeded initialiser
/// draws on the host), gives the same outputs on CUDA as on the CPU, in eval and train mode,
/// and the same input gradient.
#[test]
fn networks_match_cpu() {
    use candle_core::{DType, ModuleT};
    use cwseg_models::{ModelConfig, seeded_var_builder};
    let Some((gpu, _precision)) = gpu() else {
        return;
    };
    let size = [32usize; 3];
    let x = Tensor::randn(0f32, 1.0, (2, 2, size[0], size[1], size[2]), &Device::Cpu).unwrap();
    for name in ["unet", "vnet", "deeplabv3", "unetr"] {
        let config = ModelConfig::from_name(name, 2, 3)
            .unwrap()
            .with_input_size(size);
        let mut results = Vec::new();
        for device in [&Device::Cpu, &gpu] {
            let vars = candle_nn::VarMap::new();
            let net = config
                .build(seeded_var_builder(&vars, 7, DType::F32, device))
                .unwrap();
            let xv = Var::from_tensor(&x.to_device(device).unwrap()).unwrap();
            let eval = net.forward_t(xv.as_tensor(), false).unwrap();
            let train = net.forward_t(xv.as_tensor(), true).unwrap();
            let grads = train.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let host = |t: &Tensor| -> Vec<f32> {
                t.to_device(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            results.push((
                host(&eval),
                host(&train),
                host(grads.get(xv.as_tensor()).unwrap()),
            ));
        }
        let (cpu, cuda) = (&results[0], &results[1]);
        close(&cpu.0, &cuda.0, &format!("{name} eval output"));
        close(&cpu.1, &cuda.1, &format!("{name} train output"));
        close(&cpu.2, &cuda.2, &format!("{name} input gradient"));
    }
}

/// A convolution on bf16 CUDA tensors (tensor cores, f32 accumulation) against the CPU's f32:
/// within 2e-2 of the largest output, for the output and both gradients (bf16 keeps 8
/// significant bits, a relative rounding of 2⁻⁹ on each operand).
#[test]
fn bf16_conv_close_to_f32() {
    use candle_core::DType;
    let Some((gpu, _precision)) = gpu() else {
        return;
    };
    let x = Tensor::randn(0f32, 1.0, (2, 8, 12, 12, 12), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 0.2, (16, 8, 3, 3, 3), &Device::Cpu).unwrap();
    let config = Conv3dConfig {
        padding: [1; 3],
        ..Default::default()
    };
    let op: Op = Box::new(move |x, w| conv3d(x, w, None, &config).unwrap());
    let (y, gx, gw) = run(&op, &x, &w);
    let bf16 = |t: &Tensor| t.to_device(&gpu).unwrap().to_dtype(DType::BF16).unwrap();
    let to_f32: Op = Box::new(move |x, w| {
        conv3d(x, w, None, &config)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    });
    let (y16, gx16, gw16) = run(&to_f32, &bf16(&x), &bf16(&w));
    for (what, a, b) in [
        ("output", &y, &y16),
        ("input gradient", &gx, &gx16),
        ("weight gradient", &gw, &gw16),
    ] {
        within(a, b, 2e-2, &format!("bf16 conv3d {what}"));
    }
}

/// Under bf16 and f16 precision the matrix products of `layers::linear` and `layers::matmul`
/// (UNETR's MLP and attention) run in that type on CUDA (PyTorch's autocast) and return f32:
/// within 2e-2 of the CPU's f32, and not equal to CUDA's own f32 (the cast took place).
#[test]
fn products_in_half_precision() {
    use candle_core::DType;
    use cwseg_models::{Precision, set_precision};
    let Some((gpu, _precision)) = gpu() else {
        return;
    };
    let x = Tensor::randn(0f32, 1.0, (2, 27, 64), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 0.2, (48, 64), &Device::Cpu).unwrap();
    let op: Op = Box::new(|x, w| {
        let b = Tensor::arange(0f32, 48.0, x.device())
            .unwrap()
            .affine(0.01, 0.0)
            .unwrap();
        let h = layers::linear(x, w, Some(&b)).unwrap(); // (2, 27, 48)
        let scores = layers::matmul(&h, &h.t().unwrap()).unwrap(); // (2, 27, 27)
        let y = layers::matmul(&layers::softmax_last(&scores).unwrap(), &h).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        y
    });
    let (y, gx, gw) = run(&op, &x, &w);
    let on_gpu = |t: &Tensor| t.to_device(&gpu).unwrap();
    let (y32, _, _) = run(&op, &on_gpu(&x), &on_gpu(&w));
    for precision in [Precision::Bf16, Precision::F16] {
        set_precision(precision, &gpu);
        let (yh, gxh, gwh) = run(&op, &on_gpu(&x), &on_gpu(&w));
        set_precision(Precision::F32, &gpu);
        for (what, a, b) in [
            ("output", &y, &yh),
            ("input gradient", &gx, &gxh),
            ("weight gradient", &gw, &gwh),
        ] {
            within(a, b, 2e-2, &format!("{precision} products {what}"));
        }
        assert_ne!(y32, yh, "{precision}: the products were not cast");
    }
}

/// `b` within `tolerance` of `a`, relative to the largest `|a|`.
fn within(a: &[f32], b: &[f32], tolerance: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale;
    println!("{what:28} max relative difference {worst:.2e}");
    assert!(
        worst <= tolerance,
        "{what}: differs by {worst} (tolerance {tolerance})"
    );
}
