//! Tensor-core schedules: which thread kernels run their two contractions as warp-level matrix
//! multiply-accumulates (`mma.sync` m16n8k16, f32 accumulation), and how their tiles are laid out.
//!
//! Needs: a verified `LoopProgram` as `schedule` makes it for the GPU (one streamed loop over the
//! tiles of the keys). Guarantees: either a `TensorCorePlan`, in which every tensor of the program
//! has a `Class` saying where a warp keeps it, or the reason the kernel keeps the thread kernel
//! (`einfuse compile` prints it).
//!
//! The schedule is FlashAttention-2's: a block of `WARPS` warps takes `BLOCK_ROWS` query rows of
//! one batch point, each warp `WARP_ROWS` of them. Per step of the loop the block copies the key
//! and value tiles into shared memory (`cp.async`, two buffers, so that the next tile arrives
//! while this one is used); each warp computes its scores with the queries' fragments held in
//! registers, evaluates the element-wise Einsums and row reductions on the accumulator fragments,
//! and multiplies the probabilities, rounded to 16 bits in registers, by the value tile. A
//! tensor is then one of four things for a warp:
//! - `Score`: a point per (key of the tile, query row), an accumulator fragment of the scores;
//! - `Row`: a point per query row (two rows per thread, shared by the four threads of a quad);
//! - `Out`: a point per (value column, query row), an accumulator fragment of the output;
//! - `Input`: read from global memory where it is used (the three operands are read through
//!   shared memory by the contractions; any other input, such as a per-head slope, directly).
//!
//! What a plan asks of the kernel, each checked here: the two contractions `sum[e](Q * K * c)`
//! and `sum[m0](X * V)` over 16-bit inputs of one type whose last dimension is the reduced head
//! dimension (queries and keys) or the value column (values); head dimensions of 16 to 256 that
//! are powers of two; a key tile that is a multiple of 16; every other Einsum element-wise over
//! these classes or a reduction over the keys of a tile; and tiles that fit in shared memory.

use crate::ir::*;
use crate::schedule::layout::split_point;
use crate::schedule::{LoopProgram, Node, Slot};

fn is_input(tensor: &Tensor) -> bool {
    matches!(tensor.kind, TensorKind::Input { .. })
}

fn elem_of(tensor: &Tensor) -> ElemType {
    match tensor.kind {
        TensorKind::Input { elem } => elem,
        TensorKind::Defined { .. } => ElemType::F32,
    }
}

/// Warps per block.
pub const WARPS: u64 = 4;
/// Query rows per warp: the M of `mma.m16n8k16`.
pub const WARP_ROWS: u64 = 16;
/// Query rows per block.
pub const BLOCK_ROWS: u64 = WARPS * WARP_ROWS;
/// Threads per block.
pub const THREADS: u64 = WARPS * 32;
/// The shared memory a block may take without opting in to more (bytes).
pub const SHARED_LIMIT: u64 = 48 * 1024;

/// Where a warp keeps a tensor (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Input,
    Score,
    Row,
    Out,
}

/// Where a tile lies in shared memory: its first byte and the bytes of one row (rows of
/// 16-byte chunks, the chunks of row `r` permuted by `chunk ^ (r % swizzle)`, so that the eight
/// rows an `ldmatrix` reads fall in distinct banks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedTile {
    pub offset: u64,
    pub rows: u64,
    pub row_bytes: u64,
    pub swizzle: u64,
}

impl SharedTile {
    fn new(offset: u64, rows: u64, columns: u64) -> SharedTile {
        let chunks = columns / 8;
        SharedTile { offset, rows, row_bytes: columns * 2, swizzle: chunks.min(8) }
    }

    pub fn bytes(&self) -> u64 {
        self.rows * self.row_bytes
    }

    /// The byte offset of the 16-byte chunk `chunk` of row `row`.
    pub fn chunk_offset(&self, row: u64, chunk: u64) -> u64 {
        self.offset + row * self.row_bytes + ((chunk ^ (row % self.swizzle)) * 16)
    }
}

/// A running output that the value product accumulates into.
#[derive(Clone, Debug, PartialEq)]
pub struct Accumulate {
    pub einsum: EinsumId,
    /// The factor of the running output's previous iterate, if any.
    pub scale: Option<Expr>,
}

/// The tensor-core schedule of one kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorCorePlan {
    /// The 16-bit type of the three operands.
    pub elem: ElemType,
    /// The ranks of a block's batch point, outermost first.
    pub batch: Vec<RankId>,
    /// The query index (rows of the fragments).
    pub query: Index,
    /// The streamed loop's index (the tile of the keys) and the key within a tile.
    pub tile: Index,
    pub key: Index,
    /// The keys' whole rank and the tile's extent.
    pub keys: RankId,
    pub key_tile: u64,
    /// The reduced head dimension of the scores, and the value column, with their extents.
    pub head: Index,
    pub head_dim: u64,
    pub column: Index,
    pub columns: u64,
    /// The queries, keys and values.
    pub q: TensorId,
    pub k: TensorId,
    pub v: TensorId,
    /// The Einsum of the scores and the factors its product has besides `Q` and `K` (constant
    /// across the head dimension, applied to the accumulator).
    pub scores: EinsumId,
    pub score_factors: Vec<Expr>,
    /// The Einsum of the value product and its factors besides `V` (evaluated per score).
    pub product: EinsumId,
    pub probability_factors: Vec<Expr>,
    /// Where the value product adds itself to a running output (`R[m1 + 1] = P + R[m1] * c`):
    /// that Einsum, run by the product's multiply-accumulates from `R[m1] * c`, so that the
    /// product's own tile is never held apart.
    pub accumulate: Option<Accumulate>,
    /// The margins of the filter of the Einsum whose emptiness makes a step skippable (see
    /// `skip`): a warp skips a step where one of them is below its least over the warp's keys
    /// and rows.
    pub skip: Vec<crate::schedule::full_steps::Margin>,
    /// The margins of every filter of the loop's Einsums, where all are affine: a warp runs a
    /// step whose keys are all inside their rank and where every margin is at least its least
    /// over the warp's box as a variant without the filters (`schedule::full_steps`).
    pub full: Option<Vec<crate::schedule::full_steps::Margin>>,
    /// Per tensor, its class (`None` for a tensor no Einsum reads or writes).
    pub classes: Vec<Option<Class>>,
    /// The Einsums before, inside and after the streamed loop, in order.
    pub before: Vec<EinsumId>,
    pub inside: Vec<EinsumId>,
    pub after: Vec<EinsumId>,
    /// Shared memory: the queries of the block, then two key tiles and two value tiles.
    pub q_tile: SharedTile,
    pub k_tiles: [SharedTile; 2],
    pub v_tiles: [SharedTile; 2],
    pub shared_bytes: u64,
}

/// The tensor-core plan of `program`, or why it has none.
pub fn plan(program: &LoopProgram) -> Result<TensorCorePlan, String> {
    let c = &program.cascade;
    // One streamed loop, with Einsums before and after it.
    let mut before = Vec::new();
    let mut after = Vec::new();
    let mut found: Option<(Index, Vec<EinsumId>)> = None;
    let mut skipped = None;
    for node in &program.body {
        match node {
            Node::Compute { einsum } if found.is_none() => before.push(*einsum),
            Node::Compute { einsum } => after.push(*einsum),
            Node::Loop { index, body, skip } if found.is_none() => {
                skipped = *skip;
                let mut inside = Vec::new();
                for node in body {
                    match node {
                        Node::Compute { einsum } => inside.push(*einsum),
                        Node::Loop { .. } => return Err("its streamed loop holds another loop".into()),
                    }
                }
                found = Some((*index, inside));
            }
            Node::Loop { .. } => return Err("it has more than one streamed loop".into()),
        }
    }
    let Some((tile, inside)) = found else { return Err("it has no loop over tiles of keys".into()) };
    let Some((_, key_rank, keys)) = c.split_pairs().into_iter().find(|(t, _, _)| *t == tile.rank) else {
        return Err("its streamed loop is not over the tiles of a split rank".into());
    };
    let key = Index { rank: key_rank, primes: tile.primes };
    let key_tile = match c.rank(key_rank).extent {
        Extent::Fixed(n) if n % 16 == 0 && n > 0 => n,
        _ => return Err("its key tile is not a fixed multiple of 16".into()),
    };

    // The two contractions.
    let mut scores = None;
    let mut product = None;
    for e in &inside {
        let Expr::Reduce { op: ReduceOp::Sum, indices, body, .. } = &c.einsums[e.index()].body else { continue };
        if indices.len() != 1 {
            continue;
        }
        let mut factors = Vec::new();
        body.operands(BinaryOp::Mul, &mut factors);
        let reduced = indices[0];
        if reduced.rank == key_rank {
            product.get_or_insert((*e, factors.into_iter().cloned().collect::<Vec<_>>()));
        } else {
            scores.get_or_insert((*e, reduced, factors.into_iter().cloned().collect::<Vec<_>>()));
        }
    }
    let (Some((scores, head, score_terms)), Some((product, product_terms))) = (scores, product) else {
        return Err("it has no pair of contractions (scores over the head dimension, values over the keys)".into());
    };
    let input_access = |f: &Expr| match f {
        Expr::Access { tensor, subscripts } if is_input(c.tensor(*tensor)) => Some((*tensor, subscripts.clone())),
        _ => None,
    };
    let mentions = |f: &Expr, index: Index| {
        let mut seen = false;
        f.walk(&mut |x| match x {
            Expr::Index(i) => seen |= *i == index,
            Expr::Access { subscripts, .. } => {
                subscripts.iter().for_each(|s| s.for_each_index(&mut |i| seen |= i == index))
            }
            _ => {}
        });
        seen
    };
    let last_is = |subscripts: &[Affine], index: Index| subscripts.last().and_then(Affine::as_index) == Some(index);
    let mut q = None;
    let mut k = None;
    let mut score_factors = Vec::new();
    for f in &score_terms {
        match input_access(f) {
            Some((t, subs)) if last_is(&subs, head) && subs.iter().any(|s| split_point(c, s) == Some(key)) => {
                k.get_or_insert(t);
            }
            Some((t, subs)) if last_is(&subs, head) => {
                q.get_or_insert(t);
            }
            Some((t, _)) if mentions(f, head) => {
                return Err(format!(
                    "`{}` does not have the head dimension `{}` last (its rows are copied whole into shared memory)",
                    c.tensor(t).name,
                    c.index_name(head)
                ))
            }
            _ if mentions(f, head) => {
                return Err("a factor of its scores other than Q and K varies along the head dimension".into())
            }
            _ => score_factors.push(f.clone()),
        }
    }
    let (Some(q), Some(k)) = (q, k) else {
        return Err("its scores are not a product of queries and keys, each with the head dimension last".into());
    };
    let target_ranks = &c.tensor(c.einsums[product.index()].target).ranks;
    let mut v = None;
    let mut probability_factors = Vec::new();
    for f in &product_terms {
        match input_access(f) {
            Some((t, subs))
                if subs.iter().any(|s| split_point(c, s) == Some(key))
                    && subs.last().and_then(Affine::as_index).is_some_and(|i| target_ranks.contains(&i.rank)) =>
            {
                v.get_or_insert(t);
            }
            _ => probability_factors.push(f.clone()),
        }
    }
    let Some(v) = v else { return Err("its value product does not read values with the value column last".into()) };
    let Some(column) = c.einsums[product.index()].lhs.iter().filter_map(|l| l.index()).find(|i| {
        product_terms.iter().any(|f| matches!(input_access(f), Some((t, subs)) if t == v && last_is(&subs, *i)))
    }) else {
        return Err("its value product does not keep the value column".into());
    };
    let elem = elem_of(c.tensor(q));
    if !matches!(elem, ElemType::F16 | ElemType::Bf16) || elem_of(c.tensor(k)) != elem || elem_of(c.tensor(v)) != elem {
        return Err("its queries, keys and values are not all f16 or all bf16".into());
    }
    let dim = |i: Index| match c.rank(i.rank).extent {
        Extent::Fixed(n) if (16..=256).contains(&n) && n.is_power_of_two() => Ok(n),
        _ => Err(format!("its dimension `{}` is not a fixed power of two from 16 to 256", c.rank(i.rank).name)),
    };
    let head_dim = dim(head)?;
    let columns = dim(column)?;

    // The query rank: the one rank of the scores that is neither a key nor a batch rank.
    let output = c.outputs.first().ok_or("it has no output")?.tensor;
    let score_target = c.einsums[scores.index()].target;
    let query_rank = c
        .tensor(score_target)
        .ranks
        .iter()
        .copied()
        .find(|r| c.tensor(output).ranks.contains(r) && !c.tensor(k).ranks.contains(r) && *r != column.rank)
        .filter(|r| c.tensor(q).ranks.contains(r))
        .ok_or("its scores have no query rank")?;
    let query = Index { rank: query_rank, primes: 0 };
    let batch: Vec<RankId> =
        c.tensor(output).ranks.iter().copied().filter(|r| *r != query_rank && *r != column.rank).collect();

    // Every tensor's class.
    let classes = classify(program, &batch, query_rank, tile.rank, key_rank, column.rank)?;
    for operand in [q, k, v] {
        let reads_elsewhere = c.einsums.iter().enumerate().any(|(e, einsum)| {
            let e = EinsumId::new(e);
            e != scores && e != product && einsum.reads().iter().any(|(t, _)| *t == operand)
        });
        if reads_elsewhere {
            return Err(format!("`{}` is read outside the contractions", c.tensor(operand).name));
        }
    }
    for (t, tensor) in c.tensors.iter().enumerate() {
        if t != q.index() && t != k.index() && t != v.index() && is_input(tensor) && elem_of(tensor) != ElemType::F32 {
            return Err(format!("its input `{}` is not f32", tensor.name));
        }
    }
    for o in &c.outputs {
        if !matches!(classes[o.tensor.index()], Some(Class::Out | Class::Row)) {
            return Err(format!("its output `{}` is not a value per query row", c.tensor(o.tensor).name));
        }
    }

    let accumulate = accumulation(c, &inside, product);
    let skip = skipped
        .and_then(|t| inside.iter().find(|e| c.einsums[e.index()].target == t))
        .and_then(|e| crate::schedule::full_steps::margins_of(c, &c.einsums[e.index()]))
        .unwrap_or_default();
    let full = inside.iter().try_fold(Vec::new(), |mut all, e| {
        all.extend(crate::schedule::full_steps::margins_of(c, &c.einsums[e.index()])?);
        Some(all)
    });

    let q_tile = SharedTile::new(0, BLOCK_ROWS, head_dim);
    let k0 = SharedTile::new(q_tile.bytes(), key_tile, head_dim);
    let k1 = SharedTile::new(k0.offset + k0.bytes(), key_tile, head_dim);
    let v0 = SharedTile::new(k1.offset + k1.bytes(), key_tile, columns);
    let v1 = SharedTile::new(v0.offset + v0.bytes(), key_tile, columns);
    let shared_bytes = v1.offset + v1.bytes();
    if shared_bytes > SHARED_LIMIT {
        return Err(format!("its tiles take {shared_bytes} bytes of shared memory, more than {SHARED_LIMIT}"));
    }
    Ok(TensorCorePlan {
        elem,
        batch,
        query,
        tile,
        key,
        keys,
        key_tile,
        head,
        head_dim,
        column,
        columns,
        q,
        k,
        v,
        scores,
        score_factors,
        product,
        probability_factors,
        accumulate,
        skip,
        full,
        classes,
        before,
        inside,
        after,
        q_tile,
        k_tiles: [k0, k1],
        v_tiles: [v0, v1],
        shared_bytes,
    })
}

/// Every tensor's class, from its ranks and its buffer's slots.
fn classify(
    program: &LoopProgram,
    batch: &[RankId],
    query: RankId,
    tile: RankId,
    key: RankId,
    column: RankId,
) -> Result<Vec<Option<Class>>, String> {
    let c = &program.cascade;
    let mut classes = Vec::new();
    for (t, tensor) in c.tensors.iter().enumerate() {
        if is_input(tensor) {
            classes.push(Some(Class::Input));
            continue;
        }
        let buffer = &program.buffers[t];
        let mut rest: Vec<RankId> = Vec::new();
        for (r, slot) in tensor.ranks.iter().zip(&buffer.slots) {
            if batch.contains(r) {
                continue;
            }
            if *r == tile && *slot == Slot::Full {
                return Err(format!("`{}` keeps every tile", tensor.name));
            }
            rest.push(*r);
        }
        rest.retain(|r| *r != tile);
        rest.sort();
        let want = |ranks: &[RankId]| {
            let mut ranks = ranks.to_vec();
            ranks.sort();
            ranks == rest
        };
        let class = if want(&[query]) {
            Class::Row
        } else if want(&[key, query]) {
            Class::Score
        } else if want(&[column, query]) {
            Class::Out
        } else {
            return Err(format!("`{}` is not a value per query row, per score or per output element", tensor.name));
        };
        classes.push(Some(class));
    }
    Ok(classes)
}

/// The Einsum that adds the value product to a running output, where it is the product's only
/// reader and has the form `R[.., t + 1, ..] = P + R[.., t, ..] * c` (either order, `c`
/// optional).
fn accumulation(c: &Cascade, inside: &[EinsumId], product: EinsumId) -> Option<Accumulate> {
    let tile_product = c.einsums[product.index()].target;
    let readers: Vec<EinsumId> = c
        .einsums
        .iter()
        .enumerate()
        .filter(|(_, e)| e.reads().iter().any(|(t, _)| *t == tile_product))
        .map(|(e, _)| EinsumId::new(e))
        .collect();
    let [reader] = readers.as_slice() else { return None };
    let einsum = &c.einsums[reader.index()];
    let tile = einsum.recurrence_index()?;
    if !inside.contains(reader) || !einsum.filter.is_empty() {
        return None;
    }
    let Expr::Binary(BinaryOp::Add, a, b) = &einsum.body else { return None };
    let is_product = |e: &Expr| matches!(e, Expr::Access { tensor, .. } if *tensor == tile_product);
    let running = if is_product(a) {
        &**b
    } else if is_product(b) {
        &**a
    } else {
        return None;
    };
    let previous = |e: &Expr| match e {
        Expr::Access { tensor, subscripts } => {
            *tensor == einsum.target && subscripts.iter().any(|s| s.as_index() == Some(tile))
        }
        _ => false,
    };
    let reads = |e: &Expr, t: TensorId| e.accesses().iter().any(|(x, _)| *x == t);
    let scale = match running {
        e if previous(e) => None,
        Expr::Binary(BinaryOp::Mul, x, y) if previous(x) && !reads(y, einsum.target) => Some((**y).clone()),
        Expr::Binary(BinaryOp::Mul, x, y) if previous(y) && !reads(x, einsum.target) => Some((**x).clone()),
        _ => return None,
    };
    if scale.as_ref().is_some_and(|s| reads(s, tile_product)) {
        return None;
    }
    Some(Accumulate { einsum: *reader, scale })
}
