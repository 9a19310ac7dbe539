//! nnU-Net's augmentation ([`AugmentConfig::nnunet`]): each deterministic core against numpy,
//! scipy and PyTorch (fixtures from `scripts/fixtures/augment_fixtures.py`); the default config
//! draws and makes exactly what the code before nnU-Net's transforms did; probabilities of 0
//! change nothing; labels keep their label set under every geometric transform and images stay
//! finite; a volumetric patch reads the volume around it, not clamped edges.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::PathBuf;

use cwseg_data::augment::intensity::{
    brightness, contrast, gamma, gaussian_blur, gaussian_kernel, gaussian_noise, low_resolution,
};
use cwseg_data::augment::{
    ImageTransform, RotationAxes, ScaleMode, in_plane_map_about, rotation_matrix, volume_map_about,
};
use cwseg_data::resample::{Interpolation, sample};
use cwseg_data::{AugmentConfig, Augmentation, PatchMaps, SamplerConfig, SamplingVolume, augment};
use cwseg_morphology::{Border, ContourSpec, Element, ErosionSpec};
use ndarray::{Array3, Array4, Axis, Ix3, s};
use ndarray_npy::NpzReader;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn meta() -> Value {
    let text = std::fs::read_to_string(fixtures().join("augment_nnunet.json")).expect("json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn array(name: &str) -> Array3<f64> {
    let file = File::open(fixtures().join("augment_nnunet.npz")).expect("augment_nnunet.npz");
    let mut npz = NpzReader::new(file).expect("npz");
    if let Ok(a) = npz.by_name::<ndarray::OwnedRepr<f64>, Ix3>(name) {
        return a;
    }
    let a: Array3<f32> = npz.by_name(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    a.mapv(f64::from)
}

fn input() -> Array3<f32> {
    array("input").mapv(|v| v as f32)
}

fn assert_close(got: &Array3<f32>, want: &Array3<f64>, tol: f64, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        let g = f64::from(*g);
        assert!(
            (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: element {i}: {g} vs {w}"
        );
    }
}

/// Runs `core` on a copy of the input.
fn applied(core: impl FnOnce(ndarray::ArrayViewMut3<f32>)) -> Array3<f32> {
    let mut x = input();
    core(x.view_mut());
    x
}

fn entries<'a>(meta: &'a Value, key: &str) -> &'a Vec<Value> {
    meta[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} entries"))
}

fn f(entry: &Value, key: &str) -> f64 {
    entry[key].as_f64().unwrap_or_else(|| panic!("{key}"))
}

fn name(entry: &Value) -> &str {
    entry["name"].as_str().expect("name")
}

fn triple(entry: &Value, key: &str) -> [f64; 3] {
    let v = entry[key].as_array().expect("array");
    std::array::from_fn(|a| v[a].as_f64().expect("number"))
}

#[test]
fn gamma_matches_numpy() {
    let meta = meta();
    for e in entries(&meta, "gamma") {
        let invert = e["invert"].as_bool().expect("invert");
        let retain = e["retain_stats"].as_bool().expect("retain_stats");
        let got = applied(|x| gamma(x, f(e, "gamma"), invert, retain));
        assert_close(&got, &array(name(e)), 1e-5, name(e));
    }
}

#[test]
fn contrast_and_brightness_match_numpy() {
    let meta = meta();
    for e in entries(&meta, "contrast") {
        let got = applied(|x| contrast(x, f(e, "factor")));
        assert_close(&got, &array(name(e)), 1e-6, name(e));
    }
    for e in entries(&meta, "brightness") {
        let got = applied(|x| brightness(x, f(e, "factor")));
        assert_close(&got, &array(name(e)), 1e-6, name(e));
    }
}

#[test]
fn blur_matches_scipy_gaussian_filter_with_nnunet_kernel_sizes() {
    let meta = meta();
    for (sigma, size) in meta["kernel_sizes"].as_object().expect("kernel sizes") {
        let sigma: f64 = sigma.parse().expect("σ");
        let kernel = gaussian_kernel(sigma);
        assert_eq!(
            kernel.len() as u64,
            size.as_u64().expect("size"),
            "σ {sigma}"
        );
        assert!((kernel.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    for e in entries(&meta, "blur") {
        let got = applied(|x| gaussian_blur(x, triple(e, "sigma")));
        assert_close(&got, &array(name(e)), 1e-5, name(e));
    }
    assert_eq!(gaussian_kernel(0.0), vec![1.0]);
    assert_eq!(gaussian_kernel(f64::NAN), vec![1.0]);
}

#[test]
fn low_resolution_matches_torch_interpolate() {
    let meta = meta();
    for e in entries(&meta, "low_resolution") {
        let got = applied(|x| low_resolution(x, f(e, "zoom")));
        assert_close(&got, &array(name(e)), 1e-5, name(e));
    }
    // a zoom to nothing keeps one voxel per axis: the mean-free input becomes constant
    let got = applied(|x| low_resolution(x, 0.0));
    assert!(got.iter().all(|v| *v == got[[0, 0, 0]]));
}

fn sampled(map: &cwseg_data::resample::IndexMap) -> Array3<f32> {
    let x = input();
    let (z, y, x_) = x.dim();
    sample(x.view(), [z, y, x_], map, Interpolation::Linear)
}

fn centre_of(shape: &[usize]) -> [f64; 3] {
    std::array::from_fn(|a| (shape[a] as f64 - 1.0) / 2.0)
}

#[test]
fn rotation_about_each_axis_matches_scipy() {
    let meta = meta();
    let c = centre_of(input().shape());
    for e in entries(&meta, "rotation") {
        let axis = e["axis"].as_u64().expect("axis") as usize;
        let r = rotation_matrix(axis, f(e, "degrees").to_radians());
        let got = sampled(&volume_map_about(c, r));
        assert_close(&got, &array(name(e)), 1e-5, name(e));
        let rotate = format!("{}_scipy_rotate", name(e));
        assert_close(&got, &array(&rotate), 1e-5, &rotate);
    }
    // about z, the volumetric map is the paper's in-plane map
    let volume = volume_map_about(c, rotation_matrix(0, 0.3));
    let plane = in_plane_map_about([c[1], c[2]], 0.3, 1.0);
    for (a, b) in volume.iter().flatten().zip(plane.iter().flatten()) {
        assert!((a - b).abs() < 1e-12, "{volume:?} vs {plane:?}");
    }
}

#[test]
fn composite_rotation_and_zoom_match_scipy_affine_transform() {
    let meta = meta();
    let e = &meta["composite"];
    let tilt = e["tilt"].as_array().expect("tilt");
    let augmentation = Augmentation {
        angle: f(e, "angle").to_radians(),
        tilt: std::array::from_fn(|a| tilt[a].as_f64().expect("tilt").to_radians()),
        zoom: f(e, "zoom"),
        zoom_z: f(e, "zoom_z"),
        ..Augmentation::identity()
    };
    assert!(augmentation.volumetric());
    let got = sampled(&augmentation.index_map(centre_of(input().shape())));
    assert_close(&got, &array("composite"), 1e-5, "composite");
}

#[test]
fn gaussian_noise_has_its_sigma_and_repeats_with_its_seed() {
    let mut x = Array3::<f32>::zeros((32, 32, 32));
    gaussian_noise(x.view_mut(), 0.07, 11);
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let std = (x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    assert!(mean.abs() < 0.07 * 5.0 / n.sqrt(), "mean {mean}");
    assert!((std / 0.07 - 1.0).abs() < 0.01, "std {std}");
    // the same seed gives every channel the same field
    let mut image = Array4::<f32>::zeros((2, 4, 5, 6));
    ImageTransform::Noise {
        sigma: 0.1,
        seed: 3,
    }
    .apply(&mut image);
    assert_eq!(image.index_axis(Axis(0), 0), image.index_axis(Axis(0), 1));
    assert!(image.iter().any(|v| *v != 0.0));
}

/// The paper-era `Augmentation::draw` (before nnU-Net's transforms), transcribed; nnU-Net's
/// fields left at the identity.
fn old_draw<R: Rng>(config: &AugmentConfig, channels: usize, rng: &mut R) -> Augmentation {
    let mut angle = 0.0f64;
    if rng.random_bool(config.rotation_probability.clamp(0.0, 1.0)) {
        angle = rng
            .random_range(0.0..=config.max_rotation_degrees.max(0.0))
            .to_radians();
        if rng.random_bool(0.5) {
            angle = -angle;
        }
    }
    let mut zoom = 1.0f64;
    if rng.random_bool(config.scale_probability.clamp(0.0, 1.0)) {
        let [lo, hi] = config.scale_range;
        zoom = if hi > lo {
            rng.random_range(lo..hi)
        } else {
            lo
        };
    }
    let mut flip = None;
    if rng.random_bool(config.flip_probability.clamp(0.0, 1.0)) {
        flip = Some(if rng.random_bool(0.5) { 2 } else { 1 });
    }
    let mut intensity = None;
    if rng.random_bool(config.intensity_probability.clamp(0.0, 1.0)) {
        let draws = (0..channels)
            .map(|_| {
                let a = 1.0 + rng.random_range(-1.0..=1.0) * config.intensity_scale;
                let b = rng.random_range(-1.0..=1.0) * config.intensity_shift;
                (a, b)
            })
            .collect();
        intensity = Some(draws);
    }
    Augmentation {
        angle,
        zoom,
        flip,
        intensity,
        ..Augmentation::identity()
    }
}

/// The paper-era `augment` (in-plane map, flip, intensity), transcribed.
fn old_augment<R: Rng>(
    image: &mut Array4<f32>,
    label: &mut Array3<u8>,
    config: &AugmentConfig,
    rng: &mut R,
) {
    let Augmentation {
        angle,
        zoom,
        flip,
        intensity,
        ..
    } = old_draw(config, image.dim().0, rng);
    let (_, nz, ny, nx) = image.dim();
    if angle != 0.0 || zoom != 1.0 {
        let centre = [(ny as f64 - 1.0) / 2.0, (nx as f64 - 1.0) / 2.0];
        let map = in_plane_map_about(centre, angle, zoom);
        *label = sample(label.view(), [nz, ny, nx], &map, Interpolation::Nearest);
        for mut channel in image.axis_iter_mut(Axis(0)) {
            let rotated = sample(channel.view(), [nz, ny, nx], &map, Interpolation::Linear);
            channel.assign(&rotated);
        }
    }
    if let Some(axis) = flip {
        label.invert_axis(Axis(axis));
        image.invert_axis(Axis(axis + 1));
    }
    if let Some(draws) = intensity {
        for (mut channel, (a, b)) in image.axis_iter_mut(Axis(0)).zip(draws) {
            channel.mapv_inplace(|v| (v as f64 * a + b) as f32);
        }
    }
}

/// The paper's configurations and one with every paper-era transform likely.
fn paper_configs() -> [AugmentConfig; 4] {
    [
        AugmentConfig::default(),
        AugmentConfig::extended(),
        AugmentConfig::none(),
        AugmentConfig {
            rotation_probability: 0.7,
            flip_probability: 0.6,
            scale_probability: 0.5,
            intensity_probability: 0.5,
            ..AugmentConfig::default()
        },
    ]
}

#[test]
fn paper_configs_draw_exactly_as_before() {
    for config in paper_configs() {
        for seed in 0..300 {
            let mut old = ChaCha8Rng::seed_from_u64(seed);
            let mut new = old.clone();
            let want = old_draw(&config, 2, &mut old);
            assert_eq!(
                Augmentation::draw(&config, 2, &mut new),
                want,
                "seed {seed}"
            );
            // no further number drawn
            assert_eq!(old.random::<u64>(), new.random::<u64>(), "seed {seed}");
        }
    }
}

fn volume() -> (Array4<f32>, Array3<u8>) {
    let image = Array4::from_shape_fn((2, 14, 18, 20), |(c, z, y, x)| {
        ((c * 7 + z * 3 + y * 5 + x) % 17) as f32 * 0.37 + (x as f32).sin()
    });
    let label = Array3::from_shape_fn((14, 18, 20), |(z, y, x)| {
        (((z / 4) + (y / 5) + (x / 6)) % 4) as u8 * 2
    });
    (image, label)
}

#[test]
fn paper_configs_make_the_same_arrays_as_before() {
    let (image, label) = volume();
    for config in paper_configs() {
        for seed in 0..60 {
            let (mut a, mut la) = (image.clone(), label.clone());
            let (mut b, mut lb) = (image.clone(), label.clone());
            augment(
                &mut a,
                &mut la,
                &config,
                &mut ChaCha8Rng::seed_from_u64(seed),
            );
            old_augment(
                &mut b,
                &mut lb,
                &config,
                &mut ChaCha8Rng::seed_from_u64(seed),
            );
            let bits = |x: &Array4<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "seed {seed}");
            assert_eq!(la, lb, "seed {seed}");
        }
    }
}

fn contour_maps() -> PatchMaps {
    PatchMaps {
        contour: Some(ContourSpec {
            erosion: ErosionSpec {
                element: Element::Cube(3),
                iterations: 2,
                border: Border::Background,
            },
            include_background: false,
        }),
        ..PatchMaps::default()
    }
}

fn all_probabilities(config: AugmentConfig, p: f64) -> AugmentConfig {
    AugmentConfig {
        rotation_probability: p,
        flip_probability: p,
        scale_probability: p,
        intensity_probability: p,
        mirror_probability: p,
        noise_probability: p,
        blur_probability: p,
        blur_channel_probability: p,
        brightness_probability: p,
        contrast_probability: p,
        low_resolution_probability: p,
        low_resolution_channel_probability: p,
        gamma_inverted_probability: p,
        gamma_probability: p,
        ..config
    }
}

#[test]
fn probabilities_of_zero_change_nothing() {
    let (image, label) = volume();
    let config = all_probabilities(AugmentConfig::nnunet(), 0.0);
    let size = [8, 10, 12];
    let volume = SamplingVolume::new(image.clone(), label.clone(), size).expect("volume");
    let sampler = SamplerConfig {
        size,
        ..SamplerConfig::default()
    };
    let maps = contour_maps();
    for seed in 0..20 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        assert_eq!(
            Augmentation::draw(&config, 2, &mut rng),
            Augmentation::identity()
        );
        let (mut a, mut la) = (image.clone(), label.clone());
        augment(&mut a, &mut la, &config, &mut rng);
        assert_eq!((&a, &la), (&image, &label));
        let mut twin = rng.clone();
        let patch = volume
            .sample_patch(&sampler, &config, &maps, &mut rng)
            .expect("patch");
        let [z, y, x] = volume.draw_start(&sampler, &mut twin);
        let region = s![z..z + size[0], y..y + size[1], x..x + size[2]];
        assert_eq!(patch.label, label.slice(region));
        assert_eq!(
            patch.image,
            image.slice(s![.., z..z + size[0], y..y + size[1], x..x + size[2]])
        );
        let crop = volume
            .patch_at([z, y, x], size, &Augmentation::identity(), &maps)
            .expect("crop");
        assert_eq!(patch.contour, crop.contour);
    }
}

#[test]
fn geometric_transforms_keep_the_label_set_and_images_stay_finite() {
    let (image, label) = volume();
    let labels: BTreeSet<u8> = label.iter().copied().collect();
    let size = [8, 10, 12];
    let volume = SamplingVolume::new(image.clone(), label.clone(), size)
        .expect("volume")
        .with_weights(label.mapv(|l| f32::from(l) + 0.5))
        .expect("weights");
    let sampler = SamplerConfig {
        size,
        ..SamplerConfig::default()
    };
    let always = all_probabilities(AugmentConfig::nnunet(), 1.0);
    let axial = AugmentConfig {
        rotation_axes: RotationAxes::Axial,
        scale_mode: ScaleMode::InPlaneZoom,
        ..always
    };
    for config in [AugmentConfig::nnunet(), always, axial] {
        for seed in 0..40 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let patch = volume
                .sample_patch(&sampler, &config, &contour_maps(), &mut rng)
                .expect("patch");
            assert_eq!(patch.label.shape(), &size[..]);
            assert!(
                patch.label.iter().all(|l| labels.contains(l)),
                "seed {seed}"
            );
            assert!(patch.image.iter().all(|v| v.is_finite()), "seed {seed}");
            let weights = patch.weights.expect("weights travel");
            assert!(weights.iter().all(|w| labels.contains(&((w - 0.5) as u8))));
            let (mut a, mut la) = (image.clone(), label.clone());
            augment(&mut a, &mut la, &config, &mut rng);
            assert!(la.iter().all(|l| labels.contains(l)), "seed {seed}");
            assert!(a.iter().all(|v| v.is_finite()), "seed {seed}");
        }
    }
    // intensity transforms touch the image only
    let intensity_only = AugmentConfig {
        rotation_probability: 0.0,
        flip_probability: 0.0,
        scale_probability: 0.0,
        mirror_probability: 0.0,
        ..always
    };
    let (mut a, mut la) = (image.clone(), label.clone());
    augment(
        &mut a,
        &mut la,
        &intensity_only,
        &mut ChaCha8Rng::seed_from_u64(5),
    );
    assert_eq!(la, label);
    assert_ne!(a, image);
}

#[test]
fn a_volumetric_patch_reads_the_volume_around_it() {
    let image = Array4::from_shape_fn((1, 40, 40, 40), |(_, z, y, x)| {
        (z as f32 * 0.3).sin() + (y as f32 * 0.2).cos() * 2.0 + x as f32 * 0.05
    });
    let label = Array3::from_shape_fn((40, 40, 40), |(z, y, x)| {
        ((z / 5 + y / 7 + x / 3) % 3) as u8
    });
    let augmentation = Augmentation {
        angle: 0.2,
        tilt: [0.5, -0.3],
        zoom: 1.0 / 1.3,
        zoom_z: 1.0 / 1.3,
        ..Augmentation::identity()
    };
    let (start, size) = ([16, 15, 14], [6, 8, 10]);
    let reach = augmentation.reach(size);
    // inside the volume, far from its edges: the patch reads no clamped voxel
    assert!(
        (0..3).all(|a| reach[a] < start[a] && start[a] + size[a] + reach[a] < 40),
        "{reach:?}"
    );
    let volume = SamplingVolume::new(image.clone(), label.clone(), size).expect("volume");
    let patch = volume
        .patch_at(start, size, &augmentation, &PatchMaps::default())
        .expect("patch");
    // the whole volume resampled about the patch's centre, then cropped
    let centre = std::array::from_fn(|a| start[a] as f64 + (size[a] as f64 - 1.0) / 2.0);
    let (mut whole, mut whole_label) = (image, label);
    augmentation.apply(&mut whole, &mut whole_label, &mut [], centre);
    let [z, y, x] = start;
    let region = s![z..z + size[0], y..y + size[1], x..x + size[2]];
    assert_eq!(patch.label, whole_label.slice(region));
    let want = whole.slice(s![.., z..z + size[0], y..y + size[1], x..x + size[2]]);
    for (g, w) in patch.image.iter().zip(want.iter()) {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
    }
    // the reach is the farthest corner's displacement, plus one
    let m = augmentation.matrix();
    for (a, &r) in reach.iter().enumerate() {
        let mut far = 0.0f64;
        for corner in 0..8 {
            let d: [f64; 3] = std::array::from_fn(|b| {
                let half = (size[b] as f64 - 1.0) / 2.0;
                if corner >> b & 1 == 1 { half } else { -half }
            });
            let moved: f64 = (0..3).map(|b| m[a][b] * d[b]).sum::<f64>() - d[a];
            far = far.max(moved.abs());
        }
        assert_eq!(r, far.ceil() as usize + 1, "axis {a}");
    }
}

#[test]
fn mirrored_patches_carry_the_mirrored_crop_and_its_contours() {
    let (image, label) = volume();
    let size = [6, 8, 8];
    let volume = SamplingVolume::new(image, label, size).expect("volume");
    let maps = contour_maps();
    let plain = volume
        .patch_at([3, 4, 5], size, &Augmentation::identity(), &maps)
        .expect("patch");
    for mirror in [
        [true, false, false],
        [true, true, true],
        [false, true, false],
    ] {
        let mirrored = Augmentation {
            mirror,
            flip: Some(2),
            ..Augmentation::identity()
        };
        let patch = volume
            .patch_at([3, 4, 5], size, &mirrored, &maps)
            .expect("patch");
        let axes = mirrored.reversed_axes();
        assert_eq!(axes[2], !mirror[2]);
        let (mut label, mut contour, mut image) = (
            plain.label.clone(),
            plain.contour.clone().expect("contour"),
            plain.image.clone(),
        );
        for a in (0..3).filter(|&a| axes[a]) {
            label.invert_axis(Axis(a));
            contour.invert_axis(Axis(a));
            image.invert_axis(Axis(a + 1));
        }
        assert_eq!(patch.label, label);
        assert_eq!(patch.contour.expect("contour"), contour);
        assert_eq!(patch.image, image);
    }
}

#[test]
fn the_nnunet_preset_and_its_checks() {
    let c = AugmentConfig::nnunet();
    assert_eq!(c.scale_range, [0.7, 1.4]);
    assert_eq!(c.scale_mode, ScaleMode::IsotropicStep);
    assert_eq!(c.rotation_axes, RotationAxes::All);
    assert_eq!(
        (
            c.rotation_probability,
            c.max_rotation_degrees,
            c.mirror_probability
        ),
        (0.2, 30.0, 0.5)
    );
    assert_eq!((c.noise_probability, c.noise_sigma), (0.1, [0.0, 0.1]));
    assert_eq!(
        (c.blur_probability, c.blur_channel_probability, c.blur_sigma),
        (0.2, 0.5, [0.5, 1.0])
    );
    assert_eq!(
        (c.gamma_inverted_probability, c.gamma_probability),
        (0.1, 0.3)
    );
    for config in [c, AugmentConfig::default(), AugmentConfig::extended()] {
        assert!(config.problems().is_empty(), "{:?}", config.problems());
    }
    let bad = AugmentConfig {
        noise_probability: 1.5,
        gamma_range: [0.0, 1.5],
        blur_sigma: [1.0, f64::NAN],
        ..c
    };
    let problems = bad.problems();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(
        problems[0].starts_with("noise_probability = 1.5"),
        "{problems:?}"
    );
    // a scale step s is a zoom of 1/s along every axis
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let always = AugmentConfig {
        scale_probability: 1.0,
        ..AugmentConfig::nnunet()
    };
    let drawn = Augmentation::draw(&always, 1, &mut rng);
    assert_eq!(drawn.zoom, drawn.zoom_z);
    assert!(
        (1.0 / 1.4..=1.0 / 0.7).contains(&drawn.zoom),
        "{}",
        drawn.zoom
    );
    // the TOML of a run configuration round-trips the new fields
    let text = serde_json::to_string(&c).expect("json");
    assert!(text.contains("\"rotation_axes\":\"all\""), "{text}");
    assert!(text.contains("\"scale_mode\":\"isotropic_step\""), "{text}");
    let back: AugmentConfig = serde_json::from_str(&text).expect("parse");
    assert_eq!(back, c);
}

/// The third hostile tour: values past a field's ceiling (a blur σ of 10^30 panicked a loader
/// worker; a noise σ of 10^30 made infinite batch-norm statistics; a zoom above 1 or a
/// rotation past 180° mean nothing more) are refused naming the field, and the kernel of any σ
/// is bounded.
#[test]
fn augmentation_values_past_their_ceiling_are_refused_by_name() {
    let c = AugmentConfig::nnunet();
    let cases = [
        (
            "blur_sigma",
            AugmentConfig {
                blur_sigma: [1e30, 1e30],
                ..c
            },
        ),
        (
            "noise_sigma",
            AugmentConfig {
                noise_sigma: [0.0, 1e30],
                ..c
            },
        ),
        (
            "brightness_range",
            AugmentConfig {
                brightness_range: [1.0, 1e38],
                ..c
            },
        ),
        (
            "contrast_range",
            AugmentConfig {
                contrast_range: [1.0, 11.0],
                ..c
            },
        ),
        (
            "gamma_range",
            AugmentConfig {
                gamma_range: [1.0, 1000.0],
                ..c
            },
        ),
        (
            "scale_range",
            AugmentConfig {
                scale_range: [1.0, 1e30],
                ..c
            },
        ),
        (
            "low_resolution_zoom",
            AugmentConfig {
                low_resolution_zoom: [0.5, 2.0],
                ..c
            },
        ),
        (
            "max_rotation_degrees",
            AugmentConfig {
                max_rotation_degrees: 720.0,
                ..c
            },
        ),
        (
            "intensity_scale",
            AugmentConfig {
                intensity_scale: 1e30,
                ..c
            },
        ),
        (
            "intensity_shift",
            AugmentConfig {
                intensity_shift: f64::INFINITY,
                ..c
            },
        ),
    ];
    for (field, config) in cases {
        let problems = config.problems();
        assert_eq!(problems.len(), 1, "{field}: {problems:?}");
        assert!(problems[0].starts_with(field), "{field}: {problems:?}");
    }
    let at_ceiling = AugmentConfig {
        blur_sigma: [16.0, 16.0],
        low_resolution_zoom: [1.0, 1.0],
        max_rotation_degrees: 180.0,
        ..c
    };
    assert!(
        at_ceiling.problems().is_empty(),
        "{:?}",
        at_ceiling.problems()
    );
    let kernel = cwseg_data::augment::intensity::gaussian_kernel(1e30);
    assert_eq!(kernel.len(), 97, "σ clamped to 16 voxels");
}
