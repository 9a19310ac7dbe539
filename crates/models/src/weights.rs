//! Weights as safetensors: save with metadata (temporary file, then rename), load strictly
//! (every tensor present, none extra, every shape equal).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::error::{ModelError, Result};

/// Writes every variable of `vars` to `path` as `dtype` (f32, f16 or bf16), with string
/// `metadata` in the safetensors header.
pub fn save(
    vars: &VarMap,
    path: impl AsRef<Path>,
    dtype: DType,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let data = vars
        .data()
        .lock()
        .map_err(|_| ModelError::Config("the variable map's lock is poisoned".into()))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(data.len());
    for (name, var) in data.iter() {
        tensors.push((
            name.clone(),
            var.as_tensor().to_dtype(dtype)?.to_device(&Device::Cpu)?,
        ));
    }
    drop(data);
    save_tensors(tensors, path, metadata)
}

/// The variables of `vars` by name, as CPU tensors of their own dtype.
pub fn tensors(vars: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| ModelError::Config("the variable map's lock is poisoned".into()))?;
    data.iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_device(&Device::Cpu)?)))
        .collect()
}

/// The variables of `vars` by name as constants on their device (detached: sharing the
/// storage, recording no autograd graph where they are used).
pub fn constants(vars: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| ModelError::Config("the variable map's lock is poisoned".into()))?;
    Ok(data
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect())
}

/// Writes named tensors to `path` (sorted by name, with string `metadata`): a temporary file
/// beside it, then a rename, so an existing file is replaced whole or not at all.
pub fn save_tensors(
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    path: &Path,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = safetensors::serialize(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata.clone()),
    )
    .map_err(|e| ModelError::Weights {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|source| ModelError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The metadata of a safetensors file.
pub fn metadata(path: impl AsRef<Path>) -> Result<HashMap<String, String>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| ModelError::Weights {
            path: path.to_path_buf(),
            message: format!("not a safetensors file: {e}"),
        })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Loads `path` into `vars` (converted to each variable's dtype and device), refusing a file
/// whose tensor names or shapes differ from the network's, with the names that differ.
/// PyTorch's `num_batches_tracked` counters are ignored.
pub fn load_strict(vars: &VarMap, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let weights_error = |message: String| ModelError::Weights {
        path: path.to_path_buf(),
        message,
    };
    if !path.exists() {
        return Err(ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| weights_error(format!("not a readable safetensors file: {e}")))?;
    assign_strict(vars, &tensors, path)
}

/// [`load_strict`] from the bytes of a safetensors file (`path` names them in errors).
pub fn load_strict_from_bytes(vars: &VarMap, bytes: &[u8], path: &Path) -> Result<()> {
    let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| {
        ModelError::Weights {
            path: path.to_path_buf(),
            message: format!("not a readable safetensors file: {e}"),
        }
    })?;
    assign_strict(vars, &tensors, path)
}

/// Sets every variable of `vars` from `tensors` (read from `path`, named in errors), refusing
/// missing, extra or differently shaped tensors and non-finite values, as [`load_strict`].
pub fn assign_strict(vars: &VarMap, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let weights_error = |message: String| ModelError::Weights {
        path: path.to_path_buf(),
        message,
    };
    let data = vars
        .data()
        .lock()
        .map_err(|_| ModelError::Config("the variable map's lock is poisoned".into()))?;
    let expected: BTreeSet<&String> = data.keys().collect();
    // PyTorch's batch-norm step counters carry no weights: ignored.
    let found: BTreeSet<&String> = tensors
        .keys()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .collect();
    let missing: Vec<&&String> = expected.difference(&found).collect();
    let extra: Vec<&&String> = found.difference(&expected).collect();
    let mut shapes = Vec::new();
    for (name, var) in data.iter() {
        if let Some(t) = tensors.get(name)
            && t.dims() != var.dims()
        {
            shapes.push(format!(
                "{name}: file {:?}, network {:?}",
                t.dims(),
                var.dims()
            ));
        }
    }
    shapes.sort();
    if !missing.is_empty() || !extra.is_empty() || !shapes.is_empty() {
        let list = |v: Vec<String>| {
            let n = v.len();
            let mut s = v.into_iter().take(8).collect::<Vec<_>>().join(", ");
            if n > 8 {
                s.push_str(&format!(" and {} more", n - 8));
            }
            s
        };
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!(
                "missing {}",
                list(missing.iter().map(|s| s.to_string()).collect())
            ));
        }
        if !extra.is_empty() {
            parts.push(format!(
                "not in the network {}",
                list(extra.iter().map(|s| s.to_string()).collect())
            ));
        }
        if !shapes.is_empty() {
            parts.push(format!("wrong shapes {}", list(shapes)));
        }
        return Err(weights_error(format!(
            "the weights do not match the network: {}",
            parts.join("; ")
        )));
    }
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let finite = tensors[name]
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?
            .iter()
            .all(|v| v.is_finite());
        if !finite {
            return Err(weights_error(format!(
                "tensor {name} holds NaN or infinite values (a diverged or damaged model)"
            )));
        }
    }
    for (name, var) in data.iter() {
        let t = &tensors[name];
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}
