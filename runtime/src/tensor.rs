//! Dense tensors with a storage type.

use half::{bf16, f16};

/// The storage type of a tensor's elements. Arithmetic is f32 whatever the storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    /// Rounds an f32 to the nearest value this type can hold.
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::Bf16 => bf16::from_f32(x).to_f32(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TensorError {
    #[error("shape {shape:?} holds {expected} elements, but {found} were given")]
    Size { shape: Vec<usize>, expected: usize, found: usize },
    #[error("shape {shape:?} is too large")]
    TooLarge { shape: Vec<usize> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// The number of elements of a shape, or `None` if it overflows.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, n| acc.checked_mul(*n))
}

impl Tensor {
    /// A tensor from row-major data, rounded to `dtype`.
    pub fn new(dtype: DType, shape: Vec<usize>, mut data: Vec<f32>) -> Result<Tensor, TensorError> {
        let expected = element_count(&shape).ok_or_else(|| TensorError::TooLarge { shape: shape.clone() })?;
        if data.len() != expected {
            return Err(TensorError::Size { shape, expected, found: data.len() });
        }
        if dtype != DType::F32 {
            data.iter_mut().for_each(|x| *x = dtype.round(*x));
        }
        Ok(Tensor { dtype, shape, data })
    }

    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Result<Tensor, TensorError> {
        let n = element_count(&shape).ok_or_else(|| TensorError::TooLarge { shape: shape.clone() })?;
        Tensor::new(dtype, shape, vec![0.0; n])
    }

    /// Uniform values in [-1, 1) from a seeded generator (SplitMix64): the same seed gives the
    /// same tensor on every machine.
    pub fn random(dtype: DType, shape: Vec<usize>, seed: u64) -> Result<Tensor, TensorError> {
        let n = element_count(&shape).ok_or_else(|| TensorError::TooLarge { shape: shape.clone() })?;
        let mut rng = SplitMix64(seed);
        let data = (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
        Tensor::new(dtype, shape, data)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The elements, row-major, without a copy.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn to_f64(&self) -> Vec<f64> {
        self.data.iter().map(|x| *x as f64).collect()
    }

    /// The same values stored in another type (rounded when narrower).
    pub fn cast(&self, dtype: DType) -> Tensor {
        Tensor::new(dtype, self.shape.clone(), self.data.clone()).expect("same shape")
    }

    /// The row-major coordinates of the element at `offset`.
    pub fn coordinates(&self, mut offset: usize) -> Vec<usize> {
        let mut coords = vec![0; self.shape.len()];
        for (c, n) in coords.iter_mut().zip(&self.shape).rev() {
            if *n > 0 {
                *c = offset % n;
                offset /= n;
            }
        }
        coords
    }
}

/// A small, well-known generator; good enough for test data and fully reproducible.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_is_reproducible_and_in_range() {
        let a = Tensor::random(DType::F32, vec![3, 5], 7).unwrap();
        let b = Tensor::random(DType::F32, vec![3, 5], 7).unwrap();
        assert_eq!(a, b);
        assert!(a.data().iter().all(|x| (-1.0..1.0).contains(x)));
    }

    #[test]
    fn narrow_types_round() {
        let t = Tensor::new(DType::Bf16, vec![1], vec![1.0 + 1.0 / 1024.0]).unwrap();
        assert_eq!(t.data()[0], 1.0);
        assert_eq!(t.coordinates(0), vec![0]);
    }

    #[test]
    fn size_mismatch_is_an_error() {
        assert!(matches!(Tensor::new(DType::F32, vec![2, 2], vec![0.0; 3]), Err(TensorError::Size { .. })));
    }
}
