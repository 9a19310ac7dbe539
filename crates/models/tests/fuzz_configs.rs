//! A short seeded fuzz run of network configurations (the long one is `fuzz/run.sh configs`):
//! the seed configurations of `fuzz/seeds/configs` with their numbers replaced by extremes and
//! bytes flipped must parse and be sized, or give an error; never panic, never allocate from an
//! absurd width (each is sized on shapes alone).

use std::path::Path;

use cwseg_models::ModelConfig;

/// xorshift64: enough randomness for mutations, no dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn mutated_network_configurations_never_panic() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/configs");
    let sources: Vec<String> = ["unet.json", "vnet.json", "unetr.json", "deeplab.json"]
        .iter()
        .map(|f| std::fs::read_to_string(seeds.join(f)).expect("seed"))
        .collect();
    let extremes = [
        "0",
        "1",
        "7",
        "-1",
        "1000000000",
        "18446744073709551615",
        "4294967297",
        "1e308",
        "true",
        "null",
    ];
    let start = std::time::Instant::now();
    let mut state = 2026u64;
    let (mut sized, mut refused) = (0, 0);
    for i in 0..3000 {
        let mut text = sources[i % sources.len()].clone();
        // replace one number with an extreme
        let numbers: Vec<(usize, usize)> = {
            let bytes = text.as_bytes();
            let mut spans = Vec::new();
            let mut at = 0;
            while at < bytes.len() {
                if bytes[at].is_ascii_digit() {
                    let begin = at;
                    while at < bytes.len() && (bytes[at].is_ascii_digit() || bytes[at] == b'.') {
                        at += 1;
                    }
                    spans.push((begin, at));
                } else {
                    at += 1;
                }
            }
            spans
        };
        for _ in 0..=(next(&mut state) % 2) {
            let (a, b) = numbers[next(&mut state) as usize % numbers.len()];
            let extreme = extremes[next(&mut state) as usize % extremes.len()];
            if b <= text.len() {
                text.replace_range(a..b, extreme);
            }
        }
        if next(&mut state).is_multiple_of(4) && !text.is_empty() {
            let at = next(&mut state) as usize % text.len();
            if text.is_char_boundary(at) && text.is_char_boundary(at + 1) {
                text.replace_range(at..at + 1, "\"");
            }
        }
        match serde_json::from_str::<ModelConfig>(&text) {
            Ok(config) => match config.parameter_count() {
                Ok(_) => sized += 1,
                Err(_) => refused += 1,
            },
            Err(_) => refused += 1,
        }
    }
    eprintln!("{sized} sized, {refused} refused in {:?}", start.elapsed());
    assert!(
        sized > 100 && refused > 100,
        "{sized} sized, {refused} refused"
    );
}
