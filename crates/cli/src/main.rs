//! `cwseg`: class-imbalanced 3D segmentation from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use cwseg_cli::progress::{self, Progress};
use cwseg_cli::{bench, commands};
use cwseg_train::{demo, experiment, export, hub, interop};

/// Class-imbalanced 3D medical image segmentation with contour-weighted losses.
#[derive(Parser)]
#[command(name = "cwseg", version, about, propagate_version = true)]
struct Cli {
    /// Log details to stderr (`RUST_LOG` overrides).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate the phantom data set, train U-Net with CEDL and CWCD, evaluate, print the table.
    Demo {
        /// One seed and fewer steps (52 s on a 2-core AMD EPYC; the full demo 9 min 36 s).
        #[arg(long)]
        quick: bool,
        /// Output folder (data, runs, results.md, demo.png).
        #[arg(long, visible_alias = "output", default_value = "cwseg-demo")]
        out: PathBuf,
        /// `cpu`, `cuda` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Number of seeds (default 3; 1 with --quick).
        #[arg(long)]
        seeds: Option<usize>,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
        /// Convolution precision, `f32`, `bf16` (on CUDA, or where the CPU has AMX-BF16) or
        /// `f16` (CUDA only, with dynamic loss scaling); else f32 with a warning.
        #[arg(long, default_value = "f32")]
        precision: cwseg_models::Precision,
    },
    /// Train and evaluate a grid of networks × losses × seeds from an experiment file; resumes
    /// where it stopped.
    Experiment {
        /// The experiment file (e.g. `experiments/brats18-cpu.toml`).
        #[arg(long)]
        config: PathBuf,
        /// Output folder (default: the file's `out`, else `cwseg-experiment/NAME`).
        #[arg(long, visible_alias = "output")]
        out: Option<PathBuf>,
        /// Only write the tables from the runs already done; train nothing.
        #[arg(long)]
        collect: bool,
        /// Only list the runs and their states.
        #[arg(long)]
        list: bool,
        /// `I/N`: train only every N-th run from run I (0-based; a job array) and make no
        /// tables; `--collect` once all N are done.
        #[arg(long)]
        shard: Option<cwseg_train::Shard>,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
    },
    /// Train a network with a loss on a data set.
    Train(commands::TrainArgs),
    /// Cross-validation (nnU-Net's): train every fold (resuming where it stopped), predict
    /// each fold's validation cases, choose the post-processing on all of them, write the
    /// scores (cv.json, cv.md) and the folds' ensemble.
    Cv(commands::CvArgs),
    /// Sliding-window inference on NIfTI files or folders.
    Predict(commands::PredictArgs),
    /// DSC, IoU, HD95, ASSD and NSD between prediction and label files or folders.
    Evaluate(commands::EvaluateArgs),
    /// The contour map of a label volume.
    Contour(commands::ContourArgs),
    /// The value and gradient norm of a loss on logits and labels from `.npy` files.
    Loss(commands::LossArgs),
    /// Write the synthetic phantom data set (MSD layout).
    Synth(commands::SynthArgs),
    /// Write a run's best checkpoint as a Hugging Face model folder (weights, config.json,
    /// README.md model card).
    Export {
        /// A run folder (its `best/`) or a model folder.
        run: PathBuf,
        /// The model folder to write (must not exist).
        #[arg(long, visible_alias = "output")]
        out: PathBuf,
        /// Weight precision.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DTypeArg,
        /// Licence of the weights (an id such as cc-by-nc-4.0 or apache-2.0) for the model
        /// card; none by default (the card then says no licence was stated).
        #[arg(long, value_parser = export::parse_license)]
        license: Option<String>,
        /// A `cwseg evaluate --json` report to put in the model card.
        #[arg(long)]
        evaluation: Option<PathBuf>,
        /// A `cwseg experiment` table (its CSV) whose rows for this network and loss go into
        /// the model card as cross-validation metrics.
        #[arg(long)]
        cross_validation: Option<PathBuf>,
        /// `cwseg`: a model folder; `monai`: a state dict and the constructor's arguments
        /// (`args.json`) for MONAI's VNet or UNETR, in MONAI's axis order.
        #[arg(long, value_enum, default_value = "cwseg")]
        format: ExportFormat,
    },
    /// Turn weights trained elsewhere into a cwseg model folder.
    Import {
        #[command(subcommand)]
        source: ImportSource,
    },
    /// Fetch a model `ORG/NAME[@REV]` into the Hugging Face cache (or find it there offline),
    /// verify its files and print the folder.
    Pull {
        /// `ORG/NAME`, `ORG/NAME@REVISION` or `hf://ORG/NAME`.
        model: String,
        /// Use the cache only (also `HF_HUB_OFFLINE=1`).
        #[arg(long)]
        offline: bool,
    },
    /// Build a network and print its parameter count and activation memory.
    Model(commands::ModelArgs),
    /// Plan a run from a data set, as nnU-Net plans: its fingerprint (`fingerprint.json`) and a
    /// commented run configuration that `cwseg train --config` runs as it is.
    Plan(commands::PlanArgs),
    /// Time the operations that matter to users (contour maps, distances, metrics, losses, a
    /// U-Net training step).
    Bench(bench::BenchOptions),
}

/// What `export` writes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExportFormat {
    Cwseg,
    Monai,
}

/// Where `import` takes weights from.
#[derive(Subcommand)]
enum ImportSource {
    /// A MONAI VNet or UNETR: its state dict (safetensors) and constructor arguments (JSON);
    /// the weights are converted from MONAI's (x, y, z) axis order to cwseg's (z, y, x).
    Monai(commands::ImportMonaiArgs),
}

/// Weight precision of `export`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Demo { .. } => cwseg_train::distributed::refuse_mpi_launch("demo")?,
        Command::Experiment { .. } => cwseg_train::distributed::refuse_mpi_launch("experiment")?,
        Command::Predict(_) => cwseg_train::distributed::refuse_mpi_launch("predict")?,
        Command::Cv(_) => cwseg_train::distributed::refuse_mpi_launch("cv")?,
        _ => {}
    }
    match cli.command {
        Command::Demo {
            quick,
            out,
            device,
            seeds,
            quiet,
            precision,
        } => {
            let report = demo::run(
                &demo::DemoOptions {
                    quick,
                    out: out.clone(),
                    device,
                    seeds,
                    precision,
                },
                &mut Progress::new(quiet),
            )?;
            println!("{report}");
            println!(
                "runs, results.md, results.json and demo.png are in {}",
                out.display()
            );
            Ok(())
        }
        Command::Experiment {
            config,
            out,
            collect,
            list,
            shard,
            quiet,
        } => {
            if collect && shard.is_some() {
                anyhow::bail!("--collect makes the tables of every run: leave out --shard");
            }
            let experiment = experiment::ExperimentConfig::read(&config)?;
            if list {
                for (run, state) in experiment::list(&experiment, out.as_deref(), shard) {
                    println!("{run} {state}");
                }
                return Ok(());
            }
            let report = experiment::run(
                &experiment,
                &experiment::ExperimentOptions {
                    out,
                    collect,
                    shard,
                },
                &mut Progress::new(quiet),
            )?;
            println!("{report}");
            Ok(())
        }
        Command::Train(args) => commands::train(args),
        Command::Cv(args) => commands::cv(args),
        Command::Predict(args) => commands::predict(args),
        Command::Evaluate(args) => commands::evaluate(args),
        Command::Contour(args) => commands::contour(args),
        Command::Loss(args) => commands::loss(args),
        Command::Synth(args) => commands::synth(args),
        Command::Model(args) => commands::model(args),
        Command::Plan(args) => commands::plan(args),
        Command::Export {
            run,
            out,
            dtype,
            license,
            evaluation,
            cross_validation,
            format,
        } => {
            if format == ExportFormat::Monai {
                if !matches!(dtype, DTypeArg::F32)
                    || evaluation.is_some()
                    || cross_validation.is_some()
                    || license.is_some()
                {
                    anyhow::bail!(
                        "--format monai writes f32 weights and no model card: leave out --dtype, --license, --evaluation and --cross-validation"
                    );
                }
                export::refuse_ensemble(&run)?;
                interop::export_monai(&run, &out)
                    .with_context(|| format!("export {} --format monai", run.display()))?;
                println!(
                    "MONAI state dict and args.json written to {}",
                    out.display()
                );
                return Ok(());
            }
            let dtype = match dtype {
                DTypeArg::F32 => candle_core::DType::F32,
                DTypeArg::F16 => candle_core::DType::F16,
                DTypeArg::Bf16 => candle_core::DType::BF16,
            };
            export::export(
                &run,
                &out,
                &export::ExportOptions {
                    dtype,
                    license,
                    evaluation,
                    cross_validation,
                },
            )?;
            println!("model folder written to {}", out.display());
            Ok(())
        }
        Command::Import {
            source: ImportSource::Monai(args),
        } => commands::import_monai(args),
        Command::Pull { model, offline } => {
            let model: hub::HubRef = model.parse()?;
            let dir = hub::pull(&model, offline || hub::offline_from_env())?;
            println!("{}", dir.display());
            Ok(())
        }
        Command::Bench(options) => bench::run(&options),
    }
}

/// A failed write to standard output or error ends the command with an exit code, never with
/// the panic of `println!`: a closed pipe (`cwseg experiment --list | head -3`) quietly with 141,
/// as SIGPIPE would; any other failure (a full disk, `> /dev/full`) with 1 and one line on
/// standard error when that still works.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") {
            if message.contains("Broken pipe") {
                std::process::exit(141);
            }
            use std::io::Write;
            let reason = message.trim_start_matches("failed printing to stdout: ");
            let _ = writeln!(
                std::io::stderr(),
                "error: writing to standard output: {reason}"
            );
            std::process::exit(1);
        }
        if message.starts_with("failed printing to stderr") {
            std::process::exit(1);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    // freed activations stay in the heap for the next step (glibc; see cwseg_models::alloc)
    cwseg_models::alloc::retain_freed_memory();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // an experiment's "run i/N" and a cross-validation's "fold i/N" lines show by default; other details with -v
        tracing_subscriber::EnvFilter::new(if cli.verbose {
            "info"
        } else {
            "warn,cwseg_train::experiment=info,cwseg_train::demo=info,cwseg_train::cross_validation=info"
        })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    progress::stop_on_signals();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            if e.downcast_ref::<cwseg_train::Interrupted>().is_some() {
                use std::sync::atomic::Ordering;
                ExitCode::from(if progress::TERMINATED.load(Ordering::SeqCst) {
                    143
                } else {
                    130
                })
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line, leaving out a cause that the message before it
/// already quotes (the library errors name the file and include the OS error).
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        // candle appends a backtrace to some messages: its first line is the message
        let text = cause.to_string();
        let text = text.lines().next().unwrap_or_default().trim().to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
