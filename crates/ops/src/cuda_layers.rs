//! The layers of [`crate::layers`] on CUDA as custom ops with their backward passes, launching
//! the kernels of `src/cuda/layers.cu` (compiled to PTX by `build.rs` with nvcc): activations
//! (ReLU, LeakyReLU, ELU, GELU), PReLU, batch, instance, group and layer normalisation (with
//! an optional ReLU fused in), and softmax over the last axis. Each replaces a graph of candle
//! operations (a batch norm's composite is about six kernels and tensors forward, more than a
//! dozen backward) by one kernel forward and two or three backward; candle's own fused
//! `softmax_last_dim` and `layer_norm` have no backward pass at all.
//!
//! Values are f32, bf16 or f16; arithmetic is f32, and every sum (the statistics, the
//! gradient sums) accumulates in f64, atomically across blocks, so its last bits vary between
//! runs. Normalisation statistics are kept in f32 whatever the values' type.
// Kernel launches and uninitialised device allocations are unsafe in cudarc.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape, Storage, Tensor, WithDType, bail,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/layers.ptx"));
const MODULE: &str = "cwseg_layers";
const THREADS: u32 = 256;
/// At most this many blocks for the grid-stride kernels.
const MAX_BLOCKS: usize = 1 << 20;
/// Rows shorter than this are summed by one thread each (`row_sums_short`).
const SHORT_ROW: usize = 64;
/// Values per block of `row_sums` (a longer row is split into chunks over `gridDim.y`).
const CHUNK: usize = 16 * THREADS as usize;

/// An element type of the kernels' buffers (f32, bf16, f16; f32 and f64 for statistics).
trait Value: DeviceRepr + WithDType + CudaDType {}

impl<T: DeviceRepr + WithDType + CudaDType> Value for T {}

/// Whether the kernels take `x`: values on a CUDA device, f32, bf16 or f16.
pub(crate) fn applies(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// `$body` with the type alias `$t` for the element type `$dtype` (f32, bf16, f16).
macro_rules! by_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            other => bail!("CUDA layer kernels take f32, bf16 or f16 values, not {other:?}"),
        }
    };
}

/// Launches kernel `$name` for element type `$t` on `$dev` with grid `$config`, after `$push`
/// has pushed its arguments on builder `$b`. Every call site states why its arguments match
/// the kernel's signature in `layers.cu` and cover the grid.
macro_rules! launch {
    ($dev:expr, $t:ty, $name:expr, $config:expr, |$b:ident| $push:block) => {{
        let name = format!("{}_{}", $name, <$t as WithDType>::DTYPE.as_str());
        let func = $dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut $b = func.builder();
        $push
        // SAFETY: see the call site: the arguments follow the kernel's signature and every
        // buffer holds the values the grid reaches.
        unsafe { $b.launch($config) }.w()?;
    }};
}

/// The contiguous values of `storage` as a device view of `T`.
fn view<'a, T: Value>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
    if !layout.is_contiguous() {
        bail!("CUDA layer kernels take contiguous values");
    }
    let start = layout.start_offset();
    Ok(storage
        .as_cuda_slice::<T>()?
        .slice(start..start + layout.shape().elem_count()))
}

/// Runs `f` with the device views of `tensors` (contiguous, of type `T`, on CUDA), their
/// storage locked meanwhile.
fn with_views<T: Value, R>(
    tensors: &[&Tensor],
    f: impl FnOnce(&[CudaView<'_, T>]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let views = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            Storage::Cuda(s) => view::<T>(s, layout),
            _ => bail!("CUDA layer kernels: every tensor of an op must be on its CUDA device"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(&views)
}

/// A grid-stride launch over `n` values.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A CUDA-only custom op's `name` and a `cpu_fwd` that refuses CPU values (`$arity` inputs).
macro_rules! cuda_only {
    ($name:literal, 1) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("{}: the CUDA kernel got values on the CPU", $name)
        }
    };
    ($name:literal, 2) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("{}: the CUDA kernel got values on the CPU", $name)
        }
    };
    ($name:literal, 3) => {
        fn name(&self) -> &'static str {
            $name
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("{}: the CUDA kernel got values on the CPU", $name)
        }
    };
}

/// `n` uninitialised values of `T` on `dev`, for a kernel that writes every one of them.
fn output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all `n` values before any is read.
    unsafe { dev.alloc::<T>(n) }
}

// ---- activations ---------------------------------------------------------------------------

/// An element-wise activation with a kernel; the gradient of each is computed from the output
/// (ReLU; LeakyReLU with slope ≥ 0; ELU with α > 0: the output has the input's sign) or, for
/// GELU, from the input.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Activation {
    /// `max(0, x)`.
    Relu,
    /// `x` for `x > 0`, `slope·x` otherwise (slope ≥ 0).
    LeakyRelu(f32),
    /// `x` for `x > 0`, `α (eˣ − 1)` otherwise (α > 0).
    Elu(f32),
    /// `x Φ(x) = ½ x (1 + erf(x/√2))`.
    Gelu,
}

impl Activation {
    /// The kernel's `kind` and `p` arguments.
    fn arguments(self) -> (i32, f32) {
        match self {
            Activation::Relu => (0, 0.0),
            Activation::LeakyRelu(s) => (1, s),
            Activation::Elu(a) => (2, a),
            Activation::Gelu => (3, 0.0),
        }
    }
}

/// `activation(x)` on CUDA, with its backward pass.
pub(crate) fn activation(x: &Tensor, activation: Activation) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ActivationOp(activation))
}

struct ActivationOp(Activation);

impl CustomOp1 for ActivationOp {
    cuda_only!("cwseg-activation-cuda", 1);

    fn cuda_fwd(&self, x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let n = layout.shape().elem_count();
        let dev = x.device().clone();
        let (kind, p) = self.0.arguments();
        let y = by_dtype!(x.dtype(), T => {
            let xv = view::<T>(x, layout)?;
            let mut y = output::<T>(&dev, n)?;
            let n64 = n as i64;
            // x and y hold n values; the grid-stride loop stops at n.
            launch!(dev, T, "activation_forward", elementwise(n), |b| {
                b.arg(&xv).arg(&mut y).arg(&n64).arg(&kind).arg(&p);
            });
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        Ok((y, layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let source = match self.0 {
            Activation::Gelu => arg,
            _ => res,
        };
        let dx = source.apply_op2_no_bwd(&grad.contiguous()?, &ActivationGrad(self.0))?;
        Ok(Some(dx))
    }
}

/// `(s, g) → g·f'(x)`, `s` the output or (GELU) the input.
struct ActivationGrad(Activation);

impl CustomOp2 for ActivationGrad {
    cuda_only!("cwseg-activation-grad-cuda", 2);

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        ls: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let n = ls.shape().elem_count();
        let dev = s.device().clone();
        let (kind, p) = self.0.arguments();
        let dx = by_dtype!(s.dtype(), T => {
            let (sv, gv) = (view::<T>(s, ls)?, view::<T>(g, lg)?);
            let mut dx = output::<T>(&dev, n)?;
            let n64 = n as i64;
            // s, g and dx hold n values each.
            launch!(dev, T, "activation_backward", elementwise(n), |b| {
                b.arg(&sv).arg(&gv).arg(&mut dx).arg(&n64).arg(&kind).arg(&p);
            });
            CudaStorage::wrap_cuda_slice(dx, dev.clone())
        });
        Ok((dx, ls.shape().clone()))
    }
}

// ---- PReLU ---------------------------------------------------------------------------------

/// PReLU of `(N, C, S…)` with slopes `a` of `(C,)` or `(1,)` on CUDA: `x` for `x > 0`, `a_c·x`
/// otherwise; `∂L/∂a_c = Σ g·min(x, 0)` over channel `c`.
pub(crate) fn prelu(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 {
        bail!("prelu: expected (N, C, …) values, got {:?}", x.shape());
    }
    let slopes = a.elem_count();
    if slopes != 1 && slopes != dims[1] {
        bail!("prelu: {slopes} slopes for {} channels", dims[1]);
    }
    let op = Prelu {
        spatial: dims[2..].iter().product(),
        slopes,
    };
    x.contiguous()?.apply_op2(&a.contiguous()?, op)
}

#[derive(Clone, Copy)]
struct Prelu {
    spatial: usize,
    slopes: usize,
}

impl CustomOp2 for Prelu {
    cuda_only!("cwseg-prelu-cuda", 2);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        a: &CudaStorage,
        la: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let n = lx.shape().elem_count();
        let dev = x.device().clone();
        let (spatial, slopes) = (self.spatial.max(1) as i64, self.slopes as i32);
        let y = by_dtype!(x.dtype(), T => {
            let (xv, av) = (view::<T>(x, lx)?, view::<T>(a, la)?);
            let mut y = output::<T>(&dev, n)?;
            let n64 = n as i64;
            // x and y hold n values, a `slopes` values (the kernel reads index < slopes).
            launch!(dev, T, "prelu_forward", elementwise(n), |b| {
                b.arg(&xv).arg(&av).arg(&mut y).arg(&n64).arg(&spatial).arg(&slopes);
            });
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(a, &grad, &PreluGrad(*self))?;
        let (n, c) = (x.dim(0)?, x.dim(1)?);
        let rows = Rows::new(n * c, self.spatial, c, 0, 1);
        let sums = grad.apply_op2_no_bwd(x, &RowSums::new(SumMode::PreluSlope, rows))?;
        let per_channel = sums.get(0)?.reshape((n, c))?.sum(0)?;
        let da = if self.slopes == 1 {
            per_channel.sum_all()?.reshape(1)?
        } else {
            per_channel
        };
        Ok((Some(dx), Some(da.to_dtype(a.dtype())?)))
    }
}

/// `(x, a, g) → ∂L/∂x` of [`Prelu`].
struct PreluGrad(Prelu);

impl CustomOp3 for PreluGrad {
    cuda_only!("cwseg-prelu-grad-cuda", 3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        a: &CudaStorage,
        la: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let n = lx.shape().elem_count();
        let dev = x.device().clone();
        let (spatial, slopes) = (self.0.spatial.max(1) as i64, self.0.slopes as i32);
        let dx = by_dtype!(x.dtype(), T => {
            let (xv, av, gv) = (view::<T>(x, lx)?, view::<T>(a, la)?, view::<T>(g, lg)?);
            let mut dx = output::<T>(&dev, n)?;
            let n64 = n as i64;
            // x, g and dx hold n values, a `slopes` values.
            launch!(dev, T, "prelu_backward", elementwise(n), |b| {
                b.arg(&xv).arg(&av).arg(&gv).arg(&mut dx).arg(&n64).arg(&spatial).arg(&slopes);
            });
            CudaStorage::wrap_cuda_slice(dx, dev.clone())
        });
        Ok((dx, lx.shape().clone()))
    }
}

// ---- sums over rows ------------------------------------------------------------------------

/// `struct Rows` of `layers.cu`: `rows` rows of `len` values; row `r` = `n·channels + c` has
/// statistic `n·per_sample + c / per_stat`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Rows {
    rows: i64,
    len: i64,
    channels: i32,
    per_sample: i32,
    per_stat: i32,
}

// SAFETY: `Rows` is `#[repr(C)]` plain data laid out as the kernels' `struct Rows` (two
// int64_t, three int, padded to 32 bytes by both compilers).
unsafe impl DeviceRepr for Rows {}

impl Rows {
    fn new(rows: usize, len: usize, channels: usize, per_sample: usize, per_stat: usize) -> Self {
        Rows {
            rows: rows as i64,
            len: len as i64,
            channels: channels.max(1) as i32,
            per_sample: per_sample as i32,
            per_stat: per_stat.max(1) as i32,
        }
    }
}

/// What [`RowSums`] adds up over each row (`layers.cu`'s modes), two sums per row.
#[derive(Debug, Clone, Copy)]
enum SumMode {
    /// `Σ x`, `Σ x²` (both inputs `x`).
    Moments = 0,
    /// `Σ g`, `Σ g·x̂` of inputs `(g, x)`, `x̂ = (x − μ)·invstd`, `g` masked by `y > 0` when
    /// `y` is given.
    NormGrad = 1,
    /// `Σ g·min(x, 0)`, 0 of inputs `(g, x)`.
    PreluSlope = 2,
}

/// `(a, b) → (2, rows)` sums in f64 (see [`SumMode`]).
struct RowSums {
    mode: SumMode,
    rows: Rows,
    /// Mean and inverse standard deviation per statistic (f32), for [`SumMode::NormGrad`].
    stats: Option<(Tensor, Tensor)>,
    /// The output of a normalisation followed by ReLU, whose gradient is masked by `y > 0`.
    relu_output: Option<Tensor>,
}

impl RowSums {
    fn new(mode: SumMode, rows: Rows) -> Self {
        RowSums {
            mode,
            rows,
            stats: None,
            relu_output: None,
        }
    }

    /// The sums of `a` and `b` (element type `T`) into a new `(2, rows)` f64 buffer.
    fn run<T: Value>(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<CudaStorage> {
        let dev = a.device().clone();
        let (av, bv) = (view::<T>(a, la)?, view::<T>(b, lb)?);
        let rows = self.rows.rows as usize;
        let mut out = dev.alloc_zeros::<f64>(2 * rows)?;
        let (short, config) = row_grid(self.rows);
        let name = if short { "row_sums_short" } else { "row_sums" };
        let mode = self.mode as i32;
        let null = 0usize;
        let stats: Vec<&Tensor> = self.stats.iter().flat_map(|(m, s)| [m, s]).collect();
        let y: Vec<&Tensor> = self.relu_output.iter().collect();
        with_views::<f32, _>(&stats, |stats| {
            with_views::<T, _>(&y, |y| {
                // a and b hold rows·len values (and y, when given); mean and invstd one value
                // per statistic; out 2·rows. Null pointers only where the mode reads nothing.
                launch!(dev, T, name, config, |b| {
                    b.arg(&mode).arg(&av).arg(&bv);
                    match y.first() {
                        Some(y) => b.arg(y),
                        None => b.arg(&null),
                    };
                    match stats {
                        [mean, invstd] => b.arg(mean).arg(invstd),
                        _ => b.arg(&null).arg(&null),
                    };
                    b.arg(&mut out).arg(&self.rows);
                });
                Ok(())
            })
        })?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

/// The kernel (short rows: one thread per row) and grid for summing `rows`.
fn row_grid(rows: Rows) -> (bool, LaunchConfig) {
    let (count, len) = (rows.rows as usize, rows.len as usize);
    if len < SHORT_ROW {
        return (true, elementwise(count));
    }
    let chunks = len.div_ceil(CHUNK).clamp(1, 65_535) as u32;
    let config = LaunchConfig {
        grid_dim: (count.clamp(1, i32::MAX as usize) as u32, chunks, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    (false, config)
}

impl CustomOp2 for RowSums {
    cuda_only!("cwseg-row-sums-cuda", 2);

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let expected = (self.rows.rows * self.rows.len) as usize;
        if la.shape().elem_count() != expected || lb.shape().elem_count() != expected {
            bail!(
                "row sums: {} rows of {} values",
                self.rows.rows,
                self.rows.len
            );
        }
        let out = by_dtype!(a.dtype(), T => self.run::<T>(a, la, b, lb)?);
        Ok((out, Shape::from((2, self.rows.rows as usize))))
    }
}

// ---- normalisation -------------------------------------------------------------------------

/// Which values of `(N, C, S)` share normalisation statistics: row `(n, c)` uses statistic
/// `n·per_sample + c / per_stat`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grouping {
    samples: usize,
    channels: usize,
    spatial: usize,
    per_sample: usize,
    per_stat: usize,
}

impl Grouping {
    /// `(N, C, S)` of `x` (rank ≥ 2).
    fn dims(x: &Tensor) -> Result<(usize, usize, usize)> {
        let dims = x.dims();
        if dims.len() < 2 {
            bail!(
                "normalisation: expected (N, C, …) values, got {:?}",
                x.shape()
            );
        }
        Ok((dims[0], dims[1], dims[2..].iter().product()))
    }

    /// Batch norm: one statistic per channel, over samples and space.
    pub(crate) fn batch(x: &Tensor) -> Result<Self> {
        let (samples, channels, spatial) = Self::dims(x)?;
        Ok(Grouping {
            samples,
            channels,
            spatial,
            per_sample: 0,
            per_stat: 1,
        })
    }

    /// Instance norm: one statistic per sample and channel.
    pub(crate) fn instance(x: &Tensor) -> Result<Self> {
        let (samples, channels, spatial) = Self::dims(x)?;
        Ok(Grouping {
            samples,
            channels,
            spatial,
            per_sample: channels,
            per_stat: 1,
        })
    }

    /// Group norm: one statistic per sample and group of `C / groups` channels.
    pub(crate) fn group(x: &Tensor, groups: usize) -> Result<Self> {
        let (samples, channels, spatial) = Self::dims(x)?;
        if groups == 0 || channels % groups != 0 {
            bail!("group_norm: {channels} channels do not split into {groups} groups");
        }
        Ok(Grouping {
            samples,
            channels,
            spatial,
            per_sample: groups,
            per_stat: channels / groups,
        })
    }

    /// Layer norm over the last axis: `(…, F)` as `(rows, F, 1)`, one statistic per row, the
    /// affine parameters per feature.
    pub(crate) fn layer(x: &Tensor) -> Result<Self> {
        let features = x.dim(candle_core::D::Minus1)?;
        Ok(Grouping {
            samples: x.elem_count() / features.max(1),
            channels: features,
            spatial: 1,
            per_sample: 1,
            per_stat: features,
        })
    }

    fn stats(&self) -> usize {
        if self.per_sample == 0 {
            self.channels / self.per_stat
        } else {
            self.samples * self.per_sample
        }
    }

    /// Values per statistic.
    fn count(&self) -> usize {
        self.samples * self.channels * self.spatial / self.stats().max(1)
    }

    /// The `(n, c)` rows of `S` values.
    fn rows(&self) -> Rows {
        let (n, c) = (self.samples, self.channels);
        Rows::new(n * c, self.spatial, c, self.per_sample, self.per_stat)
    }

    /// `Σ x` and `Σ x²` per statistic, `(2, stats)` in f64.
    fn moments(&self, x: &Tensor) -> Result<Tensor> {
        if self.per_sample == 0 {
            // batch norm: the (n, c) rows, then over the samples
            let rows = x.apply_op2_no_bwd(x, &RowSums::new(SumMode::Moments, self.rows()))?;
            let rows = rows.reshape((
                2,
                self.samples,
                self.channels / self.per_stat,
                self.per_stat,
            ))?;
            return rows.sum(1)?.sum(2);
        }
        // every statistic's values are contiguous: one row each
        let stats = Rows::new(self.stats(), self.count(), 1, 1, 1);
        x.apply_op2_no_bwd(x, &RowSums::new(SumMode::Moments, stats))
    }

    /// Per-`(n, c)` sums `(N, C)` (f64) brought to one per statistic, weighted by `γ_c`
    /// (`gamma` `(1, C)` in f64).
    fn per_stat(&self, sums: &Tensor, gamma: &Tensor) -> Result<Tensor> {
        let (n, c) = (self.samples, self.channels);
        let weighted = sums.broadcast_mul(gamma)?;
        let per_stat = if self.per_sample == 0 {
            weighted
                .sum(0)?
                .reshape((c / self.per_stat, self.per_stat))?
                .sum(1)?
        } else {
            weighted
                .reshape((n, self.per_sample, self.per_stat))?
                .sum(2)?
                .flatten_all()?
        };
        per_stat.to_dtype(DType::F32)
    }
}

/// A normalisation on CUDA with its backward pass: `y = γ_c (x − μ_s)/√(σ²_s + ε) + β_c`,
/// then `max(0, ·)` when `relu`, with biased batch statistics `μ_s`, `σ²_s` of `grouping`.
/// `γ`, `β` default to 1 and 0. Returns `y` and the statistics' mean and biased variance (in
/// `x`'s type, for running statistics).
pub(crate) fn norm(
    x: &Tensor,
    (gamma, beta): (Option<&Tensor>, Option<&Tensor>),
    grouping: Grouping,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let x = x.contiguous()?;
    let sums = grouping.moments(&x)?;
    let count = grouping.count() as f64;
    let mean = sums.get(0)?.affine(1.0 / count, 0.0)?;
    let var = (sums.get(1)?.affine(1.0 / count, 0.0)? - mean.sqr()?)?.relu()?;
    let invstd = var.affine(1.0, eps)?.sqrt()?.recip()?;
    let c = grouping.channels;
    let affine = |t: Option<&Tensor>, fill: f64| -> Result<Tensor> {
        match t {
            Some(t) => t.to_dtype(x.dtype())?.contiguous(),
            None => Tensor::full(fill, c, x.device())?.to_dtype(x.dtype()),
        }
    };
    let op = Norm {
        grouping,
        mean: mean.to_dtype(DType::F32)?,
        invstd: invstd.to_dtype(DType::F32)?,
        relu,
    };
    let y = x.apply_op3(&affine(gamma, 1.0)?, &affine(beta, 0.0)?, op)?;
    Ok((y, mean.to_dtype(x.dtype())?, var.to_dtype(x.dtype())?))
}

struct Norm {
    grouping: Grouping,
    mean: Tensor,
    invstd: Tensor,
    relu: bool,
}

impl CustomOp3 for Norm {
    cuda_only!("cwseg-norm-cuda", 3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        gamma: &CudaStorage,
        lg: &Layout,
        beta: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let n = lx.shape().elem_count();
        let dev = x.device().clone();
        let (rows, relu) = (self.grouping.rows(), self.relu as i32);
        let y = by_dtype!(x.dtype(), T => {
            let (xv, gv, bv) = (view::<T>(x, lx)?, view::<T>(gamma, lg)?, view::<T>(beta, lb)?);
            let mut y = output::<T>(&dev, n)?;
            let n64 = n as i64;
            with_views::<f32, _>(&[&self.mean, &self.invstd], |stats| {
                // x and y hold n = rows·len values, γ and β C, mean and invstd one per
                // statistic (stat_of < stats for every row).
                launch!(dev, T, "norm_forward", elementwise(n), |b| {
                    b.arg(&xv).arg(&stats[0]).arg(&stats[1]).arg(&gv).arg(&bv).arg(&mut y);
                    b.arg(&n64).arg(&rows).arg(&relu);
                });
                Ok(())
            })?;
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let g = self.grouping;
        let relu_output = self.relu.then(|| res.clone());
        let sums_op = RowSums {
            mode: SumMode::NormGrad,
            rows: g.rows(),
            stats: Some((self.mean.clone(), self.invstd.clone())),
            relu_output: relu_output.clone(),
        };
        let sums = grad
            .apply_op2_no_bwd(x, &sums_op)?
            .reshape((2, g.samples, g.channels))?;
        let (sum_g, sum_gx) = (sums.get(0)?, sums.get(1)?);
        let gamma64 = gamma.to_dtype(DType::F64)?.reshape((1, g.channels))?;
        let grad_op = NormGrad {
            grouping: g,
            mean: self.mean.clone(),
            invstd: self.invstd.clone(),
            sum_g: g.per_stat(&sum_g, &gamma64)?,
            sum_gx: g.per_stat(&sum_gx, &gamma64)?,
            relu_output,
        };
        let dx = x.apply_op3_no_bwd(&grad, gamma, &grad_op)?;
        let dgamma = sum_gx.sum(0)?.to_dtype(gamma.dtype())?;
        let dbeta = sum_g.sum(0)?.to_dtype(beta.dtype())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// `(x, g, γ) → ∂L/∂x` of [`Norm`].
struct NormGrad {
    grouping: Grouping,
    mean: Tensor,
    invstd: Tensor,
    /// `Σ γ_c g` per statistic (f32).
    sum_g: Tensor,
    /// `Σ γ_c g x̂` per statistic (f32).
    sum_gx: Tensor,
    relu_output: Option<Tensor>,
}

impl CustomOp3 for NormGrad {
    cuda_only!("cwseg-norm-grad-cuda", 3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        g: &CudaStorage,
        lg: &Layout,
        gamma: &CudaStorage,
        lgamma: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let n = lx.shape().elem_count();
        let dev = x.device().clone();
        let rows = self.grouping.rows();
        let count = self.grouping.count() as f32;
        let null = 0usize;
        let y: Vec<&Tensor> = self.relu_output.iter().collect();
        let stats = [&self.mean, &self.invstd, &self.sum_g, &self.sum_gx];
        let dx = by_dtype!(x.dtype(), T => {
            let (xv, gv) = (view::<T>(x, lx)?, view::<T>(g, lg)?);
            let gammav = view::<T>(gamma, lgamma)?;
            let mut dx = output::<T>(&dev, n)?;
            let n64 = n as i64;
            with_views::<f32, _>(&stats, |s| {
                with_views::<T, _>(&y, |y| {
                    // x, g, dx (and y) hold n values, γ C, the four statistics one value per
                    // statistic each.
                    launch!(dev, T, "norm_backward", elementwise(n), |b| {
                        b.arg(&xv).arg(&gv);
                        match y.first() {
                            Some(y) => b.arg(y),
                            None => b.arg(&null),
                        };
                        b.arg(&s[0]).arg(&s[1]).arg(&gammav).arg(&s[2]).arg(&s[3]);
                        b.arg(&count).arg(&mut dx).arg(&n64).arg(&rows);
                    });
                    Ok(())
                })
            })?;
            CudaStorage::wrap_cuda_slice(dx, dev.clone())
        });
        Ok((dx, lx.shape().clone()))
    }
}

// ---- softmax -------------------------------------------------------------------------------

/// Softmax over the last axis on CUDA, with its backward pass `y (g − Σ g·y)`.
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

/// Rows and the launch of the warp-per-row softmax kernels on `(…, len)` values.
fn softmax_grid(layout: &Layout) -> (i64, i64, LaunchConfig) {
    let len = layout.shape().dims().last().copied().unwrap_or(1).max(1);
    let rows = layout.shape().elem_count() / len;
    let warps_per_block = THREADS as usize / 32;
    let config = LaunchConfig {
        grid_dim: (
            rows.div_ceil(warps_per_block).clamp(1, MAX_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    (rows as i64, len as i64, config)
}

impl CustomOp1 for Softmax {
    cuda_only!("cwseg-softmax-cuda", 1);

    fn cuda_fwd(&self, x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (rows, len, config) = softmax_grid(layout);
        let y = by_dtype!(x.dtype(), T => {
            let xv = view::<T>(x, layout)?;
            let mut y = output::<T>(&dev, layout.shape().elem_count())?;
            // x and y hold rows·len values; each warp covers whole rows.
            launch!(dev, T, "softmax_forward", config, |b| {
                b.arg(&xv).arg(&mut y).arg(&rows).arg(&len);
            });
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        });
        Ok((y, layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

/// `(y, g) → y (g − Σ g·y)` per row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    cuda_only!("cwseg-softmax-grad-cuda", 2);

    fn cuda_fwd(
        &self,
        y: &CudaStorage,
        ly: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = y.device().clone();
        let (rows, len, config) = softmax_grid(ly);
        let dx = by_dtype!(y.dtype(), T => {
            let (yv, gv) = (view::<T>(y, ly)?, view::<T>(g, lg)?);
            let mut dx = output::<T>(&dev, ly.shape().elem_count())?;
            // y, g and dx hold rows·len values.
            launch!(dev, T, "softmax_backward", config, |b| {
                b.arg(&yv).arg(&gv).arg(&mut dx).arg(&rows).arg(&len);
            });
            CudaStorage::wrap_cuda_slice(dx, dev.clone())
        });
        Ok((dx, ly.shape().clone()))
    }
}
