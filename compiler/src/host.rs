//! Running a compiled host kernel: the buffers of one call, the chunks of a batch rank on
//! several threads, and the calling convention both CPU tiers share.
//!
//! Needs: a `LoopProgram` and the address of a function compiled from it with the kernel
//! signature (Cranelift's `cpu::compile` or LLVM's `llvm::compile_host`). Guarantees: `run` and
//! `run_threads` allocate every buffer the schedule asks for, check inputs and sizes before
//! calling, and return the outputs dense and row-major; neither back end knows of the other.

use crate::ir::*;
use crate::schedule::layout::{batch_rank, derived_extents, is_batch_rank, stored_shape};
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

/// The signature of every host kernel: values, masks, extents, dimensions, strides, bases (each
/// rank's first coordinate within the arrays of the call, then each rank's first global position:
/// what `Index` values and filters see).
pub type KernelFn =
    unsafe extern "C" fn(*const *mut f32, *const *mut u8, *const i64, *const i64, *const i64, *const i64);

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

/// The symbol of a kernel's raw function in an object file.
pub fn object_symbol(cascade: &Cascade) -> String {
    format!("einfuse_kernel_{}", cascade.name)
}

impl CpuKernel {
    /// A kernel from compiled code: `function` must have been compiled from `program` with the
    /// kernel signature, and `code` own the memory it lives in.
    pub fn new(program: &LoopProgram, function: KernelFn, code: Box<dyn std::any::Any>, text: String) -> CpuKernel {
        CpuKernel { program: program.clone(), function, _code: code, clif: text }
    }
}

impl CpuKernel {
    pub fn cascade(&self) -> &Cascade {
        &self.program.cascade
    }

    /// The bytes of scratch memory (temporary buffers and masks) a call with `extents` allocates.
    pub fn scratch_bytes(&self, extents: &[u64]) -> u64 {
        let extents = &derived_extents(&self.program.cascade, extents);
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
        let extents = &derived_extents(&self.program.cascade, extents);
        let c = &self.program.cascade;
        let Some(batch) = batch_rank(c, extents).filter(|_| threads > 0) else {
            return self.scratch_bytes(extents);
        };
        let total = extents[batch.index()];
        let rows = total.div_ceil(threads as u64).clamp(1, CHUNK_ROWS);
        let mut chunk = extents.to_vec();
        chunk[batch.index()] = rows;
        let mut calls = total.div_ceil(rows);
        for r in split_points(c, extents, batch) {
            chunk[r.index()] = 1;
            calls *= extents[r.index()];
        }
        self.scratch_bytes(&chunk) * (threads as u64).min(calls)
    }

    /// Runs the kernel. `inputs` are dense row-major f32 arrays in the order of
    /// `Cascade::inputs`, already checked against `extents`; returns the outputs likewise.
    pub fn run(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, CodegenError> {
        self.run_at(extents, inputs, &vec![0; extents.len()])
    }

    /// `run` where each rank's points start at the global position `origins[r]` (a shard of a
    /// longer sequence): `Index` values and filters see global positions, subscripts the arrays
    /// given.
    pub fn run_at(&self, extents: &[u64], inputs: &[&[f32]], origins: &[i64]) -> Result<Vec<Vec<f32>>, CodegenError> {
        let extents = &derived_extents(&self.program.cascade, extents);
        let operands: Vec<Operand> = inputs.iter().map(|data| Operand { data, strides: None }).collect();
        let outputs = vec![None; self.program.cascade.outputs.len()];
        self.run_chunk(extents, &operands, &outputs, &vec![0; extents.len()], &padded(origins, extents.len()))
    }

    /// `run` for a chunk of a batch rank: `bases` holds each rank's first coordinate in the
    /// arrays, `origins` the global position of the arrays' first point. An output with a window
    /// is written in place into the caller's array (and returned empty); the others are returned.
    fn run_chunk(
        &self,
        extents: &[u64],
        inputs: &[Operand],
        outputs: &[Option<Window>],
        bases: &[i64],
        origins: &[i64],
    ) -> Result<Vec<Vec<f32>>, CodegenError> {
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
            // At least one element, so that a clamped read of an empty buffer stays in memory.
            let storage = (len as usize).max(1);
            let data = match buffer.role {
                BufferRole::Input(i) => {
                    let operand = inputs.get(i).ok_or_else(|| CodegenError::Run(format!("input {i} is missing")))?;
                    if let Some(window) = &operand.strides {
                        // A box of a larger array, read in place through the array's strides.
                        strides.extend(window);
                        value_pointers.push(operand.data.as_ptr() as *mut f32);
                        values.push(Vec::new());
                        masks.push(Vec::new());
                        continue;
                    }
                    strides.extend(stride);
                    let given = operand.data;
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
                BufferRole::Output(o)
                    if outputs.get(o).is_some_and(Option::is_some)
                        && !buffer.masked
                        && buffer.slots.iter().all(|s| *s == Slot::Full) =>
                {
                    let window = outputs[o].as_ref().expect("checked");
                    strides.extend(&window.strides);
                    value_pointers.push(window.data as *mut f32);
                    values.push(Vec::new());
                    masks.push(Vec::new());
                    continue;
                }
                _ => {
                    strides.extend(stride);
                    vec![0.0; storage]
                }
            };
            values.push(data);
            let last = values.last_mut().expect("pushed");
            value_pointers.push(last.as_mut_ptr());
            masks.push(if buffer.masked { vec![0u8; storage] } else { Vec::new() });
        }
        let mask_pointers: Vec<*mut u8> =
            masks.iter_mut().map(|m| if m.is_empty() { std::ptr::null_mut() } else { m.as_mut_ptr() }).collect();
        let extents_i64: Vec<i64> = extents.iter().map(|e| *e as i64).collect();
        // Each rank's first coordinate in the arrays, then its first global position: one entry
        // per rank of the kernel, whatever the caller passed.
        let ranks = c.ranks.len();
        let base = |r: usize| bases.get(r).copied().unwrap_or(0);
        let origin = |r: usize| origins.get(r).copied().unwrap_or(0);
        let bases: Vec<i64> = (0..ranks).map(base).chain((0..ranks).map(|r| base(r) + origin(r))).collect();
        {
            let _flushing = FlushSubnormals::new();
            // SAFETY: every pointer table has one entry per buffer (or rank), each buffer holds
            // its shape's elements (at least one), and the code only reads inputs and reads and
            // writes inside the other buffers.
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

impl CpuKernel {
    /// Runs the kernel on `threads` threads: the calls on chunks of a batch rank (see
    /// `batch_rank`) are independent, and run at once; every other batch rank that leads each
    /// tensor holding it (the heads of `Q[h, p, e]`, `K[h, m, e]`) is split too, one point a call,
    /// so that a call's scratch (one head's tiles) stays in cache and its slices are borrowed.
    /// With one thread, or no batch rank, this is `run`.
    pub fn run_threads(
        &self,
        extents: &[u64],
        inputs: &[&[f32]],
        threads: usize,
    ) -> Result<Vec<Vec<f32>>, CodegenError> {
        self.run_threads_at(extents, inputs, threads, &vec![0; extents.len()])
    }

    /// `run_threads` with each rank's global origin, as `run_at`.
    pub fn run_threads_at(
        &self,
        extents: &[u64],
        inputs: &[&[f32]],
        threads: usize,
        origins: &[i64],
    ) -> Result<Vec<Vec<f32>>, CodegenError> {
        let extents = &derived_extents(&self.program.cascade, extents);
        let origins = &padded(origins, extents.len());
        let c = &self.program.cascade;
        let Some(batch) = batch_rank(c, extents).filter(|_| threads > 0) else {
            return self.run_at(extents, inputs, origins);
        };
        let total = extents[batch.index()];
        // Query tiles: chunks small enough that a chunk's rows stay in cache while its keys
        // stream past, taken by the threads from a shared counter.
        let rows = total.div_ceil(threads as u64).clamp(1, CHUNK_ROWS);
        let others = split_points(c, extents, batch);
        // Each call: a range of the batch rank and one point of each other split rank.
        let mut calls: Vec<Vec<(RankId, std::ops::Range<u64>)>> = Vec::new();
        for k in 0..total.div_ceil(rows) {
            let mut partial = vec![vec![(batch, k * rows..((k + 1) * rows).min(total))]];
            for r in &others {
                partial = partial
                    .into_iter()
                    .flat_map(|call| {
                        (0..extents[r.index()]).map(move |x| {
                            let mut call = call.clone();
                            call.push((*r, x..x + 1));
                            call
                        })
                    })
                    .collect();
            }
            calls.extend(partial);
        }
        let boxes = |tensor: TensorId, call: &[(RankId, std::ops::Range<u64>)]| -> Vec<std::ops::Range<u64>> {
            let shape = tensor_shape(c, tensor, extents);
            c.tensor(tensor)
                .ranks
                .iter()
                .zip(&shape)
                .map(|(r, n)| call.iter().find(|(s, _)| s == r).map(|(_, range)| range.clone()).unwrap_or(0..*n))
                .collect()
        };
        let input_ids = c.inputs();
        let repeated: Vec<bool> = input_ids.iter().map(|id| crate::schedule::layout::read_repeatedly(c, *id)).collect();
        // The outputs, written in place by the calls (each its own box); an output the kernel
        // masks is returned by each call and placed after.
        let mut outputs: Vec<Vec<f32>> = c
            .outputs
            .iter()
            .map(|o| vec![0.0; tensor_shape(c, o.tensor, extents).iter().product::<u64>() as usize])
            .collect();
        let destinations: Vec<(usize, usize)> =
            outputs.iter_mut().map(|o| (o.as_mut_ptr() as usize, o.len())).collect();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let run_call = |call: &[(RankId, std::ops::Range<u64>)]| -> Result<Vec<Vec<f32>>, CodegenError> {
            let mut sub_extents = extents.to_vec();
            let mut bases = vec![0i64; extents.len()];
            for (r, range) in call {
                sub_extents[r.index()] = range.end - range.start;
                bases[r.index()] = range.start as i64;
            }
            // An input is read in place, a box of a row-major array through its strides (the
            // last position, the only one the kernel takes as contiguous, stays so), unless the
            // layer says the kernel reads it again and again: then its box is made dense.
            let parts: Vec<Option<std::borrow::Cow<[f32]>>> = input_ids
                .iter()
                .zip(inputs)
                .zip(&repeated)
                .map(|((id, data), again)| {
                    again.then(|| slice_box(data, &tensor_shape(c, *id, extents), &boxes(*id, call)))
                })
                .collect();
            let operands: Vec<Operand> = input_ids
                .iter()
                .zip(inputs)
                .zip(&parts)
                .map(|((id, data), part)| {
                    if let Some(part) = part {
                        return Operand { data: part, strides: None };
                    }
                    if data.is_empty() {
                        return Operand { data, strides: None };
                    }
                    let shape = tensor_shape(c, *id, extents);
                    let (strides, offset) = strides_and_offset(&shape, boxes(*id, call).iter().map(|b| b.start));
                    Operand { data: &data[offset..], strides: Some(strides) }
                })
                .collect();
            let windows: Vec<Option<Window>> = c
                .outputs
                .iter()
                .zip(&destinations)
                .map(|(o, (address, len))| {
                    let shape = tensor_shape(c, o.tensor, extents);
                    let (strides, offset) = strides_and_offset(&shape, boxes(o.tensor, call).iter().map(|b| b.start));
                    // SAFETY (of the pointer's use): the calls' boxes of an output are disjoint,
                    // and the kernel writes only inside its box.
                    (*len > 0).then(|| Window { data: (*address as *mut f32).wrapping_add(offset), strides })
                })
                .collect();
            self.run_chunk(&sub_extents, &operands, &windows, &bases, origins)
        };
        type Done = Vec<(usize, Result<Vec<Vec<f32>>, CodegenError>)>;
        let results: Vec<Done> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads.min(calls.len()))
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            // The last tiles first: under a causal mask they are the longest
                            // (they see the most keys), so they start early and the short ones
                            // fill in at the end.
                            let taken = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(k) = calls.len().checked_sub(taken + 1) else { return done };
                            done.push((k, run_call(&calls[k])));
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        for (k, result) in results.into_iter().flatten() {
            let parts = result?;
            for ((output, data), part) in c.outputs.iter().zip(outputs.iter_mut()).zip(parts) {
                if !part.is_empty() {
                    let shape = tensor_shape(c, output.tensor, extents);
                    place_box(data, &shape, &boxes(output.tensor, &calls[k]), &part);
                }
            }
        }
        Ok(outputs)
    }
}

/// An input as one call reads it: `data` starts at the call's first point; `strides` are those
/// of the caller's array when the call reads a box of it in place, `None` when `data` is the
/// call's own dense row-major array.
struct Operand<'d> {
    data: &'d [f32],
    strides: Option<Vec<i64>>,
}

/// An output box written in place: the address of its first point in the caller's array, and the
/// array's strides.
#[derive(Clone)]
struct Window {
    data: *mut f32,
    strides: Vec<i64>,
}

/// The row-major strides of `shape`, and the offset of the point `starts` in it.
fn strides_and_offset(shape: &[u64], starts: impl Iterator<Item = u64>) -> (Vec<i64>, usize) {
    let mut strides = vec![1i64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1] as i64;
    }
    let offset = starts.zip(&strides).map(|(x, s)| x as i64 * s).sum::<i64>();
    (strides, offset as usize)
}

/// `origins` for every rank of `extents` (the ranks a schedule appended start at 0).
fn padded(origins: &[i64], ranks: usize) -> Vec<i64> {
    (0..ranks).map(|r| origins.get(r).copied().unwrap_or(0)).collect()
}

/// The most rows of a batch rank in one chunk of `run_threads`.
pub const CHUNK_ROWS: u64 = 64;

/// The batch ranks besides `batch` that `run_threads` splits one point a call: those of more than
/// one point that lead every input and output holding them (only positions of one point before
/// them), so that a call's slice of each tensor is contiguous.
fn split_points(c: &Cascade, extents: &[u64], batch: RankId) -> Vec<RankId> {
    let tensors: Vec<TensorId> = c.inputs().into_iter().chain(c.outputs.iter().map(|o| o.tensor)).collect();
    let leading = |r: RankId| {
        tensors.iter().all(|t| {
            let ranks = &c.tensor(*t).ranks;
            match ranks.iter().position(|x| *x == r) {
                Some(q) => ranks[..q].iter().all(|x| extents[x.index()] == 1),
                None => true,
            }
        })
    };
    (0..c.ranks.len())
        .map(RankId::new)
        .filter(|r| *r != batch && extents[r.index()] > 1 && is_batch_rank(c, *r) && leading(*r))
        .collect()
}

/// The points of a row-major array of `shape` in `boxes` (a range per position), row-major:
/// borrowed when they are contiguous (every position before the last partial one holds one
/// point of the box), else copied.
fn slice_box<'d>(data: &'d [f32], shape: &[u64], boxes: &[std::ops::Range<u64>]) -> std::borrow::Cow<'d, [f32]> {
    let runs = Runs::new(shape, boxes);
    if runs.count == 1 {
        return std::borrow::Cow::Borrowed(&data[runs.start(0)..runs.start(0) + runs.length]);
    }
    let mut out = Vec::with_capacity(runs.count * runs.length);
    for k in 0..runs.count {
        out.extend_from_slice(&data[runs.start(k)..runs.start(k) + runs.length]);
    }
    std::borrow::Cow::Owned(out)
}

/// Writes `part` (the points of `boxes`, row-major) into a row-major array of `shape`.
fn place_box(data: &mut [f32], shape: &[u64], boxes: &[std::ops::Range<u64>], part: &[f32]) {
    let runs = Runs::new(shape, boxes);
    for k in 0..runs.count {
        let start = runs.start(k);
        data[start..start + runs.length].copy_from_slice(&part[k * runs.length..(k + 1) * runs.length]);
    }
}

/// A box of a row-major array as contiguous runs: the positions after `inner` are whole, so a
/// run covers `inner`'s range and everything after it; the positions before it are walked.
struct Runs<'a> {
    shape: &'a [u64],
    boxes: &'a [std::ops::Range<u64>],
    inner: usize,
    length: usize,
    count: usize,
}

impl<'a> Runs<'a> {
    fn new(shape: &'a [u64], boxes: &'a [std::ops::Range<u64>]) -> Runs<'a> {
        let inner = (0..shape.len()).rev().find(|d| boxes[*d] != (0..shape[*d])).unwrap_or(0);
        let after: u64 = shape[inner.min(shape.len())..].iter().skip(1).product();
        let length = if shape.is_empty() { 1 } else { ((boxes[inner].end - boxes[inner].start) * after) as usize };
        let count = boxes[..inner].iter().map(|b| (b.end - b.start) as usize).product();
        Runs { shape, boxes, inner, length, count }
    }

    /// The offset of run `k`, the positions before `inner` counted row-major.
    fn start(&self, mut k: usize) -> usize {
        let mut offset = 0u64;
        let mut stride: u64 = self.shape[self.inner..].iter().product();
        let mut start = if self.shape.is_empty() {
            0
        } else {
            self.boxes[self.inner].start * (stride / self.shape[self.inner].max(1))
        };
        for d in (0..self.inner).rev() {
            let n = (self.boxes[d].end - self.boxes[d].start) as usize;
            let x = self.boxes[d].start + (k % n) as u64;
            k /= n;
            offset += x * stride;
            stride *= self.shape[d];
        }
        start += offset;
        start as usize
    }
}

/// While alive, the thread's floating-point unit writes a subnormal result as zero (x86-64's
/// flush-to-zero bit of MXCSR); dropped, it restores the state it found. Only the kernel's call
/// runs under it (with the scalar helpers it calls), so that a point gives the same bits in a
/// lane and in a helper. A product of two small normal floats (a running output rescaled by a
/// tiny `exp(M - M')`, a probability near `exp(-87)` times a value) would otherwise be subnormal,
/// and each vector making or reading one costs a microcode assist of about a hundred cycles,
/// which made ALiBi with steep slopes 7% slower than the same kernel without them. `math::exp`
/// already returns 0 where its result would be subnormal, as the GPU's `ex2.approx.ftz` does. A
/// flushed value differs from the interpreter's by less than 1.2e-38; what a kernel computes
/// from it by sums, products and maxima stays that close, but a division by it or its `log` is
/// what they are of 0. Subnormal inputs are read as they are (no denormals-are-zero):
/// `log(1e-40)` stays -92.1. The C wrapper of an ahead-of-time kernel sets the same bit
/// (`cpu::header`).
struct FlushSubnormals {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

impl FlushSubnormals {
    #[cfg(target_arch = "x86_64")]
    fn new() -> FlushSubnormals {
        const FLUSH_TO_ZERO: u32 = 1 << 15;
        let mut saved = 0u32;
        // SAFETY: `stmxcsr` and `ldmxcsr` read and write MXCSR and the 32 bits at the address
        // given, a local; the value loaded sets one flag of the value read.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut saved, options(nostack, preserves_flags));
            let flushing = saved | FLUSH_TO_ZERO;
            std::arch::asm!("ldmxcsr [{}]", in(reg) &flushing, options(nostack, preserves_flags, readonly));
        }
        FlushSubnormals { saved }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn new() -> FlushSubnormals {
        FlushSubnormals {}
    }
}

impl Drop for FlushSubnormals {
    fn drop(&mut self) {
        // SAFETY: restores the MXCSR value read in `new`, from a field of `self`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            std::arch::asm!("ldmxcsr [{}]", in(reg) &self.saved, options(nostack, preserves_flags, readonly));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{place_box, slice_box, strides_and_offset};

    /// The points of a box, one by one, as the definition says.
    fn naive(data: &[f32], shape: &[u64], boxes: &[std::ops::Range<u64>]) -> Vec<f32> {
        let mut out = Vec::new();
        let n: u64 = shape.iter().product();
        for flat in 0..n {
            let mut rest = flat;
            let mut inside = true;
            for d in (0..shape.len()).rev() {
                let x = rest % shape[d];
                rest /= shape[d];
                inside &= boxes[d].contains(&x);
            }
            if inside {
                out.push(data[flat as usize]);
            }
        }
        out
    }

    #[test]
    fn boxes_read_in_place_and_placed_as_defined() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..500 {
            let rank = next(4) as usize;
            let shape: Vec<u64> = (0..rank).map(|_| 1 + next(5)).collect();
            let boxes: Vec<std::ops::Range<u64>> = shape
                .iter()
                .map(|n| {
                    let a = next(*n);
                    a..a + 1 + next(*n - a)
                })
                .collect();
            let data: Vec<f32> = (0..shape.iter().product::<u64>()).map(|x| x as f32).collect();
            let want = naive(&data, &shape, &boxes);
            // The box read in place, through the array's strides from its first point.
            let (strides, offset) = strides_and_offset(&shape, boxes.iter().map(|b| b.start));
            let mut read = Vec::new();
            let points: u64 = boxes.iter().map(|b| b.end - b.start).product();
            for flat in 0..points {
                let (mut rest, mut at) = (flat, offset as i64);
                for d in (0..shape.len()).rev() {
                    let n = boxes[d].end - boxes[d].start;
                    at += (rest % n) as i64 * strides[d];
                    rest /= n;
                }
                read.push(data[at as usize]);
            }
            assert_eq!(read, want, "{shape:?} {boxes:?}");
            assert_eq!(slice_box(&data, &shape, &boxes).as_ref(), want.as_slice(), "{shape:?} {boxes:?}");
            let mut placed = vec![-1.0; data.len()];
            place_box(&mut placed, &shape, &boxes, &want);
            assert_eq!(naive(&placed, &shape, &boxes), want);
            assert_eq!(placed.iter().filter(|x| **x >= 0.0).count(), want.len());
        }
    }
}
