//! Finite differences, properties over random inputs, f32, configuration and bad input.

use candle_core::{DType, Device, Tensor, Var};
use cwseg_losses::{Kernels, LOSS_NAMES, LossConfig, LossError, Target};

/// A small seeded generator (no dependency): uniform in [0, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Blocky labels with every class present at least once where room allows.
fn labels(rng: &mut Lcg, n: usize, k: usize, dims: [usize; 3]) -> Tensor {
    let [d, h, w] = dims;
    let offset = (rng.next() * 5.0) as usize;
    let values: Vec<u32> = (0..n * d * h * w)
        .map(|i| {
            let (z, y, x) = ((i / (h * w)) % d, (i / w) % h, i % w);
            ((z / 2 + y / 3 + x / 2 + offset + i / (d * h * w)) % k) as u32
        })
        .collect();
    Tensor::from_vec(values, (n, d, h, w), &Device::Cpu).unwrap()
}

fn logits(
    rng: &mut Lcg,
    shape: (usize, usize, usize, usize, usize),
    scale: f64,
    dtype: DType,
) -> Tensor {
    let count = shape.0 * shape.1 * shape.2 * shape.3 * shape.4;
    let values: Vec<f64> = (0..count)
        .map(|_| (rng.next() * 2.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Losses defined for two classes only (they refuse any other number with a `Config` error).
const BINARY_ONLY: [&str; 1] = ["unified_focal"];

fn value_and_grad(name: &str, z: &Tensor, target: &Target) -> (f64, Tensor) {
    let var = Var::from_tensor(z).unwrap();
    let loss = LossConfig::from_name(name).unwrap().build();
    let value = loss.forward(var.as_tensor(), target).unwrap();
    let grads = value.backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("gradient").clone();
    (value.to_dtype(DType::F64).unwrap().to_scalar().unwrap(), g)
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    let mut rng = Lcg(1);
    let mut inputs = Vec::new();
    for k in [3, 2] {
        let shape = (2, k, 4, 5, 6);
        let z = logits(&mut rng, shape, 2.0, DType::F64);
        inputs.push((shape, z, labels(&mut rng, 2, k, [4, 5, 6])));
    }
    for kernels in [Kernels::Auto, Kernels::Composite] {
        for name in LOSS_NAMES {
            let (shape, z, y) = &inputs[usize::from(BINARY_ONLY.contains(&name))];
            let (shape, flat) = (*shape, z.flatten_all().unwrap().to_vec1::<f64>().unwrap());
            let target = Target::new(y.clone()).unwrap().with_kernels(kernels);
            let (_, grad) = value_and_grad(name, z, &target);
            let grad: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            let loss = LossConfig::from_name(name).unwrap().build();
            let eval = |values: &[f64]| -> f64 {
                let t = Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap();
                loss.forward(&t, &target).unwrap().to_scalar().unwrap()
            };
            for _ in 0..12 {
                let i = (rng.next() * flat.len() as f64) as usize;
                let h = 1e-5;
                let (mut plus, mut minus) = (flat.clone(), flat.clone());
                plus[i] += h;
                minus[i] -= h;
                let numeric = (eval(&plus) - eval(&minus)) / (2.0 * h);
                assert!(
                    (numeric - grad[i]).abs() <= 1e-6 + 1e-4 * numeric.abs(),
                    "{name} ({kernels:?}) at {i}: autograd {} vs finite difference {numeric}",
                    grad[i]
                );
            }
        }
    }
}

#[test]
fn losses_are_finite_non_negative_and_small_for_perfect_predictions() {
    let mut rng = Lcg(7);
    for trial in 0..12 {
        let n = 1 + trial % 3;
        let k = [2, 3, 4, 16][trial % 4];
        let dims = [[1, 9, 8], [5, 6, 7], [3, 8, 8]][trial % 3];
        let scale = [1.0, 10.0, 1e4][trial % 3];
        let y = labels(&mut rng, n, k, dims);
        let z = logits(
            &mut rng,
            (n, k, dims[0], dims[1], dims[2]),
            scale,
            DType::F32,
        );
        let perfect = candle_core::Tensor::arange(0u32, k as u32, &Device::Cpu)
            .unwrap()
            .reshape((1, k, 1, 1, 1))
            .unwrap()
            .broadcast_eq(&y.unsqueeze(1).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(40.0, -20.0)
            .unwrap();
        let target = Target::new(y).unwrap();
        for name in LOSS_NAMES {
            let what = format!("{name}, trial {trial} (N={n}, K={k}, {dims:?}, logits ±{scale})");
            if BINARY_ONLY.contains(&name) && k != 2 {
                let refused = LossConfig::from_name(name)
                    .unwrap()
                    .build()
                    .forward(&z, &target);
                assert!(matches!(refused, Err(LossError::Config { .. })), "{what}");
                continue;
            }
            let (value, grad) = value_and_grad(name, &z, &target);
            assert!(value.is_finite(), "{what}: {value}");
            let g: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
            assert!(g.iter().all(|v| v.is_finite()), "{what}: gradient");
            if name != "boundary" {
                assert!(value >= -1e-6, "{what}: negative {value}");
                let (best, _) = value_and_grad(name, &perfect, &target);
                assert!(
                    best <= value + 1e-6,
                    "{what}: perfect {best} above random {value}"
                );
                assert!(
                    best < 1e-3 || name == "dwce",
                    "{what}: perfect prediction gives {best}"
                );
            }
        }
    }
}

#[test]
fn all_background_and_single_class_batches_stay_finite() {
    let mut rng = Lcg(3);
    for k in [1usize, 2, 5] {
        let y = Tensor::zeros((2, 3, 4, 5), DType::U32, &Device::Cpu).unwrap();
        let z = logits(&mut rng, (2, k, 3, 4, 5), 3.0, DType::F32);
        let target = Target::new(y).unwrap();
        for name in LOSS_NAMES {
            let loss = LossConfig::from_name(name).unwrap().build();
            match loss.forward(&z, &target) {
                Ok(v) => {
                    let (value, grad) = value_and_grad(name, &z, &target);
                    assert!(
                        value.is_finite() && v.to_scalar::<f32>().unwrap().is_finite(),
                        "{name}, K={k}"
                    );
                    let g: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
                    assert!(g.iter().all(|v| v.is_finite()), "{name}, K={k}: gradient");
                }
                // A dice loss without background needs a foreground class to exist.
                // … and a binary-only loss needs two classes.
                Err(LossError::Config { .. }) => assert!(
                    k == 1 || (BINARY_ONLY.contains(&name) && k != 2),
                    "{name} refused K={k}"
                ),
                Err(e) => panic!("{name}, K={k}: {e}"),
            }
        }
    }
}

#[test]
fn f32_fast_path_agrees_with_f64() {
    let mut rng = Lcg(5);
    let mut inputs = Vec::new();
    for k in [5, 2] {
        let z = logits(&mut rng, (2, k, 6, 7, 8), 4.0, DType::F64);
        inputs.push((z, Target::new(labels(&mut rng, 2, k, [6, 7, 8])).unwrap()));
    }
    for name in LOSS_NAMES {
        let (z, target) = &inputs[usize::from(BINARY_ONLY.contains(&name))];
        let (v64, g64) = value_and_grad(name, z, target);
        let (v32, g32) = value_and_grad(name, &z.to_dtype(DType::F32).unwrap(), target);
        assert!(
            (v64 - v32).abs() <= 1e-5 * v64.abs().max(1.0),
            "{name}: f32 {v32} vs f64 {v64}"
        );
        let a: Vec<f64> = g64.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = g32.flatten_all().unwrap().to_vec1().unwrap();
        let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - *y as f64).abs() <= 1e-4 * scale + 1e-7,
                "{name}: gradient {y} vs {x}"
            );
        }
    }
}

#[test]
fn configuration_by_name_and_json() {
    for name in LOSS_NAMES {
        let config = LossConfig::from_name(name).unwrap();
        assert_eq!(config.build().name(), name);
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(
            LossConfig::from_json(&json).unwrap(),
            config,
            "{name} round trip"
        );
    }
    let cwcd = LossConfig::from_json(
        r#"{"name": "cwcd", "lambda": 2.0, "preset": "reference", "contour": {"kernel": 2}}"#,
    )
    .unwrap();
    match cwcd {
        LossConfig::Cwcd(c) => {
            assert_eq!(
                (c.lambda, c.alpha, c.contour.kernel, c.contour.iterations),
                (2.0, 0.5, 2, 6)
            );
            assert_eq!(c.preset, cwseg_losses::Preset::Reference);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(LossConfig::from_name("dice"), Err(LossError::UnknownLoss(n)) if n == "dice"));
    // numbers out of range are refused when parsed (as `cwseg loss --config` and train read it)
    let negative = LossConfig::from_json(r#"{"name": "cwcd", "lambda": -1}"#);
    assert!(
        matches!(&negative, Err(LossError::Config { what, .. }) if what.contains("lambda")),
        "{negative:?}"
    );
    let typo = LossConfig::from_json(r#"{"name": "cwce", "lamda": 2.0}"#);
    assert!(
        matches!(&typo, Err(LossError::Config { what, .. }) if what.contains("lamda")),
        "{typo:?}"
    );
}

#[test]
fn bad_input_is_an_error() {
    let z = Tensor::zeros((1, 3, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let loss = LossConfig::from_name("cwcd").unwrap().build();
    let out_of_range = Tensor::full(3u32, (1, 2, 3, 4), &Device::Cpu).unwrap();
    assert!(matches!(
        loss.forward(&z, &Target::new(out_of_range).unwrap()),
        Err(LossError::Label {
            classes: 3,
            found: 3
        })
    ));
    let negative = Tensor::full(-1i64, (1, 2, 3, 4), &Device::Cpu).unwrap();
    assert!(matches!(
        loss.forward(&z, &Target::new(negative).unwrap()),
        Err(LossError::Label { found: -1, .. })
    ));
    let wrong_shape = Tensor::zeros((1, 2, 3, 5), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(
        loss.forward(&z, &Target::new(wrong_shape).unwrap()),
        Err(LossError::Shape { .. })
    ));
    let y = Tensor::zeros((1, 2, 3, 4), DType::U32, &Device::Cpu).unwrap();
    let bad_map = Target::new(y.clone())
        .unwrap()
        .with_edges(Tensor::zeros((1, 2, 3), DType::U8, &Device::Cpu).unwrap());
    assert!(matches!(
        loss.forward(&z, &bad_map),
        Err(LossError::MapShape { map: "edge", .. })
    ));
    assert!(matches!(
        Target::new(Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap()),
        Err(LossError::LabelType(DType::F32))
    ));
    // a zero kernel is refused when the configuration is read, and by the loss itself
    assert!(matches!(
        LossConfig::from_json(r#"{"name": "sdl", "contour": {"kernel": 0}}"#),
        Err(LossError::Config { loss: "sdl", .. })
    ));
    let zero_kernel = cwseg_losses::SeparableDice {
        contour: cwseg_losses::ContourConfig {
            kernel: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(matches!(
        cwseg_losses::Loss::forward(&zero_kernel, &z, &Target::new(y).unwrap()),
        Err(LossError::Config { loss: "sdl", .. })
    ));
}

/// Per-axis erosions (the band in millimetres on anisotropic grids): the online maps equal
/// cwseg-morphology's (which equal scipy's box erosion, `cuboid_erosion_and_contours_match_scipy`
/// in cwseg-morphology), and equal per-axis counts are the plain `iterations`.
#[test]
fn per_axis_contour_bands_agree_online_and_on_the_cpu() {
    use cwseg_losses::{ContourConfig, edges_cpu, edges_online};
    let labels: Vec<u32> = (0..2 * 9 * 11 * 13)
        .map(|i| ((i * 7919 + i / 13 * 31) % 97 / 30) as u32)
        .collect();
    let labels = candle_core::Tensor::from_vec(labels, (2, 9, 11, 13), &candle_core::Device::Cpu)
        .expect("labels");
    let to_vec = |t: candle_core::Tensor| -> Vec<u8> {
        t.flatten_all().expect("flat").to_vec1().expect("u8")
    };
    for n in [[1, 2, 3], [3, 1, 2], [2, 2, 2]] {
        let contour = ContourConfig {
            iterations_per_axis: Some(n),
            ..ContourConfig::default()
        };
        let online = to_vec(edges_online(&labels, &contour).expect("online"));
        let cpu = to_vec(edges_cpu(&labels, &contour).expect("cpu"));
        assert_eq!(online, cpu, "{n:?}");
        if n[0] == n[1] && n[1] == n[2] {
            let plain = ContourConfig {
                iterations: n[0],
                ..ContourConfig::default()
            };
            assert_eq!(cpu, to_vec(edges_cpu(&labels, &plain).expect("cpu")));
        }
    }
    let even = ContourConfig {
        kernel: 2,
        iterations_per_axis: Some([1, 2, 3]),
        ..ContourConfig::default()
    };
    assert!(edges_cpu(&labels, &even).is_err());
    // a configuration is refused when it is read, not at the first training step
    for bad in [
        r#"{"name": "cwcd", "contour": {"iterations_per_axis": [0, 2, 2]}}"#,
        r#"{"name": "sdl", "contour": {"iterations_per_axis": [1, 2, 2], "element": "cross"}}"#,
    ] {
        let err = LossConfig::from_json(bad).expect_err(bad).to_string();
        assert!(err.contains("iterations_per_axis"), "{err}");
    }
}
