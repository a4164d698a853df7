//! Running a compiled host kernel: the buffers of one call, the chunks of a batch rank on
//! several threads, and the calling convention both CPU tiers share.
//!
//! Needs: a `LoopProgram` and the address of a function compiled from it with the kernel
//! signature (Cranelift's `cpu::compile` or LLVM's `llvm::compile_host`). Guarantees: `run` and
//! `run_threads` allocate every buffer the schedule asks for, check inputs and sizes before
//! calling, and return the outputs dense and row-major; neither back end knows of the other.

use crate::ir::*;
use crate::schedule::layout::{batch_rank, derived_extents, stored_shape};
use crate::schedule::{BufferRole, LoopProgram};
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

/// The signature of every host kernel: values, masks, extents, dimensions, strides, bases.
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
        self.scratch_bytes(&chunk) * (threads as u64).min(total.div_ceil(rows))
    }

    /// Runs the kernel. `inputs` are dense row-major f32 arrays in the order of
    /// `Cascade::inputs`, already checked against `extents`; returns the outputs likewise.
    pub fn run(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, CodegenError> {
        let extents = &derived_extents(&self.program.cascade, extents);
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
        let extents = &derived_extents(&self.program.cascade, extents);
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
