//! The operations users wait for, timed on generated data (the median of a few runs): contour
//! maps, distances, metrics, losses (forward + backward) and a network's training step. The
//! reference figures (scipy, MONAI, PyTorch) come from the scripts in `scripts/bench/` and are
//! recorded, with the same inputs, in BENCHMARKS.md; `cwseg bench` prints these rows.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::VarMap;
use cwseg_data::{PhantomConfig, phantom};
use cwseg_losses::{LossConfig, Target};
use cwseg_metrics::{ClassSet, evaluate_case};
use cwseg_models::{ModelConfig, seeded_var_builder};
use cwseg_morphology::{ContourSpec, contour_map, edt};

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
/// Which benchmarks to run.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// Fewer runs and a 32³ training step.
    pub quick: bool,
    /// The training step only.
    pub step_only: bool,
    /// Side of the training step's input (default 64, or 32 when quick).
    pub step_size: Option<usize>,
    /// Networks of the training step, with 16 classes.
    pub networks: Vec<String>,
    /// Losses of the training step.
    pub losses: Vec<String>,
}

impl BenchPlan {
    /// Runs of each operation whose median is reported.
    pub fn runs(&self) -> usize {
        if self.quick { 3 } else { 5 }
    }

    /// `(benchmark, median milliseconds)` of every benchmark of the plan on `device`.
    pub fn rows(&self, device: &Device) -> Result<Vec<(String, f64)>> {
        let mut rows: Vec<(String, f64)> = Vec::new();
        if !self.step_only {
            rows.extend(operation_rows(self.runs(), device)?);
        }
        let size = self.step_size.unwrap_or(if self.quick { 32 } else { 64 });
        // a GPU step is short: the median of 5, as the PyTorch reference takes there
        let step_runs = match (device.is_cuda(), self.quick) {
            (true, _) => 5,
            (false, true) => 2,
            (false, false) => 3,
        };
        for network in &self.networks {
            for loss in &self.losses {
                let step = StepConfig {
                    network: network.trim(),
                    loss: loss.trim(),
                    size,
                };
                rows.push(training_step(&step, step_runs, device)?);
            }
        }
        Ok(rows)
    }
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
    crate::memory::check_training(activations, [size; 3], "--step-size")?;
    let mut optimizer = crate::optim::Optimizer::for_varmap(Default::default(), &vars)?;
    let x = Tensor::randn(0f32, 1.0, (2, 1, size, size, size), device)?;
    // every class present, as in the PyTorch reference (class = voxel index mod 16)
    let labels: Vec<u8> = (0..2 * size * size * size)
        .map(|i| (i % 16) as u8)
        .collect();
    let y = Tensor::from_vec(labels, (2, size, size, size), device)?;
    let target = Target::new(y)?;
    let loss = LossConfig::from_name(step.loss)?.build();
    let mut scaler = crate::LossScaling::Auto.scaler(cwseg_models::precision());
    crate::reset_peak_gpu_memory(device)?;
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
    let place = match crate::peak_gpu_memory(device)? {
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
