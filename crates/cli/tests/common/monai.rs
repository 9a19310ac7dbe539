//! What the MONAI parity tests share: the fixtures folder (from `scripts/fixtures/monai*.py`),
//! `cwseg import monai`, `cwseg predict --probabilities`, and the comparison with MONAI's
//! sliding-window probabilities.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4};

use super::{ok, probabilities};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/monai")
}

pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `cwseg import monai --network NETWORK --args ARGS --weights WEIGHTS --out OUT EXTRA...`.
pub fn import_monai(network: &str, args: &str, weights: &str, out: &str, extra: &[&str]) {
    let mut command = vec![
        "import",
        "monai",
        "--network",
        network,
        "--args",
        args,
        "--weights",
        weights,
        "--out",
        out,
    ];
    command.extend_from_slice(extra);
    ok(&command);
}

/// MONAI's `(K, x, y, z)` probabilities as cwseg's `[K, z, y, x]`.
pub fn monai_probabilities(file: &Path) -> Array4<f32> {
    let p: Array4<f32> = ndarray_npy::read_npy(file).expect("probabilities.npy");
    p.permuted_axes([0, 3, 2, 1])
        .as_standard_layout()
        .to_owned()
}

/// `cwseg predict --probabilities` of `model` on `image`: the labels and the probabilities.
pub fn cwseg_predict(model: &Path, image: &Path, dir: &Path) -> (Array3<u8>, Array4<f32>) {
    let output = dir.join("prediction.nii.gz");
    ok(&[
        "predict",
        "--model",
        path(model),
        "--input",
        path(image),
        "--output",
        path(&output),
        "--probabilities",
    ]);
    let labels = cwseg_data::read_label(&output, &Default::default())
        .expect("labels")
        .data;
    (labels, probabilities(&output))
}

/// Probabilities within `tolerance`, and the labels equal wherever MONAI's top two classes are
/// more than `2 · tolerance` apart (elsewhere an argmax may flip within the tolerance).
pub fn assert_agrees(what: &str, labels: &Array3<u8>, cwseg: &Array4<f32>, monai: &Array4<f32>) {
    const TOLERANCE: f32 = 1e-4;
    assert_eq!(cwseg.shape(), monai.shape(), "{what}: shapes");
    let worst = cwseg
        .iter()
        .zip(monai)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        worst <= TOLERANCE,
        "{what}: probabilities differ by up to {worst}"
    );
    let (mut decided, mut differ) = (0, 0);
    for ((z, y, x), &label) in labels.indexed_iter() {
        let mut p: Vec<f32> = (0..monai.shape()[0]).map(|k| monai[[k, z, y, x]]).collect();
        let best = (0..p.len())
            .max_by(|&a, &b| p[a].total_cmp(&p[b]))
            .expect("classes");
        p.sort_by(f32::total_cmp);
        if p[p.len() - 1] - p[p.len() - 2] > 2.0 * TOLERANCE {
            decided += 1;
            differ += usize::from(usize::from(label) != best);
        }
    }
    assert_eq!(
        differ, 0,
        "{what}: {differ} of {decided} decided voxels labelled otherwise than MONAI"
    );
    assert!(
        decided * 100 >= labels.len() * 99,
        "{what}: only {decided} of {} voxels decided",
        labels.len()
    );
}

/// Every value of a tensor, as f64.
pub fn flat(t: &candle_core::Tensor) -> Vec<f64> {
    t.flatten_all()
        .and_then(|t| t.to_dtype(candle_core::DType::F64))
        .and_then(|t| t.to_vec1())
        .expect("values")
}

/// `cwseg export --format monai` of `model` into `exported` gives back the fixture `source`'s
/// state dict (`state.safetensors`) tensor for tensor (batch-norm counters by shape only) and
/// arguments that build the same network.
pub fn assert_exports_back(
    network: cwseg_models::monai::MonaiNetwork,
    source: &Path,
    model: &Path,
    exported: &Path,
) {
    let original =
        candle_core::safetensors::load(source.join("state.safetensors"), &candle_core::Device::Cpu)
            .expect("the fixture's state dict");
    assert_exports_state(network, &original, source, model, exported);
}

/// [`assert_exports_back`] against the state dict `original` (a fixture that stores its large
/// kernels as a formula rebuilds it first).
pub fn assert_exports_state(
    network: cwseg_models::monai::MonaiNetwork,
    original: &HashMap<String, candle_core::Tensor>,
    source: &Path,
    model: &Path,
    exported: &Path,
) {
    ok(&[
        "export",
        path(model),
        "--out",
        path(exported),
        "--format",
        "monai",
    ]);
    let back = candle_core::safetensors::load(
        exported.join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("the exported state dict");
    let mut names: Vec<_> = original.keys().collect();
    names.sort();
    let mut back_names: Vec<_> = back.keys().collect();
    back_names.sort();
    assert_eq!(names, back_names, "{}: tensor names", source.display());
    for name in names {
        assert_eq!(original[name].dims(), back[name].dims(), "{name}");
        // batch norms' counters are written back as 0 (they only steer momentum=None)
        if !name.ends_with("num_batches_tracked") {
            assert_eq!(flat(&original[name]), flat(&back[name]), "{name}");
        }
    }
    let read = |p: PathBuf| {
        let args: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).expect("args")).expect("json");
        cwseg_models::monai::from_monai_args(network, &args)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .config
    };
    assert_eq!(
        read(exported.join("args.json")),
        read(source.join("args.json"))
    );
}

/// `cwseg model --config ARGS_AS_CWSEG_CONFIG --json`'s parameter count for the imported
/// `model` folder equals MONAI's (`parameters.json` beside the fixture).
pub fn assert_parameter_count(model: &Path, source: &Path) {
    let config = std::fs::read_to_string(model.join("config.json")).expect("card");
    let card: serde_json::Value = serde_json::from_str(&config).expect("json");
    let network = card["model"].to_string();
    let out = ok(&["model", "--config", &network, "--json"]);
    let counted: serde_json::Value = serde_json::from_str(&out).expect("json");
    let monai: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(source.join("parameters.json")).expect("parameters.json"),
    )
    .expect("json");
    assert_eq!(
        counted["parameters"],
        monai["parameters"],
        "{}",
        source.display()
    );
}
