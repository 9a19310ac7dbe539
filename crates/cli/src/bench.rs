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

/// What `cwseg bench` times.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Fewer runs and a 32³ training step.
    #[arg(long)]
    pub quick: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Device of the losses and the training step: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Side of the training step's input (default 64, or 32 with --quick).
    #[arg(long)]
    pub step_size: Option<usize>,
    /// Loss of the training step; a comma-separated list times each.
    #[arg(long, default_value = "cwcd")]
    pub step_loss: String,
    /// Network of the training step (`unet`, `vnet`, `deeplabv3`, `unetr`), with 16 classes; a
    /// comma-separated list times each.
    #[arg(long, default_value = "unet")]
    pub step_network: String,
    /// Time the training step only.
    #[arg(long)]
    pub step_only: bool,
    /// Convolution precision, `f32`, `bf16` (on CUDA, or where the CPU has AMX-BF16) or `f16`
    /// (CUDA only); else f32 with a warning.
    #[arg(long, default_value = "f32")]
    pub precision: cwseg_models::Precision,
}

/// Runs the benchmarks; prints a table, or JSON.
pub fn run(options: &BenchOptions) -> Result<()> {
    let quick = options.quick;
    let runs = if quick { 3 } else { 5 };
    let device = cwseg_train::parse_device(&options.device)?;
    crate::commands::set_precision(options.precision, &device);
    let mut rows: Vec<(String, f64)> = Vec::new();
    if !options.step_only {
        rows.extend(operation_rows(runs, &device)?);
    }
    let size = options.step_size.unwrap_or(if quick { 32 } else { 64 });
    // a GPU step is short: the median of 5, as the PyTorch reference takes there
    let step_runs = match (device.is_cuda(), quick) {
        (true, _) => 5,
        (false, true) => 2,
        (false, false) => 3,
    };
    for network in options.step_network.split(',') {
        for loss in options.step_loss.split(',') {
            let step = StepConfig {
                network: network.trim(),
                loss: loss.trim(),
                size,
            };
            rows.push(training_step(&step, step_runs, &device)?);
        }
    }
    print_rows(&rows, runs, options)
}

/// Contour maps, distances, metrics on the CPU; losses (forward + backward) on `device`.
fn operation_rows(runs: usize, device: &Device) -> Result<Vec<(String, f64)>> {
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

    let logits = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, classes, 32, 64, 64), device)?)?;
    let crop: Vec<u8> = labels
        .slice(ndarray::s![32..64, 32..96, 32..96])
        .iter()
        .copied()
        .collect();
    let crop = Tensor::from_vec([crop.clone(), crop].concat(), (2, 32, 64, 64), device)?;
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
                device.synchronize()?;
                Ok(())
            })?,
        ));
    }

    Ok(rows)
}

/// What the training step trains: batch 2, one input channel of `size`³, 16 classes.
struct StepConfig<'a> {
    network: &'a str,
    loss: &'a str,
    size: usize,
}

/// One training step as `cwseg train` takes it: forward, loss, backward and the trainer's Adam
/// (in f16 with its dynamic loss scaling), on `device` (synchronised before the clock stops).
fn training_step(step: &StepConfig, runs: usize, device: &Device) -> Result<(String, f64)> {
    let size = step.size;
    let model = ModelConfig::from_name(step.network, 1, 16)?.with_input_size([size; 3]);
    let vars = VarMap::new();
    let network = model.build(seeded_var_builder(&vars, 0, DType::F32, device))?;
    network.check_size([size; 3])?;
    // a batch of two keeps twice the activations
    let activations = 2 * network.activation_bytes([size; 3]);
    cwseg_train::memory::check_training(activations, [size; 3], "--step-size")?;
    let mut optimizer = cwseg_train::optim::Optimizer::for_varmap(Default::default(), &vars)?;
    let x = Tensor::randn(0f32, 1.0, (2, 1, size, size, size), device)?;
    // every class present, as in the PyTorch reference (class = voxel index mod 16)
    let labels: Vec<u8> = (0..2 * size * size * size)
        .map(|i| (i % 16) as u8)
        .collect();
    let y = Tensor::from_vec(labels, (2, size, size, size), device)?;
    let target = Target::new(y)?;
    let loss = LossConfig::from_name(step.loss)?.build();
    let mut scaler = cwseg_train::LossScaling::Auto.scaler(cwseg_models::precision());
    cwseg_train::reset_peak_gpu_memory(device)?;
    let ms = time(runs, || {
        let logits = network.forward_t(&x, true)?;
        let value = loss.forward(&logits, &target)?;
        match &mut scaler {
            None => optimizer.step(&value.backward()?)?,
            Some(scaler) => {
                let mut grads = scaler.scale_loss(&value)?.backward()?;
                scaler.step(&mut optimizer, &mut grads)?;
            }
        }
        device.synchronize()?;
        Ok(())
    })?;
    let place = match cwseg_train::peak_gpu_memory(device)? {
        Some(bytes) => format!("CUDA, peak GPU memory {} MiB", bytes >> 20),
        None => "CPU".to_owned(),
    };
    Ok((
        format!(
            "{} training step (forward + {} + backward + Adam), 2×1×{size}³, 16 classes, {place}, {}",
            model.name(),
            loss.name(),
            cwseg_models::precision()
        ),
        ms,
    ))
}

fn print_rows(rows: &[(String, f64)], runs: usize, options: &BenchOptions) -> Result<()> {
    if options.json {
        let out: Vec<_> = rows
            .iter()
            .map(|(n, ms)| json!({"benchmark": n, "median_ms": ms}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"threads": rayon::current_num_threads(), "device": options.device, "results": out})
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
