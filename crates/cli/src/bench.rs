//! `cwseg bench`: the arguments and the printing of [`cwseg_train::bench`].

use anyhow::Result;
use serde_json::json;

/// `cwseg bench`'s arguments.
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
    let device = cwseg_train::parse_device(&options.device)?;
    crate::commands::set_precision(options.precision, &device);
    let list = |text: &str| text.split(',').map(|s| s.trim().to_string()).collect();
    let plan = cwseg_train::bench::BenchPlan {
        quick: options.quick,
        step_only: options.step_only,
        step_size: options.step_size,
        networks: list(&options.step_network),
        losses: list(&options.step_loss),
    };
    let rows = plan.rows(&device)?;
    print_rows(&rows, plan.runs(), options)
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
            "\nReference figures (scipy, edt, MONAI, PyTorch) for comparable inputs: BENCHMARKS.md (scripts/bench/bench_*_reference.py)."
        );
    }
    Ok(())
}
