//! `.npy` arrays for logits and labels, read only after the header's promise is checked: the
//! data must be exactly `shape × item size` bytes, so a header that claims a huge shape is an
//! error, not an allocation.

use std::io::Read;
use std::path::Path;

use ndarray::ArrayD;
use ndarray_npy::ReadNpyExt;

use crate::error::{DataError, Result};

/// The dtype code (`<f4`, `|u1` …) and shape of a `.npy` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// numpy's `descr`.
    pub descr: String,
    /// The array's shape.
    pub shape: Vec<usize>,
}

fn npy_error(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Npy {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The value of `'name':` in a numpy header dictionary.
fn field<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{name}'"))? + name.len() + 2;
    Some(
        header
            .get(at..)?
            .trim_start()
            .strip_prefix(':')?
            .trim_start(),
    )
}

/// Reads and checks the header of `path` (format versions 1–3, C order, a number dtype, and
/// exactly the data bytes the shape needs).
pub fn npy_header(path: &Path) -> Result<NpyHeader> {
    let mut file = std::fs::File::open(path).map_err(io_error(path))?;
    let length = file.metadata().map_err(io_error(path))?.len();
    let mut start = [0u8; 12];
    let not_npy = || npy_error(path, "not a .npy file");
    file.read_exact(&mut start[..10]).map_err(|_| not_npy())?;
    if &start[..6] != b"\x93NUMPY" {
        return Err(not_npy());
    }
    let (header_len, prefix) = match start[6] {
        1 => (u64::from(u16::from_le_bytes([start[8], start[9]])), 10u64),
        2 | 3 => {
            file.read_exact(&mut start[10..12]).map_err(|_| not_npy())?;
            let len = u32::from_le_bytes([start[8], start[9], start[10], start[11]]);
            (u64::from(len), 12)
        }
        v => {
            return Err(npy_error(
                path,
                format!(".npy format version {v} is not supported"),
            ));
        }
    };
    if prefix + header_len > length {
        return Err(npy_error(
            path,
            "the .npy header runs past the end of the file",
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|_| not_npy())?;
    let header = String::from_utf8_lossy(&header);
    let descr = field(&header, "descr")
        .and_then(|v| v.strip_prefix('\''))
        .and_then(|v| v.split('\'').next())
        .ok_or_else(|| npy_error(path, "the .npy header has no dtype"))?
        .to_string();
    if field(&header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err(npy_error(
            path,
            "Fortran-order .npy arrays are not supported",
        ));
    }
    let shape_text = field(&header, "shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or_else(|| npy_error(path, "the .npy header has no shape"))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| npy_error(path, format!("shape ({shape_text}) is not a list of sizes")))?;
    let item: u64 = descr
        .get(2..)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| npy_error(path, format!("dtype {descr} is not a number type")))?;
    let bytes = shape
        .iter()
        .try_fold(item, |acc, &d| acc.checked_mul(d as u64));
    let data = length - prefix - header_len;
    if bytes != Some(data) {
        return Err(npy_error(
            path,
            format!(
                "the header's shape {shape:?} of {descr} needs {} bytes of data, the file has {data}",
                bytes.map_or("more than 2^64".to_string(), |b| b.to_string())
            ),
        ));
    }
    Ok(NpyHeader { descr, shape })
}

fn read<T: ndarray_npy::ReadableElement>(path: &Path) -> Result<ArrayD<T>> {
    let file = std::fs::File::open(path).map_err(io_error(path))?;
    ArrayD::<T>::read_npy(file).map_err(|e| npy_error(path, e.to_string()))
}

/// Logits: a checked `.npy` of f32 or f64 (little-endian), every value finite.
pub fn read_npy_logits(path: &Path) -> Result<ArrayD<f64>> {
    let header = npy_header(path)?;
    let logits = match header.descr.as_str() {
        "<f8" => read::<f64>(path)?,
        "<f4" => read::<f32>(path)?.mapv(f64::from),
        other => {
            return Err(npy_error(
                path,
                format!("logits must be f32 or f64 (little-endian), the file holds {other}"),
            ));
        }
    };
    if logits.iter().any(|v| !v.is_finite()) {
        return Err(npy_error(path, "the logits hold NaN or infinite values"));
    }
    Ok(logits)
}

/// Labels: a checked `.npy` of an integer type, every value a non-negative class index that
/// fits i64.
pub fn read_npy_labels(path: &Path) -> Result<ArrayD<i64>> {
    let header = npy_header(path)?;
    let labels = match header.descr.as_str() {
        "<i8" => read::<i64>(path)?,
        "<i4" => read::<i32>(path)?.mapv(i64::from),
        "<i2" => read::<i16>(path)?.mapv(i64::from),
        "|i1" => read::<i8>(path)?.mapv(i64::from),
        "<u8" => {
            let wide = read::<u64>(path)?;
            if let Some(v) = wide.iter().find(|&&v| v > i64::MAX as u64) {
                return Err(npy_error(path, format!("label {v} is not a class index")));
            }
            wide.mapv(|v| v as i64)
        }
        "<u4" => read::<u32>(path)?.mapv(i64::from),
        "<u2" => read::<u16>(path)?.mapv(i64::from),
        "|u1" => read::<u8>(path)?.mapv(i64::from),
        other => {
            return Err(npy_error(
                path,
                format!("labels must be integers (little-endian), the file holds {other}"),
            ));
        }
    };
    if let Some(v) = labels.iter().find(|&&v| v < 0) {
        return Err(npy_error(path, format!("label {v} is negative")));
    }
    Ok(labels)
}
