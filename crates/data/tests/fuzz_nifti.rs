//! A short seeded fuzz run of the NIfTI reader (the long one is `fuzz/`, cargo-fuzz): mutated
//! headers, flipped bytes and truncations of valid files must give `Ok` or an error, never a
//! panic or an unbounded allocation.

use std::path::PathBuf;

use cwseg_data::{ReadOptions, read_image, read_label};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .expect("fixture")
}

/// Header fields worth corrupting: (offset, size) of dim, datatype, bitpix, pixdim, vox_offset,
/// scl_slope, scl_inter, qform/sform codes, quaternions, srows.
const FIELDS: [(usize, usize); 12] = [
    (40, 16),
    (70, 2),
    (72, 2),
    (76, 32),
    (108, 4),
    (112, 4),
    (116, 4),
    (252, 2),
    (254, 2),
    (256, 24),
    (280, 48),
    (0, 4),
];

#[test]
fn mutated_files_never_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sources = [fixture("qform_only.nii"), fixture("no_xform.nii")];
    let options = ReadOptions {
        max_bytes: 64 << 20,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let (mut ok, mut err) = (0, 0);
    for i in 0..2000 {
        let mut bytes = sources[i % sources.len()].clone();
        match rng.random_range(0..4) {
            0 => {
                let (offset, size) = FIELDS[rng.random_range(0..FIELDS.len())];
                for b in &mut bytes[offset..offset + size] {
                    *b = rng.random();
                }
            }
            1 => {
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
            }
            2 => {
                let keep = rng.random_range(0..bytes.len());
                bytes.truncate(keep);
            }
            _ => {
                let (offset, size) = FIELDS[rng.random_range(0..FIELDS.len())];
                let value: i16 = [-1, 0, 1, 7, 8, 32767, -32768][rng.random_range(0..7)];
                for chunk in bytes[offset..offset + size].chunks_mut(2) {
                    chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
                }
            }
        }
        let path = dir.path().join(format!("m{i}.nii"));
        std::fs::write(&path, &bytes).expect("write");
        let result = std::panic::catch_unwind(|| {
            let image = read_image(&path, &options).map(|_| ());
            let label = read_label(&path, &options).map(|_| ());
            (image, label)
        });
        match result {
            Ok((image, _)) => {
                if image.is_ok() {
                    ok += 1
                } else {
                    err += 1
                }
            }
            Err(_) => panic!(
                "reading mutation {i} panicked; bytes kept at {}",
                path.display()
            ),
        }
    }
    assert!(
        ok > 0 && err > 0,
        "mutations both readable and not: {ok} ok, {err} errors"
    );
}
