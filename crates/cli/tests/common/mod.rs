//! Helpers shared by the binary's test files.
#![allow(dead_code)]

use std::process::{Command, Output};

pub mod monai;

/// Runs the binary.
pub fn cwseg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cwseg"))
        .args(args)
        .output()
        .expect("cwseg runs")
}

/// Runs it and asserts success; stdout.
pub fn ok(args: &[&str]) -> String {
    let out = cwseg(args);
    assert!(
        out.status.success(),
        "cwseg {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs it and asserts a clean error exit (1); stderr.
pub fn fails(args: &[&str]) -> String {
    let out = cwseg(args);
    assert!(!out.status.success(), "cwseg {args:?} should fail");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a clean error exit, not a panic (101)"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A run configuration small enough to train in a second: three 16×24×24 phantoms, a
/// 4-filter U-Net of depth 2, one epoch of one batch, with `LOSS` as the loss.
pub const TINY_RUN: &str = r#"
patch = [16, 16, 16]
batch_size = 2
epochs = 1
batches_per_epoch = 1
seed = 4
workers = 1

[data]
source = "synthetic"
val_fraction = 0.34

[data.synthetic]
train = 3
test = 1
seed = 50

[data.synthetic.phantom]
shape = [16, 24, 24]

[model]
name = "unet"
filters = 4
depth = 2

[loss]
name = "LOSS"

[validation]
postprocess = false
"#;

/// A path as the `&str` an argument list takes.
pub fn s(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8")
}

/// [`TINY_RUN`] with `loss`, written to `dir/tiny.toml`.
pub fn write_tiny_run(dir: &std::path::Path, loss: &str) -> std::path::PathBuf {
    let path = dir.join("tiny.toml");
    std::fs::write(&path, TINY_RUN.replace("LOSS", loss)).expect("config");
    path
}

/// The probabilities `predict --probabilities` wrote beside `output`, `[k, z, y, x]`.
#[allow(dead_code)] // not every test binary reads probabilities
pub fn probabilities(output: &std::path::Path) -> ndarray::Array4<f32> {
    let stem = output
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".nii.gz"))
        .expect("stem");
    let folder = output.with_file_name(format!("{stem}_probabilities"));
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&folder)
        .expect("probabilities")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let channels: Vec<ndarray::Array3<f32>> = files
        .iter()
        .map(|f| {
            cwseg_data::read_image(f, &cwseg_data::ReadOptions::default())
                .expect("read")
                .data
                .index_axis_move(ndarray::Axis(0), 0)
        })
        .collect();
    let views: Vec<_> = channels.iter().map(|c| c.view()).collect();
    ndarray::stack(ndarray::Axis(0), &views).expect("stack")
}
