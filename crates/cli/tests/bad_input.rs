//! Bad input of the second hostile tour (model cards, outputs that collide with inputs or
//! each other, BraTS folders, unreadable folder entries, sizes nothing bounded, exports that
//! would lose weights): each refused with one line naming the file and the field, exit 1,
//! nothing written; and the BraTS layouts `predict` and `evaluate` now read.

use std::path::{Path, PathBuf};

mod common;
use common::{fails, ok, s};

fn phantom_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/phantom-unet-cwcd")
}

fn brats_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/brats18-unet-cwcd")
}

/// A one-channel image the phantom model takes.
fn write_image(path: &Path) {
    let geometry = cwseg_data::Geometry::new([16, 24, 24], [1.0; 3]);
    let image = ndarray::Array3::<f32>::from_shape_fn((16, 24, 24), |(z, y, x)| {
        ((z * 7 + y * 3 + x) % 11) as f32 / 11.0
    });
    cwseg_data::write_volume(path, &image, &geometry).expect("image");
}

/// A label volume: a box of class 1 in background.
fn write_labels(path: &Path) {
    let geometry = cwseg_data::Geometry::new([16, 24, 24], [1.0; 3]);
    let labels = ndarray::Array3::<u8>::from_shape_fn((16, 24, 24), |(z, y, x)| {
        u8::from((4..12).contains(&z) && (6..18).contains(&y) && (6..18).contains(&x))
    });
    cwseg_data::write_volume(path, &labels, &geometry).expect("labels");
}

/// A copy of the phantom model with `edit` applied to its `config.json`.
fn edited_model(dir: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let model = dir.join(name);
    std::fs::create_dir_all(&model).expect("dir");
    for file in ["model.safetensors", "config.json"] {
        std::fs::copy(phantom_model().join(file), model.join(file)).expect("copy");
    }
    let path = model.join("config.json");
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    edit(&mut card);
    std::fs::write(&path, card.to_string()).expect("write");
    model
}

/// An edit of a model card's JSON.
type CardEdit = Box<dyn Fn(&mut serde_json::Value)>;

#[test]
fn inconsistent_model_cards_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("dir");
    let image = dir.path().join("img.nii.gz");
    write_image(&image);
    let out = dir.path().join("out.nii.gz");
    let cases: [(&str, CardEdit, &str); 7] = [
        (
            "short",
            Box::new(|c| {
                c["label_values"].as_array_mut().expect("values").pop();
            }),
            "label_values",
        ),
        (
            "duplicate",
            Box::new(|c| c["label_values"][2] = c["label_values"][1].clone()),
            "label_values",
        ),
        (
            "classes",
            Box::new(|c| {
                c["classes"].as_array_mut().expect("classes").pop();
            }),
            "classes",
        ),
        (
            "modalities",
            Box::new(|c| c["modalities"] = serde_json::json!(["a", "b"])),
            "modalities",
        ),
        (
            "huge",
            Box::new(|c| c["patch"] = serde_json::json!([4096, 4096, 4096])),
            "patch",
        ),
        (
            "zero",
            Box::new(|c| c["patch"] = serde_json::json!([0, 16, 16])),
            "patch",
        ),
        (
            "overlap",
            Box::new(|c| c["overlap"] = serde_json::json!(0.99)),
            "overlap",
        ),
    ];
    for (name, edit, field) in cases {
        let model = edited_model(dir.path(), name, edit);
        let err = fails(&[
            "predict",
            "--model",
            s(&model),
            "--input",
            s(&image),
            "--output",
            s(&out),
        ]);
        assert!(
            err.contains("config.json") && err.contains(field) && err.lines().count() == 1,
            "{name}: {err}"
        );
        assert!(!out.exists(), "{name}: nothing written");
    }
}

#[test]
fn outputs_never_overwrite_inputs_models_or_each_other() {
    let dir = tempfile::tempdir().expect("dir");
    let image = dir.path().join("img.nii.gz");
    write_image(&image);
    let model = edited_model(dir.path(), "model", |_| {});
    let weights = std::fs::read(model.join("model.safetensors")).expect("weights");
    // into the model folder
    let err = fails(&[
        "predict",
        "--model",
        s(&model),
        "--input",
        s(&image),
        "--output",
        s(&model.join("model.safetensors")),
    ]);
    assert!(err.contains("inside the model folder"), "{err}");
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).expect("weights"),
        weights
    );
    // contour's PNG onto its NIfTI
    let label = dir.path().join("label.nii.gz");
    ok(&[
        "predict",
        "--model",
        s(&model),
        "--input",
        s(&image),
        "--output",
        s(&label),
    ]);
    let c = dir.path().join("c.nii.gz");
    let err = fails(&[
        "contour",
        "--label",
        s(&label),
        "--output",
        s(&c),
        "--png",
        s(&c),
    ]);
    assert!(err.contains("--png") && err.contains("--output"), "{err}");
    assert!(!c.exists());
    // evaluate's CSV onto the label it reads
    let bytes = std::fs::read(&label).expect("label");
    let err = fails(&[
        "evaluate",
        "--pred",
        s(&label),
        "--label",
        s(&label),
        "--csv",
        s(&label),
    ]);
    assert!(
        err.contains("--csv") && err.contains("would be overwritten"),
        "{err}"
    );
    assert_eq!(std::fs::read(&label).expect("label"), bytes);
}

/// Two outputs of one input keep their own probabilities, and a folder of another model's
/// classes is replaced whole (no stale class file stays).
#[test]
fn probabilities_belong_to_their_output() {
    let dir = tempfile::tempdir().expect("dir");
    let image = dir.path().join("img.nii.gz");
    write_image(&image);
    let model = phantom_model();
    let classes = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(model.join("config.json")).expect("card"),
    )
    .expect("json")["classes"]
        .as_array()
        .expect("classes")
        .len();
    let stale = dir.path().join("a_probabilities");
    std::fs::create_dir_all(&stale).expect("dir");
    std::fs::write(
        stale.join(format!("class_{:02}.nii.gz", classes + 3)),
        b"old",
    )
    .expect("w");
    for name in ["a.nii.gz", "b.nii.gz"] {
        ok(&[
            "predict",
            "--model",
            s(&model),
            "--input",
            s(&image),
            "--output",
            s(&dir.path().join(name)),
            "--probabilities",
        ]);
    }
    for folder in ["a_probabilities", "b_probabilities"] {
        let count = std::fs::read_dir(dir.path().join(folder))
            .expect("folder")
            .count();
        assert_eq!(count, classes, "{folder}: one file per class, none stale");
    }
    assert!(!dir.path().join("img_probabilities").exists());
}

/// Folder entries that cannot be read (a broken link, a link loop) are errors naming them; two
/// cases whose non-UTF-8 names would give one output are refused naming both.
#[test]
fn unreadable_or_colliding_cases_are_not_dropped() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("dir");
    let model = phantom_model();
    for (name, make) in [
        ("dangling", "missing-target.nii.gz"),
        ("loop", "loop.nii.gz"),
    ] {
        let inputs = dir.path().join(name);
        std::fs::create_dir_all(&inputs).expect("dir");
        write_image(&inputs.join("good.nii.gz"));
        std::os::unix::fs::symlink(inputs.join(make), inputs.join("loop.nii.gz")).expect("link");
        let err = fails(&[
            "predict",
            "--model",
            s(&model),
            "--input",
            s(&inputs),
            "--output",
            s(&dir.path().join(format!("{name}-out"))),
        ]);
        assert!(err.contains("loop.nii.gz"), "{name}: {err}");
    }
    let latin = dir.path().join("latin");
    std::fs::create_dir_all(&latin).expect("dir");
    for byte in [0xe8u8, 0xe9] {
        let name = [b"case".as_slice(), &[byte], b".nii.gz"].concat();
        write_image(&latin.join(std::ffi::OsStr::from_bytes(&name)));
    }
    let out = dir.path().join("latin-out");
    let err = fails(&[
        "predict",
        "--model",
        s(&model),
        "--input",
        s(&latin),
        "--output",
        s(&out),
    ]);
    assert!(err.contains("are both the case file"), "{err}");
    assert!(std::fs::read_dir(&out).map_or(true, |mut e| e.next().is_none()));
}

/// A tiny BraTS folder: `CASE/CASE_{flair,t1,t1ce,t2,seg}.nii.gz`, each modality different.
fn write_brats(root: &Path, ids: &[&str]) {
    use cwseg_data::{Geometry, LabelMap, write_label, write_volume};
    let geometry = Geometry::new([20, 24, 24], [2.0; 3]);
    for id in ids {
        let case = root.join(id);
        std::fs::create_dir_all(&case).expect("dir");
        let label = ndarray::Array3::<u8>::from_shape_fn((20, 24, 24), |(z, y, x)| {
            let r =
                ((z as f64 - 10.0).powi(2) + (y as f64 - 12.0).powi(2) + (x as f64 - 12.0).powi(2))
                    .sqrt();
            match r {
                r if r < 2.5 => 4,
                r if r < 4.0 => 1,
                r if r < 6.0 => 2,
                _ => 0,
            }
        });
        for (m, modality) in ["flair", "t1", "t1ce", "t2"].iter().enumerate() {
            let image = ndarray::Array3::<f32>::from_shape_fn((20, 24, 24), |(z, y, x)| {
                let l = f32::from(label[[z, y, x]]);
                100.0 + 30.0 * l * (m as f32 + 1.0) + ((x * (m + 2) + y * 3 + z) % 7) as f32
            });
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
    }
}

fn probabilities(folder: &Path) -> Vec<Vec<f32>> {
    (0..4)
        .map(|k| {
            let image = cwseg_data::read_image(
                folder.join(format!("class_{k:02}.nii.gz")),
                &Default::default(),
            )
            .expect("probabilities");
            image.data.iter().copied().collect()
        })
        .collect()
}

/// A BraTS folder is stacked in the order the model's card names the modalities (here the
/// reverse of BraTS's), as the same files given as nnU-Net channel files in that order; one
/// case folder is one case; `evaluate` reads the BraTS label layout.
#[test]
fn brats_folders_follow_the_models_modalities() {
    let dir = tempfile::tempdir().expect("dir");
    let brats = dir.path().join("brats");
    write_brats(&brats, &["Case_A"]);
    let model = dir.path().join("reversed");
    std::fs::create_dir_all(&model).expect("dir");
    std::fs::copy(
        brats_model().join("model.safetensors"),
        model.join("model.safetensors"),
    )
    .expect("copy");
    let mut card: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(brats_model().join("config.json")).expect("card"),
    )
    .expect("json");
    card["modalities"] = serde_json::json!(["T2w", "t1gd", "T1w", "FLAIR"]);
    std::fs::write(model.join("config.json"), card.to_string()).expect("card");
    let channels = dir.path().join("channels");
    std::fs::create_dir_all(&channels).expect("dir");
    for (c, modality) in ["t2", "t1ce", "t1", "flair"].iter().enumerate() {
        std::fs::copy(
            brats.join(format!("Case_A/Case_A_{modality}.nii.gz")),
            channels.join(format!("Case_A_{c:04}.nii.gz")),
        )
        .expect("copy");
    }
    let predict = |input: &Path, out: &Path| {
        ok(&[
            "predict",
            "--model",
            s(&model),
            "--input",
            s(input),
            "--output",
            s(out),
            "--probabilities",
        ])
    };
    let (from_brats, from_channels, from_case) = (
        dir.path().join("p1"),
        dir.path().join("p2"),
        dir.path().join("p3"),
    );
    predict(&brats, &from_brats);
    predict(&channels, &from_channels);
    predict(&brats.join("Case_A"), &from_case);
    let a = probabilities(&from_brats.join("Case_A_probabilities"));
    assert_eq!(
        a,
        probabilities(&from_channels.join("Case_A_probabilities"))
    );
    assert_eq!(a, probabilities(&from_case.join("Case_A_probabilities")));
    // a model whose channels are not BraTS modalities is refused on a BraTS folder
    card["modalities"] = serde_json::json!(["channel_0", "channel_1", "channel_2", "channel_3"]);
    std::fs::write(model.join("config.json"), card.to_string()).expect("card");
    let err = fails(&[
        "predict",
        "--model",
        s(&model),
        "--input",
        s(&brats),
        "--output",
        s(&dir.path().join("p4")),
    ]);
    assert!(
        err.contains("config.json") && err.contains("channel_0"),
        "{err}"
    );
    // evaluate reads CASE/CASE_seg.nii.gz against the CASE.nii.gz predict wrote
    let report = ok(&[
        "evaluate",
        "--pred",
        s(&from_brats),
        "--label",
        s(&brats),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&report).expect("json");
    assert_eq!(report["cases"][0]["case"], "Case_A", "{report}");
}

#[test]
fn unbounded_sizes_are_refused_before_allocating() {
    let err = fails(&["bench", "--step-only", "--step-size", "100000"]);
    assert!(err.contains("--step-size"), "{err}");
}

/// An f16 export of a weight beyond f16's range is refused naming the tensor; nothing written.
#[test]
fn an_export_that_would_write_infinity_is_refused() {
    use candle_core::{DType, Device, Tensor};
    let dir = tempfile::tempdir().expect("dir");
    let model = edited_model(dir.path(), "model", |_| {});
    let path = model.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("weights");
    let (name, big) = tensors
        .iter()
        .find(|(n, t)| n.ends_with("weight") && t.dims().len() == 5)
        .map(|(n, t)| {
            (
                n.clone(),
                (t.to_dtype(DType::F32)
                    .and_then(|t| t.ones_like())
                    .expect("ones")
                    * 70000.0)
                    .expect("big"),
            )
        })
        .expect("a convolution");
    tensors.insert(name.clone(), big);
    let named: Vec<(String, Tensor)> = tensors.into_iter().collect();
    candle_core::safetensors::save(&named.into_iter().collect(), &path).expect("save");
    // the card's digest is of the old file: record the new one as training would
    let digest = cwseg_train::card::sha256_file(&path).expect("digest");
    let card_path = model.join("config.json");
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&card_path).expect("card")).expect("json");
    card["weights_sha256"] = serde_json::json!(digest);
    std::fs::write(&card_path, card.to_string()).expect("card");
    let out = dir.path().join("exported");
    let err = fails(&["export", s(&model), "--out", s(&out), "--dtype", "f16"]);
    assert!(err.contains(&name) && err.contains("65504"), "{err}");
    assert!(!out.exists());
    ok(&["export", s(&model), "--out", s(&out), "--dtype", "bf16"]);
}

/// Second tour. An output through a symbolic link replaces the link's target (the link stays),
/// a FIFO or device output is written into, never replaced by a regular file.
#[test]
fn outputs_through_links_and_devices_keep_them() {
    let dir = tempfile::tempdir().expect("dir");
    let label = dir.path().join("label.nii.gz");
    write_labels(&label);
    let target = dir.path().join("target.nii.gz");
    std::fs::write(&target, b"old").expect("write");
    let link = dir.path().join("link.nii.gz");
    std::os::unix::fs::symlink("target.nii.gz", &link).expect("link");
    ok(&["contour", "--label", s(&label), "--output", s(&link)]);
    assert!(std::fs::symlink_metadata(&link).expect("link").is_symlink());
    cwseg_data::read_label(&target, &Default::default()).expect("the target holds the map");
    let fifo = dir.path().join("fifo.csv");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success()
    );
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(&fifo).expect("read the fifo"))
    };
    ok(&[
        "evaluate",
        "--pred",
        s(&target),
        "--label",
        s(&target),
        "--csv",
        s(&fifo),
    ]);
    assert!(reader.join().expect("reader").starts_with("case,"));
    assert!(
        !std::fs::metadata(&fifo).expect("fifo").is_file(),
        "still a FIFO"
    );
    // a NIfTI output must be named .nii or .nii.gz
    let err = fails(&[
        "contour",
        "--label",
        s(&label),
        "--output",
        s(&dir.path().join("c.txt")),
    ]);
    assert!(err.contains(".nii"), "{err}");
}

/// A full standard output or error is an error exit (1), not a panic (101).
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cwseg"))
        .args(["model", "--json"])
        .stdout(full)
        .output()
        .expect("runs");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("standard output"));
}

/// Resampling to a grid nothing could hold (a card's spacing of 0.001 mm) is refused naming
/// the input, instead of an allocation failure's abort; synth counts that overflow too.
#[test]
fn absurd_grids_and_counts_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let image = dir.path().join("img.nii.gz");
    write_image(&image);
    let model = edited_model(dir.path(), "fine", |c| {
        c["preprocessing"]["spacing"] = serde_json::json!([0.001, 0.001, 0.001]);
    });
    let err = fails(&[
        "predict",
        "--model",
        s(&model),
        "--input",
        s(&image),
        "--output",
        s(&dir.path().join("o.nii.gz")),
    ]);
    assert!(
        err.contains("img.nii.gz") && err.contains("resampling"),
        "{err}"
    );
    let out = dir.path().join("synth");
    let err = fails(&[
        "synth",
        "--out",
        s(&out),
        "--train",
        "18446744073709551615",
        "--test",
        "1",
        "--shape",
        "16,16,16",
    ]);
    assert!(err.contains("phantoms"), "{err}");
    assert!(!out.join("dataset.json").exists());
}

/// A label folder holding `A.nii` and `A.nii.gz` is refused (each case counts once).
#[test]
fn a_case_in_two_label_files_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let (pred, label) = (dir.path().join("pred"), dir.path().join("label"));
    for folder in [&pred, &label] {
        std::fs::create_dir_all(folder).expect("dir");
        write_image(&folder.join("A.nii.gz"));
    }
    write_image(&label.join("A.nii"));
    let err = fails(&["evaluate", "--pred", s(&pred), "--label", s(&label)]);
    assert!(err.contains("A.nii") && err.contains("both"), "{err}");
}

/// Two `train` processes into one new run folder: one trains, the other is refused; the run
/// holds each epoch once.
#[test]
fn two_trainings_into_one_folder_do_not_mix() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("tiny.toml");
    std::fs::write(
        &config,
        r#"
patch = [16, 16, 16]
batch_size = 2
epochs = 3
batches_per_epoch = 2
[data]
source = "synthetic"
val_fraction = 0.34
[data.synthetic]
train = 3
test = 0
[data.synthetic.phantom]
shape = [16, 24, 24]
[model]
name = "unet"
filters = 4
depth = 2
[loss]
name = "ce"
"#,
    )
    .expect("config");
    let out = dir.path().join("run");
    let start = |seed: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cwseg"))
            .args([
                "train",
                "--config",
                s(&config),
                "--seed",
                seed,
                "--out",
                s(&out),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starts")
    };
    let (a, b) = (start("1"), start("2"));
    let (a, b) = (
        a.wait_with_output().expect("a"),
        b.wait_with_output().expect("b"),
    );
    let codes = [a.status.code(), b.status.code()];
    assert!(
        codes.contains(&Some(0)) && codes.contains(&Some(1)),
        "{codes:?}: {} / {}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
}

/// Second tour, weak spots: each now a clear refusal or the expected output.
#[test]
fn weak_spots_of_the_second_tour() {
    let dir = tempfile::tempdir().expect("dir");
    let label = dir.path().join("label.nii.gz");
    write_labels(&label);
    // `model --config` takes a file as well as JSON text
    let config = dir.path().join("net.json");
    std::fs::write(&config, r#"{"name": "unet", "filters": 4, "depth": 2}"#).expect("config");
    let out = ok(&[
        "model",
        "--config",
        s(&config),
        "--size",
        "16,16,16",
        "--json",
    ]);
    assert!(out.contains("parameters"), "{out}");
    // evaluate: duplicate run names refused; several runs' reports carry their names; CSV to
    // standard output; a negative tolerance refused before any file is read
    let err = fails(&[
        "evaluate",
        "--pred",
        s(&label),
        "--pred",
        s(&label),
        "--label",
        s(&label),
        "--name",
        "a",
        "--name",
        "a",
    ]);
    assert!(err.contains("`a`"), "{err}");
    let json = ok(&[
        "evaluate",
        "--pred",
        s(&label),
        "--pred",
        s(&label),
        "--label",
        s(&label),
        "--name",
        "a",
        "--name",
        "b",
        "--json",
    ]);
    let reports: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(reports[1]["name"], "b", "{json}");
    let csv = ok(&[
        "evaluate",
        "--pred",
        s(&label),
        "--label",
        s(&label),
        "--csv",
        "-",
    ]);
    assert!(csv.starts_with("case,"), "{csv}");
    assert!(!Path::new("-").exists());
    let err = fails(&[
        "evaluate",
        "--pred",
        s(&label),
        "--label",
        s(&label),
        "--tolerance",
        "-1",
    ]);
    assert!(err.contains("--tolerance"), "{err}");
    // degenerate losses
    for (text, field) in [
        (r#"{"name":"tversky","alpha":0,"beta":0}"#, "alpha"),
        (r#"{"name":"ce","class_weights":[0,0,0]}"#, "class_weights"),
        ("\u{feff}{\"name\":\"cwcd\",\"lambda\":-1}", "lambda"),
    ] {
        let path = dir.path().join("loss.json");
        std::fs::write(&path, text).expect("loss");
        let err = fails(&[
            "loss",
            "--logits",
            "x.npy",
            "--labels",
            "y.npy",
            "--config",
            s(&path),
        ]);
        assert!(err.contains(field), "{text}: {err}");
    }
    // model cards: a post-processing class the network lacks, a zero spacing
    let image = dir.path().join("img.nii.gz");
    write_image(&image);
    for (name, edit, field) in [
        (
            "post",
            Box::new(|c: &mut serde_json::Value| {
                c["postprocessing"]["keep_largest"][0]["classes"] = serde_json::json!([99]);
            }) as CardEdit,
            "postprocessing",
        ),
        (
            "spacing",
            Box::new(|c: &mut serde_json::Value| {
                c["preprocessing"]["spacing"] = serde_json::json!([0.0, 1.0, 1.0]);
            }),
            "preprocessing.spacing",
        ),
    ] {
        let model = edited_model(dir.path(), name, edit);
        let err = fails(&[
            "predict",
            "--model",
            s(&model),
            "--input",
            s(&image),
            "--output",
            s(&dir.path().join("o.nii.gz")),
        ]);
        assert!(
            err.contains("config.json") && err.contains(field),
            "{name}: {err}"
        );
    }
    let err = fails(&[
        "predict",
        "--model",
        s(&dir.path().join("nothing")),
        "--input",
        s(&image),
        "--output",
        s(&dir.path().join("o.nii.gz")),
    ]);
    assert!(err.contains("neither a model folder"), "{err}");
    // a shard with no case says so
    let folder = dir.path().join("one");
    std::fs::create_dir_all(&folder).expect("dir");
    write_image(&folder.join("a.nii.gz"));
    let said = ok(&[
        "predict",
        "--model",
        s(&phantom_model()),
        "--input",
        s(&folder),
        "--output",
        s(&dir.path().join("sharded")),
        "--shard",
        "1/3",
    ]);
    assert!(said.contains("no case"), "{said}");
}

/// nnU-Net v2's `ignore` label of a `dataset.json` is left out of the scores (not a failing
/// class), and `--regions brats` warns about values outside {0, 1, 2, 4}.
#[test]
fn ignored_voxels_are_not_scored() {
    let dir = tempfile::tempdir().expect("dir");
    let labels = dir.path().join("labels");
    let preds = dir.path().join("preds");
    for folder in [&labels, &preds] {
        std::fs::create_dir_all(folder).expect("dir");
    }
    write_labels(&labels.join("a.nii.gz"));
    let geometry = cwseg_data::Geometry::new([16, 24, 24], [1.0; 3]);
    let mut with_ignore = cwseg_data::read_label(labels.join("a.nii.gz"), &Default::default())
        .expect("labels")
        .data;
    with_ignore.slice_mut(ndarray::s![0..2, .., ..]).fill(255);
    cwseg_data::write_volume(labels.join("a.nii.gz"), &with_ignore, &geometry).expect("w");
    write_labels(&preds.join("a.nii.gz"));
    std::fs::write(
        dir.path().join("dataset.json"),
        r#"{"labels": {"background": 0, "box": 1, "ignore": 255}}"#,
    )
    .expect("dataset.json");
    let report = ok(&[
        "evaluate",
        "--pred",
        s(&preds),
        "--label",
        s(&labels),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&report).expect("json");
    let classes = report["cases"][0]["classes"].as_object().expect("classes");
    assert!(!classes.contains_key("255"), "{report}");
    assert_eq!(classes["1"]["dice"], 1.0, "{report}");
    let seven = dir.path().join("seven.nii.gz");
    let mut data = with_ignore.mapv(|v| if v == 255 { 7 } else { v });
    data[[8, 12, 12]] = 4;
    cwseg_data::write_volume(&seven, &data, &geometry).expect("w");
    let out = common::cwseg(&[
        "evaluate",
        "--pred",
        s(&seven),
        "--label",
        s(&seven),
        "--regions",
        "brats",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("value(s) 7"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With a card that resamples, the labels are the argmax of the probabilities `predict`
/// writes (was: argmax on the model's grid, then nearest resampling: 10–24 % of the
/// foreground disagreed).
#[test]
fn labels_are_the_argmax_of_the_written_probabilities() {
    let dir = tempfile::tempdir().expect("dir");
    let brats = dir.path().join("brats");
    write_brats(&brats, &["Case_A"]);
    // the BraTS model resamples to 2 mm: give it 1.2 mm voxels
    let case = brats.join("Case_A");
    for modality in ["flair", "t1", "t1ce", "t2"] {
        let path = case.join(format!("Case_A_{modality}.nii.gz"));
        let image = cwseg_data::read_image(&path, &Default::default()).expect("image");
        let geometry = cwseg_data::Geometry::new(image.geometry.shape(), [1.2, 1.2, 1.2]);
        let data = image.data.index_axis(ndarray::Axis(0), 0).to_owned();
        cwseg_data::write_volume(&path, &data, &geometry).expect("write");
    }
    let out = dir.path().join("out");
    ok(&[
        "predict",
        "--model",
        s(&brats_model()),
        "--input",
        s(&case),
        "--output",
        s(&out),
        "--probabilities",
        "--no-postprocess",
    ]);
    let labels = cwseg_data::read_label(out.join("Case_A.nii.gz"), &Default::default())
        .expect("labels")
        .data;
    let p = probabilities(&out.join("Case_A_probabilities"));
    let values = [0u8, 1, 2, 4];
    let mut disagree = 0;
    for (v, &label) in labels.iter().enumerate() {
        let best = (0..4)
            .max_by(|&a, &b| p[a][v].total_cmp(&p[b][v]).then(b.cmp(&a)))
            .expect("classes");
        disagree += usize::from(values[best] != label);
    }
    assert_eq!(disagree, 0, "voxels whose label is not the argmax");
    assert!(labels.iter().any(|&l| l != 0), "something segmented");
    // without --probabilities (a running argmax, one class at a time): the same labels
    let alone = dir.path().join("alone");
    ok(&[
        "predict",
        "--model",
        s(&brats_model()),
        "--input",
        s(&case),
        "--output",
        s(&alone),
        "--no-postprocess",
    ]);
    let again = cwseg_data::read_label(alone.join("Case_A.nii.gz"), &Default::default())
        .expect("labels")
        .data;
    assert_eq!(again, labels);
}

/// `export --license` takes an id only; `--evaluation` takes one run's report of this model's
/// classes.
#[test]
fn export_refuses_a_licence_that_is_not_an_id_and_a_foreign_report() {
    let dir = tempfile::tempdir().expect("dir");
    let model = edited_model(dir.path(), "model", |_| {});
    let out = dir.path().join("exported");
    let err = common::cwseg(&[
        "export",
        s(&model),
        "--out",
        s(&out),
        "--license",
        "mit\nlibrary_name: evil",
    ]);
    assert_eq!(err.status.code(), Some(2), "a usage error");
    assert!(!out.exists());
    let report = dir.path().join("report.json");
    std::fs::write(
        &report,
        r#"[{"aggregate": "paper", "mean": {"1": {}}}, {}]"#,
    )
    .expect("w");
    let err = fails(&[
        "export",
        s(&model),
        "--out",
        s(&out),
        "--evaluation",
        s(&report),
    ]);
    assert!(err.contains("several runs"), "{err}");
    std::fs::write(
        &report,
        r#"{"aggregate": "paper", "mean": {"99": {"dice": 1.0}}}"#,
    )
    .expect("w");
    let err = fails(&[
        "export",
        s(&model),
        "--out",
        s(&out),
        "--evaluation",
        s(&report),
    ]);
    assert!(err.contains("`99`"), "{err}");
    assert!(!out.exists());
    ok(&["export", s(&model), "--out", s(&out)]);
    let card = std::fs::read_to_string(out.join("README.md")).expect("card");
    assert!(
        !card.contains("license:") && card.contains("none stated"),
        "{card}"
    );
}

/// A small MSD phantom data set (`synth`) in `dir/data`: 4 training and 2 test cases of
/// 24³ voxels, the default seed.
fn phantom_data_set(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    ok(&[
        "synth",
        "--out",
        s(&data),
        "--train",
        "4",
        "--test",
        "2",
        "--shape",
        "24,24,24",
    ]);
    data
}

/// Fourth tour: `plan --out` into its own data set replaced `dataset.json` or a case with the
/// plan (and dropped `fingerprint.json` among the images); `--out` naming a folder wrote the
/// fingerprint into the folder's parent, then failed. Both refused before reading.
#[test]
fn a_plan_never_writes_into_its_data_set_or_beside_a_folder() {
    let dir = tempfile::tempdir().expect("dir");
    let data = phantom_data_set(dir.path());
    let description = data.join("dataset.json");
    let image = data.join("imagesTr/phantom_000.nii.gz");
    let before = (
        std::fs::read(&description).expect("json"),
        std::fs::read(&image).expect("image"),
    );
    let err = fails(&["plan", "--data", s(&data), "--out", s(&description)]);
    assert!(
        err.contains("data set") && err.contains("dataset.json"),
        "{err}"
    );
    let err = fails(&["plan", "--data", s(&data), "--out", s(&image)]);
    assert!(err.contains("phantom_000.nii.gz"), "{err}");
    let beside = data.join("labelsTr/plan.toml");
    let err = fails(&["plan", "--data", s(&data), "--out", s(&beside)]);
    assert!(err.contains("labelsTr"), "{err}");
    assert_eq!(std::fs::read(&description).expect("json"), before.0);
    assert_eq!(std::fs::read(&image).expect("image"), before.1);
    for folder in ["imagesTr", "labelsTr"] {
        assert!(!data.join(folder).join("fingerprint.json").exists());
    }
    // a folder as --out: refused, and no fingerprint in its parent
    let plans = dir.path().join("plans");
    std::fs::create_dir(&plans).expect("dir");
    let slash = format!("{}/", s(&dir.path().join("new")));
    for out in [s(&plans), slash.as_str()] {
        let err = fails(&["plan", "--data", s(&data), "--out", out]);
        assert!(err.contains("a folder"), "{err}");
    }
    assert!(!dir.path().join("fingerprint.json").exists());
    // the data set's root (not a folder of cases) takes a plan
    ok(&[
        "plan",
        "--data",
        s(&data),
        "--out",
        s(&data.join("plan.toml")),
    ]);
    // a budget below a tiny patch's need says both numbers, not 0.00 and 0.00
    let err = fails(&[
        "plan",
        "--data",
        s(&data),
        "--out",
        s(&plans.join("p.toml")),
        "--memory",
        "0.001",
    ]);
    assert!(!err.contains("0.00 GiB"), "{err}");
}

/// Fourth tour: a run normalised with measured CT statistics (`nnunet_ct`) could not be
/// resumed when a statistic had 17 significant digits: `serde_json` read the checkpoint's
/// number back one unit in the last place off, so the measured preprocessing "differed" and
/// every `train --resume` (and every rerun of an interrupted `cv`) was refused. On this data
/// set fold 1's lower bound, -0.0020970844249267586, is such a number.
#[test]
fn a_run_with_measured_ct_statistics_resumes() {
    let dir = tempfile::tempdir().expect("dir");
    let data = phantom_data_set(dir.path());
    let config = dir.path().join("ct.toml");
    let toml = format!(
        "patch = [16, 16, 16]\nbatch_size = 2\nepochs = 1\nbatches_per_epoch = 1\nworkers = 1\n\
         [data]\nsource = \"{}\"\n[data.preprocessing]\nspacing = [1.5, 1.0, 1.0]\n\
         [data.preprocessing.normalization]\nkind = \"nnunet_ct\"\n\
         [model]\nname = \"unet\"\nfilters = 4\ndepth = 2\n[loss]\nname = \"cwcd\"\n\
         [validation]\npostprocess = false\n",
        s(&data)
    );
    std::fs::write(&config, toml).expect("config");
    let run = dir.path().join("run");
    let fold = ["--fold", "1", "--folds", "2", "--quiet"];
    let train = |extra: &[&str]| {
        let mut args = vec!["train", "--config", s(&config), "--out", s(&run)];
        args.extend_from_slice(&fold);
        args.extend_from_slice(extra);
        ok(&args)
    };
    train(&[]);
    train(&["--resume", "--epochs", "2"]);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
}

/// Fourth tour: a copy of a model folder joined an ensemble as a second member and weighed
/// double in the mean (only the same folder was refused); the same weights are now refused,
/// naming both folders.
#[test]
fn a_copied_model_is_not_a_second_member() {
    let dir = tempfile::tempdir().expect("dir");
    let model = edited_model(dir.path(), "model", |_| {});
    let copy = edited_model(dir.path(), "copy", |_| {});
    let image = dir.path().join("case.nii.gz");
    write_image(&image);
    let out = dir.path().join("out.nii.gz");
    let err = fails(&[
        "predict",
        "--model",
        s(&model),
        "--model",
        s(&copy),
        "--input",
        s(&image),
        "--output",
        s(&out),
    ]);
    assert!(
        err.contains("same weights") && err.contains("copy"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Fourth tour: `evaluate --regions brats --classes 1,2` ignored `--classes` without a word;
/// `export --format monai --license` ignored the licence; a U-Net refused by `--format monai`
/// did not name the folder.
#[test]
fn flags_that_would_be_ignored_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let labels = dir.path().join("labels.nii.gz");
    write_labels(&labels);
    let err = fails(&[
        "evaluate",
        "--pred",
        s(&labels),
        "--label",
        s(&labels),
        "--regions",
        "brats",
        "--classes",
        "1,2",
    ]);
    assert!(
        err.contains("--classes") && err.contains("--regions"),
        "{err}"
    );
    let model = edited_model(dir.path(), "model", |_| {});
    let out = dir.path().join("monai");
    let err = fails(&[
        "export",
        s(&model),
        "--format",
        "monai",
        "--out",
        s(&out),
        "--license",
        "mit",
    ]);
    assert!(err.contains("--license"), "{err}");
    let err = fails(&["export", s(&model), "--format", "monai", "--out", s(&out)]);
    assert!(err.contains(s(&model)), "{err}");
    assert!(!out.exists());
    // an ensemble folder is not one model: said so, with its members
    let ensemble = dir.path().join("ensemble");
    std::fs::create_dir(&ensemble).expect("dir");
    std::fs::write(
        ensemble.join("ensemble.json"),
        r#"{"members": ["../model"], "postprocessing": null}"#,
    )
    .expect("write");
    for format in ["cwseg", "monai"] {
        let err = fails(&["export", s(&ensemble), "--format", format, "--out", s(&out)]);
        assert!(
            err.contains("an ensemble") && err.contains("../model"),
            "{err}"
        );
    }
    assert!(!out.exists());
}

/// Fourth tour: a fold whose `split.json` no longer holds its share of the cases (edited,
/// damaged, or the data set grew) left cases out of `cv.json`'s "every training case once"
/// without a word; the rerun now refuses, naming the file.
#[test]
fn a_fold_that_lost_its_validation_cases_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let config = common::write_tiny_run(dir.path(), "cedl");
    let out = dir.path().join("cv");
    ok(&[
        "cv",
        "--config",
        s(&config),
        "--out",
        s(&out),
        "--folds",
        "3",
        "--quiet",
    ]);
    let split = out.join("fold_0/split.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&split).expect("split")).expect("json");
    let case = json["val"].as_array_mut().expect("val").remove(0);
    json["train"].as_array_mut().expect("train").push(case);
    std::fs::write(&split, json.to_string()).expect("write");
    let err = fails(&[
        "cv",
        "--config",
        s(&config),
        "--out",
        s(&out),
        "--folds",
        "3",
        "--quiet",
    ]);
    assert!(
        err.contains("fold_0/split.json") && err.contains("share"),
        "{err}"
    );
}

/// Fourth tour: `cv --out` inside the data set's folder made `fold_0/` there first, which a
/// BraTS folder then read as a case ("missing fold_0/fold_0_flair.nii.gz"); refused up front,
/// nothing made.
#[test]
fn a_cross_validation_inside_its_data_set_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let data = phantom_data_set(dir.path());
    let config = common::write_tiny_run(dir.path(), "cedl");
    for out in [data.clone(), data.join("cv")] {
        let err = fails(&[
            "cv",
            "--config",
            s(&config),
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--folds",
            "2",
        ]);
        assert!(err.contains("inside the data set"), "{err}");
    }
    assert!(!data.join("fold_0").exists() && !data.join("cv").exists());
}

/// Fourth tour: a damaged out-of-fold prediction (a truncated `oof/CASE.nii.gz` newer than
/// the weights) stopped every rerun of `cv` ("incomplete deflate stream"); it is a cache cv
/// can remake, so it is predicted again and the report equals the undamaged one.
#[test]
fn a_damaged_out_of_fold_prediction_is_made_again() {
    let dir = tempfile::tempdir().expect("dir");
    let config = common::write_tiny_run(dir.path(), "cedl");
    let out = dir.path().join("cv");
    let cv = || {
        ok(&[
            "cv",
            "--config",
            s(&config),
            "--out",
            s(&out),
            "--folds",
            "3",
            "--quiet",
        ])
    };
    cv();
    let report = std::fs::read_to_string(out.join("cv.json")).expect("report");
    let oof = std::fs::read_dir(out.join("oof"))
        .expect("oof")
        .next()
        .expect("a prediction")
        .expect("entry")
        .path();
    let bytes = std::fs::read(&oof).expect("read");
    std::fs::write(&oof, &bytes[..bytes.len() / 2]).expect("truncate");
    cv();
    assert_eq!(
        std::fs::read_to_string(out.join("cv.json")).expect("report"),
        report
    );
    assert_eq!(std::fs::read(&oof).expect("read"), bytes);
}

/// `cwseg loss` on logits with no sample, class or voxel is refused naming the file and its
/// shape (it used to fail inside a reduction: "empty tensor for reduce").
#[test]
fn loss_command_refuses_empty_logits() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (logits, labels)) in [
        (vec![0, 2, 2, 2, 2], vec![0, 2, 2, 2]),
        (vec![1, 2, 0, 2, 2], vec![1, 0, 2, 2]),
    ]
    .into_iter()
    .enumerate()
    {
        let (l, y) = (
            dir.path().join(format!("logits{i}.npy")),
            dir.path().join(format!("labels{i}.npy")),
        );
        ndarray_npy::write_npy(&l, &ndarray::ArrayD::<f32>::zeros(logits.clone())).expect("npy");
        ndarray_npy::write_npy(&y, &ndarray::ArrayD::<i64>::zeros(labels)).expect("npy");
        let err = fails(&[
            "loss",
            "--logits",
            s(&l),
            "--labels",
            s(&y),
            "--loss",
            "cedl",
        ]);
        assert!(
            err.contains(&format!("logits{i}.npy")) && err.contains("no sample, class or voxel"),
            "{logits:?}: {err}"
        );
    }
}
