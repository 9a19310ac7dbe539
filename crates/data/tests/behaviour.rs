//! Files, data sets, splits and loaders: round trips, bad input, determinism.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cwseg_data::augment::AugmentConfig;
use cwseg_data::{
    DataError, Dataset, EpochLoader, Geometry, Image, LabelMap, LoaderConfig, PhantomConfig,
    ReadOptions, SamplerConfig, SamplingVolume, Split, draw_batch, read_image, read_label, slabs,
    stack_channels, write_label, write_phantom_dataset, write_volume,
};
use ndarray::{Array3, Array4};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn shared_brats() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/brats18");
    if path.is_dir() {
        Some(path)
    } else {
        assert!(
            std::env::var_os("CWSEG_REQUIRE_SHARED_DATA").is_none(),
            "CWSEG_REQUIRE_SHARED_DATA is set but {} is missing",
            path.display()
        );
        eprintln!("skipped: {} is absent", path.display());
        None
    }
}

#[test]
fn written_labels_keep_the_input_geometry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = read_image(fixture("int16_scaled.nii.gz"), &ReadOptions::default()).expect("image");
    let shape = image.geometry.shape();
    let labels = Array3::from_shape_fn(shape, |(z, y, x)| ((z + 2 * y + 3 * x) % 7) as u8);
    let out = dir.path().join("pred.nii.gz");
    write_label(
        &out,
        &LabelMap {
            data: labels.clone(),
            geometry: image.geometry.clone(),
        },
    )
    .expect("write");
    let back = read_label(&out, &ReadOptions::default()).expect("read back");
    assert_eq!(back.data, labels);
    assert_eq!(back.geometry.affine(), image.geometry.affine());
    let header = back.geometry.header().expect("header");
    let source = image.geometry.header().expect("header");
    assert_eq!(
        (header.sform_code, header.qform_code),
        (source.sform_code, source.qform_code)
    );
    assert_eq!(header.quatern_b, source.quatern_b);
    // no temporary files left behind
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
}

#[test]
fn a_new_geometry_is_written_as_an_sform() {
    let dir = tempfile::tempdir().expect("tempdir");
    let geometry = Geometry::new([3, 4, 5], [2.0, 1.5, 0.5]).crop([1, 0, 2], [2, 4, 3]);
    let data = Array3::from_shape_fn([2, 4, 3], |(z, y, x)| (z * 100 + y * 10 + x) as f32);
    let out = dir.path().join("v.nii");
    write_volume(&out, &data, &geometry).expect("write");
    let back = read_image(&out, &ReadOptions::default()).expect("read");
    assert_eq!(back.data.index_axis(ndarray::Axis(0), 0), data);
    assert_eq!(back.geometry.affine(), geometry.affine());
    assert_eq!(back.geometry.spacing(), [2.0, 1.5, 0.5]);
    assert_eq!(back.geometry.affine()[0][3], 1.0); // x moved by 2 voxels of 0.5 mm
}

fn expect_error(path: &Path, options: &ReadOptions) -> String {
    let err = read_image(path, options).expect_err("must fail");
    let message = err.to_string();
    assert!(
        message.contains(
            &path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .to_string()
        ),
        "error names the file: {message}"
    );
    message
}

#[test]
fn bad_files_give_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = std::fs::read(fixture("four_d.nii.gz")).expect("fixture");
    // truncated gzip
    let truncated = dir.path().join("truncated.nii.gz");
    std::fs::write(&truncated, &good[..good.len() / 2]).expect("write");
    expect_error(&truncated, &ReadOptions::default());
    // not gzip at all
    let garbage = dir.path().join("garbage.nii.gz");
    std::fs::write(&garbage, b"this is not a gzip stream at all").expect("write");
    expect_error(&garbage, &ReadOptions::default());
    // impossible dims: dim[0] = 9 in an uncompressed header
    let raw = std::fs::read(fixture("no_xform.nii")).expect("fixture");
    let mut bad = raw.clone();
    bad[40..42].copy_from_slice(&9i16.to_le_bytes());
    let dims = dir.path().join("dims.nii");
    std::fs::write(&dims, &bad).expect("write");
    let message = expect_error(&dims, &ReadOptions::default());
    assert!(message.contains("dim"), "{message}");
    // unknown datatype
    let mut bad = raw.clone();
    bad[70..72].copy_from_slice(&1234i16.to_le_bytes());
    let datatype = dir.path().join("datatype.nii");
    std::fs::write(&datatype, &bad).expect("write");
    expect_error(&datatype, &ReadOptions::default());
    // data shorter than the header says
    let short = dir.path().join("short.nii");
    std::fs::write(&short, &raw[..raw.len() - 8]).expect("write");
    expect_error(&short, &ReadOptions::default());
    // larger than the cap: refused from the header
    let err =
        read_image(fixture("no_xform.nii"), &ReadOptions { max_bytes: 100 }).expect_err("cap");
    assert!(matches!(err, DataError::TooLarge { .. }), "{err}");
    // missing
    expect_error(&dir.path().join("missing.nii.gz"), &ReadOptions::default());
    // a 4D file is not a label map
    let err = read_label(fixture("four_d.nii.gz"), &ReadOptions::default()).expect_err("4D");
    assert!(err.to_string().contains("channels"), "{err}");
}

/// The voxels start at `vox_offset`, as nibabel reads them: padding or an extension between the
/// header and the data is skipped (it once shifted the data); an offset inside the header or
/// past the end is an error naming the file.
#[test]
fn data_are_read_from_vox_offset() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = std::fs::read(fixture("no_xform.nii")).expect("fixture");
    assert_eq!(
        f32::from_le_bytes(raw[108..112].try_into().expect("4 bytes")),
        352.0
    );
    let reference = read_image(fixture("no_xform.nii"), &ReadOptions::default()).expect("read");
    let mut padded = raw[..352].to_vec();
    padded[108..112].copy_from_slice(&368f32.to_le_bytes());
    padded.extend_from_slice(&[0xab; 16]);
    padded.extend_from_slice(&raw[352..]);
    let plain = dir.path().join("padded.nii");
    std::fs::write(&plain, &padded).expect("write");
    let gz = dir.path().join("padded.nii.gz");
    let mut encoder = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).expect("create"),
        Default::default(),
    );
    encoder.write_all(&padded).expect("compress");
    encoder.finish().expect("finish");
    for path in [&plain, &gz] {
        let read = read_image(path, &ReadOptions::default()).expect("padded file");
        assert_eq!(read.data, reference.data, "{}", path.display());
    }
    let mut past_end = raw.clone();
    past_end[108..112].copy_from_slice(&((raw.len() + 64) as f32).to_le_bytes());
    let past = dir.path().join("past_end.nii");
    std::fs::write(&past, &past_end).expect("write");
    let message = expect_error(&past, &ReadOptions::default());
    assert!(message.contains("vox_offset"), "{message}");
    let mut inside = raw.clone();
    inside[108..112].copy_from_slice(&100f32.to_le_bytes());
    let inside_header = dir.path().join("inside_header.nii");
    std::fs::write(&inside_header, &inside).expect("write");
    let message = expect_error(&inside_header, &ReadOptions::default());
    assert!(message.contains("vox_offset 100"), "{message}");
}

#[test]
fn a_failed_write_keeps_the_old_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("keep.nii.gz");
    let geometry = Geometry::new([2, 2, 2], [1.0; 3]);
    write_volume(&out, &Array3::<u8>::ones((2, 2, 2)), &geometry).expect("write");
    let before = std::fs::read(&out).expect("read");
    let err = write_volume(&out, &Array3::<u8>::zeros((3, 2, 2)), &geometry).expect_err("shape");
    assert!(err.to_string().contains("keep.nii.gz"), "{err}");
    assert_eq!(std::fs::read(&out).expect("read"), before);
}

/// A `.nii.gz` of two gzip members (the raw file split inside its header, each part gzipped,
/// then concatenated, as `cat a.gz b.gz` makes; nibabel and gzip read it whole) reads as the
/// one-member file does.
#[test]
fn a_gzip_file_of_several_members_reads_whole() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let geometry = Geometry::new([3, 4, 5], [1.0, 1.5, 2.0]);
    let data = Array3::<f32>::from_shape_fn((3, 4, 5), |(z, y, x)| (z * 20 + y * 5 + x) as f32);
    let one = dir.path().join("one.nii.gz");
    write_volume(&one, &data, &geometry).expect("write");
    let mut raw = Vec::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(&one).expect("open"))
        .read_to_end(&mut raw)
        .expect("gunzip");
    let mut two = Vec::new();
    for part in [&raw[..200], &raw[200..]] {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(part).expect("gzip");
        two.extend(encoder.finish().expect("gzip"));
    }
    let path = dir.path().join("two.nii.gz");
    std::fs::write(&path, two).expect("write");
    let a = read_image(&one, &ReadOptions::default()).expect("one member");
    let b = read_image(&path, &ReadOptions::default()).expect("two members");
    assert_eq!(a.data, b.data);
    assert_eq!(a.geometry.affine(), b.geometry.affine());
}

/// A label value the `dataset.json` does not list, and images with fewer channels than its
/// modalities, are errors naming the file and `dataset.json`'s numbers.
#[test]
fn cases_that_disagree_with_dataset_json_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = PhantomConfig {
        shape: [16, 24, 24],
        ..PhantomConfig::default()
    };
    write_phantom_dataset(dir.path(), 1, 0, &config, 7).expect("written");
    let json_path = dir.path().join("dataset.json");
    let original = std::fs::read_to_string(&json_path).expect("json");
    let mut json: serde_json::Value = serde_json::from_str(&original).expect("json");
    json["labels"].as_object_mut().expect("labels").remove("1");
    std::fs::write(&json_path, json.to_string()).expect("write");
    let dataset = Dataset::open(dir.path()).expect("open");
    let err = dataset
        .load_case(&dataset.training[0], &ReadOptions::default())
        .expect_err("value 1 not listed")
        .to_string();
    assert!(
        err.contains("label value 1") && err.contains("dataset.json") && err.contains("labelsTr"),
        "{err}"
    );
    let mut json: serde_json::Value = serde_json::from_str(&original).expect("json");
    json["modality"] = serde_json::json!({"0": "CT", "1": "PET"});
    std::fs::write(&json_path, json.to_string()).expect("write");
    let err = match Dataset::open(dir.path()) {
        Err(e) => e.to_string(),
        Ok(d) => d
            .load_case(&d.training[0], &ReadOptions::default())
            .expect_err("one channel for two modalities")
            .to_string(),
    };
    assert!(err.contains("imagesTr") || err.contains("_0001"), "{err}");
}

#[test]
fn phantom_dataset_round_trips_through_msd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = PhantomConfig {
        shape: [16, 24, 24],
        ..PhantomConfig::default()
    };
    let dataset = write_phantom_dataset(dir.path(), 3, 2, &config, 7).expect("written");
    assert_eq!(dataset.training.len(), 3);
    assert_eq!(dataset.test.len(), 2);
    assert_eq!(dataset.classes.len(), 14);
    assert_eq!(dataset.modalities, vec!["CT"]);
    let (image, label) = dataset
        .load_case(&dataset.test[1], &ReadOptions::default())
        .expect("case");
    let label = label.expect("held-out labels");
    assert_eq!(image.data.dim(), (1, 16, 24, 24));
    assert_eq!(label.data.dim(), (16, 24, 24));
    let (fresh_image, fresh_label) = cwseg_data::phantom(&config, 11).expect("phantom");
    assert_eq!(label.data, fresh_label);
    assert_eq!(image.data.index_axis(ndarray::Axis(0), 0), fresh_image);
    let reopened = Dataset::open(dir.path()).expect("reopen");
    assert_eq!(reopened, dataset);
}

#[test]
fn dataset_json_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("dataset.json"), "{\"name\": 1").expect("write");
    let err = Dataset::msd(dir.path()).expect_err("invalid");
    assert!(err.to_string().contains("dataset.json"), "{err}");
    std::fs::write(
        dir.path().join("dataset.json"),
        r#"{"name": "x", "modality": {"0": "CT"}, "labels": {"0": "background"},
            "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}"#,
    )
    .expect("write");
    let err = Dataset::msd(dir.path()).expect_err("missing files");
    assert!(err.to_string().contains("a.nii.gz"), "{err}");
}

#[test]
fn brats_cases_load_with_regions_mapped() {
    let Some(root) = shared_brats() else { return };
    let dataset = Dataset::brats(&root).expect("brats");
    assert_eq!(dataset.training.len(), 12);
    assert_eq!(dataset.label_values, vec![0, 1, 2, 4]);
    let (image, label) = dataset
        .load_case(&dataset.training[0], &ReadOptions::default())
        .expect("case");
    let label = label.expect("seg");
    assert_eq!(image.data.dim(), (4, 155, 240, 240));
    assert!(label.data.iter().all(|&l| l <= 3));
    assert!(
        label.data.iter().any(|&l| l == 3),
        "ET (stored 4) becomes class 3"
    );
    assert_eq!(image.geometry.spacing(), [1.0, 1.0, 1.0]);
}

#[test]
fn splits_are_seeded_disjoint_and_checked() {
    let ids: Vec<String> = (0..12).map(|i| format!("case{i}")).collect();
    let a = Split::random(&ids, 3, 0.17, 0.33).expect("split");
    let b = Split::random(&ids, 3, 0.17, 0.33).expect("split");
    assert_eq!(a, b);
    assert_eq!((a.train.len(), a.val.len(), a.test.len()), (6, 2, 4));
    let mut all: Vec<_> = a
        .train
        .iter()
        .chain(&a.val)
        .chain(&a.test)
        .cloned()
        .collect();
    all.sort();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(all, sorted);
    assert_ne!(Split::random(&ids, 4, 0.17, 0.33).expect("split"), a);
    assert!(Split::random(&ids, 3, 0.6, 0.5).is_err());

    let dir = tempfile::tempdir().expect("tempdir");
    let config = PhantomConfig {
        shape: [8, 12, 12],
        ..PhantomConfig::default()
    };
    let dataset = write_phantom_dataset(dir.path(), 2, 1, &config, 0).expect("dataset");
    let split = Split {
        train: vec!["phantom_000".into()],
        val: vec!["phantom_001".into()],
        test: vec!["phantom_002".into()],
    };
    let path = dir.path().join("split.json");
    split.write(&path).expect("write");
    assert_eq!(Split::read(&path, &dataset).expect("read"), split);
    let bad = Split {
        train: vec!["nope".into()],
        val: vec![],
        test: vec![],
    };
    bad.write(&path).expect("write");
    let err = Split::read(&path, &dataset).expect_err("unknown case");
    assert!(
        err.to_string().contains("nope") && err.to_string().contains("split.json"),
        "{err}"
    );
}

fn volumes() -> Arc<Vec<SamplingVolume>> {
    let config = PhantomConfig {
        shape: [20, 28, 28],
        ..PhantomConfig::default()
    };
    Arc::new(
        (0..2)
            .map(|s| {
                let (image, label) = cwseg_data::phantom(&config, s).expect("phantom");
                SamplingVolume::new(image.insert_axis(ndarray::Axis(0)), label, [16, 16, 16])
                    .expect("volume")
            })
            .collect(),
    )
}

#[test]
fn loader_batches_depend_only_on_the_seed() {
    let volumes = volumes();
    let config = |workers| LoaderConfig {
        batch_size: 2,
        batches_per_epoch: 5,
        workers,
        prefetch: 1,
        sampler: SamplerConfig {
            size: [16, 16, 16],
            ..SamplerConfig::default()
        },
        augment: AugmentConfig::extended(),
        ..LoaderConfig::default()
    };
    let one: Vec<_> = EpochLoader::new(Arc::clone(&volumes), config(1), 9, 0)
        .map(|b| b.expect("batch"))
        .collect();
    let three: Vec<_> = EpochLoader::new(Arc::clone(&volumes), config(3), 9, 0)
        .map(|b| b.expect("batch"))
        .collect();
    assert_eq!(one.len(), 5);
    for (a, b) in one.iter().zip(&three) {
        assert_eq!(a.image, b.image);
        assert_eq!(a.label, b.label);
    }
    assert_eq!(one[0].image.dim(), (2, 1, 16, 16, 16));
    assert_eq!(one[0].label.dim(), (2, 16, 16, 16));
    let other = draw_batch(&volumes, &config(1), 9, 1, 0).expect("batch");
    assert_ne!(
        other.image, one[0].image,
        "another epoch draws other patches"
    );
    // dropping a loader early stops its workers
    let mut loader = EpochLoader::new(volumes, config(2), 1, 0);
    let _ = loader.next();
    drop(loader);
}

#[test]
fn positive_patches_hold_foreground_and_balanced_sampling_finds_rare_classes() {
    let volumes = volumes();
    let config = LoaderConfig {
        batch_size: 4,
        sampler: SamplerConfig {
            size: [16, 16, 16],
            positive: 1.0,
            negative: 0.0,
            class_balanced: true,
        },
        augment: AugmentConfig::none(),
        ..LoaderConfig::default()
    };
    let mut seen = [0usize; 14];
    for b in 0..20 {
        let batch = draw_batch(&volumes, &config, 0, 0, b).expect("batch");
        for patch in batch.label.outer_iter() {
            assert!(
                patch.iter().any(|&l| l != 0),
                "a positive patch has foreground"
            );
            for &l in patch {
                seen[l as usize] += 1;
            }
        }
    }
    assert!(
        seen[1..].iter().filter(|&&c| c > 0).count() >= 10,
        "most classes sampled: {seen:?}"
    );
}

#[test]
fn augmentation_keeps_image_and_labels_aligned() {
    // the image is the label map itself: after any spatial augmentation they must still agree
    let config = PhantomConfig {
        shape: [12, 32, 32],
        ..PhantomConfig::default()
    };
    let (_, label) = cwseg_data::phantom(&config, 3).expect("phantom");
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
    let always = AugmentConfig {
        rotation_probability: 1.0,
        flip_probability: 1.0,
        ..AugmentConfig::none()
    };
    for _ in 0..4 {
        let mut image: Array4<f32> = label.mapv(f32::from).insert_axis(ndarray::Axis(0));
        let mut l = label.clone();
        cwseg_data::augment(&mut image, &mut l, &always, &mut rng);
        assert_ne!(l, label);
        let agree = image
            .iter()
            .zip(l.iter())
            .filter(|(i, l)| (**i - f32::from(**l)).abs() < 1e-6)
            .count();
        // the image is interpolated linearly, the labels by nearest: they agree away from edges
        assert!(
            agree as f64 > 0.9 * l.len() as f64,
            "{agree} of {}",
            l.len()
        );
    }
}

#[test]
fn slabs_cover_the_volume_with_the_overlap() {
    assert_eq!(
        slabs(100, 32, 16).expect("slabs"),
        vec![0..32, 16..48, 32..64, 48..80, 64..96, 68..100]
    );
    assert_eq!(slabs(20, 32, 16).expect("slabs"), vec![0..20]);
    assert!(slabs(10, 4, 4).is_err());
}

/// A write that fails names the requested file, not its temporary, and leaves no temporary
/// behind (the target is a folder, so the final rename fails after the bytes were written).
#[test]
fn failed_writes_name_the_file_and_leave_no_temporary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("results.json");
    std::fs::create_dir(&target).expect("a folder where the file should go");
    let err = cwseg_data::dataset::write_atomic(&target, b"{}").expect_err("a folder");
    let named = format!("{}: ", target.display());
    assert!(err.to_string().starts_with(&named), "{err}");
    let volume = dir.path().join("label.nii.gz");
    std::fs::create_dir(&volume).expect("a folder where the volume should go");
    let label = cwseg_data::LabelMap {
        data: Array3::zeros((2, 3, 4)),
        geometry: cwseg_data::Geometry::new([2, 3, 4], [1.0, 1.0, 1.0]),
    };
    let err = cwseg_data::write_label(&volume, &label).expect_err("a folder");
    assert!(
        err.to_string().contains(&format!("{}", volume.display())),
        "{err}"
    );
    assert!(!err.to_string().contains("-tmp"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "only the two folders remain: {left:?}");
}

/// A case's files stacked as channels: in file order (as `ndarray::concatenate` stacks them),
/// files of several channels kept whole; a file of another shape or affine is refused by name.
#[test]
fn channel_files_stack_in_order_and_must_align() {
    let geometry = Geometry::new([2, 3, 4], [1.0; 3]);
    let image = |channels: usize, offset: f32| Image {
        data: Array4::from_shape_fn((channels, 2, 3, 4), |(c, z, y, x)| {
            offset + (c * 100 + z * 12 + y * 4 + x) as f32
        }),
        geometry: geometry.clone(),
    };
    let paths: Vec<PathBuf> = ["t1.nii.gz", "flair.nii.gz", "t2.nii.gz"]
        .iter()
        .map(PathBuf::from)
        .collect();
    let parts = vec![image(1, 0.0), image(2, 1000.0), image(1, 5000.0)];
    let views: Vec<_> = parts.iter().map(|i| i.data.view()).collect();
    let expected = ndarray::concatenate(ndarray::Axis(0), &views).expect("concatenate");
    let stacked = stack_channels(parts.clone(), &paths).expect("stacked");
    assert_eq!(stacked.data, expected);
    assert_eq!(stacked.geometry.affine(), geometry.affine());
    assert_eq!(stacked.geometry.shape(), geometry.shape());

    let mut other_shape = parts.clone();
    other_shape[2] = Image {
        data: Array4::zeros((1, 2, 3, 5)),
        geometry: Geometry::new([2, 3, 5], [1.0; 3]),
    };
    let err = stack_channels(other_shape, &paths).expect_err("shape");
    assert!(err.to_string().contains("t2.nii.gz"), "{err}");

    let mut shifted = parts;
    shifted[1].geometry = Geometry::new([2, 3, 4], [2.0, 1.0, 1.0]);
    let err = stack_channels(shifted, &paths).expect_err("affine");
    assert!(
        err.to_string().contains("flair.nii.gz") && err.to_string().contains("voxel-aligned"),
        "{err}"
    );
}
