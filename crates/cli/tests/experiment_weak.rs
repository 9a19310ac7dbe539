//! `cwseg experiment` on bad input: names that are not plain file names, `--collect` with no
//! run done, and a run whose `status.json` cannot be read. None of these trains anything.

use std::path::Path;

mod common;
use common::{fails, ok};

const EXPERIMENT: &str = r#"
name = "weak"

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
        ("name = \"weak\"", "name = \"a/b\"", "name `a/b`"),
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
