//! Reading MONAI constructor arguments (`class(**args)` as JSON): the checks every network's
//! import shares, each error naming the argument. The network modules parse their own
//! arguments with these; the `monai` module turns the result into a `MonaiImport`.

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

/// A network's configuration read from MONAI's arguments, and notes for the user (arguments
/// that act only in training).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Imported<C> {
    /// The configuration, in cwseg's axis order.
    pub config: C,
    /// What the user should know.
    pub notes: Vec<String>,
}

pub(crate) fn config_error(message: String) -> ModelError {
    ModelError::Config(message)
}

/// The keyword arguments, refusing keys the class does not know.
pub(crate) fn arguments<'a>(
    args: &'a Value,
    known: &[&str],
    class: &str,
) -> Result<&'a Map<String, Value>> {
    let map = args.as_object().ok_or_else(|| {
        config_error(format!(
            "MONAI {class} arguments must be a JSON object of keyword arguments"
        ))
    })?;
    if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(config_error(format!(
            "MONAI {class} argument `{unknown}` is not one cwseg knows; known: {}",
            known.join(", ")
        )));
    }
    Ok(map)
}

pub(crate) fn uint(map: &Map<String, Value>, key: &str, default: Option<usize>) -> Result<usize> {
    match map.get(key) {
        None => default.ok_or_else(|| config_error(format!("MONAI argument `{key}` is required"))),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| config_error(format!("MONAI argument `{key}`: {v} is not a count"))),
    }
}

/// A list of counts (`default` when absent).
pub(crate) fn uint_list(
    map: &Map<String, Value>,
    key: &str,
    default: &[usize],
) -> Result<Vec<usize>> {
    let Some(value) = map.get(key) else {
        return Ok(default.to_vec());
    };
    value
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            config_error(format!(
                "MONAI argument `{key}`: {value} is not a list of counts"
            ))
        })
}

pub(crate) fn boolean(map: &Map<String, Value>, key: &str, default: bool) -> Result<bool> {
    match map.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_bool()
            .ok_or_else(|| config_error(format!("MONAI argument `{key}`: {v} is not true/false"))),
    }
}

/// A probability argument (`null` allowed where `nullable`).
pub(crate) fn probability(value: &Value, key: &str, nullable: bool) -> Result<Option<f64>> {
    if value.is_null() && nullable {
        return Ok(None);
    }
    match value.as_f64() {
        Some(p) if (0.0..=1.0).contains(&p) => Ok(Some(p)),
        _ => Err(config_error(format!(
            "MONAI argument `{key}`: {value} is not a probability in [0, 1]"
        ))),
    }
}

/// A layer argument given as `"name"` or `["name", {options}]`: the name and the options.
pub(crate) fn layer_argument<'a>(
    value: &'a Value,
    key: &str,
) -> Result<(String, Option<&'a Map<String, Value>>)> {
    match value {
        Value::String(name) => Ok((name.to_ascii_lowercase(), None)),
        Value::Array(items) if items.len() == 2 => match (&items[0], &items[1]) {
            (Value::String(name), Value::Object(options)) => {
                Ok((name.to_ascii_lowercase(), Some(options)))
            }
            _ => Err(config_error(format!(
                "MONAI argument `{key}`: {value} is neither \"name\" nor [\"name\", {{options}}]"
            ))),
        },
        _ => Err(config_error(format!(
            "MONAI argument `{key}`: {value} is neither \"name\" nor [\"name\", {{options}}]"
        ))),
    }
}

pub(crate) fn spatial_dims(map: &Map<String, Value>, class: &str) -> Result<()> {
    match uint(map, "spatial_dims", Some(3))? {
        3 => Ok(()),
        n => Err(config_error(format!(
            "MONAI {class} with spatial_dims={n}: cwseg's networks are 3-D"
        ))),
    }
}

pub(crate) fn out_channels(
    map: &Map<String, Value>,
    default: Option<usize>,
    class: &str,
) -> Result<usize> {
    let classes = uint(map, "out_channels", default)?;
    if classes < 2 {
        return Err(config_error(format!(
            "MONAI {class} with out_channels={classes}: cwseg predicts by softmax over at least 2 \
             classes (one sigmoid output is not supported)"
        )));
    }
    Ok(classes)
}
