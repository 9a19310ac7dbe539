//! `cargo +nightly fuzz run nifti`: any bytes as a `.nii` file must read as a volume or give an
//! error, never panic. `crates/data/tests/fuzz_nifti.rs` runs a short seeded version in CI.
#![no_main]

use cwseg_data::{ReadOptions, read_image, read_label};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("cwseg-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.nii");
    if std::fs::write(&path, data).is_ok() {
        let options = ReadOptions { max_bytes: 64 << 20 };
        let _ = read_image(&path, &options);
        let _ = read_label(&path, &options);
    }
});
