//! `predict --tta` is the mean of the predictions of the 8 flipped inputs, each flipped back;
//! `predict --model A --model B` is the mean of the members' probabilities, its labels their
//! argmax; members with other classes are refused, naming both.

mod common;

use std::path::{Path, PathBuf};

use common::{TINY_RUN, fails, ok, probabilities, s};
use cwseg_data::{ReadOptions, read_image, write_volume};
use ndarray::{Array4, Axis};

fn train(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let config = dir.join(format!("{name}.toml"));
    let text = format!("{}{extra}", TINY_RUN.replace("LOSS", "cedl"))
        .replace("seed = 4", &format!("seed = {}", 4 + name.len()));
    std::fs::write(&config, text).expect("config");
    let run = dir.join(name);
    ok(&["train", "--config", s(&config), "--out", s(&run)]);
    run
}

fn flipped<A: Clone, D: ndarray::Dimension>(
    a: &ndarray::Array<A, D>,
    axes: &[usize],
) -> ndarray::Array<A, D> {
    let mut view = a.view();
    for &axis in axes {
        view.invert_axis(Axis(axis));
    }
    view.as_standard_layout().into_owned()
}

fn max_difference(a: &Array4<f32>, b: &Array4<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

fn predict(models: &[&Path], input: &Path, output: &Path, extra: &[&str]) {
    let mut args = vec!["predict"];
    for m in models {
        args.extend(["--model", s(m)]);
    }
    args.extend([
        "--input",
        s(input),
        "--output",
        s(output),
        "--probabilities",
    ]);
    args.extend(extra);
    ok(&args);
}

#[test]
fn tta_is_the_mean_of_the_flipped_predictions_flipped_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = train(dir.path(), "a", "");
    let input = run.join("data/imagesTs/phantom_003.nii.gz");
    let image = read_image(&input, &ReadOptions::default()).expect("image");
    let volume = image.data.index_axis(Axis(0), 0).to_owned();
    let mut sum: Option<Array4<f32>> = None;
    for flips in 0..8usize {
        let axes: Vec<usize> = (0..3).filter(|a| flips & (1 << a) != 0).collect();
        let case = dir.path().join(format!("flip{flips}.nii.gz"));
        write_volume(&case, &flipped(&volume, &axes), &image.geometry).expect("write");
        let out = dir.path().join(format!("flip{flips}-pred.nii.gz"));
        predict(&[&run], &case, &out, &[]);
        let spatial: Vec<usize> = axes.iter().map(|a| a + 1).collect();
        let back = flipped(&probabilities(&out), &spatial);
        sum = Some(match sum {
            None => back,
            Some(s) => s + back,
        });
    }
    let mean = sum.expect("sum") / 8.0;
    let out = dir.path().join("tta.nii.gz");
    predict(&[&run], &input, &out, &["--tta"]);
    let tta = probabilities(&out);
    let difference = max_difference(&tta, &mean);
    assert!(
        difference < 1e-5,
        "TTA vs the mean of the flips: {difference}"
    );
    // and not the plain prediction: mirroring changed something
    let plain = dir.path().join("plain.nii.gz");
    predict(&[&run], &input, &plain, &[]);
    assert!(max_difference(&probabilities(&plain), &tta) > 1e-4);
}

#[test]
fn an_ensemble_is_the_mean_of_its_members_and_refuses_other_classes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (train(dir.path(), "a", ""), train(dir.path(), "bb", ""));
    let input = a.join("data/imagesTs/phantom_003.nii.gz");
    let (pa, pb, pe) = (
        dir.path().join("a.nii.gz"),
        dir.path().join("b.nii.gz"),
        dir.path().join("ensemble.nii.gz"),
    );
    predict(&[&a], &input, &pa, &["--no-postprocess"]);
    predict(&[&b], &input, &pb, &["--no-postprocess"]);
    predict(&[&a, &b], &input, &pe, &["--no-postprocess"]);
    let mean = (probabilities(&pa) + probabilities(&pb)) / 2.0;
    let ensemble = probabilities(&pe);
    let difference = max_difference(&ensemble, &mean);
    assert!(
        difference < 1e-6,
        "ensemble vs the members' mean: {difference}"
    );
    let labels = cwseg_data::read_label(&pe, &ReadOptions::default()).expect("labels");
    let argmax = cwseg_data::argmax(mean.view());
    let disagree = labels
        .data
        .iter()
        .zip(&argmax)
        .filter(|(l, a)| l != a)
        .count();
    assert_eq!(
        disagree, 0,
        "the ensemble's labels are the argmax of the mean"
    );

    // one model twice would weigh double: refused, naming it
    let err = fails(&[
        "predict",
        "--model",
        s(&a),
        "--model",
        s(&a),
        "--input",
        s(&input),
        "--output",
        s(&dir.path().join("twice.nii.gz")),
    ]);
    assert!(err.contains("twice"), "{err}");
    // a member trained on regions predicts other outputs: refused, naming both models
    let regions = "\n[regions]\nnames = [\"r\"]\nlabels = [[1, 2]]\nclass_order = [1]\n";
    let c = train(dir.path(), "ccc", regions);
    let err = fails(&[
        "predict",
        "--model",
        s(&a),
        "--model",
        s(&c),
        "--input",
        s(&input),
        "--output",
        s(&dir.path().join("refused.nii.gz")),
    ]);
    assert!(
        err.contains("regions") && err.contains("ccc") && err.contains("/a"),
        "{err}"
    );
    // both values are shown, so a card to align can be seen (third hostile tour)
    assert!(err.contains(r#"(null against {"names":["r"]"#), "{err}");
    assert!(!dir.path().join("refused.nii.gz").exists());
}
