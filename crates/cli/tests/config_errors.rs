//! A configuration file with a misspelt key or a value of the wrong type: one line naming the
//! file, the line, the field and serde's reason (the names expected, the type wanted), for
//! `train --config` and `experiment --config`; never the defaults used silently.

use std::path::Path;

mod common;
use common::fails;

/// `cwseg train --config FILE` of `text` (data that does not exist: nothing can train).
fn train_error(dir: &Path, text: &str) -> String {
    let path = dir.join("run.toml");
    std::fs::write(&path, text).expect("config");
    let out = dir.join("run");
    fails(&[
        "train",
        "--config",
        path.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--data",
        dir.join("no-such-data").to_str().expect("utf-8"),
        "--quiet",
    ])
}

#[test]
fn toml_errors_name_the_field_and_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = train_error(dir.path(), "epochz = 3\n");
    assert!(
        err.contains("run.toml")
            && err.contains("unknown field `epochz`")
            && err.contains("expected one of")
            && err.contains("`epochs`"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let err = train_error(dir.path(), "epochs = \"three\"\n");
    assert!(
        err.contains("epochs") && err.contains("invalid type: string \"three\", expected usize"),
        "{err}"
    );
    for (table, key) in [
        ("augment", "flip_probabilty = 0.3"),
        ("loss_scaling", "kind = \"auto\"\ninit_scal = 2.0"),
        ("data.synthetic.phantom", "nois = 0.1"),
        ("schedule", "kind = \"constant\"\nmin_lr = 0.0"),
        (
            "data.preprocessing.normalization",
            "kind = \"z_score\"\nclip = true",
        ),
    ] {
        let err = train_error(dir.path(), &format!("[{table}]\n{key}\n"));
        let field = key
            .lines()
            .last()
            .and_then(|l| l.split(' ').next())
            .expect("key");
        assert!(
            err.contains(&format!("unknown field `{field}`")),
            "[{table}] {field}: {err}"
        );
    }
    let err = train_error(
        dir.path(),
        "[model]\nname = \"unet\"\n\n[model.norm]\nkind = \"batch\"\nmomentum = 0.1\n",
    );
    assert!(err.contains("unknown field `momentum`"), "{err}");
}

#[test]
fn experiment_files_name_the_misspelt_field() {
    let err = experiment_error(
        "name = \"x\"\n\n[[table]]\nname = \"t\"\nnetworks = [\"unet\"]\nlosses = [\"ce\"]\nseeds = [0]\n\n[train]\nepochs = 1\n\n[train.augment]\nflip_probabilty = 0.5\n",
    );
    assert!(
        err.contains("experiment.toml")
            && err.contains("train.augment.flip_probabilty")
            && err.contains("`flip_probability`"),
        "{err}"
    );
}

/// `predictions = "pooled"` needs a cross-validation: without `folds` the rule would be chosen on
/// the test cases the table scores.
#[test]
fn pooled_post_processing_needs_folds() {
    let err = experiment_error(
        "name = \"x\"\n\n[[table]]\nname = \"t\"\nnetworks = [\"unet\"]\nlosses = [\"ce\"]\nseeds = [0]\npredictions = \"pooled\"\n\n[train]\nepochs = 1\n",
    );
    assert!(
        err.contains("experiment.toml") && err.contains("table `t`") && err.contains("`folds`"),
        "{err}"
    );
}

/// The error of `cwseg experiment --list` on an `experiment.toml` holding `text`.
fn experiment_error(text: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("experiment.toml");
    std::fs::write(&path, text).expect("config");
    fails(&[
        "experiment",
        "--config",
        path.to_str().expect("utf-8"),
        "--list",
    ])
}
