//! `train --fold K --folds N`: the folds' validation cases partition the training cases, every
//! fold trains on the others, the same folds for every seed; bad folds are refused by name.

mod common;

use std::collections::BTreeSet;

use common::{TINY_RUN, fails, ok, s};

fn split(run: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("split.json")).expect("split"))
        .expect("json")
}

fn ids(value: &serde_json::Value) -> BTreeSet<String> {
    value
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_str().expect("id").to_string())
        .collect()
}

#[test]
fn folds_partition_the_training_cases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cv.toml");
    std::fs::write(
        &config,
        TINY_RUN
            .replace("LOSS", "cedl")
            .replace("train = 3", "train = 4"),
    )
    .expect("config");
    let mut validated = BTreeSet::new();
    let mut all = BTreeSet::new();
    for fold in 0..2 {
        let run = dir.path().join(format!("fold{fold}"));
        for seed in ["4", "9"] {
            let out = run.join(seed);
            ok(&[
                "train",
                "--config",
                s(&config),
                "--out",
                s(&out),
                "--fold",
                &fold.to_string(),
                "--folds",
                "2",
                "--seed",
                seed,
            ]);
        }
        let (a, b) = (split(&run.join("4")), split(&run.join("9")));
        assert_eq!(a["val"], b["val"], "the folds do not depend on the seed");
        let (train, val) = (ids(&a["train"]), ids(&a["val"]));
        assert_eq!(val.len(), 2, "fold {fold}: {val:?}");
        assert!(train.is_disjoint(&val));
        assert!(validated.is_disjoint(&val), "a case validated in two folds");
        validated.extend(val.iter().cloned());
        all.extend(train.union(&val).cloned());
    }
    assert_eq!(
        validated, all,
        "every training case is validated in one fold"
    );
    assert_eq!(all.len(), 4);

    let err = fails(&[
        "train",
        "--config",
        s(&config),
        "--out",
        s(&dir.path().join("bad")),
        "--fold",
        "2",
        "--folds",
        "2",
    ]);
    assert!(
        err.contains("data.cross_validation") && err.contains("fold 2 of 2"),
        "{err}"
    );
    // a fold without the number of folds is a usage error
    let out = common::cwseg(&[
        "train",
        "--config",
        s(&config),
        "--out",
        s(&dir.path().join("x")),
        "--fold",
        "0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--folds"), "{err}");
}
