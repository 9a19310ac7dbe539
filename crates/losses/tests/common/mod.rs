//! What the loss tests share: the `.npz` fixtures the scripts in `scripts/fixtures/` write.

use std::fs::File;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::NpzReader;

/// One fixture file of `tests/fixtures/`.
pub struct Fixtures(NpzReader<File>);

impl Fixtures {
    /// Opens `tests/fixtures/{name}`.
    pub fn open(name: &str) -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        Fixtures(NpzReader::new(File::open(&path).expect("fixture")).expect("npz"))
    }

    /// Whether the file holds `key`.
    #[allow(dead_code)] // not every test binary asks
    pub fn has(&mut self, key: &str) -> bool {
        self.0.names().expect("names").iter().any(|n| n == key)
    }

    /// The array `key` as a CPU tensor of its own shape.
    pub fn tensor<T: ndarray_npy::ReadableElement + candle_core::WithDType>(
        &mut self,
        key: &str,
    ) -> Tensor {
        let a: ArrayD<T> = self
            .0
            .by_name::<OwnedRepr<T>, IxDyn>(key)
            .unwrap_or_else(|e| panic!("{key}: {e}"));
        let shape = a.shape().to_vec();
        Tensor::from_vec(a.into_iter().collect::<Vec<T>>(), shape, &Device::Cpu).expect("tensor")
    }
}
