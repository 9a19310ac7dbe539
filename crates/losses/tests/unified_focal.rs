//! The asymmetric unified focal loss against MONAI 1.6's `AsymmetricUnifiedFocalLoss`
//! (`scripts/fixtures/unified_focal_fixtures.py`), in f64: values within 1e-6 relative,
//! gradients (PyTorch autograd through the softmax) within 1e-4 relative.

mod common;

use common::Fixtures;

use candle_core::{DType, Device, Tensor, Var};
use cwseg_losses::{LossConfig, LossError, Target, UnifiedFocal};

const CASES: [&str; 5] = [
    "binary_b2",
    "empty_b2",
    "image2d_b2",
    "extreme_b1",
    "params_b1",
];

/// The case's loss configuration (`[weight, gamma, delta]` in the fixture), through JSON.
fn case_config(fx: &mut Fixtures, case: &str) -> LossConfig {
    let c = values(&fx.tensor::<f64>(&format!("{case}__config")));
    let json = format!(
        r#"{{"name": "unified_focal", "weight": {}, "gamma": {}, "delta": {}}}"#,
        c[0], c[1], c[2]
    );
    LossConfig::from_json(&json).expect("config")
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `(value, gradient)` of the loss at `logits`.
fn run(config: &LossConfig, logits: &Tensor, target: &Target) -> (f64, Vec<f64>) {
    let z = Var::from_tensor(logits).unwrap();
    let value = config.build().forward(z.as_tensor(), target).unwrap();
    let grads = value.backward().unwrap();
    let grad = grads.get(z.as_tensor()).expect("gradient");
    (
        value.to_dtype(DType::F64).unwrap().to_scalar().unwrap(),
        values(grad),
    )
}

#[test]
fn values_and_gradients_match_monai() {
    let mut fx = Fixtures::open("unified_focal.npz");
    let (mut worst_value, mut worst_grad) = (0f64, 0f64);
    for case in CASES {
        let logits = fx.tensor::<f64>(&format!("{case}__logits"));
        let target = Target::new(fx.tensor::<i64>(&format!("{case}__labels"))).unwrap();
        let config = case_config(&mut fx, case);
        let (got, grad) = run(&config, &logits, &target);
        let want: f64 = fx
            .tensor::<f64>(&format!("{case}__value"))
            .to_scalar()
            .unwrap();
        let rel = (got - want).abs() / want.abs().max(1e-12);
        assert!(rel <= 1e-6, "{case}: {got} vs MONAI {want}");
        let want_grad = values(&fx.tensor::<f64>(&format!("{case}__grad")));
        assert_eq!(grad.len(), want_grad.len(), "{case}");
        let scale = want_grad.iter().fold(0f64, |m, w| m.max(w.abs()));
        let mut diff = 0f64;
        for (i, (g, w)) in grad.iter().zip(&want_grad).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * (w.abs() + 1e-3 * scale) + 1e-15,
                "{case}: gradient {i}: {g} vs PyTorch {w} (largest {scale:.1e})"
            );
            diff = diff.max((g - w).abs() / scale.max(1e-300));
        }
        println!(
            "{case:12} value {got:.10} rel {rel:.1e}, gradient max |diff| / max |grad| {diff:.1e} (max |grad| {scale:.1e})"
        );
        (worst_value, worst_grad) = (worst_value.max(rel), worst_grad.max(diff));
    }
    println!("worst: value rel {worst_value:.1e}, gradient {worst_grad:.1e}");
}

#[test]
fn extreme_logits_stay_finite_in_f32() {
    let mut fx = Fixtures::open("unified_focal.npz");
    let target = Target::new(fx.tensor::<i64>("extreme_b1__labels")).unwrap();
    let logits = fx.tensor::<f64>("extreme_b1__logits");
    let config = LossConfig::from_name("unified_focal").unwrap();
    let (v64, _) = run(&config, &logits, &target);
    let (v32, grad) = run(&config, &logits.to_dtype(DType::F32).unwrap(), &target);
    assert!(v32.is_finite() && grad.iter().all(|g| g.is_finite()));
    assert!((v32 - v64).abs() <= 1e-5, "f32 {v32} vs f64 {v64}");
}

/// Perfect predictions of a large volume in f32 (the Tversky index rounds to 1 there) and
/// `δ` at the ends of its range keep the gradient finite.
#[test]
fn saturated_tversky_index_keeps_gradients_finite() {
    let (d, h, w) = (16, 64, 64);
    let labels: Vec<u32> = (0..d * h * w).map(|i| u32::from(i % w < w / 2)).collect();
    let labels = Tensor::from_vec(labels, (1, d, h, w), &Device::Cpu).unwrap();
    let perfect = Tensor::arange(0u32, 2, &Device::Cpu)
        .unwrap()
        .reshape((1, 2, 1, 1, 1))
        .unwrap()
        .broadcast_eq(&labels.unsqueeze(1).unwrap())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(60.0, -30.0)
        .unwrap();
    let background = Target::new(labels.zeros_like().unwrap()).unwrap();
    let target = Target::new(labels).unwrap();
    for delta in [0.0, 0.7, 1.0] {
        let config = LossConfig::UnifiedFocal(UnifiedFocal {
            delta,
            ..UnifiedFocal::default()
        });
        for target in [&target, &background] {
            let (value, grad) = run(&config, &perfect, target);
            assert!(value.is_finite(), "δ = {delta}: {value}");
            assert!(grad.iter().all(|g| g.is_finite()), "δ = {delta}: gradient");
        }
    }
}

#[test]
fn other_class_counts_regions_and_bad_settings_are_refused() {
    let y = Tensor::zeros((1, 2, 3, 4), DType::U32, &Device::Cpu).unwrap();
    let config = LossConfig::from_name("unified_focal").unwrap();
    assert!(!config.has_region_form());
    let loss = config.build();
    for k in [1, 3, 4] {
        let z = Tensor::zeros((1, k, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let refused = loss.forward(&z, &Target::new(y.clone()).unwrap());
        assert!(
            matches!(&refused, Err(LossError::Config { loss: "unified_focal", what }) if what.contains("binary")),
            "K = {k}: {refused:?}"
        );
    }
    let z = Tensor::zeros((1, 2, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let regions = cwseg_losses::Regions::new(vec![vec![1]], 2).unwrap();
    let region = loss.forward(&z, &Target::new(y.clone()).unwrap().with_regions(regions));
    assert!(
        matches!(region, Err(LossError::Config { .. })),
        "{region:?}"
    );
    for bad in [
        r#"{"name": "unified_focal", "weight": 1.5}"#,
        r#"{"name": "unified_focal", "gamma": 2}"#,
        r#"{"name": "unified_focal", "delta": -0.1}"#,
        r#"{"name": "unified_focal", "epsilon": 1e-5}"#,
    ] {
        let err = LossConfig::from_json(bad);
        assert!(
            matches!(err, Err(LossError::Config { .. })),
            "{bad}: {err:?}"
        );
    }
    let direct = UnifiedFocal {
        gamma: 1.5,
        ..UnifiedFocal::default()
    };
    let refused = cwseg_losses::Loss::forward(&direct, &z, &Target::new(y).unwrap());
    assert!(
        matches!(&refused, Err(LossError::Config { what, .. }) if what.contains("gamma")),
        "{refused:?}"
    );
    let defaults = LossConfig::from_json(r#"{"name": "unified_focal"}"#).unwrap();
    assert_eq!(defaults, LossConfig::UnifiedFocal(UnifiedFocal::default()));
    assert_eq!(
        (
            UnifiedFocal::default().weight,
            UnifiedFocal::default().gamma,
            UnifiedFocal::default().delta
        ),
        (0.5, 0.5, 0.7)
    );
}
