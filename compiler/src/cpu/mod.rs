//! The Cranelift CPU back end: a scheduled cascade to machine code, JIT-compiled in-process.
//!
//! Needs: a `LoopProgram` (see `schedule`). Guarantees: a `CpuKernel` whose `run` gives the
//! interpreter's outputs within f32 rounding, for any extents. This first version emits scalar
//! f32 code that follows the schedule literally; it is the unfused baseline, and the fused,
//! vectorised schedules are tested against it and the interpreter alike.

mod codegen;
mod empty_steps;
pub mod full_steps;
mod induction;
pub use codegen::table_offsets;
pub mod header;
pub mod helpers;
mod vector;
pub use vector::{streams_input, vectorizable};

use cranelift_codegen::ir::{types, AbiParam, InstBuilder, UserFuncName};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};

use crate::ir::*;
use crate::schedule::{BufferRole, LoopProgram, Slot};
use crate::shapes::tensor_shape;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodegenError {
    #[error("internal error in the CPU back end: {0}")]
    Internal(String),
    #[error("{0}")]
    Run(String),
}

/// The most memory one call may use for its buffers (inputs, outputs, scratch and masks).
pub const MAX_CALL_BYTES: u64 = 16 << 30;

type KernelFn = unsafe extern "C" fn(*const *mut f32, *const *mut u8, *const i64, *const i64, *const i64, *const i64);

/// A compiled kernel. The machine code is immutable once finalized, so a kernel can be called
/// from several threads at once.
pub struct CpuKernel {
    program: LoopProgram,
    function: KernelFn,
    /// Owns the executable memory (a Cranelift `JITModule` or an LLVM `HostCode`); never used
    /// after compilation.
    _code: Box<dyn std::any::Any>,
    /// The kernel's IR as text: Cranelift IR (`einfuse emit --stage clif`) or LLVM IR.
    pub clif: String,
}

// SAFETY: the module is only kept alive, never mutated, after `finalize_definitions`; the code it
// holds reads only the buffers passed to each call.
unsafe impl Send for CpuKernel {}
unsafe impl Sync for CpuKernel {}

fn isa(pic: bool) -> Result<cranelift_codegen::isa::OwnedTargetIsa, CodegenError> {
    let internal = |e: String| CodegenError::Internal(e);
    let mut flags = settings::builder();
    flags.set("opt_level", "speed").map_err(|e| internal(e.to_string()))?;
    flags.set("is_pic", if pic { "true" } else { "false" }).map_err(|e| internal(e.to_string()))?;
    cranelift_native::builder()
        .map_err(|e| internal(e.to_string()))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| internal(e.to_string()))
}

/// Defines the kernel's function in `module`, under `symbol`; returns its id and its CLIF text.
fn define<M: Module>(
    module: &mut M,
    program: &LoopProgram,
    symbol: &str,
    linkage: Linkage,
) -> Result<(cranelift_module::FuncId, String), CodegenError> {
    let internal = |e: String| CodegenError::Internal(e);
    let pointer = module.target_config().pointer_type();
    let mut signature = module.make_signature();
    for _ in 0..6 {
        signature.params.push(AbiParam::new(pointer));
    }
    let id = module.declare_function(symbol, linkage, &signature).map_err(|e| internal(e.to_string()))?;
    let mut context: Context = module.make_context();
    context.func.signature = signature;
    context.func.name = UserFuncName::user(0, id.as_u32());
    let mut builder_context = FunctionBuilderContext::new();
    {
        let helpers = codegen::declare_helpers(module, &mut context.func).map_err(internal)?;
        let full_steps = full_steps::plan(program);
        let mut b = FunctionBuilder::new(&mut context.func, &mut builder_context);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let params: [cranelift_codegen::ir::Value; 6] = b.block_params(entry).try_into().expect("six parameters");
        let mut g = codegen::Gen {
            b,
            program,
            helpers,
            values: vec![],
            masks: vec![],
            extents: vec![],
            bases: vec![],
            dims: vec![],
            strides: vec![],
            env: vec![],
            flags: cranelift_codegen::ir::MemFlagsData::trusted(),
            planned: vec![],
            cell: 0,
            full_steps: full_steps.as_ref(),
        };
        g.prologue(params);
        g.nodes(&program.body);
        g.b.ins().return_(&[]);
        g.b.seal_all_blocks();
        g.b.finalize(module.target_config());
    }
    let clif = context.func.display().to_string();
    module.define_function(id, &mut context).map_err(|e| internal(format!("{e:?}")))?;
    module.clear_context(&mut context);
    Ok((id, clif))
}

/// Compiles a scheduled cascade, in memory.
pub fn compile(program: &LoopProgram) -> Result<CpuKernel, CodegenError> {
    let internal = |e: String| CodegenError::Internal(e);
    let mut jit = JITBuilder::with_isa(isa(false)?, default_libcall_names());
    for (name, pointer) in helpers::symbols() {
        jit.symbol(name, pointer);
    }
    let mut module = JITModule::new(jit);
    let (id, clif) = define(&mut module, program, &program.cascade.name, Linkage::Local)?;
    module.finalize_definitions().map_err(|e| internal(e.to_string()))?;
    let code = module.get_finalized_function(id);
    // SAFETY: the function was declared with this signature (six pointer arguments, no result).
    let function: KernelFn = unsafe { std::mem::transmute::<*const u8, KernelFn>(code) };
    Ok(CpuKernel { program: program.clone(), function, _code: Box::new(module), clif })
}

/// Compiles a scheduled cascade through LLVM for this CPU (the `cpu-llvm` tier): the same
/// calling convention and runtime as the Cranelift kernels, LLVM's O3 pipeline and vectorizer.
#[cfg(feature = "llvm")]
pub fn compile_llvm(program: &LoopProgram) -> Result<CpuKernel, CodegenError> {
    let symbol = object_symbol(&program.cascade);
    let text = crate::llvm::host_ir(program, &symbol);
    let helpers: Vec<(&str, usize)> = helpers::symbols().iter().map(|(n, p)| (*n, *p as usize)).collect();
    let code = crate::llvm::machine::HostCode::new(&text, &symbol, &helpers)
        .map_err(|e| CodegenError::Internal(e.to_string()))?;
    // SAFETY: the symbol was defined with the kernel signature (six pointers, no result).
    let function: KernelFn = unsafe { std::mem::transmute::<usize, KernelFn>(code.address()) };
    Ok(CpuKernel { program: program.clone(), function, _code: Box::new(code), clif: text })
}

/// An object file of the `cpu-llvm` tier, exporting `object_symbol` like `compile_object`.
#[cfg(feature = "llvm")]
pub fn compile_object_llvm(program: &LoopProgram) -> Result<Vec<u8>, CodegenError> {
    let text = crate::llvm::host_ir(program, &object_symbol(&program.cascade));
    crate::llvm::machine::host_object(&text).map_err(|e| CodegenError::Internal(e.to_string()))
}

/// The symbol of a kernel's raw function in an object file.
pub fn object_symbol(cascade: &Cascade) -> String {
    format!("einfuse_kernel_{}", cascade.name)
}

/// Compiles a scheduled cascade to an object file (ELF on Linux), exporting `object_symbol`. It
/// imports the scalar helpers `einfuse_expf`, ... that `c_header` defines.
pub fn compile_object(program: &LoopProgram) -> Result<Vec<u8>, CodegenError> {
    let internal = |e: String| CodegenError::Internal(e);
    let builder = cranelift_object::ObjectBuilder::new(
        isa(true)?,
        program.cascade.name.as_bytes().to_vec(),
        default_libcall_names(),
    )
    .map_err(|e| internal(e.to_string()))?;
    let mut module = cranelift_object::ObjectModule::new(builder);
    define(&mut module, program, &object_symbol(&program.cascade), Linkage::Export)?;
    module.finish().emit().map_err(|e| internal(e.to_string()))
}

impl CpuKernel {
    pub fn cascade(&self) -> &Cascade {
        &self.program.cascade
    }

    /// The bytes of scratch memory (temporary buffers and masks) a call with `extents` allocates.
    pub fn scratch_bytes(&self, extents: &[u64]) -> u64 {
        let c = &self.program.cascade;
        self.program
            .buffers
            .iter()
            .map(|buffer| {
                let len: u64 = stored_shape(&tensor_shape(c, buffer.tensor, extents), &buffer.slots)
                    .iter()
                    .product::<u64>()
                    .max(1);
                let values = if buffer.role == BufferRole::Temp { 4 * len } else { 0 };
                let mask = if buffer.masked { len } else { 0 };
                values + mask
            })
            .sum()
    }

    /// The most scratch memory `run_threads` holds at once: one chunk's scratch per thread at work.
    pub fn peak_scratch_bytes(&self, extents: &[u64], threads: usize) -> u64 {
        let c = &self.program.cascade;
        let Some(batch) = batch_rank(c, extents).filter(|_| threads > 0) else {
            return self.scratch_bytes(extents);
        };
        let total = extents[batch.index()];
        let rows = total.div_ceil(threads as u64).clamp(1, CHUNK_ROWS);
        let mut chunk = extents.to_vec();
        chunk[batch.index()] = rows;
        self.scratch_bytes(&chunk) * (threads as u64).min(total.div_ceil(rows))
    }

    /// Runs the kernel. `inputs` are dense row-major f32 arrays in the order of
    /// `Cascade::inputs`, already checked against `extents`; returns the outputs likewise.
    pub fn run(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, CodegenError> {
        self.run_chunk(extents, inputs, &vec![0; extents.len()])
    }

    /// `run` for a chunk of a batch rank: `bases` holds each rank's first global coordinate.
    fn run_chunk(&self, extents: &[u64], inputs: &[&[f32]], bases: &[i64]) -> Result<Vec<Vec<f32>>, CodegenError> {
        let c = &self.program.cascade;
        // Refuse a call whose buffers would not fit, before allocating any.
        let total: u64 = self
            .program
            .buffers
            .iter()
            .map(|b| {
                let len = stored_shape(&tensor_shape(c, b.tensor, extents), &b.slots)
                    .iter()
                    .try_fold(1u64, |acc, n| acc.checked_mul(*n))
                    .unwrap_or(u64::MAX);
                len.saturating_mul(if b.masked { 5 } else { 4 })
            })
            .fold(0u64, |acc, n| acc.saturating_add(n));
        if total > MAX_CALL_BYTES {
            return Err(CodegenError::Run(format!(
                "this call needs {total} bytes of buffers, more than the limit of {MAX_CALL_BYTES}"
            )));
        }
        let mut values: Vec<Vec<f32>> = Vec::new();
        let mut masks: Vec<Vec<u8>> = Vec::new();
        let mut dims: Vec<i64> = Vec::new();
        let mut strides: Vec<i64> = Vec::new();
        let mut value_pointers: Vec<*mut f32> = Vec::new();
        for buffer in &self.program.buffers {
            let shape = tensor_shape(c, buffer.tensor, extents);
            let stored = stored_shape(&shape, &buffer.slots);
            let mut len: u64 = 1;
            for n in &stored {
                len = len.checked_mul(*n).ok_or_else(|| CodegenError::Run("a buffer's size overflows".into()))?;
            }
            let mut stride = vec![1i64; stored.len()];
            for d in (0..stored.len().saturating_sub(1)).rev() {
                stride[d] = stride[d + 1] * stored[d + 1] as i64;
            }
            dims.extend(shape.iter().map(|n| *n as i64));
            strides.extend(stride);
            // At least one element, so that a clamped read of an empty buffer stays in memory.
            let storage = (len as usize).max(1);
            let data = match buffer.role {
                BufferRole::Input(i) => {
                    let given = inputs.get(i).ok_or_else(|| CodegenError::Run(format!("input {i} is missing")))?;
                    if given.len() as u64 != len {
                        return Err(CodegenError::Run(format!(
                            "input `{}` has {} elements, its shape needs {len}",
                            c.tensor(buffer.tensor).name,
                            given.len()
                        )));
                    }
                    if given.is_empty() {
                        vec![0.0; 1]
                    } else {
                        // The kernel never writes an input: it reads the caller's memory in place.
                        value_pointers.push(given.as_ptr() as *mut f32);
                        values.push(Vec::new());
                        masks.push(Vec::new());
                        continue;
                    }
                }
                _ => vec![0.0; storage],
            };
            values.push(data);
            let last = values.last_mut().expect("pushed");
            value_pointers.push(last.as_mut_ptr());
            masks.push(if buffer.masked { vec![0u8; storage] } else { Vec::new() });
        }
        let mask_pointers: Vec<*mut u8> =
            masks.iter_mut().map(|m| if m.is_empty() { std::ptr::null_mut() } else { m.as_mut_ptr() }).collect();
        let extents_i64: Vec<i64> = extents.iter().map(|e| *e as i64).collect();
        // SAFETY: every pointer table has one entry per buffer (or rank), each buffer holds its
        // shape's elements (at least one), and the code only reads inputs and reads and writes
        // inside the other buffers.
        unsafe {
            (self.function)(
                value_pointers.as_ptr(),
                mask_pointers.as_ptr(),
                extents_i64.as_ptr(),
                dims.as_ptr(),
                strides.as_ptr(),
                bases.as_ptr(),
            );
        }
        let mut outputs = vec![Vec::new(); c.outputs.len()];
        for (buffer, mut data) in self.program.buffers.iter().zip(values) {
            if let BufferRole::Output(o) = buffer.role {
                let len: u64 = tensor_shape(c, buffer.tensor, extents).iter().product();
                data.truncate(len as usize);
                outputs[o] = data;
            }
        }
        Ok(outputs)
    }
}

/// A rank along which the kernel splits into independent calls (see `is_batch_rank`): of the
/// candidates, the one with the largest extent, if above 1.
pub fn batch_rank(cascade: &Cascade, extents: &[u64]) -> Option<RankId> {
    let mut best: Option<RankId> = None;
    for r in 0..cascade.ranks.len() {
        let id = RankId::new(r);
        if is_batch_rank(cascade, id) && best.is_none_or(|b| extents[r] > extents[b.index()]) {
            best = Some(id);
        }
    }
    best.filter(|b| extents[b.index()] > 1)
}

/// Whether the kernel splits into independent calls along `id`: every Einsum binds its plain
/// index on the left, none reduces it or uses its extent, every output has it, and at a position
/// of its own rank it is read as the bare index. Elsewhere in a subscript it is a number, the
/// global coordinate (`K[e, c * MC + m]` reads the chunk `c` of keys: the split-key schedule).
/// A split tile rank qualifies only when its within-tile rank indexes nothing, so that no split
/// pair's validity depends on it.
pub fn is_batch_rank(cascade: &Cascade, id: RankId) -> bool {
    let rank = cascade.rank(id);
    if let Extent::Split { tile, .. } = rank.extent {
        if indexes_rank(cascade, tile) {
            return false;
        }
    }
    if cascade.split_pairs().iter().any(|(_, i, w)| *i == id || *w == id) {
        return false;
    }
    let plain = Index { rank: id, primes: 0 };
    let mut ok = cascade.outputs.iter().all(|o| cascade.tensor(o.tensor).ranks.contains(&id));
    for einsum in &cascade.einsums {
        ok &= einsum.lhs.contains(&Lhs::Index(plain));
        ok &= einsum.lhs_indices().all(|i| i.rank != id || i == plain);
        einsum.body.walk(&mut |e| match e {
            Expr::Reduce { indices, .. } => ok &= indices.iter().all(|i| i.rank != id),
            Expr::Access { tensor, subscripts } => {
                for (position, sub) in subscripts.iter().enumerate() {
                    let mut mentions = false;
                    sub.for_each_index(&mut |i| mentions |= i.rank == id);
                    if cascade.tensor(*tensor).ranks[position] == id {
                        ok &= *sub == Affine::Index(plain);
                    } else if mentions {
                        sub.for_each_index(&mut |i| ok &= i.rank != id || i == plain);
                    }
                }
            }
            // An index used as a number is offset to its global coordinate by the call.
            Expr::Index(i) => ok &= i.rank != id || *i == plain,
            Expr::Extent(r) => ok &= *r != id,
            _ => {}
        });
        for cond in &einsum.filter {
            let mut uses_extent = false;
            cond.lhs.walk(&mut |e| uses_extent |= matches!(e, Expr::Extent(r) if *r == id));
            cond.rhs.walk(&mut |e| uses_extent |= matches!(e, Expr::Extent(r) if *r == id));
            ok &= !uses_extent;
        }
    }
    ok
}

/// Whether some index of the cascade ranges over `rank`.
fn indexes_rank(cascade: &Cascade, rank: RankId) -> bool {
    let mut found = false;
    for einsum in &cascade.einsums {
        found |= einsum.lhs_indices().any(|i| i.rank == rank);
        let mut visit = |e: &Expr| match e {
            Expr::Index(i) => found |= i.rank == rank,
            Expr::Reduce { indices, .. } => found |= indices.iter().any(|i| i.rank == rank),
            Expr::Access { subscripts, .. } => {
                subscripts.iter().for_each(|s| s.for_each_index(&mut |i| found |= i.rank == rank))
            }
            _ => {}
        };
        einsum.body.walk(&mut visit);
        for cond in &einsum.filter {
            cond.lhs.walk(&mut visit);
            cond.rhs.walk(&mut visit);
        }
    }
    found
}

/// Whether a subscript can never leave its position: a bare index of the position's rank, or
/// a split pair `m1 * M0 + m0` into its whole rank (whose validity is checked before any read).
pub fn always_inside(cascade: &Cascade, subscript: &Affine, rank: RankId) -> bool {
    match subscript {
        Affine::Index(i) => i.rank == rank,
        Affine::Add(a, b) => match (&**a, &**b) {
            (Affine::Mul(t, e), Affine::Index(i)) => match (&**t, &**e) {
                (Affine::Index(t), Affine::Extent(e)) => cascade.split_pairs().iter().any(|(tile, inner, whole)| {
                    t.rank == *tile && i.rank == *inner && *e == *inner && *whole == rank && t.primes == i.primes
                }),
                _ => false,
            },
            _ => false,
        },
        _ => false,
    }
}

/// The rows `range` of position `position` of a row-major array of `shape`: borrowed when they
/// are contiguous (every position before has extent 1), else copied.
fn slice_along<'d>(
    data: &'d [f32],
    shape: &[u64],
    position: usize,
    range: std::ops::Range<u64>,
) -> std::borrow::Cow<'d, [f32]> {
    let outer: u64 = shape[..position].iter().product();
    let inner: u64 = shape[position + 1..].iter().product();
    if outer == 1 {
        return std::borrow::Cow::Borrowed(&data[(range.start * inner) as usize..(range.end * inner) as usize]);
    }
    let n = shape[position];
    let mut out = Vec::with_capacity((outer * (range.end - range.start) * inner) as usize);
    for o in 0..outer {
        let start = ((o * n + range.start) * inner) as usize;
        let end = ((o * n + range.end) * inner) as usize;
        out.extend_from_slice(&data[start..end]);
    }
    std::borrow::Cow::Owned(out)
}

/// Writes `part` (rows `range` of `position`) into a row-major array of `shape`.
fn place_along(data: &mut [f32], shape: &[u64], position: usize, range: std::ops::Range<u64>, part: &[f32]) {
    let outer: u64 = shape[..position].iter().product();
    let inner: u64 = shape[position + 1..].iter().product();
    let n = shape[position];
    let rows = ((range.end - range.start) * inner) as usize;
    for o in 0..outer {
        let start = ((o * n + range.start) * inner) as usize;
        data[start..start + rows].copy_from_slice(&part[o as usize * rows..(o as usize + 1) * rows]);
    }
}

impl CpuKernel {
    /// Runs the kernel on `threads` threads: the calls on chunks of a batch rank (see
    /// `batch_rank`) are independent, and run at once. With one thread, or no batch rank, this is
    /// `run`.
    pub fn run_threads(
        &self,
        extents: &[u64],
        inputs: &[&[f32]],
        threads: usize,
    ) -> Result<Vec<Vec<f32>>, CodegenError> {
        let c = &self.program.cascade;
        let Some(batch) = batch_rank(c, extents).filter(|_| threads > 0) else {
            return self.run(extents, inputs);
        };
        let total = extents[batch.index()];
        // Query tiles: chunks small enough that a chunk's rows stay in cache while its keys
        // stream past, taken by the threads from a shared counter.
        let rows = total.div_ceil(threads as u64).clamp(1, CHUNK_ROWS);
        let ranges: Vec<std::ops::Range<u64>> =
            (0..total.div_ceil(rows)).map(|k| k * rows..((k + 1) * rows).min(total)).collect();
        let input_ids = c.inputs();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let run_range = |range: std::ops::Range<u64>| -> Result<Vec<Vec<f32>>, CodegenError> {
            let mut sub_extents = extents.to_vec();
            sub_extents[batch.index()] = range.end - range.start;
            let parts: Vec<std::borrow::Cow<[f32]>> = input_ids
                .iter()
                .zip(inputs)
                .map(|(id, data)| {
                    let shape = tensor_shape(c, *id, extents);
                    match c.tensor(*id).ranks.iter().position(|r| *r == batch) {
                        Some(position) => slice_along(data, &shape, position, range.clone()),
                        None => std::borrow::Cow::Borrowed(*data),
                    }
                })
                .collect();
            let slices: Vec<&[f32]> = parts.iter().map(|p| p.as_ref()).collect();
            let mut bases = vec![0i64; extents.len()];
            bases[batch.index()] = range.start as i64;
            self.run_chunk(&sub_extents, &slices, &bases)
        };
        type Done = Vec<(usize, Result<Vec<Vec<f32>>, CodegenError>)>;
        let results: Vec<Done> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads.min(ranges.len()))
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            // The last tiles first: under a causal mask they are the longest
                            // (they see the most keys), so they start early and the short ones
                            // fill in at the end.
                            let taken = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(k) = ranges.len().checked_sub(taken + 1) else { return done };
                            let range = &ranges[k];
                            done.push((k, run_range(range.clone())));
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        let mut outputs: Vec<Vec<f32>> = c
            .outputs
            .iter()
            .map(|o| vec![0.0; tensor_shape(c, o.tensor, extents).iter().product::<u64>() as usize])
            .collect();
        for (k, result) in results.into_iter().flatten() {
            let parts = result?;
            for ((output, data), part) in c.outputs.iter().zip(outputs.iter_mut()).zip(parts) {
                let shape = tensor_shape(c, output.tensor, extents);
                let position = c.tensor(output.tensor).ranks.iter().position(|r| *r == batch).expect("outputs have it");
                place_along(data, &shape, position, ranges[k].clone(), &part);
            }
        }
        Ok(outputs)
    }
}

/// The most rows of a batch rank in one chunk of `run_threads`.
pub const CHUNK_ROWS: u64 = 64;

/// The extents a buffer stores: a position kept for the current step only holds one, a recurrence
/// kept as two slots holds two.
pub fn stored_shape(shape: &[u64], slots: &[Slot]) -> Vec<u64> {
    shape
        .iter()
        .zip(slots)
        .map(|(n, slot)| match slot {
            Slot::Full => *n,
            Slot::Current => (*n).min(1),
            Slot::Alternate => (*n).min(2),
        })
        .collect()
}

/// The f32 type, for tests of the helper signatures.
pub const F32: cranelift_codegen::ir::Type = types::F32;
