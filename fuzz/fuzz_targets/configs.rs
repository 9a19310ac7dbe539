//! `fuzz/run.sh configs`: any bytes as a network, loss, phantom, normalisation or augmentation
//! configuration (JSON, and TOML for the phantom) must parse and validate or give an error,
//! never panic; a network that parses is sized on shapes alone
//! (`ModelConfig::parameter_count`), so no width can make it allocate.
#![no_main]

use cwseg_data::intensity::Normalization;
use cwseg_data::{AugmentConfig, PhantomConfig};
use cwseg_losses::LossConfig;
use cwseg_models::ModelConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(model) = serde_json::from_str::<ModelConfig>(text) {
        let _ = model.parameter_count();
    }
    if let Ok(loss) = LossConfig::from_json(text) {
        let _ = loss.validate();
    }
    if let Ok(phantom) = toml::from_str::<PhantomConfig>(text) {
        let _ = phantom.validate();
    }
    if let Ok(normalization) = serde_json::from_str::<Normalization>(text) {
        let _ = normalization.validate();
    }
    let _ = serde_json::from_str::<AugmentConfig>(text);
});
