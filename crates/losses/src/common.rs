//! Pieces every loss shares: log-probabilities, one-hot targets, smoothing constants.

use std::cell::RefCell;

use candle_core::{Tensor, TensorId};

use crate::Result;
use crate::target::{ContourConfig, Kernels, Target, one_hot};

/// The quantities of one forward pass: `logp = log_softmax(z)` over classes (never
/// `log(softmax(z))`), `t = onehot(y)`, both `(N, K, D, H, W)`, and the `u32` labels.
pub(crate) struct Prepared {
    pub labels: Tensor,
    pub logp: Tensor,
    pub onehot: Tensor,
    pub classes: usize,
}

impl Prepared {
    pub fn new(logits: &Tensor, target: &Target) -> Result<Self> {
        refuse_regions(target, "this loss")?;
        Self::with_labels(logits, target.checked_labels(logits)?)
    }

    /// From labels already checked against the logits.
    pub fn with_labels(logits: &Tensor, labels: Tensor) -> Result<Self> {
        let classes = logits.dim(1)?;
        let logp = crate::composite::log_softmax(logits)?;
        let onehot = one_hot(&labels, classes, logits.dtype())?;
        Ok(Prepared {
            labels,
            logp,
            onehot,
            classes,
        })
    }

    /// `p = softmax(z) = exp(logp)`.
    pub fn probs(&self) -> Result<Tensor> {
        Ok(self.logp.exp()?)
    }

    /// Drops the background channel of `(N, K, …)` unless `include_background`.
    pub fn foreground(x: &Tensor, include_background: bool) -> Result<Tensor> {
        Ok(if include_background {
            x.clone()
        } else {
            x.narrow(1, 1, x.dim(1)? - 1)?
        })
    }
}

/// Refuses a region target for a loss that has no region form.
pub(crate) fn refuse_regions(target: &Target, loss: &'static str) -> Result<()> {
    if target.regions().is_some() {
        return Err(crate::LossError::Config {
            loss,
            what: "has no region form (region training takes ce, dl, gdl, dwce, cedl, cwce, sdl, cwcd or tversky)".into(),
        });
    }
    Ok(())
}

/// Mean over every element.
pub(crate) fn mean(x: &Tensor) -> Result<Tensor> {
    Ok(x.mean_all()?)
}

/// The reductions of one forward pass (`cwseg_ops::loss_sums`): `(N, K, 7)` sums, on the fast path where
/// there is one. A compound loss [`Reductions::plan`]s one pass for all its parts.
pub(crate) struct Reductions<'a> {
    pub logits: &'a Tensor,
    pub labels: Tensor,
    pub target: &'a Target,
    pub classes: usize,
    reducer: Reducer,
    planned: RefCell<Option<Planned>>,
}

/// Which implementation computes the sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reducer {
    /// The fused parallel CPU kernels (`cwseg_ops::loss_sums`), f32 and f64.
    Cpu,
    /// The CUDA kernel pair (`cwseg_ops::loss_sums_cuda`), f32 and f64, in builds with the
    /// `cuda` feature.
    #[cfg(feature = "cuda")]
    Cuda,
    /// Candle operations (`composite`): any device and dtype.
    Composite,
    /// The region form's candle operations (`regions::reduce`): any device and dtype.
    Regions,
}

struct Planned {
    edges: Option<TensorId>,
    weights: Option<TensorId>,
    sums: Tensor,
}

impl<'a> Reductions<'a> {
    pub fn new(logits: &'a Tensor, target: &'a Target) -> Result<Self> {
        let labels = target.checked_labels(logits)?;
        let float = matches!(
            logits.dtype(),
            candle_core::DType::F32 | candle_core::DType::F64
        );
        let reducer = match target.kernels() {
            _ if target.regions().is_some() => Reducer::Regions,
            Kernels::Auto if float && logits.device().is_cpu() => Reducer::Cpu,
            #[cfg(feature = "cuda")]
            Kernels::Auto if float && logits.device().is_cuda() => Reducer::Cuda,
            _ => Reducer::Composite,
        };
        Ok(Reductions {
            logits,
            labels,
            target,
            classes: logits.dim(1)?,
            reducer,
            planned: RefCell::new(None),
        })
    }

    fn reduce(&self, edges: Option<&Tensor>, weights: Option<&Tensor>) -> Result<Tensor> {
        match self.reducer {
            Reducer::Cpu => Ok(cwseg_ops::loss_sums::reduce(
                self.logits,
                &self.labels,
                edges,
                weights,
            )?),
            #[cfg(feature = "cuda")]
            Reducer::Cuda => Ok(cwseg_ops::loss_sums_cuda::reduce(
                self.logits,
                &self.labels,
                edges,
                weights,
            )?),
            Reducer::Composite => {
                crate::composite::reduce(self.logits, &self.labels, edges, weights)
            }
            Reducer::Regions => match self.target.regions() {
                Some(regions) => {
                    crate::regions::reduce(self.logits, &self.labels, regions, edges, weights)
                }
                None => crate::composite::reduce(self.logits, &self.labels, edges, weights),
            },
        }
    }

    /// Computes the sums with both maps once; later [`Self::stats`] and [`Self::nll_sums`]
    /// calls with the same tensors reuse them.
    pub fn plan(&self, edges: Option<&Tensor>, weights: Option<&Tensor>) -> Result<()> {
        let sums = self.reduce(edges, weights)?;
        *self.planned.borrow_mut() = Some(Planned {
            edges: edges.map(Tensor::id),
            weights: weights.map(Tensor::id),
            sums,
        });
        Ok(())
    }

    /// `(N, K, 7)` sums (`cwseg_ops::loss_sums::stat`) with the edge map `edges`.
    pub fn stats(&self, edges: Option<&Tensor>) -> Result<Tensor> {
        if let Some(p) = self.planned.borrow().as_ref()
            && p.edges == edges.map(Tensor::id)
        {
            return Ok(p.sums.clone());
        }
        self.reduce(edges, None)
    }

    /// `(N,)` per-sample `Σ_v w_v ℓ_v`.
    pub fn nll_sums(&self, weights: &Tensor) -> Result<Tensor> {
        let planned = self
            .planned
            .borrow()
            .as_ref()
            .and_then(|p| (p.weights == Some(weights.id())).then(|| p.sums.clone()));
        let sums = match planned {
            Some(s) => s,
            None => self.reduce(None, Some(weights))?,
        };
        Ok(sums
            .narrow(2, cwseg_ops::loss_sums::stat::NLL, 1)?
            .sum(2)?
            .sum(1)?)
    }

    /// The edge map for `contour` in the logits' dtype: given with the target, or computed
    /// (with `cwseg-morphology` on the CPU fast path, online elsewhere: bit-identical).
    pub fn edges(&self, contour: &ContourConfig) -> Result<Tensor> {
        self.target.edges(
            &self.labels,
            contour,
            self.logits,
            self.reducer == Reducer::Cpu
                || (self.reducer == Reducer::Regions && self.logits.device().is_cpu()),
        )
    }

    /// The regions, when the target trains regions (then `classes` counts regions).
    pub fn regions(&self) -> Option<&crate::Regions> {
        self.target.regions()
    }

    /// One statistic `(N, K)` of the sums: the background dropped unless `include_background`;
    /// in the region form every region counts (there is no background channel).
    pub fn statistic(
        &self,
        stats: &Tensor,
        which: usize,
        include_background: bool,
    ) -> Result<Tensor> {
        statistic(stats, which, include_background || self.regions().is_some())
    }

    /// `[y ≠ 0]` `(N, D, H, W)`, or in the region form the targets `t` `(N, J, D, H, W)`: the
    /// voxels inside the objects, in `dtype`.
    pub fn inside(&self, dtype: candle_core::DType) -> Result<Tensor> {
        match self.regions() {
            Some(regions) => regions.targets(&self.labels, dtype),
            None => Ok(self.labels.ne(0u32)?.to_dtype(dtype)?),
        }
    }

    /// Voxels `|V| = N·D·H·W`.
    pub fn voxels(&self) -> usize {
        self.labels.elem_count()
    }
}

/// One statistic `(N, K)` of `(N, K, 6)`, background dropped unless `include_background`.
pub(crate) fn statistic(stats: &Tensor, which: usize, include_background: bool) -> Result<Tensor> {
    let s = stats.narrow(2, which, 1)?.squeeze(2)?;
    Prepared::foreground(&s, include_background)
}
