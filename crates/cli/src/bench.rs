//! `cwseg bench`: the operations users wait for, timed on generated data (the median of a few
//! runs). The reference figures (scipy, MONAI, PyTorch) come from the scripts in `scripts/` and
//! are recorded, with the same inputs, in BENCHMARKS.md.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::VarMap;
use cwseg_data::{PhantomConfig, phantom};
use cwseg_losses::{LossConfig, Target};
use cwseg_metrics::{ClassSet, evaluate_case};
use cwseg_models::{ModelConfig, seeded_var_builder};
use cwseg_morphology::{ContourSpec, contour_map, edt};
use serde_json::json;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

/// Runs the benchmarks; prints a table, or JSON.
pub fn run(json_output: bool, quick: bool) -> Result<()> {
    let runs = if quick { 3 } else { 5 };
    let config = PhantomConfig::default();
    let (_, labels) = phantom(&config, 0)?;
    let (_, other) = phantom(&config, 1)?;
    let classes = 14usize;
    let mut rows: Vec<(String, f64)> = Vec::new();
    let shape = format!(
        "{}×{}×{}",
        config.shape[0], config.shape[1], config.shape[2]
    );

    let spec = ContourSpec::default();
    rows.push((
        format!("contour map, {classes} classes, {shape}, k 3, n 6"),
        time(runs, || {
            contour_map(labels.view(), &spec)?;
            Ok(())
        })?,
    ));
    let liver = labels.mapv(|l| l == 1);
    rows.push((
        format!("exact EDT, {shape}"),
        time(runs, || {
            edt(liver.view(), Some(&config.spacing))?;
            Ok(())
        })?,
    ));
    let sets = ClassSet::foreground(classes);
    rows.push((
        format!("DSC/HD95/ASSD/NSD, {} classes, {shape}", classes - 1),
        time(runs, || {
            evaluate_case("bench", other.view(), labels.view(), &config.spacing, &sets)?;
            Ok(())
        })?,
    ));

    let device = Device::Cpu;
    let logits = Var::from_tensor(&Tensor::randn(
        0f32,
        1.0,
        (2, classes, 32, 64, 64),
        &device,
    )?)?;
    let crop: Vec<u8> = labels
        .slice(ndarray::s![32..64, 32..96, 32..96])
        .iter()
        .copied()
        .collect();
    let crop = Tensor::from_vec([crop.clone(), crop].concat(), (2, 32, 64, 64), &device)?;
    let target = Target::new(crop)?;
    for name in ["cedl", "cwcd"] {
        let loss = LossConfig::from_name(name)?.build();
        rows.push((
            format!(
                "{} forward + backward, (2, {classes}, 32, 64, 64)",
                name.to_uppercase()
            ),
            time(runs, || {
                loss.forward(logits.as_tensor(), &target)?.backward()?;
                Ok(())
            })?,
        ));
    }

    let size = if quick { 32 } else { 64 };
    let model = ModelConfig::from_name("unet", 1, classes)?;
    let vars = VarMap::new();
    let network = model.build(seeded_var_builder(&vars, 0, DType::F32, &device))?;
    let x = Tensor::randn(0f32, 1.0, (2, 1, size, size, size), &device)?;
    let y = Tensor::zeros((2, size, size, size), DType::U8, &device)?;
    let loss = LossConfig::from_name("cwcd")?.build();
    let target = Target::new(y)?;
    rows.push((
        format!("paper U-Net training step (forward + CWCD + backward), 2×1×{size}³"),
        time(if quick { 2 } else { 3 }, || {
            let logits = network.forward_t(&x, true)?;
            loss.forward(&logits, &target)?.backward()?;
            Ok(())
        })?,
    ));

    if json_output {
        let out: Vec<_> = rows
            .iter()
            .map(|(n, ms)| json!({"benchmark": n, "median_ms": ms}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"threads": rayon::current_num_threads(), "results": out})
            )?
        );
    } else {
        println!(
            "cwseg bench ({} threads; median of {runs} runs)\n",
            rayon::current_num_threads()
        );
        println!("| benchmark | median |\n|---|---|");
        for (n, ms) in rows {
            println!("| {n} | {ms:.1} ms |");
        }
        println!(
            "\nReference figures (scipy, edt, MONAI, PyTorch) for comparable inputs: BENCHMARKS.md (scripts/bench_*_reference.py)."
        );
    }
    Ok(())
}
