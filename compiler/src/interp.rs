//! The reference interpreter: the definition of what a cascade means.
//!
//! Needs: a verified cascade, extents for every rank, and the inputs as dense row-major f64
//! arrays. Guarantees: every output as a dense array, computed point by point in f64 exactly as
//! the language defines it (domains, filters, ragged split ranks, empty reductions giving the
//! reducer's identity, iterative tensors evaluated iterate by iterate), with undefined points
//! written as 0. It is deliberately simple and slow: it is the oracle for every other stage.
//!
//! Each tensor is a memo table filled on demand. The driver visits every point of every defined
//! tensor in row-major order, so a recurrence finds its previous iterate already computed and
//! the recursion stays shallow.

use crate::ir::*;
use crate::shapes::tensor_shape;

/// Limits that keep the interpreter from running away.
#[derive(Clone, Copy, Debug)]
pub struct InterpLimits {
    /// The most tensor elements held at once, over all tensors.
    pub max_elements: u64,
    /// The most points (of Einsums and of reductions) evaluated in one run.
    pub max_steps: u64,
}

impl Default for InterpLimits {
    fn default() -> Self {
        InterpLimits { max_elements: 1 << 27, max_steps: 1 << 32 }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InterpError {
    #[error("the interpreter would hold {elements} elements, more than its limit of {limit}")]
    TooLarge { elements: u64, limit: u64 },
    #[error("input `{tensor}` has {found} elements, but its shape needs {expected}")]
    InputSize { tensor: String, expected: u64, found: u64 },
    #[error("expected {expected} inputs, got {found}")]
    InputCount { expected: usize, found: usize },
    #[error("internal error: `{tensor}` depends on itself at the same point")]
    Cycle { tensor: String },
    #[error("the interpreter would evaluate more than {limit} points; use smaller extents")]
    TooManySteps { limit: u64 },
}

/// Evaluates `cascade`. `inputs` are in the order of `Cascade::inputs`; the result holds the
/// outputs in declaration order, each dense and row-major in its tensor's shape.
pub fn interpret(
    cascade: &Cascade,
    extents: &[u64],
    inputs: &[&[f64]],
    limits: InterpLimits,
) -> Result<Vec<Vec<f64>>, InterpError> {
    interpret_at(cascade, extents, &[], inputs, limits)
}

/// `interpret` where each rank's points start at the global position `origins[r]` (0 where
/// `origins` is short): index values (`Index` in expressions and filters) see global positions,
/// subscripts the arrays given. This is how a shard of a longer sequence runs.
pub fn interpret_at(
    cascade: &Cascade,
    extents: &[u64],
    origins: &[i64],
    inputs: &[&[f64]],
    limits: InterpLimits,
) -> Result<Vec<Vec<f64>>, InterpError> {
    let origins: Vec<i64> = (0..cascade.ranks.len()).map(|r| origins.get(r).copied().unwrap_or(0)).collect();
    // A deep recurrence recurses once per iterate in the worst case; give it room.
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("einfuse-interp".into())
            .stack_size(512 << 20)
            .spawn_scoped(scope, || interpret_here(cascade, extents, &origins, inputs, limits))
            .expect("spawn the interpreter thread")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

const NOT_COMPUTED: u8 = 0;
const IN_PROGRESS: u8 = 1;
const UNDEFINED: u8 = 2;
const DEFINED: u8 = 3;

struct Store {
    shape: Vec<u64>,
    strides: Vec<u64>,
    state: Vec<u8>,
    values: Vec<f64>,
}

impl Store {
    fn new(shape: Vec<u64>) -> Store {
        let mut strides = vec![1u64; shape.len()];
        for p in (0..shape.len().saturating_sub(1)).rev() {
            strides[p] = strides[p + 1] * shape[p + 1];
        }
        let len = shape.iter().product::<u64>() as usize;
        Store { shape, strides, state: vec![NOT_COMPUTED; len], values: vec![0.0; len] }
    }

    fn offset(&self, coords: &[i64]) -> Option<usize> {
        let mut offset = 0u64;
        for ((c, n), s) in coords.iter().zip(&self.shape).zip(&self.strides) {
            if *c < 0 || *c as u64 >= *n {
                return None;
            }
            offset += *c as u64 * s;
        }
        Some(offset as usize)
    }
}

struct Interp<'a> {
    cascade: &'a Cascade,
    extents: &'a [u64],
    /// Each rank's first global position (see `interpret_at`).
    origins: &'a [i64],
    stores: Vec<Store>,
    /// For each tensor: its plain or initial Einsum, and its recurrence.
    definitions: Vec<(Option<usize>, Option<usize>)>,
    /// For each rank: the split pairs it belongs to, as (tile rank, within-tile rank, whole rank).
    splits: Vec<Vec<(RankId, RankId, RankId)>>,
    /// Points evaluated so far, and the limit.
    steps: u64,
    max_steps: u64,
}

fn interpret_here(
    cascade: &Cascade,
    extents: &[u64],
    origins: &[i64],
    inputs: &[&[f64]],
    limits: InterpLimits,
) -> Result<Vec<Vec<f64>>, InterpError> {
    let input_ids = cascade.inputs();
    if input_ids.len() != inputs.len() {
        return Err(InterpError::InputCount { expected: input_ids.len(), found: inputs.len() });
    }
    let mut total: u64 = 0;
    let mut shapes = Vec::new();
    for t in 0..cascade.tensors.len() {
        let shape = tensor_shape(cascade, TensorId::new(t), extents);
        let elements = shape.iter().try_fold(1u64, |acc, n| acc.checked_mul(*n)).unwrap_or(u64::MAX);
        total = total.saturating_add(elements);
        shapes.push(shape);
    }
    if total > limits.max_elements {
        return Err(InterpError::TooLarge { elements: total, limit: limits.max_elements });
    }
    let mut stores: Vec<Store> = shapes.into_iter().map(Store::new).collect();
    for (id, data) in input_ids.iter().zip(inputs) {
        let store = &mut stores[id.index()];
        if store.values.len() != data.len() {
            return Err(InterpError::InputSize {
                tensor: cascade.tensor(*id).name.clone(),
                expected: store.values.len() as u64,
                found: data.len() as u64,
            });
        }
        store.values.copy_from_slice(data);
        store.state.fill(DEFINED);
    }
    let mut definitions = vec![(None, None); cascade.tensors.len()];
    for (e, einsum) in cascade.einsums.iter().enumerate() {
        let slot = &mut definitions[einsum.target.index()];
        if einsum.recurrence_index().is_some() {
            slot.1 = Some(e);
        } else {
            slot.0 = Some(e);
        }
    }
    let mut splits = vec![Vec::new(); cascade.ranks.len()];
    for pair in cascade.split_pairs() {
        splits[pair.0.index()].push(pair);
        splits[pair.1.index()].push(pair);
    }
    let mut interp =
        Interp { cascade, extents, origins, stores, definitions, splits, steps: 0, max_steps: limits.max_steps };
    let mut defined: Vec<TensorId> = Vec::new();
    for einsum in &cascade.einsums {
        if !defined.contains(&einsum.target) {
            defined.push(einsum.target);
        }
    }
    for tensor in defined {
        let shape = interp.stores[tensor.index()].shape.clone();
        let mut coords = vec![0i64; shape.len()];
        if shape.contains(&0) {
            continue;
        }
        loop {
            interp.point(tensor, &coords)?;
            // Row-major increment.
            let mut p = shape.len();
            loop {
                if p == 0 {
                    break;
                }
                p -= 1;
                coords[p] += 1;
                if (coords[p] as u64) < shape[p] {
                    break;
                }
                coords[p] = 0;
                if p == 0 {
                    p = usize::MAX;
                    break;
                }
            }
            if p == usize::MAX || shape.is_empty() {
                break;
            }
        }
    }
    let outputs = cascade
        .outputs
        .iter()
        .map(|output| {
            let store = &interp.stores[output.tensor.index()];
            store.values.iter().zip(&store.state).map(|(v, s)| if *s == DEFINED { *v } else { 0.0 }).collect()
        })
        .collect();
    Ok(outputs)
}

type Env = Vec<(Index, i64)>;

fn lookup(env: &Env, index: Index) -> i64 {
    env.iter().rev().find(|(i, _)| *i == index).map(|(_, v)| *v).expect("verified: every index is bound")
}

impl Interp<'_> {
    /// The value of `tensor` at `coords`: `None` where it is not defined.
    fn point(&mut self, tensor: TensorId, coords: &[i64]) -> Result<Option<f64>, InterpError> {
        let store = &self.stores[tensor.index()];
        let Some(offset) = store.offset(coords) else {
            return Ok(None);
        };
        match store.state[offset] {
            DEFINED => return Ok(Some(store.values[offset])),
            UNDEFINED => return Ok(None),
            IN_PROGRESS => return Err(InterpError::Cycle { tensor: self.cascade.tensor(tensor).name.clone() }),
            _ => {}
        }
        self.stores[tensor.index()].state[offset] = IN_PROGRESS;
        let value = self.compute(tensor, coords)?;
        let store = &mut self.stores[tensor.index()];
        match value {
            Some(v) => {
                store.state[offset] = DEFINED;
                store.values[offset] = v;
            }
            None => store.state[offset] = UNDEFINED,
        }
        Ok(value)
    }

    fn step(&mut self) -> Result<(), InterpError> {
        self.steps += 1;
        if self.steps > self.max_steps {
            return Err(InterpError::TooManySteps { limit: self.max_steps });
        }
        Ok(())
    }

    fn compute(&mut self, tensor: TensorId, coords: &[i64]) -> Result<Option<f64>, InterpError> {
        self.step()?;
        let (first, recurrence) = self.definitions[tensor.index()];
        let einsum_id = match self.cascade.tensor(tensor).kind {
            TensorKind::Defined { iterative: Some(k) } if coords[k] > 0 => recurrence,
            _ => first,
        };
        let einsum = &self.cascade.einsums[einsum_id.expect("verified: every defined tensor has an Einsum")];
        let mut env: Env = Vec::new();
        for (lhs, c) in einsum.lhs.iter().zip(coords) {
            match lhs {
                Lhs::Index(index) => env.push((*index, *c)),
                Lhs::Next(index) => {
                    env.push((*index, c - 1));
                }
                Lhs::Initial => {}
            }
        }
        // The iterate `r + 1` exists for r < extent only; the store is one larger than the rank.
        for (index, value) in &env {
            if *value < 0 || *value as u64 >= self.extents[index.rank.index()] {
                return Ok(None);
            }
        }
        if !self.valid_pairs(&env) {
            return Ok(None);
        }
        for cond in &einsum.filter {
            if !self.cond(cond, &mut env)? {
                return Ok(None);
            }
        }
        self.expr(&einsum.body, &mut env)
    }

    /// Whether every split pair bound in `env` addresses a point inside its whole rank.
    fn valid_pairs(&self, env: &Env) -> bool {
        for (index, value) in env {
            for (tile, inner, whole) in &self.splits[index.rank.index()] {
                if index.rank != *tile {
                    continue;
                }
                let partner = Index { rank: *inner, primes: index.primes };
                if let Some((_, inner_value)) = env.iter().rev().find(|(i, _)| *i == partner) {
                    let tile_size = self.extents[inner.index()] as i64;
                    if value * tile_size + inner_value >= self.extents[whole.index()] as i64 {
                        return false;
                    }
                }
            }
        }
        true
    }

    fn cond(&mut self, cond: &Cond, env: &mut Env) -> Result<bool, InterpError> {
        let (Some(a), Some(b)) = (self.expr(&cond.lhs, env)?, self.expr(&cond.rhs, env)?) else {
            return Ok(false);
        };
        Ok(cond.op.holds(a, b))
    }

    fn affine(&self, affine: &Affine, env: &Env) -> i64 {
        match affine {
            Affine::Const(c) => *c,
            Affine::Index(index) => lookup(env, *index),
            Affine::Extent(rank) => self.extents[rank.index()] as i64,
            Affine::Add(a, b) => self.affine(a, env).saturating_add(self.affine(b, env)),
            Affine::Sub(a, b) => self.affine(a, env).saturating_sub(self.affine(b, env)),
            Affine::Mul(a, b) => self.affine(a, env).saturating_mul(self.affine(b, env)),
            Affine::Neg(a) => self.affine(a, env).saturating_neg(),
        }
    }

    fn expr(&mut self, expr: &Expr, env: &mut Env) -> Result<Option<f64>, InterpError> {
        Ok(match expr {
            Expr::Const(value) => Some(*value),
            Expr::Param(id) => Some(self.cascade.param(*id).value),
            Expr::Extent(rank) => Some(self.extents[rank.index()] as f64),
            Expr::Index(index) => Some((lookup(env, *index) + self.origins[index.rank.index()]) as f64),
            Expr::Access { tensor, subscripts } => {
                let coords: Vec<i64> = subscripts.iter().map(|s| self.affine(s, env)).collect();
                self.point(*tensor, &coords)?
            }
            Expr::Unary(op, arg) => self.expr(arg, env)?.map(|x| op.apply(x)),
            Expr::Binary(op, a, b) => {
                let a = self.expr(a, env)?;
                match a {
                    None => None,
                    Some(a) => self.expr(b, env)?.map(|b| op.apply(a, b)),
                }
            }
            Expr::Reduce { op, indices, filter, body } => {
                let mut acc = reduce_identity(*op);
                let base = env.len();
                let ranges: Vec<i64> = indices.iter().map(|i| self.extents[i.rank.index()] as i64).collect();
                if ranges.iter().all(|n| *n > 0) {
                    env.extend(indices.iter().map(|i| (*i, 0)));
                    'points: loop {
                        self.step()?;
                        if self.valid_pairs(env) {
                            let mut keep = true;
                            for cond in filter {
                                if !self.cond(cond, env)? {
                                    keep = false;
                                    break;
                                }
                            }
                            if keep {
                                if let Some(x) = self.expr(body, env)? {
                                    acc = reduce_step(*op, acc, x);
                                }
                            }
                        }
                        // Next point of the reduced set, last index fastest.
                        let mut k = indices.len();
                        loop {
                            if k == 0 {
                                break 'points;
                            }
                            k -= 1;
                            env[base + k].1 += 1;
                            if env[base + k].1 < ranges[k] {
                                break;
                            }
                            env[base + k].1 = 0;
                        }
                    }
                    env.truncate(base);
                }
                Some(acc)
            }
        })
    }
}
