//! Timings for BENCHMARKS.md against `scripts/bench/bench_models_reference.py` (PyTorch, same shapes,
//! same threads): conv3d forward and forward + backward on 2×32×64³ (32 → 32, k 3, pad 1) and on
//! the paper U-Net's level shapes (batch 2, 64³ input), and one U-Net training step (batch 2,
//! 1×64³, 16 classes: forward, cross-entropy, backward, Adam) with the peak resident memory.
//!
//! `cargo run --release -p cwseg-models --example bench_models [-- conv|unet|vnet|deeplabv3|unetr
//! |layers-deeplabv3|layers-vnet [f32|bf16]]` (`layers-*`: each distinct convolution of the
//! network, forward and forward + backward) (one network per process, so that the peak memory is that network's; bf16:
//! `cwseg_models::set_precision`, where the CPU has AMX-BF16).

use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use cwseg_models::ops3d::{Conv3dConfig, conv3d};
use cwseg_models::{ModelConfig, seeded_var_builder};

fn best(repeat: usize, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    f()?;
    let mut t = f64::MAX;
    for _ in 0..repeat {
        let s = Instant::now();
        f()?;
        t = t.min(s.elapsed().as_secs_f64());
    }
    Ok(t)
}

/// Median time of `repeat` calls after one warm-up call.
fn median(
    repeat: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> candle_core::Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let s = Instant::now();
        f()?;
        times.push(s.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0)
            })
        })
        .unwrap_or(0.0)
        / 1024.0
}

fn main() -> anyhow::Result<()> {
    // as the `cwseg` command does
    cwseg_models::alloc::retain_freed_memory();
    let what = std::env::args().nth(1).unwrap_or_else(|| "conv".into());
    let requested: cwseg_models::Precision = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "f32".into())
        .parse()
        .map_err(anyhow::Error::msg)?;
    let d = Device::Cpu;
    println!("precision {}", cwseg_models::set_precision(requested, &d));
    if let Some(network) = what.strip_prefix("layers-") {
        return layers(network, &d);
    }
    if what != "conv" {
        return step(&what, &d);
    }
    let cfg = Conv3dConfig {
        padding: [1; 3],
        ..Default::default()
    };
    let shapes = [
        (32usize, 64usize, "2×32×64³ 32→32"),
        (16, 64, "level 0: 2×16×64³ 16→16"),
        (32, 32, "level 1: 2×32×32³ 32→32"),
        (64, 16, "level 2: 2×64×16³ 64→64"),
        (128, 8, "level 3: 2×128×8³ 128→128"),
        (256, 4, "level 4: 2×256×4³ 256→256"),
    ];
    println!("threads {}", rayon::current_num_threads());
    for (c, n, name) in shapes {
        let flops = 2.0 * 2.0 * (c * c * 27 * n * n * n) as f64;
        let (fwd, both) = time_conv((2, c, n, n, n), (c, c, 3, 3, 3), &cfg, &d)?;
        println!(
            "conv3d {name}: forward {:.1} ms ({:.1} GFLOP/s), forward+backward {:.1} ms",
            fwd * 1e3,
            flops / fwd / 1e9,
            both * 1e3
        );
    }
    Ok(())
}

/// Seconds of `conv3d` on random `x` and `w` (both variables): forward alone and forward +
/// backward, best of 3 each.
fn time_conv(
    x_shape: (usize, usize, usize, usize, usize),
    w_shape: (usize, usize, usize, usize, usize),
    cfg: &Conv3dConfig,
    d: &Device,
) -> candle_core::Result<(f64, f64)> {
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, x_shape, d)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, w_shape, d)?)?;
    let fwd = best(3, || {
        conv3d(x.as_tensor(), w.as_tensor(), None, cfg).map(|_| ())
    })?;
    let both = best(3, || {
        conv3d(x.as_tensor(), w.as_tensor(), None, cfg)?
            .sum_all()?
            .backward()
            .map(|_| ())
    })?;
    Ok((fwd, both))
}

/// A convolution of a network, batch 2: `(name, in, out, side, kernel, stride, dilation)`,
/// padding `dilation·(kernel − 1)/2`; the same table as `bench_models_reference.py`.
type Layer = (&'static str, usize, usize, usize, usize, usize, usize);

/// The distinct convolutions of DeepLabV3 and V-Net at 64³ input (default widths).
fn network_layers(network: &str) -> anyhow::Result<&'static [Layer]> {
    Ok(match network {
        "deeplabv3" => &[
            ("stem 1→32 s2", 1, 32, 64, 3, 2, 1),
            ("layer1 32→32", 32, 32, 32, 3, 1, 1),
            ("layer2.0 32→64 s2", 32, 64, 32, 3, 2, 1),
            ("layer2 64→64", 64, 64, 16, 3, 1, 1),
            ("layer3.0 64→128 s2", 64, 128, 16, 3, 2, 1),
            ("layer3 128→128", 128, 128, 8, 3, 1, 1),
            ("layer4.0 128→256 d2", 128, 256, 8, 3, 1, 2),
            ("layer4 256→256 d2", 256, 256, 8, 3, 1, 2),
            ("aspp 256→128 d6", 256, 128, 8, 3, 1, 6),
            ("head 128→128", 128, 128, 8, 3, 1, 1),
        ],
        "vnet" => &[
            ("in 1→16 k5", 1, 16, 64, 5, 1, 1),
            ("down 16→32 k2 s2", 16, 32, 64, 2, 2, 1),
            ("32→32 k5", 32, 32, 32, 5, 1, 1),
            ("down 32→64 k2 s2", 32, 64, 32, 2, 2, 1),
            ("64→64 k5", 64, 64, 16, 5, 1, 1),
            ("down 64→128 k2 s2", 64, 128, 16, 2, 2, 1),
            ("128→128 k5", 128, 128, 8, 5, 1, 1),
            ("256→256 k5", 256, 256, 4, 5, 1, 1),
            ("up 256→256 k5", 256, 256, 8, 5, 1, 1),
            ("up 128→128 k5", 128, 128, 16, 5, 1, 1),
            ("up 64→64 k5", 64, 64, 32, 5, 1, 1),
            ("up 32→32 k5", 32, 32, 64, 5, 1, 1),
            ("out 32→16 k5", 32, 16, 64, 5, 1, 1),
        ],
        other => anyhow::bail!("no layer table for {other:?} (deeplabv3, vnet)"),
    })
}

/// Forward and forward + backward of each convolution of `network` (best of 3).
fn layers(network: &str, d: &Device) -> anyhow::Result<()> {
    println!("threads {}", rayon::current_num_threads());
    for &(name, cin, cout, n, k, s, dil) in network_layers(network)? {
        let cfg = Conv3dConfig {
            stride: [s; 3],
            padding: [dil * (k - 1) / 2; 3],
            dilation: [dil; 3],
        };
        let (fwd, both) = time_conv((2, cin, n, n, n), (cout, cin, k, k, k), &cfg, d)?;
        println!(
            "{network} {name} on {n}³: forward {:.2} ms, forward+backward {:.2} ms",
            fwd * 1e3,
            both * 1e3
        );
    }
    Ok(())
}

/// One training step of network `name` (batch 2, 1×64³, 16 classes).
fn step(name: &str, d: &Device) -> anyhow::Result<()> {
    let model = ModelConfig::from_name(name, 1, 16)?.with_input_size([64; 3]);
    let vars = VarMap::new();
    let net = model.build(seeded_var_builder(&vars, 0, DType::F32, d))?;
    let x = Tensor::randn(0f32, 1.0, (2, 1, 64, 64, 64), d)?;
    let y = Tensor::from_vec(
        (0..2 * 64 * 64 * 64)
            .map(|i| (i % 16) as u32)
            .collect::<Vec<_>>(),
        2 * 64 * 64 * 64,
        d,
    )?;
    let mut opt = AdamW::new(
        vars.all_vars(),
        ParamsAdamW {
            lr: 3e-4,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let step = median(3, || {
        let logits = net.forward_t(&x, true)?;
        let flat = logits.permute((0, 2, 3, 4, 1))?.reshape(((), 16))?;
        let loss = candle_nn::loss::cross_entropy(&flat, &y)?;
        opt.backward_step(&loss)
    })?;
    println!(
        "{name} training step, batch 2, 1×64³, 16 classes: {:.2} s (median of 3), peak RSS {:.0} MiB",
        step,
        peak_rss_mib()
    );
    Ok(())
}
