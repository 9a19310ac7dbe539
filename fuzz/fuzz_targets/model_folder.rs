//! `fuzz/run.sh model_folder`: any bytes as a model folder, `config.json` and
//! `model.safetensors` split at the first NUL byte. The network must be sized, built and its
//! weights loaded strictly, and the same tensors converted as a MONAI state dict of that
//! network, or give an error; never panic. Networks over 200 000 parameters are skipped after
//! sizing (building them would only slow the run down; their sizing is fuzzed by `configs`).
#![no_main]

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use cwseg_models::ModelConfig;
use cwseg_models::monai::{from_monai, from_monai_args, to_monai_args};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(split) = data.iter().position(|&b| b == 0) else {
        return;
    };
    let (config, weights) = (&data[..split], &data[split + 1..]);
    let Ok(config) = std::str::from_utf8(config) else {
        return;
    };
    let Ok(model) = serde_json::from_str::<ModelConfig>(config) else {
        return;
    };
    if !matches!(model.parameter_count(), Ok(n) if n <= 200_000) {
        return;
    }
    let vars = VarMap::new();
    if model
        .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
        .is_err()
    {
        return;
    }
    let path = Path::new("model.safetensors");
    let _ = cwseg_models::weights::load_strict_from_bytes(&vars, weights, path);
    let Ok(tensors) = candle_core::safetensors::load_buffer(weights, &Device::Cpu) else {
        return;
    };
    if let Ok((network, args)) = to_monai_args(&model)
        && let Ok(import) = from_monai_args(network, &args)
    {
        let _ = from_monai(&import, tensors);
    }
});
