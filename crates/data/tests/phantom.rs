//! The synthetic phantom: determinism, class sizes, touching and nested structures.

use cwseg_data::phantom::class_sizes;
use cwseg_data::{Anatomy, COMPACT_PHANTOM_CLASSES, PHANTOM_CLASSES, PhantomConfig, phantom};
use ndarray::Array3;

fn neighbours(labels: &Array3<u8>, a: u8, b: u8) -> usize {
    let (nz, ny, nx) = labels.dim();
    let mut count = 0;
    for ((z, y, x), &l) in labels.indexed_iter() {
        if l != a {
            continue;
        }
        for (dz, dy, dx) in [(1, 0, 0), (0, 1, 0), (0, 0, 1)] {
            for sign in [-1isize, 1] {
                let (zz, yy, xx) = (
                    z as isize + sign * dz,
                    y as isize + sign * dy,
                    x as isize + sign * dx,
                );
                if zz >= 0
                    && yy >= 0
                    && xx >= 0
                    && (zz as usize) < nz
                    && (yy as usize) < ny
                    && (xx as usize) < nx
                    && labels[[zz as usize, yy as usize, xx as usize]] == b
                {
                    count += 1;
                }
            }
        }
    }
    count
}

/// The compact phantom: 7 classes, all present (also at the demo's 24 × 32 × 32), the liver at
/// least 25 times the smallest, the lesion nested in the liver, the gallbladder touching it,
/// and each class's mean intensity at least 0.15 from every other's (intensity tells them apart).
#[test]
fn compact_phantom_has_distinct_classes() {
    let config = PhantomConfig {
        anatomy: Anatomy::Compact,
        shape: [48, 64, 64],
        ..PhantomConfig::default()
    };
    let demo = PhantomConfig {
        shape: [24, 32, 32],
        ..config
    };
    for seed in 1000..1009 {
        let (_, labels) = phantom(&demo, seed).expect("phantom");
        let sizes = class_sizes(&labels, COMPACT_PHANTOM_CLASSES.len());
        assert!(sizes.iter().all(|&s| s > 0), "seed {seed}: {sizes:?}");
    }
    for seed in [1000, 1001, 1002] {
        let (image, labels) = phantom(&config, seed).expect("phantom");
        let classes = COMPACT_PHANTOM_CLASSES.len();
        let sizes = class_sizes(&labels, classes);
        eprintln!("seed {seed}: {sizes:?}");
        assert!(labels.iter().all(|&l| (l as usize) < classes));
        let foreground = &sizes[1..];
        let (min, max) = (
            *foreground.iter().min().expect("classes"),
            *foreground.iter().max().expect("classes"),
        );
        assert!(min >= 100 && max >= 25 * min, "sizes {sizes:?}");
        assert!(neighbours(&labels, 6, 1) > 0, "lesion touches the liver");
        let lesion_other: usize = (0..classes as u8)
            .filter(|&c| c != 6 && c != 1)
            .map(|c| neighbours(&labels, 6, c))
            .sum();
        assert_eq!(lesion_other, 0, "lesion inside the liver");
        assert!(
            neighbours(&labels, 5, 1) > 0,
            "gallbladder touches the liver"
        );
        let mut means = vec![0.0f64; classes];
        for (&v, &l) in image.iter().zip(labels.iter()) {
            means[l as usize] += f64::from(v) / sizes[l as usize] as f64;
        }
        for a in 0..classes {
            for b in a + 1..classes {
                assert!(
                    (means[a] - means[b]).abs() > 0.15,
                    "classes {a} and {b}: mean intensities {means:?}"
                );
            }
        }
    }
}

#[test]
fn default_phantom_is_imbalanced_touching_and_nested() {
    let config = PhantomConfig::default();
    for seed in [0, 1, 2] {
        let (image, labels) = phantom(&config, seed).expect("phantom");
        let sizes = class_sizes(&labels, PHANTOM_CLASSES.len());
        eprintln!("seed {seed}: {sizes:?}");
        let foreground = &sizes[1..];
        assert!(
            foreground.iter().all(|&s| s > 0),
            "every class present: {sizes:?}"
        );
        let (min, max) = (
            *foreground.iter().min().expect("classes"),
            *foreground.iter().max().expect("classes"),
        );
        assert!(
            max >= 1000 * min,
            "sizes span three orders of magnitude: {sizes:?}"
        );
        assert!(
            (150..1000).contains(&sizes[11]) && (150..1000).contains(&sizes[12]),
            "adrenal: a few hundred voxels, {}",
            sizes[11]
        );
        // the lesion is nested in the liver: its only neighbours are liver (or itself)
        let lesion_border = neighbours(&labels, 10, 1);
        let lesion_other: usize = (0..PHANTOM_CLASSES.len() as u8)
            .filter(|&c| c != 10 && c != 1)
            .map(|c| neighbours(&labels, 10, c))
            .sum();
        assert!(
            lesion_border > 0 && lesion_other == 0,
            "lesion inside the liver"
        );
        assert!(
            neighbours(&labels, 9, 1) > 0,
            "gallbladder touches the liver"
        );
        assert!(image.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn phantoms_are_seeded() {
    let config = PhantomConfig {
        shape: [24, 32, 32],
        ..PhantomConfig::default()
    };
    let a = phantom(&config, 5).expect("phantom");
    let b = phantom(&config, 5).expect("phantom");
    let c = phantom(&config, 6).expect("phantom");
    assert_eq!(a.0, b.0);
    assert_eq!(a.1, b.1);
    assert_ne!(a.0, c.0);
    assert!(
        phantom(
            &PhantomConfig {
                shape: [4, 32, 32],
                ..config
            },
            0
        )
        .is_err()
    );
    assert!(
        phantom(
            &PhantomConfig {
                noise: f64::NAN,
                ..config
            },
            0
        )
        .is_err()
    );
}
