//! `cwseg cv`: an interrupted fold resumes, every training case is predicted out-of-fold exactly
//! once, `cv.json`'s scores are those of the written predictions (before and after the chosen
//! post-processing), the ensemble folder predicts the mean of the folds, and a second run
//! trains and predicts nothing again; an ensemble file naming a missing member is refused.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use common::{TINY_RUN, fails, ok, probabilities, s};
use cwseg_data::{ReadOptions, read_label};
use cwseg_train::postprocess::PostProcessing;
use ndarray::{Array3, Array4};
use serde_json::Value;

/// The case ids of the `.nii.gz` files in `dir`.
fn case_ids(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("folder")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .filter_map(|n| n.strip_suffix(".nii.gz").map(str::to_string))
        .collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

/// `2|P∩G| / (|P|+|G|)` of the voxels equal to `k`; `None` where `k` is in neither.
fn dice(prediction: &Array3<u8>, label: &Array3<u8>, k: u8) -> Option<f64> {
    let (mut both, mut p, mut g) = (0usize, 0usize, 0usize);
    for (&a, &b) in prediction.iter().zip(label) {
        p += usize::from(a == k);
        g += usize::from(b == k);
        both += usize::from(a == k && b == k);
    }
    (p + g > 0).then(|| 2.0 * both as f64 / (p + g) as f64)
}

fn close(found: &Value, expected: Option<f64>, what: &str) {
    match (found.as_f64(), expected) {
        (Some(f), Some(e)) => assert!((f - e).abs() < 1e-9, "{what}: {f} vs {e}"),
        (f, e) => assert_eq!(f, e, "{what}"),
    }
}

/// Modification times of the files a fold's training writes, and its metrics lines.
fn fold_files(out: &Path) -> BTreeMap<PathBuf, (SystemTime, usize)> {
    let mut files = BTreeMap::new();
    for fold in ["fold_0", "fold_1"] {
        for file in [
            "last/state.json",
            "best/model.safetensors",
            "curves.png",
            "metrics.jsonl",
        ] {
            let path = out.join(fold).join(file);
            let time = std::fs::metadata(&path)
                .expect(file)
                .modified()
                .expect("mtime");
            let lines = std::fs::read_to_string(&path).map_or(0, |t| t.lines().count());
            files.insert(path, (time, lines));
        }
    }
    for id in case_ids(&out.join("oof")) {
        let path = out.join("oof").join(format!("{id}.nii.gz"));
        let time = std::fs::metadata(&path)
            .expect("oof")
            .modified()
            .expect("mtime");
        files.insert(path, (time, 0));
    }
    files
}

/// Checks every case of `cv.json` against its `oof/` file and its label: the DSC before,
/// and after the report's post-processing applied to the class indices.
fn check_scores(out: &Path, report: &Value, label_values: &[u8]) {
    let rule: PostProcessing =
        serde_json::from_value(report["postprocessing"].clone()).expect("rule");
    let index = |v: u8| label_values.iter().position(|&l| l == v).expect("value") as u8;
    for case in report["cases"].as_array().expect("cases") {
        let id = case["case"].as_str().expect("id");
        let read = |p: PathBuf| read_label(p, &ReadOptions::default()).expect("label").data;
        let prediction = read(out.join("oof").join(format!("{id}.nii.gz"))).mapv(index);
        let label = read(out.join("data/labelsTr").join(format!("{id}.nii.gz"))).mapv(index);
        let mut processed = prediction.clone();
        rule.apply(&mut processed);
        for k in 1..label_values.len() {
            let what = format!("{id} class {k}");
            close(
                &case["before"]["dice"][k - 1],
                dice(&prediction, &label, k as u8),
                &what,
            );
            close(
                &case["after"]["dice"][k - 1],
                dice(&processed, &label, k as u8),
                &what,
            );
        }
    }
}

/// MONAI's mean DSC of class `k` (cases whose label holds it) from the per-case scores.
fn check_means(out: &Path, report: &Value, label_values: &[u8]) {
    for k in 1..label_values.len() {
        let values: Vec<f64> = report["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .filter(|c| {
                let id = c["case"].as_str().expect("id");
                let path = out.join("data/labelsTr").join(format!("{id}.nii.gz"));
                let label = read_label(path, &ReadOptions::default()).expect("label");
                label.data.iter().any(|&v| v == label_values[k])
            })
            .map(|c| c["before"]["dice"][k - 1].as_f64().expect("a DSC"))
            .collect();
        let mean = (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64);
        close(
            &report["before"]["dice"][k - 1],
            mean,
            &format!("mean of class {k}"),
        );
    }
}

fn predict(model: &Path, input: &Path, output: &Path) -> Array4<f32> {
    ok(&[
        "predict",
        "--model",
        s(model),
        "--input",
        s(input),
        "--output",
        s(output),
        "--probabilities",
    ]);
    probabilities(output)
}

/// The ensemble folder and the cross-validation folder predict the mean of the folds'
/// probabilities.
fn check_ensemble(dir: &Path, out: &Path) {
    let input = out.join("data/imagesTs/phantom_004.nii.gz");
    let a = predict(&out.join("fold_0"), &input, &dir.join("a.nii.gz"));
    let b = predict(&out.join("fold_1"), &input, &dir.join("b.nii.gz"));
    let mean = (a + b) / 2.0;
    for (name, model) in [("e", out.join("ensemble")), ("cv", out.to_path_buf())] {
        let ensemble = predict(&model, &input, &dir.join(format!("{name}.nii.gz")));
        assert_eq!(ensemble.shape(), mean.shape());
        let difference = ensemble
            .iter()
            .zip(&mean)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            difference < 1e-6,
            "{name}: ensemble vs the folds' mean: {difference}"
        );
    }
}

/// Runs `args` stopped after the first step (fold 0 saved, fold 1 not started), then to the
/// end: fold 0 resumes its one epoch.
fn interrupted_then_resumed(args: &[&str], out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_cwseg"))
        .args(args)
        .env("CWSEG_INTERRUPT_AFTER_BATCHES", "1")
        .output()
        .expect("cwseg runs")
        .status;
    assert_eq!(status.code(), Some(130));
    assert!(out.join("fold_0/last/state.json").exists() && !out.join("fold_1").exists());
    ok(args);
    let lines = std::fs::read_to_string(out.join("fold_0/metrics.jsonl")).expect("metrics");
    assert_eq!(lines.lines().count(), 1, "fold 0 resumed its one epoch");
}

/// Every training case has one out-of-fold prediction and one row of `cv.json`, from the fold
/// whose `split.json` validates it; returns the report.
fn check_every_case_once(out: &Path) -> Value {
    let training = case_ids(&out.join("data/labelsTr"));
    assert_eq!(training.len(), 4);
    assert_eq!(
        case_ids(&out.join("oof")),
        training,
        "every case out-of-fold"
    );
    let report = json(&out.join("cv.json"));
    let cases = report["cases"].as_array().expect("cases");
    let reported: Vec<String> = cases
        .iter()
        .map(|c| c["case"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(reported.len(), 4, "{reported:?}");
    assert_eq!(reported.into_iter().collect::<BTreeSet<_>>(), training);
    for case in cases {
        let fold = case["fold"].as_u64().expect("fold");
        let split = json(&out.join(format!("fold_{fold}/split.json")));
        let val = split["val"].as_array().expect("val");
        assert!(val.contains(&case["case"]), "{case}");
    }
    report
}

#[test]
fn cross_validation_resumes_scores_its_predictions_and_ensembles_the_folds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cv.toml");
    let text = TINY_RUN
        .replace("LOSS", "cedl")
        .replace("train = 3", "train = 4");
    std::fs::write(&config, text).expect("config");
    let out = dir.path().join("cv");
    let args = [
        "cv",
        "--config",
        s(&config),
        "--out",
        s(&out),
        "--folds",
        "2",
        "--quiet",
    ];
    interrupted_then_resumed(&args, &out);
    let report = check_every_case_once(&out);
    let card = json(&out.join("fold_0/best/config.json"));
    let label_values: Vec<u8> =
        serde_json::from_value(card["label_values"].clone()).expect("values");
    check_scores(&out, &report, &label_values);
    check_means(&out, &report, &label_values);
    let markdown = std::fs::read_to_string(out.join("cv.md")).expect("cv.md");
    assert!(markdown.contains("| mean |"), "{markdown}");
    let ensemble = json(&out.join("ensemble/ensemble.json"));
    let members = serde_json::json!(["../fold_0/best", "../fold_1/best"]);
    assert_eq!(ensemble["members"], members);
    assert_eq!(ensemble["postprocessing"], report["postprocessing"]);

    // run again: nothing trained or predicted again, the same report
    let before = fold_files(&out);
    ok(&args);
    assert_eq!(
        fold_files(&out),
        before,
        "a second run rewrote a fold's files"
    );
    assert_eq!(json(&out.join("cv.json")), report);

    check_ensemble(dir.path(), &out);
}

#[test]
fn an_ensemble_with_a_missing_member_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ensemble = dir.path().join("ensemble");
    std::fs::create_dir_all(&ensemble).expect("folder");
    std::fs::write(
        ensemble.join("ensemble.json"),
        r#"{"members": ["../fold_9/best"], "postprocessing": null}"#,
    )
    .expect("write");
    let err = fails(&[
        "predict",
        "--model",
        s(&ensemble),
        "--input",
        s(&dir.path().join("in.nii.gz")),
        "--output",
        s(&dir.path().join("out.nii.gz")),
    ]);
    assert!(
        err.contains("ensemble.json") && err.contains("../fold_9/best"),
        "{err}"
    );
    assert!(err.contains("missing"), "{err}");
}

/// The third hostile tour: more folds than cases are refused and leave no folder (was: an
/// empty `OUT/`, or `OUT/data/` with the generated phantoms); a folder that existed stays.
#[test]
fn more_folds_than_cases_leave_no_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("run.toml");
    std::fs::write(&config, TINY_RUN.replace("LOSS", "ce")).expect("config");
    let out = dir.path().join("cv");
    let args = ["cv", "--config", s(&config), "--out", s(&out), "--quiet"];
    let err = fails(&[&args[..], &["--folds", "4"]].concat());
    assert!(err.contains("fold 0 of 4 over 3 cases"), "{err}");
    assert!(!out.exists(), "a refused cross-validation leaves no folder");
    std::fs::create_dir(&out).expect("folder");
    fails(&[&args[..], &["--folds", "4"]].concat());
    assert!(out.is_dir(), "a folder the user made stays");
}
