//! Device names as the command line and `train.toml` give them.

use anyhow::{Context, Result, bail};
use candle_core::Device;

/// Parses `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        other if other == "cuda" || other.starts_with("cuda:") => {
            let ordinal: usize = other
                .strip_prefix("cuda:")
                .map(str::parse)
                .transpose()
                .with_context(|| format!("device `{other}`: expected cuda:N"))?
                .unwrap_or(0);
            if !cfg!(feature = "cuda") {
                bail!(
                    "device `{other}`: this cwseg was built without CUDA; build it with `scripts/build-cuda.sh` (see the README's GPU section)"
                );
            }
            Device::new_cuda(ordinal).map_err(|e| {
                // candle may append a backtrace: the first line is the driver's answer
                let cause = e.to_string();
                let cause = cause.lines().next().unwrap_or_default().trim();
                anyhow::anyhow!("device `{other}`: no usable CUDA GPU ({cause})")
            })
        }
        other => bail!("unknown device `{other}`: use cpu, cuda or cuda:N"),
    }
}
