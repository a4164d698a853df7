//! The einfuse runtime: tensors, their storage types, `.npy` files, and seeded random data.
//!
//! A `Tensor` is dense and row-major (the last dimension is contiguous). Its values are held as
//! f32 already rounded to the storage type, so an f16 or bf16 tensor holds exactly the values
//! a kernel would load.

pub mod npy;
pub mod tensor;

pub use tensor::{DType, Tensor, TensorError};
