//! Reading and writing tensors as NumPy `.npy` files (through the npyz crate).
//!
//! Reading accepts little- or big-endian f2, f4 and f8 arrays in C or Fortran order (Fortran
//! order is transposed into row-major). f16 tensors are written as `<f2`; f32 and bf16 tensors
//! as `<f4` (NumPy has no bf16; the values are the bf16 ones).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::Path;

use half::f16;
use npyz::{Order, TypeChar, WriterBuilder};

use crate::tensor::{element_count, DType, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not a .npy file ({why})")]
    Format { path: String, why: String },
    #[error("{path}: unsupported element type `{dtype}` (einfuse reads f2, f4 and f8 arrays)")]
    DType { path: String, dtype: String },
    #[error("{path}: the file holds {found} elements, but its header promises {expected}")]
    Truncated { path: String, expected: u64, found: u64 },
}

/// Reads a `.npy` file into a tensor stored as `dtype`.
pub fn read_npy(path: &Path, dtype: DType) -> Result<Tensor, NpyError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|source| NpyError::Io { path: name.clone(), source })?;
    let mut bytes = Vec::new();
    BufReader::new(file).read_to_end(&mut bytes).map_err(|source| NpyError::Io { path: name.clone(), source })?;
    read_npy_bytes(&bytes, &name, dtype)
}

/// Reads `.npy` bytes; `name` is used in error messages.
pub fn read_npy_bytes(bytes: &[u8], name: &str, dtype: DType) -> Result<Tensor, NpyError> {
    let format = |why: String| NpyError::Format { path: name.to_string(), why };
    let npy = npyz::NpyFile::new(bytes).map_err(|e| format(e.to_string()))?;
    let shape: Vec<u64> = npy.shape().to_vec();
    let expected = npy.len();
    let order = npy.order();
    let type_str = match npy.dtype() {
        npyz::DType::Plain(ts) => ts,
        other => return Err(NpyError::DType { path: name.to_string(), dtype: other.descr() }),
    };
    let truncated = |found: usize| NpyError::Truncated { path: name.to_string(), expected, found: found as u64 };
    let values: Vec<f32> = match (type_str.type_char(), type_str.size_field()) {
        (TypeChar::Float, 4) => collect(npy.data::<f32>(), name, &type_str, truncated)?,
        (TypeChar::Float, 8) => {
            collect(npy.data::<f64>(), name, &type_str, truncated)?.into_iter().map(|x| x as f32).collect()
        }
        (TypeChar::Float, 2) => {
            collect(npy.data::<f16>(), name, &type_str, truncated)?.into_iter().map(f16::to_f32).collect()
        }
        _ => return Err(NpyError::DType { path: name.to_string(), dtype: type_str.to_string() }),
    };
    let shape: Vec<usize> = shape.iter().map(|n| *n as usize).collect();
    if element_count(&shape) != Some(values.len()) {
        return Err(format("the shape does not match the data".into()));
    }
    let values = match order {
        Order::C => values,
        Order::Fortran => fortran_to_c(&values, &shape),
    };
    Tensor::new(dtype, shape, values).map_err(|e| format(e.to_string()))
}

fn collect<T: npyz::Deserialize, R: std::io::Read>(
    data: Result<npyz::NpyReader<T, R>, npyz::DTypeError>,
    name: &str,
    type_str: &npyz::TypeStr,
    truncated: impl Fn(usize) -> NpyError,
) -> Result<Vec<T>, NpyError> {
    let reader = data.map_err(|_| NpyError::DType { path: name.to_string(), dtype: type_str.to_string() })?;
    let mut values = Vec::new();
    for item in reader {
        match item {
            Ok(value) => values.push(value),
            Err(_) => return Err(truncated(values.len())),
        }
    }
    Ok(values)
}

/// Reorders column-major data into row-major.
fn fortran_to_c(values: &[f32], shape: &[usize]) -> Vec<f32> {
    let n = values.len();
    let mut out = vec![0.0; n];
    let mut coords = vec![0usize; shape.len()];
    for (c_offset, slot) in out.iter_mut().enumerate() {
        let mut rest = c_offset;
        for (c, size) in coords.iter_mut().zip(shape).rev() {
            *c = rest % size.max(&1);
            rest /= size.max(&1);
        }
        let mut f_offset = 0;
        let mut stride = 1;
        for (c, size) in coords.iter().zip(shape) {
            f_offset += c * stride;
            stride *= size;
        }
        *slot = values[f_offset];
    }
    out
}

/// Writes a tensor as `.npy`.
pub fn write_npy(path: &Path, tensor: &Tensor) -> Result<(), NpyError> {
    let name = path.display().to_string();
    let io = |source: std::io::Error| NpyError::Io { path: name.clone(), source };
    let file = File::create(path).map_err(io)?;
    let shape: Vec<u64> = tensor.shape().iter().map(|n| *n as u64).collect();
    let writer = BufWriter::new(file);
    match tensor.dtype() {
        DType::F16 => {
            let mut npy =
                npyz::WriteOptions::new().default_dtype().shape(&shape).writer(writer).begin_nd().map_err(io)?;
            npy.extend(tensor.data().iter().map(|x| f16::from_f32(*x))).map_err(io)?;
            npy.finish().map_err(io)
        }
        DType::F32 | DType::Bf16 => {
            let mut npy =
                npyz::WriteOptions::new().default_dtype().shape(&shape).writer(writer).begin_nd().map_err(io)?;
            npy.extend(tensor.data().iter().copied()).map_err(io)?;
            npy.finish().map_err(io)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("einfuse-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.npy");
        let t = Tensor::random(DType::F32, vec![2, 3, 4], 1).unwrap();
        write_npy(&path, &t).unwrap();
        assert_eq!(read_npy(&path, DType::F32).unwrap(), t);
        let h = t.cast(DType::F16);
        write_npy(&path, &h).unwrap();
        assert_eq!(read_npy(&path, DType::F16).unwrap(), h);
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        assert!(matches!(read_npy_bytes(b"hello", "x", DType::F32), Err(NpyError::Format { .. })));
        let dir = std::env::temp_dir().join(format!("einfuse-npy-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.npy");
        write_npy(&path, &Tensor::zeros(DType::F32, vec![10]).unwrap()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let cut = &bytes[..bytes.len() - 6];
        assert!(read_npy_bytes(cut, "x", DType::F32).is_err());
    }

    #[test]
    fn fortran_order_is_transposed() {
        // A 2x3 matrix [[0,1,2],[3,4,5]] in column-major order.
        assert_eq!(fortran_to_c(&[0.0, 3.0, 1.0, 4.0, 2.0, 5.0], &[2, 3]), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }
}
