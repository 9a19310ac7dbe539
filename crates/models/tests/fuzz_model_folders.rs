//! A short seeded fuzz run of model folders (the long one is `fuzz/run.sh model_folder`): a
//! tiny U-Net's `config.json` and `model.safetensors`, their header numbers replaced by
//! extremes and bytes flipped, must load (strictly, and through the MONAI conversion) or give
//! an error; never panic.
//!
//! `CWSEG_WRITE_FUZZ_SEED=1 cargo test -p cwseg-models --test fuzz_model_folders` rewrites
//! the libFuzzer seed `fuzz/seeds/model_folder/unet-tiny` (config, a NUL byte, weights).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use cwseg_models::ModelConfig;
use cwseg_models::monai::{from_monai, from_monai_args, to_monai_args};
use cwseg_models::weights::load_strict_from_bytes;

const CONFIG: &str =
    r#"{"name": "unet", "in_channels": 1, "classes": 2, "filters": 1, "depth": 1}"#;

/// xorshift64: enough randomness for mutations, no dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The seed: the tiny U-Net's config, a NUL byte, its seeded weights as safetensors.
fn seed() -> Vec<u8> {
    let config: ModelConfig = serde_json::from_str(CONFIG).expect("config");
    let vars = VarMap::new();
    config
        .build(cwseg_models::seeded_var_builder(
            &vars,
            1,
            DType::F32,
            &Device::Cpu,
        ))
        .expect("network");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("model.safetensors");
    vars.save(&file).expect("weights");
    let mut bytes = CONFIG.as_bytes().to_vec();
    bytes.push(0);
    bytes.extend(std::fs::read(&file).expect("read"));
    bytes
}

/// What the fuzz target does with one input: `Ok(true)` when the weights loaded.
fn load(data: &[u8]) -> bool {
    let Some(split) = data.iter().position(|&b| b == 0) else {
        return false;
    };
    let (config, weights) = (&data[..split], &data[split + 1..]);
    let Some(model) = std::str::from_utf8(config)
        .ok()
        .and_then(|c| serde_json::from_str::<ModelConfig>(c).ok())
    else {
        return false;
    };
    if !matches!(model.parameter_count(), Ok(n) if n <= 200_000) {
        return false;
    }
    let vars = VarMap::new();
    if model
        .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
        .is_err()
    {
        return false;
    }
    let loaded = load_strict_from_bytes(&vars, weights, Path::new("model.safetensors")).is_ok();
    if let Ok(tensors) = candle_core::safetensors::load_buffer(weights, &Device::Cpu)
        && let Ok((network, args)) = to_monai_args(&model)
        && let Ok(import) = from_monai_args(network, &args)
    {
        let _ = from_monai(&import, tensors);
    }
    loaded
}

/// Spans of ASCII digits in `bytes[..end]`.
fn numbers(bytes: &[u8], end: usize) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut at = 0;
    while at < end {
        if bytes[at].is_ascii_digit() {
            let begin = at;
            while at < end && bytes[at].is_ascii_digit() {
                at += 1;
            }
            spans.push((begin, at));
        } else {
            at += 1;
        }
    }
    spans
}

#[test]
fn mutated_model_folders_never_panic() {
    let seed = seed();
    if std::env::var_os("CWSEG_WRITE_FUZZ_SEED").is_some() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/model_folder");
        std::fs::create_dir_all(&dir).expect("seed folder");
        std::fs::write(dir.join("unet-tiny"), &seed).expect("seed");
    }
    assert!(load(&seed), "the seed loads");
    // the safetensors header: 8 bytes of length, then JSON with shapes and offsets
    let weights = seed.iter().position(|&b| b == 0).expect("NUL") + 1;
    let header_len = u64::from_le_bytes(seed[weights..weights + 8].try_into().expect("8 bytes"));
    let header_end = weights + 8 + header_len as usize;
    let spans = numbers(&seed, header_end);
    let extremes: [&[u8]; 7] = [
        b"0",
        b"1",
        b"3",
        b"4294967297",
        b"18446744073709551615",
        b"99999999999999999999",
        b"65536",
    ];
    let mut state = 2026u64;
    let (mut loaded, mut refused) = (0, 0);
    for i in 0..1500 {
        let mut data = seed.clone();
        match i % 3 {
            // a number of the config or the header replaced by an extreme
            0 | 1 => {
                let (a, b) = spans[next(&mut state) as usize % spans.len()];
                let extreme = extremes[next(&mut state) as usize % extremes.len()];
                data.splice(a..b, extreme.iter().copied());
            }
            // a few bytes flipped anywhere, the length prefix included
            _ => {
                for _ in 0..=(next(&mut state) % 4) {
                    let at = next(&mut state) as usize % data.len();
                    data[at] ^= 1 << (next(&mut state) % 8);
                }
            }
        }
        if load(&data) {
            loaded += 1;
        } else {
            refused += 1;
        }
    }
    assert!(
        loaded > 0 && refused > 0,
        "loaded {loaded}, refused {refused}"
    );
}
