//! `cwseg import monai --network dynunet` and `cwseg export --format monai` against MONAI's
//! own outputs (fixtures from `scripts/fixtures/monai_dynunet_fixtures.py`): an isotropic
//! DynUNet with instance norm, an anisotropic one with batch norm, and a residual one with
//! deep-supervision heads and dropout predict MONAI's probabilities within 1e-4 on the shared
//! rods image; the export gives back MONAI's state dict and arguments; `cwseg model` counts
//! MONAI's parameters; arguments cwseg cannot honour are refused by name.

use std::path::Path;

use cwseg_models::ModelConfig;
use cwseg_models::monai::{MonaiNetwork, from_monai_args};

mod common;
use common::monai::{
    assert_agrees, assert_exports_back, cwseg_predict, fixtures, import_monai, monai_probabilities,
    path,
};
use common::{cwseg, fails, ok};

const FIXTURES: [&str; 3] = ["dynunet", "dynunet_aniso", "dynunet_res_ds"];

fn read_json(file: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("json")
}

/// The fixture's sliding window in cwseg's order, `Z,Y,X` (MONAI's roi reversed).
fn patch(fixture: &str) -> String {
    let roi = read_json(&fixtures().join(fixture).join("parameters.json"))["roi"].clone();
    let roi: Vec<u64> = serde_json::from_value(roi).expect("roi");
    format!("{},{},{}", roi[2], roi[1], roi[0])
}

/// `import monai` of the fixture folder `fixture` into `out`.
fn import_fixture(fixture: &str, out: &Path) {
    let source = fixtures().join(fixture);
    import_monai(
        "dynunet",
        path(&source.join("args.json")),
        path(&source.join("state.safetensors")),
        path(out),
        &["--patch", &patch(fixture)],
    );
}

fn config_of(args_file: &Path) -> ModelConfig {
    from_monai_args(MonaiNetwork::Dynunet, &read_json(args_file))
        .expect("DynUNet arguments")
        .config
}

#[test]
fn imported_dynunets_predict_monais_probabilities() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for fixture in FIXTURES {
        let source = fixtures().join(fixture);
        let model = tmp.path().join(fixture);
        import_fixture(fixture, &model);
        let dir = tmp.path().join(format!("{fixture}-prediction"));
        std::fs::create_dir(&dir).expect("mkdir");
        let (labels, p) = cwseg_predict(&model, &fixtures().join("image.nii.gz"), &dir);
        let monai = monai_probabilities(&source.join("probabilities.npy"));
        let worst = p
            .iter()
            .zip(&monai)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{fixture}: largest probability difference from MONAI {worst:.3e}");
        assert_agrees(fixture, &labels, &p, &monai);
    }
}

/// Dropout acts only in training: accepted, with a note.
#[test]
fn dropout_is_accepted_with_a_note() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = fixtures().join("dynunet_res_ds");
    let out = tmp.path().join("model");
    let run = cwseg(&[
        "import",
        "monai",
        "--network",
        "dynunet",
        "--args",
        path(&source.join("args.json")),
        "--weights",
        path(&source.join("state.safetensors")),
        "--out",
        path(&out),
        "--patch",
        &patch("dynunet_res_ds"),
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("dropout=0.1") && stderr.contains("only in training"),
        "{stderr}"
    );
}

#[test]
fn export_gives_back_monais_dynunet_state_dict_and_arguments() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for fixture in FIXTURES {
        let model = tmp.path().join(fixture);
        import_fixture(fixture, &model);
        let exported = tmp.path().join(format!("{fixture}-for-monai"));
        assert_exports_back(
            MonaiNetwork::Dynunet,
            &fixtures().join(fixture),
            &model,
            &exported,
        );
    }
}

#[test]
fn model_counts_monais_parameters() {
    for fixture in FIXTURES {
        let source = fixtures().join(fixture);
        let config = config_of(&source.join("args.json"));
        let json = serde_json::to_string(&config).expect("config");
        let report: serde_json::Value = serde_json::from_str(&ok(&[
            "model",
            "--config",
            &json,
            "--size",
            &patch(fixture),
            "--json",
        ]))
        .expect("json");
        let monai = read_json(&source.join("parameters.json"))["parameters"].clone();
        eprintln!(
            "{fixture}: cwseg {} parameters, MONAI {monai}",
            report["parameters"]
        );
        assert_eq!(report["parameters"], monai, "{fixture}");
    }
    // the default DynUNet (nnU-Net's five levels) builds and takes 96³
    let report: serde_json::Value =
        serde_json::from_str(&ok(&["model", "--name", "dynunet", "--json"])).expect("json");
    assert!(report["parameters"].as_u64().is_some_and(|n| n > 0));
}

#[test]
fn dynunet_arguments_cwseg_lacks_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = fixtures().join("dynunet_aniso");
    let weights = source.join("state.safetensors");
    let weights_file = path(&weights).to_string();
    // (argument, value, what the message names besides the file at fault)
    for (key, value, needle) in [
        ("norm_name", "\"group\"", "norm_name"),
        (
            "norm_name",
            "[\"INSTANCE\", {\"affine\": true, \"eps\": 0.001}]",
            "norm_name",
        ),
        ("norm_name", "[\"BATCH\", {\"affine\": false}]", "norm_name"),
        ("act_name", "\"prelu\"", "act_name"),
        ("act_name", "[\"leakyrelu\", {\"alpha\": 2}]", "act_name"),
        ("dropout", "[\"alphadropout\", {\"p\": 0.1}]", "dropout"),
        ("dropout", "1.5", "dropout"),
        ("spatial_dims", "2", "spatial_dims"),
        ("out_channels", "1", "out_channels"),
        ("strides", "[[2, 2, 1], [2, 2, 1], [2, 2, 2]]", "strides"),
        ("kernel_size", "[[3, 3, 2], 3, 3]", "kernel_size"),
        ("kernel_size", "[3, 3]", "kernel_size"),
        ("upsample_kernel_size", "[2, 2]", "upsample_kernel_size"),
        ("filters", "[8, 16]", "filters"),
        // with deep_supervision (set below): at most one head for the 2 up-sampling levels
        ("deep_supr_num", "2", "deep_supr_num"),
        ("num_classes", "3", "num_classes"),
        // honoured arguments whose weights differ: refused naming the tensors and weights file
        ("res_block", "true", "missing bottleneck.conv3.conv.weight"),
        ("trans_bias", "false", "upsamples.0.transp_conv.conv.bias"),
    ] {
        let mut args = read_json(&source.join("args.json"));
        args[key] = serde_json::from_str(value).expect("value");
        if key == "deep_supr_num" {
            args["deep_supervision"] = true.into();
        }
        let case = format!("{key}-{}", value.len());
        let file = tmp.path().join(format!("{case}.json"));
        std::fs::write(&file, args.to_string()).expect("write");
        let out = tmp.path().join(&case);
        let message = fails(&[
            "import",
            "monai",
            "--network",
            "dynunet",
            "--args",
            path(&file),
            "--weights",
            &weights_file,
            "--out",
            path(&out),
            "--patch",
            "16,32,32",
        ]);
        let at_fault = if matches!(key, "res_block" | "trans_bias") {
            weights_file.as_str()
        } else {
            path(&file)
        };
        assert!(
            message.contains(needle) && message.contains(at_fault),
            "{key} = {value}: {message}"
        );
        assert!(!out.exists(), "{key}: nothing written");
    }
}
