//! Loss scaling in the trainer, on a tiny phantom run on the CPU in f32: a power-of-two scale
//! multiplies and divides every gradient exactly, so a scaled run must end with the same bits
//! as an unscaled one; a scale so large that the gradients overflow must skip steps, back off,
//! and leave a checkpoint that resumes.

use std::path::Path;

use cwseg_train::{DynamicScaling, LossScaling, NoHooks, RunOptions, RunState, TrainConfig, train};

const TINY: &str = r#"
patch = [16, 16, 16]
batch_size = 2
epochs = 2
batches_per_epoch = 3
seed = 4
workers = 1

[data]
source = "synthetic"
val_fraction = 0.34

[data.synthetic]
train = 3
test = 0
seed = 50

[data.synthetic.phantom]
shape = [16, 24, 24]

[model]
name = "unet"
filters = 4
depth = 2

[loss]
name = "cwcd"

[validation]
postprocess = false
"#;

fn config(scaling: LossScaling) -> TrainConfig {
    let mut config: TrainConfig = toml::from_str(TINY).expect("config");
    config.loss_scaling = scaling;
    config
}

fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let map = candle_core::safetensors::load(
        dir.join("last/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("weights");
    let mut out: Vec<(String, Vec<f32>)> = map
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().and_then(|t| t.to_vec1()).expect("f32")))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn state(dir: &Path) -> RunState {
    serde_json::from_str(&std::fs::read_to_string(dir.join("last/state.json")).expect("state"))
        .expect("run state")
}

fn dynamic(init_scale: f32) -> LossScaling {
    LossScaling::Dynamic(DynamicScaling {
        init_scale,
        ..DynamicScaling::default()
    })
}

#[test]
fn a_power_of_two_scale_trains_the_same_bits_as_none() {
    let root = tempfile::tempdir().expect("tempdir");
    let (plain, scaled) = (root.path().join("plain"), root.path().join("scaled"));
    let options = RunOptions::default();
    train(&config(LossScaling::None), &plain, &options, &mut NoHooks).expect("plain run");
    train(&config(dynamic(1024.0)), &scaled, &options, &mut NoHooks).expect("scaled run");
    let (a, b) = (weights(&plain), weights(&scaled));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(
            x == y,
            "{name} differs between the scaled and the unscaled run"
        );
    }
    let s = state(&scaled);
    assert_eq!(s.skipped_steps, 0);
    assert_eq!(s.loss_scaler.map(|l| l.scale), Some(1024.0));
    assert!(state(&plain).loss_scaler.is_none());
}

#[test]
fn overflowing_gradients_skip_steps_back_off_and_resume() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("run");
    let huge = 2f32.powi(127);
    let first = config(dynamic(huge));
    train(&first, &dir, &RunOptions::default(), &mut NoHooks).expect("run");
    let s = state(&dir);
    assert!(
        s.skipped_steps >= 1,
        "no step was skipped at a scale of 2^127"
    );
    assert!(s.skipped_steps < 6, "every step was skipped");
    let scale = s.loss_scaler.expect("scaler state").scale;
    assert_eq!(scale, huge / 2f32.powi(s.skipped_steps as i32));
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics");
    let last: serde_json::Value =
        serde_json::from_str(metrics.lines().last().expect("a line")).expect("json");
    assert_eq!(last["skipped_steps"], s.skipped_steps);
    assert_eq!(last["loss_scale"].as_f64(), Some(f64::from(scale)));
    // one more epoch from the checkpoint: its skipped steps reconcile with the optimizer's
    let more = TrainConfig { epochs: 3, ..first };
    let resume = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    train(&more, &dir, &resume, &mut NoHooks).expect("resumed run");
    let s = state(&dir);
    assert_eq!(s.epoch, 3);
    assert!(s.loss_scaler.expect("scaler state").scale <= scale);
}
