//! A short seeded fuzz run of the `.npy` readers (the long one is `fuzz/run.sh npy`): mutated
//! headers, claimed shapes, flipped bytes and truncations of valid files must give `Ok` or an
//! error, never a panic or an allocation from the header's word.

use cwseg_data::npy::{npy_header, read_npy_labels, read_npy_logits};
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::WriteNpyExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn npy<T: ndarray_npy::WritableElement>(array: &ArrayD<T>) -> Vec<u8> {
    let mut bytes = Vec::new();
    array.write_npy(&mut bytes).expect("npy");
    bytes
}

#[test]
fn mutated_npy_files_never_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logits = ArrayD::from_shape_fn(IxDyn(&[1, 3, 2, 4, 5]), |d| d[1] as f32 - d[4] as f32);
    let labels = ArrayD::from_shape_fn(IxDyn(&[1, 2, 4, 5]), |d| (d[3] % 3) as u8);
    let sources = [npy(&logits), npy(&labels)];
    let claims = [
        "(1000000000, 1000000000, 1000000000)",
        "(18446744073709551615, 2)",
        "(-1, 3)",
        "()",
        "(0,)",
        "(1, 3, 2, 4, 5, )",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let (mut ok, mut err) = (0, 0);
    for i in 0..3000 {
        let mut bytes = sources[i % sources.len()].clone();
        match rng.random_range(0..4) {
            0 => {
                // another shape claimed in the header, padded to the same header length
                let text = String::from_utf8_lossy(&bytes).into_owned();
                if let (Some(a), Some(b)) = (text.find("'shape': ("), text.find("), }")) {
                    let claim = claims[rng.random_range(0..claims.len())];
                    let mut header = format!("{}'shape': {claim}, }}", &text[10..a]);
                    let length = 10 + header.len();
                    header.push_str(&" ".repeat((64 - (length + 1) % 64) % 64));
                    header.push('\n');
                    let mut out = bytes[..8].to_vec();
                    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
                    out.extend_from_slice(header.as_bytes());
                    out.extend_from_slice(
                        &bytes[b + 4..]
                            .iter()
                            .skip_while(|&&c| c == b' ' || c == b'\n')
                            .copied()
                            .collect::<Vec<_>>(),
                    );
                    bytes = out;
                }
            }
            1 => {
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
            }
            2 => bytes.truncate(rng.random_range(0..bytes.len())),
            _ => {
                let at = rng.random_range(0..bytes.len().min(128));
                bytes[at] = rng.random();
            }
        }
        let path = dir.path().join(format!("case{}.npy", i % 7));
        std::fs::write(&path, &bytes).expect("write");
        for result in [
            read_npy_logits(&path).map(|_| ()),
            read_npy_labels(&path).map(|_| ()),
        ] {
            match result {
                Ok(()) => ok += 1,
                Err(e) => {
                    assert!(e.to_string().contains(path.to_str().expect("utf-8")), "{e}");
                    err += 1;
                }
            }
        }
    }
    // both outcomes happen: the mutations reach past the magic string
    assert!(ok > 100 && err > 1000, "ok {ok}, errors {err}");
}

#[test]
fn a_header_promising_more_data_than_the_file_holds_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("huge.npy");
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (30000, 30000, 30000), }";
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    let padded = format!("{header:<117}\n");
    bytes.extend_from_slice(&(padded.len() as u16).to_le_bytes());
    bytes.extend_from_slice(padded.as_bytes());
    bytes.extend_from_slice(&[0u8; 64]);
    std::fs::write(&path, &bytes).expect("write");
    let message = read_npy_logits(&path).expect_err("refused").to_string();
    assert!(
        message.contains("108000000000000 bytes") && message.contains("the file has 64"),
        "{message}"
    );
    let good = dir.path().join("good.npy");
    std::fs::write(&good, npy(&ArrayD::<f64>::zeros(IxDyn(&[2, 3])))).expect("write");
    assert_eq!(npy_header(&good).expect("header").shape, vec![2, 3]);
}
