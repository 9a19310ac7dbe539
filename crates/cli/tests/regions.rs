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

/// The third hostile tour: regions whose labels would be written wrong, or that repeat a name
/// or a value, are refused naming the field, in `train.toml` and in an edited model card.
#[test]
fn regions_that_would_write_other_labels_are_refused_by_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        // class_order writes 3 where the region {1, 2} is found (was: trained, labels 3)
        (
            "class_order = [1, 2]",
            "class_order = [3, 2]",
            "regions.class_order",
        ),
        (
            "class_order = [1, 2]",
            "class_order = [2, 1]",
            "not one of its labels",
        ),
        (
            r#"names = ["outer", "inner"]"#,
            r#"names = ["a", "a"]"#,
            "regions.names",
        ),
        ("[[1, 2], [2]]", "[[1, 1, 2], [2]]", "holds 1 twice"),
    ];
    for (k, (from, to, expected)) in cases.into_iter().enumerate() {
        let config = write_run(dir.path(), "cwcd", &REGIONS.replace(from, to));
        let out = dir.path().join(format!("run{k}"));
        let err = fails(&["train", "--config", s(&config), "--out", s(&out)]);
        assert!(err.contains(expected), "{to}: {err}");
        assert!(!out.exists(), "{to}: a refused run leaves no folder");
    }
    let nine = "[regions]\nnames = [\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\"]\n\
                labels = [[1],[2],[3],[4],[5],[6],[7],[8],[9]]\nclass_order = [1,2,3,4,5,6,7,8,9]\n";
    let config = write_run(dir.path(), "cwcd", nine);
    let err = fails(&[
        "train",
        "--config",
        s(&config),
        "--out",
        s(&dir.path().join("n")),
    ]);
    assert!(
        err.contains("9 regions") && err.contains("one bit of a byte"),
        "{err}"
    );
    // a model card edited the same way is refused by predict, naming config.json
    let run = dir.path().join("good");
    let config = write_run(dir.path(), "cwcd", REGIONS);
    ok(&["train", "--config", s(&config), "--out", s(&run)]);
    // --probabilities of a region model: one sigmoid file per region, named as regions
    let image = run.join("data/imagesTs/phantom_003.nii.gz");
    let labels = dir.path().join("labels.nii.gz");
    ok(&[
        "predict",
        "--model",
        s(&run),
        "--input",
        s(&image),
        "--output",
        s(&labels),
        "--probabilities",
    ]);
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("labels_probabilities"))
        .expect("probabilities")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["region_00.nii.gz", "region_01.nii.gz"]);
    let card_path = run.join("best/config.json");
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&card_path).expect("card")).expect("json");
    card["regions"]["class_order"] = serde_json::json!([5, 2]);
    std::fs::write(&card_path, card.to_string()).expect("card");
    let err = fails(&[
        "predict",
        "--model",
        s(&run),
        "--input",
        s(&run.join("data/imagesTs/phantom_003.nii.gz")),
        "--output",
        s(&dir.path().join("p.nii.gz")),
    ]);
    assert!(
        err.contains("config.json") && err.contains("regions.class_order"),
        "{err}"
    );
}
