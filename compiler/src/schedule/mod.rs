//! Scheduling: the Cascade IR to the Loop IR, which says in what order and in which loops the
//! Einsums run, and which buffers hold their tensors.
//!
//! Needs: a verified cascade. Guarantees: a `LoopProgram` that evaluates the cascade as the
//! interpreter does. The Einsums of a recurrence run inside one loop over the recurrence's index
//! (a *streamed* loop), one step at a time, in cascade order; initial values run before it; every
//! other Einsum runs as its own loop nest. Every tensor has a buffer holding all its points, with
//! a definedness mask when some point may be undefined.
//!
//! This folder is the scheduling layer: what more than one emitter needs to know about a
//! program is decided here once (`layout`, `lanes`, `full_steps`), the order of every scratch
//! buffer's positions is chosen (`arrange`), the host tiers' packed panels
//! are made here (`pack`), sums are folded into the running outputs they update (`accumulate`),
//! divisions by constants become multiplications (`reciprocal`), exponentials that never see a
//! positive argument are found (`sign`), filters that restate a split
//! pair's validity are dropped (`validity`), what both host emitters compute the same way is
//! written here once over their primitives (`walk`), and every program is checked by `verify`
//! before an emitter sees it.

pub mod accumulate;
pub mod arrange;
pub mod full_steps;
pub mod lanes;
pub mod layout;
pub mod pack;
pub mod reciprocal;
pub mod sign;
pub mod stream;
pub mod tensor_cores;
pub mod validity;
pub mod verify;
pub mod walk;

use std::fmt::Write;

use crate::ir::*;

/// Where a buffer's storage comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BufferRole {
    /// The caller's input, by position among the cascade's inputs.
    Input(usize),
    /// The caller's output, by position among the outputs.
    Output(usize),
    /// Scratch memory of the kernel.
    Temp,
}

/// How a buffer stores one position of its tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Slot {
    /// Every coordinate.
    Full,
    /// Only the current step of the streamed loop: the tensor is written and read within one step.
    Current,
    /// Two slots, the previous and the current iterate of a recurrence (coordinate modulo 2).
    Alternate,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub tensor: TensorId,
    pub role: BufferRole,
    /// Whether some point may be undefined, so that a mask must be kept beside the values.
    pub masked: bool,
    /// One per position of the tensor.
    pub slots: Vec<Slot>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// Runs `body` for `index` = 0, 1, ... up to its rank's extent, in order. With `skip`, a
    /// step where that tensor (written by a `Compute` of the body) has no defined point may stop
    /// after computing it, once every running tensor's current iterate is copied to its next
    /// slot: the rest of the step would change nothing (see `skip`).
    Loop { index: Index, body: Vec<Node>, skip: Option<TensorId> },
    /// Evaluates an Einsum at every point of its left-hand side not bound by an enclosing loop.
    Compute { einsum: EinsumId },
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoopProgram {
    pub cascade: Cascade,
    /// One per tensor, in tensor order.
    pub buffers: Vec<Buffer>,
    pub body: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("cannot schedule `{0}`: it reads a value of its recurrence loop at a step that is not the current one")]
    Unschedulable(String),
    /// An internal error: the scheduler made a program its verifier rejects.
    #[error(transparent)]
    Invalid(#[from] verify::LoopIrError),
}

/// Schedules a cascade.
pub fn schedule(cascade: &Cascade) -> Result<LoopProgram, ScheduleError> {
    let cascade = &validity::drop_split_validity(&reciprocal::constant_divisions(cascade));
    let masked = may_be_undefined(cascade);
    let buffers = cascade
        .tensors
        .iter()
        .enumerate()
        .map(|(t, tensor)| {
            let id = TensorId::new(t);
            let role = match tensor.kind {
                TensorKind::Input { .. } => {
                    BufferRole::Input(cascade.inputs().iter().position(|i| *i == id).expect("an input"))
                }
                TensorKind::Defined { .. } => match cascade.outputs.iter().position(|o| o.tensor == id) {
                    Some(o) => BufferRole::Output(o),
                    None => BufferRole::Temp,
                },
            };
            Buffer { tensor: id, role, masked: masked[t], slots: vec![Slot::Full; tensor.ranks.len()] }
        })
        .collect::<Vec<_>>();
    let mut buffers = buffers;
    // The recurrence index of each iterative rank.
    let streamed: Vec<RankId> = cascade
        .tensors
        .iter()
        .filter_map(|t| match t.kind {
            TensorKind::Defined { iterative: Some(p) } => Some(t.ranks[p]),
            _ => None,
        })
        .collect();
    let binds_streamed = |einsum: &Einsum| -> Option<Index> {
        einsum.lhs.iter().find_map(|lhs| match lhs {
            Lhs::Index(i) | Lhs::Next(i) if streamed.contains(&i.rank) => Some(*i),
            _ => None,
        })
    };
    let body = order_units(cascade, &binds_streamed, &mut buffers)?;
    let program = LoopProgram { cascade: cascade.clone(), buffers, body };
    verify::verify(&program)?;
    Ok(program)
}

/// Schedules `cascade` for the thread kernels: staged tiles read in place (`pack::unstage`; the
/// kernels stage the tiles of inputs in shared memory themselves), then as `schedule` does.
pub fn schedule_threads(cascade: &Cascade) -> Result<LoopProgram, ScheduleError> {
    schedule(&pack::unstage(cascade))
}

/// What the host schedule knows of the tier that runs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostTier {
    /// The floats in one of its vectors: 4 for Cranelift's 128-bit code, 8 or 16 for LLVM's.
    pub lanes: usize,
    /// Its vector registers: 16 on x86-64 (SSE, AVX2), 32 with AVX-512.
    pub registers: usize,
}

/// Schedules `cascade` for a host tier: tiles staged as written read in place (`pack::unstage`),
/// scratch tensors in the layer's order (`arrange`), streamed over tiles of keys where it is one
/// pass without a recurrence (`stream`), with the packed panels and staged tiles the layer
/// chooses (`pack`), then sums folded into the Einsums that read them
/// (`accumulate`: after packing, so that a contraction reads the panels in lanes when its fold is
/// weighed).
pub fn schedule_host(cascade: &Cascade, tier: HostTier) -> Result<LoopProgram, ScheduleError> {
    let streamed = schedule_streamed(&arrange::arrange(&pack::unstage(cascade), tier.lanes))?;
    accumulate::accumulate(pack::pack(streamed)?, tier)
}

/// Schedules `cascade` streamed over tiles of keys where it is one pass without a recurrence
/// (`stream`), else as `schedule` does.
pub fn schedule_streamed(cascade: &Cascade) -> Result<LoopProgram, ScheduleError> {
    match stream::stream(cascade).and_then(|c| schedule(&c).ok()) {
        Some(program) => Ok(program),
        None => schedule(cascade),
    }
}

/// Whether `einsum` reads `tensor` only at the current step of `index`: the bare index for a
/// plain tensor, the index or the index plus one for a recurrence along it.
fn reads_at_current_step(cascade: &Cascade, einsum: &Einsum, tensor: TensorId, index: Index) -> bool {
    let t = cascade.tensor(tensor);
    let iterative = matches!(t.kind, TensorKind::Defined { iterative: Some(_) });
    einsum.reads().iter().filter(|(read, _)| *read == tensor).all(|(_, subscripts)| {
        t.ranks.iter().zip(subscripts.iter()).all(|(rank, sub)| {
            if *rank != index.rank {
                return true;
            }
            match sub {
                Affine::Index(i) => *i == index,
                Affine::Add(a, b) if iterative => {
                    matches!((&**a, &**b), (Affine::Index(i), Affine::Const(1)) if *i == index)
                }
                _ => false,
            }
        })
    })
}

/// Orders the Einsums into loop nests. A recurrence runs in a streamed loop over its index;
/// Einsums that bind the same index and feed it, or read it, at the same step join that loop when
/// doing so keeps the order of loop nests acyclic and every read inside the loop at the current
/// step; every other Einsum is its own loop nest. Units run in dependency order, ties broken by
/// cascade order.
fn order_units(
    cascade: &Cascade,
    binds_streamed: &dyn Fn(&Einsum) -> Option<Index>,
    buffers: &mut [Buffer],
) -> Result<Vec<Node>, ScheduleError> {
    let n = cascade.einsums.len();
    let reads_of = |e: usize| -> Vec<TensorId> {
        let mut reads: Vec<TensorId> = cascade.einsums[e].reads().into_iter().map(|(t, _)| t).collect();
        reads.sort();
        reads.dedup();
        reads
    };
    let definitions = |t: TensorId| -> Vec<usize> { cascade.definitions(t).map(|(e, _)| e.index()).collect() };
    // Start from the strongly connected components: a recurrence and what it reads at an earlier
    // step (`SPD[m1] = RD[m1] * ...` with `RD[m1 + 1] = ... SPD[m1]`) form one unit.
    let mut unit_of: Vec<usize> = (0..n).collect();
    {
        let mut graph: petgraph::graph::DiGraph<usize, ()> = petgraph::graph::DiGraph::new();
        let nodes: Vec<_> = (0..n).map(|e| graph.add_node(e)).collect();
        for e in 0..n {
            for t in reads_of(e) {
                for f in definitions(t) {
                    graph.add_edge(nodes[e], nodes[f], ());
                }
            }
        }
        for component in petgraph::algo::tarjan_scc(&graph) {
            let members: Vec<usize> = component.iter().map(|node| graph[*node]).collect();
            let first = *members.iter().min().expect("non-empty");
            for e in members {
                unit_of[e] = first;
            }
        }
    }
    let looped = |unit_of: &[usize], u: usize| {
        (0..n).any(|e| unit_of[e] == u && cascade.einsums[e].recurrence_index().is_some())
    };
    // Whether the units are acyclic and every loop reads its own members at the current step.
    let acceptable = |unit_of: &[usize]| -> bool {
        let mut depends: Vec<Vec<usize>> = vec![vec![]; n];
        for e in 0..n {
            let u = unit_of[e];
            for t in reads_of(e) {
                for f in definitions(t) {
                    let v = unit_of[f];
                    if v == u {
                        let index = binds_streamed(&cascade.einsums[e]);
                        let self_read = f == e || cascade.einsums[f].target == cascade.einsums[e].target;
                        match index {
                            Some(index)
                                if !self_read && !reads_at_current_step(cascade, &cascade.einsums[e], t, index) =>
                            {
                                return false
                            }
                            _ => {}
                        }
                    } else if !depends[u].contains(&v) {
                        depends[u].push(v);
                    }
                }
            }
        }
        let mut done = vec![false; n];
        let live: Vec<usize> = {
            let mut l: Vec<usize> = unit_of.to_vec();
            l.sort();
            l.dedup();
            l
        };
        for _ in 0..live.len() {
            match live.iter().copied().find(|u| !done[*u] && depends[*u].iter().all(|v| done[*v])) {
                Some(u) => done[u] = true,
                None => return false,
            }
        }
        true
    };
    // Grow the loops to a fixpoint, in cascade order.
    loop {
        let mut changed = false;
        for e in 0..n {
            let einsum = &cascade.einsums[e];
            let Some(index) = binds_streamed(einsum) else { continue };
            if einsum.is_initial() {
                continue;
            }
            for t in reads_of(e) {
                for f in definitions(t) {
                    let other = &cascade.einsums[f];
                    let (u, v) = (unit_of[e], unit_of[f]);
                    if u == v || other.is_initial() || binds_streamed(other) != Some(index) {
                        continue;
                    }
                    if !looped(&unit_of, u) && !looped(&unit_of, v) {
                        continue;
                    }
                    if !reads_at_current_step(cascade, einsum, t, index) {
                        continue;
                    }
                    let mut trial = unit_of.clone();
                    for x in trial.iter_mut() {
                        if *x == v {
                            *x = u;
                        }
                    }
                    if acceptable(&trial) {
                        unit_of = trial;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    if !acceptable(&unit_of) {
        let stuck = (0..n).find(|e| cascade.einsums[*e].recurrence_index().is_some()).unwrap_or(0);
        return Err(ScheduleError::Unschedulable(cascade.einsum_label(EinsumId::new(stuck))));
    }
    // Emit the units in dependency order, the earliest first.
    let mut units: Vec<usize> = unit_of.clone();
    units.sort();
    units.dedup();
    let members = |u: usize| -> Vec<usize> { (0..n).filter(|e| unit_of[*e] == u).collect() };
    let mut done: Vec<usize> = Vec::new();
    let mut body = Vec::new();
    while done.len() < units.len() {
        let ready = units
            .iter()
            .copied()
            .filter(|u| !done.contains(u))
            .filter(|u| {
                members(*u).iter().all(|e| {
                    reads_of(*e)
                        .into_iter()
                        .all(|t| definitions(t).iter().all(|f| unit_of[*f] == *u || done.contains(&unit_of[*f])))
                })
            })
            .min_by_key(|u| members(*u)[0]);
        let Some(u) = ready else {
            return Err(ScheduleError::Unschedulable(cascade.einsum_label(EinsumId::new(members(units[0])[0]))));
        };
        done.push(u);
        let ids: Vec<EinsumId> = members(u).into_iter().map(EinsumId::new).collect();
        let index = binds_streamed(&cascade.einsums[ids[0].index()]);
        match (looped(&unit_of, u), index) {
            (true, Some(index)) => {
                check_group(cascade, &ids, index)?;
                shrink_buffers(cascade, &ids, index, buffers);
                let skip = crate::skip::empty_step_tensor(cascade, buffers, &ids, index);
                let body_nodes = ids.into_iter().map(|einsum| Node::Compute { einsum }).collect();
                body.push(Node::Loop { index, body: body_nodes, skip });
            }
            _ => body.extend(ids.into_iter().map(|einsum| Node::Compute { einsum })),
        }
    }
    Ok(body)
}

/// Buffers of the tensors a streamed loop makes and uses up keep only the current step (or, for a
/// recurrence, the previous and current iterates), so that no buffer grows with the streamed rank.
fn shrink_buffers(cascade: &Cascade, group: &[EinsumId], index: Index, buffers: &mut [Buffer]) {
    let members: Vec<TensorId> = group.iter().map(|e| cascade.einsums[e.index()].target).collect();
    for tensor in &members {
        let t = cascade.tensor(*tensor);
        let buffer = &mut buffers[tensor.index()];
        if buffer.role != BufferRole::Temp {
            continue;
        }
        let Some(position) = t.ranks.iter().position(|r| *r == index.rank) else { continue };
        if t.ranks.iter().filter(|r| **r == index.rank).count() != 1 {
            continue;
        }
        let iterative = matches!(t.kind, TensorKind::Defined { iterative: Some(k) } if k == position);
        // Every read of the tensor: inside the loop at the current step, or (a recurrence) after
        // it at the final iterate.
        let mut fits = true;
        for (e, einsum) in cascade.einsums.iter().enumerate() {
            let inside = group.contains(&EinsumId::new(e));
            for (read, subscripts) in einsum.reads() {
                if read != *tensor {
                    continue;
                }
                let sub = &subscripts[position];
                fits &= if inside {
                    match sub {
                        Affine::Index(i) => *i == index,
                        Affine::Add(a, b) => {
                            iterative && matches!((&**a, &**b), (Affine::Index(i), Affine::Const(1)) if *i == index)
                        }
                        _ => false,
                    }
                } else {
                    iterative && matches!(sub, Affine::Extent(r) if *r == index.rank)
                };
            }
        }
        // A slice kept for the current step only must be written inside the loop too: an initial
        // value of a recurrence along another rank (`RM[a1, a0, 0]` before a loop over `a1`)
        // would otherwise leave one slot for every step's initial value.
        if !iterative {
            fits &= cascade.definitions(*tensor).all(|(e, _)| group.contains(&e));
        }
        if fits {
            buffer.slots[position] = if iterative { Slot::Alternate } else { Slot::Current };
        }
    }
}

/// Inside the loop over `index`, an Einsum may read a tensor of the loop only at the current
/// step: the current slice of a plain tensor, or the current or previous iterate.
fn check_group(cascade: &Cascade, group: &[EinsumId], index: Index) -> Result<(), ScheduleError> {
    let members: Vec<TensorId> = group.iter().map(|e| cascade.einsums[e.index()].target).collect();
    for e in group {
        let einsum = &cascade.einsums[e.index()];
        for (read, _) in einsum.reads() {
            if members.contains(&read) && !reads_at_current_step(cascade, einsum, read, index) {
                return Err(ScheduleError::Unschedulable(cascade.einsum_label(*e)));
            }
        }
    }
    Ok(())
}

/// Which tensors may hold undefined points that a reader could see: those with a filter, a
/// recurrence without an initial value, a read that can fall outside its tensor, or a read of
/// such a tensor; and those with a split pair that can be ragged, unless they are scratch whose
/// every read names the pair by its own two indices. Every back end evaluates a point only
/// where the split pairs bound there are valid, so such a read never reaches a point past the
/// ragged edge, and the tensor needs no mask.
pub fn may_be_undefined(cascade: &Cascade) -> Vec<bool> {
    let mut masked = vec![false; cascade.tensors.len()];
    let splits = cascade.split_pairs();
    let outputs: Vec<TensorId> = cascade.outputs.iter().map(|o| o.tensor).collect();
    // Whether every read of a tensor names each of its split pairs by a pair of indices.
    let mut aligned = vec![true; cascade.tensors.len()];
    for einsum in &cascade.einsums {
        for (read, subscripts) in einsum.reads() {
            let ranks = &cascade.tensor(read).ranks;
            for (tile, inner, _) in &splits {
                let (Some(t), Some(i)) = (ranks.iter().position(|r| r == tile), ranks.iter().position(|r| r == inner))
                else {
                    continue;
                };
                let paired = match (&subscripts[t], &subscripts[i]) {
                    (Affine::Index(a), Affine::Index(b)) => a.rank == *tile && b.rank == *inner && a.primes == b.primes,
                    _ => false,
                };
                aligned[read.index()] &= paired;
            }
        }
    }
    let initialized = |t: TensorId| cascade.einsums.iter().any(|e| e.target == t && e.is_initial());
    loop {
        let mut changed = false;
        for einsum in &cascade.einsums {
            if masked[einsum.target.index()] {
                continue;
            }
            let lhs: Vec<Index> = einsum.lhs_indices().collect();
            let ragged = splits
                .iter()
                .any(|(tile, inner, _)| lhs.iter().any(|i| i.rank == *tile) && lhs.iter().any(|i| i.rank == *inner));
            let target = einsum.target;
            let ragged = ragged && (outputs.contains(&target) || !aligned[target.index()]);
            let uninitialized = einsum.recurrence_index().is_some() && !initialized(target);
            let mut partial = !einsum.filter.is_empty() || ragged || uninitialized;
            for (read, subscripts) in outside_reductions(einsum) {
                let tensor = cascade.tensor(read);
                // A split pair's point `t * M0 + m0` is inside its whole rank wherever it is valid;
                // an iterative position holds one more point than its rank: `i + 1` and the
                // extent itself are inside it.
                let iterative = match tensor.kind {
                    TensorKind::Defined { iterative } => iterative,
                    TensorKind::Input { .. } => None,
                };
                let in_range = tensor.ranks.iter().zip(subscripts).enumerate().all(|(p, (rank, sub))| {
                    let next = iterative == Some(p)
                        && match sub {
                            Affine::Add(a, b) => {
                                matches!((&**a, &**b), (Affine::Index(i), Affine::Const(1)) if i.rank == *rank)
                            }
                            Affine::Extent(r) => r == rank,
                            _ => false,
                        };
                    next || layout::always_inside(cascade, sub, *rank)
                });
                partial |= masked[read.index()] || !in_range;
            }
            if partial {
                masked[einsum.target.index()] = true;
                changed = true;
            }
        }
        if !changed {
            return masked;
        }
    }
}

/// The reads of an Einsum outside its reductions (in its body and its filter): a reduction
/// skips its undefined terms and is defined even when it has none (its identity), so only these
/// make a point undefined.
fn outside_reductions(einsum: &Einsum) -> Vec<(TensorId, &[Affine])> {
    fn walk<'e>(expr: &'e Expr, out: &mut Vec<(TensorId, &'e [Affine])>) {
        match expr {
            Expr::Access { tensor, subscripts } => out.push((*tensor, subscripts)),
            Expr::Unary(_, a) => walk(a, out),
            Expr::Binary(_, a, b) => {
                walk(a, out);
                walk(b, out);
            }
            Expr::Reduce { .. } | Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) => {}
        }
    }
    let mut out = Vec::new();
    walk(&einsum.body, &mut out);
    for cond in &einsum.filter {
        walk(&cond.lhs, &mut out);
        walk(&cond.rhs, &mut out);
    }
    out
}

/// The Loop IR's text form (`einfuse emit --stage loops`).
pub fn print_program(program: &LoopProgram) -> String {
    let c = &program.cascade;
    let mut out = String::new();
    writeln!(out, "loops {} {{", c.name).unwrap();
    for buffer in &program.buffers {
        let tensor = c.tensor(buffer.tensor);
        let dims: Vec<String> = tensor
            .ranks
            .iter()
            .enumerate()
            .map(|(p, r)| {
                let dim = match tensor.kind {
                    TensorKind::Defined { iterative: Some(k) } if k == p => format!("{} + 1", c.rank(*r).name),
                    _ => c.rank(*r).name.clone(),
                };
                match buffer.slots[p] {
                    Slot::Full => dim,
                    Slot::Current => format!("{dim}: current"),
                    Slot::Alternate => format!("{dim}: 2 slots"),
                }
            })
            .collect();
        let role = match buffer.role {
            BufferRole::Input(i) => format!("input {i}"),
            BufferRole::Output(o) => format!("output {o}"),
            BufferRole::Temp => "temp".to_string(),
        };
        let mask = if buffer.masked { ", masked" } else { "" };
        writeln!(out, "  buffer {}[{}]: {role}{mask}", tensor.name, dims.join(", ")).unwrap();
    }
    fn nodes(program: &LoopProgram, body: &[Node], bound: &mut Vec<Index>, out: &mut String) {
        let c = &program.cascade;
        for node in body {
            let pad = "  ".repeat(bound.len() + 1);
            match node {
                Node::Loop { index, body, skip } => {
                    let skip = match skip {
                        Some(t) => format!(", skipping a step where {} is empty", c.tensor(*t).name),
                        None => String::new(),
                    };
                    let (name, rank) = (c.index_name(*index), &c.rank(index.rank).name);
                    writeln!(out, "{pad}loop {name} < {rank}{skip} {{").unwrap();
                    bound.push(*index);
                    nodes(program, body, bound, out);
                    bound.pop();
                    writeln!(out, "{pad}}}").unwrap();
                }
                Node::Compute { einsum } => {
                    let einsum = &c.einsums[einsum.index()];
                    let free: Vec<Index> = einsum.lhs_indices().filter(|i| !bound.contains(i)).collect();
                    // The host tiers' walk of a transposing copy, decided here for both.
                    let order = match pack::copy_order(program, einsum, &free) {
                        Some(o) => format!("  # in blocks of {} along {}", pack::COPY_BLOCK, c.index_name(o.rows)),
                        None => String::new(),
                    };
                    writeln!(out, "{pad}{}{order}", crate::print::print_einsum(c, einsum)).unwrap();
                }
            }
        }
    }
    nodes(program, &program.body, &mut Vec::new(), &mut out);
    writeln!(out, "}}").unwrap();
    out
}

/// The arithmetic a cascade does at `extents`: for every Einsum, its points (left-hand side and
/// reduced indices) times the operations at each point, a reduction step counting as one. This is
/// the cascade as written, so that a fused and an unfused kernel are measured against the same
/// count; for attention with the scale applied outside the sum it is about the usual 4 * P * M *
/// D, and with the scale inside the sum (`Q[e, p] * K[e, m] * scale`, as `benches/attention.ein`
/// writes it) the scale's products count too: about 1.27 times that.
pub fn flop_count(cascade: &Cascade, extents: &[u64]) -> f64 {
    fn ops(expr: &Expr, extents: &[u64]) -> f64 {
        match expr {
            Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Index(_) | Expr::Access { .. } => 0.0,
            Expr::Unary(_, a) => 1.0 + ops(a, extents),
            Expr::Binary(_, a, b) => 1.0 + ops(a, extents) + ops(b, extents),
            Expr::Reduce { indices, body, .. } => {
                let points: f64 = indices.iter().map(|i| extents[i.rank.index()] as f64).product();
                points * (1.0 + ops(body, extents))
            }
        }
    }
    cascade
        .einsums
        .iter()
        .map(|einsum| {
            let points: f64 = einsum.lhs_indices().map(|i| extents[i.rank.index()] as f64).product();
            points * ops(&einsum.body, extents)
        })
        .sum()
}
