//! 3D operations, normalisations and activations against PyTorch (`scripts/fixtures/models_fixtures.py`): outputs and the gradients of
//! `Σ y·g` w.r.t. every input, in f64.

use std::fs::File;
use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use cwseg_models::layers;
use cwseg_models::ops3d::{
    Conv3dConfig, ConvTranspose3dConfig, avg_pool3d, conv_transpose3d, conv3d, conv3d_composite,
    max_pool3d, upsample_nearest3d, upsample_trilinear3d,
};
use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::NpzReader;

struct Fixtures(NpzReader<File>);

impl Fixtures {
    fn open() -> Self {
        Self::named("ops3d.npz")
    }
    fn named(name: &str) -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        Fixtures(NpzReader::new(File::open(path).unwrap()).unwrap())
    }
    fn names(&mut self) -> Vec<String> {
        self.0.names().unwrap()
    }
    fn f64(&mut self, key: &str) -> Tensor {
        let a: ArrayD<f64> = self.0.by_name::<OwnedRepr<f64>, IxDyn>(key).unwrap();
        let shape = a.shape().to_vec();
        Tensor::from_vec(a.into_iter().collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
    }
    fn params(&mut self, key: &str) -> Vec<usize> {
        let a: ArrayD<i64> = self.0.by_name::<OwnedRepr<i64>, IxDyn>(key).unwrap();
        a.iter().map(|&v| v as usize).collect()
    }
}

fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g: Vec<f64> = got.flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f64> = want.flatten_all().unwrap().to_vec1().unwrap();
    let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (b.abs() + 1e-3 * scale),
            "{what}[{i}]: {a} vs PyTorch {b}"
        );
    }
}

/// In f32 (where the CPU's unit-stride convolution takes its direct path): output and
/// gradients within 1e-4 of PyTorch's, relative to the largest entry.
fn check_f32(fx: &mut Fixtures, case: &str, inputs: &[&str], f: impl Fn(&[Tensor]) -> Tensor) {
    let f32 = |t: Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
    let vars: Vec<Var> = inputs
        .iter()
        .map(|k| Var::from_tensor(&f32(fx.f64(&format!("{case}__{k}")))).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors);
    assert_eq!(y.dtype(), candle_core::DType::F32);
    let close = |got: &Tensor, want: &Tensor, what: String| {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let g: Vec<f64> = got
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let w: Vec<f64> = want.flatten_all().unwrap().to_vec1().unwrap();
        let scale = w.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        assert!(
            worst <= 1e-4 * scale,
            "{what}: f32 differs from PyTorch by {worst} (max {scale})"
        );
    };
    close(
        &y,
        &fx.f64(&format!("{case}__out")),
        format!("{case} f32 output"),
    );
    let g = f32(fx.f64(&format!("{case}__upstream")));
    let grads = (y * g).unwrap().sum_all().unwrap().backward().unwrap();
    for (k, v) in inputs.iter().zip(&vars) {
        let grad = grads.get(v.as_tensor()).expect("gradient");
        close(
            grad,
            &fx.f64(&format!("{case}__grad_{k}")),
            format!("{case} f32 gradient of {k}"),
        );
    }
}

/// Runs `f` on the fixture's inputs as variables and checks output and gradients.
fn check(fx: &mut Fixtures, case: &str, inputs: &[&str], f: impl Fn(&[Tensor]) -> Tensor) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|k| Var::from_tensor(&fx.f64(&format!("{case}__{k}"))).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors);
    assert_close(
        &y,
        &fx.f64(&format!("{case}__out")),
        &format!("{case} output"),
    );
    let g = fx.f64(&format!("{case}__upstream"));
    let grads = (y * g).unwrap().sum_all().unwrap().backward().unwrap();
    for (k, v) in inputs.iter().zip(&vars) {
        let grad = grads.get(v.as_tensor()).expect("gradient");
        assert_close(
            grad,
            &fx.f64(&format!("{case}__grad_{k}")),
            &format!("{case} gradient of {k}"),
        );
    }
}

fn cases(fx: &mut Fixtures, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = fx
        .names()
        .into_iter()
        .filter_map(|n| n.strip_suffix("__out").map(str::to_string))
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

#[test]
fn conv3d_matches_pytorch() {
    let mut fx = Fixtures::open();
    let cases = cases(&mut fx, "conv__");
    assert_eq!(cases.len(), 10);
    for case in cases {
        let p = fx.params(&format!("{case}__params"));
        let config = Conv3dConfig {
            stride: [p[0], p[1], p[2]],
            padding: [p[3], p[4], p[5]],
            dilation: [p[6], p[7], p[8]],
        };
        let has_bias = fx.names().contains(&format!("{case}__b"));
        let inputs: &[&str] = if has_bias {
            &["x", "w", "b"]
        } else {
            &["x", "w"]
        };
        // The CPU fast paths (f64: vol2col + gemm; f32: the direct tap sum for unit strides,
        // vol2col otherwise) and the any-device composite, all against PyTorch.
        check(&mut fx, &case, inputs, |t| {
            conv3d(&t[0], &t[1], t.get(2), &config).unwrap()
        });
        check_f32(&mut fx, &case, inputs, |t| {
            conv3d(&t[0], &t[1], t.get(2), &config).unwrap()
        });
        check(&mut fx, &case, inputs, |t| {
            conv3d_composite(&t[0], &t[1], t.get(2), &config).unwrap()
        });
    }
}

#[test]
fn conv_transpose3d_matches_pytorch() {
    let mut fx = Fixtures::open();
    let cases = cases(&mut fx, "convt__");
    assert_eq!(cases.len(), 4);
    for case in cases {
        let p = fx.params(&format!("{case}__params"));
        let config = ConvTranspose3dConfig {
            stride: [p[0], p[1], p[2]],
            padding: [p[3], p[4], p[5]],
            output_padding: [p[6], p[7], p[8]],
            dilation: [p[9], p[10], p[11]],
        };
        let has_bias = fx.names().contains(&format!("{case}__b"));
        let inputs: &[&str] = if has_bias {
            &["x", "w", "b"]
        } else {
            &["x", "w"]
        };
        // f64: candle's composites; f32: the CPU op for kernel = stride ([`conv_transpose3d`]).
        check(&mut fx, &case, inputs, |t| {
            conv_transpose3d(&t[0], &t[1], t.get(2), &config).unwrap()
        });
        check_f32(&mut fx, &case, inputs, |t| {
            conv_transpose3d(&t[0], &t[1], t.get(2), &config).unwrap()
        });
    }
}

#[test]
fn pooling_matches_pytorch() {
    let mut fx = Fixtures::open();
    let cases = cases(&mut fx, "pool__");
    assert_eq!(cases.len(), 4);
    for case in cases {
        let p = fx.params(&format!("{case}__params"));
        let (k, s, pad) = ([p[0]; 3], [p[1]; 3], [p[2]; 3]);
        let max = case.contains("max");
        let pool = |t: &[Tensor]| {
            if max {
                max_pool3d(&t[0], k, s, pad).unwrap()
            } else {
                avg_pool3d(&t[0], k, s, pad).unwrap()
            }
        };
        // f64: the separable composite; f32: also the CPU op for max pooling with kernel =
        // stride (`max_k2_s2`, whose odd height and width leave voxels outside every window)
        check(&mut fx, &case, &["x"], pool);
        check_f32(&mut fx, &case, &["x"], pool);
    }
}

#[test]
fn upsampling_matches_pytorch() {
    let mut fx = Fixtures::open();
    let cases = cases(&mut fx, "up__");
    assert_eq!(cases.len(), 4);
    for case in cases {
        let p = fx.params(&format!("{case}__params"));
        let (size, align) = ([p[0], p[1], p[2]], p[3] == 1);
        let nearest = case.contains("nearest");
        let up = |t: &[Tensor]| {
            if nearest {
                upsample_nearest3d(&t[0], size).unwrap()
            } else {
                upsample_trilinear3d(&t[0], size, align).unwrap()
            }
        };
        // f64: candle composites; f32 on the CPU: the interpolation op of `interp.rs`
        check(&mut fx, &case, &["x"], up);
        check_f32(&mut fx, &case, &["x"], up);
    }
}

#[test]
fn bad_shapes_are_errors() {
    let x = Tensor::zeros((1, 2, 4, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((3, 5, 3, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = conv3d(&x, &w, None, &Conv3dConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 channels"), "{err}");
    let big = Tensor::zeros((3, 2, 7, 7, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(conv3d(&x, &big, None, &Conv3dConfig::default()).is_err());
    assert!(max_pool3d(&x, [3; 3], [1; 3], [2; 3]).is_err());
}

#[test]
fn normalisations_and_activations_match_pytorch() {
    let mut fx = Fixtures::named("layers.npz");
    for (name, training) in [("batch_norm_train", true), ("batch_norm_eval", false)] {
        let rm = fx.f64(&format!("{name}__running_mean_in"));
        let rv = fx.f64(&format!("{name}__running_var_in"));
        let (want_m, want_v) = (
            fx.f64(&format!("{name}__running_mean_out")),
            fx.f64(&format!("{name}__running_var_out")),
        );
        check(&mut fx, name, &["x", "w", "b"], |t| {
            let (y, m, v) = layers::batch_norm(
                &t[0],
                &rm,
                &rv,
                Some(&t[1]),
                Some(&t[2]),
                training,
                0.1,
                1e-5,
            )
            .unwrap();
            assert_close(&m, &want_m, &format!("{name} running mean"));
            assert_close(&v, &want_v, &format!("{name} running var"));
            y
        });
    }
    check(&mut fx, "instance_norm", &["x", "w", "b"], |t| {
        layers::instance_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5).unwrap()
    });
    check(&mut fx, "group_norm", &["x", "w", "b"], |t| {
        layers::group_norm(&t[0], 2, Some(&t[1]), Some(&t[2]), 1e-5).unwrap()
    });
    check(&mut fx, "layer_norm", &["x", "w", "b"], |t| {
        layers::layer_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5).unwrap()
    });
    check(&mut fx, "softmax", &["x"], |t| {
        layers::softmax_last(&t[0]).unwrap()
    });
    check(&mut fx, "leaky_relu", &["x"], |t| {
        layers::leaky_relu(&t[0], 0.01).unwrap()
    });
    check(&mut fx, "prelu", &["x", "w"], |t| {
        layers::prelu(&t[0], &t[1]).unwrap()
    });
    check(&mut fx, "elu", &["x"], |t| layers::elu(&t[0], 1.0).unwrap());
    // in f32 the fused CPU kernels run (f64 above takes the composites)
    check_f32(&mut fx, "prelu", &["x", "w"], |t| {
        layers::prelu(&t[0], &t[1]).unwrap()
    });
    check_f32(&mut fx, "elu", &["x"], |t| layers::elu(&t[0], 1.0).unwrap());
    check_f32(&mut fx, "leaky_relu", &["x"], |t| {
        layers::leaky_relu(&t[0], 0.01).unwrap()
    });
    check_f32(&mut fx, "instance_norm", &["x", "w", "b"], |t| {
        layers::instance_norm(&t[0], Some(&t[1]), Some(&t[2]), 1e-5).unwrap()
    });
}

/// Uniform values in `[-scale, scale)` from a seeded generator.
fn seeded(shape: &[usize], scale: f32, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `got` equals `want` (f32 tensors) to 1e-5 relative to the largest entry.
fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let (g, w) = (values(got), values(want));
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * scale,
            "{what}[{i}]: fused {a}, composite {b}"
        );
    }
}

/// The fused PReLU, ELU, LeakyReLU, instance norm and batch norm + ReLU equal their candle composites (the path of other devices and dtypes)
/// in value and gradient, with one slope and with one per channel; at exactly zero they take
/// PyTorch's negative branch (`a·g`, `α·g`), where candle's `relu` passes the gradient.
#[test]
fn fused_activations_equal_their_composites() {
    let device = Device::Cpu;
    // seeded, so that a failure repeats
    let x = seeded(&[2, 3, 4, 5, 6], 4.0, 1);
    let g = seeded(&[2, 3, 4, 5, 6], 1.0, 2);
    for slopes in [vec![0.25f32], vec![0.1, -0.3, 0.7]] {
        let n = slopes.len();
        let run = |fused: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let av =
                Var::from_tensor(&Tensor::from_vec(slopes.clone(), n, &device).unwrap()).unwrap();
            let y = if fused {
                layers::prelu(xv.as_tensor(), av.as_tensor()).unwrap()
            } else {
                layers::prelu_composite(xv.as_tensor(), av.as_tensor()).unwrap()
            };
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(xv.as_tensor()).unwrap().clone();
            let da = grads.get(av.as_tensor()).unwrap().clone();
            (y, dx, da)
        };
        let (a, b) = (run(true), run(false));
        assert_same(&a.0, &b.0, "prelu value");
        assert_same(&a.1, &b.1, "prelu gradient of x");
        assert_same(&a.2, &b.2, "prelu gradient of the slopes");
    }
    for affine in [true, false] {
        let run = |fused: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let w = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0], &device).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::new(&[0.1f32, 0.0, -0.3], &device).unwrap()).unwrap();
            let (wt, bt) = (w.as_tensor(), b.as_tensor());
            let (w_opt, b_opt) = if affine {
                (Some(wt), Some(bt))
            } else {
                (None, None)
            };
            let y = if fused {
                layers::instance_norm(xv.as_tensor(), w_opt, b_opt, 1e-5).unwrap()
            } else {
                layers::instance_norm_composite(xv.as_tensor(), w_opt, b_opt, 1e-5).unwrap()
            };
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let mut out = vec![y, grads.get(xv.as_tensor()).unwrap().clone()];
            if affine {
                out.push(grads.get(wt).unwrap().clone());
                out.push(grads.get(bt).unwrap().clone());
            }
            out
        };
        for (i, (a, b)) in run(true).iter().zip(&run(false)).enumerate() {
            assert_same(
                a,
                b,
                &format!("instance norm (affine {affine}), output {i}"),
            );
        }
    }
    for training in [true, false] {
        let run = |fused: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let w = Var::from_tensor(&Tensor::new(&[0.5f32, -1.0, 2.0], &device).unwrap()).unwrap();
            let b = Var::from_tensor(&Tensor::new(&[0.1f32, 0.0, -0.3], &device).unwrap()).unwrap();
            let rm = Tensor::new(&[0.2f32, -0.1, 0.0], &device).unwrap();
            let rv = Tensor::new(&[1.5f32, 0.7, 1.0], &device).unwrap();
            let args = (Some(w.as_tensor()), Some(b.as_tensor()));
            let (y, mean, var) = if fused {
                layers::batch_norm_relu(
                    xv.as_tensor(),
                    &rm,
                    &rv,
                    args.0,
                    args.1,
                    training,
                    0.1,
                    1e-5,
                )
                .unwrap()
            } else {
                let (y, m, v) = layers::batch_norm(
                    xv.as_tensor(),
                    &rm,
                    &rv,
                    args.0,
                    args.1,
                    training,
                    0.1,
                    1e-5,
                )
                .unwrap();
                (layers::relu(&y).unwrap(), m, v)
            };
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
            vec![y.clone(), mean, var, grad(&xv), grad(&w), grad(&b)]
        };
        for (i, (a, b)) in run(true).iter().zip(&run(false)).enumerate() {
            assert_same(
                a,
                b,
                &format!("batch norm + relu (training {training}), output {i}"),
            );
        }
    }
    for slope in [0.01, 0.3] {
        let run = |fused: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let y = if fused {
                layers::leaky_relu(xv.as_tensor(), slope).unwrap()
            } else {
                layers::leaky_relu_composite(xv.as_tensor(), slope).unwrap()
            };
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(xv.as_tensor()).unwrap().clone())
        };
        let (a, b) = (run(true), run(false));
        assert_same(&a.0, &b.0, "leaky relu value");
        assert_same(&a.1, &b.1, "leaky relu gradient");
    }
    for alpha in [1.0, 0.5] {
        let run = |fused: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let y = if fused {
                layers::elu(xv.as_tensor(), alpha).unwrap()
            } else {
                layers::elu_composite(xv.as_tensor(), alpha).unwrap()
            };
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(xv.as_tensor()).unwrap().clone())
        };
        let (a, b) = (run(true), run(false));
        assert_same(&a.0, &b.0, "elu value");
        assert_same(&a.1, &b.1, "elu gradient");
    }
}

#[test]
fn fused_activations_take_pytorchs_branch_at_zero() {
    let device = Device::Cpu;
    let x = Var::from_tensor(&Tensor::zeros((1, 2, 3), candle_core::DType::F32, &device).unwrap())
        .unwrap();
    let a = Var::from_tensor(&Tensor::new(&[0.25f32, -0.5], &device).unwrap()).unwrap();
    // the gradient of Σy with respect to `v`, flattened
    let grad_of = |y: &Tensor, v: &Var| -> Vec<f32> {
        let grads = y.sum_all().unwrap().backward().unwrap();
        grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let y = layers::prelu(x.as_tensor(), a.as_tensor()).unwrap();
    assert_eq!(grad_of(&y, &x), [0.25, 0.25, 0.25, -0.5, -0.5, -0.5]);
    assert_eq!(grad_of(&y, &a), [0.0, 0.0]);
    let y = layers::elu(x.as_tensor(), 0.5).unwrap();
    assert_eq!(grad_of(&y, &x), [0.5; 6]);
    let y = layers::leaky_relu(x.as_tensor(), 0.01).unwrap();
    assert_eq!(grad_of(&y, &x), [0.01; 6]);
}

#[test]
fn dropout_keeps_the_expectation() {
    let x = Tensor::ones((64, 64, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = layers::dropout(&x, 0.25, true).unwrap();
    let values: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let zeros = values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len() as f64;
    assert!((zeros - 0.25).abs() < 0.01, "dropped fraction {zeros}");
    assert!(
        values
            .iter()
            .all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6)
    );
    let mean: f64 = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
    assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
    assert_eq!(
        layers::dropout(&x, 0.25, false)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap(),
        x.to_vec3::<f32>().unwrap()
    );
    assert!(layers::dropout(&x, 1.0, true).is_err());
}

#[test]
fn modules_load_pytorch_parameters_by_name() {
    use candle_core::{DType, Module, ModuleT};
    use candle_nn::{VarBuilder, VarMap};
    use cwseg_models::modules::{BatchNorm3d, Conv3d, ConvTranspose3d, PRelu};
    use std::collections::HashMap;

    let mut fx = Fixtures::open();
    let case = "conv__k3_pad1_b2_c1";
    let params = HashMap::from([
        ("weight".to_string(), fx.f64(&format!("{case}__w"))),
        ("bias".to_string(), fx.f64(&format!("{case}__b"))),
    ]);
    let vb = VarBuilder::from_tensors(params, DType::F64, &Device::Cpu);
    let conv = Conv3d::new(
        1,
        3,
        [3; 3],
        Conv3dConfig {
            padding: [1; 3],
            ..Default::default()
        },
        true,
        vb,
    )
    .unwrap();
    let y = conv.forward(&fx.f64(&format!("{case}__x"))).unwrap();
    assert_close(&y, &fx.f64(&format!("{case}__out")), "Conv3d module");

    let case = "convt__k2_stride2_unet_up";
    let params = HashMap::from([
        ("weight".to_string(), fx.f64(&format!("{case}__w"))),
        ("bias".to_string(), fx.f64(&format!("{case}__b"))),
    ]);
    let vb = VarBuilder::from_tensors(params, DType::F64, &Device::Cpu);
    let config = ConvTranspose3dConfig {
        stride: [2; 3],
        ..Default::default()
    };
    let up = ConvTranspose3d::new(8, 4, [2; 3], config, true, vb).unwrap();
    let y = up.forward(&fx.f64(&format!("{case}__x"))).unwrap();
    assert_close(
        &y,
        &fx.f64(&format!("{case}__out")),
        "ConvTranspose3d module",
    );

    let mut layers_fx = Fixtures::named("layers.npz");
    let name = "batch_norm_eval";
    let params = HashMap::from([
        ("weight".to_string(), layers_fx.f64(&format!("{name}__w"))),
        ("bias".to_string(), layers_fx.f64(&format!("{name}__b"))),
        (
            "running_mean".to_string(),
            layers_fx.f64(&format!("{name}__running_mean_in")),
        ),
        (
            "running_var".to_string(),
            layers_fx.f64(&format!("{name}__running_var_in")),
        ),
    ]);
    let bn = BatchNorm3d::new(
        4,
        VarBuilder::from_tensors(params, DType::F64, &Device::Cpu),
    )
    .unwrap();
    let y = bn
        .forward_t(&layers_fx.f64(&format!("{name}__x")), false)
        .unwrap();
    assert_close(
        &y,
        &layers_fx.f64(&format!("{name}__out")),
        "BatchNorm3d module (eval)",
    );

    // A fresh VarMap holds exactly PyTorch's names and shapes.
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    Conv3d::new(
        2,
        5,
        [3, 3, 1],
        Conv3dConfig::default(),
        true,
        vb.pp("conv"),
    )
    .unwrap();
    BatchNorm3d::new(5, vb.pp("bn")).unwrap();
    PRelu::new(5, vb.pp("act")).unwrap();
    let mut names: Vec<(String, Vec<usize>)> = map
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    names.sort();
    let want: Vec<(String, Vec<usize>)> = [
        ("act.weight", vec![5]),
        ("bn.bias", vec![5]),
        ("bn.running_mean", vec![5]),
        ("bn.running_var", vec![5]),
        ("bn.weight", vec![5]),
        ("conv.bias", vec![5]),
        ("conv.weight", vec![5, 2, 3, 3, 1]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(names, want);
}

/// The fused softmax over the last axis equals its candle composite in value and gradient, on
/// rows of attention's shape (scores up to ±40, where an unshifted exp would overflow in
/// f32 only past 88), and rows that hold −100 (SwinUNETR's mask) beside 0.
#[test]
fn fused_softmax_equals_its_composite() {
    let x = seeded(&[3, 2, 5, 37], 40.0, 3);
    let masked = Tensor::cat(
        &[
            &x.narrow(3, 0, 30).unwrap(),
            &x.narrow(3, 30, 7).unwrap().affine(0.0, -100.0).unwrap(),
        ],
        3,
    )
    .unwrap();
    let g = seeded(&[3, 2, 5, 37], 1.0, 4);
    for input in [x, masked] {
        let run = |fused: bool| {
            let xv = Var::from_tensor(&input).unwrap();
            let y = if fused {
                layers::softmax_last(xv.as_tensor()).unwrap()
            } else {
                layers::softmax_last_composite(xv.as_tensor()).unwrap()
            };
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(xv.as_tensor()).unwrap().clone())
        };
        let (a, b) = (run(true), run(false));
        assert_same(&a.0, &b.0, "softmax value");
        assert_same(&a.1, &b.1, "softmax gradient");
    }
}

/// The attention-probabilities op (`softmax(q kᵀ + B + M)`, its node keeping only the
/// probabilities) equals its candle composite in value and in the gradients of `q`, `k` and
/// the bias, with a mask per window position (SwinUNETR's shifted windows) and without; the
/// mask gets no gradient.
#[test]
fn fused_attention_probabilities_equal_their_composite() {
    let (b, h, n, d) = (6, 2, 9, 4);
    let q = seeded(&[b, h, n, d], 1.5, 5);
    let k = seeded(&[b, h, n, d], 1.5, 6);
    let g = seeded(&[b, h, n, n], 1.0, 7);
    let bias = seeded(&[h, n, n], 3.0, 8);
    let mask = seeded(&[3, n, n], 3.0, 9);
    for mask in [Some(&mask), None] {
        let run = |fused: bool| {
            let (qv, kv, bv) = (
                Var::from_tensor(&q).unwrap(),
                Var::from_tensor(&k).unwrap(),
                Var::from_tensor(&bias).unwrap(),
            );
            let (qt, kt, bt) = (qv.as_tensor(), kv.as_tensor(), bv.as_tensor());
            let p = if fused {
                layers::attention_probabilities(qt, kt, bt, mask).unwrap()
            } else {
                layers::attention_probabilities_composite(qt, kt, bt, mask).unwrap()
            };
            let grads = (&p * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |t: &Tensor| grads.get(t).unwrap().clone();
            [p.clone(), grad(qt), grad(kt), grad(bt)]
        };
        let (a, c) = (run(true), run(false));
        for (i, what) in ["value", "∂q", "∂k", "∂bias"].iter().enumerate() {
            assert_same(
                &a[i],
                &c[i],
                &format!("attention {what} (mask {})", mask.is_some()),
            );
        }
    }
}

/// The attention op (`softmax(s·q kᵀ + B + M) v`, its node keeping `q`, `k`, `v` and `B` and
/// making the probabilities again in the backward pass) equals its candle composite in value and
/// in the gradients of the stacked `q, k, v` and the bias, with a mask per window position and
/// without.
#[test]
fn fused_attention_equals_its_composite() {
    let (b, h, n, d) = (6, 2, 9, 4);
    let qkv = seeded(&[3, b, h, n, d], 1.5, 20);
    let g = seeded(&[b, h, n, d], 1.0, 21);
    let bias = seeded(&[h, n, n], 3.0, 22);
    let mask = seeded(&[3, n, n], 3.0, 23);
    for mask in [Some(&mask), None] {
        let run = |fused: bool| {
            let (qv, bv) = (
                Var::from_tensor(&qkv).unwrap(),
                Var::from_tensor(&bias).unwrap(),
            );
            let (qt, bt) = (qv.as_tensor(), bv.as_tensor());
            let out = if fused {
                layers::attention(qt, bt, mask, 0.5).unwrap()
            } else {
                layers::attention_composite(qt, bt, mask, 0.5).unwrap()
            };
            let grads = (&out * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |t: &Tensor| grads.get(t).unwrap().clone();
            [out.clone(), grad(qt), grad(bt)]
        };
        let (a, c) = (run(true), run(false));
        for (i, what) in ["value", "∂qkv", "∂bias"].iter().enumerate() {
            assert_same(
                &a[i],
                &c[i],
                &format!("attention {what} (mask {})", mask.is_some()),
            );
        }
    }
}

/// The CPU group norm (the fused normalisation kernel on one row per sample and group, then
/// the per-channel affine) equals its candle composite in value and in the gradients of the
/// input, weight and bias, with groups of one channel, of several, and one group.
#[test]
fn fused_group_norm_equals_its_composite() {
    let x = seeded(&[2, 6, 3, 4, 5], 4.0, 10);
    let g = seeded(&[2, 6, 3, 4, 5], 1.0, 11);
    for groups in [6, 3, 1] {
        let run = |fused: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let w = Var::from_tensor(&seeded(&[6], 2.0, 12)).unwrap();
            let b = Var::from_tensor(&seeded(&[6], 1.0, 13)).unwrap();
            let (xt, wt, bt) = (xv.as_tensor(), w.as_tensor(), b.as_tensor());
            let y = if fused {
                layers::group_norm(xt, groups, Some(wt), Some(bt), 1e-5).unwrap()
            } else {
                layers::group_norm_composite(xt, groups, Some(wt), Some(bt), 1e-5).unwrap()
            };
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |t: &Tensor| grads.get(t).unwrap().clone();
            [y.clone(), grad(xt), grad(wt), grad(bt)]
        };
        let (a, b) = (run(true), run(false));
        for (i, what) in ["value", "∂x", "∂γ", "∂β"].iter().enumerate() {
            assert_same(
                &a[i],
                &b[i],
                &format!("group norm ({groups} groups) {what}"),
            );
        }
    }
}

/// The fused layer norm equals its candle composite in value and in the gradients of the input,
/// `γ` and `β`: rows of 37 and of 768 (UNETR's width, 300 rows: several blocks of the affine
/// gradients' sums), with and without the affine parameters, and rows far from zero.
#[test]
fn fused_layer_norm_equals_its_composite() {
    for (shape, offset, affine) in [
        (vec![3, 7, 37], 0.0, true),
        (vec![2, 150, 768], 0.0, true),
        (vec![4, 5, 24], 50.0, true),
        (vec![4, 5, 24], 0.0, false),
    ] {
        let c = *shape.last().unwrap();
        let x = (seeded(&shape, 2.0, 11) + offset).unwrap();
        let g = seeded(&shape, 1.0, 12);
        let (w, b) = (seeded(&[c], 1.5, 13), seeded(&[c], 1.0, 14));
        let run = |fused: bool| {
            let (xv, wv, bv) = (
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&w).unwrap(),
                Var::from_tensor(&b).unwrap(),
            );
            let (wt, bt) = (wv.as_tensor(), bv.as_tensor());
            let (wo, bo) = if affine {
                (Some(wt), Some(bt))
            } else {
                (None, None)
            };
            let y = if fused {
                layers::layer_norm(xv.as_tensor(), wo, bo, 1e-5).unwrap()
            } else {
                layers::layer_norm_composite(xv.as_tensor(), wo, bo, 1e-5).unwrap()
            };
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |t: &Tensor| grads.get(t).cloned();
            (y.clone(), grad(xv.as_tensor()).unwrap(), grad(wt), grad(bt))
        };
        let (a, b) = (run(true), run(false));
        let what = format!("layer norm {shape:?} offset {offset} affine {affine}");
        assert_same(&a.0, &b.0, &format!("{what}: value"));
        assert_same(&a.1, &b.1, &format!("{what}: ∂x"));
        if affine {
            assert_same(
                a.2.as_ref().unwrap(),
                b.2.as_ref().unwrap(),
                &format!("{what}: ∂γ"),
            );
            assert_same(
                a.3.as_ref().unwrap(),
                b.3.as_ref().unwrap(),
                &format!("{what}: ∂β"),
            );
        }
    }
}

/// The fused GELU equals candle's `gelu_erf` in value and gradient, over the range where the
/// curve bends (−6 … 6) and at large magnitudes.
#[test]
fn fused_gelu_equals_candle_gelu_erf() {
    for scale in [6.0, 40.0] {
        let x = seeded(&[2, 300, 97], scale, 15);
        let g = seeded(&[2, 300, 97], 1.0, 16);
        let run = |fused: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let y = if fused {
                layers::gelu(xv.as_tensor()).unwrap()
            } else {
                xv.as_tensor().gelu_erf().unwrap()
            };
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(xv.as_tensor()).unwrap().clone())
        };
        let (a, b) = (run(true), run(false));
        assert_same(&a.0, &b.0, &format!("gelu ±{scale}: value"));
        assert_same(&a.1, &b.1, &format!("gelu ±{scale}: gradient"));
    }
}
