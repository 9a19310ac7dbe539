//! The command's [`TrainHooks`]: a progress bar, and the stop that Ctrl-C or SIGTERM asks for.
//! During training the first signal stops the loop after the current step (the run saves and
//! the command exits with 130 / 143); a second one, or one outside training, ends the command
//! at once with that code.

use std::sync::atomic::{AtomicBool, Ordering};

use std::io::IsTerminal;

use cwseg_train::{EpochReport, RunStart, RunState, StepReport, TrainHooks, TrainOutcome};
use indicatif::{ProgressBar, ProgressStyle};

/// Set by Ctrl-C (SIGINT) or SIGTERM during training: the loop stops after the current step.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Set by SIGTERM: the command exits with 143 instead of 130.
pub static TERMINATED: AtomicBool = AtomicBool::new(false);

/// Whether a training loop is running (set by [`Progress`] between start and finish).
static TRAINING: AtomicBool = AtomicBool::new(false);

/// Watches SIGINT and SIGTERM for the rest of the process (see the module's documentation).
pub fn stop_on_signals() {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGXFSZ};
    // SIGXFSZ (a file past `ulimit -f`) is caught and ignored, so the write fails with EFBIG
    // and the command reports it, instead of the process dying without a word
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGXFSZ]) else {
        tracing::warn!("cannot watch SIGINT / SIGTERM: an interrupted run saves nothing");
        return;
    };
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if signal == SIGXFSZ {
                continue;
            }
            if signal == SIGTERM {
                TERMINATED.store(true, Ordering::SeqCst);
            }
            if !TRAINING.load(Ordering::SeqCst) || INTERRUPTED.swap(true, Ordering::SeqCst) {
                cwseg_train::outputs::remove_unfinished();
                eprintln!("\ninterrupted");
                std::process::exit(128 + signal);
            }
            eprintln!("\nstopping after this step and saving (Ctrl-C again to quit at once)");
        }
    });
}

/// A progress bar over a run's steps (hidden when quiet) that stops on [`INTERRUPTED`]. Where
/// standard error is not a terminal (a batch job's log), where the bar would not show, one line
/// per epoch is written instead.
pub struct Progress {
    bar: ProgressBar,
    quiet: bool,
    /// One line per epoch: not quiet, and standard error is not a terminal.
    log_lines: bool,
    /// The run's name, for the lines.
    name: String,
    /// Test hook `CWSEG_INTERRUPT_AFTER_BATCHES=N`: behave as if Ctrl-C came after the N-th
    /// step of this invocation.
    interrupt_after: Option<usize>,
    steps: usize,
}

impl Progress {
    /// Hooks for the runs of one command.
    pub fn new(quiet: bool) -> Progress {
        Progress {
            bar: ProgressBar::hidden(),
            quiet,
            log_lines: !quiet && !std::io::stderr().is_terminal(),
            name: String::new(),
            interrupt_after: std::env::var("CWSEG_INTERRUPT_AFTER_BATCHES")
                .ok()
                .and_then(|v| v.parse().ok()),
            steps: 0,
        }
    }
}

impl TrainHooks for Progress {
    fn started(&mut self, run: &RunStart) {
        TRAINING.store(true, Ordering::SeqCst);
        self.bar = if self.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(run.total_steps)
        };
        self.bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        self.bar.set_prefix(run.name.clone());
        self.bar.set_position(run.done_steps);
        self.name = run.name.clone();
        if self.log_lines {
            eprintln!(
                "{}: started at step {} of {}",
                run.name, run.done_steps, run.total_steps
            );
        }
    }

    fn epoch(&mut self, report: &EpochReport) {
        if self.log_lines {
            eprintln!(
                "{}: epoch {} loss {:.4} lr {:.1e} validation DSC {} {:.1} s{}",
                self.name,
                report.epoch,
                report.loss,
                report.lr,
                report.val_dice.map_or("-".into(), |d| format!("{d:.4}")),
                report.seconds,
                if report.improved { " (best)" } else { "" }
            );
        }
    }

    fn step(&mut self, report: &StepReport) {
        self.bar.inc(1);
        self.bar.set_message(format!(
            "epoch {}/{} loss {:.4} lr {:.1e} {:.2} patches/s best DSC {}",
            report.epoch + 1,
            report.epochs,
            report.mean_loss,
            report.lr,
            report.patches_per_second,
            report.best_dice.map_or("-".into(), |d| format!("{d:.4}"))
        ));
    }

    fn should_stop(&mut self) -> bool {
        self.steps += 1;
        INTERRUPTED.load(Ordering::SeqCst) || self.interrupt_after == Some(self.steps)
    }

    fn finished(&mut self, outcome: &TrainOutcome, state: &RunState) {
        TRAINING.store(false, Ordering::SeqCst);
        if self.log_lines {
            eprintln!(
                "{}: {} at epoch {}; best validation DSC {}",
                self.name,
                if outcome.interrupted {
                    "interrupted (saved; continue with --resume)"
                } else {
                    "done"
                },
                state.epoch,
                state.best_dice.map_or("-".into(), |d| format!("{d:.4}"))
            );
        }
        if outcome.interrupted {
            self.bar.abandon_with_message(format!(
                "interrupted at epoch {} batch {}; saved; continue with --resume",
                state.epoch + 1,
                state.batch
            ));
        } else {
            self.bar.finish_with_message(format!(
                "done; best validation DSC {} (epoch {})",
                state.best_dice.map_or("-".into(), |d| format!("{d:.4}")),
                state.best_epoch.map_or("-".into(), |e| e.to_string())
            ));
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        TRAINING.store(false, Ordering::SeqCst);
        if !self.bar.is_finished() {
            self.bar.abandon();
        }
    }
}
