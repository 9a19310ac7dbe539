//! Shared helpers of the integration tests: fixture loading and rank dispatch.
#![allow(dead_code)]

use std::fs::File;
use std::path::PathBuf;

use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::{NpzReader, ReadableElement};

/// A fixture file written by `scripts/fixtures/morphology_fixtures.py` (scipy).
pub struct Fixture {
    npz: NpzReader<File>,
    pub name: &'static str,
}

impl Fixture {
    pub fn open(name: &'static str) -> Fixture {
        let path = fixture_path(name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let npz = NpzReader::new(file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Fixture { npz, name }
    }

    pub fn names(&mut self) -> Vec<String> {
        let mut names = self.npz.names().expect("fixture names");
        names.sort();
        names
    }

    pub fn array<T: ReadableElement>(&mut self, key: &str) -> ArrayD<T> {
        self.npz
            .by_name::<OwnedRepr<T>, IxDyn>(key)
            .unwrap_or_else(|e| panic!("{}: array {key}: {e}", self.name))
    }

    /// A spacing entry: empty means none.
    pub fn spacing(&mut self, key: &str) -> Option<Vec<f64>> {
        let s = self.array::<f64>(key);
        (!s.is_empty()).then(|| s.iter().copied().collect())
    }
}

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Calls a rank-generic expression on a dynamic array viewed as 2D or 3D.
#[macro_export]
macro_rules! by_rank {
    ($array:expr, |$view:ident| $body:expr) => {
        match $array.ndim() {
            2 => {
                let $view = $array.view().into_dimensionality::<ndarray::Ix2>().unwrap();
                ($body).into_dyn()
            }
            3 => {
                let $view = $array.view().into_dimensionality::<ndarray::Ix3>().unwrap();
                ($body).into_dyn()
            }
            n => panic!("fixture of rank {n}"),
        }
    };
}

/// Asserts two boolean arrays are equal, reporting how many voxels differ and the first.
pub fn assert_same_mask(got: &ArrayD<bool>, want: &ArrayD<bool>, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let differing: Vec<_> = got
        .indexed_iter()
        .filter(|(i, g)| **g != want[i])
        .map(|(i, _)| i)
        .collect();
    assert!(
        differing.is_empty(),
        "{what}: {} of {} voxels differ, first at {:?}",
        differing.len(),
        got.len(),
        differing.first()
    );
}

/// Asserts `|got − want| ≤ rel · max(|want|, 1)` everywhere (infinities must match).
pub fn assert_close(got: &ArrayD<f64>, want: &ArrayD<f64>, rel: f64, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let mut worst = (0.0f64, None);
    for (i, g) in got.indexed_iter() {
        let w = want[&i];
        let err = if g.is_infinite() || w.is_infinite() {
            if *g == w { 0.0 } else { f64::INFINITY }
        } else {
            (g - w).abs() / w.abs().max(1.0)
        };
        if err > worst.0 || err.is_nan() {
            worst = (err, Some((i, *g, w)));
        }
    }
    assert!(
        worst.0 <= rel,
        "{what}: worst relative error {} at {:?}",
        worst.0,
        worst.1
    );
}
