//! Binding rank extents at a call: from explicit bindings and the shapes of the inputs.
//!
//! Needs: a verified cascade. Guarantees: every rank has an extent; every input's shape agrees
//! with it; every mismatch is a `ShapeError` that names the tensor, the rank and both sizes.

use crate::ir::*;

/// A user error in the shapes or bindings given at a call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShapeError {
    #[error("input `{tensor}` has {found} dimension(s), but the kernel declares {expected} ({ranks})")]
    Dimensions { tensor: String, expected: usize, found: usize, ranks: String },
    #[error("input `{tensor}`: rank `{rank}` (dimension {position}) has size {expected} in the kernel, but the given tensor has {found}")]
    Mismatch { tensor: String, rank: String, position: usize, expected: u64, found: u64 },
    #[error("rank `{rank}` is bound to {given}, but {why}")]
    Binding { rank: String, given: u64, why: String },
    #[error("rank `{rank}` has no extent: bind it with `--bind {rank}=N` or give an input that has it")]
    Unbound { rank: String },
    #[error("unknown rank `{rank}` in a binding")]
    UnknownRank { rank: String },
    #[error("the kernel has no input `{tensor}`")]
    UnknownInput { tensor: String },
    #[error("input `{tensor}` is missing")]
    MissingInput { tensor: String },
}

/// The extent of every rank, in rank order.
pub type Extents = Vec<u64>;

/// Binds every rank. `bindings` come first (`--bind M=128`), then each input's shape binds the
/// symbolic ranks it has and is checked against the rest. Split tile ranks follow from their
/// whole rank: ceil(whole / tile).
pub fn bind_extents(
    cascade: &Cascade,
    bindings: &[(String, u64)],
    input_shapes: &[(TensorId, Vec<u64>)],
) -> Result<Extents, ShapeError> {
    let mut extents: Vec<Option<u64>> = cascade
        .ranks
        .iter()
        .map(|r| match r.extent {
            Extent::Fixed(n) => Some(n),
            _ => None,
        })
        .collect();
    for (name, value) in bindings {
        let Some(id) = cascade.rank_by_name(name) else {
            return Err(ShapeError::UnknownRank { rank: name.clone() });
        };
        match cascade.rank(id).extent {
            Extent::Fixed(n) if n != *value => {
                return Err(ShapeError::Binding {
                    rank: name.clone(),
                    given: *value,
                    why: format!("it is fixed at {n}"),
                })
            }
            Extent::Split { .. } => {
                return Err(ShapeError::Binding {
                    rank: name.clone(),
                    given: *value,
                    why: "a tile rank follows from its whole rank; bind that instead".into(),
                })
            }
            _ => extents[id.index()] = Some(*value),
        }
    }
    for (tensor_id, shape) in input_shapes {
        let tensor = cascade.tensor(*tensor_id);
        if shape.len() != tensor.ranks.len() {
            let ranks: Vec<&str> = tensor.ranks.iter().map(|r| cascade.rank(*r).name.as_str()).collect();
            return Err(ShapeError::Dimensions {
                tensor: tensor.name.clone(),
                expected: tensor.ranks.len(),
                found: shape.len(),
                ranks: format!("[{}]", ranks.join(", ")),
            });
        }
        for (position, (rank, size)) in tensor.ranks.iter().zip(shape).enumerate() {
            // A tile rank's extent is derived; check it after the whole rank is known.
            if matches!(cascade.rank(*rank).extent, Extent::Split { .. }) {
                continue;
            }
            match extents[rank.index()] {
                Some(expected) if expected != *size => {
                    return Err(ShapeError::Mismatch {
                        tensor: tensor.name.clone(),
                        rank: cascade.rank(*rank).name.clone(),
                        position: position + 1,
                        expected,
                        found: *size,
                    })
                }
                Some(_) => {}
                None => extents[rank.index()] = Some(*size),
            }
        }
    }
    // Ranks are declared before their splits use them, so one pass in order suffices.
    for (r, rank) in cascade.ranks.iter().enumerate() {
        if let Extent::Split { whole, tile } = rank.extent {
            let whole_extent =
                extents[whole.index()].ok_or_else(|| ShapeError::Unbound { rank: cascade.rank(whole).name.clone() })?;
            let tile_extent = extents[tile.index()].unwrap_or(1).max(1);
            extents[r] = Some(whole_extent.div_ceil(tile_extent));
        }
    }
    let extents: Extents = extents
        .into_iter()
        .enumerate()
        .map(|(r, e)| e.ok_or_else(|| ShapeError::Unbound { rank: cascade.ranks[r].name.clone() }))
        .collect::<Result<_, _>>()?;
    for (tensor_id, shape) in input_shapes {
        let tensor = cascade.tensor(*tensor_id);
        for (position, (rank, size)) in tensor.ranks.iter().zip(shape).enumerate() {
            if extents[rank.index()] != *size {
                return Err(ShapeError::Mismatch {
                    tensor: tensor.name.clone(),
                    rank: cascade.rank(*rank).name.clone(),
                    position: position + 1,
                    expected: extents[rank.index()],
                    found: *size,
                });
            }
        }
    }
    Ok(extents)
}

/// The shape of a tensor under `extents`: an iterative position holds one more element than its
/// rank (the initial value and one iterate per step).
pub fn tensor_shape(cascade: &Cascade, tensor: TensorId, extents: &[u64]) -> Vec<u64> {
    let t = cascade.tensor(tensor);
    t.ranks
        .iter()
        .enumerate()
        .map(|(p, r)| {
            let extent = extents[r.index()];
            match t.kind {
                TensorKind::Defined { iterative: Some(k) } if k == p => extent + 1,
                _ => extent,
            }
        })
        .collect()
}

impl Cascade {
    /// The input tensors, in declaration order.
    pub fn inputs(&self) -> Vec<TensorId> {
        self.tensors
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t.kind, TensorKind::Input { .. }))
            .map(|(i, _)| TensorId::new(i))
            .collect()
    }
}
