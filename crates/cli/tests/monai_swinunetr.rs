//! `cwseg import monai --network swinunetr` and the export back, against MONAI's own outputs
//! (fixtures from `scripts/fixtures/monai_swinunetr_fixtures.py`): SwinUNETR v1 with a
//! non-cubic window on a non-cubic volume, and v2 (`mergingv2`, patch norm) on a volume MONAI
//! pads to the window, predict MONAI's probabilities within 1e-4; the export gives back
//! MONAI's state dict; `cwseg model` counts MONAI's parameters; arguments cwseg cannot honour
//! are refused by name.
//!
//! The kernels and linear maps are not stored (SwinUNETR's convolution blocks make even the
//! smallest network 15 MB): they are made by the fixture script's formula, repeated here bit
//! for bit; `small.safetensors` holds the rest.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cwseg_models::ModelConfig;
use cwseg_models::monai::{MonaiNetwork, from_monai_args};

mod common;
use common::monai::{
    assert_agrees, assert_exports_state, cwseg_predict, fixtures, import_monai,
    monai_probabilities, path,
};
use common::{fails, ok};

/// The fixtures: folder, image, and the sliding window `Z,Y,X` (MONAI's roi reversed).
const FIXTURES: [(&str, &str, &str); 2] = [
    ("swinunetr", "swinunetr/image.nii.gz", "32,32,64"),
    ("swinunetr_v2", "image.nii.gz", "32,64,32"),
];

fn read_json(file: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("json")
}

fn config_of(args: &Path) -> ModelConfig {
    from_monai_args(MonaiNetwork::Swinunetr, &read_json(args))
        .expect("SwinUNETR arguments")
        .config
}

/// The formula of `scripts/fixtures/monai_fixtures.py`: He-uniform values from splitmix64 of
/// the name's FNV-1a hash plus the index (fan-in `shape[1] · Π shape[2..]`).
fn formula_weights(name: &str, shape: &[usize]) -> Vec<f32> {
    let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
    for b in name.bytes() {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
    }
    let fan_in = (shape[1] * shape[2..].iter().product::<usize>()) as f64;
    let bound = (6.0 / fan_in).sqrt();
    (0..shape.iter().product::<usize>() as u64)
        .map(|i| {
            let mut z = hash.wrapping_add(i).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 * 2f64.powi(-53) * 2.0 - 1.0;
            (u * bound) as f32
        })
        .collect()
}

/// MONAI's whole state dict of a fixture: every `.weight` of rank ≥ 2 by the formula, the
/// rest (buffers included) from `small.safetensors`.
fn monai_state(source: &Path) -> HashMap<String, Tensor> {
    let vars = VarMap::new();
    config_of(&source.join("args.json"))
        .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
        .expect("SwinUNETR");
    let mut state = candle_core::safetensors::load(source.join("small.safetensors"), &Device::Cpu)
        .expect("small");
    for (name, t) in cwseg_models::weights::tensors(&vars).expect("tensors") {
        if name.ends_with(".weight") && t.rank() >= 2 {
            let values = formula_weights(&name, t.dims());
            let tensor = Tensor::from_vec(values, t.dims(), &Device::Cpu).expect("tensor");
            assert!(
                state.insert(name.clone(), tensor).is_none(),
                "{name} stored"
            );
        }
    }
    state
}

/// `import monai` of fixture `name` (its state written whole to `dir`) as `dir/name`.
fn import_fixture(name: &str, patch: &str, dir: &Path) -> std::path::PathBuf {
    let source = fixtures().join(name);
    let weights = dir.join(format!("{name}.safetensors"));
    candle_core::safetensors::save(&monai_state(&source), &weights).expect("state dict");
    let model = dir.join(name);
    import_monai(
        "swinunetr",
        path(&source.join("args.json")),
        path(&weights),
        path(&model),
        &["--patch", patch],
    );
    model
}

#[test]
fn imported_swinunetrs_predict_monais_probabilities() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, image, patch) in FIXTURES {
        let model = import_fixture(name, patch, tmp.path());
        let dir = tmp.path().join(format!("{name}-prediction"));
        std::fs::create_dir(&dir).expect("mkdir");
        let (labels, p) = cwseg_predict(&model, &fixtures().join(image), &dir);
        let monai = monai_probabilities(&fixtures().join(name).join("probabilities.npy"));
        let worst = p
            .iter()
            .zip(&monai)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        eprintln!("{name}: probabilities within {worst:e} of MONAI's");
        assert_agrees(name, &labels, &p, &monai);
    }
}

#[test]
fn export_gives_back_monais_state_dict_and_arguments() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, _, patch) in FIXTURES {
        let source = fixtures().join(name);
        let model = import_fixture(name, patch, tmp.path());
        let exported = tmp.path().join(format!("{name}-for-monai"));
        let original = monai_state(&source);
        assert_exports_state(
            MonaiNetwork::Swinunetr,
            &original,
            &source,
            &model,
            &exported,
        );
    }
}

#[test]
fn model_counts_monais_parameters() {
    for (name, _, patch) in FIXTURES {
        let source = fixtures().join(name);
        let json = serde_json::to_string(&config_of(&source.join("args.json"))).expect("config");
        let report: serde_json::Value = serde_json::from_str(&ok(&[
            "model", "--config", &json, "--size", patch, "--json",
        ]))
        .expect("json");
        let monai = read_json(&source.join("parameters.json"));
        eprintln!(
            "{name}: cwseg {} parameters, MONAI {} (and {} index buffer values)",
            report["parameters"], monai["parameters"], monai["relative_position_index"]
        );
        assert_eq!(report["parameters"], monai["parameters"], "{name}");
    }
}

#[test]
fn swinunetr_arguments_cwseg_lacks_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = fixtures().join("swinunetr");
    let weights = tmp.path().join("state.safetensors");
    candle_core::safetensors::save(&monai_state(&source), &weights).expect("state dict");
    for (key, value, needle) in [
        ("use_hyena", "true", "use_hyena"),
        ("hyena_stages", "[true, false, true, false]", "hyena_stages"),
        ("norm_name", "\"group\"", "norm_name"),
        (
            "norm_name",
            "[\"instance\", {\"affine\": true}]",
            "norm_name",
        ),
        ("spatial_dims", "2", "spatial_dims"),
        ("feature_size", "16", "feature_size"),
        ("num_heads", "[1, 5, 2, 4]", "num_heads[1]"),
        ("depths", "[2, 2, 2]", "depths"),
        ("patch_size", "4", "patch_size"),
        ("downsample", "\"conv\"", "downsample"),
        ("norm_layer", "\"BatchNorm3d\"", "norm_layer"),
        ("window_size", "[5, 4]", "window_size"),
        ("classification", "true", "classification"),
        // weights of another window: the bias tables' shapes differ
        ("window_size", "[4, 4, 4]", "wrong shapes"),
    ] {
        let mut args = read_json(&source.join("args.json"));
        args[key] = serde_json::from_str(value).expect("value");
        let case = format!("{key}-{}", value.len());
        let file = tmp.path().join(format!("{case}.json"));
        std::fs::write(&file, args.to_string()).expect("write");
        let out = tmp.path().join(&case);
        let message = fails(&[
            "import",
            "monai",
            "--network",
            "swinunetr",
            "--args",
            path(&file),
            "--weights",
            path(&weights),
            "--out",
            path(&out),
            "--patch",
            "32,32,64",
        ]);
        assert!(message.contains(needle), "{key}: {message}");
        assert!(!out.exists(), "{key}: nothing written");
    }
    // accepted: options that change neither the network nor its prediction
    let mut args = read_json(&source.join("args.json"));
    for (key, value) in [
        ("use_flash_attention", "true"),
        ("use_checkpoint", "true"),
        ("img_size", "[64, 32, 32]"),
        ("hyena_stages", "[false, false, false, false]"),
        ("hyena_kernel_size", "5"),
        ("dropout_path_rate", "0.1"),
    ] {
        args[key] = serde_json::from_str(value).expect("value");
    }
    let import = from_monai_args(MonaiNetwork::Swinunetr, &args).expect("accepted");
    assert_eq!(import.notes.len(), 3, "{:?}", import.notes);
}
