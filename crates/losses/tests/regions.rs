//! The region form (one sigmoid output per region) against MONAI's losses with `sigmoid=True`
//! and a PyTorch transcription of the contour-weighted forms
//! (`scripts/fixtures/region_losses_fixtures.py`), values and gradients in f64; the region
//! contour maps against scipy bit for bit.

mod common;

use common::Fixtures;

use candle_core::{DType, Device, Tensor, Var};
use cwseg_losses::{ContourConfig, LossConfig, Regions, Target};

const CASES: [&str; 4] = ["brats_b2", "empty_region_b2", "image2d_b1", "extreme_b2"];
const LOSSES: [&str; 11] = [
    "ce",
    "dl",
    "cedl",
    "gdl",
    "tversky",
    "cwce",
    "cwce_reference",
    "sdl",
    "sdl_reference",
    "cwcd",
    "dwce",
];

fn regions() -> Regions {
    Regions::new(vec![vec![1, 2, 3], vec![1, 3], vec![3]], 4).expect("regions")
}

/// The loss a fixture key names, with the fixtures' contour (3-cube, 2 erosions).
fn loss_for(key: &str) -> Box<dyn cwseg_losses::Loss> {
    let (name, preset) = match key.strip_suffix("_reference") {
        Some(name) => (name, "reference"),
        None => (key, "paper"),
    };
    let json = match name {
        "cwce" | "sdl" | "cwcd" => {
            format!(r#"{{"name": "{name}", "preset": "{preset}", "contour": {{"iterations": 2}}}}"#)
        }
        _ => format!(r#"{{"name": "{name}"}}"#),
    };
    LossConfig::from_json(&json).expect("config").build()
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn region_losses_match_monai_sigmoid_and_pytorch() {
    let mut fx = Fixtures::open("regions.npz");
    let mut checked = 0;
    for case in CASES {
        let logits = fx.tensor::<f64>(&format!("{case}__logits"));
        let labels = fx.tensor::<i64>(&format!("{case}__labels"));
        let edges = fx.tensor::<u8>(&format!("{case}__edges"));
        // the maps given by a data pipeline, and computed by the loss itself
        for given in [true, false] {
            let mut target = Target::new(labels.clone()).unwrap().with_regions(regions());
            if given {
                target = target.with_edges(edges.clone());
            }
            for key in LOSSES {
                let prefix = format!("{case}__{key}");
                let want: f64 = fx
                    .tensor::<f64>(&format!("{prefix}__value"))
                    .to_scalar()
                    .unwrap();
                let want_grad = to_vec(&fx.tensor::<f32>(&format!("{prefix}__grad")));
                let z = Var::from_tensor(&logits).unwrap();
                let value = loss_for(key).forward(z.as_tensor(), &target).unwrap();
                let got: f64 = value.to_scalar().unwrap();
                let what = format!("{prefix} (maps given: {given})");
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "{what}: {got} vs reference {want}"
                );
                let grads = value.backward().unwrap();
                let grad = to_vec(grads.get(z.as_tensor()).expect("gradient"));
                let scale = want_grad.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (i, (g, w)) in grad.iter().zip(&want_grad).enumerate() {
                    assert!(
                        g.is_finite() && (g - w).abs() <= 1e-4 * (w.abs() + 1e-3 * scale) + 1e-12,
                        "{what}: gradient {i}: {g} vs {w}"
                    );
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * CASES.len() * LOSSES.len());
}

#[test]
fn region_contour_maps_equal_scipy_bit_for_bit() {
    let mut fx = Fixtures::open("regions.npz");
    let contour = ContourConfig {
        iterations: 2,
        ..ContourConfig::default()
    };
    for case in CASES {
        let labels = fx
            .tensor::<i64>(&format!("{case}__labels"))
            .to_dtype(DType::U32)
            .unwrap();
        let want = to_vec(&fx.tensor::<u8>(&format!("{case}__edges")));
        for on_cpu in [true, false] {
            let got = to_vec(&regions().edges(&labels, &contour, on_cpu).unwrap());
            assert_eq!(got, want, "{case}: region maps (cpu: {on_cpu}) vs scipy");
        }
    }
}

#[test]
fn losses_without_a_region_form_are_refused_by_name() {
    let logits = Tensor::zeros((1, 3, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let labels = Tensor::zeros((1, 4, 4, 4), DType::U32, &Device::Cpu).unwrap();
    let target = Target::new(labels).unwrap().with_regions(regions());
    for name in ["focal", "dicefocal", "boundary"] {
        let err = LossConfig::from_name(name)
            .unwrap()
            .build()
            .forward(&logits, &target)
            .expect_err(name)
            .to_string();
        assert!(err.contains("no region form"), "{name}: {err}");
    }
    let weighted = LossConfig::from_json(r#"{"name": "ce", "class_weights": [1, 1, 1, 1]}"#)
        .unwrap()
        .build();
    let err = weighted.forward(&logits, &target).unwrap_err().to_string();
    assert!(err.contains("class_weights"), "{err}");
    // three regions need three output channels
    let two = Tensor::zeros((1, 2, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let err = LossConfig::from_name("cwcd")
        .unwrap()
        .build()
        .forward(&two, &target)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 regions"), "{err}");
}
