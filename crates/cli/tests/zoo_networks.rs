//! The networks MONAI users train most (SegResNet, DynUNet, SwinUNETR) train through the whole
//! command line: an experiment grid trains each on the phantom, predicts its test case and
//! tabulates it, and `cwseg model` describes each.

mod common;
use common::ok;

/// One small configuration per network, each trained for one epoch of one batch with CE on a
/// 32³ patch (SwinUNETR needs multiples of 32), DynUNet anisotropic with deep supervision.
const EXPERIMENT: &str = r#"
name = "zoo"

[[table]]
name = "zoo"
title = "the zoo's networks"
networks = ["segresnet", "dynunet", "swinunetr"]
losses = ["ce"]
seeds = [0]

[networks.segresnet]
name = "segresnet"
init_filters = 4
blocks_down = [1, 1, 1]
blocks_up = [1, 1]
num_groups = 2

# anisotropic (no down-sampling along z at the first step) with deep supervision: the
# head's targets are downsampled 2 × 4 × 4
[networks.dynunet]
name = "dynunet"
kernel_size = [[3, 3, 3], [1, 3, 3], [3, 3, 3]]
strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
upsample_kernel_size = [[1, 2, 2], [2, 2, 2]]
filters = [4, 8, 16]
deep_supervision = true
deep_supr_num = 1

[networks.swinunetr]
name = "swinunetr"
feature_size = 12
depths = [1, 1, 1, 1]
num_heads = [1, 1, 2, 2]

[train]
patch = [32, 32, 32]
batch_size = 1
epochs = 1
batches_per_epoch = 1

[train.data]
source = "synthetic"
val_fraction = 0.34

[train.data.synthetic]
train = 3
test = 1
seed = 50

[train.data.synthetic.phantom]
shape = [32, 32, 32]
"#;

#[test]
fn every_zoo_network_trains_predicts_and_is_tabulated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("zoo.toml");
    std::fs::write(&config, EXPERIMENT).expect("config");
    let out = dir.path().join("exp");
    ok(&[
        "experiment",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--quiet",
    ]);
    let table = std::fs::read_to_string(out.join("zoo.md")).expect("table");
    for network in ["segresnet", "dynunet", "swinunetr"] {
        assert!(table.contains(network), "{network} missing from\n{table}");
        let run = out.join("runs").join(format!("{network}-ce-seed0"));
        let status = std::fs::read_to_string(run.join("status.json")).expect("status");
        assert!(status.contains("\"done\""), "{network}: {status}");
    }
}

#[test]
fn model_describes_every_zoo_network() {
    for name in ["segresnet", "dynunet", "swinunetr"] {
        let out = ok(&["model", "--name", name, "--size", "64,64,64", "--json"]);
        let d: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert!(
            d["parameters"].as_u64().is_some_and(|p| p > 0)
                && d["activation_bytes"].as_u64().is_some_and(|b| b > 0),
            "{name}: {out}"
        );
    }
}

/// An anisotropic DynUNet (no pooling along z) trains on a patch whose z side is a multiple of
/// its own stride only (each axis is checked against its own total stride, not one multiple
/// for all three), and a y side off its stride is refused naming the per-axis multiples.
#[test]
fn an_anisotropic_dynunet_takes_per_axis_patch_sides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::write_tiny_run(dir.path(), "ce");
    let text = std::fs::read_to_string(&config).expect("config");
    let model = r#"name = "dynunet"
kernel_size = [[1, 3, 3], [1, 3, 3], [3, 3, 3]]
strides = [[1, 1, 1], [1, 2, 2], [1, 2, 2]]
upsample_kernel_size = [[1, 2, 2], [1, 2, 2]]
filters = [4, 8, 8]"#;
    let text = text
        .replace("name = \"unet\"\nfilters = 4\ndepth = 2", model)
        .replace("patch = [16, 16, 16]", "patch = [6, 16, 16]");
    assert!(
        text.contains("dynunet") && text.contains("[6, 16, 16]"),
        "{text}"
    );
    std::fs::write(&config, &text).expect("config");
    let out = dir.path().join("run");
    ok(&[
        "train",
        "--config",
        common::s(&config),
        "--out",
        common::s(&out),
        "--quiet",
    ]);
    assert!(out.join("best/model.safetensors").exists());
    std::fs::write(&config, text.replace("[6, 16, 16]", "[6, 18, 16]")).expect("config");
    let err = common::fails(&[
        "train",
        "--config",
        common::s(&config),
        "--out",
        common::s(&dir.path().join("refused")),
        "--quiet",
    ]);
    assert!(err.contains("[1, 4, 4]"), "{err}");
}
