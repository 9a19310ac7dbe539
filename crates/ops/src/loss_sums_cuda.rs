//! The loss sums of [`crate::loss_sums`] on CUDA: one kernel for the `(N, K, 7)` sums and one for
//! their gradient with respect to the logits (`src/cuda/loss_sums.cu`, compiled to PTX by
//! `build.rs` with the CUDA toolkit's `nvcc`), in place of the graph of candle operations
//! (`fused::composite`) that costs a dozen logits-sized tensors and their backward passes.
//! Sums accumulate in f64 (atomically, so their order and last bits vary between runs); the
//! result takes the logits' type, as on the CPU.
// Kernel launches and uninitialised device allocations are unsafe in cudarc.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage};
use candle_core::{Tensor, WithDType};

use crate::loss_sums::STATS;
use candle_core::Result;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/loss_sums.ptx"));
const MODULE: &str = "cwseg_loss_sums";
const THREADS: u32 = 256;
/// Blocks per sample of the sums kernel (a grid-stride loop covers the rest).
const MAX_BLOCKS: u32 = 1024;

/// Labels `(N·V)` u32 and the optional maps in the logits' type, all contiguous on the
/// logits' device.
#[derive(Clone)]
struct Maps {
    labels: Tensor,
    edges: Option<Tensor>,
    weights: Option<Tensor>,
    samples: usize,
    classes: usize,
    voxels: usize,
}

/// See [`crate::loss_sums::reduce`]; `logits` on a CUDA device, f32 or f64.
pub fn reduce(
    logits: &Tensor,
    labels: &Tensor,
    edges: Option<&Tensor>,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = logits.dtype();
    let (samples, classes) = (logits.dim(0)?, logits.dim(1)?);
    let map = |m: Option<&Tensor>| -> Result<Option<Tensor>> {
        Ok(match m {
            Some(m) => Some(m.to_dtype(dtype)?.contiguous()?),
            None => None,
        })
    };
    let maps = Maps {
        labels: labels.to_dtype(DType::U32)?.contiguous()?,
        edges: map(edges)?,
        weights: map(weights)?,
        samples,
        classes,
        voxels: logits.elem_count() / (samples * classes).max(1),
    };
    logits.contiguous()?.apply_op1(Sums(maps))?.to_dtype(dtype)
}

/// The device view of a contiguous tensor's values.
fn view<'a, T: CudaDType + DeviceRepr>(
    storage: &'a Storage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    match storage {
        Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(layout.start_offset()..)),
        _ => candle_core::bail!("loss sums: every input must be on the logits' CUDA device"),
    }
}

/// The device views of the labels and the optional maps, in the kernels' argument order.
struct MapViews<'a, T> {
    labels: CudaView<'a, u32>,
    edges: Option<CudaView<'a, T>>,
    weights: Option<CudaView<'a, T>>,
    null: usize,
}

/// A map's storage and layout from behind its lock guard.
fn unguard<'a, G: std::ops::Deref<Target = Storage>>(
    m: &'a Option<(G, &'a Layout)>,
) -> Option<(&'a Storage, &'a Layout)> {
    m.as_ref().map(|(s, l)| (&**s, *l))
}

impl<'a, T: CudaDType + DeviceRepr> MapViews<'a, T> {
    fn new(
        labels: &'a Storage,
        layout: &Layout,
        edges: Option<(&'a Storage, &Layout)>,
        weights: Option<(&'a Storage, &Layout)>,
    ) -> candle_core::Result<Self> {
        let map = |m: Option<(&'a Storage, &Layout)>| m.map(|(s, l)| view::<T>(s, l)).transpose();
        Ok(MapViews {
            labels: view::<u32>(labels, layout)?,
            edges: map(edges)?,
            weights: map(weights)?,
            null: 0,
        })
    }

    /// Pushes labels, edges and weights (a null pointer for a map left out).
    fn push<'b>(&'b self, b: &mut LaunchArgs<'b>) {
        b.arg(&self.labels);
        for map in [&self.edges, &self.weights] {
            match map {
                Some(m) => b.arg(m),
                None => b.arg(&self.null),
            };
        }
    }
}

fn kernel<T: WithDType>(name: &str) -> String {
    format!("{name}_{}", T::DTYPE.as_str())
}

fn grid(maps: &Maps, blocks: u32) -> candle_core::Result<LaunchConfig> {
    let samples = u32::try_from(maps.samples)
        .map_err(|_| candle_core::Error::Msg("loss sums: too many samples".into()))?;
    Ok(LaunchConfig {
        grid_dim: (blocks.max(1), samples, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn voxel_blocks(maps: &Maps) -> u32 {
    u32::try_from(maps.voxels.div_ceil(THREADS as usize)).unwrap_or(u32::MAX)
}

impl Maps {
    /// Runs `f` with the device views of the labels and maps (their storage locked meanwhile).
    fn with_views<T: CudaDType + DeviceRepr, R>(
        &self,
        f: impl FnOnce(&MapViews<'_, T>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let (labels, ll) = self.labels.storage_and_layout();
        let edges = self.edges.as_ref().map(|e| e.storage_and_layout());
        let weights = self.weights.as_ref().map(|w| w.storage_and_layout());
        f(&MapViews::new(
            &labels,
            ll,
            unguard(&edges),
            unguard(&weights),
        )?)
    }

    /// The sums `(N, K, 7)` in f64 of logits `z`.
    fn sums<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        z: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let dev = z.device().clone();
        let z = z.as_cuda_slice::<T>()?.slice(layout.start_offset()..);
        let mut out = dev.alloc_zeros::<f64>(self.samples * self.classes * STATS)?;
        let func = dev.get_or_load_custom_func(&kernel::<T>("loss_sums"), MODULE, PTX)?;
        let (k, v) = (self.classes as i32, self.voxels as i64);
        let mut config = grid(self, voxel_blocks(self).min(MAX_BLOCKS))?;
        config.shared_mem_bytes = (self.classes * STATS * std::mem::size_of::<f64>()) as u32;
        self.with_views::<T, _>(|views| {
            let mut b = func.builder();
            b.arg(&z);
            views.push(&mut b);
            b.arg(&mut out);
            b.arg(&k);
            b.arg(&v);
            // SAFETY: the arguments match the kernel's signature; `z` holds N·K·V values, the
            // labels and maps N·V, `out` N·K·7, and the grid covers N samples.
            unsafe { b.launch(config) }.w()?;
            Ok(())
        })?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    /// `∂L/∂z` of logits `z` from `g = ∂L/∂sums` (f64).
    fn backward<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        z: &CudaStorage,
        lz: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let dev = z.device().clone();
        let z = z.as_cuda_slice::<T>()?.slice(lz.start_offset()..);
        let g = g.as_cuda_slice::<f64>()?.slice(lg.start_offset()..);
        // SAFETY: every value is written by the kernel (one thread per voxel and sample).
        let mut dz = unsafe { dev.alloc::<T>(self.samples * self.classes * self.voxels)? };
        let func = dev.get_or_load_custom_func(&kernel::<T>("loss_sums_backward"), MODULE, PTX)?;
        let (k, v) = (self.classes as i32, self.voxels as i64);
        let config = grid(self, voxel_blocks(self))?;
        self.with_views::<T, _>(|views| {
            let mut b = func.builder();
            b.arg(&z);
            views.push(&mut b);
            b.arg(&g);
            b.arg(&mut dz);
            b.arg(&k);
            b.arg(&v);
            // SAFETY: as in `sums`; `g` holds N·K·7 values, `dz` N·K·V.
            unsafe { b.launch(config) }.w()?;
            Ok(())
        })?;
        Ok(CudaStorage::wrap_cuda_slice(dz, dev))
    }
}

struct Sums(Maps);

impl CustomOp1 for Sums {
    fn name(&self) -> &'static str {
        "cwseg-loss-sums-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("loss sums: the CUDA kernel got CPU logits")
    }

    fn cuda_fwd(
        &self,
        z: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let out = match z.dtype() {
            DType::F32 => self.0.sums::<f32>(z, layout)?,
            DType::F64 => self.0.sums::<f64>(z, layout)?,
            other => candle_core::bail!("loss sums: logits must be f32 or f64, not {other:?}"),
        };
        Ok((out, Shape::from((self.0.samples, self.0.classes, STATS))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.to_dtype(DType::F64)?.contiguous()?;
        Ok(Some(
            arg.apply_op2_no_bwd(&grad, &SumsBackward(self.0.clone()))?,
        ))
    }
}

struct SumsBackward(Maps);

impl CustomOp2 for SumsBackward {
    fn name(&self) -> &'static str {
        "cwseg-loss-sums-cuda-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("loss sums backward: the CUDA kernel got CPU logits")
    }

    fn cuda_fwd(
        &self,
        z: &CudaStorage,
        lz: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dz = match z.dtype() {
            DType::F32 => self.0.backward::<f32>(z, lz, g, lg)?,
            DType::F64 => self.0.backward::<f64>(z, lz, g, lg)?,
            other => candle_core::bail!("loss sums: logits must be f32 or f64, not {other:?}"),
        };
        Ok((dz, lz.shape().clone()))
    }
}
