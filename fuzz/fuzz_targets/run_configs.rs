//! `fuzz/run.sh run_configs`: any bytes as the command's own files, a run configuration
//! (`train.toml`: `TrainConfig`, then `validate`) and a model card (`config.json`:
//! `ModelCard::parse`, then the network sized on shapes alone), must parse and validate or
//! give an error, never panic.
#![no_main]

use std::path::Path;

use cwseg_train::{ModelCard, TrainConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = toml::from_str::<TrainConfig>(text) {
        let _ = config.validate();
    }
    if let Ok(card) = ModelCard::parse(text, Path::new("config.json")) {
        let _ = card.model.parameter_count();
    }
});
