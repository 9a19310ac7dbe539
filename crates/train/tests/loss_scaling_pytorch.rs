//! Dynamic loss scaling against PyTorch's `torch.amp.GradScaler` driving `Adam`
//! (`scripts/fixtures/optim_fixtures.py`): the same scaled gradients, with infinities and NaNs in some
//! steps, must skip the same steps and give the same scales, growth trackers, Adam step
//! counts and parameters.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use cwseg_train::optim::{DynamicScaling, LossScaler, Optimizer, OptimizerConfig};
use serde_json::Value;

fn number(v: &Value) -> f32 {
    match v {
        Value::String(s) => s.parse::<f32>().expect("inf, -inf or nan"),
        v => v.as_f64().expect("number") as f32,
    }
}

fn numbers(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(number).collect()
}

#[test]
fn skips_scales_and_steps_as_pytorch_grad_scaler() {
    let text = include_str!("fixtures/grad_scaler.json");
    let fixture: Value = serde_json::from_str(text).expect("fixture");
    let dev = Device::Cpu;
    for (k, case) in fixture["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .enumerate()
    {
        let mut scaler = LossScaler::new(DynamicScaling {
            init_scale: number(&case["init_scale"]),
            growth_factor: number(&case["growth_factor"]),
            backoff_factor: number(&case["backoff_factor"]),
            growth_interval: case["growth_interval"].as_u64().expect("interval") as u32,
        });
        let var = Var::from_tensor(&Tensor::new(numbers(&case["theta"]), &dev).expect("theta"))
            .expect("var");
        let config = OptimizerConfig {
            lr: case["lr"].as_f64().expect("lr"),
            ..OptimizerConfig::default()
        };
        let mut opt = Optimizer::new(config, vec![("p".into(), var.clone())]);
        let mut skipped = 0;
        for (i, step) in case["steps"].as_array().expect("steps").iter().enumerate() {
            // the backward pass of `sum(p · c) · s`: c · s in f32
            let c = Tensor::new(numbers(&step["c"]), &dev).expect("c");
            let scaled = c.affine(f64::from(scaler.scale()), 0.0).expect("scaled");
            // unscaling alone gives back the fixture's gradient (exactly for powers of two)
            let mut alone = GradStore::default();
            alone.insert(var.as_tensor(), scaled.clone());
            let finite = scaler.unscale(opt.vars(), &mut alone).expect("unscale");
            if finite {
                let got: Vec<f32> = alone
                    .get(var.as_tensor())
                    .expect("gradient")
                    .to_vec1()
                    .expect("values");
                for (a, b) in got.iter().zip(numbers(&step["c"])) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs(),
                        "case {k} step {i}: unscaled {a} against {b}"
                    );
                }
            }
            let mut grads = GradStore::default();
            grads.insert(var.as_tensor(), scaled);
            if !scaler.step(&mut opt, &mut grads).expect("step") {
                skipped += 1;
            }
            let at = format!("case {k} step {i}");
            assert_eq!(scaler.scale(), number(&step["scale"]), "{at}: scale");
            assert_eq!(
                u64::from(scaler.state().growth_tracker),
                step["growth_tracker"].as_u64().expect("tracker"),
                "{at}: growth tracker"
            );
            assert_eq!(
                opt.steps(),
                step["optimizer_steps"].as_u64().expect("steps"),
                "{at}: Adam's steps"
            );
            let got: Vec<f32> = var
                .as_tensor()
                .to_dtype(DType::F32)
                .and_then(|t| t.to_vec1())
                .expect("theta");
            for (a, b) in got.iter().zip(numbers(&step["theta"])) {
                assert!((a - b).abs() <= 1e-6, "{at}: parameter {a} against {b}");
            }
        }
        // each case has the steps it was made for: the comparison above saw them
        let expected_skips = [2, 3, 0][k];
        assert_eq!(skipped, expected_skips, "case {k}: skipped steps");
    }
}
