//! The experiment file: [`ExperimentConfig`] (its tables, losses, networks, folds and
//! comparisons), the checks of its names and of the runs already recorded, and the grid of
//! [`RunKey`]s with each run's training configuration.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cwseg_losses::LossConfig;
use cwseg_models::ModelConfig;
use serde::{Deserialize, Serialize};

use super::status::is_done;
use crate::compare::{ComparisonSpec, Predictions};
use crate::config::TrainConfig;
use crate::device::parse_device;

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
        config
            .check_pooled_needs_folds()
            .with_context(|| path.display().to_string())?;
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

    /// Refuses `predictions = "pooled"` without `folds`: the rule is chosen on the pooled
    /// out-of-fold predictions of a cross-validation; on one split it would be chosen on the
    /// very test cases the table scores.
    fn check_pooled_needs_folds(&self) -> Result<()> {
        if !self.folds.is_empty() {
            return Ok(());
        }
        let pooled = self
            .tables
            .iter()
            .filter(|t| t.predictions == Predictions::Pooled)
            .map(|t| format!("table `{}`", t.name))
            .chain(
                self.comparisons
                    .iter()
                    .filter(|c| c.predictions == Predictions::Pooled)
                    .map(|c| format!("comparison `{}`", c.name)),
            )
            .next();
        if let Some(what) = pooled {
            bail!(
                "{what}: predictions = \"pooled\" chooses post-processing on the pooled \
                 out-of-fold predictions of a cross-validation, and this experiment has no \
                 `folds` (on one split it would choose it on the test cases it scores); add \
                 `folds` or use \"postprocessed\" or \"unprocessed\""
            );
        }
        Ok(())
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
