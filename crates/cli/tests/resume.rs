//! `cwseg train` into a folder that holds a run: a new run never replaces one; `--resume`
//! keeps the split it recorded, checks the checkpoint's files against their SHA-256, refuses a
//! `train.toml` edited after the checkpoint, and writes nothing when it is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;
use common::{fails, ok, s, write_tiny_run};

/// Trains the tiny configuration (one epoch) into `run` with the extra flags.
fn train(config: &Path, run: &Path, extra: &[&str]) -> String {
    let mut args = vec!["train", "--config", s(config), "--out", s(run), "--quiet"];
    args.extend_from_slice(extra);
    ok(&args)
}

/// `train --resume --out RUN --epochs N`: the arguments.
fn resume_args<'a>(run: &'a Path, epochs: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--resume",
        "--out",
        s(run),
        "--epochs",
        epochs,
        "--quiet",
    ]
}

/// Every file under `dir` (but the synthetic data) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "data") {
                    stack.push(path);
                }
            } else {
                out.insert(path.clone(), std::fs::read(&path).expect("read"));
            }
        }
    }
    out
}

fn metrics_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .count()
}

/// Flips one bit near the end of `path` (inside the last tensor's values); returns the bytes
/// it had.
fn flip_a_bit(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).expect("read");
    let mut flipped = bytes.clone();
    let at = flipped.len() - 7;
    flipped[at] ^= 0x04;
    std::fs::write(path, flipped).expect("write");
    bytes
}

#[test]
fn a_new_run_never_replaces_a_run_in_its_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_tiny_run(dir.path(), "cwcd");
    let run = dir.path().join("run");
    train(&config, &run, &[]);
    // a finished run whose last/ was deleted: best/, train.toml and metrics.jsonl stay as they were
    std::fs::remove_dir_all(run.join("last")).expect("rm last");
    let before = snapshot(&run);
    let err = fails(&["train", "--config", s(&config), "--out", s(&run), "--quiet"]);
    assert!(
        err.contains("already holds a run") && err.contains("best") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(snapshot(&run), before, "a refused run touched the folder");

    // a folder with a metrics.jsonl and nothing else is a run's too
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).expect("dir");
    std::fs::write(other.join("metrics.jsonl"), "{\"epoch\":1}\n").expect("metrics");
    let err = fails(&[
        "train",
        "--config",
        s(&config),
        "--out",
        s(&other),
        "--quiet",
    ]);
    assert!(err.contains("metrics.jsonl"), "{err}");
    assert_eq!(
        std::fs::read_to_string(other.join("metrics.jsonl")).expect("metrics"),
        "{\"epoch\":1}\n"
    );

    // the train.toml of another configuration, no checkpoint: refused, naming the field
    let third = dir.path().join("third");
    std::fs::create_dir_all(&third).expect("dir");
    std::fs::copy(run.join("train.toml"), third.join("train.toml")).expect("copy");
    let recorded = std::fs::read(third.join("train.toml")).expect("train.toml");
    let err = fails(&[
        "train",
        "--config",
        s(&config),
        "--out",
        s(&third),
        "--lr",
        "0.5",
        "--quiet",
    ]);
    assert!(
        err.contains("optimizer.lr") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(third.join("train.toml")).expect("train.toml"),
        recorded
    );

    // the same configuration without a checkpoint (killed before its first one): started again
    std::fs::copy(run.join("split.json"), third.join("split.json")).expect("copy");
    train(&config, &third, &[]);
    assert_eq!(metrics_lines(&third), 1);
    assert!(third.join("last/model.safetensors").exists());
}

/// Adds three cases to the MSD data set in `data` (copies of its training cases under new
/// ids), so that a new split of it would differ.
fn add_cases(data: &Path) {
    let json_path = data.join("dataset.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("dataset.json"))
            .expect("json");
    let training = json["training"].as_array_mut().expect("training list");
    for k in 0..3 {
        for folder in ["imagesTr", "labelsTr"] {
            std::fs::copy(
                data.join(folder).join(format!("phantom_00{k}.nii.gz")),
                data.join(folder).join(format!("extra_00{k}.nii.gz")),
            )
            .expect("copy");
        }
        training.push(serde_json::json!({
            "image": format!("./imagesTr/extra_00{k}.nii.gz"),
            "label": format!("./labelsTr/extra_00{k}.nii.gz"),
        }));
    }
    std::fs::write(&json_path, json.to_string()).expect("dataset.json");
}

/// Removes the case `id` from the data set's list of training cases.
fn remove_case(data: &Path, id: &str) {
    let json_path = data.join("dataset.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).expect("dataset.json"))
            .expect("json");
    json["training"]
        .as_array_mut()
        .expect("training list")
        .retain(|c| !c["image"].as_str().is_some_and(|i| i.contains(id)));
    std::fs::write(&json_path, json.to_string()).expect("dataset.json");
}

#[test]
fn resume_keeps_the_split_recorded_when_the_run_started() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_tiny_run(dir.path(), "cwcd");
    let data = dir.path().join("data");
    ok(&[
        "synth",
        "--out",
        s(&data),
        "--train",
        "3",
        "--test",
        "1",
        "--shape",
        "16,24,24",
        "--seed",
        "50",
    ]);
    let run = dir.path().join("run");
    train(&config, &run, &["--data", s(&data)]);
    let split = std::fs::read_to_string(run.join("split.json")).expect("split");
    // cases added to the data set: not used, the validation case stays a validation case
    add_cases(&data);
    ok(&resume_args(&run, "2"));
    assert_eq!(metrics_lines(&run), 2);
    assert_eq!(
        std::fs::read_to_string(run.join("split.json")).expect("split"),
        split,
        "the resumed run split the data set again"
    );
    // a recorded case that is gone: refused by name, nothing written
    let recorded: serde_json::Value = serde_json::from_str(&split).expect("json");
    let val = recorded["val"][0].as_str().expect("a validation case");
    remove_case(&data, val);
    let before = snapshot(&run);
    let err = fails(&resume_args(&run, "3"));
    assert!(err.contains(val) && err.contains("split.json"), "{err}");
    assert_eq!(
        snapshot(&run),
        before,
        "a refused resume touched the folder"
    );
}

#[test]
fn resume_refuses_checkpoint_files_that_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_tiny_run(dir.path(), "cwcd");
    let run = dir.path().join("run");
    train(&config, &run, &[]);
    let before = snapshot(&run);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let path = run.join("last").join(file);
        let bytes = flip_a_bit(&path);
        let err = fails(&resume_args(&run, "2"));
        assert!(
            err.contains(file) && err.contains("SHA-256"),
            "{file}: {err}"
        );
        std::fs::write(&path, bytes).expect("restore");
        assert_eq!(
            snapshot(&run),
            before,
            "a refused resume touched the folder"
        );
    }
    ok(&resume_args(&run, "2"));
    assert_eq!(metrics_lines(&run), 2);
    // checkpoints written before the digests were recorded are resumed unchecked
    let state_path = run.join("last/state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).expect("state")).expect("json");
    assert!(state["optimizer_sha256"].is_string(), "{state}");
    state
        .as_object_mut()
        .expect("object")
        .remove("optimizer_sha256");
    std::fs::write(&state_path, state.to_string()).expect("state");
    ok(&resume_args(&run, "3"));
    assert_eq!(metrics_lines(&run), 3);
}

#[test]
fn a_refused_resume_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_tiny_run(dir.path(), "cwcd");
    let run = dir.path().join("run");
    train(&config, &run, &[]);
    let state_path = run.join("last/state.json");
    let state = std::fs::read(&state_path).expect("state");
    std::fs::write(&state_path, "{ damaged").expect("damage");
    let before = snapshot(&run);
    let err = fails(&resume_args(&run, "5"));
    assert!(err.contains("state.json"), "{err}");
    assert_eq!(
        snapshot(&run),
        before,
        "a refused resume touched the folder"
    );
    // repaired, the same command extends the run to 5 epochs
    std::fs::write(&state_path, state).expect("repair");
    ok(&resume_args(&run, "5"));
    assert_eq!(metrics_lines(&run), 5);
}

#[test]
fn an_edited_train_toml_is_refused_on_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_tiny_run(dir.path(), "cwcd");
    let run = dir.path().join("run");
    train(&config, &run, &[]);
    let toml_path = run.join("train.toml");
    let original = std::fs::read_to_string(&toml_path).expect("train.toml");
    let mut edited: toml::Value = toml::from_str(&original).expect("toml");
    edited["patch"] = toml::Value::try_from([8, 8, 8]).expect("patch");
    std::fs::write(&toml_path, toml::to_string(&edited).expect("toml")).expect("edit");
    let err = fails(&resume_args(&run, "2"));
    assert!(err.contains("patch"), "{err}");
    // a checkpoint from before train.toml was saved in it: its model card says the same
    std::fs::remove_file(run.join("last/train.toml")).expect("rm");
    let err = fails(&resume_args(&run, "2"));
    assert!(
        err.contains("patch") && err.contains("config.json"),
        "{err}"
    );
    std::fs::write(&toml_path, original).expect("restore");
    ok(&resume_args(&run, "2"));
    assert_eq!(metrics_lines(&run), 2);
}
