//! Times one training step of the paper's U-Net (forward, backward) on random data:
//! `cargo run --release -p cwseg-models --example unet_step -- 2 32`.

use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::VarMap;
use cwseg_models::{ModelConfig, seeded_var_builder};

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (batch, size) = (
        args.first().copied().unwrap_or(2),
        args.get(1).copied().unwrap_or(32),
    );
    let config = ModelConfig::from_name("unet", 1, 14)?;
    let vars = VarMap::new();
    let net = config.build(seeded_var_builder(&vars, 0, DType::F32, &Device::Cpu))?;
    let x = Tensor::randn(0f32, 1.0, (batch, 1, size, size, size), &Device::Cpu)?;
    for i in 0..4 {
        let t = Instant::now();
        let y = net.forward_t(&x, true)?;
        let forward = t.elapsed().as_secs_f64();
        let loss = y.sqr()?.mean_all()?;
        let t = Instant::now();
        let _grads = loss.backward()?;
        let backward = t.elapsed().as_secs_f64();
        println!("step {i}: forward {forward:.3} s, backward {backward:.3} s");
    }
    Ok(())
}
