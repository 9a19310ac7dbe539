//! Region-based training end to end: a run with `[regions]` trains one sigmoid output per
//! region, its model card records the regions, prediction writes labels by the regions' class
//! order, and regions that do not fit the data, or a loss without a region form, are refused
//! by name.

mod common;

use common::{TINY_RUN, fails, ok, s};

const REGIONS: &str = r#"
[regions]
names = ["outer", "inner"]
labels = [[1, 2], [2]]
class_order = [1, 2]
"#;

fn write_run(dir: &std::path::Path, loss: &str, regions: &str) -> std::path::PathBuf {
    let path = dir.join("regions.toml");
    let text = format!("{}{regions}", TINY_RUN.replace("LOSS", loss));
    std::fs::write(&path, text).expect("config");
    path
}

fn read_labels(path: &std::path::Path) -> Vec<u8> {
    let label = cwseg_data::read_label(path, &Default::default()).expect("labels");
    label.data.iter().copied().collect()
}

#[test]
fn a_region_run_trains_predicts_and_records_its_regions() {
    let dir = tempfile::tempdir().expect("tempdir");
    for loss in ["cwcd", "cedl"] {
        let run = dir.path().join(format!("run-{loss}"));
        let config = write_run(dir.path(), loss, REGIONS);
        ok(&["train", "--config", s(&config), "--out", s(&run)]);
        let card: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("best/config.json")).expect("card"),
        )
        .expect("json");
        assert_eq!(card["regions"]["labels"], serde_json::json!([[1, 2], [2]]));
        // two sigmoid outputs, not one per class
        assert_eq!(card["model"]["classes"], 2, "{loss}: {}", card["model"]);
        let image = run.join("data/imagesTs/phantom_003.nii.gz");
        let output = dir.path().join(format!("{loss}.nii.gz"));
        ok(&[
            "predict",
            "--model",
            s(&run),
            "--input",
            s(&image),
            "--output",
            s(&output),
        ]);
        let labels = read_labels(&output);
        assert!(
            labels.iter().all(|&l| l <= 2),
            "{loss}: a label outside the regions' class order"
        );
    }
}

#[test]
fn regions_that_do_not_fit_and_losses_without_a_region_form_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unknown = REGIONS.replace("[[1, 2], [2]]", "[[1, 200], [2]]");
    let config = write_run(dir.path(), "cwcd", &unknown);
    let err = fails(&[
        "train",
        "--config",
        s(&config),
        "--out",
        s(&dir.path().join("a")),
    ]);
    assert!(
        err.contains("regions.labels") && err.contains("200"),
        "{err}"
    );
    let config = write_run(dir.path(), "focal", REGIONS);
    let err = fails(&[
        "train",
        "--config",
        s(&config),
        "--out",
        s(&dir.path().join("b")),
    ]);
    assert!(err.contains("no region form"), "{err}");
    let short = REGIONS.replace("class_order = [1, 2]", "class_order = [1]");
    let config = write_run(dir.path(), "cwcd", &short);
    let err = fails(&[
        "train",
        "--config",
        s(&config),
        "--out",
        s(&dir.path().join("c")),
    ]);
    assert!(err.contains("class_order"), "{err}");
}
