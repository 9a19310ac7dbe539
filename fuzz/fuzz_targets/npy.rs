//! `fuzz/run.sh npy`: any bytes as a `.npy` file must read as logits / labels or give an error,
//! never panic or allocate from an unchecked header (`crates/data/tests/fuzz_npy.rs` runs a
//! short seeded version in CI).
#![no_main]

use cwseg_data::npy::{read_npy_labels, read_npy_logits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("cwseg-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.npy");
    if std::fs::write(&path, data).is_ok() {
        let _ = read_npy_logits(&path);
        let _ = read_npy_labels(&path);
    }
});
