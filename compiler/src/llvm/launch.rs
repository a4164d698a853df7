//! The thread kernels' launch: which ranks the threads split, and the tables and buffer sizes
//! of one call. Shared by the NVPTX kernels, their host emulation and the CUDA launcher, so it
//! needs no LLVM.
//!
//! One thread computes one point of the *batch ranks* (every rank along which the cascade splits
//! into independent parts, see `schedule::layout::is_batch_rank`), the last batch rank fastest. The threads
//! of a block share the point of every batch rank but the last, the *lane rank*: a row of the
//! lane rank takes `ceil(extent / block)` blocks, and the threads of the last one past the
//! row's end are idle (in a kernel with staged reads, see `staging`, they compute the row's last
//! point again, writing the same values, so that every thread meets every barrier). Inputs and
//! outputs keep their global row-major layout; a thread offsets them to its point. Scratch
//! buffers hold one copy per thread, interleaved (element `i` of thread `t` at `i * threads +
//! t`), so that the threads of a warp touch neighbouring addresses.

use crate::ir::*;
use crate::schedule::layout::{is_batch_rank, stored_shape};
use crate::schedule::{BufferRole, LoopProgram};
use crate::shapes::tensor_shape;

use super::staging::StagedRead;
use super::storage::{element_bytes, narrow_bits, storage_types, widen_bits};

/// A call's buffers in host memory: values, and masks (empty for a buffer without one).
pub type HostBuffers = (Vec<HostValues>, Vec<Vec<u8>>);

/// One buffer's elements in host memory, in the type the kernel stores them in (see `storage`).
#[derive(Clone, Debug, PartialEq)]
pub enum HostValues {
    F32(Vec<f32>),
    /// f16 or bf16 elements, as their bits.
    Narrow(Vec<u16>),
}

impl HostValues {
    /// The address of the first element, as the kernels take it.
    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        match self {
            HostValues::F32(v) => v.as_mut_ptr(),
            HostValues::Narrow(v) => v.as_mut_ptr() as *mut f32,
        }
    }
}

/// Threads per block at most; a lane rank shorter than that gets its extent rounded up to a
/// whole warp.
pub const BLOCK: u64 = 128;

/// The threads of a warp.
pub const WARP: u64 = 32;

/// Shared memory per block for staged tiles: what a kernel may use without asking the driver.
pub const SHARED_BYTES: u64 = 48 << 10;

/// The batch ranks of a cascade, in rank order but for the scheduling layer's lane rank
/// (`arrange::lane_rank`), which goes last where it is one: the last is the rank whose
/// neighbouring points the threads of a block compute, so that the queries, not the heads or a
/// group of four query heads, share the staged tiles of keys and values however the source
/// declared its ranks. A split-key chunk kernel keeps its chunks last (a thread per chunk, head
/// and query): there the lane rank would give decode's single query a warp per chunk instead.
pub fn batch_ranks(cascade: &Cascade) -> Vec<RankId> {
    let mut ranks: Vec<RankId> =
        (0..cascade.ranks.len()).map(RankId::new).filter(|r| is_batch_rank(cascade, *r)).collect();
    let chunks = |r: &RankId| cascade.split_pairs().iter().any(|(tile, _, _)| tile == r);
    if !ranks.last().is_some_and(chunks) {
        let lane = crate::schedule::arrange::lane_rank(cascade, 1);
        ranks.sort_by_key(|r| Some(*r) == lane);
    }
    ranks
}

/// Threads per point of a call whose lane rank has `lane_extent` points: where a block would
/// hold so few points that most of its warp would idle (decode's single query row), and the
/// kernel has reductions, a whole warp computes each point, every lane the same values, except
/// that the lanes split the points of each outermost reduction and combine their partial
/// results with butterfly shuffles (`shfl.sync.bfly`).
pub fn lanes_per_point(program: &LoopProgram, lane_extent: u64, warp: u64) -> u64 {
    let reduces = program.cascade.einsums.iter().any(|e| e.body.holds_reduction());
    if reduces && lane_extent <= WARP / 4 {
        warp
    } else {
        1
    }
}

/// The warp of the host emulation: narrower than a GPU's, so that the emulated lanes (an OS
/// thread each) meet at a shuffle at a small cost; the kernels take the width as an argument.
pub const EMULATED_WARP: u64 = 4;

/// Everything a call of a thread kernel passes, for one set of extents.
#[derive(Clone, Debug, PartialEq)]
pub struct ThreadLayout {
    /// Points of the batch ranks.
    pub threads: u64,
    /// The extent of the lane rank (1 without batch ranks).
    pub lane_extent: u64,
    /// Threads per point: 1, or a warp that splits every reduction's points among its lanes
    /// (see `lanes_per_point`).
    pub lanes_per_point: u64,
    pub block: u64,
    pub grid: u64,
    /// Dynamic shared memory per block, for the staged tiles.
    pub shared_bytes: u64,
    /// The extents the body sees: 1 for every batch rank.
    pub local_extents: Vec<i64>,
    /// Every buffer's dimensions, then every buffer's strides, as the body reads them.
    pub dims: Vec<i64>,
    pub strides: Vec<i64>,
    /// The batch ranks' global extents, then per buffer one stride per batch rank and one per
    /// thread, then per staged read (see `staging`) its offset in shared memory in elements (-1
    /// where it does not fit and the threads read global memory) and its box extents, then the
    /// threads per point.
    pub batch: Vec<i64>,
    /// Elements to allocate per buffer (values; a masked buffer has as many mask bytes).
    pub lengths: Vec<u64>,
    /// The number of elements of each input or output as the caller holds it.
    pub global_lengths: Vec<u64>,
}

/// The element strides of a dense row-major array of `shape`.
pub fn row_major(shape: &[u64]) -> Vec<u64> {
    let mut strides = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1].saturating_mul(shape[d + 1]);
    }
    strides
}

impl ThreadLayout {
    /// The layout of a call at `extents` on a GPU; an error when a size overflows or exceeds
    /// `max_bytes`.
    pub fn new(program: &LoopProgram, extents: &[u64], max_bytes: u64) -> Result<ThreadLayout, String> {
        ThreadLayout::with_warp(program, extents, max_bytes, WARP)
    }

    /// The layout of a call with warps of `warp` threads (a power of two, at most `WARP`).
    pub fn with_warp(
        program: &LoopProgram,
        extents: &[u64],
        max_bytes: u64,
        warp: u64,
    ) -> Result<ThreadLayout, String> {
        let c = &program.cascade;
        let batch = batch_ranks(c);
        let mut threads: u64 = 1;
        for r in &batch {
            threads = threads.checked_mul(extents[r.index()]).ok_or("the number of threads overflows")?;
        }
        let mut local = extents.to_vec();
        for r in &batch {
            local[r.index()] = 1;
        }
        let lane_extent = batch.last().map_or(1, |r| extents[r.index()]);
        let lanes = lanes_per_point(program, lane_extent, warp);
        // A block of one point per warp lane, or (with a warp per point) of one point.
        let block = if lanes > 1 { lanes } else { lane_extent.clamp(1, BLOCK).next_multiple_of(WARP) };
        let points_per_block = block / lanes;
        let rows = threads.checked_div(lane_extent).unwrap_or(0);
        let mut layout = ThreadLayout {
            threads,
            lane_extent,
            lanes_per_point: lanes,
            block,
            grid: rows.checked_mul(lane_extent.div_ceil(points_per_block)).ok_or("the number of blocks overflows")?,
            shared_bytes: 0,
            local_extents: local.iter().map(|e| *e as i64).collect(),
            dims: vec![],
            strides: vec![],
            batch: batch.iter().map(|r| extents[r.index()] as i64).collect(),
            lengths: vec![],
            global_lengths: vec![],
        };
        let mut total: u64 = 0;
        let storage = storage_types(program);
        for (buffer, elem) in program.buffers.iter().zip(&storage) {
            let tensor = c.tensor(buffer.tensor);
            let global = tensor_shape(c, buffer.tensor, extents);
            let local_shape = tensor_shape(c, buffer.tensor, &local);
            let count = |shape: &[u64]| shape.iter().try_fold(1u64, |a, n| a.checked_mul(*n));
            layout.dims.extend(local_shape.iter().map(|n| *n as i64));
            let length = match buffer.role {
                BufferRole::Input(_) | BufferRole::Output(_) => {
                    let strides = row_major(&global);
                    layout.strides.extend(strides.iter().map(|s| *s as i64));
                    let mut last: u64 = 0;
                    for r in &batch {
                        let stride: u64 =
                            tensor.ranks.iter().zip(&strides).filter(|(rank, _)| *rank == r).map(|(_, s)| *s).sum();
                        layout.batch.push(stride as i64);
                        last = last.saturating_add(extents[r.index()].saturating_sub(1).saturating_mul(stride));
                    }
                    layout.batch.push(0);
                    let len = count(&global).ok_or("a buffer's size overflows")?;
                    layout.global_lengths.push(len);
                    // Every thread's clamped read of its first element stays inside.
                    len.max(last.saturating_add(1))
                }
                BufferRole::Temp => {
                    // One copy per thread: per point, per lane of its warp.
                    let copies = threads.checked_mul(lanes).ok_or("the number of threads overflows")?;
                    let stored = stored_shape(&local_shape, &buffer.slots);
                    let strides = row_major(&stored);
                    layout.strides.extend(strides.iter().map(|s| s.saturating_mul(copies) as i64));
                    layout.batch.extend(std::iter::repeat_n(0, batch.len()));
                    layout.batch.push(1);
                    layout.global_lengths.push(0);
                    count(&stored).ok_or("a buffer's size overflows")?.max(1).checked_mul(copies).ok_or("overflow")?
                }
            };
            let length = length.max(1);
            let bytes = element_bytes(*elem) + u64::from(buffer.masked);
            total = total.saturating_add(length.saturating_mul(bytes));
            layout.lengths.push(length);
        }
        layout.stage(program, &local);
        layout.batch.push(lanes as i64);
        if total > max_bytes {
            return Err(format!("this call needs {total} bytes of buffers, more than the limit of {max_bytes}"));
        }
        Ok(layout)
    }
}

impl ThreadLayout {
    /// The thread count the kernel takes: the copies of each scratch buffer, one per point and
    /// lane.
    pub fn scratch_copies(&self) -> u64 {
        self.threads * self.lanes_per_point
    }

    /// Places the staged tiles in shared memory (see `place_tiles`) and lists each one's offset
    /// and box in the batch table.
    fn stage(&mut self, program: &LoopProgram, local: &[u64]) {
        let reads = super::staging::staged_reads(program);
        let (offsets, shared_bytes) = place_tiles(&reads, local);
        for (read, offset) in reads.iter().zip(offsets) {
            self.batch.push(offset.map_or(-1, |o| o as i64));
            self.batch.extend(read.box_extents(local).iter().map(|n| *n as i64));
        }
        self.shared_bytes = shared_bytes;
    }

    /// The buffers of a call in host memory: inputs copied in (dense row-major, in the order of
    /// `Cascade::inputs`; f16 and bf16 inputs hold values of their type, which are stored as
    /// their bits), everything else zero; a mask beside every masked buffer.
    pub fn host_buffers(&self, program: &LoopProgram, inputs: &[&[f32]]) -> Result<HostBuffers, String> {
        let c = &program.cascade;
        let mut values = Vec::new();
        let mut masks = Vec::new();
        for ((b, buffer), elem) in program.buffers.iter().enumerate().zip(storage_types(program)) {
            let length = self.lengths[b] as usize;
            let given: &[f32] = match buffer.role {
                BufferRole::Input(i) => inputs.get(i).ok_or_else(|| format!("input {i} is missing"))?,
                _ => &[],
            };
            if matches!(buffer.role, BufferRole::Input(_)) && given.len() as u64 != self.global_lengths[b] {
                return Err(format!(
                    "input `{}` has {} elements, its shape needs {}",
                    c.tensor(buffer.tensor).name,
                    given.len(),
                    self.global_lengths[b]
                ));
            }
            values.push(match elem {
                ElemType::F32 => {
                    let mut data = vec![0.0f32; length];
                    data[..given.len()].copy_from_slice(given);
                    HostValues::F32(data)
                }
                _ => {
                    let mut bits = vec![0u16; length];
                    bits.iter_mut().zip(given).for_each(|(to, x)| *to = narrow_bits(elem, *x));
                    HostValues::Narrow(bits)
                }
            });
            masks.push(if buffer.masked { vec![0u8; length] } else { Vec::new() });
        }
        Ok((values, masks))
    }

    /// The outputs of a call, from its buffers (narrow ones widened to f32, exactly).
    pub fn outputs(&self, program: &LoopProgram, mut values: Vec<HostValues>) -> Vec<Vec<f32>> {
        let mut outputs = vec![Vec::new(); program.cascade.outputs.len()];
        for ((b, buffer), elem) in program.buffers.iter().enumerate().zip(storage_types(program)) {
            if let BufferRole::Output(o) = buffer.role {
                let mut data = match std::mem::replace(&mut values[b], HostValues::F32(Vec::new())) {
                    HostValues::F32(data) => data,
                    HostValues::Narrow(bits) => bits.iter().map(|x| widen_bits(elem, *x)).collect(),
                };
                data.truncate(self.global_lengths[b] as usize);
                outputs[o] = data;
            }
        }
        outputs
    }
}

/// Places the staged tiles of a call at `extents` (batch ranks as 1) in shared memory: each
/// streamed loop's from the start (the loops run one after the other), in order, as many as fit
/// in `SHARED_BYTES`. Returns each tile's offset in floats (`None` where it does not fit), and
/// the bytes the block needs.
fn place_tiles(reads: &[StagedRead], extents: &[u64]) -> (Vec<Option<u64>>, u64) {
    let mut used: Vec<(Index, u64)> = Vec::new();
    let mut offsets = Vec::new();
    for read in reads {
        // Rows padded to a multiple of 4 floats, so that every tile and row starts 16-byte
        // aligned (see `lower::Lowering::stage`).
        let mut padded = read.box_extents(extents);
        if let Some(last) = padded.last_mut() {
            *last = last.saturating_add(3) & !3;
        }
        let elements = padded.iter().try_fold(1u64, |a, n| a.checked_mul(*n)).unwrap_or(u64::MAX);
        let at = match used.iter().position(|(step, _)| *step == read.step) {
            Some(at) => at,
            None => {
                used.push((read.step, 0));
                used.len() - 1
            }
        };
        let offset = used[at].1;
        let fits = elements.checked_add(offset).is_some_and(|end| end.saturating_mul(4) <= SHARED_BYTES);
        if fits {
            used[at].1 = offset + elements;
        }
        offsets.push(fits.then_some(offset));
    }
    (offsets, used.iter().map(|(_, elements)| elements * 4).max().unwrap_or(0))
}

/// Whether every staged tile of `program` fits in shared memory at every call, as `ThreadLayout`
/// places them; `None` where a tile's size depends on a symbolic extent (and so on the call).
pub fn staged_tiles_fit(program: &LoopProgram) -> Option<bool> {
    let c = &program.cascade;
    let reads = super::staging::staged_reads(program);
    let mut extents = vec![0u64; c.ranks.len()];
    for read in &reads {
        for index in read.terms.iter().flat_map(|terms| terms.keys()) {
            let Extent::Fixed(n) = c.rank(index.rank).extent else { return None };
            extents[index.rank.index()] = n;
        }
    }
    let (offsets, _) = place_tiles(&reads, &extents);
    Some(offsets.iter().all(Option::is_some))
}
