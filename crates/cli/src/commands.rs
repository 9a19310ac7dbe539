//! The commands other than `demo`: thin layers over the crates.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use clap::{Args, ValueEnum};
use cwseg_data::{PhantomConfig, write_phantom_dataset};
use cwseg_losses::{LossConfig, Target};
use cwseg_metrics::{Aggregate, TableMetric, markdown_table, summarize};
use cwseg_models::{ModelConfig, describe};
use cwseg_morphology::{Border, ContourSpec, Element, ErosionSpec};
use serde_json::json;

use crate::progress::Progress;
use cwseg_train::ensemble::Member;
use cwseg_train::optim::{OptimizerKind, Schedule};
use cwseg_train::predict::PredictOptions;
use cwseg_train::{RunOptions, TrainConfig, parse_device};

fn parse_triple(text: &str) -> Result<[usize; 3], String> {
    let parts: Vec<&str> = text.split([',', 'x']).collect();
    if parts.len() != 3 {
        return Err(format!("`{text}`: expected three sizes like 64,64,64"));
    }
    let mut out = [0usize; 3];
    for (o, p) in out.iter_mut().zip(parts) {
        *o = p
            .trim()
            .parse()
            .map_err(|_| format!("`{p}` is not a size"))?;
    }
    Ok(out)
}

/// Four numbers `A_MIN,A_MAX,B_MIN,B_MAX` (an intensity window; negative values allowed).
fn parse_window(text: &str) -> Result<[f64; 4], String> {
    let parts: Vec<&str> = text.split(',').collect();
    if parts.len() != 4 {
        return Err(format!(
            "`{text}`: expected A_MIN,A_MAX,B_MIN,B_MAX like -175,250,0,1"
        ));
    }
    let mut out = [0.0; 4];
    for (o, p) in out.iter_mut().zip(parts) {
        *o = p
            .trim()
            .parse()
            .map_err(|_| format!("`{p}` is not a number"))?;
    }
    Ok(out)
}

/// `cwseg train`.
#[derive(Args)]
pub struct TrainArgs {
    /// A TOML run configuration (flags override it; what neither sets takes the default shown).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data: `synthetic`, an MSD / nnU-Net folder or a BraTS folder [default: synthetic].
    #[arg(long)]
    data: Option<String>,
    /// A split file (`{"train": [...], "val": [...], "test": [...]}`).
    #[arg(long)]
    split: Option<PathBuf>,
    /// Cross-validation: train on every fold but this one (from 0) and validate on it
    /// (nnU-Net's protocol; the folds are the same for every run: `--folds`).
    #[arg(long, requires = "folds")]
    fold: Option<usize>,
    /// The number of cross-validation folds (nnU-Net: 5).
    #[arg(long, requires = "fold")]
    folds: Option<usize>,
    /// Network name: unet, vnet, unetr (its position embeddings take the patch size),
    /// deeplabv3, segresnet, dynunet or swinunetr; a `[model]` table in --config sets its
    /// fields [default: unet].
    #[arg(long)]
    model: Option<String>,
    /// Loss name (ce, dl, gdl, dwce, cedl, cwce, sdl, cwcd, focal, tversky, dicefocal, boundary,
    /// cldice, dice_cldice, hausdorff_dt, log_hausdorff_dt, unified_focal, skeleton_recall,
    /// dice_ce_skeleton_recall) [default: cwcd].
    #[arg(long)]
    loss: Option<String>,
    /// Loss configuration as JSON (`{"name": "cwcd", "lambda": 1.0}`).
    #[arg(long)]
    loss_config: Option<String>,
    /// Patch size z,y,x [default: 32,32,32].
    #[arg(long, value_parser = parse_triple)]
    patch: Option<[usize; 3]>,
    /// Patches per batch [default: 2].
    #[arg(long)]
    batch: Option<usize>,
    /// Epochs [default: 10].
    #[arg(long)]
    epochs: Option<usize>,
    /// Batches per epoch [default: 20].
    #[arg(long)]
    batches_per_epoch: Option<usize>,
    /// Optimizer [default: adam].
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerArg>,
    /// Learning rate [default: 0.0003].
    #[arg(long)]
    lr: Option<f64>,
    /// Learning-rate schedule [default: step].
    #[arg(long, value_enum)]
    schedule: Option<ScheduleArg>,
    /// Seed [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// `cpu`, `cuda` or `cuda:N` [default: cpu].
    #[arg(long)]
    device: Option<String>,
    /// Convolution precision, `f32`, `bf16` (bf16 inputs, f32 accumulation: on CUDA, or
    /// where the CPU has AMX-BF16) or `f16` (CUDA only, with dynamic loss scaling); else f32
    /// with a warning [default: f32].
    #[arg(long)]
    precision: Option<cwseg_models::Precision>,
    /// Run folder.
    #[arg(long, required_unless_present = "print_config")]
    out: Option<PathBuf>,
    /// Print the full default run configuration, every field commented, and exit.
    #[arg(long)]
    print_config: bool,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum OptimizerArg {
    Adam,
    Adamw,
    Sgd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ScheduleArg {
    Step,
    Cosine,
    Poly,
    Constant,
}

/// The run configuration in the TOML file `path` (`--config`).
fn config_file(path: &std::path::Path) -> Result<TrainConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    cwseg_train::config::parse_toml::<TrainConfig>(&text, path).context("invalid run configuration")
}

/// The run configuration from `--config` and the flags.
fn train_config(args: &TrainArgs) -> Result<TrainConfig> {
    let mut config = match &args.config {
        Some(path) => config_file(path)?,
        // `--resume --out RUN` needs nothing else: the run's own configuration
        None if args.resume => cwseg_train::trainer::read_run_config(
            args.out.as_deref().context("--resume needs --out RUN")?,
        )?,
        None => TrainConfig::default(),
    };
    if let Some(d) = &args.data {
        config.data.source = d.clone();
    }
    if let Some(s) = &args.split {
        config.data.split = Some(s.clone());
    }
    if let (Some(fold), Some(folds)) = (args.fold, args.folds) {
        config.data.cross_validation = Some(cwseg_train::prepare::CrossValidation { fold, folds });
    }
    if let Some(m) = &args.model {
        config.model = ModelConfig::from_name(m, 1, 2)?;
    }
    if let Some(l) = &args.loss {
        config.loss = LossConfig::from_name(l)?;
    }
    if let Some(json) = &args.loss_config {
        config.loss = LossConfig::from_json(json)?;
    }
    if let Some(p) = args.patch {
        config.patch = p;
    }
    if let Some(b) = args.batch {
        config.batch_size = b;
    }
    if let Some(e) = args.epochs {
        config.epochs = e;
    }
    if let Some(b) = args.batches_per_epoch {
        config.batches_per_epoch = b;
    }
    if let Some(o) = args.optimizer {
        config.optimizer.kind = match o {
            OptimizerArg::Adam => OptimizerKind::Adam,
            OptimizerArg::Adamw => OptimizerKind::AdamW,
            OptimizerArg::Sgd => OptimizerKind::Sgd,
        };
    }
    if let Some(lr) = args.lr {
        config.optimizer.lr = lr;
    }
    if let Some(s) = args.schedule {
        config.schedule = match s {
            ScheduleArg::Step => Schedule::default(),
            ScheduleArg::Cosine => Schedule::Cosine { min_lr: 0.0 },
            ScheduleArg::Poly => Schedule::Poly { power: 0.9 },
            ScheduleArg::Constant => Schedule::Constant,
        };
    }
    if let Some(s) = args.seed {
        config.seed = s;
    }
    if let Some(d) = &args.device {
        config.device = d.clone();
    }
    if let Some(p) = args.precision {
        config.precision = p;
    }
    Ok(config)
}

/// `cwseg train` (under `mpirun -n R` with the `mpi` feature: R data-parallel ranks).
pub fn train(args: TrainArgs) -> Result<()> {
    if args.print_config {
        print!("{}", cwseg_train::plan::default_config_toml()?);
        return Ok(());
    }
    let out = args.out.clone().context("--out RUN: the run folder")?;
    let config = train_config(&args)?;
    let communicator = cwseg_train::distributed::launcher_communicator()?;
    let rank0 = communicator.as_ref().is_none_or(|c| c.rank() == 0);
    let outcome = cwseg_train::train(
        &config,
        &out,
        &RunOptions {
            resume: args.resume,
            data_dir: None,
            communicator,
        },
        &mut Progress::new(args.quiet || !rank0),
    )?;
    if outcome.interrupted {
        return Err(cwseg_train::Interrupted(format!(
            "interrupted; saved in {}; continue with `cwseg train --resume --out {}`",
            outcome.dir.display(),
            outcome.dir.display()
        ))
        .into());
    }
    if rank0 {
        println!(
            "best validation DSC {} ; run folder {} ({:.0} s)",
            outcome.best_dice.map_or("-".into(), |d| format!("{d:.4}")),
            outcome.dir.display(),
            outcome.seconds
        );
    }
    Ok(())
}

/// `cwseg cv`.
#[derive(Args)]
pub struct CvArgs {
    /// The TOML run configuration every fold trains with (its split settings are replaced by
    /// the folds).
    #[arg(long)]
    config: PathBuf,
    /// The cross-validation folder (`fold_K/`, `oof/`, `cv.json`, `cv.md`, `ensemble/`).
    #[arg(long, visible_alias = "output")]
    out: PathBuf,
    /// The number of folds (nnU-Net: 5).
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Data: `synthetic`, an MSD / nnU-Net folder or a BraTS folder (default: the file's).
    #[arg(long)]
    data: Option<String>,
    /// `cpu`, `cuda` or `cuda:N` (default: the file's).
    #[arg(long)]
    device: Option<String>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// `cwseg cv`: every fold trained (or resumed), the out-of-fold predictions scored, the
/// post-processing chosen on them; prints the per-class means.
pub fn cv(args: CvArgs) -> Result<()> {
    let mut config = config_file(&args.config)?;
    if let Some(d) = args.data {
        config.data.source = d;
    }
    if let Some(d) = args.device {
        config.device = d;
    }
    let report = cwseg_train::cross_validation::run(
        &config,
        &args.out,
        args.folds,
        &mut Progress::new(args.quiet),
    )?;
    println!("{}", report.markdown(false));
    println!(
        "cv.json, cv.md, the out-of-fold predictions (oof/) and the ensemble (predict --model {}) are in {}",
        args.out.join("ensemble").display(),
        args.out.display()
    );
    Ok(())
}

/// `cwseg predict`.
#[derive(Args)]
pub struct PredictArgs {
    /// A run folder (its `best/` checkpoint), a model folder (`model.safetensors` + `config.json`)
    /// or `hf://ORG/NAME[@REV]` (the Hugging Face cache; offline with `HF_HUB_OFFLINE=1`).
    /// Repeat for an ensemble: the mean of the models' probabilities (same classes, label
    /// values, regions and modalities), post-processed with the first model's rule. An
    /// ensemble folder (`ensemble.json`: `cwseg cv`'s `OUT/ensemble`, or `OUT` itself) is its
    /// members with the ensemble's rule.
    #[arg(long, required = true)]
    model: Vec<PathBuf>,
    /// Test-time mirroring (nnU-Net's default): the mean of the probabilities of the input's
    /// 8 flips over its spatial axes, each flipped back (8× the time).
    #[arg(long)]
    tta: bool,
    /// A NIfTI image, a folder of images (nnU-Net `_0000` channel files are grouped), or a
    /// BraTS folder of case folders.
    #[arg(long)]
    input: PathBuf,
    /// Output file (for one input file) or folder.
    #[arg(long, visible_alias = "out")]
    output: PathBuf,
    /// Also write the class probabilities (`<output stem>_probabilities/class_KK.nii.gz`,
    /// float, beside each output; the folder is replaced whole). A region model writes each
    /// region's sigmoid probability instead, `region_JJ.nii.gz` in the order of its card's
    /// `regions.names`.
    #[arg(long)]
    probabilities: bool,
    /// Sliding-window overlap (default: the model's).
    #[arg(long)]
    overlap: Option<f64>,
    /// Skip the model's post-processing (keeping the largest connected component of the
    /// classes and regions its card lists).
    #[arg(long)]
    no_postprocess: bool,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Convolution precision, `f32`, `bf16` (on CUDA, or where the CPU has AMX-BF16) or `f16`
    /// (CUDA only); else f32 with a warning.
    #[arg(long, default_value = "f32")]
    precision: cwseg_models::Precision,
    /// `I/N`: predict only every N-th case (sorted by name) from case I (0-based; a job
    /// array writing into one output folder).
    #[arg(long)]
    shard: Option<cwseg_train::Shard>,
}

/// Sets the process's convolution precision for `device`, warning where it falls back to f32.
pub(crate) fn set_precision(requested: cwseg_models::Precision, device: &Device) {
    let effective = cwseg_models::set_precision(requested, device);
    if effective != requested {
        eprintln!(
            "warning: precision {requested} needs {}; running in {effective}",
            requested.requirement()
        );
    }
}

/// `cwseg predict`.
pub fn predict(args: PredictArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    set_precision(args.precision, &device);
    if let Some(overlap) = args.overlap {
        cwseg_train::window::check_overlap(overlap, "--overlap")?;
    }
    let mut members = Vec::new();
    let mut protected = Vec::new();
    for model in &args.model {
        let model = cwseg_train::hub::model_path(model)?;
        let loaded = Member::load_all(&model, &device)?;
        protected.push(model);
        protected.extend(loaded.iter().map(|m| m.dir.clone()));
        members.extend(loaded);
    }
    cwseg_train::ensemble::check_members(&members)?;
    let (card, dir) = (&members[0].card, &members[0].dir);
    let job = cwseg_train::predict_files::PredictFiles {
        input: args.input.clone(),
        output: args.output.clone(),
        probabilities: args.probabilities,
        options: PredictOptions {
            overlap: args.overlap.unwrap_or(card.overlap),
            postprocess: !args.no_postprocess,
            mirror: args.tta,
            keep_probabilities: args.probabilities,
        },
        shard: args.shard,
        protected,
    };
    let plan = job.plan(card, dir)?;
    if plan.is_empty() {
        if let Some(shard) = args.shard {
            println!("shard {shard}: no case in {}", args.input.display());
        }
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(plan.len() as u64);
    let written = job.run(plan, &members, &device, &mut || bar.inc(1))?;
    bar.finish_and_clear();
    println!(
        "{written} prediction(s) written to {}",
        args.output.display()
    );
    Ok(())
}

/// `cwseg evaluate`.
#[derive(Args)]
pub struct EvaluateArgs {
    /// Prediction file or folder; repeat for several runs side by side.
    #[arg(long, required = true)]
    pred: Vec<PathBuf>,
    /// Label file or folder (files matched by name).
    #[arg(long, visible_alias = "labels")]
    label: PathBuf,
    /// Names of the runs (default: the folder names).
    #[arg(long)]
    name: Vec<String>,
    /// How means are taken.
    #[arg(long, value_enum, default_value = "paper")]
    aggregate: AggregateArg,
    /// Evaluate BraTS regions WT/TC/ET instead of labels.
    #[arg(long, value_enum)]
    regions: Option<RegionsArg>,
    /// NSD tolerance in mm.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    tolerance: f64,
    /// Print the JSON report instead of the table (layout in the README, "For MONAI users").
    #[arg(long)]
    json: bool,
    /// Also write per-case rows as CSV (`-`: to standard output).
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Label values to score besides those found in the predictions and labels (comma
    /// separated; default: the `labels` of a `dataset.json` beside or above the label folder).
    #[arg(long, value_delimiter = ',')]
    classes: Vec<u8>,
}

#[derive(Clone, Copy, ValueEnum)]
enum AggregateArg {
    Paper,
    Monai,
    Nnunet,
}

#[derive(Clone, Copy, ValueEnum)]
enum RegionsArg {
    Brats,
}

/// The run names of `evaluate`: `--name` in order, else each prediction's folder or file name;
/// two runs of one name are refused (their columns and reports could not be told apart).
fn run_names(args: &EvaluateArgs) -> Result<Vec<String>> {
    if args.name.len() > args.pred.len() {
        bail!(
            "{} --name for {} --pred; give one name per prediction",
            args.name.len(),
            args.pred.len()
        );
    }
    let names: Vec<String> = args
        .pred
        .iter()
        .enumerate()
        .map(|(r, pred)| {
            args.name.get(r).cloned().unwrap_or_else(|| {
                pred.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("run {r}"))
            })
        })
        .collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            bail!("two runs are named `{name}`; give each --pred its own --name");
        }
    }
    Ok(names)
}

/// `cwseg evaluate`.
pub fn evaluate(args: EvaluateArgs) -> Result<()> {
    let aggregate = match args.aggregate {
        AggregateArg::Paper => Aggregate::Paper,
        AggregateArg::Monai => Aggregate::Monai,
        AggregateArg::Nnunet => Aggregate::Nnunet,
    };
    let job = cwseg_train::evaluate::Evaluation {
        predictions: args.pred.clone(),
        names: run_names(&args)?,
        label: args.label.clone(),
        classes: args.classes.clone(),
        brats_regions: args.regions.is_some(),
        tolerance_mm: args.tolerance,
        csv: args.csv.clone().filter(|c| c.as_os_str() != "-"),
    };
    let scored = job.run()?;
    let summaries: Vec<_> = scored
        .runs
        .iter()
        .map(|(_, c)| summarize(c, aggregate))
        .collect();
    if let Some(path) = &args.csv {
        let text = scored.csv();
        if path.as_os_str() == "-" {
            print!("{text}");
        } else {
            cwseg_data::dataset::write_atomic(path, text.as_bytes())?;
        }
    }
    for warning in &scored.warnings {
        eprintln!("warning: {warning}");
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&scored.json(&summaries))?
        );
        return Ok(());
    }
    let table_runs: Vec<(&str, &cwseg_metrics::Summary)> = scored
        .runs
        .iter()
        .map(|(n, _)| n.as_str())
        .zip(summaries.iter())
        .collect();
    println!(
        "DSC ({} aggregation)\n\n{}",
        format!("{aggregate:?}").to_lowercase(),
        markdown_table(&table_runs, TableMetric::Dice)?
    );
    println!(
        "HD95 (mm)\n\n{}",
        markdown_table(&table_runs, TableMetric::Hausdorff95)?
    );
    Ok(())
}

/// `cwseg contour`.
#[derive(Args)]
pub struct ContourArgs {
    /// Label volume.
    #[arg(long, visible_alias = "labels")]
    label: PathBuf,
    /// Output NIfTI (uint8, 1 = contour).
    #[arg(long, visible_alias = "out")]
    output: PathBuf,
    /// Side of the cubic structuring element.
    #[arg(long, default_value_t = 3)]
    kernel: usize,
    /// Erosion iterations.
    #[arg(long, default_value_t = 6)]
    iterations: usize,
    /// What lies outside the volume.
    #[arg(long, value_enum, default_value = "background")]
    border: BorderArg,
    /// Count the background class too (a band on both sides of each boundary, as CWCE).
    #[arg(long)]
    include_background: bool,
    /// Also write an overlay PNG of the axial slice with the most contour.
    #[arg(long)]
    png: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum BorderArg {
    Background,
    Replicate,
}

/// `cwseg contour`.
pub fn contour(args: ContourArgs) -> Result<()> {
    let spec = ContourSpec {
        erosion: ErosionSpec {
            element: Element::Cube(args.kernel),
            iterations: args.iterations,
            border: match args.border {
                BorderArg::Background => Border::Background,
                BorderArg::Replicate => Border::Replicate,
            },
        },
        include_background: args.include_background,
    };
    let voxels = cwseg_train::contours::write_contour_map(
        &args.label,
        &args.output,
        args.png.as_deref(),
        &spec,
    )?;
    println!(
        "{voxels} contour voxels written to {}",
        args.output.display()
    );
    Ok(())
}

/// `cwseg loss`.
#[derive(Args)]
pub struct LossArgs {
    /// Logits `.npy`, f32 or f64, `(N, K, D, H, W)`.
    #[arg(long)]
    logits: PathBuf,
    /// Labels `.npy`, integer, `(N, D, H, W)`.
    #[arg(long, visible_alias = "label")]
    labels: PathBuf,
    /// Loss name.
    #[arg(long, default_value = "cwcd")]
    loss: String,
    /// Loss configuration JSON file (overrides --loss).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print `{"loss": .., "grad_norm": ..}`.
    #[arg(long)]
    json: bool,
}

/// `cwseg loss`.
pub fn loss(args: LossArgs) -> Result<()> {
    let config = match &args.config {
        Some(path) => LossConfig::from_json(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| path.display().to_string())?,
        None => LossConfig::from_name(&args.loss)?,
    };
    let logits = cwseg_data::npy::read_npy_logits(&args.logits)?;
    let labels = cwseg_data::npy::read_npy_labels(&args.labels)?;
    if logits.ndim() != 5 || labels.ndim() != 4 {
        bail!(
            "logits {} have shape {:?} (need N,K,D,H,W) and labels {} {:?} (need N,D,H,W)",
            args.logits.display(),
            logits.shape(),
            args.labels.display(),
            labels.shape()
        );
    }
    if logits.is_empty() {
        bail!(
            "logits {} have shape {:?}: no sample, class or voxel to score",
            args.logits.display(),
            logits.shape()
        );
    }
    let x = Tensor::from_vec(
        logits.iter().copied().collect::<Vec<_>>(),
        logits.shape(),
        &Device::Cpu,
    )?;
    let y = Tensor::from_vec(
        labels.iter().copied().collect::<Vec<_>>(),
        labels.shape(),
        &Device::Cpu,
    )?;
    let (value, grad_norm) =
        cwseg_losses::value_and_gradient_norm(&*config.build(), &x, &Target::new(y)?)
            .with_context(|| {
                format!(
                    "{} against {}",
                    args.logits.display(),
                    args.labels.display()
                )
            })?;
    if !value.is_finite() || !grad_norm.is_finite() {
        bail!(
            "{} against {}: the {} loss is {value} with gradient norm {grad_norm} (not finite)",
            args.logits.display(),
            args.labels.display(),
            config.build().name()
        );
    }
    if args.json {
        println!("{}", json!({"loss": value, "grad_norm": grad_norm}));
    } else {
        println!(
            "{}: loss {value:.6}, gradient norm {grad_norm:.6}",
            config.build().name()
        );
    }
    Ok(())
}

/// `cwseg synth`.
#[derive(Args)]
pub struct SynthArgs {
    /// Output folder.
    #[arg(long, visible_alias = "output")]
    out: PathBuf,
    /// Training phantoms.
    #[arg(long, default_value_t = 8)]
    train: usize,
    /// Test phantoms.
    #[arg(long, default_value_t = 4)]
    test: usize,
    /// Phantom size z,y,x.
    #[arg(long, value_parser = parse_triple, default_value = "96,128,128")]
    shape: [usize; 3],
    /// Seed of the first phantom.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// `cwseg synth`.
pub fn synth(args: SynthArgs) -> Result<()> {
    let config = PhantomConfig {
        shape: args.shape,
        ..PhantomConfig::default()
    };
    let occupied = std::fs::read_dir(&args.out).is_ok_and(|mut entries| entries.next().is_some());
    if occupied {
        bail!(
            "--out {} already holds files; synth writes a new data set into an empty or new folder (stale cases would mix with the new ones)",
            args.out.display()
        );
    }
    let dataset = write_phantom_dataset(&args.out, args.train, args.test, &config, args.seed)?;
    println!(
        "{} training and {} test phantoms ({} classes) written to {}",
        dataset.training.len(),
        dataset.test.len(),
        dataset.classes.len(),
        args.out.display()
    );
    Ok(())
}

/// `cwseg model`.
#[derive(Args)]
pub struct ModelArgs {
    /// Network name.
    #[arg(long, default_value = "unet")]
    name: String,
    /// Network configuration: JSON text (`{"name": "unet", "filters": 32}`) or a JSON file;
    /// overrides --name; its fields (channels, classes, UNETR's img_size) hold unless a flag
    /// below is given.
    #[arg(long)]
    config: Option<String>,
    /// Input channels [default: 1, or the config's].
    #[arg(long)]
    in_channels: Option<usize>,
    /// Classes, background included [default: 16, or the config's].
    #[arg(long)]
    classes: Option<usize>,
    /// Input size d,h,w [default: 96,96,96, or UNETR's img_size].
    #[arg(long, value_parser = parse_triple)]
    size: Option<[usize; 3]>,
    /// Print `{"parameters": .., "activation_bytes": ..}`.
    #[arg(long)]
    json: bool,
}

/// `cwseg model`.
pub fn model(args: ModelArgs) -> Result<()> {
    let config = match &args.config {
        Some(text) => {
            // JSON text, or the path of a JSON file
            let (text, source) = match std::fs::read_to_string(text) {
                Ok(file) => (file, text.clone()),
                Err(_) => (text.clone(), "--config".to_string()),
            };
            let c = serde_json::from_str::<ModelConfig>(text.trim_start_matches('\u{feff}'))
                .with_context(|| format!("{source}: not a network configuration"))?;
            c.with_io(
                args.in_channels.unwrap_or(c.in_channels()),
                args.classes.unwrap_or(c.classes()),
            )
        }
        None => ModelConfig::from_name(
            &args.name,
            args.in_channels.unwrap_or(1),
            args.classes.unwrap_or(16),
        )?,
    };
    let size = args.size.unwrap_or(match &config {
        ModelConfig::Unetr(c) => c.img_size,
        _ => [96; 3],
    });
    let config = config.with_input_size(size);
    let d = describe(&config, size)?;
    if args.json {
        println!(
            "{}",
            json!({"parameters": d.parameters, "activation_bytes": d.activation_bytes, "training_bytes": d.training_bytes})
        );
    } else {
        println!(
            "{}: {} parameters ({:.2} M); activations for one {:?} input: {:.1} MiB (f32, kept for the backward pass); a training step: {:.1} MiB beyond the weights and the optimizer's state",
            config.name(),
            d.parameters,
            d.parameters as f64 / 1e6,
            size,
            d.activation_bytes as f64 / (1 << 20) as f64,
            d.training_bytes as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

/// The MONAI class `cwseg import monai` reads.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum MonaiNetworkArg {
    /// `monai.networks.nets.UNETR`.
    Unetr,
    /// `monai.networks.nets.VNet`.
    Vnet,
    /// `monai.networks.nets.SegResNet`.
    Segresnet,
    /// `monai.networks.nets.DynUNet`.
    Dynunet,
    /// `monai.networks.nets.SwinUNETR`.
    Swinunetr,
}

/// `cwseg import monai`.
#[derive(clap::Args)]
pub struct ImportMonaiArgs {
    /// The MONAI class.
    #[arg(long, value_enum)]
    network: MonaiNetworkArg,
    /// JSON of the constructor's keyword arguments (`{"in_channels": 1, "out_channels": 3,
    /// "img_size": [96, 96, 96], ...}`).
    #[arg(long)]
    args: PathBuf,
    /// The state dict, as `safetensors.torch.save_file(net.state_dict(), path)` writes it.
    #[arg(long)]
    weights: PathBuf,
    /// The model folder to write (must not exist).
    #[arg(long, visible_alias = "output")]
    out: PathBuf,
    /// Sliding window Z,Y,X in cwseg's order (MONAI's roi_size reversed); UNETR: its
    /// img_size by default; required for V-Net.
    #[arg(long, value_parser = parse_triple)]
    patch: Option<[usize; 3]>,
    /// Overlap of neighbouring windows (MONAI's `sliding_window_inference` default).
    #[arg(long, default_value_t = 0.25)]
    overlap: f64,
    /// Window weights, MONAI's `mode`: `constant` (MONAI's default, a plain mean) or
    /// `gaussian` (σ = 0.125·roi, MONAI ≥ 1.1's importance map).
    #[arg(long, value_enum, default_value = "constant")]
    mode: WindowMode,
    /// The network was trained after MONAI's `Orientation("RAS")`: reorient inputs to RAS+
    /// (and predictions back).
    #[arg(long)]
    reorient: bool,
    /// The network was trained after MONAI's `ScaleIntensityRange(a_min, a_max, b_min,
    /// b_max)`: apply that window, `A_MIN,A_MAX,B_MIN,B_MAX` (write `--window=-175,250,0,1`).
    #[arg(long, value_parser = parse_window)]
    window: Option<[f64; 4]>,
    /// With `--window`: `clip=True` (clamp to [b_min, b_max]).
    #[arg(long, requires = "window")]
    clip: bool,
}

/// MONAI's `sliding_window_inference(mode=...)`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum WindowMode {
    /// Gaussian importance map.
    Gaussian,
    /// Equal weights.
    Constant,
}

/// `cwseg import monai`: converts and writes the model folder.
pub fn import_monai(args: ImportMonaiArgs) -> Result<()> {
    let notes = cwseg_train::interop::import_monai(&cwseg_train::interop::ImportOptions {
        network: match args.network {
            MonaiNetworkArg::Unetr => cwseg_models::monai::MonaiNetwork::Unetr,
            MonaiNetworkArg::Vnet => cwseg_models::monai::MonaiNetwork::Vnet,
            MonaiNetworkArg::Segresnet => cwseg_models::monai::MonaiNetwork::Segresnet,
            MonaiNetworkArg::Dynunet => cwseg_models::monai::MonaiNetwork::Dynunet,
            MonaiNetworkArg::Swinunetr => cwseg_models::monai::MonaiNetwork::Swinunetr,
        },
        args: args.args,
        weights: args.weights,
        out: args.out.clone(),
        patch: args.patch,
        overlap: args.overlap,
        mode: match args.mode {
            WindowMode::Gaussian => cwseg_train::window::WindowWeights::Gaussian,
            WindowMode::Constant => cwseg_train::window::WindowWeights::Constant,
        },
        preprocessing: cwseg_train::prepare::Preprocessing {
            reorient: args.reorient,
            crop_foreground: false,
            spacing: None,
            normalization: match args.window {
                Some([a_min, a_max, b_min, b_max]) => cwseg_data::Normalization::ScaleRange {
                    a_min,
                    a_max,
                    b_min,
                    b_max,
                    clip: args.clip,
                },
                None => cwseg_data::Normalization::None,
            },
        },
    })?;
    for note in notes {
        eprintln!("note: {note}");
    }
    println!("model folder written to {}", args.out.display());
    Ok(())
}

/// `cwseg plan`.
#[derive(Args)]
pub struct PlanArgs {
    /// The data set: an MSD / nnU-Net folder with `dataset.json`, or a BraTS folder.
    #[arg(long)]
    data: PathBuf,
    /// The run configuration to write (`fingerprint.json` goes beside it).
    #[arg(long, visible_alias = "output")]
    out: PathBuf,
    /// Memory for a training step, GiB: the patch shrinks and the batch grows to it.
    #[arg(long, default_value_t = cwseg_train::plan::DEFAULT_MEMORY_GIB)]
    memory: f64,
    /// Only check the data set (every case read: grids, channels, label values, finite
    /// voxels, orthogonal axes); write nothing.
    #[arg(long)]
    verify: bool,
    /// The training recipe: `paper` (the paper's U-Net, Adam, the paper's augmentation) or
    /// `nnunet` (nnU-Net's network as a DynUNet: per-axis kernels and strides, features per
    /// stage, deep supervision; SGD and poly, nnU-Net's augmentation).
    #[arg(long, value_enum, default_value = "paper")]
    recipe: RecipeArg,
    /// Fit training into this many minutes on this machine: a short calibration run (two
    /// epochs of 4 steps, one validation) measures a step and a validation, and the plan's
    /// epochs follow.
    #[arg(long)]
    minutes: Option<f64>,
}

#[derive(Clone, Copy, ValueEnum)]
enum RecipeArg {
    Paper,
    Nnunet,
}

/// `cwseg plan`: the fingerprint, then the plan.
pub fn plan(args: PlanArgs) -> Result<()> {
    if args.verify {
        let cases = cwseg_train::plan::verify(&args.data)?;
        println!(
            "{}: {cases} cases read, every one consistent",
            args.data.display()
        );
        return Ok(());
    }
    let budget = cwseg_train::plan::PlanBudget {
        memory_gib: args.memory,
        recipe: match args.recipe {
            RecipeArg::Paper => cwseg_train::plan::Recipe::Paper,
            RecipeArg::Nnunet => cwseg_train::plan::Recipe::Nnunet,
        },
        minutes: args.minutes,
    };
    let plan = cwseg_train::plan::write_plan(&args.data, &args.out, budget)?;
    for (field, why) in &plan.reasons {
        println!("{field}: {why}");
    }
    println!("plan written to {}", args.out.display());
    Ok(())
}
