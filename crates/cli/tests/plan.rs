//! `cwseg plan`: a data set's fingerprint and a commented run configuration that `cwseg train`
//! runs unchanged; `--verify` reads every case and names the first inconsistent one.

mod common;
use common::{fails, ok, s};

#[test]
fn a_plan_trains_unchanged_and_says_why() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("data");
    ok(&[
        "synth",
        "--out",
        s(&data),
        "--train",
        "3",
        "--test",
        "0",
        "--shape",
        "24,32,40",
    ]);
    let plan = dir.path().join("plan.toml");
    let said = ok(&["plan", "--data", s(&data), "--out", s(&plan)]);
    assert!(
        said.contains("patch:") && said.contains("normalization"),
        "{said}"
    );
    let text = std::fs::read_to_string(&plan).expect("plan");
    // every planned choice carries its reason as a comment right above it
    for (field, reason) in [
        ("patch = ", "the median case"),
        ("spacing = ", "the median spacing"),
        ("iterations_per_axis = [4, 6, 6]", "a 6 mm contour band"),
        ("[data.preprocessing.normalization]", "a CT channel"),
    ] {
        let lines: Vec<&str> = text.lines().collect();
        let found = lines
            .windows(2)
            .any(|w| w[0].starts_with('#') && w[0].contains(reason) && w[1].starts_with(field));
        assert!(found, "{field} under {reason}: {text}");
    }
    let fingerprint: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("fingerprint.json")).expect("fingerprint"),
    )
    .expect("json");
    assert_eq!(fingerprint["cases"].as_array().expect("cases").len(), 3);
    assert_eq!(
        fingerprint["cases"][0]["shape"],
        serde_json::json!([24, 32, 40])
    );
    // train takes it as it is (one short epoch here)
    let run = dir.path().join("run");
    ok(&[
        "train",
        "--config",
        s(&plan),
        "--epochs",
        "1",
        "--batches-per-epoch",
        "1",
        "--out",
        s(&run),
    ]);
    assert!(run.join("best/model.safetensors").is_file());
    // --minutes: a calibration run on this machine chooses the epochs, and says so
    let timed = dir.path().join("timed.toml");
    ok(&[
        "plan",
        "--data",
        s(&data),
        "--out",
        s(&timed),
        "--minutes",
        "0.5",
    ]);
    let text = std::fs::read_to_string(&timed).expect("plan");
    let lines: Vec<&str> = text.lines().collect();
    let epochs = lines
        .windows(2)
        .find(|w| w[1].starts_with("epochs = "))
        .expect("epochs");
    assert!(
        epochs[0].contains("a calibration run measured"),
        "{}",
        epochs[0]
    );
    let n: usize = epochs[1]["epochs = ".len()..]
        .trim()
        .parse()
        .expect("a count");
    assert!(n >= 1);
    // nnU-Net's recipe: its network (a DynUNet pooling each axis on its own), SGD and poly, its
    // augmentation and deep supervision, trained as written
    let nnunet = dir.path().join("nnunet.toml");
    ok(&[
        "plan",
        "--data",
        s(&data),
        "--out",
        s(&nnunet),
        "--recipe",
        "nnunet",
    ]);
    let text = std::fs::read_to_string(&nnunet).expect("plan");
    // 24 × 32 × 40 voxels at 1.5 × 1 × 1 mm: z pooled twice, y and x three times, 3³ kernels
    // (every spacing within 2× of the finest), 4 stages and so one head
    for line in [
        "name = \"dynunet\"",
        "strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]]",
        "kernel_size = [[3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]",
        "filters = [32, 64, 128, 256]",
        "norm = \"instance_affine\"",
        "deep_supervision = true",
        "deep_supr_num = 1",
        "kind = \"sgd\"",
        "mirror_probability = 0.5",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}: {text}");
    }
    let lines: Vec<&str> = text.lines().collect();
    for (field, reason) in [
        ("kernel_size = ", "nnU-Net's kernels per stage"),
        ("strides = ", "nnU-Net's 4 stages"),
        ("filters = ", "nnU-Net's features per stage"),
        ("deep_supr_num = ", "4 stages − 3"),
    ] {
        let found = lines
            .windows(2)
            .any(|w| w[0].starts_with('#') && w[0].contains(reason) && w[1].starts_with(field));
        assert!(found, "{field} under {reason}: {text}");
    }
    let run = dir.path().join("run-nnunet");
    ok(&[
        "train",
        "--config",
        s(&nnunet),
        "--epochs",
        "1",
        "--batches-per-epoch",
        "1",
        "--out",
        s(&run),
    ]);
    assert!(run.join("best/model.safetensors").is_file());
    // --verify reads every case; a label value the dataset.json lacks names its case
    assert!(ok(&["plan", "--data", s(&data), "--out", s(&plan), "--verify"]).contains("3 cases"));
    let json_path = data.join("dataset.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("json")).expect("json");
    json["labels"].as_object_mut().expect("labels").remove("1");
    std::fs::write(&json_path, json.to_string()).expect("write");
    let err = fails(&["plan", "--data", s(&data), "--out", s(&plan), "--verify"]);
    assert!(
        err.contains("case phantom_000") && err.contains("label value 1"),
        "{err}"
    );
}

/// `train --print-config`: every field of the default configuration under a comment saying
/// what it is, and the text is a configuration `train` takes.
#[test]
fn the_printed_default_configuration_is_commented_and_runs() {
    let text = ok(&["train", "--print-config"]);
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        assert!(
            i > 0 && lines[i - 1].starts_with('#'),
            "no comment above `{line}`"
        );
    }
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("default.toml");
    std::fs::write(&config, &text).expect("write");
    let run = dir.path().join("run");
    ok(&[
        "train",
        "--config",
        s(&config),
        "--epochs",
        "1",
        "--batches-per-epoch",
        "1",
        "--out",
        s(&run),
    ]);
    assert!(run.join("train.toml").is_file());
}
