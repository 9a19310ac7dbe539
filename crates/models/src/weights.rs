//! Weights as safetensors: save with metadata (temporary file, then rename), load strictly
//! (every tensor present, none extra, every shape equal).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::error::{ModelError, Result};

/// Whether the variable `name` is a buffer, not a parameter: batch norm's running statistics
/// (updated by the forward pass) and SwinUNETR's relative position index (a constant MONAI
/// keeps in its state dict). Buffers are not counted as parameters, not optimised, and in
/// data-parallel training taken from rank 0.
pub fn is_buffer(name: &str) -> bool {
    ["running_mean", "running_var", "relative_position_index"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

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
        let cast = var.as_tensor().to_dtype(dtype)?.to_device(&Device::Cpu)?;
        check_finite(name, var.as_tensor(), &cast, path)?;
        tensors.push((name.clone(), cast));
    }
    drop(data);
    save_tensors(tensors, path, metadata)
}

/// Refuses a tensor that is not finite after the cast to the file's dtype (f16 holds
/// |x| ≤ 65504: a larger weight would be written as ±∞), naming the tensor and the value.
fn check_finite(name: &str, source: &Tensor, cast: &Tensor, path: &Path) -> Result<()> {
    let back: Vec<f32> = cast.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let Some(i) = back.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let value: f32 = source
        .to_dtype(DType::F32)?
        .flatten_all()?
        .get(i)?
        .to_scalar()?;
    Err(ModelError::Weights {
        path: path.to_path_buf(),
        message: format!(
            "tensor {name} holds {value}, which is not finite as {} (f16 holds |x| ≤ 65504); \
             write f32 or bf16",
            format!("{:?}", cast.dtype()).to_lowercase()
        ),
    })
}

/// The bytes of a safetensors file with the keys of its JSON header sorted, so that equal
/// tensors and metadata give equal files (the safetensors crate writes the metadata map in
/// hash order). The header keeps its padding to a multiple of 8 bytes; the data is unchanged.
fn sorted_header(bytes: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    let size: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("no header")?;
    let n = usize::try_from(u64::from_le_bytes(size)).map_err(|e| e.to_string())?;
    let header = bytes.get(8..8 + n).ok_or("a header longer than the file")?;
    let fields: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header.trim_ascii_end()).map_err(|e| e.to_string())?;
    let mut text = serde_json::to_string(&fields).map_err(|e| e.to_string())?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
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
    .map_err(|e| e.to_string())
    .and_then(sorted_header)
    .map_err(|message| ModelError::Weights {
        path: path.to_path_buf(),
        message,
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    // errors name the requested file; the temporary one never outlives a failure
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            ModelError::Io {
                path: path.to_path_buf(),
                source,
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Init;

    /// Two tensors: `a.weight` of `value`s, `b.bias` of halves.
    fn vars(value: f32) -> VarMap {
        let vars = VarMap::new();
        for (name, v) in [("a.weight", value), ("b.bias", 0.5)] {
            vars.get(3, name, Init::Const(f64::from(v)), DType::F32, &Device::Cpu)
                .expect("var");
        }
        vars
    }

    #[test]
    fn equal_weights_give_equal_bytes() {
        let dir = tempfile::tempdir().expect("dir");
        let metadata = |_| -> HashMap<String, String> {
            (0..8)
                .map(|i| (format!("key{i}"), format!("v{i}")))
                .collect()
        };
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        save(&vars(0.5), &a, DType::F32, &metadata(0)).expect("a");
        save(&vars(0.5), &b, DType::F32, &metadata(1)).expect("b");
        let (a, b) = (std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
        assert_eq!(a, b);
        // still a safetensors file that reads back
        let read = safetensors::SafeTensors::deserialize(&a).expect("valid");
        assert_eq!(read.len(), 2);
    }

    #[test]
    fn a_weight_beyond_f16_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("w.safetensors");
        let err = save(&vars(70000.0), &path, DType::F16, &HashMap::new()).expect_err("inf");
        assert!(
            err.to_string().contains("a.weight") && err.to_string().contains("70000"),
            "{err}"
        );
        assert!(!path.exists());
        save(&vars(70000.0), &path, DType::BF16, &HashMap::new()).expect("bf16 holds it");
    }
}
