//! The training loop as a library. [`Trainer::open`] starts a run in a folder or resumes it
//! from `last/`; [`Trainer::run`] steps through the loader's batches, validates by
//! sliding-window inference each epoch, keeps the best and last checkpoints, writes
//! `metrics.jsonl` and `curves.png`, stops cleanly on a non-finite loss or when a hook asks,
//! and decides the post-processing at the end. [`TrainHooks`] is how a progress bar, a logger
//! or a stop signal watch it; [`train`] runs one configuration to the end, and
//! [`train_to_end`] leaves a complete run alone and resumes an interrupted one (for commands that
//! train several runs: an experiment's grid, a cross-validation's folds).

mod complete;
mod data;
mod epoch;
mod finish;
mod folder;
mod hooks;
mod recorded;
mod resume;
mod save;
mod state;
mod step;

use std::fs;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use cwseg_data::{BatchParts, LoaderConfig, SamplingVolume};
use cwseg_losses::Loss;
use cwseg_models::{Network, seeded_var_builder};

pub use complete::{is_complete, train_to_end};
pub use hooks::{
    EpochReport, Interrupted, NoHooks, RunStart, StepReport, TrainHooks, TrainOutcome,
};
pub(crate) use recorded::differences;
pub use recorded::read_run_config;
pub use state::RunState;

use crate::card::ModelCard;
use crate::config::TrainConfig;
use crate::device::parse_device;
use crate::distributed::{self, Communicator, Single};
use crate::optim::{LossScaler, Optimizer};
use crate::prepare::PreparedCase;
use data::{loader_config, open_run_data, sampling_volumes, warn_small_cases};
use folder::{holds_run_files, lock_run_folder, prepare_folder, remove_run_files};
use resume::read_last;
use save::{open_metrics, record_run};

/// Options of one invocation that are not part of the run's configuration.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue the run in the folder from its last checkpoint, with the configuration and
    /// the split (`split.json`) it recorded: cases added to the data set since are not used.
    pub resume: bool,
    /// Where the synthetic data set is written (default `RUN/data`).
    pub data_dir: Option<PathBuf>,
    /// The data-parallel group this process trains in (default: alone).
    pub communicator: Option<Rc<dyn Communicator>>,
}

/// A run in its folder: the network, optimizer, loss, data and progress of one configuration.
pub struct Trainer {
    config: TrainConfig,
    dir: PathBuf,
    device: Device,
    classes: usize,
    /// The regions, when the run trains regions (the losses' form).
    regions: Option<cwseg_losses::Regions>,
    val_cases: Vec<PreparedCase>,
    volumes: Arc<Vec<SamplingVolume>>,
    loader: LoaderConfig,
    card: ModelCard,
    vars: VarMap,
    network: Network,
    optimizer: Optimizer,
    /// Dynamic loss scaling (f16 runs, or where the configuration asks for it).
    scaler: Option<LossScaler>,
    loss: Box<dyn Loss>,
    state: RunState,
    /// `metrics.jsonl`, open on rank 0 only.
    metrics: Option<fs::File>,
    comm: Rc<dyn Communicator>,
}

/// Trains `config` into `dir` to the end (or until a hook stops it). When a new run fails
/// before its first checkpoint (nothing to resume), what this call wrote is removed again: the
/// folder if it created it, else the run's files in a folder that held none.
pub fn train(
    config: &TrainConfig,
    dir: &Path,
    options: &RunOptions,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainOutcome> {
    config.validate()?;
    let rank0 = options.communicator.as_ref().is_none_or(|c| c.rank() == 0);
    // one process writes a run folder at a time; what follows is decided under the lock
    let (_lock, created) = match rank0 {
        true => {
            let (lock, created) = lock_run_folder(dir)?;
            (Some(lock), created)
        }
        false => (None, false),
    };
    let fresh = !options.resume && !holds_run_files(dir);
    let previous = cwseg_models::precision();
    // before `Trainer::open`, which records the precision in the model card (on CUDA this
    // opens the device once more than the trainer does)
    let device = parse_device(&config.device)?;
    let effective = cwseg_models::set_precision(config.precision, &device);
    let fallback;
    let config = if effective == config.precision {
        config
    } else {
        tracing::warn!(
            "precision {} needs {}; training in {effective} (recorded as precision = \"{effective}\" in {})",
            config.precision,
            config.precision.requirement(),
            dir.join("train.toml").display()
        );
        // the run records what it trained in: a resume elsewhere cannot switch precision
        fallback = TrainConfig {
            precision: effective,
            ..config.clone()
        };
        &fallback
    };
    let outcome = Trainer::open(config, dir, options).and_then(|t| t.run(hooks));
    cwseg_models::set_precision(previous, &device);
    // a checkpoint, or the previous one of a replacement cut short, is never removed
    let checkpointed = ["last", "last.previous"]
        .iter()
        .any(|c| dir.join(c).exists());
    if outcome.is_err() && rank0 && !checkpointed {
        if created {
            let _ = fs::remove_dir_all(dir);
        } else if fresh {
            remove_run_files(dir);
        }
    }
    outcome
}

impl Trainer {
    /// Opens a run in `dir`: a new one (refused where the folder holds a run: a checkpoint,
    /// its history, or the `train.toml` of another configuration; a `train.toml` of this one
    /// without a checkpoint is the same run started again), or with `options.resume` the one
    /// there, from `last/` (refused where the configuration differs from the one the
    /// checkpoint was trained with in anything but a larger `epochs`, `device` or `workers`,
    /// or where a file of the checkpoint does not have its recorded SHA-256). A resumed run
    /// keeps the split recorded in `split.json` when it started: cases added to the data set
    /// since are not used. Loads and preprocesses the data, builds the network (seeded), loads
    /// the checkpoint, and only then writes `train.toml` and (unless recorded) `split.json`.
    pub fn open(config: &TrainConfig, dir: &Path, options: &RunOptions) -> Result<Trainer> {
        let comm = options
            .communicator
            .clone()
            .unwrap_or_else(|| Rc::new(Single));
        if !config.batch_parts.is_multiple_of(comm.size()) {
            bail!(
                "{} ranks: batch_parts = {} must be a multiple of the number of ranks (each rank trains on its own parts of every batch)",
                comm.size(),
                config.batch_parts
            );
        }
        let rank0 = comm.rank() == 0;
        let extended = prepare_folder(config, dir, options.resume, rank0)?;
        let last = options.resume.then(|| read_last(dir)).transpose()?;
        let device = parse_device(&config.device)?;
        let data_dir = options.data_dir.clone().unwrap_or_else(|| dir.join("data"));
        let (data, card) = open_run_data(config, &data_dir, &dir.join("split.json"))?;
        if let Some(last) = &last {
            last.check_card(&card)?;
        }
        tracing::info!(
            cases = data.split.train.len(),
            val = data.split.val.len(),
            "loading and preprocessing"
        );
        let train_cases = data.load(&data.split.train)?;
        let val_cases = data.load(&data.split.val)?;
        warn_small_cases(config.patch, &train_cases);
        warn_small_cases(config.patch, &val_cases);
        let volumes = Arc::new(sampling_volumes(config, train_cases)?);
        let vars = VarMap::new();
        let network =
            card.model
                .build(seeded_var_builder(&vars, config.seed, DType::F32, &device))?;
        let mut optimizer = Optimizer::for_varmap(config.optimizer, &vars)?;
        let state = match last {
            Some(last) => last.restore(dir, &vars, &mut optimizer, config, extended)?,
            None => RunState::default(),
        };
        // only now that everything loaded: a refused resume leaves train.toml as it was
        if rank0 {
            record_run(dir, config, &card, &data.split, options.resume)?;
        }
        let mut scaler = config.loss_scaling.scaler(cwseg_models::precision());
        if let (Some(scaler), Some(saved)) = (&mut scaler, state.loss_scaler) {
            scaler.restore(saved);
        }
        distributed::broadcast_variables(&*comm, &vars)?;
        let metrics = rank0.then(|| open_metrics(dir)).transpose()?;
        let region_classes = card.region_classes()?;
        let mut loader = loader_config(config, region_classes.as_ref());
        loader.parts = BatchParts::of_rank(config.batch_parts, comm.rank(), comm.size());
        Ok(Trainer {
            config: config.clone(),
            dir: dir.to_path_buf(),
            device,
            classes: card.classes.len(),
            regions: region_classes.as_ref().map(|r| r.losses()).transpose()?,
            val_cases,
            volumes,
            loader,
            card,
            vars,
            network,
            optimizer,
            scaler,
            loss: config.loss.build(),
            state,
            metrics,
            comm,
        })
    }

    /// The run's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The network being trained.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The model card its checkpoints carry.
    pub fn card(&self) -> &ModelCard {
        &self.card
    }

    /// Where the run stands.
    pub fn state(&self) -> &RunState {
        &self.state
    }

    fn is_rank0(&self) -> bool {
        self.comm.rank() == 0
    }
}
