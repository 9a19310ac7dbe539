//! The `cwseg` binary end to end on tiny data: synth, train (with an interrupted and resumed
//! run that must end bit-identical to an uninterrupted one), predict, evaluate, contour, loss,
//! model, and its errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{cwseg, fails, ok};

const TINY: &str = r#"
patch = [16, 16, 16]
batch_size = 2
epochs = 2
batches_per_epoch = 3
seed = 4
workers = 2

[data]
source = "synthetic"
val_fraction = 0.34

[data.synthetic]
train = 3
test = 1
seed = 50

[data.synthetic.phantom]
shape = [16, 24, 24]

[model]
name = "unet"
filters = 4
depth = 2

[loss]
name = "cwcd"
"#;

/// `cwseg synth` of one 48 × 64 × 64 training phantom (no test cases) into `data`.
fn synth_one(data: &Path, seed: u64) {
    ok(&[
        "synth",
        "--out",
        data.to_str().expect("utf-8"),
        "--train",
        "1",
        "--test",
        "0",
        "--shape",
        "48,64,64",
        "--seed",
        &seed.to_string(),
    ]);
}

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.toml");
    std::fs::write(&path, TINY).expect("config");
    path
}

/// Every tensor of a safetensors file as (name, f32 values), sorted by name.
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let map = candle_core::safetensors::load(path, &candle_core::Device::Cpu).expect("weights");
    let mut out: Vec<(String, Vec<f32>)> = map
        .into_iter()
        .map(|(k, v)| {
            let v = v
                .to_dtype(candle_core::DType::F32)
                .expect("f32")
                .flatten_all()
                .expect("flat")
                .to_vec1()
                .expect("values");
            (k, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (tensors(a), tensors(b));
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} hold different tensors",
        a.display(),
        b.display()
    );
    for ((n, u), (m, v)) in x.iter().zip(&y) {
        assert_eq!(n, m);
        let same = u.len() == v.len() && u.iter().zip(v).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(
            same,
            "{n} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn train_resume_predict_evaluate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let config = config.to_str().expect("utf-8");
    let straight = dir.path().join("straight");
    ok(&[
        "train",
        "--config",
        config,
        "--out",
        straight.to_str().expect("utf-8"),
        "--quiet",
    ]);
    for file in [
        "best/model.safetensors",
        "best/config.json",
        "last/optimizer.safetensors",
        "last/state.json",
        "metrics.jsonl",
        "curves.png",
        "split.json",
        "train.toml",
    ] {
        assert!(straight.join(file).exists(), "{file}");
    }
    // train.toml records the run's network: the phantom's 1 channel and 14 classes, whatever
    // the configuration left at its defaults
    let recorded: toml::Value =
        toml::from_str(&std::fs::read_to_string(straight.join("train.toml")).expect("train.toml"))
            .expect("toml");
    assert_eq!(recorded["model"]["classes"].as_integer(), Some(14));
    assert_eq!(recorded["model"]["in_channels"].as_integer(), Some(1));
    let metrics = std::fs::read_to_string(straight.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 2);
    let first: serde_json::Value =
        serde_json::from_str(metrics.lines().next().expect("line")).expect("json");
    assert!(first["loss"].as_f64().expect("loss").is_finite());

    // interrupted after 4 batches (mid epoch 2), then resumed: the same final weights
    let resumed = dir.path().join("resumed");
    let out = Command::new(env!("CARGO_BIN_EXE_cwseg"))
        .args([
            "train",
            "--config",
            config,
            "--out",
            resumed.to_str().expect("utf-8"),
            "--quiet",
        ])
        .env("CWSEG_INTERRUPT_AFTER_BATCHES", "4")
        .output()
        .expect("runs");
    // interrupted after saving: exit code 130, as a shell reports Ctrl-C
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(resumed.join("last/state.json")).expect("state"),
    )
    .expect("json");
    assert_eq!(
        (state["epoch"].as_u64(), state["batch"].as_u64()),
        (Some(1), Some(1))
    );
    let err = fails(&[
        "train",
        "--config",
        config,
        "--out",
        resumed.to_str().expect("utf-8"),
        "--quiet",
    ]);
    assert!(err.contains("--resume"), "{err}");
    // a flag that disagrees with the run's train.toml is refused, naming the field
    let err = fails(&[
        "train",
        "--out",
        resumed.to_str().expect("utf-8"),
        "--resume",
        "--lr",
        "0.5",
    ]);
    assert!(err.contains("optimizer.lr"), "{err}");
    // an edited state.json (an epoch ahead of the optimizer's steps) is refused, not skipped
    let state_path = resumed.join("last/state.json");
    let saved_state = std::fs::read_to_string(&state_path).expect("state");
    let mut edited = state.clone();
    edited["epoch"] = serde_json::json!(2);
    std::fs::write(&state_path, edited.to_string()).expect("edit");
    let err = fails(&[
        "train",
        "--out",
        resumed.to_str().expect("utf-8"),
        "--resume",
    ]);
    assert!(
        err.contains("state.json") && err.contains("disagrees with the 4 steps"),
        "{err}"
    );
    std::fs::write(&state_path, saved_state).expect("restore");
    // `--resume --out RUN` needs nothing else
    ok(&[
        "train",
        "--out",
        resumed.to_str().expect("utf-8"),
        "--quiet",
        "--resume",
    ]);
    // resume is exact: the same weights and optimizer state, bit for bit
    assert_same(
        &straight.join("last/model.safetensors"),
        &resumed.join("last/model.safetensors"),
    );
    assert_same(
        &straight.join("last/optimizer.safetensors"),
        &resumed.join("last/optimizer.safetensors"),
    );
    // a larger --epochs extends the finished run by the missing epoch; fewer is refused
    ok(&[
        "train",
        "--out",
        resumed.to_str().expect("utf-8"),
        "--quiet",
        "--resume",
        "--epochs",
        "3",
    ]);
    let epochs = std::fs::read_to_string(resumed.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .filter(|l| l.contains("\"epoch\":3"))
        .count();
    assert_eq!(epochs, 1);
    let err = fails(&[
        "train",
        "--out",
        resumed.to_str().expect("utf-8"),
        "--resume",
        "--epochs",
        "1",
    ]);
    assert!(err.contains("shortened"), "{err}");

    // predict a held-out phantom: labels with the input's geometry
    let data = straight.join("data");
    let image = data.join("imagesTs/phantom_003.nii.gz");
    let label = data.join("labelsTs/phantom_003.nii.gz");
    let pred = dir.path().join("pred");
    std::fs::create_dir_all(&pred).expect("dir");
    let pred_file = pred.join("phantom_003.nii.gz");
    ok(&[
        "predict",
        "--model",
        straight.to_str().expect("utf-8"),
        "--input",
        image.to_str().expect("utf-8"),
        "--output",
        pred_file.to_str().expect("utf-8"),
        "--probabilities",
    ]);
    let input = cwseg_data::read_image(&image, &Default::default()).expect("image");
    let output = cwseg_data::read_label(&pred_file, &Default::default()).expect("prediction");
    assert_eq!(output.geometry.shape(), input.geometry.shape());
    assert_eq!(output.geometry.affine(), input.geometry.affine());
    assert!(output.data.iter().all(|&l| l < 14));
    assert!(
        pred.join("phantom_003_probabilities/class_00.nii.gz")
            .exists()
    );

    // evaluate: the JSON contract of the README's "For MONAI users"
    let labels = dir.path().join("labels");
    std::fs::create_dir_all(&labels).expect("dir");
    std::fs::copy(&label, labels.join("phantom_003.nii.gz")).expect("copy");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "evaluate",
        "--pred",
        pred.to_str().expect("utf-8"),
        "--label",
        labels.to_str().expect("utf-8"),
        "--json",
    ]))
    .expect("json");
    assert_eq!(json["aggregate"], "paper");
    let case = &json["cases"][0];
    assert_eq!(case["case"], "phantom_003");
    let liver = &case["classes"]["1"];
    for key in ["dice", "iou", "hd95", "assd", "nsd", "status"] {
        assert!(liver.get(key).is_some(), "{key} in {liver}");
    }
    assert!(json["mean"]["1"].is_object() && json["failures"]["1"].is_number());
    // a checkpoint from another model: the names that differ, no output written
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).expect("dir");
    std::fs::copy(
        straight.join("best/model.safetensors"),
        other.join("model.safetensors"),
    )
    .expect("copy");
    let card = std::fs::read_to_string(straight.join("best/config.json"))
        .expect("card")
        .replace("\"filters\": 4", "\"filters\": 8");
    std::fs::write(other.join("config.json"), card).expect("card");
    let target = dir.path().join("never.nii.gz");
    let err = fails(&[
        "predict",
        "--model",
        other.to_str().expect("utf-8"),
        "--input",
        image.to_str().expect("utf-8"),
        "--output",
        target.to_str().expect("utf-8"),
    ]);
    assert!(
        err.contains("do not match") && err.contains("wrong shapes"),
        "{err}"
    );
    assert!(!target.exists(), "no partial output");
    // a patch larger than the volume (16 × 24 × 24): the cases are padded, as nnU-Net pads
    // them (a plan's patch may be larger than its smallest case), and the run trains
    let big = std::fs::read_to_string(dir.path().join("tiny.toml"))
        .expect("config")
        .replace("patch = [16, 16, 16]", "patch = [32, 32, 32]");
    std::fs::write(dir.path().join("big.toml"), big).expect("config");
    ok(&[
        "train",
        "--config",
        dir.path().join("big.toml").to_str().expect("utf-8"),
        "--out",
        dir.path().join("big").to_str().expect("utf-8"),
        "--quiet",
    ]);
    assert!(dir.path().join("big/best/model.safetensors").exists());
    let table = ok(&[
        "evaluate",
        "--pred",
        pred.to_str().expect("utf-8"),
        "--label",
        labels.to_str().expect("utf-8"),
        "--aggregate",
        "monai",
    ]);
    assert!(table.contains("| Avg |"), "{table}");
}

#[test]
fn evaluate_gives_known_numbers() {
    // two boxes: |P| = 4·4·4 = 64, |G| = 4·4·6 = 96, |P ∩ G| = 64 → DSC = 128/160 = 0.8
    let dir = tempfile::tempdir().expect("tempdir");
    let geometry = cwseg_data::Geometry::new([10, 10, 10], [1.0, 1.0, 1.0]);
    let mut pred = ndarray::Array3::<u8>::zeros((10, 10, 10));
    let mut label = ndarray::Array3::<u8>::zeros((10, 10, 10));
    pred.slice_mut(ndarray::s![2..6, 2..6, 2..6]).fill(1);
    label.slice_mut(ndarray::s![2..6, 2..6, 2..8]).fill(1);
    let (p, l) = (dir.path().join("p.nii.gz"), dir.path().join("l.nii.gz"));
    cwseg_data::write_volume(&p, &pred, &geometry).expect("write");
    cwseg_data::write_volume(&l, &label, &geometry).expect("write");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "evaluate",
        "--pred",
        p.to_str().expect("utf-8"),
        "--label",
        l.to_str().expect("utf-8"),
        "--json",
    ]))
    .expect("json");
    let m = &json["cases"][0]["classes"]["1"];
    assert!(
        (m["dice"].as_f64().expect("dice") - 0.8).abs() < 1e-12,
        "{m}"
    );
    assert!(
        (m["iou"].as_f64().expect("iou") - 64.0 / 96.0).abs() < 1e-12,
        "{m}"
    );
    // the farthest label surface voxel (x = 7) is 2 voxels from the prediction's (x = 5)
    assert!((m["hd"].as_f64().expect("hd") - 2.0).abs() < 1e-9, "{m}");
    let err = fails(&[
        "evaluate",
        "--pred",
        dir.path().to_str().expect("utf-8"),
        "--label",
        l.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("both be files or both folders"), "{err}");
    let missing = dir.path().join("missing.nii.gz");
    let err = fails(&[
        "evaluate",
        "--pred",
        missing.to_str().expect("utf-8"),
        "--label",
        l.to_str().expect("utf-8"),
    ]);
    assert!(
        err.contains("--pred") && err.contains("no such file"),
        "{err}"
    );

    // a class only in the prediction is scored (a false positive), and `--classes` adds one
    // that is in neither
    let mut spurious = pred.clone();
    spurious.slice_mut(ndarray::s![7..9, 7..9, 7..9]).fill(5);
    let s = dir.path().join("spurious.nii.gz");
    cwseg_data::write_volume(&s, &spurious, &geometry).expect("write");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "evaluate",
        "--pred",
        s.to_str().expect("utf-8"),
        "--label",
        l.to_str().expect("utf-8"),
        "--aggregate",
        "nnunet",
        "--classes",
        "1,7",
        "--json",
    ]))
    .expect("json");
    let classes = &json["cases"][0]["classes"];
    assert_eq!(classes["5"]["status"], "spurious", "{json}");
    assert_eq!(classes["5"]["dice"].as_f64(), Some(0.0), "{json}");
    assert_eq!(classes["7"]["status"], "empty", "{json}");
    assert_eq!(json["mean"]["5"]["dice"].as_f64(), Some(0.0), "{json}");

    // several runs in one CSV, each row with its run; BraTS regions on labels without a 4 warn
    let csv = dir.path().join("runs.csv");
    let out = cwseg(&[
        "evaluate",
        "--pred",
        p.to_str().expect("utf-8"),
        "--pred",
        s.to_str().expect("utf-8"),
        "--label",
        l.to_str().expect("utf-8"),
        "--name",
        "plain",
        "--name",
        "blob",
        "--regions",
        "brats",
        "--csv",
        csv.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success());
    let rows = std::fs::read_to_string(&csv).expect("csv");
    assert!(rows.starts_with("run,case,class,"), "{rows}");
    assert!(
        rows.lines().any(|r| r.starts_with("plain,"))
            && rows.lines().any(|r| r.starts_with("blob,")),
        "{rows}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("no label holds the BraTS enhancing-tumour value 4")
    );
    // the same anatomy stored flipped (x reversed, affine x = −1) is refused, naming both files
    let mut affine = *geometry.affine();
    affine[0][0] = -1.0;
    affine[0][3] = 9.0;
    let flipped_geometry = cwseg_data::Geometry::with_affine([10, 10, 10], affine);
    let mut flipped = label.clone();
    flipped.invert_axis(ndarray::Axis(2));
    let f = dir.path().join("flipped.nii.gz");
    cwseg_data::write_volume(
        &f,
        &flipped.as_standard_layout().to_owned(),
        &flipped_geometry,
    )
    .expect("write");
    let err = fails(&[
        "evaluate",
        "--pred",
        f.to_str().expect("utf-8"),
        "--label",
        l.to_str().expect("utf-8"),
    ]);
    assert!(
        err.contains("flipped.nii.gz") && err.contains("l.nii.gz") && err.contains("orientation"),
        "{err}"
    );
}

/// `predict` and `contour` never write over their inputs, and a folder's every case is
/// predicted (nnU-Net channel files and plain files side by side) or refused by name.
#[test]
fn predict_keeps_its_inputs_and_predicts_every_case() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/phantom-unet-cwcd");
    let model = model.to_str().expect("utf-8");
    let geometry = cwseg_data::Geometry::new([16, 24, 24], [1.0; 3]);
    let image = ndarray::Array3::<f32>::from_shape_fn((16, 24, 24), |(z, y, x)| {
        ((z * 7 + y * 3 + x) % 11) as f32 / 11.0
    });
    let inputs = dir.path().join("inputs");
    std::fs::create_dir_all(&inputs).expect("dir");
    for name in ["caseA_0000.nii.gz", "caseC.nii.gz"] {
        cwseg_data::write_volume(inputs.join(name), &image, &geometry).expect("write");
    }
    let before = std::fs::read(inputs.join("caseC.nii.gz")).expect("read");
    let input = inputs.to_str().expect("utf-8");
    // the output folder is the input folder: refused before anything is written
    let err = fails(&[
        "predict", "--model", model, "--input", input, "--output", input,
    ]);
    assert!(err.contains("would be overwritten"), "{err}");
    // an output file that is the input file
    let single = inputs.join("caseC.nii.gz");
    let single = single.to_str().expect("utf-8");
    let err = fails(&[
        "predict", "--model", model, "--input", single, "--output", single,
    ]);
    assert!(err.contains("would be overwritten"), "{err}");
    assert_eq!(
        std::fs::read(inputs.join("caseC.nii.gz")).expect("read"),
        before
    );
    // both cases predicted
    let out = dir.path().join("out");
    ok(&[
        "predict",
        "--model",
        model,
        "--input",
        input,
        "--output",
        out.to_str().expect("utf-8"),
    ]);
    let mut written: Vec<String> = std::fs::read_dir(&out)
        .expect("out")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(written, ["caseA.nii.gz", "caseC.nii.gz"]);
    // three channel files for a one-channel model: refused, naming them
    let channels = dir.path().join("channels");
    std::fs::create_dir_all(&channels).expect("dir");
    for c in 0..3 {
        cwseg_data::write_volume(
            channels.join(format!("case_{c:04}.nii.gz")),
            &image,
            &geometry,
        )
        .expect("write");
    }
    let err = fails(&[
        "predict",
        "--model",
        model,
        "--input",
        channels.to_str().expect("utf-8"),
        "--output",
        dir.path().join("out2").to_str().expect("utf-8"),
    ]);
    assert!(
        err.contains("case_0000, case_0001, case_0002") && err.contains("1 channel"),
        "{err}"
    );
    // contour onto its own label
    let label = dir.path().join("label.nii.gz");
    cwseg_data::write_volume(&label, &image.mapv(|v| u8::from(v > 0.5)), &geometry).expect("write");
    let label_bytes = std::fs::read(&label).expect("read");
    let l = label.to_str().expect("utf-8");
    let err = fails(&["contour", "--label", l, "--output", l]);
    assert!(err.contains("would be overwritten"), "{err}");
    assert_eq!(std::fs::read(&label).expect("read"), label_bytes);
    // a --png into a missing folder is refused before the NIfTI is written
    let output = dir.path().join("contours.nii.gz");
    let png = dir.path().join("missing/contours.png");
    let o = output.to_str().expect("utf-8");
    let err = fails(&[
        "contour",
        "--label",
        l,
        "--output",
        o,
        "--png",
        png.to_str().expect("utf-8"),
    ]);
    assert!(
        err.contains("--png") && err.contains("does not exist"),
        "{err}"
    );
    assert!(!output.exists(), "nothing written");
}

#[test]
fn contour_loss_model_and_synth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("phantom");
    ok(&[
        "synth",
        "--out",
        data.to_str().expect("utf-8"),
        "--train",
        "1",
        "--test",
        "0",
        "--shape",
        "16,24,24",
    ]);
    let label = data.join("labelsTr/phantom_000.nii.gz");
    let contour = dir.path().join("contour.nii.gz");
    let png = dir.path().join("contour.png");
    ok(&[
        "contour",
        "--label",
        label.to_str().expect("utf-8"),
        "--output",
        contour.to_str().expect("utf-8"),
        "--include-background",
        "--png",
        png.to_str().expect("utf-8"),
    ]);
    let labels = cwseg_data::read_label(&label, &Default::default()).expect("label");
    let map = cwseg_data::read_label(&contour, &Default::default()).expect("contour");
    assert_eq!(map.geometry.affine(), labels.geometry.affine());
    let spec = cwseg_morphology::ContourSpec {
        erosion: Default::default(),
        include_background: true,
    };
    let want = cwseg_morphology::contour_map(labels.data.view(), &spec)
        .expect("map")
        .into_union()
        .mapv(u8::from);
    assert_eq!(map.data, want);
    assert!(png.exists());

    // the paper U-Net's parameter count is PyTorch's (crates/models/tests/fixtures/networks.json)
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/networks.json"),
        )
        .expect("fixture"),
    )
    .expect("json");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "model",
        "--name",
        "unet",
        "--in-channels",
        "1",
        "--classes",
        "16",
        "--size",
        "64,64,64",
        "--json",
    ]))
    .expect("json");
    assert_eq!(json["parameters"], fixture["paper_unet_parameters"]);
    assert!(json["activation_bytes"].as_u64().expect("bytes") > 0);
    let err = fails(&["model", "--name", "unet", "--size", "60,64,64"]);
    assert!(err.contains("2^depth = 16"), "{err}");

    // cwseg loss on .npy files
    let logits = ndarray::Array5::<f32>::from_shape_fn((1, 3, 4, 5, 6), |(_, k, z, y, x)| {
        ((k * 7 + z * 3 + y * 5 + x) % 11) as f32 * 0.3 - 1.5
    });
    let target = ndarray::Array4::<i64>::from_shape_fn((1, 4, 5, 6), |(_, z, y, x)| {
        ((z + y / 2 + x / 3) % 3) as i64
    });
    let (lp, yp) = (dir.path().join("logits.npy"), dir.path().join("labels.npy"));
    ndarray_npy::write_npy(&lp, &logits).expect("npy");
    ndarray_npy::write_npy(&yp, &target).expect("npy");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "loss",
        "--logits",
        lp.to_str().expect("utf-8"),
        "--labels",
        yp.to_str().expect("utf-8"),
        "--loss",
        "ce",
        "--json",
    ]))
    .expect("json");
    // cross-entropy by hand
    let mut ce = 0.0f64;
    for ((_, z, y, x), &t) in target.indexed_iter() {
        let l: Vec<f64> = (0..3).map(|k| logits[[0, k, z, y, x]] as f64).collect();
        let m = l.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + l.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        ce += lse - l[t as usize];
    }
    ce /= target.len() as f64;
    assert!(
        (json["loss"].as_f64().expect("loss") - ce).abs() < 1e-5,
        "{json} vs {ce}"
    );
    assert!(json["grad_norm"].as_f64().expect("norm") > 0.0);
    let flat = dir.path().join("flat.npy");
    ndarray_npy::write_npy(&flat, &target.mapv(|v| v as f32)).expect("npy");
    let err = fails(&[
        "loss",
        "--logits",
        flat.to_str().expect("utf-8"),
        "--labels",
        yp.to_str().expect("utf-8"),
        "--loss",
        "ce",
    ]);
    assert!(err.contains("N,K,D,H,W"), "{err}");
}

#[test]
fn errors_are_one_clean_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = fails(&[
        "train",
        "--out",
        dir.path().join("run").to_str().expect("utf-8"),
        "--device",
        "cuda",
        "--epochs",
        "1",
    ]);
    if !cfg!(feature = "cuda") {
        assert!(err.contains("built without CUDA"), "{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    let bad = dir.path().join("broken.nii.gz");
    std::fs::write(&bad, b"not a nifti file").expect("write");
    let err = fails(&[
        "contour",
        "--label",
        bad.to_str().expect("utf-8"),
        "--output",
        dir.path().join("c.nii.gz").to_str().expect("utf-8"),
    ]);
    assert!(
        err.contains("broken.nii.gz") && !err.contains("panicked"),
        "{err}"
    );
    let err = fails(&[
        "predict",
        "--model",
        dir.path().to_str().expect("utf-8"),
        "--input",
        bad.to_str().expect("utf-8"),
        "--output",
        dir.path().join("o.nii.gz").to_str().expect("utf-8"),
    ]);
    assert!(err.contains("config.json"), "{err}");
    let err = fails(&[
        "train",
        "--out",
        dir.path().join("r2").to_str().expect("utf-8"),
        "--loss",
        "nonsense",
    ]);
    assert!(err.contains("nonsense"), "{err}");
    // the OS error once, not twice
    let missing = dir.path().join("missing.nii.gz");
    let err = fails(&[
        "contour",
        "--label",
        missing.to_str().expect("utf-8"),
        "--output",
        dir.path().join("c.nii.gz").to_str().expect("utf-8"),
    ]);
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    // a batch norm that would see one value: refused up front, no run folder left
    let run = dir.path().join("bs1");
    let err = fails(&[
        "train",
        "--out",
        run.to_str().expect("utf-8"),
        "--batch",
        "1",
        "--patch",
        "16,16,16",
    ]);
    assert!(
        err.contains("batch of at least 2") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!run.exists());
    let err = fails(&[
        "demo",
        "--seeds",
        "0",
        "--out",
        dir.path().join("demo").to_str().expect("utf-8"),
    ]);
    assert!(err.contains("--seeds 0"), "{err}");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/phantom-unet-cwcd");
    let err = fails(&[
        "predict",
        "--model",
        model.to_str().expect("utf-8"),
        "--input",
        missing.to_str().expect("utf-8"),
        "--output",
        dir.path().join("p.nii.gz").to_str().expect("utf-8"),
        "--overlap",
        "0.99",
    ]);
    assert!(err.contains("--overlap 0.99"), "{err}");
}

/// A reader that closes the pipe early (`| head`) ends the command quietly, never a panic.
#[test]
fn a_closed_pipe_is_not_a_panic() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/brats18-cv.toml");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cwseg"))
        .args([
            "experiment",
            "--config",
            file.to_str().expect("utf-8"),
            "--out",
            dir.path().to_str().expect("utf-8"),
            "--list",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        matches!(out.status.code(), Some(0 | 141)),
        "{:?}: {stderr}",
        out.status
    );
}

/// Inputs that once gave silent wrong answers or aborts now end in one clean error line, with
/// nothing written.
#[test]
fn silent_wrong_answers_are_errors() {
    use ndarray_npy::WriteNpyExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name);
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();
    // a NaN or negative learning rate is refused before the run folder exists
    for lr in ["NaN", "-1"] {
        let run = path(&format!("run-{lr}"));
        let err = fails(&["train", "--out", &s(&run), &format!("--lr={lr}")]);
        assert!(err.contains("optimizer.lr"), "{err}");
        assert!(!run.exists(), "a refused run left {}", run.display());
    }
    // `cwseg loss`: NaN logits, integer logits, a label beyond i32, a header promising more
    // data than the file has
    let write = |name: &str, write: &dyn Fn(std::fs::File)| {
        let p = path(name);
        write(std::fs::File::create(&p).expect("create"));
        p
    };
    let mut values = ndarray::Array5::<f32>::zeros((1, 2, 2, 2, 2));
    let good_logits = write("logits.npy", &|f| values.write_npy(f).expect("npy"));
    values[[0, 0, 0, 0, 0]] = f32::NAN;
    let nan_logits = write("nan.npy", &|f| values.write_npy(f).expect("npy"));
    let int_logits = write("int.npy", &|f| {
        ndarray::Array5::<i32>::zeros((1, 2, 2, 2, 2))
            .write_npy(f)
            .expect("npy")
    });
    let mut labels = ndarray::Array4::<i64>::zeros((1, 2, 2, 2));
    let good_labels = write("labels.npy", &|f| labels.write_npy(f).expect("npy"));
    labels[[0, 1, 1, 1]] = (1i64 << 32) + 1;
    let huge_label = write("huge_label.npy", &|f| labels.write_npy(f).expect("npy"));
    ok(&[
        "loss",
        "--logits",
        &s(&good_logits),
        "--labels",
        &s(&good_labels),
    ]);
    let err = fails(&[
        "loss",
        "--logits",
        &s(&nan_logits),
        "--labels",
        &s(&good_labels),
    ]);
    assert!(err.contains("nan.npy") && err.contains("NaN"), "{err}");
    let err = fails(&[
        "loss",
        "--logits",
        &s(&int_logits),
        "--labels",
        &s(&good_labels),
    ]);
    assert!(
        err.contains("int.npy") && err.contains("f32 or f64"),
        "{err}"
    );
    let err = fails(&[
        "loss",
        "--logits",
        &s(&good_logits),
        "--labels",
        &s(&huge_label),
    ]);
    assert!(err.contains("4294967297"), "{err}");
    let mut lying = std::fs::read(&good_logits).expect("read");
    let at = lying
        .windows(15)
        .position(|w| w == b"(1, 2, 2, 2, 2)")
        .expect("shape in header");
    lying[at..at + 15].copy_from_slice(b"(99999999999, )");
    let lying_path = path("lying.npy");
    std::fs::write(&lying_path, &lying).expect("write");
    let err = fails(&[
        "loss",
        "--logits",
        &s(&lying_path),
        "--labels",
        &s(&good_labels),
    ]);
    assert!(err.contains("lying.npy") && err.contains("bytes"), "{err}");
    // sizes that overflow: refused, nothing created
    let synth = path("synth");
    let err = fails(&["synth", "--out", &s(&synth), "--shape", "30000,30000,30000"]);
    assert!(err.contains("voxels"), "{err}");
    assert!(!synth.exists());
    // synth into a folder that holds a data set already: refused, nothing mixed
    ok(&[
        "synth",
        "--out",
        &s(&synth),
        "--train",
        "1",
        "--test",
        "0",
        "--shape",
        "16,16,16",
    ]);
    let err = fails(&[
        "synth",
        "--out",
        &s(&synth),
        "--train",
        "2",
        "--test",
        "0",
        "--shape",
        "16,16,16",
    ]);
    assert!(err.contains("already holds files"), "{err}");
    let err = fails(&["model", "--size", "1000000,1000000,1000000", "--json"]);
    assert!(err.contains("2^64"), "{err}");
    // a model whose weights hold NaN is refused at load, naming the tensor
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/phantom-unet-cwcd");
    let broken = path("broken-model");
    std::fs::create_dir_all(&broken).expect("dir");
    std::fs::copy(model.join("config.json"), broken.join("config.json")).expect("copy");
    let mut tensors =
        candle_core::safetensors::load(model.join("model.safetensors"), &candle_core::Device::Cpu)
            .expect("weights");
    let head = tensors["head.weight"].clone();
    let nan = (head.ones_like().expect("ones") * f64::NAN).expect("nan");
    tensors.insert("head.weight".into(), nan);
    candle_core::safetensors::save(&tensors, broken.join("model.safetensors")).expect("save");
    let image = path("image.nii.gz");
    cwseg_data::write_volume(
        &image,
        &ndarray::Array3::<f32>::zeros((16, 24, 24)),
        &cwseg_data::Geometry::new([16, 24, 24], [1.0; 3]),
    )
    .expect("write");
    let out = path("out.nii.gz");
    let predict = [
        "predict",
        "--model",
        &s(&broken),
        "--input",
        &s(&image),
        "--output",
        &s(&out),
    ];
    // the committed card records the weights' SHA-256, which this file no longer has
    let err = fails(&predict);
    assert!(
        err.contains("SHA-256") && err.contains("model.safetensors"),
        "{err}"
    );
    // without the digest, the NaN tensor itself is named
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(broken.join("config.json")).expect("card"))
            .expect("json");
    card.as_object_mut()
        .expect("object")
        .remove("weights_sha256");
    std::fs::write(broken.join("config.json"), card.to_string()).expect("write");
    let err = fails(&predict);
    assert!(err.contains("head.weight") && err.contains("NaN"), "{err}");
    assert!(!out.exists());
}

/// SIGTERM (a batch scheduler's stop) during training: the run stops after the step, saves,
/// exits with 143, and `--resume` finishes it.
#[test]
fn sigterm_saves_and_exits_143() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("term.toml");
    std::fs::write(&config, TINY.replace("epochs = 2", "epochs = 400")).expect("config");
    let run = dir.path().join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_cwseg"))
        .args([
            "train",
            "--config",
            config.to_str().expect("utf-8"),
            "--out",
        ])
        .arg(&run)
        .arg("--quiet")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // signal once the first epoch is written: training is under way
    let started = std::time::Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(true, |m| m.is_empty()) {
        assert!(started.elapsed().as_secs() < 120, "training never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(stderr.contains("saving"), "{stderr}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("last/state.json")).expect("saved state"),
    )
    .expect("json");
    assert_eq!(state["finished"], false);
    // the saved run resumes (and is extended no further than its 400 epochs: stop it again
    // with the test hook after a few batches)
    let resumed = Command::new(env!("CARGO_BIN_EXE_cwseg"))
        .args(["train", "--resume", "--quiet", "--out"])
        .arg(&run)
        .env("CWSEG_INTERRUPT_AFTER_BATCHES", "2")
        .output()
        .expect("resume");
    assert_eq!(
        resumed.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
}

/// Crash safety: a run killed with SIGKILL at several moments (some inside checkpoint writes)
/// and resumed each time ends with the weights and optimizer state of an uninterrupted run, bit
/// for bit, and one metrics line per epoch. 4 attempts by default; `CWSEG_KILLS=20` for the
/// recorded run of RELIABILITY.md.
#[test]
fn a_run_killed_at_random_moments_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let attempts: usize = std::env::var("CWSEG_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    // long enough that most attempts land before the run ends
    let epochs = if attempts > 4 { 3 * attempts } else { 6 };
    let config = dir.path().join("kill.toml");
    std::fs::write(
        &config,
        TINY.replace("epochs = 2", &format!("epochs = {epochs}"))
            .replace("workers = 2", "workers = 1"),
    )
    .expect("config");
    let config = config.to_str().expect("utf-8");
    // One unmeasured run first: the first run after a build reads a cold binary and can take
    // longer than the killed runs, whose delays would then outlast them all (no kill landing).
    ok(&[
        "train",
        "--config",
        config,
        "--out",
        dir.path().join("warm-up").to_str().expect("utf-8"),
        "--quiet",
    ]);
    let straight = dir.path().join("straight");
    let started = std::time::Instant::now();
    ok(&[
        "train",
        "--config",
        config,
        "--out",
        straight.to_str().expect("utf-8"),
        "--quiet",
    ]);
    // the kills land within the straight run's duration, whatever the machine's speed
    let whole = started.elapsed();
    let killed = dir.path().join("killed");
    let run = killed.to_str().expect("utf-8");
    // delays from the clock's nanoseconds: different moments on every test run
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos() as u64 | 1);
    let mut kills = 0;
    // a loaded machine can make the measured run slower than the killed ones: an attempt that
    // finished before its kill halves the delays that follow, and misses earn more attempts
    let mut scale = 1.0;
    let mut tries = 0;
    while tries < attempts || (kills == 0 && tries < 3 * attempts) {
        tries += 1;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = whole.mul_f64(scale * (0.1 + 0.8 * (seed % 1000) as f64 / 1000.0));
        let mut args = vec!["train", "--out", run, "--quiet"];
        if killed.join("last").exists() {
            args.push("--resume");
        } else {
            args.extend(["--config", config]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_cwseg"))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn");
        std::thread::sleep(delay);
        if child.try_wait().expect("wait").is_none() {
            child.kill().expect("SIGKILL");
            kills += 1;
        } else {
            scale *= 0.5;
        }
        child.wait().expect("reap");
    }
    let mut args = vec!["train", "--out", run, "--quiet"];
    if killed.join("last").exists() {
        args.push("--resume");
    } else {
        args.extend(["--config", config]);
    }
    ok(&args);
    assert!(
        kills > 0,
        "no kill landed: the run was faster than every delay"
    );
    eprintln!("{kills} of {tries} attempts killed the run");
    assert_same(
        &straight.join("last/model.safetensors"),
        &killed.join("last/model.safetensors"),
    );
    assert_same(
        &straight.join("last/optimizer.safetensors"),
        &killed.join("last/optimizer.safetensors"),
    );
    let lines: Vec<u64> = std::fs::read_to_string(killed.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["epoch"]
                .as_u64()
                .expect("epoch")
        })
        .collect();
    assert_eq!(lines, (1..=epochs as u64).collect::<Vec<_>>());
}

/// The main job stays honest: the quick demo (fixed seed) writes every file it promises and
/// learns at least 2 classes (mean DSC ≥ 0.5 with one of the two losses; measured on
/// 2026-12-02, AMD EPYC: liver 0.91 / 0.94 and vertebra 0.94 / 0.96 with CEDL / CWCD, every
/// other class failed in its 50 steps; the full demo learns all 7).
#[test]
fn the_quick_demo_learns_and_writes_what_it_promises() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("demo");
    let report = ok(&[
        "demo",
        "--quick",
        "--quiet",
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    for file in [
        "results.md",
        "results.json",
        "demo.png",
        "cedl-seed0/best/config.json",
        "cwcd-seed0/best/config.json",
    ] {
        assert!(out.join(file).exists(), "{file}");
    }
    assert!(
        report.contains("HD95 (mm)") && report.contains("NSD") && report.contains("CWCD − CEDL")
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).expect("json"))
            .expect("json");
    let mut learnt = std::collections::BTreeSet::new();
    for summary in json["summaries"].as_array().expect("summaries") {
        for class in summary["classes"].as_array().expect("classes") {
            if class["means"]["dice"].as_f64().is_some_and(|d| d >= 0.5) {
                learnt.insert(class["name"].as_str().expect("name").to_string());
            }
        }
    }
    assert!(learnt.len() >= 2, "learnt only {learnt:?}");
    assert!(
        json["paired_cwcd_minus_cedl"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
}

const TINY_EXPERIMENT: &str = r#"
name = "tiny"

[[table]]
name = "table1"
title = "tiny"
networks = ["unet"]
losses = ["ce", "cwcd"]
seeds = [0]

[networks.unet]
name = "unet"
filters = 4
depth = 2

[losses.cwcd]
name = "cwcd"
contour = { iterations = 1 }

[train]
patch = [16, 16, 16]
batch_size = 2
epochs = 1
batches_per_epoch = 2

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

#[test]
fn experiment_trains_each_run_once_resumes_and_tabulates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tiny-experiment.toml");
    std::fs::write(&config, TINY_EXPERIMENT).expect("config");
    let out = dir.path().join("exp");
    let args = [
        "experiment",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--quiet",
    ];
    // Ctrl-C during the first run: a clean stop, then the same command finishes the grid
    let interrupted = Command::new(env!("CARGO_BIN_EXE_cwseg"))
        .args(args)
        .env("CWSEG_INTERRUPT_AFTER_BATCHES", "1")
        .output()
        .expect("cwseg runs");
    assert_eq!(interrupted.status.code(), Some(130));
    assert!(
        String::from_utf8_lossy(&interrupted.stderr).contains("interrupted during unet-ce-seed0")
    );
    let report = ok(&args);
    for run in ["unet-ce-seed0", "unet-cwcd-seed0"] {
        let status: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("runs").join(run).join("status.json"))
                .expect("status"),
        )
        .expect("json");
        assert_eq!(status["state"], "done", "{run}");
        assert!(
            out.join("runs")
                .join(run)
                .join("predictions/phantom_003.nii.gz")
                .exists()
        );
    }
    assert!(report.contains("| U-Net | CE | 1/1 |") && report.contains("| U-Net | CWCD | 1/1 |"));
    assert!(out.join("table1.png").exists() && out.join("results.md").exists());

    let listed = ok(&[
        "experiment",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--list",
    ]);
    assert_eq!(listed, "unet-ce-seed0 done\nunet-cwcd-seed0 done\n");

    // a second invocation trains nothing
    let weights = out.join("runs/unet-ce-seed0/best/model.safetensors");
    let before = std::fs::metadata(&weights)
        .and_then(|m| m.modified())
        .expect("mtime");
    ok(&args);
    let after = std::fs::metadata(&weights)
        .and_then(|m| m.modified())
        .expect("mtime");
    assert_eq!(before, after, "a finished run was trained again");
    let epochs = std::fs::read_to_string(out.join("runs/unet-ce-seed0/metrics.jsonl"))
        .expect("metrics")
        .lines()
        .count();
    assert_eq!(epochs, 1);

    // a job array: shard 0/2 and 1/2 into another folder, then --collect: the same
    // predictions and tables as the unsharded grid
    let sharded = dir.path().join("exp-sharded");
    let with = |extra: &[&str]| {
        let mut a = vec![
            "experiment",
            "--config",
            config.to_str().expect("utf-8"),
            "--out",
            sharded.to_str().expect("utf-8"),
            "--quiet",
        ];
        a.extend_from_slice(extra);
        ok(&a)
    };
    assert_eq!(
        with(&["--list", "--shard", "1/2"]),
        "unet-cwcd-seed0 pending\n"
    );
    assert!(with(&["--shard", "0/2"]).contains("--collect once every shard is done"));
    assert_eq!(
        with(&["--list"]),
        "unet-ce-seed0 done\nunet-cwcd-seed0 pending\n"
    );
    with(&["--shard", "1/2"]);
    with(&["--collect"]);
    for file in [
        "table1.csv",
        "runs/unet-ce-seed0/predictions/phantom_003.nii.gz",
        "runs/unet-cwcd-seed0/predictions/phantom_003.nii.gz",
    ] {
        assert_eq!(
            std::fs::read(sharded.join(file)).expect("sharded output"),
            std::fs::read(out.join(file)).expect("unsharded output"),
            "{file}"
        );
    }

    // the table's MONAI DSC of every class equals `cwseg evaluate` on the same predictions
    let csv = std::fs::read_to_string(out.join("table1.csv")).expect("csv");
    let table_dice: Vec<f64> = csv
        .lines()
        .filter(|l| l.starts_with("table1,unet,ce,1,dsc_monai,") && !l.contains(",Avg,"))
        .map(|l| l.split(',').nth(6).expect("mean").parse().expect("number"))
        .collect();
    assert_eq!(table_dice.len(), 13, "one row per phantom class");
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "evaluate",
        "--pred",
        out.join("runs/unet-ce-seed0/predictions")
            .to_str()
            .expect("utf-8"),
        "--label",
        out.join("data/labelsTs").to_str().expect("utf-8"),
        "--aggregate",
        "monai",
        "--json",
    ]))
    .expect("json");
    let mut compared = 0;
    for (k, dice) in table_dice.iter().enumerate() {
        let Some(evaluated) = json["mean"][(k + 1).to_string()]["dice"].as_f64() else {
            continue;
        };
        assert!(
            (dice - evaluated).abs() < 1e-12,
            "class {}: table {dice} vs evaluate {evaluated}",
            k + 1
        );
        compared += 1;
    }
    assert!(compared > 0, "no class compared");

    // predictions are regenerable and not kept: the tables come back the same from the
    // per-case metrics each run wrote beside them
    let tables = std::fs::read(sharded.join("table1.csv")).expect("table");
    for run in ["unet-ce-seed0", "unet-cwcd-seed0"] {
        let folder = sharded.join("runs").join(run);
        assert!(folder.join("predictions.metrics.toml").is_file(), "{run}");
        std::fs::remove_dir_all(folder.join("predictions")).expect("remove");
        let _ = std::fs::remove_dir_all(folder.join("predictions-unprocessed"));
    }
    with(&["--collect"]);
    assert_eq!(
        std::fs::read(sharded.join("table1.csv")).expect("table"),
        tables,
        "the same table from the metrics alone"
    );
}

fn cwseg_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cwseg"));
    command
        .args(args)
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("cwseg runs")
}

/// Lays out `files` as the Hugging Face client caches a model repository: content-addressed
/// blobs (SHA-256 for the weights, git SHA-1 for the rest), a snapshot of symbolic links and
/// `refs/main`. Hashes are computed here, independently of cwseg's verifier.
fn hub_cache(cache: &Path, repo: &str, commit: &str, files: &[(&str, Vec<u8>)]) {
    use sha1::Digest as _;
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let blobs = folder.join("blobs");
    let snapshot = folder.join("snapshots").join(commit);
    std::fs::create_dir_all(&blobs).expect("blobs");
    std::fs::create_dir_all(&snapshot).expect("snapshot");
    std::fs::create_dir_all(folder.join("refs")).expect("refs");
    std::fs::write(folder.join("refs/main"), commit).expect("ref");
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    for (name, bytes) in files {
        let hash = if name.ends_with(".safetensors") {
            hex(&sha2::Sha256::digest(bytes))
        } else {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {}\0", bytes.len()).as_bytes());
            h.update(bytes);
            hex(&h.finalize())
        };
        std::fs::write(blobs.join(&hash), bytes).expect("blob");
        std::os::unix::fs::symlink(format!("../../blobs/{hash}"), snapshot.join(name))
            .expect("link");
    }
}

#[test]
fn export_then_predict_from_the_hub_cache_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let run = dir.path().join("run");
    ok(&[
        "train",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        run.to_str().expect("utf-8"),
        "--quiet",
    ]);
    let exported = dir.path().join("hf-model");
    ok(&[
        "export",
        run.to_str().expect("utf-8"),
        "--out",
        exported.to_str().expect("utf-8"),
        "--license",
        "apache-2.0",
    ]);
    let readme = std::fs::read_to_string(exported.join("README.md")).expect("card");
    assert!(readme.starts_with("---\nlicense: apache-2.0\n"), "{readme}");
    for tag in ["- medical-imaging", "- segmentation", "- cwseg", "- unet"] {
        assert!(readme.contains(tag), "{tag} in the card");
    }
    assert!(readme.contains("Validation DSC at the kept checkpoint"));
    let card: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(exported.join("config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(card["model"]["name"], "unet");
    assert_eq!(card["classes"].as_array().map(Vec::len), Some(14));
    let weights = exported.join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("weights");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + header_len]).expect("header");
    assert_eq!(header["__metadata__"]["model"], "unet");
    assert_eq!(header["__metadata__"]["dtype"], "f32");
    assert!(header["__metadata__"]["cwseg_version"].is_string());
    assert_same(&run.join("best/model.safetensors"), &weights);
    // an existing folder is never overwritten
    let err = fails(&[
        "export",
        run.to_str().expect("utf-8"),
        "--out",
        exported.to_str().expect("utf-8"),
    ]);
    assert!(err.contains("already exists"), "{err}");

    // an experiment table's rows for this network and loss become the card's cross-validation;
    // the experiment beside it says which loss each row's key trained (a CWCD variant with
    // another border is not this model's loss)
    let table = dir.path().join("primary.csv");
    let experiment = dir.path().join("experiment.toml");
    std::fs::write(
        &experiment,
        "name = \"cv\"\n[[table]]\nname = \"primary\"\nnetworks = [\"unet\"]\n\
         losses = [\"cedl\", \"cwcd\", \"cwcd-replicate\"]\nseeds = [0, 1]\n\
         [losses.cwcd-replicate]\nname = \"cwcd\"\ncontour = { border = \"replicate\" }\n[train]\n",
    )
    .expect("experiment");
    std::fs::write(
        &table,
        "table,network,loss,seeds,metric,region,mean,std,failures,per_seed\n\
         primary,unet,cedl,2,dsc_paper,WT,0.1,0.01,0,0.1;0.1\n\
         primary,unet,cwcd-replicate,2,dsc_paper,WT,0.2222,0.01,0,0.2;0.2\n\
         primary,unet,cwcd,2,dsc_paper,WT,0.81626,0.02094,1,0.8;0.83\n\
         primary,unet,cwcd,2,dsc_paper,ET,0.5697,0.1042,2,0.5;0.6\n\
         primary,unet,cwcd,2,dsc_monai,WT,0.78,0.03,1,0.75;0.81\n\
         primary,unet,cwcd,2,hd95_mm,WT,12.064,2.381,1,11;13\n\
         primary,unet,cwcd,2,hd95_mm,ET,15.9,8.92,2,9;22\n",
    )
    .expect("table");
    let with_cv = dir.path().join("hf-model-cv");
    let export_cv = |table: &Path, out: &Path| {
        cwseg(&[
            "export",
            run.to_str().expect("utf-8"),
            "--out",
            out.to_str().expect("utf-8"),
            "--cross-validation",
            table.to_str().expect("utf-8"),
        ])
    };
    let o = export_cv(&table, &with_cv);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let readme = std::fs::read_to_string(with_cv.join("README.md")).expect("card");
    assert!(readme.contains("## Cross-validation"), "{readme}");
    assert!(readme.contains("| metric | WT | ET |"), "{readme}");
    assert!(
        readme.contains(
            "| DSC (paper aggregation) | 0.8163 ± 0.0209 (1 failed) | 0.5697 ± 0.1042 (2 failed) |"
        ),
        "{readme}"
    );
    // MONAI's aggregation counts failures as 0 (nothing left out); a missing region is "-"
    assert!(
        readme.contains("| DSC (MONAI aggregation) | 0.7800 ± 0.0300 | - |"),
        "{readme}"
    );
    assert!(
        readme.contains("| HD95 (mm) | 12.06 ± 2.38 (1 failed) | 15.90 ± 8.92 (2 failed) |"),
        "{readme}"
    );
    assert!(
        !readme.contains("0.1000"),
        "another loss's row leaked: {readme}"
    );
    assert!(
        !readme.contains("0.2222"),
        "another variant's row leaked: {readme}"
    );
    // a table without this model's rows, or not a table, is refused naming the file
    std::fs::write(
        &table,
        "table,network,loss,seeds,metric,region,mean,std,failures,per_seed\n\
         primary,unet,cedl,2,dsc_paper,WT,0.1,0.01,0,0.1;0.1\n",
    )
    .expect("table");
    let o = export_cv(&table, &dir.path().join("cv-2"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("primary.csv") && err.contains("no row for network `unet` and loss `cwcd`"),
        "{err}"
    );
    assert!(!dir.path().join("cv-2").exists());
    let o = export_cv(&config, &dir.path().join("cv-3"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("tiny.toml") && err.contains("not a `cwseg experiment` table"),
        "{err}"
    );
    // without the experiment beside it, a table's loss keys cannot be told apart: refused
    std::fs::remove_file(&experiment).expect("remove");
    let o = export_cv(&table, &dir.path().join("cv-4"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("primary.csv") && err.contains("experiment.toml"),
        "{err}"
    );

    // the folder as the hub client caches it; pulled and predicted offline
    let cache = dir.path().join("hf-cache");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let files: Vec<(&str, Vec<u8>)> = ["config.json", "model.safetensors", "README.md"]
        .iter()
        .map(|f| (*f, std::fs::read(exported.join(f)).expect("file")))
        .collect();
    hub_cache(&cache, "cwseg/tiny", commit, &files);
    let env = [("HF_HUB_CACHE", cache.as_path())];
    let pulled = cwseg_env(&["pull", "cwseg/tiny"], &env);
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    assert!(
        String::from_utf8_lossy(&pulled.stdout)
            .trim()
            .ends_with(commit)
    );
    let image = run.join("data/imagesTs/phantom_003.nii.gz");
    let from_run = dir.path().join("from-run.nii.gz");
    let from_hub = dir.path().join("from-hub.nii.gz");
    for (model, out) in [
        (run.to_str().expect("utf-8"), &from_run),
        ("hf://cwseg/tiny", &from_hub),
    ] {
        let o = cwseg_env(
            &[
                "predict",
                "--model",
                model,
                "--input",
                image.to_str().expect("utf-8"),
                "--output",
                out.to_str().expect("utf-8"),
            ],
            &env,
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let a = cwseg_data::read_label(&from_run, &Default::default()).expect("labels");
    let b = cwseg_data::read_label(&from_hub, &Default::default()).expect("labels");
    assert_eq!(
        a.data, b.data,
        "the hub model predicts what the run predicts"
    );
    assert_eq!(a.geometry.affine(), b.geometry.affine());

    // the HF_HOME layout, a pinned commit, and a half-precision export
    let home = dir.path().join("hf-home");
    let half = dir.path().join("hf-model-f16");
    ok(&[
        "export",
        run.to_str().expect("utf-8"),
        "--out",
        half.to_str().expect("utf-8"),
        "--dtype",
        "f16",
    ]);
    let half_weights = std::fs::read(half.join("model.safetensors")).expect("weights");
    assert!(
        half_weights.len() < bytes.len() * 6 / 10,
        "f16 is about half"
    );
    let files: Vec<(&str, Vec<u8>)> = ["config.json", "model.safetensors"]
        .iter()
        .map(|f| (*f, std::fs::read(half.join(f)).expect("file")))
        .collect();
    hub_cache(&home.join("hub"), "cwseg/tiny-f16", commit, &files);
    let o = cwseg_env(
        &[
            "predict",
            "--model",
            &format!("hf://cwseg/tiny-f16@{commit}"),
            "--input",
            image.to_str().expect("utf-8"),
            "--output",
            dir.path().join("half.nii.gz").to_str().expect("utf-8"),
        ],
        &[("HF_HOME", home.as_path())],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // a corrupt blob, a missing file and an unknown model: one clear line each
    let blob = std::fs::read_link(cache.join(format!(
        "models--cwseg--tiny/snapshots/{commit}/model.safetensors"
    )))
    .expect("link");
    let blob = cache
        .join(format!("models--cwseg--tiny/snapshots/{commit}"))
        .join(blob);
    let mut corrupt = std::fs::read(&blob).expect("blob");
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    std::fs::write(&blob, corrupt).expect("write");
    let o = cwseg_env(&["pull", "cwseg/tiny"], &env);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("corrupt download") && err.contains("model.safetensors"),
        "{err}"
    );
    std::fs::remove_file(cache.join(format!(
        "models--cwseg--tiny/snapshots/{commit}/config.json"
    )))
    .expect("remove");
    let o = cwseg_env(&["pull", "cwseg/tiny"], &env);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("config.json is missing from the cache"),
        "{err}"
    );
    let o = cwseg_env(&["pull", "cwseg/absent", "--offline"], &env);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not in the Hugging Face cache"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// The models kept in `models/` (README: at most 25 MB in all) load strictly and still segment:
/// the phantom model finds the liver of a phantom it never saw, the BraTS models a tumour.
#[test]
fn committed_models_load_and_segment() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let mut total = 0;
    for entry in std::fs::read_dir(&models).expect("models/") {
        let folder = entry.expect("entry").path();
        if !folder.is_dir() {
            continue;
        }
        for file in ["config.json", "model.safetensors", "README.md"] {
            total += std::fs::metadata(folder.join(file))
                .unwrap_or_else(|e| panic!("{}/{file}: {e}", folder.display()))
                .len();
        }
    }
    assert!(
        total <= 25 << 20,
        "models/ holds {total} bytes, over the README's 25 MB"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    synth_one(&data, 7777);
    let prediction = dir.path().join("pred/phantom_000.nii.gz");
    std::fs::create_dir_all(dir.path().join("pred")).expect("dir");
    ok(&[
        "predict",
        "--model",
        models.join("phantom-unet-cwcd").to_str().expect("utf-8"),
        "--input",
        data.join("imagesTr/phantom_000.nii.gz")
            .to_str()
            .expect("utf-8"),
        "--output",
        prediction.to_str().expect("utf-8"),
    ]);
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "evaluate",
        "--pred",
        dir.path().join("pred").to_str().expect("utf-8"),
        "--label",
        data.join("labelsTr").to_str().expect("utf-8"),
        "--json",
    ]))
    .expect("json");
    let liver = json["mean"]["1"]["dice"].as_f64().expect("liver DSC");
    assert!(liver > 0.8, "liver DSC {liver}");

    // the BraTS models on one of their validation cases (never trained on; it chose the
    // checkpoint), where ../shared/data is present
    let brats = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/brats18");
    let case = "Brats18_CBICA_ALU_1";
    if !brats.join(case).is_dir() {
        eprintln!(
            "skipped the BraTS model check: {} is absent",
            brats.display()
        );
        return;
    }
    let input = dir.path().join("brats-in");
    std::fs::create_dir_all(&input).expect("dir");
    std::os::unix::fs::symlink(brats.join(case), input.join(case)).expect("link");
    for model in ["brats18-unet-cwcd", "brats18-unet-cedl"] {
        let out = dir.path().join(format!("pred-{model}"));
        ok(&[
            "predict",
            "--model",
            models.join(model).to_str().expect("utf-8"),
            "--input",
            input.to_str().expect("utf-8"),
            "--output",
            out.to_str().expect("utf-8"),
        ]);
        let json: serde_json::Value = serde_json::from_str(&ok(&[
            "evaluate",
            "--pred",
            out.join(format!("{case}.nii.gz")).to_str().expect("utf-8"),
            "--label",
            brats
                .join(case)
                .join(format!("{case}_seg.nii.gz"))
                .to_str()
                .expect("utf-8"),
            "--regions",
            "brats",
            "--json",
        ]))
        .expect("json");
        let wt = json["mean"]["WT"]["dice"].as_f64().expect("WT DSC");
        assert!(wt > 0.5, "{model}: whole-tumour DSC {wt}");
    }
}

/// `predict` reads the next case while it predicts one and writes in the background: each
/// case of a folder gets the labels it gets alone (no case's labels under another's name), a
/// bad case stops it with an error naming the file after the cases before it are written, and
/// a case with the wrong channel count is refused, never predicted.
#[test]
fn predict_stops_at_a_bad_case_after_writing_the_ones_before() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let model = models.join("phantom-unet-cwcd");
    let predict = |input: &Path, output: &Path| {
        vec![
            "predict".to_string(),
            "--model".into(),
            model.to_str().expect("utf-8").into(),
            "--input".into(),
            input.to_str().expect("utf-8").into(),
            "--output".into(),
            output.to_str().expect("utf-8").into(),
        ]
    };
    fn args(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let labels = |p: &Path| {
        cwseg_data::read_label(p, &Default::default())
            .expect("labels")
            .data
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    ok(&[
        "synth",
        "--out",
        data.to_str().expect("utf-8"),
        "--train",
        "2",
        "--test",
        "0",
        "--shape",
        "48,64,64",
        "--seed",
        "4242",
    ]);
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).expect("dir");
    for (from, to) in [("phantom_000", "a"), ("phantom_001", "c")] {
        std::fs::copy(
            data.join(format!("imagesTr/{from}.nii.gz")),
            input.join(format!("{to}.nii.gz")),
        )
        .expect("copy");
    }
    let out = dir.path().join("out");
    ok(&args(&predict(&input, &out)));
    for case in ["a", "c"] {
        let alone = dir.path().join(format!("{case}-alone.nii.gz"));
        ok(&args(&predict(
            &input.join(format!("{case}.nii.gz")),
            &alone,
        )));
        assert_eq!(
            labels(&out.join(format!("{case}.nii.gz"))),
            labels(&alone),
            "case {case}: the folder's labels differ from the case predicted alone"
        );
    }
    assert_ne!(labels(&out.join("a.nii.gz")), labels(&out.join("c.nii.gz")));

    std::fs::write(input.join("b.nii.gz"), b"not a nifti file").expect("write");
    let out = dir.path().join("out-bad");
    let err = fails(&args(&predict(&input, &out)));
    assert!(
        err.contains("b.nii.gz") && !err.contains("panicked"),
        "{err}"
    );
    assert!(
        out.join("a.nii.gz").is_file(),
        "the first case was not written"
    );
    assert!(!out.join("b.nii.gz").exists());
    assert!(!out.join("c.nii.gz").exists());

    // one channel for a four-channel model
    let err = fails(&[
        "predict",
        "--model",
        models.join("brats18-unet-cedl").to_str().expect("utf-8"),
        "--input",
        input.join("a.nii.gz").to_str().expect("utf-8"),
        "--output",
        dir.path().join("one.nii.gz").to_str().expect("utf-8"),
    ]);
    assert!(
        err.contains("a.nii.gz") && err.contains("1 channels") && err.contains("expects 4"),
        "{err}"
    );
    assert!(!dir.path().join("one.nii.gz").exists());
}

/// The committed experiment files parse, and every network and loss they name exists.
#[test]
fn committed_experiments_resolve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/brats18-cpu.toml");
    let listed = ok(&[
        "experiment",
        "--config",
        file.to_str().expect("utf-8"),
        "--out",
        dir.path().to_str().expect("utf-8"),
        "--list",
    ]);
    let runs: Vec<&str> = listed.lines().collect();
    // Table 1 (4 losses × 2 seeds), the ablation's 4 new losses × 2 seeds, CWCD with a
    // replicated border × 2 seeds, 3 networks × 2 losses
    assert_eq!(runs.len(), 24, "{listed}");
    assert_eq!(runs[0], "unet-gdl-seed0 pending");
    assert!(runs.contains(&"unetr-cwcd-seed0 pending"));
    // v2: 3 folds × (CEDL, CWCD × 2 seeds; GDL, DWCE, CE, CWCE, DL, SDL × 1 seed); its pilot
    for (name, count, first) in [
        ("brats18-cv.toml", 30, "unet-cedl-fold0-seed0 pending"),
        ("brats18-cv-pilot.toml", 2, "unet-cedl-fold0-seed0 pending"),
    ] {
        let file = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../experiments")
            .join(name);
        let listed = ok(&[
            "experiment",
            "--config",
            file.to_str().expect("utf-8"),
            "--out",
            dir.path().join(name).to_str().expect("utf-8"),
            "--list",
        ]);
        let runs: Vec<&str> = listed.lines().collect();
        assert_eq!(runs.len(), count, "{name}: {listed}");
        assert_eq!(runs[0], first, "{name}");
    }
}

/// A BraTS-layout data set in `dir/brats` (cases `Case_A`..`Case_E`: four modalities and a seg
/// with labels 1/2/4) and copies of the segs in `dir/segs`.
fn write_tiny_brats(dir: &Path) -> (PathBuf, PathBuf) {
    use cwseg_data::{Geometry, LabelMap, write_label, write_volume};
    let data = dir.join("brats");
    let segs = dir.join("segs");
    std::fs::create_dir_all(&segs).expect("dir");
    let geometry = Geometry::new([16, 20, 20], [1.0; 3]);
    let ids = ["Case_A", "Case_B", "Case_C", "Case_D", "Case_E"];
    for (i, id) in ids.iter().enumerate() {
        let case = data.join(id);
        std::fs::create_dir_all(&case).expect("dir");
        // a brain-like box with a tumour: edema (2) around a core (1) around enhancing (4)
        let label = ndarray::Array3::<u8>::from_shape_fn((16, 20, 20), |(z, y, x)| {
            let r = ((z as f64 - 8.0).powi(2)
                + (y as f64 - 9.0 - i as f64).powi(2)
                + (x as f64 - 10.0).powi(2))
            .sqrt();
            if r < 2.5 {
                4
            } else if r < 4.0 {
                1
            } else if r < 6.0 {
                2
            } else {
                0
            }
        });
        for (m, modality) in ["flair", "t1", "t1ce", "t2"].iter().enumerate() {
            let image = label.mapv(|l| 100.0 + 10.0 * f32::from(l) * (m as f32 + 1.0));
            write_volume(
                case.join(format!("{id}_{modality}.nii.gz")),
                &image,
                &geometry,
            )
            .expect("image");
        }
        let seg = LabelMap {
            data: label,
            geometry: geometry.clone(),
        };
        write_label(case.join(format!("{id}_seg.nii.gz")), &seg).expect("seg");
        write_label(segs.join(format!("{id}.nii.gz")), &seg).expect("seg copy");
    }
    (data, segs)
}

/// Cross-validation: each fold's runs predict only their fold's test cases, a table pools the
/// folds (equal to `cwseg evaluate` on the folds' predictions together), the paired comparison
/// has one difference per case, and each run decided its post-processing on BraTS regions.
#[test]
fn cross_validation_pools_the_folds_and_compares_losses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, segs) = write_tiny_brats(dir.path());
    let folds = [
        r#"{"train": ["Case_D", "Case_E"], "val": ["Case_C"], "test": ["Case_A", "Case_B"]}"#,
        r#"{"train": ["Case_A", "Case_B"], "val": ["Case_E"], "test": ["Case_C", "Case_D"]}"#,
        r#"{"train": ["Case_B", "Case_C", "Case_D"], "val": ["Case_A"], "test": ["Case_E"]}"#,
    ];
    let mut fold_files = Vec::new();
    for (i, fold) in folds.iter().enumerate() {
        let path = dir.path().join(format!("fold{i}.json"));
        std::fs::write(&path, fold).expect("fold");
        fold_files.push(format!("\"{}\"", path.display()));
    }
    let config = dir.path().join("cv.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "tiny-cv"
regions = "brats"
folds = [{}]
[[table]]
name = "t"
networks = ["unet"]
losses = ["cedl", "cwcd"]
seeds = [0]
[[table]]
name = "tp"
networks = ["unet"]
losses = ["cedl"]
seeds = [0]
predictions = "pooled"
[[comparison]]
name = "cwcd-vs-cedl"
network = "unet"
a = "cedl"
b = "cwcd"
seeds = [0]
[networks.unet]
name = "unet"
filters = 4
depth = 2
[losses.cwcd]
name = "cwcd"
contour = {{ iterations = 1 }}
[train]
patch = [16, 16, 16]
batch_size = 2
epochs = 2
batches_per_epoch = 3
[train.data]
source = "{}"
format = "brats"
"#,
            fold_files.join(", "),
            data.display()
        ),
    )
    .expect("config");
    let out = dir.path().join("exp");
    let args = [
        "experiment",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ];
    let listed = ok(&[&args[..], &["--list"]].concat());
    assert_eq!(listed.lines().count(), 6, "{listed}");
    assert!(listed.starts_with("unet-cedl-fold0-seed0 pending\nunet-cwcd-fold0-seed0 pending\n"));
    let report = ok(&[&args[..], &["--quiet"]].concat());
    assert!(report.contains("3-fold cross-validation"), "{report}");
    // every fold predicts its own test cases only; together, each case once
    let pooled = dir.path().join("pooled");
    std::fs::create_dir_all(&pooled).expect("dir");
    for (fold, tests) in [
        (0, &["Case_A", "Case_B"][..]),
        (1, &["Case_C", "Case_D"]),
        (2, &["Case_E"]),
    ] {
        let run = out.join(format!("runs/unet-cedl-fold{fold}-seed0"));
        let predicted: Vec<String> = std::fs::read_dir(run.join("predictions"))
            .expect("predictions")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(predicted.len(), tests.len(), "fold {fold}: {predicted:?}");
        for id in tests {
            assert!(
                run.join(format!("predictions-unprocessed/{id}.nii.gz"))
                    .exists()
            );
        }
        for id in tests {
            std::fs::copy(
                run.join(format!("predictions/{id}.nii.gz")),
                pooled.join(format!("{id}.nii.gz")),
            )
            .expect("copy");
        }
        let card: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("best/config.json")).expect("card"),
        )
        .expect("json");
        assert_eq!(card["contour_maps"], "volume");
        assert_eq!(
            card["weights_sha256"].as_str().map(str::len),
            Some(64),
            "fold {fold}: {card}"
        );
        assert_eq!(
            card["postprocessing"]["scored"],
            serde_json::json!(["WT", "TC", "ET"]),
            "fold {fold}: {card}"
        );
    }
    assert_table_equals_evaluate(&out.join("t.csv"), &pooled, &segs);
    assert_pooled_postprocessing(&out, &segs);
    // the comparison pairs the 5 cases (MONAI's rule keeps every case with the region)
    let comparison = std::fs::read_to_string(out.join("cwcd-vs-cedl.md")).expect("comparison");
    assert!(
        comparison.contains("| pooled | DSC (MONAI) | WT | 5 |"),
        "{comparison}"
    );
    assert!(
        comparison.contains("| fold 2 | DSC (MONAI) | WT | 1 |"),
        "{comparison}"
    );
    let per_case = std::fs::read_to_string(out.join("cwcd-vs-cedl.csv")).expect("csv");
    assert_eq!(
        per_case
            .lines()
            .filter(|l| l.starts_with("cwcd-vs-cedl,pooled,DSC (MONAI),WT,"))
            .count(),
        5
    );
}

/// The `pooled` table of the three-fold experiment above: one rule for the three folds, in each
/// run's `predictions-pooled.rule.toml`; the pooled predictions equal the unprocessed ones
/// where the rule keeps nothing, else differ only by voxels set to background; the table equals
/// `cwseg evaluate` on them, and its MONAI mean equals the rule's pooled DSC after.
fn assert_pooled_postprocessing(out: &Path, segs: &Path) {
    let runs = out.join("runs");
    let rules: Vec<toml::Value> = (0..3)
        .map(|fold| {
            let path = runs.join(format!(
                "unet-cedl-fold{fold}-seed0/predictions-pooled.rule.toml"
            ));
            toml::from_str(&std::fs::read_to_string(&path).expect("rule")).expect("toml")
        })
        .collect();
    assert!(rules.iter().all(|r| *r == rules[0]), "{rules:?}");
    let keeps = rules[0]["keep_largest"].as_array().expect("groups").len();
    let gathered = out.join("pooled-post");
    std::fs::create_dir_all(&gathered).expect("dir");
    let mut removed = 0usize;
    for entry in glob_runs(&runs, "predictions-pooled") {
        let unprocessed = entry
            .parent()
            .and_then(Path::parent)
            .expect("run")
            .join("predictions-unprocessed")
            .join(entry.file_name().expect("name"));
        let read = |p: &Path| {
            cwseg_data::read_label(p, &Default::default())
                .expect("prediction")
                .data
        };
        let (post, raw) = (read(&entry), read(&unprocessed));
        for (&a, &b) in post.iter().zip(raw.iter()) {
            assert!(a == b || a == 0, "{}: {b} became {a}", entry.display());
            removed += usize::from(a != b);
        }
        std::fs::copy(&entry, gathered.join(entry.file_name().expect("name"))).expect("copy");
    }
    if keeps == 0 {
        assert_eq!(removed, 0);
    }
    assert_eq!(std::fs::read_dir(&gathered).expect("dir").count(), 5);
    assert_table_equals_evaluate(&out.join("tp.csv"), &gathered, segs);
    let csv = std::fs::read_to_string(out.join("tp.csv")).expect("csv");
    let avg: f64 = csv
        .lines()
        .find(|l| l.starts_with("tp,unet,cedl,1,dsc_monai,Avg,"))
        .and_then(|l| l.split(',').nth(6))
        .and_then(|v| v.parse().ok())
        .expect("MONAI average");
    let after = rules[0]["validation_dice_after"].as_float().expect("after");
    assert!((avg - after).abs() < 1e-9, "table {avg}, rule {after}");
    let text = std::fs::read_to_string(out.join("tp.md")).expect("md");
    assert!(
        text.contains("pooled unprocessed test predictions"),
        "{text}"
    );
}

/// Every `RUN/FOLDER/*.nii.gz` of the CEDL runs under `runs`.
fn glob_runs(runs: &Path, folder: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for fold in 0..3 {
        let dir = runs.join(format!("unet-cedl-fold{fold}-seed0/{folder}"));
        for entry in std::fs::read_dir(&dir).expect("folder") {
            files.push(entry.expect("entry").path());
        }
    }
    files.sort();
    files
}

/// A BraTS-layout experiment (labels 1/2/4, trained as classes 1/2/3) is scored on the stored
/// labels: its WT/TC/ET equal `cwseg evaluate --regions brats` on the original seg files.
#[test]
fn brats_experiment_scores_the_stored_labels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, segs) = write_tiny_brats(dir.path());
    let split = dir.path().join("split.json");
    std::fs::write(
        &split,
        r#"{"train": ["Case_A", "Case_B"], "val": ["Case_C"], "test": ["Case_D", "Case_E"]}"#,
    )
    .expect("split");
    let config = dir.path().join("brats.toml");
    std::fs::write(
        &config,
        format!(
            r#"
name = "tiny-brats"
regions = "brats"
[[table]]
name = "t"
networks = ["unet"]
losses = ["cedl"]
seeds = [0]
[networks.unet]
name = "unet"
filters = 4
depth = 2
[train]
patch = [16, 16, 16]
batch_size = 2
epochs = 2
batches_per_epoch = 3
[train.data]
source = "{}"
format = "brats"
split = "{}"
"#,
            data.display(),
            split.display()
        ),
    )
    .expect("config");
    let out = dir.path().join("exp");
    ok(&[
        "experiment",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--quiet",
    ]);
    let predictions = out.join("runs/unet-cedl-seed0/predictions");
    let stored: std::collections::BTreeSet<u8> = ["Case_D", "Case_E"]
        .iter()
        .flat_map(|id| {
            cwseg_data::read_label(
                predictions.join(format!("{id}.nii.gz")),
                &Default::default(),
            )
            .expect("prediction")
            .data
            .into_iter()
        })
        .collect();
    assert!(
        stored.iter().all(|v| [0, 1, 2, 4].contains(v)),
        "{stored:?}"
    );
    // evaluate reads the original seg files (1/2/4) for the test cases
    let test_segs = dir.path().join("test-segs");
    std::fs::create_dir_all(&test_segs).expect("dir");
    for id in ["Case_D", "Case_E"] {
        std::fs::copy(
            segs.join(format!("{id}.nii.gz")),
            test_segs.join(format!("{id}.nii.gz")),
        )
        .expect("copy");
    }
    assert_table_equals_evaluate(&out.join("t.csv"), &predictions, &test_segs);
}

/// The MONAI-aggregation WT/TC/ET means of the CEDL row of an experiment table `t` equal
/// `cwseg evaluate --regions brats` on the predictions and the seg files.
fn assert_table_equals_evaluate(csv: &Path, predictions: &Path, segs: &Path) {
    let json: serde_json::Value = serde_json::from_str(&ok(&[
        "evaluate",
        "--pred",
        predictions.to_str().expect("utf-8"),
        "--label",
        segs.to_str().expect("utf-8"),
        "--regions",
        "brats",
        "--aggregate",
        "monai",
        "--json",
    ]))
    .expect("json");
    let name = csv
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .expect("table name");
    let csv = std::fs::read_to_string(csv).expect("csv");
    for region in ["WT", "TC", "ET"] {
        let table: f64 = csv
            .lines()
            .find(|l| l.starts_with(&format!("{name},unet,cedl,1,dsc_monai,{region},")))
            .expect("row")
            .split(',')
            .nth(6)
            .expect("mean")
            .parse()
            .expect("number");
        let evaluated = json["mean"][region]["dice"].as_f64().unwrap_or(f64::NAN);
        assert!(
            (table - evaluated).abs() < 1e-9 || (table.is_nan() && evaluated.is_nan()),
            "{region}: table {table}, evaluate {evaluated}"
        );
    }
}

/// `predict --shard I/N`: the shards written into one folder equal the unsharded predictions,
/// file for file; an index outside 0..N is refused.
#[test]
fn sharded_predictions_equal_the_unsharded_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    ok(&[
        "synth",
        "--out",
        data.to_str().expect("utf-8"),
        "--train",
        "3",
        "--test",
        "0",
        "--shape",
        "48,64,64",
    ]);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/phantom-unet-cwcd");
    let images = data.join("imagesTr");
    let args = |output: &Path, shard: &'static str| {
        let mut a = vec![
            "predict".to_string(),
            "--model".into(),
            model.to_str().expect("utf-8").into(),
            "--input".into(),
            images.to_str().expect("utf-8").into(),
            "--output".into(),
            output.to_str().expect("utf-8").into(),
        ];
        if !shard.is_empty() {
            a.extend(["--shard".to_string(), shard.to_string()]);
        }
        a
    };
    let run = |a: Vec<String>| ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let whole = dir.path().join("whole");
    let sharded = dir.path().join("sharded");
    run(args(&whole, ""));
    run(args(&sharded, "0/2"));
    assert_eq!(std::fs::read_dir(&sharded).expect("folder").count(), 2);
    run(args(&sharded, "1/2"));
    let names = |d: &Path| {
        let mut n: Vec<_> = std::fs::read_dir(d)
            .expect("folder")
            .map(|e| e.expect("entry").file_name())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&whole).len(), 3);
    assert_eq!(names(&whole), names(&sharded));
    for name in names(&whole) {
        assert_eq!(
            std::fs::read(whole.join(&name)).expect("read"),
            std::fs::read(sharded.join(&name)).expect("read"),
            "{name:?}"
        );
    }
    // an argument error (clap's exit code 2), naming the rule
    let refused = Command::new(env!("CARGO_BIN_EXE_cwseg"))
        .args(args(&dir.path().join("none"), "2/2"))
        .output()
        .expect("cwseg runs");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{err}");
    assert!(err.contains("0-based, from 0 to 1"), "{err}");
    assert!(!dir.path().join("none").exists());
}

/// A model whose card says `reorient` predicts the same labels in world space whether its input
/// is stored RAS or LPS (x and y reversed, the affine saying so); without it, the network sees
/// a mirrored body and the two predictions differ.
#[test]
fn reoriented_models_predict_the_same_labels_in_world_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    synth_one(&data, 31);
    let ras = data.join("imagesTr/phantom_000.nii.gz");
    let image = cwseg_data::read_image(&ras, &cwseg_data::ReadOptions::default()).expect("read");
    let mut lps_data = image.data.index_axis(ndarray::Axis(0), 0).to_owned();
    lps_data.invert_axis(ndarray::Axis(1));
    lps_data.invert_axis(ndarray::Axis(2));
    let mut affine = *image.geometry.affine();
    let [_, ny, nx] = image.geometry.shape();
    for (column, n) in [(0, nx), (1, ny)] {
        for row in affine.iter_mut().take(3) {
            row[3] += row[column] * (n - 1) as f64;
            row[column] = -row[column];
        }
    }
    let lps = dir.path().join("lps.nii.gz");
    let geometry = cwseg_data::Geometry::with_affine(image.geometry.shape(), affine);
    cwseg_data::write_volume(&lps, &lps_data, &geometry).expect("write");
    assert_eq!(geometry.orientation(), ['L', 'P', 'S']);

    let original = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/phantom-unet-cwcd");
    let reorienting = dir.path().join("model-ras");
    std::fs::create_dir_all(&reorienting).expect("dir");
    for file in ["model.safetensors", "README.md"] {
        std::fs::copy(original.join(file), reorienting.join(file)).expect("copy");
    }
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(original.join("config.json")).expect("card"))
            .expect("json");
    card["preprocessing"]["reorient"] = serde_json::json!(true);
    std::fs::write(reorienting.join("config.json"), card.to_string()).expect("card");

    let predict = |model: &Path, input: &Path, name: &str| {
        let output = dir.path().join(name);
        ok(&[
            "predict",
            "--model",
            model.to_str().expect("utf-8"),
            "--input",
            input.to_str().expect("utf-8"),
            "--output",
            output.to_str().expect("utf-8"),
            "--probabilities",
        ]);
        cwseg_data::read_label(&output, &cwseg_data::ReadOptions::default()).expect("read")
    };
    // the LPS prediction, its x and y turned back: the same world voxels as the RAS one
    let in_ras_order = |labels: cwseg_data::LabelMap| {
        let mut data = labels.data;
        data.invert_axis(ndarray::Axis(1));
        data.invert_axis(ndarray::Axis(2));
        data
    };
    let a = predict(&reorienting, &ras, "a.nii.gz");
    let b = predict(&reorienting, &lps, "b.nii.gz");
    assert_eq!(
        b.geometry.orientation(),
        ['L', 'P', 'S'],
        "written on the input's grid"
    );
    assert!(a.data.iter().any(|&v| v != 0), "something segmented");
    assert_eq!(
        in_ras_order(b),
        a.data,
        "reoriented: the same labels in world space"
    );
    // and the same probabilities (written on the input's grid, as the labels)
    let probability = |stem: &str| {
        cwseg_data::read_image(
            dir.path()
                .join(format!("{stem}_probabilities/class_01.nii.gz")),
            &cwseg_data::ReadOptions::default(),
        )
        .expect("probabilities")
    };
    let (pa, pb) = (probability("a"), probability("b"));
    assert_eq!(pb.geometry.orientation(), ['L', 'P', 'S']);
    let mut pb = pb.data.index_axis(ndarray::Axis(0), 0).to_owned();
    pb.invert_axis(ndarray::Axis(1));
    pb.invert_axis(ndarray::Axis(2));
    assert_eq!(pb, pa.data.index_axis(ndarray::Axis(0), 0));
    let c = predict(&original, &ras, "c.nii.gz");
    let d = predict(&original, &lps, "d.nii.gz");
    let differing = ndarray::Zip::from(&in_ras_order(d))
        .and(&c.data)
        .fold(0usize, |n, x, y| n + usize::from(x != y));
    assert!(
        differing > 100,
        "without reorient the mirrored input changes {differing} voxels"
    );
}

/// `nnunet_ct` is measured on the training cases at the start of training and recorded as
/// `clip_z_score` in the model card; `predict` uses the numbers and refuses a card that holds
/// the unmeasured request.
#[test]
fn ct_normalization_is_measured_on_the_training_cases_and_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ct.toml");
    let text =
        format!("{TINY}\n[data.preprocessing]\nnormalization = {{ kind = \"nnunet_ct\" }}\n");
    std::fs::write(&config, text).expect("config");
    let run = dir.path().join("run");
    let run_str = run.to_str().expect("utf-8");
    ok(&[
        "train",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        run_str,
        "--epochs",
        "1",
        "--quiet",
    ]);
    let card_path = run.join("best/config.json");
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&card_path).expect("card")).expect("json");
    let n = &card["preprocessing"]["normalization"];
    assert_eq!(n["kind"], "clip_z_score", "{n}");
    let number = |k: &str| n[k].as_f64().expect("number");

    // the same statistics, by hand, over the foreground of the training cases only, every case
    // weighing the same (nnU-Net's: the mixture of the cases' distributions)
    let split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("split.json")).expect("split"))
            .expect("json");
    let options = cwseg_data::ReadOptions::default();
    let mut foreground = Vec::new();
    let mut cases: Vec<Vec<f64>> = Vec::new();
    for id in split["train"].as_array().expect("train ids") {
        let id = id.as_str().expect("id");
        let image =
            cwseg_data::read_image(run.join(format!("data/imagesTr/{id}.nii.gz")), &options)
                .expect("image");
        let label =
            cwseg_data::read_label(run.join(format!("data/labelsTr/{id}.nii.gz")), &options)
                .expect("label");
        let mut case = Vec::new();
        ndarray::Zip::from(image.data.index_axis(ndarray::Axis(0), 0))
            .and(&label.data)
            .for_each(|&v, &l| {
                if l > 0 {
                    case.push(v as f64)
                }
            });
        foreground.extend(&case);
        if !case.is_empty() {
            cases.push(case);
        }
    }
    // E[f] = (1/m) Σ_c (1/n_c) Σ_{v ∈ c} f(v)
    let expect = |f: &dyn Fn(f64) -> f64| -> f64 {
        cases
            .iter()
            .map(|c| c.iter().map(|&v| f(v)).sum::<f64>() / c.len() as f64)
            .sum::<f64>()
            / cases.len() as f64
    };
    let mean = expect(&|v| v);
    let std = expect(&|v| (v - mean).powi(2)).sqrt();
    assert!(
        (number("mean") - mean).abs() < 1e-9 * (1.0 + mean.abs()),
        "mean {n}"
    );
    assert!((number("std") - std).abs() < 1e-9 * std, "std {n}");
    let (lo, hi) = foreground
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    assert!(
        lo <= number("lower_bound")
            && number("lower_bound") < number("upper_bound")
            && number("upper_bound") <= hi,
        "{n}"
    );

    let case = run.join("data/imagesTr");
    let first = std::fs::read_dir(&case)
        .expect("images")
        .next()
        .expect("a case")
        .expect("entry")
        .path();
    let predict = |model: &Path| {
        let out = dir.path().join("prediction.nii.gz");
        let args = [
            "predict",
            "--model",
            model.to_str().expect("utf-8"),
            "--input",
            first.to_str().expect("utf-8"),
            "--output",
            out.to_str().expect("utf-8"),
        ];
        (cwseg(&args), out)
    };
    let (output, written) = predict(&run.join("best"));
    assert!(output.status.success() && written.exists());
    std::fs::remove_file(&written).expect("remove");
    card["preprocessing"]["normalization"] = serde_json::json!({"kind": "nnunet_ct"});
    std::fs::write(&card_path, card.to_string()).expect("card");
    let (output, written) = predict(&run.join("best"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && !written.exists());
    assert!(
        stderr.contains("config.json") && stderr.contains("nnunet_ct"),
        "{stderr}"
    );
}

/// A command started by an MPI launcher as one of several processes: only `train` runs
/// data-parallel (and only in a build with `mpi`); the others would each do the whole work
/// into the same folder, so they refuse.
#[test]
fn commands_refuse_to_run_as_several_mpi_processes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../experiments/brats18-cv.toml");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cwseg"))
            .args(args)
            .env("OMPI_COMM_WORLD_SIZE", "2")
            .output()
            .expect("cwseg runs")
    };
    let out = run(&[
        "experiment",
        "--config",
        file.to_str().expect("utf-8"),
        "--list",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("only `cwseg train` trains data-parallel"),
        "{err}"
    );
    if !cfg!(feature = "mpi") {
        let run_dir = dir.path().join("run");
        let out = run(&[
            "train",
            "--out",
            run_dir.to_str().expect("utf-8"),
            "--epochs",
            "1",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("built without MPI"), "{err}");
        assert!(!run_dir.exists());
    }
}
