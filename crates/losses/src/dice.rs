//! The dice family (formulas §2): background excluded, one dice per sample and class, then the
//! mean; `s_nr = s_dr = 1e-5`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::common::Reductions;
use crate::cross_entropy::Preset;
use crate::target::{ContourConfig, Target};
use crate::{Loss, LossError, Result};
use cwseg_ops::loss_sums::stat;

fn default_smooth() -> f64 {
    1e-5
}

/// Dice loss `DL = mean_{n,c} 1 − (2 I_c + s_nr) / (P_c + G_c + s_dr)` with `I = Σ p t`,
/// `P = Σ p` (`Σ p²` if `squared`), `G = Σ t`. Matches MONAI
/// `DiceLoss(softmax=True, to_onehot_y=True, include_background=False)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Dice {
    /// Count class 0.
    pub include_background: bool,
    /// One dice per class over the whole batch instead of per sample.
    pub batch: bool,
    /// Square `p` and `t` in the denominator (V-Net's form).
    pub squared: bool,
    /// Numerator smoothing.
    pub smooth_nr: f64,
    /// Denominator smoothing.
    pub smooth_dr: f64,
}

impl Default for Dice {
    fn default() -> Self {
        Dice {
            include_background: false,
            batch: false,
            squared: false,
            smooth_nr: default_smooth(),
            smooth_dr: default_smooth(),
        }
    }
}

/// `(N, K')` statistics, pooled over the batch into `(1, K')` with `batch`.
fn pooled(
    r: &Reductions,
    stats: &Tensor,
    which: usize,
    include_background: bool,
    batch: bool,
) -> Result<Tensor> {
    let s = r.statistic(stats, which, include_background)?;
    Ok(if batch { s.sum_keepdim(0)? } else { s })
}

impl Dice {
    pub(crate) fn value(&self, r: &Reductions) -> Result<Tensor> {
        check_classes("dl", r, self.include_background)?;
        let stats = r.stats(None)?;
        let (bg, batch) = (self.include_background, self.batch);
        let i = pooled(r, &stats, stat::I, bg, batch)?;
        // t is binary: Σ t² = Σ t.
        let pp = pooled(
            r,
            &stats,
            if self.squared { stat::P2 } else { stat::P },
            bg,
            batch,
        )?;
        let g = pooled(r, &stats, stat::G, bg, batch)?;
        let dice = (i.affine(2.0, self.smooth_nr)? / (pp + g)?.affine(1.0, self.smooth_dr)?)?;
        Ok(dice.affine(-1.0, 1.0)?.mean_all()?)
    }
}

impl Loss for Dice {
    fn name(&self) -> &'static str {
        "dl"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        self.value(&Reductions::new(logits, target)?)
    }
}

/// A loss without the background needs a second class; in the region form every region
/// counts.
fn check_classes(loss: &'static str, r: &Reductions, include_background: bool) -> Result<()> {
    if r.classes < 2 && !include_background && r.regions().is_none() {
        return Err(LossError::Config {
            loss,
            what: "needs at least 2 classes when the background is excluded".into(),
        });
    }
    Ok(())
}

/// How GDL weighs a class from its label volume `G_c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GdlWeight {
    /// `1 / G_c²` (Sudre 2017).
    #[default]
    Square,
    /// `1 / G_c`.
    Simple,
    /// 1.
    Uniform,
}

/// Generalised dice loss (Sudre 2017):
/// `GDL = 1 − (2 Σ_c w_c I_c + s_nr) / (Σ_c w_c (P_c + G_c) + s_dr)` per sample, then the
/// mean; `w_c = 1/G_c²`; an absent class takes the sample's largest finite weight. Matches
/// MONAI `GeneralizedDiceLoss(softmax=True, to_onehot_y=True, include_background=False)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeneralizedDice {
    /// Count class 0.
    pub include_background: bool,
    /// Pool the batch.
    pub batch: bool,
    /// Class weighting.
    pub weight: GdlWeight,
    /// Numerator smoothing.
    pub smooth_nr: f64,
    /// Denominator smoothing.
    pub smooth_dr: f64,
}

impl Default for GeneralizedDice {
    fn default() -> Self {
        GeneralizedDice {
            include_background: false,
            batch: false,
            weight: GdlWeight::Square,
            smooth_nr: default_smooth(),
            smooth_dr: default_smooth(),
        }
    }
}

impl Loss for GeneralizedDice {
    fn name(&self) -> &'static str {
        "gdl"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        let r = Reductions::new(logits, target)?;
        check_classes("gdl", &r, self.include_background)?;
        let stats = r.stats(None)?;
        let (bg, batch) = (self.include_background, self.batch);
        let i = pooled(&r, &stats, stat::I, bg, batch)?;
        let pp = pooled(&r, &stats, stat::P, bg, batch)?;
        let g = pooled(&r, &stats, stat::G, bg, batch)?;
        let w = match self.weight {
            GdlWeight::Square => g.sqr()?.recip()?,
            GdlWeight::Simple => g.recip()?,
            GdlWeight::Uniform => g.ones_like()?,
        };
        // Absent classes (infinite weight) take the largest finite weight of their sample
        // (of the batch with `batch`), as MONAI.
        let absent = g.eq(0.0)?;
        let finite = absent.where_cond(&w.zeros_like()?, &w)?;
        let largest = if self.batch {
            finite.max_keepdim(1)?.max_keepdim(0)?
        } else {
            finite.max_keepdim(1)?
        };
        let w = absent.where_cond(&largest.broadcast_as(finite.shape())?, &finite)?;
        let numer = (w.clone() * i)?
            .sum_keepdim(1)?
            .affine(2.0, self.smooth_nr)?;
        let denom = (w * (pp + g)?)?
            .sum_keepdim(1)?
            .affine(1.0, self.smooth_dr)?;
        Ok((numer / denom)?.affine(-1.0, 1.0)?.mean_all()?)
    }
}

/// Tversky loss `1 − (I + s_nr) / (I + α FP + β FN + s_dr)` per sample and class, then the mean;
/// `FP = Σ p (1 − t)`, `FN = Σ (1 − p) t`, α = β = 0.5. Matches MONAI
/// `TverskyLoss(softmax=True, to_onehot_y=True, include_background=False)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tversky {
    /// Weight of false positives.
    pub alpha: f64,
    /// Weight of false negatives.
    pub beta: f64,
    /// Count class 0.
    pub include_background: bool,
    /// Pool the batch.
    pub batch: bool,
    /// Numerator smoothing.
    pub smooth_nr: f64,
    /// Denominator smoothing.
    pub smooth_dr: f64,
}

impl Default for Tversky {
    fn default() -> Self {
        Tversky {
            alpha: 0.5,
            beta: 0.5,
            include_background: false,
            batch: false,
            smooth_nr: default_smooth(),
            smooth_dr: default_smooth(),
        }
    }
}

impl Loss for Tversky {
    fn name(&self) -> &'static str {
        "tversky"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        let r = Reductions::new(logits, target)?;
        check_classes("tversky", &r, self.include_background)?;
        let stats = r.stats(None)?;
        let (bg, batch) = (self.include_background, self.batch);
        let i = pooled(&r, &stats, stat::I, bg, batch)?;
        // FP = Σ p (1 − t) = P − I, FN = Σ (1 − p) t = G − I.
        let fp = (pooled(&r, &stats, stat::P, bg, batch)? - &i)?;
        let fn_ = (pooled(&r, &stats, stat::G, bg, batch)? - &i)?;
        let denom =
            ((&i + fp.affine(self.alpha, 0.0)?)? + fn_.affine(self.beta, self.smooth_dr)?)?;
        let ti = (i.affine(1.0, self.smooth_nr)? / denom)?;
        Ok(ti.affine(-1.0, 1.0)?.mean_all()?)
    }
}

/// Separable dice loss (paper §2.2, eq. 4–6): each class split into its contour `C_k` and
/// the rest, for prediction and target:
/// `L^c_k = 1 − (2 Σ C_k p_k t_k + s) / (Σ C_k p_k + Σ C_k t_k + s)`, `L^n_k` the same with
/// `1 − C_k`, `SDL = (1/M) Σ_{k≥1} [α L^c_k + (1 − α) L^n_k]`, α = 0.5, M = K − 1, sums per
/// sample then the mean over samples, s = 1e-5; `C_k` class k's own contour (cube 3,
/// 6 iterations, background border). Preset `reference`: one pooled dice over all foreground
/// classes and the batch per part, s = 1e-3, `SDL = L^c + L^n`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeparableDice {
    /// Weight α of the contour part.
    pub alpha: f64,
    /// Smoothing `s` (the `reference` preset uses 1e-3 whatever this says).
    pub smooth: f64,
    /// The contour settings.
    pub contour: ContourConfig,
    /// `paper` or `reference`.
    pub preset: Preset,
}

impl Default for SeparableDice {
    fn default() -> Self {
        SeparableDice {
            alpha: 0.5,
            smooth: default_smooth(),
            contour: ContourConfig::default(),
            preset: Preset::Paper,
        }
    }
}

impl SeparableDice {
    /// The value, given the edge map `E`: with `C_k = t_k E` (t binary),
    /// `Σ C_k p_k t_k = Σ C_k p_k = I_E`, `Σ C_k t_k = G_E`, and the rest is `I − I_E`,
    /// `P − I_E`, `G − G_E`.
    pub(crate) fn value(&self, r: &Reductions, edges: &Tensor) -> Result<Tensor> {
        self.contour.validate("sdl")?;
        check_classes("sdl", r, false)?;
        let stats = r.stats(Some(edges))?;
        let get = |which| r.statistic(&stats, which, false);
        let (i, p, g, ie, ge) = (
            get(stat::I)?,
            get(stat::P)?,
            get(stat::G)?,
            get(stat::IE)?,
            get(stat::GE)?,
        );
        let (i_rest, p_rest, g_rest) = ((&i - &ie)?, (&p - &ie)?, (&g - &ge)?);
        let dice_loss = |i: &Tensor, p: &Tensor, g: &Tensor, s: f64| -> Result<Tensor> {
            Ok((i.affine(2.0, s)? / (p + g)?.affine(1.0, s)?)?.affine(-1.0, 1.0)?)
        };
        match self.preset {
            Preset::Paper => {
                let s = self.smooth;
                let lc = dice_loss(&ie, &ie, &ge, s)?;
                let ln = dice_loss(&i_rest, &p_rest, &g_rest, s)?;
                let per_class =
                    (lc.affine(self.alpha, 0.0)? + ln.affine(1.0 - self.alpha, 0.0)?)?;
                Ok(per_class.mean_all()?)
            }
            Preset::Reference => {
                let all = |x: &Tensor| -> Result<Tensor> { Ok(x.sum_all()?) };
                let lc = dice_loss(&all(&ie)?, &all(&ie)?, &all(&ge)?, 1e-3)?;
                let ln = dice_loss(&all(&i_rest)?, &all(&p_rest)?, &all(&g_rest)?, 1e-3)?;
                Ok((lc + ln)?)
            }
        }
    }
}

impl Loss for SeparableDice {
    fn name(&self) -> &'static str {
        "sdl"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        self.contour.validate("sdl")?;
        let r = Reductions::new(logits, target)?;
        self.value(&r, &r.edges(&self.contour)?)
    }
}
