//! The configuration a run folder records (`train.toml`) and the fields in which another
//! configuration differs from it.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::card::ModelCard;
use crate::config::TrainConfig;

/// The configuration a run folder was trained with (`RUN/train.toml`; also the one inside
/// each resumable checkpoint, `RUN/last/train.toml`).
pub fn read_run_config(dir: &Path) -> Result<TrainConfig> {
    let path = dir.join("train.toml");
    let text = fs::read_to_string(&path)
        .with_context(|| format!("--resume: reading {}", path.display()))?;
    crate::config::parse_toml(&text, &path).context("not a training configuration")
}

/// A field in which two run configurations differ: its dotted name and both values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Difference {
    /// `optimizer.lr`, `patch`, …
    pub field: String,
    /// The recorded value (TOML; `(absent)` where the field is missing).
    pub saved: String,
    /// The value asked for now.
    pub given: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (recorded {}, now {})",
            self.field, self.saved, self.given
        )
    }
}

/// A TOML value on one line, `(absent)` for none.
fn show(value: Option<&toml::Value>) -> String {
    value.map_or_else(
        || "(absent)".to_string(),
        |v| v.to_string().trim().replace('\n', ", "),
    )
}

/// Appends to `out` every leaf of `a` and `b` (tables walked by key) that differs.
fn walk(a: Option<&toml::Value>, b: Option<&toml::Value>, path: &str, out: &mut Vec<Difference>) {
    if let (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) = (a, b) {
        let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
        for key in keys {
            let name = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            walk(x.get(key), y.get(key), &name, out);
        }
    } else if a != b {
        out.push(Difference {
            field: path.to_string(),
            saved: show(a),
            given: show(b),
        });
    }
}

/// The fields in which `given` differs from `saved`, leaving out those a resumed run may
/// change: `device` and `workers` (callers check `epochs` by their own rule).
pub(crate) fn differences(saved: &TrainConfig, given: &TrainConfig) -> Result<Vec<Difference>> {
    // the network's channels, classes and UNETR's input size come from the data and the patch:
    // train.toml records the run's, a configuration given beside --resume may hold defaults
    let derived_cleared = |c: &TrainConfig| TrainConfig {
        model: c.model.with_io(0, 0).with_input_size(c.patch),
        ..c.clone()
    };
    let mut out = Vec::new();
    walk(
        Some(&toml::Value::try_from(derived_cleared(saved))?),
        Some(&toml::Value::try_from(derived_cleared(given))?),
        "",
        &mut out,
    );
    out.retain(|d| !matches!(d.field.as_str(), "device" | "workers"));
    Ok(out)
}

/// The configuration a run records (`train.toml`): `config` with the run's own network
/// (channels and classes from the data), not the configuration's defaults.
pub(super) fn recorded_config(config: &TrainConfig, card: &ModelCard) -> TrainConfig {
    TrainConfig {
        model: card.model.clone(),
        ..config.clone()
    }
}
