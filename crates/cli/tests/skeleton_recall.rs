//! Skeleton Recall end to end: tiny runs with `skeleton_recall` and `dice_ce_skeleton_recall`
//! train and finish (the loader makes the tubed skeletons, deep supervision downsamples them
//! with the labels), `cwseg loss` evaluates them, and region training refuses them.

mod common;

use common::{TINY_RUN, fails, ok, s, write_tiny_run};

/// The training losses the run recorded (`loss` of each epoch line of `metrics.jsonl`).
fn train_losses(run: &std::path::Path) -> Vec<f64> {
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

#[test]
fn tiny_runs_with_skeleton_recall_train_and_finish() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_tiny_run(dir.path(), "skeleton_recall");
    let run = dir.path().join("sr");
    ok(&["train", "--config", s(&config), "--out", s(&run), "--quiet"]);
    assert!(run.join("best/config.json").exists());
    let losses = train_losses(&run);
    assert!(
        !losses.is_empty()
            && losses
                .iter()
                .all(|l| l.is_finite() && (0.0..=1.0).contains(l)),
        "{losses:?}"
    );
    // the compound, with deep supervision and the skeleton of each patch alone
    let deep = TINY_RUN
        .replace("LOSS", "dice_ce_skeleton_recall")
        .replace("depth = 2", "depth = 3\ndeep_supervision = true")
        .replace("workers = 1", "workers = 1\ncontour_maps = \"patch\"");
    let config = dir.path().join("deep.toml");
    std::fs::write(&config, deep).expect("config");
    let run = dir.path().join("compound");
    ok(&["train", "--config", s(&config), "--out", s(&run), "--quiet"]);
    let losses = train_losses(&run);
    assert!(
        !losses.is_empty() && losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
}

#[test]
fn the_loss_command_takes_skeleton_recall_and_regions_refuse_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (logits, labels) = (dir.path().join("z.npy"), dir.path().join("y.npy"));
    let y = ndarray::Array4::from_shape_fn((1, 6, 8, 10), |(_, z, y, _)| {
        u8::from((z as i32 - 3).pow(2) + (y as i32 - 4).pow(2) <= 4)
    });
    let z = ndarray::Array5::from_shape_fn((1, 2, 6, 8, 10), |(_, k, z, y, x)| {
        ((k * 7 + z * 5 + y * 3 + x) % 11) as f32 / 5.0 - 1.0
    });
    ndarray_npy::write_npy(&labels, &y).expect("labels");
    ndarray_npy::write_npy(&logits, &z).expect("logits");
    for loss in ["skeleton_recall", "dice_ce_skeleton_recall"] {
        let out = ok(&[
            "loss",
            "--logits",
            s(&logits),
            "--labels",
            s(&labels),
            "--loss",
            loss,
            "--json",
        ]);
        let report: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        let value = report["loss"].as_f64();
        assert!(
            value.is_some_and(|v| v.is_finite() && v > 0.0),
            "{loss}: {out}"
        );
        assert!(
            report["grad_norm"].as_f64().is_some_and(|g| g > 0.0),
            "{loss}: {out}"
        );
    }
    let regions = format!(
        "{}\n[regions]\nnames = [\"outer\", \"inner\"]\nlabels = [[1, 2], [2]]\nclass_order = [1, 2]\n",
        TINY_RUN.replace("LOSS", "skeleton_recall")
    );
    let config = dir.path().join("regions.toml");
    std::fs::write(&config, regions).expect("config");
    let err = fails(&[
        "train",
        "--config",
        s(&config),
        "--out",
        s(&dir.path().join("r")),
    ]);
    assert!(err.contains("no region form"), "{err}");
}
