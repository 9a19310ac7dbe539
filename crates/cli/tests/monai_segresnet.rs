//! `cwseg import monai --network segresnet` and `cwseg export --format monai` against MONAI's
//! SegResNet (fixtures from `scripts/fixtures/monai_segresnet_fixtures.py`): on the
//! orientation-sensitive, non-cubic rods image the imported model's probabilities under the
//! sliding window equal MONAI's within 1e-4, the export gives back MONAI's state dict, and
//! `cwseg model` counts MONAI's parameters.

use cwseg_models::monai::MonaiNetwork;

mod common;
use common::fails;
use common::monai::{
    assert_agrees, assert_exports_back, assert_parameter_count, cwseg_predict, fixtures,
    import_monai, monai_probabilities, path,
};

/// MONAI's roi (32, 32, 16) in cwseg's order.
const PATCH: &str = "16,32,32";

#[test]
fn imported_segresnets_predict_monais_probabilities_and_export_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for fixture in ["segresnet", "segresnet_deconv"] {
        let source = fixtures().join(fixture);
        let model = tmp.path().join(fixture);
        import_monai(
            "segresnet",
            path(&source.join("args.json")),
            path(&source.join("state.safetensors")),
            path(&model),
            &["--patch", PATCH],
        );
        let dir = tmp.path().join(format!("{fixture}-prediction"));
        std::fs::create_dir(&dir).expect("dir");
        let (labels, p) = cwseg_predict(&model, &fixtures().join("image.nii.gz"), &dir);
        let monai = monai_probabilities(&source.join("probabilities.npy"));
        assert_agrees(fixture, &labels, &p, &monai);
        assert_parameter_count(&model, &source);
        let exported = tmp.path().join(format!("{fixture}-for-monai"));
        assert_exports_back(MonaiNetwork::Segresnet, &source, &model, &exported);
    }
}

#[test]
fn segresnet_options_cwseg_lacks_are_refused_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = fixtures().join("segresnet");
    for (key, value) in [
        ("act", r#""prelu""#),
        ("norm", r#""batch""#),
        ("norm", r#"["group", {"num_groups": 8, "affine": false}]"#),
        ("upsample_mode", r#""pixelshuffle""#),
        ("use_conv_final", "false"),
        ("spatial_dims", "2"),
        ("blocks_up", "[1]"),
        ("vae_estimate_std", "true"),
    ] {
        let mut args: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(source.join("args.json")).expect("args"))
                .expect("json");
        args[key] = serde_json::from_str(value).expect("value");
        let file = tmp.path().join(format!("{key}.json"));
        std::fs::write(&file, args.to_string()).expect("write");
        let out = tmp.path().join(key);
        let message = fails(&[
            "import",
            "monai",
            "--network",
            "segresnet",
            "--args",
            path(&file),
            "--weights",
            path(&source.join("state.safetensors")),
            "--out",
            path(&out),
        ]);
        assert!(message.contains(key), "{key}: {message}");
        assert!(!out.exists(), "{key}: nothing written");
    }
}
