//! `cwseg import monai` and `cwseg export --format monai` against MONAI's own outputs
//! (fixtures from `scripts/fixtures/monai_fixtures.py`): on orientation-sensitive, non-cubic volumes the
//! imported model predicts MONAI's labels with probabilities within 1e-4, and the export gives
//! back MONAI's state dict.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cwseg_models::monai::{MonaiNetwork, from_monai_args};

mod common;
use common::monai::{
    assert_agrees, assert_exports_back, cwseg_predict, fixtures, flat, import_monai,
    monai_probabilities, path,
};
use common::{fails, ok};

/// `import monai` of the UNETR fixture folder `fixture` (its `args.json` and
/// `state.safetensors`) into `out`, with `extra` flags.
fn import_unetr_fixture(fixture: &str, out: &Path, extra: &[&str]) {
    let source = fixtures().join(fixture);
    import_monai(
        "unetr",
        path(&source.join("args.json")),
        path(&source.join("state.safetensors")),
        path(out),
        extra,
    );
}

#[test]
fn an_imported_unetr_predicts_monais_labels() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("unetr");
    let source = fixtures().join("unetr");
    import_unetr_fixture("unetr", &model, &["--mode", "gaussian"]);
    let (labels, p) = cwseg_predict(&model, &fixtures().join("image.nii.gz"), tmp.path());
    assert_agrees(
        "UNETR, one window",
        &labels,
        &p,
        &monai_probabilities(&source.join("probabilities.npy")),
    );
    // the rods along x and along z are told apart, as in MONAI
    let truth = cwseg_data::read_label(fixtures().join("truth.nii.gz"), &Default::default())
        .expect("truth")
        .data;
    for class in [1u8, 2] {
        let both = labels
            .iter()
            .zip(&truth)
            .filter(|(a, b)| **a == class && **b == class)
            .count();
        let sum = labels.iter().filter(|&&a| a == class).count()
            + truth.iter().filter(|&&b| b == class).count();
        assert!(
            2 * both * 100 >= 95 * sum,
            "class {class}: Dice {}",
            2.0 * both as f64 / sum as f64
        );
    }
    let large = tmp.path().join("large");
    std::fs::create_dir(&large).expect("mkdir");
    let (labels, p) = cwseg_predict(&model, &fixtures().join("image_large.nii.gz"), &large);
    assert_agrees(
        "UNETR, Gaussian-blended windows",
        &labels,
        &p,
        &monai_probabilities(&source.join("probabilities_large.npy")),
    );
    // MONAI's default mode, "constant" (the plain mean of the overlapping windows' logits),
    // is the import's default too
    let constant = tmp.path().join("unetr-constant");
    import_unetr_fixture("unetr", &constant, &[]);
    let dir = tmp.path().join("constant");
    std::fs::create_dir(&dir).expect("mkdir");
    let (labels, p) = cwseg_predict(&constant, &fixtures().join("image_large.nii.gz"), &dir);
    assert_agrees(
        "UNETR, constant-weighted windows",
        &labels,
        &p,
        &monai_probabilities(&source.join("probabilities_large_constant.npy")),
    );
}

/// MONAI's UNETR with `norm_name="batch"` (affine batch norms with running statistics in every
/// convolution block) imports as cwseg's `UnetrNorm::Batch` and predicts MONAI's labels.
#[test]
fn an_imported_unetr_with_batch_norm_predicts_monais_labels() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = tmp.path().join("unetr_batch");
    let source = fixtures().join("unetr_batch");
    import_unetr_fixture("unetr_batch", &model, &[]);
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).expect("card"))
            .expect("json");
    assert_eq!(card["model"]["norm_name"], "batch");
    let (labels, p) = cwseg_predict(&model, &fixtures().join("image.nii.gz"), tmp.path());
    assert_agrees(
        "UNETR with batch norm",
        &labels,
        &p,
        &monai_probabilities(&source.join("probabilities.npy")),
    );
}

/// The formula of `scripts/fixtures/monai_fixtures.py` for MONAI VNet's kernels: He-uniform values from
/// splitmix64 of the name's FNV-1a hash plus the index.
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

/// MONAI's VNet state dict for the fixture `name`: kernels by the formula (the kernels are
/// cubic, so MONAI's shapes are cwseg's), the rest from `small.safetensors`.
fn vnet_state(source: &Path) -> HashMap<String, Tensor> {
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("args.json")).expect("args"))
            .expect("json");
    let config = from_monai_args(MonaiNetwork::Vnet, &args)
        .expect("VNet arguments")
        .config;
    let vars = VarMap::new();
    config
        .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
        .expect("VNet");
    let mut state = candle_core::safetensors::load(source.join("small.safetensors"), &Device::Cpu)
        .expect("small");
    for (name, t) in cwseg_models::weights::tensors(&vars).expect("tensors") {
        if t.rank() == 5 {
            let values = formula_weights(&name, t.dims());
            state.insert(
                name,
                Tensor::from_vec(values, t.dims(), &Device::Cpu).expect("tensor"),
            );
        }
    }
    state
}

#[test]
fn imported_vnets_predict_monais_labels_with_relu_and_prelu() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for act in ["relu", "prelu"] {
        let source = fixtures().join(format!("vnet_{act}"));
        let weights = tmp.path().join(format!("{act}.safetensors"));
        candle_core::safetensors::save(&vnet_state(&source), &weights).expect("state dict");
        let model = tmp.path().join(format!("vnet_{act}"));
        import_monai(
            "vnet",
            path(&source.join("args.json")),
            path(&weights),
            path(&model),
            &["--patch", "16,48,32"],
        );
        let dir = tmp.path().join(act);
        std::fs::create_dir(&dir).expect("mkdir");
        let (labels, p) = cwseg_predict(&model, &fixtures().join("image.nii.gz"), &dir);
        assert_agrees(
            &format!("VNet {act}"),
            &labels,
            &p,
            &monai_probabilities(&source.join("probabilities.npy")),
        );
    }
}

#[test]
fn export_gives_back_monais_state_dict_and_arguments() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // UNETR with instance norm, and with batch norm (counters written back as 0)
    for fixture in ["unetr", "unetr_batch"] {
        let model = tmp.path().join(fixture);
        import_unetr_fixture(fixture, &model, &[]);
        let exported = tmp.path().join(format!("{fixture}-for-monai"));
        assert_exports_back(
            MonaiNetwork::Unetr,
            &fixtures().join(fixture),
            &model,
            &exported,
        );
    }

    // V-Net: every tensor back, and a num_batches_tracked counter beside each batch norm, as
    // MONAI's load_state_dict(strict=True) wants
    let source = fixtures().join("vnet_relu");
    let weights = tmp.path().join("vnet.safetensors");
    let state = vnet_state(&source);
    candle_core::safetensors::save(&state, &weights).expect("state dict");
    let model = tmp.path().join("vnet");
    import_monai(
        "vnet",
        path(&source.join("args.json")),
        path(&weights),
        path(&model),
        &["--patch", "16,48,32"],
    );
    let exported = tmp.path().join("vnet-for-monai");
    ok(&[
        "export",
        path(&model),
        "--out",
        path(&exported),
        "--format",
        "monai",
    ]);
    let back = candle_core::safetensors::load(exported.join("model.safetensors"), &Device::Cpu)
        .expect("exported");
    assert_eq!(back.len(), state.len(), "same tensors, counters included");
    for (name, t) in &state {
        if !name.ends_with("num_batches_tracked") {
            assert_eq!(flat(t), flat(&back[name]), "{name}");
        }
    }
}

#[test]
fn monai_options_cwseg_lacks_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = fixtures().join("unetr");
    let weights = source.join("state.safetensors");
    // (argument, value, what the message names besides the file at fault): options cwseg lacks
    // are refused naming the arguments file; weights of another configuration (a wider
    // network) naming the tensors and the weights file; nothing written either way
    let weights_file = path(&weights).to_string();
    for (key, value, needle) in [
        ("norm_name", "\"group\"", "norm_name"),
        (
            "norm_name",
            "[\"instance\", {\"affine\": true}]",
            "norm_name",
        ),
        // batch norm is supported: instance-norm weights lack its parameters
        (
            "norm_name",
            "\"batch\"",
            "missing decoder2.conv_block.norm1.bias",
        ),
        ("res_block", "false", "res_block"),
        ("spatial_dims", "2", "spatial_dims"),
        ("feature_size", "16", "wrong shapes"),
    ] {
        let mut args: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(source.join("args.json")).expect("args"))
                .expect("json");
        args[key] = serde_json::from_str(value).expect("value");
        let case = format!("{key}-{}", value.len());
        let file = tmp.path().join(format!("{case}.json"));
        std::fs::write(&file, args.to_string()).expect("write");
        let out = tmp.path().join(&case);
        let message = fails(&[
            "import",
            "monai",
            "--network",
            "unetr",
            "--args",
            path(&file),
            "--weights",
            &weights_file,
            "--out",
            path(&out),
        ]);
        let at_fault = if needle == "wrong shapes" || needle.starts_with("missing") {
            weights_file.as_str()
        } else {
            path(&file)
        };
        assert!(
            message.contains(needle) && message.contains(at_fault),
            "{key}: {message}"
        );
        assert!(!out.exists(), "{key}: nothing written");
    }
}

/// MONAI's `Orientation("RAS")` and `ScaleIntensityRange` in the training transforms are
/// recorded in the imported card (`--reorient`, `--window`, `--clip`); a degenerate window is
/// refused before anything is written.
#[test]
fn import_records_monais_orientation_and_window() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = fixtures().join("unetr");
    let args = source.join("args.json");
    let weights = source.join("state.safetensors");
    let out = tmp.path().join("windowed");
    import_monai(
        "unetr",
        path(&args),
        path(&weights),
        path(&out),
        &["--reorient", "--window=-175,250,0,1", "--clip"],
    );
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("card"))
            .expect("json");
    assert_eq!(card["preprocessing"]["reorient"], serde_json::json!(true));
    assert_eq!(
        card["preprocessing"]["normalization"],
        serde_json::json!({"kind": "scale_range", "a_min": -175.0, "a_max": 250.0,
                           "b_min": 0.0, "b_max": 1.0, "clip": true})
    );
    let bad = tmp.path().join("degenerate");
    let message = fails(&[
        "import",
        "monai",
        "--network",
        "unetr",
        "--args",
        path(&args),
        "--weights",
        path(&weights),
        "--out",
        path(&bad),
        "--window=1,1,0,1",
    ]);
    assert!(
        message.contains("--window") && message.contains("a_min ≠ a_max"),
        "{message}"
    );
    assert!(!bad.exists(), "nothing written");
}

#[test]
fn model_config_json_is_honoured_field_by_field() {
    // the fixture UNETR as a cwseg config: its classes and img_size, not the flags' defaults
    let args: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("unetr/args.json")).expect("args"),
    )
    .expect("json");
    let config = from_monai_args(MonaiNetwork::Unetr, &args)
        .expect("UNETR")
        .config;
    let json = serde_json::to_string(&config).expect("config");
    let report: serde_json::Value =
        serde_json::from_str(&ok(&["model", "--config", &json, "--json"])).expect("json");
    // MONAI's own count: every element of its state dict (UNETR has no buffers)
    let state =
        candle_core::safetensors::load(fixtures().join("unetr/state.safetensors"), &Device::Cpu)
            .expect("state");
    let monai: usize = state.values().map(|t| t.elem_count()).sum();
    assert_eq!(report["parameters"], monai);
    let more: serde_json::Value = serde_json::from_str(&ok(&[
        "model",
        "--config",
        &json,
        "--classes",
        "5",
        "--json",
    ]))
    .expect("json");
    let head = 8 + 1; // out conv: feature_size × classes weights + 1 bias per class
    assert_eq!(
        more["parameters"].as_u64(),
        Some(monai as u64 + 2 * head as u64)
    );
}

/// An `--args` file that starts with a UTF-8 byte-order mark (as some Windows editors write)
/// is read as the JSON after it (fourth hostile tour: it was "expected value at line 1").
#[test]
fn import_skips_a_byte_order_mark() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = fixtures().join("segresnet");
    let text = std::fs::read_to_string(source.join("args.json")).expect("args");
    let args = tmp.path().join("args.json");
    std::fs::write(&args, format!("\u{feff}{text}")).expect("write");
    let out = tmp.path().join("model");
    import_monai(
        "segresnet",
        path(&args),
        path(&source.join("state.safetensors")),
        path(&out),
        &["--patch", "16,32,32"],
    );
    assert!(out.join("model.safetensors").exists());
}
