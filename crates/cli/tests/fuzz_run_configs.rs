//! A short seeded fuzz run of the command's own files: run configurations (`train.toml`,
//! [`TrainConfig`] then its `validate`) and model cards (`config.json`, [`ModelCard::parse`]),
//! the committed ones with a number replaced by an extreme or a byte changed, must parse and
//! validate or give an error, never panic. The long run is `fuzz/run.sh run_configs`.

use std::path::Path;

use cwseg_train::{ModelCard, TrainConfig};

/// xorshift64: enough randomness for mutations, no dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// `text` with one number replaced by an extreme, or one byte by a quote or a bracket.
fn mutate(text: &str, state: &mut u64) -> String {
    const EXTREMES: [&str; 11] = [
        "0",
        "1",
        "-1",
        "0.5",
        "1e308",
        "-1e308",
        "nan",
        "4294967297",
        "18446744073709551615",
        "true",
        "\"x\"",
    ];
    let mut text = text.to_string();
    let bytes = text.as_bytes();
    let spans: Vec<(usize, usize)> = (0..bytes.len())
        .filter(|&i| bytes[i].is_ascii_digit() && (i == 0 || !bytes[i - 1].is_ascii_digit()))
        .map(|i| {
            let end = (i..bytes.len())
                .find(|&j| !(bytes[j].is_ascii_digit() || bytes[j] == b'.'))
                .unwrap_or(bytes.len());
            (i, end)
        })
        .collect();
    if !spans.is_empty() && !next(state).is_multiple_of(4) {
        let (a, b) = spans[next(state) as usize % spans.len()];
        text.replace_range(a..b, EXTREMES[next(state) as usize % EXTREMES.len()]);
    } else if !text.is_empty() {
        let at = next(state) as usize % text.len();
        if text.is_char_boundary(at) && text.is_char_boundary(at + 1) {
            let with = ["\"", "[", "}", "=", ""][next(state) as usize % 5];
            text.replace_range(at..at + 1, with);
        }
    }
    text
}

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn mutated_run_configurations_never_panic() {
    let seeds: Vec<String> = [
        "experiments/totalseg-ct/nnunet.toml",
        "experiments/totalseg-ct/window.toml",
        "experiments/results/brats18-cv/runs/unet-cwcd-fold0-seed0/train.toml",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(root().join(f)).expect(f))
    .collect();
    for seed in &seeds {
        let config: TrainConfig = toml::from_str(seed).expect("a seed parses");
        config.validate().expect("a seed is valid");
    }
    let mut state = 2026u64;
    let (mut valid, mut refused) = (0, 0);
    for i in 0..3000 {
        let text = mutate(&seeds[i % seeds.len()], &mut state);
        match toml::from_str::<TrainConfig>(&text) {
            Ok(config) if config.validate().is_ok() => valid += 1,
            _ => refused += 1,
        }
    }
    assert!(valid > 0 && refused > 0, "valid {valid}, refused {refused}");
}

#[test]
fn mutated_model_cards_never_panic() {
    let seeds: Vec<String> = [
        "models/phantom-unet-cwcd/config.json",
        "models/brats18-unet-cwcd/config.json",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(root().join(f)).expect(f))
    .collect();
    let path = Path::new("config.json");
    for seed in &seeds {
        ModelCard::parse(seed, path).expect("a seed parses");
    }
    let mut state = 7u64;
    let (mut parsed, mut refused) = (0, 0);
    for i in 0..3000 {
        let text = mutate(&seeds[i % seeds.len()], &mut state);
        match ModelCard::parse(&text, path) {
            Ok(card) => {
                // what loading a model folder does next: size the network
                let _ = card.model.parameter_count();
                parsed += 1;
            }
            Err(_) => refused += 1,
        }
    }
    assert!(
        parsed > 0 && refused > 0,
        "parsed {parsed}, refused {refused}"
    );
}
