//! `fuzz/run.sh model_folder`: any bytes as a model folder, `config.json` and
//! `model.safetensors` split at the first NUL byte. The network must be sized, built and its
//! weights loaded strictly, and the same tensors converted as a MONAI state dict of that
//! network, or give an error; never panic. Networks over 200 000 parameters are skipped after
//! sizing (building them would only slow the run down; their sizing is fuzzed by `configs`);
//! the last network built is kept for inputs with the same config text (most mutations touch
//! the weights), which loads into it again.
#![no_main]

use std::cell::RefCell;
use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use cwseg_models::ModelConfig;
use cwseg_models::monai::{from_monai, from_monai_args, to_monai_args};
use libfuzzer_sys::fuzz_target;

thread_local! {
    /// The last config text that built a network, and its variables.
    static LAST: RefCell<Option<(String, VarMap)>> = const { RefCell::new(None) };
}

/// The variables of `config`'s network: the cached ones when the text is the last one's.
fn variables(text: &str, model: &ModelConfig) -> Option<VarMap> {
    LAST.with_borrow_mut(|last| {
        if let Some((cached, vars)) = last.as_ref()
            && cached == text
        {
            return Some(vars.clone());
        }
        let vars = VarMap::new();
        model
            .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
            .ok()?;
        *last = Some((text.to_string(), vars.clone()));
        Some(vars)
    })
}

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
    let Some(vars) = variables(config, &model) else {
        return;
    };
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
