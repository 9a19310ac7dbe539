//! Sizes checked against this machine's memory before anything is allocated: a window or patch
//! whose estimated activations cannot fit is refused with the numbers, instead of the abort an
//! allocation failure ends the process with.

use anyhow::{Result, bail};
use cwseg_models::Network;

/// Physical memory of this machine in bytes (`MemTotal` of `/proc/meminfo`); `None` where it
/// cannot be read (then nothing is refused).
pub fn total_memory_bytes() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn gib(bytes: u128) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// Refuses an inference window (`field`, e.g. "config.json patch") whose activations, as
/// [`Network::activation_bytes`] estimates them for a training step (batch 1), exceed twice this
/// machine's memory. Inference keeps fewer activations than a training step, hence the factor
/// 2; a window refused here could not run.
pub fn check_window(network: &Network, window: [usize; 3], field: &str) -> Result<()> {
    let Some(total) = total_memory_bytes() else {
        return Ok(());
    };
    let needed = network.activation_bytes(window);
    if needed > 2 * total {
        bail!(
            "{field} {window:?}: one window needs an estimated {:.1} GiB of activations, more \
             than twice this machine's {:.1} GiB of memory; use a smaller window",
            gib(needed),
            gib(total)
        );
    }
    Ok(())
}

/// Refuses a training step (`field` names the size) whose estimated heap (`bytes`, e.g.
/// [`cwseg_models::training_bytes`] for the batch) exceeds this machine's memory.
pub fn check_training(bytes: u128, size: [usize; 3], field: &str) -> Result<()> {
    let Some(total) = total_memory_bytes() else {
        return Ok(());
    };
    if bytes > total {
        bail!(
            "{field} {size:?}: a training step needs an estimated {:.1} GiB, more than this \
             machine's {:.1} GiB of memory; use a smaller size",
            gib(bytes),
            gib(total)
        );
    }
    Ok(())
}
