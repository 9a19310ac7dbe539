//! Skeleton Recall against a PyTorch transcription of the reference's `SoftSkeletonRecallLoss`
//! and MONAI's `DiceCELoss` (`scripts/fixtures/skeleton_recall_fixtures.py`), in f64: the
//! tubed skeletons equal the reference transform's (scikit-image), values within 1e-9
//! absolute, gradients (PyTorch autograd) within 1e-9 absolute of their largest entry.

mod common;

use common::Fixtures;

use candle_core::{DType, Device, Tensor, Var};
use cwseg_losses::{LossConfig, LossError, Regions, Target, skeleton_cpu};

const CASES: [&str; 6] = [
    "vessels_b2",
    "vessels_batch_b2",
    "absent_b2",
    "blobs_binary_b1",
    "slice2d_b2",
    "extreme_b1",
];

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `(value, gradient)` of the loss configured by `json` at `logits`.
fn run(json: &str, logits: &Tensor, target: &Target) -> (f64, Vec<f64>) {
    let z = Var::from_tensor(logits).unwrap();
    let loss = LossConfig::from_json(json).unwrap().build();
    let value = loss.forward(z.as_tensor(), target).unwrap();
    let grads = value.backward().unwrap();
    let grad = grads.get(z.as_tensor()).expect("gradient");
    (
        value.to_dtype(DType::F64).unwrap().to_scalar().unwrap(),
        values(grad),
    )
}

/// The largest absolute difference of two gradients, relative to the reference's largest entry.
fn gradient_difference(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-300);
    got.iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((g - w).abs()))
        / scale
}

#[test]
fn skeleton_maps_equal_the_reference_transform() {
    let mut fx = Fixtures::open("skeleton_recall.npz");
    for case in CASES {
        let labels = fx.tensor::<i64>(&format!("{case}__labels"));
        let want = values(&fx.tensor::<u8>(&format!("{case}__skeleton")));
        let got = values(&skeleton_cpu(&labels).unwrap());
        assert_eq!(got, want, "{case}");
    }
}

#[test]
fn values_and_gradients_match_the_reference() {
    let mut fx = Fixtures::open("skeleton_recall.npz");
    let (mut worst_value, mut worst_grad) = (0f64, 0f64);
    for case in CASES {
        let logits = fx.tensor::<f64>(&format!("{case}__logits"));
        let labels = fx.tensor::<i64>(&format!("{case}__labels"));
        let skeleton = fx.tensor::<u8>(&format!("{case}__skeleton"));
        let batch = fx
            .tensor::<f64>(&format!("{case}__batch"))
            .to_scalar::<f64>()
            .unwrap()
            == 1.0;
        let given = Target::new(labels.clone()).unwrap().with_skeleton(skeleton);
        let computed = Target::new(labels).unwrap();
        let configs = [
            (
                "sr",
                format!(r#"{{"name": "skeleton_recall", "batch": {batch}}}"#),
                1.0,
            ),
            (
                "compound",
                format!(
                    r#"{{"name": "dice_ce_skeleton_recall", "dice": {{"batch": {batch}}},
                         "skeleton": {{"batch": {batch}}}}}"#
                ),
                0.0,
            ),
        ];
        for (part, json, shift) in configs {
            let prefix = format!("{case}__{part}");
            let want: f64 = fx
                .tensor::<f64>(&format!("{prefix}__value"))
                .to_scalar()
                .unwrap();
            let want_grad = values(&fx.tensor::<f64>(&format!("{prefix}__grad")));
            for target in [&given, &computed] {
                let (got, grad) = run(&json, &logits, target);
                // the reference's SR is −mean R; this crate's is 1 − mean R
                let value_diff = (got - (want + shift)).abs();
                let grad_diff = gradient_difference(&grad, &want_grad);
                assert!(value_diff <= 1e-9, "{prefix}: {got} vs {}", want + shift);
                assert!(
                    grad_diff <= 1e-9,
                    "{prefix}: gradient off by {grad_diff:.1e}"
                );
                worst_value = worst_value.max(value_diff);
                worst_grad = worst_grad.max(grad_diff);
            }
        }
    }
    println!(
        "{} cases: largest value difference {worst_value:.1e}, gradient {worst_grad:.1e} (relative to the largest entry)",
        CASES.len()
    );
}

#[test]
fn refuses_regions_one_class_and_bad_skeletons() {
    let z = Tensor::zeros((1, 3, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::zeros((1, 2, 3, 4), DType::U32, &Device::Cpu).unwrap();
    for name in ["skeleton_recall", "dice_ce_skeleton_recall"] {
        let config = LossConfig::from_name(name).unwrap();
        assert!(
            !config.has_region_form() && config.uses_skeleton(),
            "{name}"
        );
        let loss = config.build();
        let regions = Target::new(y.clone())
            .unwrap()
            .with_regions(Regions::new(vec![vec![1, 2], vec![2]], 3).unwrap());
        let refused = loss.forward(&z, &regions);
        assert!(
            matches!(&refused, Err(LossError::Config { what, .. }) if what.contains("region")),
            "{name}: {refused:?}"
        );
        let one_class = Tensor::zeros((1, 1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            loss.forward(&one_class, &Target::new(y.clone()).unwrap()),
            Err(LossError::Config { .. })
        ));
        let out_of_range = Tensor::full(3u8, (1, 2, 3, 4), &Device::Cpu).unwrap();
        assert!(matches!(
            loss.forward(
                &z,
                &Target::new(y.clone()).unwrap().with_skeleton(out_of_range)
            ),
            Err(LossError::Label {
                classes: 3,
                found: 3
            })
        ));
        let wrong_shape = Tensor::zeros((1, 2, 3), DType::U8, &Device::Cpu).unwrap();
        assert!(matches!(
            loss.forward(
                &z,
                &Target::new(y.clone()).unwrap().with_skeleton(wrong_shape)
            ),
            Err(LossError::MapShape {
                map: "skeleton",
                ..
            })
        ));
    }
    let negative = LossConfig::from_json(r#"{"name": "skeleton_recall", "smooth": -1}"#);
    assert!(matches!(negative, Err(LossError::Config { .. })));
}
