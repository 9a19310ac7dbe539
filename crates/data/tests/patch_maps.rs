//! Training patches carry the whole volume's maps cropped (formulas §1, "training on patches"):
//! on the real BraTS labels of `../shared/data`, every patch's contour map equals the whole
//! volume's map cropped, bit for bit, and the whole volume's map equals scipy's (digests from
//! `scripts/fixtures/patch_contour_fixtures.py`); flipped patches carry the flipped crop; DWCE weights
//! made on the whole volume travel with their patch.
//!
//! Where `../shared/data` is absent the tests say so and pass; `CWSEG_REQUIRE_SHARED_DATA=1`
//! makes its absence a failure.

use std::path::PathBuf;

use cwseg_data::{
    AugmentConfig, Augmentation, PatchMaps, ReadOptions, SamplerConfig, SamplingVolume, read_label,
};
use cwseg_morphology::{Border, ContourSpec, DwceSpec, Element, ErosionSpec, contour_map};
use ndarray::{Array3, Array4, Axis, s};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn shared_data() -> Option<PathBuf> {
    let dir = std::env::var_os("CWSEG_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CWSEG_REQUIRE_SHARED_DATA").is_none(),
        "shared data not found at {}",
        dir.display()
    );
    eprintln!("skipped: shared data not found at {}", dir.display());
    None
}

fn fixtures() -> serde_json::Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/whole_volume_contours.json");
    let text = std::fs::read_to_string(&path).expect("scipy digests");
    serde_json::from_str(&text).expect("digest JSON")
}

/// Count and two index moments of the set voxels, in C order (as the script computes them).
fn digest(mask: &Array3<bool>) -> [i64; 3] {
    let mut d = [0i64; 3];
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        let i = i as i64;
        d[0] += 1;
        d[1] += i;
        d[2] += (i % 1_000_003) * (i % 1_000_003);
    }
    d
}

/// A BraTS case's stored labels (0, 1, 2, 4) and a one-channel image that numbers the voxels.
fn brats_case(shared: &std::path::Path, case: &str) -> (Array3<u8>, Array4<f32>) {
    let path = shared
        .join("brats18")
        .join(case)
        .join(format!("{case}_seg.nii.gz"));
    let label = read_label(&path, &ReadOptions::default()).expect("BraTS labels");
    let data = label.data;
    let image = Array4::from_shape_fn(
        (1, data.dim().0, data.dim().1, data.dim().2),
        |(_, z, y, x)| (z * 100_000 + y * 300 + x) as f32,
    );
    (data, image)
}

fn spec(k: usize, n: usize, border: Border, include_background: bool) -> ContourSpec {
    ContourSpec {
        erosion: ErosionSpec {
            element: Element::Cube(k),
            iterations: n,
            border,
        },
        include_background,
    }
}

fn crop<T: Clone>(a: &Array3<T>, start: [usize; 3], size: [usize; 3]) -> Array3<T> {
    a.slice(s![
        start[0]..start[0] + size[0],
        start[1]..start[1] + size[1],
        start[2]..start[2] + size[2]
    ])
    .to_owned()
}

fn flipped<T: Clone>(mut a: Array3<T>, axis: usize) -> Array3<T> {
    a.invert_axis(Axis(axis));
    a.as_standard_layout().into_owned()
}

/// Random starts from the training sampler (foreground and anywhere), and the eight corners,
/// where the halo leaves the volume on three sides.
fn starts(volume: &SamplingVolume, size: [usize; 3], shape: [usize; 3]) -> Vec<[usize; 3]> {
    let config = SamplerConfig {
        size,
        positive: 1.0,
        negative: 1.0,
        class_balanced: true,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut out: Vec<[usize; 3]> = (0..6)
        .map(|_| volume.draw_start(&config, &mut rng))
        .collect();
    for corner in 0..8usize {
        out.push(std::array::from_fn(|a| {
            if corner >> a & 1 == 1 {
                shape[a] - size[a]
            } else {
                0
            }
        }));
    }
    out
}

#[test]
fn patch_contour_maps_equal_the_whole_volume_map_cropped() {
    let Some(shared) = shared_data() else { return };
    let digests = fixtures();
    let size = [40, 56, 48];
    for (case, entry) in digests["cases"].as_object().expect("cases") {
        let (label, image) = brats_case(&shared, case);
        let shape = [label.dim().0, label.dim().1, label.dim().2];
        let volume = SamplingVolume::new(image, label.clone(), size).expect("volume");
        let starts = starts(&volume, size, shape);
        for k in [2, 3] {
            for n in [1, 3, 6] {
                for (border, border_name) in [
                    (Border::Background, "background"),
                    (Border::Replicate, "replicate"),
                ] {
                    for bg in [false, true] {
                        let spec = spec(k, n, border, bg);
                        let whole = contour_map(label.view(), &spec).expect("map").into_union();
                        let key = format!("k{k}_n{n}_{border_name}_bg{}", u8::from(bg));
                        let expected: Vec<i64> = entry["maps"][&key]
                            .as_array()
                            .expect("digest")
                            .iter()
                            .map(|v| v.as_i64().expect("integer"))
                            .collect();
                        assert_eq!(
                            digest(&whole).to_vec(),
                            expected,
                            "{case} {key}: whole volume vs scipy"
                        );
                        let whole = whole.mapv(u8::from);
                        let maps = PatchMaps {
                            contour: Some(spec),
                            ..Default::default()
                        };
                        for &start in &starts {
                            let patch = volume
                                .patch_at(start, size, &Augmentation::identity(), &maps)
                                .expect("patch");
                            assert_eq!(
                                patch.label,
                                crop(&label, start, size),
                                "{case} {key} {start:?}"
                            );
                            assert!(
                                patch.contour.as_ref() == Some(&crop(&whole, start, size)),
                                "{case} {key}: the patch at {start:?} differs from the whole-volume map cropped"
                            );
                        }
                        // A flip reverses the crop with its map (k = 2 is asymmetric: the map
                        // is made after the flip, as on the flipped volume).
                        if k == 3 {
                            for axis in [1, 2] {
                                let flip = Augmentation {
                                    flip: Some(axis),
                                    ..Augmentation::identity()
                                };
                                for &start in &starts[..3] {
                                    let patch =
                                        volume.patch_at(start, size, &flip, &maps).expect("patch");
                                    assert_eq!(
                                        patch.contour,
                                        Some(flipped(crop(&whole, start, size), axis)),
                                        "{case} {key}: flipped patch at {start:?} axis {axis}"
                                    );
                                    assert_eq!(
                                        patch.label,
                                        flipped(crop(&label, start, size), axis)
                                    );
                                    assert_eq!(
                                        patch.image.index_axis(Axis(0), 0).to_owned(),
                                        flipped(
                                            crop(
                                                &volume.image().index_axis(Axis(0), 0).to_owned(),
                                                start,
                                                size
                                            ),
                                            axis
                                        )
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn flipped_even_cube_maps_are_the_flipped_volume_maps_cropped() {
    // For an even cube the element is asymmetric, so the map of a flipped patch is the map of
    // the flipped volume, cropped where the patch lands in it.
    let Some(shared) = shared_data() else { return };
    let (label, image) = brats_case(&shared, "Brats18_2013_11_1");
    let shape = [label.dim().0, label.dim().1, label.dim().2];
    let size = [32, 48, 40];
    let volume = SamplingVolume::new(image, label.clone(), size).expect("volume");
    for n in [1, 3, 6] {
        let spec = spec(2, n, Border::Background, true);
        let maps = PatchMaps {
            contour: Some(spec),
            ..Default::default()
        };
        for axis in [1, 2] {
            let mirrored = flipped(label.clone(), axis);
            let whole = contour_map(mirrored.view(), &spec)
                .expect("map")
                .into_union()
                .mapv(u8::from);
            let flip = Augmentation {
                flip: Some(axis),
                ..Augmentation::identity()
            };
            for start in starts(&volume, size, shape) {
                let patch = volume.patch_at(start, size, &flip, &maps).expect("patch");
                let mut landed = start;
                landed[axis] = shape[axis] - start[axis] - size[axis];
                assert_eq!(
                    patch.contour,
                    Some(crop(&whole, landed, size)),
                    "n {n} axis {axis} {start:?}"
                );
            }
        }
    }
}

#[test]
fn dwce_weights_made_on_the_whole_volume_travel_with_their_patch() {
    let Some(shared) = shared_data() else { return };
    let (label, image) = brats_case(&shared, "Brats18_TCIA02_135_1");
    // A 2 mm-like volume keeps the test quick: every other voxel.
    let label = label.slice(s![..;2, ..;2, ..;2]).to_owned();
    let image = image.slice(s![.., ..;2, ..;2, ..;2]).to_owned();
    let shape = [label.dim().0, label.dim().1, label.dim().2];
    let whole = cwseg_morphology::dwce_weight_map(label.view(), None, &DwceSpec::default())
        .expect("weights");
    let size = [24, 32, 40];
    let volume = SamplingVolume::new(image, label.clone(), size)
        .expect("volume")
        .with_weights(whole.clone())
        .expect("weights fit");
    let maps = PatchMaps {
        contour: Some(spec(3, 3, Border::Background, true)),
        ..Default::default()
    };
    for start in starts(&volume, size, shape) {
        let patch = volume
            .patch_at(start, size, &Augmentation::identity(), &maps)
            .expect("patch");
        assert_eq!(patch.weights, Some(crop(&whole, start, size)), "{start:?}");
        let flip = Augmentation {
            flip: Some(2),
            ..Augmentation::identity()
        };
        let patch = volume.patch_at(start, size, &flip, &maps).expect("patch");
        assert_eq!(patch.weights, Some(flipped(crop(&whole, start, size), 2)));
    }
    // The separation term is not what a patch alone would give: the maps differ somewhere.
    let start = [4, 20, 30];
    let alone = cwseg_morphology::dwce_weight_map(
        crop(&label, start, size).view(),
        None,
        &DwceSpec::default(),
    )
    .expect("patch weights");
    assert_ne!(alone, crop(&whole, start, size));
}

#[test]
fn sampled_patches_with_rotation_keep_their_size_and_values() {
    // The draws of `sample_patch` are those of `sample` + `augment`: the same seed gives the
    // same labels with and without maps, rotation included.
    let Some(shared) = shared_data() else { return };
    let (label, image) = brats_case(&shared, "Brats18_2013_11_1");
    let size = [32, 32, 32];
    let volume = SamplingVolume::new(image, label, size).expect("volume");
    let sampler = SamplerConfig {
        size,
        positive: 2.0,
        negative: 1.0,
        class_balanced: true,
    };
    let augment = AugmentConfig {
        rotation_probability: 1.0,
        flip_probability: 0.5,
        ..AugmentConfig::default()
    };
    let maps = PatchMaps {
        contour: Some(spec(3, 6, Border::Background, true)),
        ..Default::default()
    };
    for seed in 0..4 {
        let mut a = ChaCha8Rng::seed_from_u64(seed);
        let mut b = ChaCha8Rng::seed_from_u64(seed);
        let with = volume
            .sample_patch(&sampler, &augment, &maps, &mut a)
            .expect("patch");
        let without = volume
            .sample_patch(&sampler, &augment, &PatchMaps::default(), &mut b)
            .expect("patch");
        assert_eq!(with.label.shape(), &size);
        let contour = with.contour.expect("map");
        assert_eq!(contour.shape(), &size);
        assert!(without.contour.is_none());
        // Same draws: the same place and augmentation (the halo'd rotation may differ only at
        // the patch's corners, where the bare patch samples from outside itself).
        let same = with
            .label
            .iter()
            .zip(without.label.iter())
            .filter(|(x, y)| x == y)
            .count();
        assert!(
            same as f64 > 0.8 * with.label.len() as f64,
            "seed {seed}: {same} of {}",
            with.label.len()
        );
    }
}

#[test]
fn region_patch_maps_are_each_regions_whole_volume_map_cropped() {
    // BraTS's nested regions on the stored labels: bit j of a patch's map is the contour map of
    // region j's mask on the whole volume (the outside counted), cropped with the patch.
    let Some(shared) = shared_data() else { return };
    let (label, image) = brats_case(&shared, "Brats18_TCIA02_135_1");
    let shape = [label.dim().0, label.dim().1, label.dim().2];
    let regions: Vec<Vec<u8>> = vec![vec![1, 2, 4], vec![1, 4], vec![4]];
    let region_spec = spec(3, 3, Border::Background, true);
    let whole: Vec<Array3<bool>> = regions
        .iter()
        .map(|set| {
            let mask = label.mapv(|c| u8::from(set.contains(&c)));
            contour_map(mask.view(), &region_spec)
                .expect("map")
                .into_union()
        })
        .collect();
    assert!(
        whole.iter().all(|m| m.iter().any(|&v| v)),
        "every region has a contour"
    );
    let size = [24, 32, 40];
    let volume = SamplingVolume::new(image, label, size).expect("volume");
    // the spec's include_background is overridden: a region's outside always counts
    let maps = PatchMaps {
        contour: Some(spec(3, 3, Border::Background, false)),
        regions: regions.clone(),
        ..Default::default()
    };
    for start in starts(&volume, size, shape) {
        let patch = volume
            .patch_at(start, size, &Augmentation::identity(), &maps)
            .expect("patch");
        let packed = patch.contour.expect("region maps");
        for (j, map) in whole.iter().enumerate() {
            let bit = packed.mapv(|p| (p >> j) & 1 == 1);
            assert_eq!(bit, crop(map, start, size), "region {j} at {start:?}");
        }
    }
}
