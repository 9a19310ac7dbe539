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
                    "device `{other}`: this cwseg was built without CUDA; build it with `scripts/gpu/build_cuda.sh` (see the README's GPU section)"
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

/// GPU memory that candle's allocations on `device` held at most since the last
/// [`reset_peak_gpu_memory`], in bytes: the high-water mark of used memory
/// (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`) of the device's current memory pool, from which candle's
/// stream-ordered allocations (and cuDNN's workspaces) come; the counterpart of PyTorch's
/// `torch.cuda.max_memory_allocated`. `None` on the CPU.
pub fn peak_gpu_memory(device: &Device) -> Result<Option<u64>> {
    pool_high_water(device, Watermark::Read)
}

/// Starts a new [`peak_gpu_memory`] measurement on `device` (nothing on the CPU).
pub fn reset_peak_gpu_memory(device: &Device) -> Result<()> {
    pool_high_water(device, Watermark::Reset).map(|_| ())
}

/// What [`pool_high_water`] does with the mark.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Watermark {
    Read,
    Reset,
}

#[cfg(not(feature = "cuda"))]
fn pool_high_water(_: &Device, _: Watermark) -> Result<Option<u64>> {
    Ok(None)
}

/// Reads (or zeroes) the used-memory high-water mark of `device`'s pool.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn pool_high_water(device: &Device, mark: Watermark) -> Result<Option<u64>> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(cuda) = device else {
        return Ok(None);
    };
    let context = cuda.cuda_stream().context().clone();
    context.bind_to_thread()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut value: u64 = 0;
    let attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
    // SAFETY: `pool` and `value` are valid out-pointers of the sizes the driver writes (a
    // pool handle, a cuuint64_t); the context is current on this thread.
    let status = unsafe {
        let status = sys::cuDeviceGetMemPool(&mut pool, context.cu_device());
        if status != sys::CUresult::CUDA_SUCCESS {
            status
        } else if mark == Watermark::Reset {
            sys::cuMemPoolSetAttribute(pool, attribute, (&mut value as *mut u64).cast())
        } else {
            sys::cuMemPoolGetAttribute(pool, attribute, (&mut value as *mut u64).cast())
        }
    };
    if status != sys::CUresult::CUDA_SUCCESS {
        bail!("GPU memory pool of {device:?}: {status:?}");
    }
    Ok(Some(value))
}
