//! The trainer's Adam and AdamW against PyTorch's `torch.optim.Adam` / `AdamW`
//! (`scripts/fixtures/optim_fixtures.py`): three steps from the same parameters and gradients, on the
//! CPU in f32 (the in-place path) and in f64 (the composite of candle operations).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use cwseg_train::optim::{Optimizer, OptimizerConfig, OptimizerKind};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Runs one fixture case in `dtype`; the largest difference from PyTorch's parameters over the
/// steps, and how far the parameters moved.
fn run(case: &Value, dtype: DType) -> (f64, f64) {
    let kind = match case["kind"].as_str().expect("kind") {
        "adam" => OptimizerKind::Adam,
        _ => OptimizerKind::AdamW,
    };
    let betas = floats(&case["betas"]);
    let config = OptimizerConfig {
        kind,
        lr: case["lr"].as_f64().expect("lr"),
        weight_decay: case["weight_decay"].as_f64().expect("decay"),
        betas: [betas[0], betas[1]],
        eps: case["eps"].as_f64().expect("eps"),
        ..OptimizerConfig::default()
    };
    let dev = Device::Cpu;
    let tensor = |v: Vec<f64>| {
        Tensor::new(v, &dev)
            .and_then(|t| t.to_dtype(dtype))
            .expect("tensor")
    };
    let theta0 = floats(&case["theta"]);
    let var = Var::from_tensor(&tensor(theta0.clone())).expect("var");
    let mut opt = Optimizer::new(config, vec![("p".into(), var.clone())]);
    let (mut worst, mut moved) = (0f64, 0f64);
    let grads = case["grads"].as_array().expect("grads");
    let after = case["after"].as_array().expect("after");
    for (g, want) in grads.iter().zip(after) {
        let mut store = GradStore::default();
        store.insert(var.as_tensor(), tensor(floats(g)));
        opt.step(&store).expect("step");
        let got: Vec<f64> = var
            .as_tensor()
            .to_dtype(DType::F64)
            .and_then(|t| t.to_vec1())
            .expect("values");
        for ((a, b), t0) in got.iter().zip(floats(want)).zip(&theta0) {
            worst = worst.max((a - b).abs());
            moved = moved.max((b - t0).abs());
        }
    }
    (worst, moved)
}

#[test]
fn adam_and_adamw_match_pytorch() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/adam.json"
    ))
    .expect("fixture");
    let fx: Value = serde_json::from_str(&text).expect("json");
    for (i, case) in fx["cases"].as_array().expect("cases").iter().enumerate() {
        for dtype in [DType::F32, DType::F64] {
            let (worst, moved) = run(case, dtype);
            // f32 rounding of parameters near 1 is 6e-8 per operation
            assert!(worst <= 2e-6, "case {i} {dtype:?}: {worst} from PyTorch");
            assert!(
                moved >= 100.0 * 2e-6,
                "case {i}: the parameters moved only {moved}"
            );
        }
    }
}
