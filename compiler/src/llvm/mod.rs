//! The LLVM back ends: NVPTX kernels (PTX text and a launch description), their host emulation,
//! and the `cpu-llvm` CPU tier. One lowering (`lower`) serves all three.
//!
//! `lower` and `launch` need no LLVM, so that the CUDA launcher builds without it; everything that
//! calls LLVM is behind the `llvm` cargo feature.

pub mod arena;
pub mod launch;
pub mod lower;
#[cfg(feature = "llvm")]
pub mod machine;
pub mod registers;
pub mod staging;
pub mod storage;
pub mod tensor_cores;
#[cfg(feature = "llvm")]
pub mod warp_emulator;

use crate::ir::Expr;
use crate::schedule::LoopProgram;
pub use lower::{Abi, Flavor};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlvmError {
    #[error("internal error in the LLVM back end: {0}")]
    Internal(String),
    #[error("{0}")]
    Run(String),
}

/// The GPU architectures every kernel's PTX is checked against (`ptxas -arch`).
pub const CHECKED_ARCHITECTURES: [&str; 2] = ["sm_80", "sm_90"];

/// The LLVM IR text of a thread kernel for NVPTX (`einfuse emit --stage llvm`).
pub fn nvptx_ir(program: &LoopProgram) -> String {
    lower::lower(program, Flavor::Nvptx, Abi::Thread, &program.cascade.name)
}

/// The LLVM IR text of a `cpu-llvm` kernel, exported as `symbol`.
pub fn host_ir(program: &LoopProgram, symbol: &str) -> String {
    lower::lower(program, Flavor::Host, Abi::Cpu, symbol)
}

/// Compiles a scheduled cascade through LLVM for this CPU (the `cpu-llvm` tier): the same
/// calling convention and runtime as the Cranelift kernels (`host`), LLVM's O3 pipeline and vectorizer.
#[cfg(feature = "llvm")]
pub fn compile_host(program: &LoopProgram) -> Result<crate::host::CpuKernel, crate::host::CodegenError> {
    let symbol = crate::host::object_symbol(&program.cascade);
    let text = host_ir(program, &symbol);
    let helpers: Vec<(&str, usize)> = crate::helpers::symbols().iter().map(|(n, p)| (*n, *p as usize)).collect();
    let code = machine::HostCode::new(&text, &symbol, &helpers)
        .map_err(|e| crate::host::CodegenError::Internal(e.to_string()))?;
    // SAFETY: the symbol was defined with the kernel signature (six pointers, no result).
    let function: crate::host::KernelFn =
        unsafe { std::mem::transmute::<usize, crate::host::KernelFn>(code.address()) };
    Ok(crate::host::CpuKernel::new(program, function, Box::new(code), text))
}

/// An object file of the `cpu-llvm` tier, exporting `host::object_symbol` like `cpu::compile_object`.
#[cfg(feature = "llvm")]
pub fn compile_object(program: &LoopProgram) -> Result<Vec<u8>, crate::host::CodegenError> {
    let text = host_ir(program, &crate::host::object_symbol(&program.cascade));
    machine::host_object(&text).map_err(|e| crate::host::CodegenError::Internal(e.to_string()))
}

/// The sidecar of a PTX file: what a launcher needs besides the PTX.
#[derive(Debug, serde::Serialize)]
pub struct LaunchDescription {
    pub kernel: String,
    pub source: String,
    pub entry: String,
    pub block: String,
    pub grid: String,
    pub batch_ranks: Vec<String>,
    pub lane_rank: Option<String>,
    /// The split ranks, as `M0 = 64`: the tile the optimizer chose (see `optimize_for_gpu`).
    pub tiles: Vec<String>,
    pub staged_reads: Vec<String>,
    pub register_buffers: Vec<String>,
    pub shared_memory_bytes: String,
    pub arguments: Vec<&'static str>,
    pub buffers: Vec<String>,
    pub storage: Vec<String>,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// The launch description of a thread kernel, as JSON (`einfuse compile --target nvptx`).
pub fn launch_description(program: &LoopProgram, source_file: &str) -> String {
    let description = describe_launch(program, source_file);
    serde_json::to_string_pretty(&description).expect("plain data serializes") + "\n"
}

/// What a launcher needs to know of a thread kernel besides its PTX.
pub fn describe_launch(program: &LoopProgram, source_file: &str) -> LaunchDescription {
    let c = &program.cascade;
    let names = |ids: &mut dyn Iterator<Item = crate::ir::TensorId>| ids.map(|t| c.tensor(t).name.clone()).collect();
    let batch: Vec<String> = launch::batch_ranks(c).iter().map(|r| c.rank(*r).name.clone()).collect();
    LaunchDescription {
        kernel: c.name.clone(),
        source: source_file.to_string(),
        entry: c.name.clone(),
        block: format!(
            "min({}, the lane rank's extent rounded up to a multiple of {}) threads in x; a warp (one point) where \
             the lane rank has at most 8 points and the kernel reduces",
            launch::BLOCK,
            launch::WARP
        ),
        grid: "(the product of the other batch ranks' extents) * ceil(lane extent / points per block) blocks in x"
            .into(),
        lane_rank: batch.last().cloned(),
        batch_ranks: batch,
        tiles: c
            .split_pairs()
            .iter()
            .map(|(_, inner, _)| match c.rank(*inner).extent {
                crate::ir::Extent::Fixed(n) => format!("{} = {n}", c.rank(*inner).name),
                _ => c.rank(*inner).name.clone(),
            })
            .collect(),
        staged_reads: staging::staged_reads(program)
            .iter()
            .map(|r| crate::print::print_expr(c, &Expr::Access { tensor: r.tensor, subscripts: r.subscripts.clone() }))
            .collect(),
        register_buffers: names(
            &mut registers::register_buffers(program).iter().zip(&program.buffers).filter(|(r, _)| **r).map(|(_, b)| b.tensor),
        ),
        shared_memory_bytes: format!(
            "dynamic, per call: the staged tiles that fit in {} bytes (see ThreadLayout)",
            launch::SHARED_BYTES
        ),
        arguments: vec![
            "values: pointer[buffers], each to elements of its storage type",
            "masks: u8*[buffers]",
            "extents: i64[ranks], batch ranks as 1",
            "dims: i64[positions of all buffers]",
            "strides: i64[positions of all buffers]",
            "batch: i64[batch ranks + buffers * (batch ranks + 1) + per staged read: shared offset or -1, box extents; threads per point]",
            "threads: i64 (points times threads per point)",
        ],
        buffers: names(&mut program.buffers.iter().map(|b| b.tensor)),
        storage: storage::storage_types(program).iter().map(|elem| elem.to_string()).collect(),
        inputs: names(&mut c.inputs().into_iter()),
        outputs: names(&mut c.outputs.iter().map(|o| o.tensor)),
    }
}

#[cfg(feature = "llvm")]
mod compiled {
    use super::*;
    use crate::helpers;

    /// PTX of a cascade's thread kernel for `sm` (`sm_80` unless a test asks for another).
    pub fn compile_ptx(program: &LoopProgram, sm: &str) -> Result<String, LlvmError> {
        machine::ptx(&nvptx_ir(program), sm)
    }

    /// PTX of a program's tensor-core kernel (see `tensor_cores`) for `sm`, or why it has none.
    pub fn tensor_core_ptx(program: &LoopProgram, sm: &str) -> Result<String, String> {
        let plan = crate::schedule::tensor_cores::plan(program)?;
        let text = tensor_cores::lower(program, &plan, Flavor::Nvptx, &program.cascade.name)?;
        machine::ptx(&text, sm).map_err(|e| e.to_string())
    }

    /// One thread of the emulated grid: the tables, the thread count, then the block, the
    /// thread in it, the block size, the block's shared memory and its barrier.
    type ThreadFn = unsafe extern "C" fn(
        *const *mut f32,
        *const *mut u8,
        *const i64,
        *const i64,
        *const i64,
        *const i64,
        i64,
        i64,
        i64,
        i64,
        *mut f32,
        *const u8,
    );

    /// The barrier of an emulated block, which the kernels call as `einfuse_barrier`, and the
    /// slots through which its threads exchange values in `einfuse_shuffle_xor`.
    pub(crate) struct BlockBarrier {
        /// Threads still to arrive, and the generation (how many times the barrier opened).
        state: std::sync::Mutex<(u64, u64)>,
        opened: std::sync::Condvar,
        threads: u64,
        slots: Vec<std::sync::atomic::AtomicU32>,
    }

    impl BlockBarrier {
        pub(crate) fn new(threads: u64) -> BlockBarrier {
            BlockBarrier {
                state: std::sync::Mutex::new((threads, 0)),
                opened: std::sync::Condvar::new(),
                threads,
                slots: (0..threads).map(|_| std::sync::atomic::AtomicU32::new(0)).collect(),
            }
        }

        /// `shfl.sync.bfly`: the value of the thread `distance` lanes away (in xor). The block is
        /// one warp, whose every thread shuffles at the same point of the kernel.
        fn shuffle_xor(&self, value: f32, tid: usize, distance: usize) -> f32 {
            use std::sync::atomic::Ordering::Relaxed;
            self.slots[tid].store(value.to_bits(), Relaxed);
            self.wait();
            let other = f32::from_bits(self.slots[tid ^ distance].load(Relaxed));
            self.wait();
            other
        }

        pub(crate) fn wait(&self) {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let generation = state.1;
            state.0 -= 1;
            if state.0 == 0 {
                *state = (self.threads, generation + 1);
                self.opened.notify_all();
                return;
            }
            let limit = std::time::Duration::from_secs(120);
            let (state, timeout) =
                self.opened.wait_timeout_while(state, limit, |s| s.1 == generation).unwrap_or_else(|e| e.into_inner());
            if timeout.timed_out() && state.1 == generation {
                // A thread that never arrives is a kernel bug that would hang the GPU too.
                eprintln!("einfuse: an emulated block waited {limit:?} at a barrier that not every thread reached");
                std::process::abort();
            }
        }
    }

    extern "C" fn einfuse_barrier(sync: *const u8) {
        // SAFETY: the kernels pass on the pointer the emulator gave them, a live `BlockBarrier`.
        unsafe { (*(sync as *const BlockBarrier)).wait() }
    }

    extern "C" fn einfuse_shuffle_xor(sync: *const u8, value: f32, tid: i64, distance: i64) -> f32 {
        // SAFETY: as for `einfuse_barrier`; the thread and its partner are threads of the block.
        unsafe { (*(sync as *const BlockBarrier)).shuffle_xor(value, tid as usize, distance as usize) }
    }

    /// A thread kernel compiled for the host, the grid run as loops: how CI checks the GPU
    /// kernels' logic without a GPU.
    pub struct EmulatedKernel {
        program: LoopProgram,
        function: ThreadFn,
        /// Whether the kernel stages tiles in shared memory, and so has barriers.
        staged: bool,
        _code: machine::HostCode,
    }

    // SAFETY: the machine code is immutable once compiled and reads only the buffers of a call.
    unsafe impl Send for EmulatedKernel {}
    unsafe impl Sync for EmulatedKernel {}

    impl EmulatedKernel {
        pub fn new(program: &LoopProgram) -> Result<EmulatedKernel, LlvmError> {
            let symbol = format!("einfuse_emulated_{}", program.cascade.name);
            let text = lower::lower(program, Flavor::Host, Abi::Thread, &symbol);
            let mut helpers: Vec<(&str, usize)> = helpers::symbols().iter().map(|(n, p)| (*n, *p as usize)).collect();
            helpers.push(("einfuse_barrier", einfuse_barrier as *const () as usize));
            helpers.push(("einfuse_shuffle_xor", einfuse_shuffle_xor as *const () as usize));
            let code = machine::HostCode::new(&text, &symbol, &helpers)?;
            // SAFETY: the symbol was defined with this signature.
            let function: ThreadFn = unsafe { std::mem::transmute::<usize, ThreadFn>(code.address()) };
            let staged = !staging::staged_reads(program).is_empty();
            Ok(EmulatedKernel { program: program.clone(), function, staged, _code: code })
        }

        /// Runs the kernel as the GPU would: block after block; the threads of a block one after
        /// another, or, where the kernel stages tiles in shared memory or a warp computes each
        /// point, side by side (an OS thread each), meeting at its barriers and shuffles.
        pub fn run(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, LlvmError> {
            let max = crate::host::MAX_CALL_BYTES;
            let layout = launch::ThreadLayout::with_warp(&self.program, extents, max, launch::EMULATED_WARP)
                .map_err(LlvmError::Run)?;
            let (mut values, mut masks) = layout.host_buffers(&self.program, inputs).map_err(LlvmError::Run)?;
            let value_pointers: Vec<*mut f32> = values.iter_mut().map(|v| v.as_mut_ptr()).collect();
            let mask_pointers: Vec<*mut u8> =
                masks.iter_mut().map(|m| if m.is_empty() { std::ptr::null_mut() } else { m.as_mut_ptr() }).collect();
            if layout.threads > 0 {
                let tables = Tables {
                    values: value_pointers.as_ptr(),
                    masks: mask_pointers.as_ptr(),
                    extents: layout.local_extents.as_ptr(),
                    dims: layout.dims.as_ptr(),
                    strides: layout.strides.as_ptr(),
                    batch: layout.batch.as_ptr(),
                };
                let together = self.staged || layout.lanes_per_point > 1;
                for block in 0..layout.grid as i64 {
                    if together {
                        self.run_block_together(&layout, &tables, block);
                    } else {
                        for tid in 0..layout.block as i64 {
                            // SAFETY: as for `call`; this kernel has no barrier.
                            unsafe { self.call(&layout, &tables, block, tid, std::ptr::null_mut(), std::ptr::null()) };
                        }
                    }
                }
            }
            Ok(layout.outputs(&self.program, values))
        }

        /// One block, its threads side by side, sharing the block's shared memory and barrier.
        fn run_block_together(&self, layout: &launch::ThreadLayout, tables: &Tables, block: i64) {
            let mut shared = vec![0f32; (layout.shared_bytes / 4).max(1) as usize];
            let shared = SharedPointer(shared.as_mut_ptr());
            let barrier = BlockBarrier::new(layout.block);
            std::thread::scope(|scope| {
                for tid in 0..layout.block as i64 {
                    let (shared, barrier) = (&shared, &barrier);
                    scope.spawn(move || {
                        let sync = barrier as *const BlockBarrier as *const u8;
                        // SAFETY: as for `call`; the threads of the block write the shared memory
                        // only between the kernel's barriers, each its own elements.
                        unsafe { self.call(layout, tables, block, tid, shared.0, sync) };
                    });
                }
            });
        }

        /// Runs thread `tid` of `block`.
        ///
        /// # Safety
        /// The tables must have one entry per buffer (rank, position) and every buffer hold what
        /// `ThreadLayout` says the threads address; `shared` must hold the layout's shared bytes
        /// and `sync` be a `BlockBarrier` for the block's threads, where the kernel has barriers.
        unsafe fn call(
            &self,
            layout: &launch::ThreadLayout,
            tables: &Tables,
            block: i64,
            tid: i64,
            shared: *mut f32,
            sync: *const u8,
        ) {
            (self.function)(
                tables.values,
                tables.masks,
                tables.extents,
                tables.dims,
                tables.strides,
                tables.batch,
                layout.scratch_copies() as i64,
                block,
                tid,
                layout.block as i64,
                shared,
                sync,
            )
        }
    }

    /// The tables of one call, as the kernel takes them.
    struct Tables {
        values: *const *mut f32,
        masks: *const *mut u8,
        extents: *const i64,
        dims: *const i64,
        strides: *const i64,
        batch: *const i64,
    }

    // SAFETY: the tables are read only, and outlive every thread of a call (scoped threads).
    unsafe impl Sync for Tables {}

    struct SharedPointer(*mut f32);

    // SAFETY: the threads of a block synchronize their use of shared memory at the barriers.
    unsafe impl Sync for SharedPointer {}
}

#[cfg(feature = "llvm")]
pub use compiled::*;
