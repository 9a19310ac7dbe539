//! `cwseg experiment` on bad input: run again on the same output folder, a finished run is
//! reused only if it was trained with what the grid asks for now; two tables of one name,
//! names that are not plain file names, `--collect` with no run done and a run whose
//! `status.json` cannot be read are refused.

use std::path::Path;

mod common;
use common::{fails, ok};

const EXPERIMENT: &str = r#"
name = "rerun"

[[table]]
name = "table1"
networks = ["unet"]
losses = ["ce"]
seeds = [0]

[networks.unet]
name = "unet"
filters = 4
depth = 2

[train]
patch = [16, 16, 16]
batch_size = 2
epochs = 1
batches_per_epoch = 1
workers = 1

[train.validation]
postprocess = false

[train.data]
source = "synthetic"
val_fraction = 0.34

[train.data.synthetic]
train = 3
test = 1
seed = 50

[train.data.synthetic.phantom]
shape = [16, 24, 24]
"#;

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8")
}

#[test]
fn a_finished_run_trained_with_another_protocol_is_refused_not_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("experiment.toml");
    let out = dir.path().join("out");
    let args = [
        "experiment",
        "--config",
        s(&config),
        "--out",
        s(&out),
        "--quiet",
    ];
    std::fs::write(&config, EXPERIMENT).expect("config");
    ok(&args);
    let recorded = std::fs::read(out.join("experiment.toml")).expect("experiment.toml");
    let metrics = out.join("runs/unet-ce-seed0/metrics.jsonl");
    let trained = std::fs::read(&metrics).expect("metrics");

    // more epochs: the finished run did not train them, the tables would claim it did
    std::fs::write(&config, EXPERIMENT.replace("epochs = 1", "epochs = 2")).expect("config");
    let err = fails(&args);
    assert!(
        err.contains("unet-ce-seed0")
            && err.contains("epochs = 1")
            && err.contains("now asks for 2")
            && err.contains("--out"),
        "{err}"
    );
    // another learning rate: the same
    std::fs::write(
        &config,
        EXPERIMENT.replace("workers = 1", "workers = 1\n[train.optimizer]\nlr = 0.01"),
    )
    .expect("config");
    let err = fails(&args);
    assert!(
        err.contains("unet-ce-seed0") && err.contains("optimizer.lr"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("experiment.toml")).expect("experiment.toml"),
        recorded,
        "a refused grid recorded its protocol"
    );
    assert_eq!(std::fs::read(&metrics).expect("metrics"), trained);

    // restored: the finished run is reused, nothing trained
    std::fs::write(&config, EXPERIMENT).expect("config");
    ok(&args);
    assert_eq!(std::fs::read(&metrics).expect("metrics"), trained);
}

#[test]
fn two_tables_of_one_name_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("experiment.toml");
    let second =
        "\n[[table]]\nname = \"table1\"\nnetworks = [\"unet\"]\nlosses = [\"cwcd\"]\nseeds = [1]\n";
    std::fs::write(
        &config,
        EXPERIMENT.replacen(
            "\n[networks.unet]",
            &format!("{second}\n[networks.unet]"),
            1,
        ),
    )
    .expect("config");
    let err = fails(&["experiment", "--config", s(&config), "--list"]);
    assert!(err.contains("table1") && err.contains("twice"), "{err}");
}

#[test]
fn names_that_are_not_plain_file_names_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("experiment.toml");
    for (from, to, field) in [
        ("name = \"table1\"", "name = \"../x\"", "[[table]] name"),
        (
            "name = \"table1\"",
            "name = \"../../escape\"",
            "[[table]] name",
        ),
        ("name = \"table1\"", "name = \".hidden\"", "[[table]] name"),
        ("name = \"rerun\"", "name = \"a/b\"", "name `a/b`"),
    ] {
        std::fs::write(&config, EXPERIMENT.replacen(from, to, 1)).expect("config");
        let err = fails(&["experiment", "--config", s(&config), "--list"]);
        assert!(
            err.contains(field) && err.contains("experiment.toml") && err.contains("plain"),
            "{to}: {err}"
        );
    }
}

#[test]
fn collect_with_no_run_done_is_refused_without_creating_the_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("experiment.toml");
    std::fs::write(&config, EXPERIMENT).expect("config");
    let out = dir.path().join("none");
    let err = fails(&[
        "experiment",
        "--config",
        s(&config),
        "--out",
        s(&out),
        "--collect",
    ]);
    assert!(
        err.contains("0 of 1 runs done") && err.contains("nothing to tabulate"),
        "{err}"
    );
    assert!(
        !out.exists(),
        "a refused --collect created {}",
        out.display()
    );
}

#[test]
fn an_unreadable_status_is_reported_not_taken_for_pending() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("experiment.toml");
    std::fs::write(&config, EXPERIMENT).expect("config");
    let out = dir.path().join("out");
    let run = out.join("runs").join("unet-ce-seed0");
    std::fs::create_dir_all(&run).expect("run");
    std::fs::write(run.join("status.json"), "{ not json").expect("status");
    let list = ok(&[
        "experiment",
        "--config",
        s(&config),
        "--out",
        s(&out),
        "--list",
    ]);
    assert!(
        list.contains("unet-ce-seed0 unreadable (") && list.contains("status.json"),
        "{list}"
    );
    let err = fails(&[
        "experiment",
        "--config",
        s(&config),
        "--out",
        s(&out),
        "--collect",
    ]);
    assert!(err.contains("status.json"), "{err}");
}
