//! Concatenation of two `(N, C, S…)` tensors along the channel axis (the skip connections of
//! the U-Net, V-Net and UNETR decoders) as one CPU f32 op whose copies run in parallel, channel
//! plane by channel plane, forward and backward (candle's `cat` and the `narrow` copies of its
//! backward run on one thread).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::fused::{cpu_f32, f32_slice, with_f32, zeros};

/// `[a, b]` along axis 1; both need the same samples and trailing shape.
pub fn cat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (da, db) = (a.dims(), b.dims());
    if !(cpu_f32(a) && cpu_f32(b)) || da.len() < 2 || db.len() != da.len() {
        return Tensor::cat(&[a, b], 1);
    }
    if da[0] != db[0] || da[2..] != db[2..] {
        bail!("cat along channels: shapes {da:?} and {db:?} differ outside the channel axis");
    }
    let op = CatChannels {
        samples: da[0],
        channels: [da[1], db[1]],
        plane: da[2..].iter().product(),
    };
    a.contiguous()?.apply_op2(&b.contiguous()?, op)
}

struct CatChannels {
    samples: usize,
    channels: [usize; 2],
    plane: usize,
}

impl CatChannels {
    /// `(part, channel)` of output channel plane `i`.
    fn source(&self, i: usize) -> (usize, usize) {
        let [ca, cb] = self.channels;
        let (n, c) = (i / (ca + cb), i % (ca + cb));
        if c < ca {
            (0, n * ca + c)
        } else {
            (1, n * cb + c - ca)
        }
    }
}

impl CustomOp2 for CatChannels {
    fn name(&self) -> &'static str {
        "cwseg-cat-channels"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let parts = [f32_slice(s1, l1)?, f32_slice(s2, l2)?];
        let [ca, cb] = self.channels;
        let mut y = zeros(self.samples * (ca + cb) * self.plane);
        y.par_chunks_mut(self.plane)
            .enumerate()
            .for_each(|(i, out)| {
                let (part, c) = self.source(i);
                out.copy_from_slice(&parts[part][c * self.plane..][..self.plane]);
            });
        let mut shape = l1.dims().to_vec();
        shape[1] = ca + cb;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [ca, cb] = self.channels;
        let mut ga = zeros(self.samples * ca * self.plane);
        let mut gb = zeros(self.samples * cb * self.plane);
        with_f32(grad, |g| {
            ga.par_chunks_mut(self.plane)
                .enumerate()
                .for_each(|(j, out)| {
                    let (n, c) = (j / ca, j % ca);
                    out.copy_from_slice(&g[(n * (ca + cb) + c) * self.plane..][..self.plane]);
                });
            gb.par_chunks_mut(self.plane)
                .enumerate()
                .for_each(|(j, out)| {
                    let (n, c) = (j / cb, ca + j % cb);
                    out.copy_from_slice(&g[(n * (ca + cb) + c) * self.plane..][..self.plane]);
                });
            Ok(())
        })?;
        Ok((
            Some(Tensor::from_vec(ga, a.shape(), a.device())?),
            Some(Tensor::from_vec(gb, b.shape(), b.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn values(t: &Tensor) -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()
    }

    /// The op and its gradients against candle's `cat` in f64 (which takes candle's path).
    #[test]
    fn matches_candles_cat() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 4, 5, 2), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 2, 4, 5, 2), &dev)?)?;
        let y = cat_channels(&a, &b)?;
        let up = Tensor::randn(0f32, 1., y.dims(), &dev)?;
        let grads = (&y * &up)?.sum_all()?.backward()?;
        let (a64, b64) = (
            Var::from_tensor(&a.to_dtype(DType::F64)?)?,
            Var::from_tensor(&b.to_dtype(DType::F64)?)?,
        );
        let y64 = cat_channels(&a64, &b64)?;
        let grads64 = (&y64 * &up.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
        assert_eq!(values(&y)?, values(&y64)?);
        for (v, v64) in [(&a, &a64), (&b, &b64)] {
            let (g, g64) = (grads.get(v), grads64.get(v64));
            let (Some(g), Some(g64)) = (g, g64) else {
                bail!("no gradient")
            };
            assert_eq!(values(g)?, values(g64)?);
        }
        assert!(cat_channels(&a, &b.narrow(2, 0, 3)?).is_err());
        Ok(())
    }
}
