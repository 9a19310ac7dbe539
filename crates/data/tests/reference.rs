//! cwseg-data against nibabel, scipy and MONAI (fixtures from `scripts/fixtures/data_fixtures.py`).

use std::fs::File;
use std::path::PathBuf;

use cwseg_data::augment::in_plane_map;
use cwseg_data::crop::pad_or_crop_channels;
use cwseg_data::intensity::{
    ForegroundIntensities, IntensityProperties, Normalization, foreground_voxels_per_case,
    normalize_channel,
};
use cwseg_data::resample::{Interpolation, sample, spacing_grid};
use cwseg_data::{
    Blender, DataError, Geometry, ReadOptions, gaussian_importance, percentile, read_image,
    read_label, window_positions,
};
use ndarray::{Array, Array2, Array3, Array4, ArrayD, Dimension, Ix2, Ix3, Ix4};
use ndarray_npy::NpzReader;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn array<D: Dimension>(name: &str) -> Array<f64, D> {
    let mut npz = NpzReader::new(File::open(fixtures().join("arrays.npz")).expect("arrays.npz"))
        .expect("npz");
    if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<f64>, D>(name) {
        return a;
    }
    if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<f32>, D>(name) {
        return a.mapv(f64::from);
    }
    let a: ArrayD<u8> = npz.by_name(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    a.mapv(f64::from).into_dimensionality().expect("rank")
}

fn assert_close<D: Dimension>(got: &Array<f64, D>, want: &Array<f64, D>, tol: f64, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: element {i}: {g} vs {w}"
        );
    }
}

fn affine_array(a: &[[f64; 4]; 4]) -> Array2<f64> {
    Array2::from_shape_fn((4, 4), |(r, c)| a[r][c])
}

#[test]
fn nifti_reading_matches_nibabel() {
    let meta = reference();
    for (key, entry) in meta["nifti"].as_object().expect("nifti entries") {
        let file = fixtures().join(entry["file"].as_str().expect("file"));
        let image = read_image(&file, &ReadOptions::default()).expect("readable");
        let want: ArrayD<f64> = array(&format!("{key}_data"));
        let got = image.data.mapv(f64::from).into_dyn();
        let got = if want.ndim() == 3 {
            got.index_axis_move(ndarray::Axis(0), 0)
        } else {
            got
        };
        assert_close(&got, &want, 1e-6, key);
        let affine: Array2<f64> = array::<Ix2>(&format!("{key}_affine"));
        assert_close(&affine_array(image.geometry.affine()), &affine, 1e-5, key);
        let codes: String = image.geometry.orientation().iter().collect();
        assert_eq!(codes, entry["axcodes"].as_str().expect("codes"), "{key}");
        let zooms: Vec<f64> = entry["zooms_zyx"]
            .as_array()
            .expect("zooms")
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect();
        for (g, w) in image.geometry.spacing().iter().zip(&zooms) {
            assert!((g - w).abs() < 1e-5, "{key}: spacing {g} vs {w}");
        }
        // nibabel's as_closest_canonical
        let canonical = image.to_canonical();
        let want: ArrayD<f64> = array(&format!("{key}_canonical"));
        let got = canonical.data.mapv(f64::from).into_dyn();
        let got = if want.ndim() == 3 {
            got.index_axis_move(ndarray::Axis(0), 0)
        } else {
            got
        };
        assert_close(&got, &want, 1e-6, &format!("{key} canonical"));
        let affine: Array2<f64> = array::<Ix2>(&format!("{key}_canonical_affine"));
        assert_close(
            &affine_array(canonical.geometry.affine()),
            &affine,
            1e-5,
            &format!("{key} canonical affine"),
        );
        assert_eq!(canonical.geometry.orientation(), ['R', 'A', 'S'], "{key}");
        let grid = image.geometry.to_canonical();
        assert_eq!(
            grid.shape(),
            canonical.geometry.shape(),
            "{key}: the grid alone"
        );
        assert_eq!(
            grid.affine(),
            canonical.geometry.affine(),
            "{key}: the grid alone"
        );
        // and back: from_canonical inverts it on every fixture orientation
        let channel = canonical.data.index_axis(ndarray::Axis(0), 0).to_owned();
        let back = cwseg_data::from_canonical(&channel, &image.geometry);
        assert_eq!(
            back,
            image.data.index_axis(ndarray::Axis(0), 0),
            "{key}: back from canonical"
        );
    }
}

#[test]
fn labels_read_as_class_indices() {
    for key in ["uint8_label", "float64_label"] {
        let label = read_label(
            fixtures().join(format!("{key}.nii.gz")),
            &ReadOptions::default(),
        )
        .expect("label");
        let want: Array3<f64> = array::<Ix3>(&format!("{key}_data"));
        assert_close(&label.data.mapv(f64::from), &want, 0.0, key);
    }
    let err = read_label(fixtures().join("bad_label.nii.gz"), &ReadOptions::default())
        .expect_err("1.5 is not a class");
    let message = err.to_string();
    assert!(
        message.contains("bad_label.nii.gz") && message.contains("1.5"),
        "{message}"
    );
    assert!(
        matches!(
            err,
            DataError::LabelValue {
                voxel: [3, 2, 1],
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn resampling_matches_scipy_map_coordinates() {
    let meta = reference();
    let old: Vec<f64> = serde_json::from_value(meta["resample"]["old"].clone()).expect("old");
    let new: Vec<f64> = serde_json::from_value(meta["resample"]["new"].clone()).expect("new");
    let input: Array3<f64> = array::<Ix3>("resample_input");
    let labels: Array3<f64> = array::<Ix3>("resample_labels");
    let (z, y, x) = input.dim();
    let geometry = Geometry::new([z, y, x], [old[0], old[1], old[2]]);
    let (target, map) = spacing_grid(&geometry, [new[0], new[1], new[2]]).expect("grid");
    let want: Array3<f64> = array::<Ix3>("resample_linear");
    assert_eq!(target.shape().to_vec(), want.shape().to_vec());
    let got = sample(
        input.mapv(|v| v as f32).view(),
        target.shape(),
        &map,
        Interpolation::Linear,
    );
    assert_close(&got.mapv(f64::from), &want, 1e-5, "linear");
    let want: Array3<f64> = array::<Ix3>("resample_nearest");
    let got = sample(
        labels.mapv(|v| v as u8).view(),
        target.shape(),
        &map,
        Interpolation::Nearest,
    );
    assert_close(&got.mapv(f64::from), &want, 0.0, "nearest");
    for (a, s) in target.spacing().iter().enumerate() {
        assert!((s - new[a]).abs() < 1e-9, "new spacing {s} vs {}", new[a]);
    }
}

#[test]
fn in_plane_rotation_matches_scipy_affine_transform() {
    let meta = reference();
    let degrees = meta["rotate"]["degrees"].as_f64().expect("degrees");
    let zoom = meta["rotate"]["zoom"].as_f64().expect("zoom");
    let input: Array3<f64> = array::<Ix3>("resample_input");
    let (z, y, x) = input.dim();
    let map = in_plane_map((z, y, x), degrees.to_radians(), zoom);
    let got = sample(
        input.mapv(|v| v as f32).view(),
        [z, y, x],
        &map,
        Interpolation::Linear,
    );
    assert_close(
        &got.mapv(f64::from),
        &array::<Ix3>("rotate_linear"),
        1e-5,
        "rotate",
    );
    // A pure rotation by the same angle is scipy.ndimage.rotate's over axes (1, 2).
    let map = in_plane_map((z, y, x), degrees.to_radians(), 1.0);
    let got = sample(
        input.mapv(|v| v as f32).view(),
        [z, y, x],
        &map,
        Interpolation::Linear,
    );
    assert_close(
        &got.mapv(f64::from),
        &array::<Ix3>("rotate_scipy"),
        1e-5,
        "scipy rotate",
    );
}

#[test]
fn percentiles_and_zscores_match_numpy_and_monai() {
    let x: Array3<f64> = array::<Ix3>("intensity_input");
    let x = x.mapv(|v| v as f32);
    let qs: ndarray::Array1<f64> = array("percentile_q");
    let want: ndarray::Array1<f64> = array("percentile");
    for (q, w) in qs.iter().zip(want.iter()) {
        let got = percentile(x.view(), *q) as f64;
        assert!(
            (got - w).abs() < 1e-5 * (1.0 + w.abs()),
            "q {q}: {got} vs {w}"
        );
    }
    for (kind, key) in [
        (Normalization::ZScore, "zscore"),
        (Normalization::ZScoreNonZero, "zscore_nonzero"),
    ] {
        let mut y = x.clone();
        normalize_channel(y.view_mut(), kind).expect("a known normalisation");
        assert_close(&y.mapv(f64::from), &array::<Ix3>(key), 1e-5, key);
    }
}

/// MONAI's `ScaleIntensityRange` on the same input: clipped, unclipped and inverted windows
/// (a_min > a_max); degenerate windows are refused by `validate`.
#[test]
fn intensity_windows_match_monais_scale_intensity_range() {
    let x: Array3<f64> = array::<Ix3>("intensity_input");
    let x = x.mapv(|v| v as f32);
    let windows = reference()["scale_range"].clone();
    for (i, w) in windows.as_array().expect("windows").iter().enumerate() {
        let number = |k: &str| w[k].as_f64().expect("number");
        let kind = Normalization::ScaleRange {
            a_min: number("a_min"),
            a_max: number("a_max"),
            b_min: number("b_min"),
            b_max: number("b_max"),
            clip: w["clip"].as_bool().expect("clip"),
        };
        kind.validate().expect("a valid window");
        let mut y = x.clone();
        normalize_channel(y.view_mut(), kind).expect("a known normalisation");
        let key = format!("scale_range_{i}");
        assert_close(&y.mapv(f64::from), &array::<Ix3>(&key), 1e-5, &key);
    }
    for bad in [
        Normalization::ScaleRange {
            a_min: 1.0,
            a_max: 1.0,
            b_min: 0.0,
            b_max: 1.0,
            clip: false,
        },
        Normalization::ScaleRange {
            a_min: 0.0,
            a_max: f64::NAN,
            b_min: 0.0,
            b_max: 1.0,
            clip: false,
        },
        Normalization::ScaleRange {
            a_min: 0.0,
            a_max: 1.0,
            b_min: 1.0,
            b_max: 0.0,
            clip: true,
        },
        Normalization::PercentileZScore {
            lower: 99.5,
            upper: 0.5,
        },
    ] {
        let err = bad.validate().expect_err("refused");
        assert!(err.to_string().contains("normalization"), "{err}");
    }
}

fn assert_properties(got: &IntensityProperties, want: &Value, what: &str) {
    let want: IntensityProperties = serde_json::from_value(want.clone()).expect("properties");
    assert_eq!(got.voxels, want.voxels, "{what}: voxels");
    for (name, g, w) in [
        ("mean", got.mean, want.mean),
        ("std", got.std, want.std),
        ("median", got.median, want.median),
        ("min", got.min, want.min),
        ("max", got.max, want.max),
        ("percentile_00_5", got.percentile_00_5, want.percentile_00_5),
        ("percentile_99_5", got.percentile_99_5, want.percentile_99_5),
    ] {
        assert!(
            (g - w).abs() <= 1e-9 * (1.0 + w.abs()),
            "{what} {name}: {g} vs {w}"
        );
    }
}

/// nnU-Net's CT scheme: the foreground statistics of two cases of different sizes, every case
/// weighing the same, equal numpy's (`mixture_properties` of the fixture script, written from
/// the definition), and the normalisation they give equals nnunetv2's `CTNormalization`.
#[test]
fn ct_normalization_matches_nnunet() {
    let a = array::<Ix3>("intensity_input").mapv(|v| v as f32);
    let b = array::<Ix3>("ct_input_b").mapv(|v| v as f32);
    let label = |k: &str| array::<Ix3>(k).mapv(|v| v as u8);
    let mut pool = ForegroundIntensities::new(foreground_voxels_per_case(2));
    pool.add(a.view(), label("ct_label_a").view())
        .expect("same shape");
    pool.add(b.view(), label("ct_label_b").view())
        .expect("same shape");
    let properties = pool.properties().expect("foreground");
    assert_properties(&properties, &reference()["ct_properties"], "mixture");
    let kind = properties.ct_normalization();
    kind.validate().expect("valid");
    let mut y = a.clone();
    normalize_channel(y.view_mut(), kind).expect("resolved");
    assert_close(
        &y.mapv(f64::from),
        &array::<Ix3>("nnunet_ct"),
        1e-5,
        "nnunet_ct",
    );
    // the request itself cannot normalise, and a pool without foreground has no statistics
    let err =
        normalize_channel(a.clone().view_mut(), Normalization::NnunetCt).expect_err("refused");
    assert!(err.to_string().contains("foreground statistics"), "{err}");
    let mut empty = ForegroundIntensities::new(10);
    empty
        .add(a.view(), Array3::zeros(a.dim()).view())
        .expect("same shape");
    assert!(empty.properties().is_err());
    let err = empty
        .add(a.view(), Array3::zeros((1, 1, 1)).view())
        .expect_err("shapes");
    assert!(err.to_string().contains("differ in shape"), "{err}");
    let mut bad = a.clone();
    bad[[0, 0, 0]] = f32::NAN;
    let everywhere = Array3::from_elem(a.dim(), 1u8);
    assert!(empty.add(bad.view(), everywhere.view()).is_err());
}

/// A 10-voxel case (1000 … 1009) and a 10 000-voxel case (0 … 99, 100 voxels each) weigh the
/// same: the mean is the average of the two case means (pooling gives nearly the large case's),
/// σ² the average of the cases' mean squared deviations from it, and the median is at the top of
/// the large case's values (half the weight below).
#[test]
fn foreground_statistics_are_the_mixture_of_the_cases() {
    let small = Array3::from_shape_fn((1, 1, 10), |(_, _, i)| 1000.0 + i as f32);
    let large = Array3::from_shape_fn((10, 10, 100), |(_, _, x)| x as f32);
    let mut pool = ForegroundIntensities::new(foreground_voxels_per_case(2));
    for image in [&small, &large] {
        pool.add(image.view(), Array3::from_elem(image.dim(), 1u8).view())
            .expect("same shape");
    }
    let p = pool.properties().expect("foreground");
    let mean = (1004.5 + 49.5) / 2.0;
    let deviation = |values: std::ops::Range<i32>, offset: f64| {
        let n = values.len() as f64;
        values
            .map(|v| (f64::from(v) + offset - mean).powi(2))
            .sum::<f64>()
            / n
    };
    let var = (deviation(0..10, 1000.0) + deviation(0..100, 0.0)) / 2.0;
    assert_eq!((p.voxels, p.min, p.max), (10_010, 0.0, 1009.0));
    assert!((p.mean - mean).abs() < 1e-9, "{}", p.mean);
    assert!((p.std - var.sqrt()).abs() < 1e-9, "{}", p.std);
    // a voxel of the large case weighs 1/20 000, of the small one 1/20: the value k < 100
    // spans [k/200 + 1/40 000, (k + 1)/200 − 1/40 000], 1000 + i sits at 1/2 + i/20 + 1/40
    let t = |q: f64| 2.5e-5 + q * (0.975 - 2.5e-5);
    assert_eq!((p.percentile_00_5, p.median), (0.0, 97.0), "t = {}", t(0.5));
    let top = 1008.0 + (t(0.995) - 0.925) / 0.05;
    assert!(
        (p.percentile_99_5 - top).abs() < 1e-9,
        "{} vs {top}",
        p.percentile_99_5
    );
}

/// The same statistics on the real TotalSegmentator CT (label > 0 of the 104-class map) equal
/// numpy's over all of its 340 786 foreground voxels.
#[test]
fn ct_properties_of_a_real_ct_match_numpy() {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if !shared.is_dir() {
        assert!(std::env::var_os("CWSEG_REQUIRE_SHARED_DATA").is_none());
        eprintln!("skipped: {} is absent", shared.display());
        return;
    }
    let ct = shared.join("totalseg-ct");
    let image = read_image(ct.join("example_ct.nii.gz"), &ReadOptions::default()).expect("CT");
    let label = cwseg_data::read_label(
        ct.join("example_seg_full112_v1.nii.gz"),
        &ReadOptions::default(),
    )
    .expect("labels");
    let mut pool = ForegroundIntensities::new(foreground_voxels_per_case(1));
    pool.add(
        image.data.index_axis(ndarray::Axis(0), 0),
        label.data.view(),
    )
    .expect("same grid");
    let properties = pool.properties().expect("foreground");
    assert_properties(
        &properties,
        &reference()["totalseg_ct_properties"],
        "TotalSegmentator CT",
    );
}

#[test]
fn pad_or_crop_matches_monai() {
    let meta = reference();
    let input: Array3<f64> = array::<Ix3>("padcrop_input");
    let input4: Array4<f32> = input.mapv(|v| v as f32).insert_axis(ndarray::Axis(0));
    for (i, size) in meta["padcrop"]
        .as_array()
        .expect("sizes")
        .iter()
        .enumerate()
    {
        let size: [usize; 3] = serde_json::from_value(size.clone()).expect("size");
        let got = pad_or_crop_channels(input4.view(), size, 0.0);
        let want: Array3<f64> = array::<Ix3>(&format!("padcrop_{i}"));
        assert_close(
            &got.index_axis(ndarray::Axis(0), 0).mapv(f64::from),
            &want,
            0.0,
            &format!("pad or crop to {size:?}"),
        );
    }
}

#[test]
fn sliding_windows_match_monai() {
    let meta = reference();
    for case in meta["sliding"].as_array().expect("cases") {
        let shape: [usize; 3] = serde_json::from_value(case["shape"].clone()).expect("shape");
        let window: [usize; 3] = serde_json::from_value(case["window"].clone()).expect("window");
        let overlap = case["overlap"].as_f64().expect("overlap");
        let want: Vec<[usize; 3]> = serde_json::from_value(case["starts"].clone()).expect("starts");
        let got = window_positions(shape, window, overlap).expect("positions");
        assert_eq!(got, want, "{shape:?} {window:?} {overlap}");
    }
}

/// The Gaussian importance map is MONAI's own (`compute_importance_map(window, "gaussian",
/// sigma_scale=0.125)`, the version in reference.json's `importance`) within 1e-6, for odd, even
/// and mixed windows, with sides of 1 and 2.
#[test]
fn gaussian_importance_matches_monai() {
    let sizes = [
        [16, 16, 16],
        [9, 12, 7],
        [32, 32, 48],
        [8, 8, 8],
        [5, 6, 7],
        [40, 24, 20],
        [1, 2, 5],
        [2, 9, 1],
    ];
    for window in sizes {
        let name = format!("importance_{}x{}x{}", window[0], window[1], window[2]);
        let want: Array3<f64> = array::<Ix3>(&name);
        let got = gaussian_importance(window, 0.125).mapv(f64::from);
        assert_eq!(got.shape(), want.shape(), "{name}: shape");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-6,
            "{name}: differs from MONAI's by up to {worst}"
        );
    }
}

#[test]
fn blending_a_constant_gives_the_constant() {
    let shape = [20, 17, 23];
    let window = [8, 8, 8];
    let mut blender = Blender::new(2, shape, window, 0.125);
    for start in window_positions(shape, window, 0.5).expect("positions") {
        let mut p = Array4::<f32>::zeros((2, 8, 8, 8));
        p.index_axis_mut(ndarray::Axis(0), 1).fill(1.0);
        p.index_axis_mut(ndarray::Axis(0), 0)
            .fill(start[0] as f32 * 0.0 + 0.25);
        blender.add(start, p.view()).expect("fits");
    }
    let out = blender.finish();
    assert!(
        out.index_axis(ndarray::Axis(0), 1)
            .iter()
            .all(|&v| (v - 1.0).abs() < 1e-5)
    );
    assert!(
        out.index_axis(ndarray::Axis(0), 0)
            .iter()
            .all(|&v| (v - 0.25).abs() < 1e-5)
    );
    let _ = Ix4::zeros(4);
}

#[test]
fn real_volumes_match_nibabel() {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if !shared.is_dir() {
        assert!(
            std::env::var_os("CWSEG_REQUIRE_SHARED_DATA").is_none(),
            "CWSEG_REQUIRE_SHARED_DATA is set but {} is missing",
            shared.display()
        );
        eprintln!("skipped: {} is absent", shared.display());
        return;
    }
    let meta = reference();
    let entries = meta["real"].as_array().expect("real-data digests");
    assert!(
        entries.len() >= 7,
        "digests of BraTS and TotalSegmentator volumes"
    );
    for entry in entries {
        let file = shared.join(entry["file"].as_str().expect("file"));
        let image = read_image(&file, &ReadOptions::default()).expect("readable");
        let shape: Vec<usize> = serde_json::from_value(entry["shape_zyx"].clone()).expect("shape");
        assert_eq!(
            &image.data.shape()[1..],
            shape.as_slice(),
            "{}",
            file.display()
        );
        let affine: Vec<Vec<f64>> =
            serde_json::from_value(entry["affine"].clone()).expect("affine");
        for (r, row) in affine.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                assert!(
                    (image.geometry.affine()[r][c] - v).abs() < 1e-5,
                    "{}: affine",
                    file.display()
                );
            }
        }
        let zooms: Vec<f64> = serde_json::from_value(entry["zooms_zyx"].clone()).expect("zooms");
        for (g, w) in image.geometry.spacing().iter().zip(&zooms) {
            assert!(
                (g - w).abs() < 1e-5,
                "{}: spacing {g} vs {w}",
                file.display()
            );
        }
        let data = image.data.index_axis(ndarray::Axis(0), 0);
        let sum: f64 = data.iter().map(|&v| v as f64).sum();
        let squares: f64 = data.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let want_sum = entry["sum"].as_f64().expect("sum");
        let want_squares = entry["sum_squares"].as_f64().expect("squares");
        assert!(
            (sum - want_sum).abs() <= 1e-9 * want_sum.abs().max(1.0),
            "{}: sum {sum} vs {want_sum}",
            file.display()
        );
        assert!(
            (squares - want_squares).abs() <= 1e-9 * want_squares.abs().max(1.0),
            "{}",
            file.display()
        );
        let coords: Vec<[usize; 3]> =
            serde_json::from_value(entry["coords"].clone()).expect("coords");
        let values: Vec<f64> = serde_json::from_value(entry["values"].clone()).expect("values");
        for (c, v) in coords.iter().zip(&values) {
            assert_eq!(
                data[[c[0], c[1], c[2]]] as f64,
                *v,
                "{} at {c:?}",
                file.display()
            );
        }
        if entry["file"]
            .as_str()
            .is_some_and(|f| f.rsplit('/').next().is_some_and(|n| n.contains("_seg")))
        {
            let label = read_label(&file, &ReadOptions::default()).expect("labels");
            let label_sum: f64 = label.data.iter().map(|&v| v as f64).sum();
            assert_eq!(label_sum, want_sum, "{}", file.display());
        }
    }
}
