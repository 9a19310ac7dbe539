//! Values and gradients against MONAI and a PyTorch transcription of formulas §2–4
//! (`scripts/fixtures/losses_fixtures.py`), in f64.

mod common;

use common::Fixtures;

use candle_core::{DType, Tensor, Var};
use cwseg_losses::{
    ContourConfig, ContourWeightedCrossEntropy, ContourWeightedDice, CrossEntropy, Kernels, Loss,
    LossConfig, Preset, SeparableDice, Target, edges_cpu, edges_online,
};

const CASES: [&str; 6] = [
    "binary_b1",
    "four_b4",
    "sixteen_empty_b2",
    "image2d_b2",
    "extreme_b2",
    "background_b1",
];

/// The loss a fixture key names.
fn loss_for(key: &str, classes: usize) -> Box<dyn Loss> {
    match key {
        "ce_weighted" => Box::new(CrossEntropy {
            class_weights: Some(
                (0..classes)
                    .map(|i| 0.5 + 1.5 * i as f64 / (classes - 1) as f64)
                    .collect(),
            ),
            ignore_index: None,
        }),
        "ce_ignore" => Box::new(CrossEntropy {
            class_weights: None,
            ignore_index: Some(1),
        }),
        "cwce_reference" => Box::new(ContourWeightedCrossEntropy {
            preset: Preset::Reference,
            ..Default::default()
        }),
        "sdl_reference" => Box::new(SeparableDice {
            preset: Preset::Reference,
            ..Default::default()
        }),
        "cwcd_reference" => Box::new(ContourWeightedDice {
            preset: Preset::Reference,
            ..Default::default()
        }),
        name => LossConfig::from_name(name).expect("loss name").build(),
    }
}

fn assert_grad_close(got: &Tensor, want: &Tensor, what: &str) {
    let got: Vec<f64> = got
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f64> = want
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g.is_finite(), "{what}: gradient {i} is {g}");
        assert!(
            (g - w).abs() <= 1e-4 * (w.abs() + 1e-3 * scale) + 1e-12,
            "{what}: gradient {i}: {g} vs PyTorch {w} (scale {scale})"
        );
    }
}

#[test]
fn values_and_gradients_match_monai_and_pytorch() {
    let mut fx = Fixtures::open("losses.npz");
    let keys = [
        "ce",
        "ce_weighted",
        "ce_ignore",
        "dl",
        "gdl",
        "cedl",
        "tversky",
        "focal",
        "dicefocal",
        "cwce",
        "cwce_reference",
        "sdl",
        "sdl_reference",
        "cwcd",
        "cwcd_reference",
        "dwce",
        "boundary",
    ];
    let mut checked = 0;
    for case in CASES {
        let logits = fx.tensor::<f64>(&format!("{case}__logits"));
        let labels = fx.tensor::<i64>(&format!("{case}__labels"));
        let classes = logits.dim(1).unwrap();
        for kernels in [Kernels::Auto, Kernels::Composite] {
            let target = Target::new(labels.clone()).unwrap().with_kernels(kernels);
            for key in keys {
                let prefix = format!("{case}__{key}");
                if !fx.has(&format!("{prefix}__value")) {
                    continue;
                }
                let want: f64 = fx
                    .tensor::<f64>(&format!("{prefix}__value"))
                    .to_scalar()
                    .unwrap();
                let want_grad = fx.tensor::<f32>(&format!("{prefix}__grad"));
                let z = Var::from_tensor(&logits).unwrap();
                let value = loss_for(key, classes)
                    .forward(z.as_tensor(), &target)
                    .unwrap();
                let got: f64 = value.to_scalar().unwrap();
                let what = format!("{prefix} ({kernels:?})");
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1e-3),
                    "{what}: {got} vs reference {want}"
                );
                let grads = value.backward().unwrap();
                let grad = grads.get(z.as_tensor()).expect("gradient");
                assert_grad_close(grad, &want_grad, &what);
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * CASES.len() * 17);
}

#[test]
fn online_and_cpu_contour_maps_equal_scipy_bit_for_bit() {
    let mut fx = Fixtures::open("losses.npz");
    for case in CASES {
        let labels = fx
            .tensor::<i64>(&format!("{case}__labels"))
            .to_dtype(DType::U32)
            .unwrap();
        let want: Vec<u8> = fx
            .tensor::<u8>(&format!("{case}__edges"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let spec = ContourConfig::default();
        let online: Vec<u8> = edges_online(&labels, &spec)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let cpu: Vec<u8> = edges_cpu(&labels, &spec)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(online, want, "{case}: online vs scipy");
        assert_eq!(cpu, want, "{case}: cwseg-morphology vs scipy");
    }
}
