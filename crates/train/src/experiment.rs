//! `cwseg experiment`: a grid of networks × losses × seeds on one data set. Every run is a
//! folder with its own `status.json`, so the grid resumes where it stopped (over several
//! sessions); finished runs predict the split's test cases on their own grid, and the tables
//! (Markdown and CSV, mean ± std over seeds, paper and MONAI aggregation, HD95) and a figure are
//! made from the predictions on disk.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cwseg_data::{LabelMap, ReadOptions, read_label, write_label};
use cwseg_losses::LossConfig;
use cwseg_metrics::{Aggregate, CaseMetrics, ClassSet, Means, Summary, evaluate_case, summarize};
use cwseg_models::ModelConfig;
use ndarray::{Array3, Axis};
use serde::{Deserialize, Serialize};

use crate::card::load_model;
use crate::compare::{ComparisonSpec, Predictions, SeedRuns, compare, render};
use crate::config::TrainConfig;
use crate::device::parse_device;
use crate::figures::{Panel, write_panels};
use crate::predict::{PredictOptions, predict_case};
use crate::prepare::{PreparedData, open_data};
use crate::shard::Shard;
use crate::trainer::{Interrupted, RunOptions, RunState, TrainHooks, train};

/// How test cases are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Regions {
    /// One score per foreground class (its stored label value).
    #[default]
    Classes,
    /// BraTS regions WT = {1, 2, 4}, TC = {1, 4}, ET = {4} of the stored labels.
    Brats,
}

/// One table of the experiment: every network × loss, over the seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// File stem of the table (`table1` → `table1.md`, `table1.csv`, `table1.png`).
    pub name: String,
    /// Heading.
    #[serde(default)]
    pub title: String,
    /// Network names (keys of `[networks]`, or a network's name with its defaults).
    pub networks: Vec<String>,
    /// Loss names (keys of `[losses]`, or a loss's name with its defaults).
    pub losses: Vec<String>,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Which predictions are scored.
    #[serde(default)]
    pub predictions: Predictions,
}

/// An experiment file (`experiments/brats18-cpu.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// The experiment's name.
    pub name: String,
    /// Output folder (default `cwseg-experiment/NAME`).
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// How test cases are scored.
    #[serde(default)]
    pub regions: Regions,
    /// The tables, in the order their runs are trained.
    #[serde(rename = "table")]
    pub tables: Vec<TableSpec>,
    /// Loss configurations by name; names not listed take the loss's defaults.
    #[serde(default)]
    pub losses: BTreeMap<String, LossConfig>,
    /// Network configurations by name; names not listed take the network's defaults.
    #[serde(default)]
    pub networks: BTreeMap<String, ModelConfig>,
    /// Cross-validation: one split file per fold (each case tested in one fold); every run of
    /// the tables is trained once per fold, and tables pool the folds' test cases. Empty: the
    /// one split of `train.data`.
    #[serde(default)]
    pub folds: Vec<PathBuf>,
    /// Paired comparisons of two losses (formulas §6), made from the same runs as the tables.
    #[serde(default, rename = "comparison")]
    pub comparisons: Vec<ComparisonSpec>,
    /// Everything else of each run (its `model`, `loss`, `seed` and, with folds, its split are
    /// replaced).
    pub train: TrainConfig,
}

impl ExperimentConfig {
    /// Reads and checks an experiment file.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: ExperimentConfig =
            crate::config::parse_toml(&text, path).context("invalid experiment configuration")?;
        if config.tables.is_empty() {
            bail!("{}: no [[table]]", path.display());
        }
        config
            .check_output_names()
            .with_context(|| path.display().to_string())?;
        for t in &config.tables {
            if t.networks.is_empty() || t.losses.is_empty() || t.seeds.is_empty() {
                bail!(
                    "{}: table `{}` needs networks, losses and seeds",
                    path.display(),
                    t.name
                );
            }
        }
        for c in &config.comparisons {
            let trained = |loss: &str| {
                config.tables.iter().any(|t| {
                    t.networks.contains(&c.network)
                        && t.losses.iter().any(|l| l == loss)
                        && c.seeds.iter().all(|s| t.seeds.contains(s))
                })
            };
            if !(trained(&c.a) && trained(&c.b)) {
                bail!(
                    "{}: comparison `{}` needs {} with {} and {} on seeds {:?} in one of the tables",
                    path.display(),
                    c.name,
                    c.network,
                    c.a,
                    c.b,
                    c.seeds
                );
            }
        }
        // every name must resolve now, not hours into the grid
        for run in config.runs() {
            config
                .run_config(&run)
                .and_then(|c| c.validate())
                .with_context(|| format!("{}: run {}", path.display(), run.key()))?;
        }
        Ok(config)
    }

    /// Refuses two `[[table]]`s or `[[comparison]]`s of one name (each writes `NAME.md` and
    /// `NAME.csv`: the second would overwrite the first), and the name `results` (the
    /// experiment's own `results.md`), and any name (the experiment's too) that is not a plain
    /// file name.
    fn check_output_names(&self) -> Result<()> {
        check_plain_name("name", &self.name)?;
        let mut seen = std::collections::BTreeSet::new();
        let names = self.tables.iter().map(|t| ("[[table]]", &t.name));
        let names = names.chain(self.comparisons.iter().map(|c| ("[[comparison]]", &c.name)));
        for (kind, name) in names {
            check_plain_name(&format!("{kind} name"), name)?;
            if name == "results" {
                bail!("{kind} name `results` is the experiment's own results.md; choose another");
            }
            if !seen.insert(name) {
                bail!(
                    "{kind} name `{name}` is used twice (each writes {name}.md and {name}.csv); give every table and comparison its own name"
                );
            }
        }
        Ok(())
    }

    /// Refuses the grid where a run already in `runs_dir` was trained with a configuration
    /// other than the one the grid asks for now (its `train.toml`), naming the run, the field,
    /// the recorded and the new value: a finished run would be reused and the tables would
    /// claim a protocol nobody ran. `device` and `workers` may change; `epochs` may grow for a
    /// run not yet finished (it is extended when resumed), not for a finished one; a run
    /// recorded in f32 matches a precision not available on its device here (the fallback).
    pub fn check_recorded_runs(&self, runs_dir: &Path) -> Result<()> {
        for run in self.runs() {
            let dir = runs_dir.join(run.key());
            if !dir.join("train.toml").exists() {
                continue;
            }
            let recorded = crate::trainer::read_run_config(&dir)?;
            let wanted = self.run_config(&run)?;
            let done = is_done(&dir)?;
            let differing = crate::trainer::differences(&recorded, &wanted)?
                .into_iter()
                .filter(|d| d.field != "precision" || !fell_back(&recorded, &wanted))
                .find(|d| d.field != "epochs" || done || wanted.epochs < recorded.epochs);
            if let Some(d) = differing {
                bail!(
                    "run {} in {} was trained with {} = {}, the experiment now asks for {}; restore {} = {} in the experiment file, or write the grid to a new --out",
                    run.key(),
                    dir.display(),
                    d.field,
                    d.saved,
                    d.given,
                    d.field,
                    d.saved
                );
            }
        }
        Ok(())
    }

    /// The output folder.
    pub fn out_dir(&self) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| Path::new("cwseg-experiment").join(&self.name))
    }

    /// The folds: `Some(i)` for each split file, or one `None` for the data's own split.
    pub fn fold_ids(&self) -> Vec<Option<usize>> {
        if self.folds.is_empty() {
            vec![None]
        } else {
            (0..self.folds.len()).map(Some).collect()
        }
    }

    /// Every run of every table, in training order (table, seed, fold, network, loss), each
    /// once.
    pub fn runs(&self) -> Vec<RunKey> {
        let mut runs: Vec<RunKey> = Vec::new();
        for t in &self.tables {
            for &seed in &t.seeds {
                for fold in self.fold_ids() {
                    for network in &t.networks {
                        for loss in &t.losses {
                            let key = RunKey {
                                network: network.clone(),
                                loss: loss.clone(),
                                seed,
                                fold,
                            };
                            if !runs.contains(&key) {
                                runs.push(key);
                            }
                        }
                    }
                }
            }
        }
        runs
    }

    /// The data configuration of a fold.
    pub fn fold_data(&self, fold: Option<usize>) -> crate::prepare::DataConfig {
        let mut data = self.train.data.clone();
        if let Some(split) = fold.and_then(|f| self.folds.get(f)) {
            data.split = Some(split.clone());
        }
        data
    }

    /// The training configuration of one run.
    pub fn run_config(&self, run: &RunKey) -> Result<TrainConfig> {
        let loss = match self.losses.get(&run.loss) {
            Some(l) => l.clone(),
            None => serde_json::from_value(serde_json::json!({ "name": run.loss }))
                .with_context(|| format!("unknown loss `{}`", run.loss))?,
        };
        let model = match self.networks.get(&run.network) {
            Some(m) => m.clone(),
            None => serde_json::from_value(serde_json::json!({ "name": run.network }))
                .with_context(|| format!("unknown network `{}`", run.network))?,
        };
        Ok(TrainConfig {
            model,
            loss,
            seed: run.seed,
            data: self.fold_data(run.fold),
            ..self.train.clone()
        })
    }
}

/// Refuses a `name` that is not a plain file name (letters, digits, `_`, `-`, `.`, not starting
/// with `.`): names become file and folder names, and `../x` would write outside the
/// experiment's folder. `field` names the field in the message.
fn check_plain_name(field: &str, name: &str) -> Result<()> {
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if name.is_empty() || name.starts_with('.') || !plain {
        bail!(
            "{field} `{name}` is not a plain name: use letters, digits, `_`, `-` and `.` (not first); it becomes a file name"
        );
    }
    Ok(())
}

/// Whether a run recorded in f32 is the `wanted` precision fallen back to f32 (training
/// records the precision in effect): the precision is not available on the wanted device here.
fn fell_back(recorded: &TrainConfig, wanted: &TrainConfig) -> bool {
    recorded.precision == cwseg_models::Precision::F32
        && parse_device(&wanted.device).map_or(true, |d| !wanted.precision.available_on(&d))
}

/// One run of the grid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunKey {
    /// Network name.
    pub network: String,
    /// Loss name.
    pub loss: String,
    /// Seed.
    pub seed: u64,
    /// Cross-validation fold (`None` without folds).
    pub fold: Option<usize>,
}

impl RunKey {
    /// The run's folder name, `unet-cwcd-seed0` (`unet-cwcd-fold1-seed0` with folds).
    pub fn key(&self) -> String {
        match self.fold {
            Some(f) => format!("{}-{}-fold{f}-seed{}", self.network, self.loss, self.seed),
            None => format!("{}-{}-seed{}", self.network, self.loss, self.seed),
        }
    }
}

/// A run's progress, `RUN/status.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    /// `training`, `predicting` or `done`.
    pub state: String,
    /// Training wall time summed over the epochs of every invocation, seconds.
    pub train_seconds: f64,
    /// Test-set prediction wall time, seconds.
    pub predict_seconds: f64,
    /// Best validation DSC and its epoch.
    pub best_val_dice: Option<f64>,
    /// The epoch of the best checkpoint (the one tested).
    pub best_epoch: Option<usize>,
    /// The cwseg version that finished the run.
    pub cwseg_version: String,
}

/// The run's `status.json`: `None` where there is none (a run not started), an error naming the
/// file where it cannot be read or parsed (never taken for a pending run).
fn read_status(dir: &Path) -> Result<Option<RunStatus>> {
    let path = dir.join("status.json");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("{}: {e}", path.display()),
    };
    match serde_json::from_str(&text) {
        Ok(status) => Ok(Some(status)),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}

/// Whether the run in `dir` has predicted its test cases.
fn is_done(dir: &Path) -> Result<bool> {
    Ok(read_status(dir)?.is_some_and(|s| s.state == "done"))
}

fn write_status(dir: &Path, status: &RunStatus) -> Result<()> {
    cwseg_data::dataset::write_atomic(
        &dir.join("status.json"),
        serde_json::to_string_pretty(status)?.as_bytes(),
    )?;
    Ok(())
}

/// Sum of the epoch times in `metrics.jsonl`.
fn train_seconds(dir: &Path) -> f64 {
    fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["seconds"].as_f64())
        .sum()
}

/// Options of one invocation.
#[derive(Debug, Clone, Default)]
pub struct ExperimentOptions {
    /// Output folder instead of the file's.
    pub out: Option<PathBuf>,
    /// Only make the tables from the runs already done.
    pub collect: bool,
    /// Train only this shard's runs (every N-th in training order) and make no tables: one
    /// job of an array; `collect` once every shard is done.
    pub shard: Option<Shard>,
}

/// Every run of the grid (of `shard`, if given), in training order, with its state (`pending`,
/// `training`, `predicting`, `done`, or `unreadable (FILE: reason)` for a `status.json` that
/// cannot be read) in `out` (default: the file's output folder).
pub fn list(
    config: &ExperimentConfig,
    out: Option<&Path>,
    shard: Option<Shard>,
) -> Vec<(String, String)> {
    let out = out.map_or_else(|| config.out_dir(), Path::to_path_buf);
    let runs = config.runs();
    let runs = match shard {
        Some(shard) => shard.select(runs),
        None => runs,
    };
    runs.iter()
        .map(|run| {
            let state = match read_status(&out.join("runs").join(run.key())) {
                Ok(status) => status.map_or_else(|| "pending".to_string(), |s| s.state),
                Err(e) => format!("unreadable ({e})"),
            };
            (run.key(), state)
        })
        .collect()
}

/// Trains and predicts every run not yet done (`hooks` watch each training), then writes the
/// tables; returns the Markdown.
pub fn run(
    config: &ExperimentConfig,
    options: &ExperimentOptions,
    hooks: &mut dyn TrainHooks,
) -> Result<String> {
    let out = options.out.clone().unwrap_or_else(|| config.out_dir());
    let runs_dir = out.join("runs");
    if options.collect {
        // before anything is written: a mistyped --out must not become a folder of NaN tables
        check_some_done(config, &runs_dir)?;
    }
    // before experiment.toml records this grid's protocol
    config.check_recorded_runs(&runs_dir)?;
    fs::create_dir_all(&runs_dir).with_context(|| format!("creating {}", runs_dir.display()))?;
    cwseg_data::dataset::write_atomic(
        &out.join("experiment.toml"),
        toml::to_string_pretty(config)?.as_bytes(),
    )?;
    let data_dir = out.join("data");
    if options.collect {
        return collect(config, &out, &data_dir);
    }
    let runs = config.runs();
    let shard = options.shard.unwrap_or(Shard::ALL);
    for (i, run) in runs.iter().enumerate() {
        let dir = runs_dir.join(run.key());
        if !shard.contains(i) || is_done(&dir)? {
            continue;
        }
        tracing::info!("run {}/{}: {}", i + 1, runs.len(), run.key());
        run_one(config, run, &dir, &data_dir, hooks)?;
    }
    match options.shard {
        None => collect(config, &out, &data_dir),
        Some(shard) => Ok(format!(
            "shard {shard}: its runs are done in {}; make the tables with --collect once every shard is done\n",
            out.display()
        )),
    }
}

/// Refuses to tabulate when no run of the grid is done in `runs_dir` (a mistyped `--out`, or
/// nothing trained yet); an unreadable `status.json` is an error naming it.
fn check_some_done(config: &ExperimentConfig, runs_dir: &Path) -> Result<()> {
    let runs = config.runs();
    let mut done = 0;
    for run in &runs {
        if is_done(&runs_dir.join(run.key()))? {
            done += 1;
        }
    }
    if done == 0 {
        bail!(
            "0 of {} runs done in {}; nothing to tabulate",
            runs.len(),
            runs_dir.display()
        );
    }
    Ok(())
}

/// Trains (or resumes) one run, then predicts its test cases into `RUN/predictions/`.
fn run_one(
    config: &ExperimentConfig,
    run: &RunKey,
    dir: &Path,
    data_dir: &Path,
    hooks: &mut dyn TrainHooks,
) -> Result<()> {
    let train_config = config.run_config(run)?;
    let mut status = RunStatus {
        state: "training".into(),
        cwseg_version: env!("CARGO_PKG_VERSION").into(),
        ..RunStatus::default()
    };
    write_status_creating(dir, &status)?;
    crate::checkpoint::recover(&dir.join("last"))?;
    let resume = dir.join("last").join("state.json").exists();
    let outcome = train(
        &train_config,
        dir,
        &RunOptions {
            resume,
            data_dir: Some(data_dir.to_path_buf()),
            communicator: None,
        },
        hooks,
    )?;
    if outcome.interrupted {
        return Err(Interrupted(format!(
            "interrupted during {}; run the same command again to continue",
            run.key()
        ))
        .into());
    }
    status.state = "predicting".into();
    status.train_seconds = train_seconds(dir);
    write_status(dir, &status)?;

    let start = Instant::now();
    let device = parse_device(&train_config.device)?;
    // the test cases of the split the run recorded when it started
    let data = open_data(&train_config.data, train_config.seed, data_dir)?
        .with_recorded_split(&dir.join("split.json"))?;
    if data.split.test.is_empty() {
        bail!("{}: the split has no test cases to evaluate", run.key());
    }
    let (network, card, best) = load_model(dir, &device)?;
    for variant in [Predictions::Postprocessed, Predictions::Unprocessed] {
        let folder = dir.join(variant.folder());
        fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    }
    for id in &data.split.test {
        let (image, _) = load_input(&data, id)?;
        let options = PredictOptions {
            overlap: card.overlap,
            postprocess: true,
        };
        let prediction = predict_case(&network, &card, &image, options, &device)?;
        let unprocessed = prediction
            .unprocessed
            .unwrap_or_else(|| prediction.labels.clone());
        for (variant, data) in [
            (Predictions::Postprocessed, prediction.labels),
            (Predictions::Unprocessed, unprocessed),
        ] {
            write_label(
                dir.join(variant.folder()).join(format!("{id}.nii.gz")),
                &LabelMap {
                    data,
                    geometry: image.geometry.clone(),
                },
            )?;
        }
    }
    let state: RunState = serde_json::from_str(
        &fs::read_to_string(dir.join("last").join("state.json")).context("reading state.json")?,
    )?;
    status.best_val_dice = state.best_dice;
    status.best_epoch = state.best_epoch;
    status.predict_seconds = start.elapsed().as_secs_f64();
    status.state = "done".into();
    write_status(dir, &status)?;
    tracing::info!(run = run.key(), checkpoint = %best.display(), "predicted the test cases");
    Ok(())
}

fn write_status_creating(dir: &Path, status: &RunStatus) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_status(dir, status)
}

/// A test case's image and labels on their own grid, unprocessed.
fn load_input(
    data: &PreparedData,
    id: &str,
) -> Result<(cwseg_data::Image, Option<cwseg_data::LabelMap>)> {
    let case = data
        .dataset
        .case(id)
        .with_context(|| format!("case {id} is not in the data set"))?;
    Ok(data.dataset.load_case(case, &ReadOptions::default())?)
}

/// Mean and sample standard deviation (n − 1; 0 for one value) of the finite values.
fn mean_std(values: &[f64]) -> Option<(f64, f64)> {
    let v: ndarray::Array1<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let mean = v.mean()?;
    Some((mean, if v.len() > 1 { v.std(1.0) } else { 0.0 }))
}

/// Per-seed summaries of one row (network × loss) of a table.
struct Row {
    network: String,
    loss: String,
    seeds: Vec<u64>,
    paper: Vec<Summary>,
    monai: Vec<Summary>,
}

/// The first line of every table's CSV (`render_table` writes it, [`table_rows`] reads it).
pub const TABLE_CSV_HEADER: &str =
    "table,network,loss,seeds,metric,region,mean,std,failures,per_seed";

/// One row of a table's CSV: a network × loss × metric × region cell.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRow {
    /// `dsc_paper`, `dsc_monai` or `hd95_mm`.
    pub metric: String,
    /// A class, a region or `Avg`.
    pub region: String,
    /// Seeds in the mean.
    pub seeds: usize,
    /// Mean over seeds of the per-seed means.
    pub mean: f64,
    /// Sample standard deviation over seeds.
    pub std: f64,
    /// Case × seed pairs with DSC 0 (left out of the paper aggregation and HD95).
    pub failures: usize,
}

/// The rows of a table's CSV (written by `cwseg experiment`) whose runs trained `network` with
/// exactly `loss`: the row's loss key is resolved through the `experiment.toml` that every
/// experiment writes beside its tables, so that two variants of one loss (say, CWCD with two
/// contour borders) are never confused. Errors name the file: not such a table, no
/// `experiment.toml`, no matching row.
pub fn table_rows(table: &Path, network: &str, loss: &LossConfig) -> Result<Vec<TableRow>> {
    let text = fs::read_to_string(table).with_context(|| format!("reading {}", table.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some(TABLE_CSV_HEADER) {
        bail!(
            "{}: not a `cwseg experiment` table (its first line is not `{TABLE_CSV_HEADER}`)",
            table.display()
        );
    }
    let experiment_file = table.with_file_name("experiment.toml");
    let experiment = ExperimentConfig::read(&experiment_file).with_context(|| {
        format!(
            "{}: the experiment beside the table says which loss each row trained",
            table.display()
        )
    })?;
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let at = || format!("{} line {}", table.display(), i + 2);
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 10 {
            bail!("{}: {} fields, not 10", at(), f.len());
        }
        let run = RunKey {
            network: f[1].to_string(),
            loss: f[2].to_string(),
            seed: 0,
            fold: None,
        };
        let trained = experiment
            .run_config(&run)
            .with_context(|| format!("{}: loss `{}`", at(), f[2]))?;
        if f[1] != network || trained.loss != *loss {
            continue;
        }
        let number = |k: usize| -> Result<f64> {
            f[k].parse()
                .with_context(|| format!("{}: `{}` is not a number", at(), f[k]))
        };
        let count = |k: usize| -> Result<usize> {
            f[k].parse()
                .with_context(|| format!("{}: `{}` is not a count", at(), f[k]))
        };
        rows.push(TableRow {
            metric: f[4].to_string(),
            region: f[5].to_string(),
            seeds: count(3)?,
            mean: number(6)?,
            std: number(7)?,
            failures: count(8)?,
        });
    }
    if rows.is_empty() {
        let json = serde_json::to_value(loss)?;
        bail!(
            "{}: no row for network `{network}` and loss `{}` (trained as {json})",
            table.display(),
            json["name"].as_str().unwrap_or("?")
        );
    }
    Ok(rows)
}

/// Which number a table cell shows.
#[derive(Clone, Copy)]
enum Metric {
    DicePaper,
    DiceMonai,
    Hd95,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Metric::DicePaper => "dsc_paper",
            Metric::DiceMonai => "dsc_monai",
            Metric::Hd95 => "hd95_mm",
        }
    }

    fn summaries(self, row: &Row) -> &[Summary] {
        match self {
            Metric::DiceMonai => &row.monai,
            _ => &row.paper,
        }
    }

    fn pick(self, m: &Means) -> Option<f64> {
        match self {
            Metric::Hd95 => m.hausdorff95,
            _ => m.dice,
        }
    }
}

/// Per seed, the value of class `k` (or the average for `k = None`), and the failures.
fn seed_values(row: &Row, metric: Metric, k: Option<usize>) -> (Vec<f64>, usize) {
    let mut values = Vec::new();
    let mut failures = 0;
    for s in metric.summaries(row) {
        let (means, f) = match k {
            Some(k) => (&s.classes[k].means, s.classes[k].failures),
            None => (&s.average, s.failures),
        };
        values.push(metric.pick(means).unwrap_or(f64::NAN));
        failures += f;
    }
    (values, failures)
}

fn cell(values: &[f64], failures: usize, metric: Metric, count_failures: bool) -> String {
    let digits = if matches!(metric, Metric::Hd95) { 2 } else { 4 };
    let mut text = match mean_std(values) {
        Some((m, s)) if values.len() > 1 => format!("{m:.digits$} ± {s:.digits$}"),
        Some((m, _)) => format!("{m:.digits$}"),
        None => "-".into(),
    };
    if count_failures && failures > 0 {
        let _ = write!(text, " ({failures} failed)");
    }
    text
}

fn display_network(name: &str) -> String {
    match name {
        "unet" => "U-Net".into(),
        "vnet" => "V-Net".into(),
        "unetr" => "UNETR".into(),
        "deeplabv3" => "DeepLabV3".into(),
        other => other.into(),
    }
}

/// Scores runs' predictions (each run once) and pools a row's folds.
struct Scorer<'a> {
    out: &'a Path,
    labels: &'a BTreeMap<String, LabelMap>,
    classes: &'a [ClassSet],
    /// The test cases of each fold.
    fold_tests: Vec<(Option<usize>, Vec<String>)>,
    cache: BTreeMap<String, Vec<CaseMetrics>>,
}

impl Scorer<'_> {
    /// The metrics of every test case of `network` × `loss` × `seed`, all folds together;
    /// `None` until every fold's run is done.
    fn pooled(
        &mut self,
        network: &str,
        loss: &str,
        seed: u64,
        predictions: Predictions,
    ) -> Result<Option<Vec<CaseMetrics>>> {
        let mut cases = Vec::new();
        for (fold, tests) in &self.fold_tests {
            let key = RunKey {
                network: network.into(),
                loss: loss.into(),
                seed,
                fold: *fold,
            }
            .key();
            let dir = self.out.join("runs").join(&key);
            if !is_done(&dir)? {
                return Ok(None);
            }
            let cached = format!("{key}/{}", predictions.folder());
            if !self.cache.contains_key(&cached) {
                let folder = dir.join(predictions.folder());
                let scored = scored_run(&folder, tests, self.labels, self.classes)?;
                self.cache.insert(cached.clone(), scored);
            }
            cases.extend(self.cache[&cached].iter().cloned());
        }
        Ok(Some(cases))
    }

    /// The fold whose test set holds `case`.
    fn fold_of(&self, case: &str) -> Option<usize> {
        self.fold_tests
            .iter()
            .find(|(_, tests)| tests.iter().any(|t| t == case))
            .and_then(|(f, _)| *f)
    }
}

/// Every fold's test cases, with their labels as stored (the reader gives class indices,
/// BraTS 4 → 3; predictions hold the stored values).
#[allow(clippy::type_complexity)]
fn test_labels(
    config: &ExperimentConfig,
    data_dir: &Path,
) -> Result<(
    PreparedData,
    Vec<(Option<usize>, Vec<String>)>,
    BTreeMap<String, LabelMap>,
)> {
    let mut fold_tests = Vec::new();
    let mut labels: BTreeMap<String, LabelMap> = BTreeMap::new();
    let mut first = None;
    for fold in config.fold_ids() {
        let data = open_data(&config.fold_data(fold), 0, data_dir)?;
        for id in &data.split.test {
            if labels.contains_key(id) {
                bail!("test case {id} is in the test set of two folds");
            }
            let (_, label) = load_input(&data, id)?;
            let mut label = label.with_context(|| format!("test case {id} has no label file"))?;
            let values = &data.dataset.label_values;
            label
                .data
                .mapv_inplace(|k| values.get(usize::from(k)).copied().unwrap_or(k));
            labels.insert(id.clone(), label);
        }
        fold_tests.push((fold, data.split.test.clone()));
        first.get_or_insert(data);
    }
    let data = first.context("an experiment has at least one fold")?;
    Ok((data, fold_tests, labels))
}

/// Scores every finished run's predictions and writes `TABLE.md`, `TABLE.csv`, `TABLE.png`,
/// each comparison's `NAME.md` and `NAME.csv`, and `results.md` (all of them) in `out`.
fn collect(config: &ExperimentConfig, out: &Path, data_dir: &Path) -> Result<String> {
    let (data, fold_tests, labels) = test_labels(config, data_dir)?;
    let classes = match config.regions {
        Regions::Brats => ClassSet::brats(),
        Regions::Classes => (1..data.dataset.classes.len())
            .map(|k| {
                ClassSet::region(
                    &data.dataset.classes[k],
                    &[i64::from(data.dataset.label_values[k])],
                )
            })
            .collect(),
    };
    let mut scorer = Scorer {
        out,
        labels: &labels,
        classes: &classes,
        fold_tests,
        cache: BTreeMap::new(),
    };
    let mut report = format!("# Experiment {}\n", config.name);
    if !config.folds.is_empty() {
        let _ = writeln!(
            report,
            "\n{}-fold cross-validation: every table pools the test cases of all folds (each \
             case tested once per seed); a seed enters a row once all its folds are done.",
            config.folds.len()
        );
    }
    for table in &config.tables {
        let mut rows = Vec::new();
        for network in &table.networks {
            for loss in &table.losses {
                let mut row = Row {
                    network: network.clone(),
                    loss: loss.clone(),
                    seeds: Vec::new(),
                    paper: Vec::new(),
                    monai: Vec::new(),
                };
                for &seed in &table.seeds {
                    let Some(cases) = scorer.pooled(network, loss, seed, table.predictions)? else {
                        continue;
                    };
                    row.seeds.push(seed);
                    row.paper.push(summarize(&cases, Aggregate::Paper));
                    row.monai.push(summarize(&cases, Aggregate::Monai));
                }
                rows.push(row);
            }
        }
        let (mut markdown, csv) = render_table(table, &rows, &classes);
        let _ = writeln!(
            markdown,
            "![{name}]({name}.png)\n\n`{name}.png`: one axial slice (the one with the most \
             labelled voxels) of the first test case: its first modality, the ground truth, then \
             each row's prediction with seed {seed}, in table order.\n",
            name = table.name,
            seed = table.seeds.first().copied().unwrap_or_default()
        );
        cwseg_data::dataset::write_atomic(
            &out.join(format!("{}.md", table.name)),
            markdown.as_bytes(),
        )?;
        cwseg_data::dataset::write_atomic(
            &out.join(format!("{}.csv", table.name)),
            csv.as_bytes(),
        )?;
        let _ = write!(report, "\n{markdown}");
        let first_fold = labels.keys().next().and_then(|id| scorer.fold_of(id));
        write_table_figure(
            &out.join(format!("{}.png", table.name)),
            &data,
            out,
            &rows,
            (table.seeds.first().copied(), first_fold),
            &labels,
        )?;
    }
    for comparison in &config.comparisons {
        let markdown = write_comparison(comparison, &mut scorer, &classes, out)?;
        let _ = write!(report, "\n{markdown}");
    }
    cwseg_data::dataset::write_atomic(&out.join("results.md"), report.as_bytes())?;
    Ok(report)
}

/// One comparison from the runs done (a seed enters once both losses have all its folds).
fn write_comparison(
    spec: &ComparisonSpec,
    scorer: &mut Scorer,
    classes: &[ClassSet],
    out: &Path,
) -> Result<String> {
    let mut a = SeedRuns::new();
    let mut b = SeedRuns::new();
    for &seed in &spec.seeds {
        if let (Some(x), Some(y)) = (
            scorer.pooled(&spec.network, &spec.a, seed, spec.predictions)?,
            scorer.pooled(&spec.network, &spec.b, seed, spec.predictions)?,
        ) {
            a.insert(seed, x);
            b.insert(seed, y);
        }
    }
    let folds: BTreeMap<String, usize> = scorer
        .labels
        .keys()
        .map(|id| (id.clone(), scorer.fold_of(id).unwrap_or(0)))
        .collect();
    let names: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
    let lines = compare(&a, &b, &names, &folds);
    let seeds: Vec<u64> = a.keys().copied().collect();
    let (markdown, csv) = render(spec, &lines, &seeds);
    cwseg_data::dataset::write_atomic(&out.join(format!("{}.md", spec.name)), markdown.as_bytes())?;
    cwseg_data::dataset::write_atomic(&out.join(format!("{}.csv", spec.name)), csv.as_bytes())?;
    Ok(markdown)
}

/// The per-case metrics a run's predictions folder `FOLDER` scored, kept beside it as
/// `FOLDER.metrics.toml` (with the test cases and the classes scored): what the tables are made
/// from. Predictions are regenerable and not kept in the repository; the metrics are. TOML, not
/// JSON: its floats hold the NaN and ∞ of empty and failed cases exactly.
#[derive(Debug, Serialize, Deserialize)]
struct ScoredRun {
    /// The test cases, in order.
    cases: Vec<String>,
    /// The classes or regions scored.
    classes: Vec<String>,
    /// Their metrics.
    metrics: Vec<CaseMetrics>,
}

/// The metrics of the predictions in `folder` (see [`ScoredRun`]): scored from the predictions
/// when they are there (and written to `FOLDER.metrics.toml`), else read from that file, which
/// must hold the same cases and classes.
fn scored_run(
    folder: &Path,
    ids: &[String],
    labels: &BTreeMap<String, LabelMap>,
    classes: &[ClassSet],
) -> Result<Vec<CaseMetrics>> {
    let file = folder.with_file_name(format!(
        "{}.metrics.toml",
        folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let names: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
    if folder.is_dir() {
        let metrics = score_run(folder, ids, labels, classes)?;
        let scored = ScoredRun {
            cases: ids.to_vec(),
            classes: names,
            metrics,
        };
        let text = toml::to_string(&scored)
            .with_context(|| format!("{}: the metrics as TOML", file.display()))?;
        cwseg_data::dataset::write_atomic(&file, text.as_bytes())?;
        return Ok(scored.metrics);
    }
    let text = fs::read_to_string(&file).with_context(|| {
        format!(
            "neither the predictions {} nor their metrics {}",
            folder.display(),
            file.display()
        )
    })?;
    let scored: ScoredRun = toml::from_str(&text)
        .with_context(|| format!("{}: not a run's metrics", file.display()))?;
    if scored.cases != ids || scored.classes != names {
        bail!(
            "{}: scored cases {:?} and classes {:?}, the experiment now asks for {ids:?} and {names:?}; \
             predict the run again (its predictions are not kept)",
            file.display(),
            scored.cases,
            scored.classes
        );
    }
    Ok(scored.metrics)
}

/// Metrics of the predictions of `ids` in a run's predictions folder against their labels, on
/// the labels' grid and spacing.
fn score_run(
    dir: &Path,
    ids: &[String],
    labels: &BTreeMap<String, LabelMap>,
    classes: &[ClassSet],
) -> Result<Vec<CaseMetrics>> {
    let mut cases = Vec::new();
    for id in ids {
        let label = labels
            .get(id)
            .with_context(|| format!("no label for test case {id}"))?;
        let path = dir.join(format!("{id}.nii.gz"));
        let prediction = read_label(&path, &ReadOptions::default())?;
        if prediction.geometry.shape() != label.geometry.shape() {
            bail!(
                "{}: shape {:?}, the label has {:?}",
                path.display(),
                prediction.geometry.shape(),
                label.geometry.shape()
            );
        }
        cases.push(evaluate_case(
            id,
            prediction.data.view(),
            label.data.view(),
            &label.geometry.spacing(),
            classes,
        )?);
    }
    Ok(cases)
}

/// The Markdown (three tables: DSC paper aggregation, DSC MONAI aggregation, HD95) and the CSV
/// of one table spec.
fn render_table(table: &TableSpec, rows: &[Row], classes: &[ClassSet]) -> (String, String) {
    let mut md = String::new();
    let title = if table.title.is_empty() {
        &table.name
    } else {
        &table.title
    };
    let _ = writeln!(md, "## {title}\n");
    let _ = writeln!(
        md,
        "Mean ± sample standard deviation over seeds of the per-seed means over the test cases; \
         `(n failed)` counts case × seed pairs with DSC = 0 for a region present in the label \
         (excluded from the paper-aggregation and HD95 means, counted as 0 by MONAI's).\n"
    );
    let mut csv = format!("{TABLE_CSV_HEADER}\n");
    let names: Vec<String> = classes
        .iter()
        .map(|c| c.name.clone())
        .chain(std::iter::once("Avg".to_string()))
        .collect();
    for (metric, heading, count) in [
        (Metric::DicePaper, "DSC, paper aggregation", true),
        (Metric::DiceMonai, "DSC, MONAI aggregation", false),
        (Metric::Hd95, "HD95 (mm), failures excluded", false),
    ] {
        let _ = writeln!(md, "### {heading}\n");
        let _ = writeln!(md, "| network | loss | seeds | {} |", names.join(" | "));
        let _ = writeln!(md, "|---|---|---|{}", "---|".repeat(names.len()));
        for row in rows {
            let mut cells = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let k = (i < classes.len()).then_some(i);
                let (values, failures) = seed_values(row, metric, k);
                cells.push(cell(&values, failures, metric, count));
                let (mean, std) = mean_std(&values).unwrap_or((f64::NAN, f64::NAN));
                let _ = writeln!(
                    csv,
                    "{},{},{},{},{},{},{},{},{},{}",
                    table.name,
                    row.network,
                    row.loss,
                    row.seeds.len(),
                    metric.label(),
                    name,
                    mean,
                    std,
                    failures,
                    values
                        .iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(";")
                );
            }
            let _ = writeln!(
                md,
                "| {} | {} | {}/{} | {} |",
                display_network(&row.network),
                row.loss.to_uppercase(),
                row.seeds.len(),
                table.seeds.len(),
                cells.join(" | ")
            );
        }
        md.push('\n');
    }
    (md, csv)
}

/// One axial slice of the first test case (the slice with the largest labelled area): the
/// first modality, the ground truth, and each row's prediction with the table's first seed
/// (from the fold that tests the case).
fn write_table_figure(
    path: &Path,
    data: &PreparedData,
    out: &Path,
    rows: &[Row],
    (seed, fold): (Option<u64>, Option<usize>),
    labels: &BTreeMap<String, LabelMap>,
) -> Result<()> {
    let Some((id, label)) = labels.iter().next() else {
        return Ok(());
    };
    let Some(seed) = seed else {
        return Ok(());
    };
    let mut predictions: Vec<Array3<u8>> = Vec::new();
    for row in rows {
        let key = RunKey {
            network: row.network.clone(),
            loss: row.loss.clone(),
            seed,
            fold,
        }
        .key();
        let file = out
            .join("runs")
            .join(key)
            .join("predictions")
            .join(format!("{id}.nii.gz"));
        if file.exists() {
            predictions.push(read_label(&file, &ReadOptions::default())?.data);
        }
    }
    if predictions.is_empty() {
        return Ok(());
    }
    let (image, _) = load_input(data, id)?;
    let z = (0..label.data.dim().0)
        .max_by_key(|&z| {
            label
                .data
                .index_axis(Axis(0), z)
                .iter()
                .filter(|&&l| l != 0)
                .count()
        })
        .unwrap_or(0);
    let channel = image.data.index_axis(Axis(0), 0);
    let img = channel.index_axis(Axis(0), z);
    let mut panels = vec![
        Panel::Gray(img),
        Panel::Labels(img, label.data.index_axis(Axis(0), z)),
    ];
    for p in &predictions {
        panels.push(Panel::Labels(img, p.index_axis(Axis(0), z)));
    }
    write_panels(path, &panels, 1)
}
