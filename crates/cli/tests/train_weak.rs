//! `cwseg train` found weak by a tour of the binary: a resume whose `best/` is gone, the
//! verbose log of the validation DSC, the recorded precision, and the defaults in `--help`.

mod common;
use common::{cwseg, fails, ok, s, write_tiny_run};

#[test]
fn a_resume_without_the_recorded_best_checkpoint_is_refused_before_training() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_tiny_run(dir.path(), "ce");
    let run = dir.path().join("run");
    ok(&["train", "--config", s(&config), "--out", s(&run), "--quiet"]);
    std::fs::remove_dir_all(run.join("best")).expect("remove best");
    let state = std::fs::read(run.join("last/state.json")).expect("state");
    let metrics = std::fs::read(run.join("metrics.jsonl")).expect("metrics");
    let err = fails(&[
        "train",
        "--resume",
        "--out",
        s(&run),
        "--epochs",
        "2",
        "--quiet",
    ]);
    assert!(
        err.contains("best/config.json") && err.contains("missing"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(run.join("last/state.json")).expect("state"),
        state
    );
    assert_eq!(
        std::fs::read(run.join("metrics.jsonl")).expect("metrics"),
        metrics
    );
}

#[test]
fn the_verbose_log_shows_the_validation_dsc_as_a_number() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_tiny_run(dir.path(), "ce");
    let run = dir.path().join("run");
    let out = cwseg(&[
        "-v",
        "train",
        "--config",
        s(&config),
        "--out",
        s(&run),
        "--quiet",
    ]);
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("val_dice="), "{log}");
    assert!(!log.contains("Some("), "{log}");
}

#[test]
fn a_precision_that_falls_back_is_recorded_as_the_one_trained_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_tiny_run(dir.path(), "ce");
    let run = dir.path().join("run");
    // f16 needs a GPU: on the CPU the run trains in f32
    let out = cwseg(&[
        "train",
        "--config",
        s(&config),
        "--out",
        s(&run),
        "--precision",
        "f16",
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(
        warning.contains("training in f32") && warning.contains("train.toml"),
        "{warning}"
    );
    let recorded = std::fs::read_to_string(run.join("train.toml")).expect("train.toml");
    assert!(recorded.contains("precision = \"f32\""), "{recorded}");
    let card = std::fs::read_to_string(run.join("best/config.json")).expect("card");
    assert!(card.contains("\"precision\": \"f32\""), "{card}");
    // the same configuration resumes (it falls back the same way)
    ok(&[
        "train",
        "--config",
        s(&config),
        "--out",
        s(&run),
        "--precision",
        "f16",
        "--resume",
        "--epochs",
        "2",
        "--quiet",
    ]);
}

/// Each flag of `cwseg train --help` with the text of its `[default: …]`.
fn help_defaults() -> std::collections::BTreeMap<String, String> {
    let help = ok(&["train", "--help"]);
    let mut defaults = std::collections::BTreeMap::new();
    let mut flag = String::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("--") {
            flag = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
        if let Some((_, rest)) = line.split_once("[default: ") {
            let value = rest.split(']').next().unwrap_or_default();
            defaults.insert(flag.clone(), value.to_string());
        }
    }
    defaults
}

#[test]
fn the_defaults_in_train_help_are_those_of_the_default_configuration() {
    let config = serde_json::to_value(cwseg_train::config::TrainConfig::default()).expect("json");
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let patch: Vec<String> = config["patch"]
        .as_array()
        .expect("patch")
        .iter()
        .map(text)
        .collect();
    let expected: std::collections::BTreeMap<String, String> = [
        ("data", text(&config["data"]["source"])),
        ("model", text(&config["model"]["name"])),
        ("loss", text(&config["loss"]["name"])),
        ("patch", patch.join(",")),
        ("batch", text(&config["batch_size"])),
        ("epochs", text(&config["epochs"])),
        ("batches-per-epoch", text(&config["batches_per_epoch"])),
        ("optimizer", text(&config["optimizer"]["kind"])),
        ("lr", text(&config["optimizer"]["lr"])),
        ("schedule", text(&config["schedule"]["kind"])),
        ("seed", text(&config["seed"])),
        ("device", text(&config["device"])),
        ("precision", text(&config["precision"])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(help_defaults(), expected);
}
