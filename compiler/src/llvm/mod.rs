//! The LLVM back ends: NVPTX kernels (PTX text and a launch description), their host emulation,
//! and the `cpu-llvm` CPU tier. One lowering (`lower`) serves all three.
//!
//! `lower` and `launch` need no LLVM, so that the CUDA launcher builds without it; everything that
//! calls LLVM is behind the `llvm` cargo feature.

pub mod launch;
pub mod lower;
#[cfg(feature = "llvm")]
pub mod machine;

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

/// The sidecar of a PTX file: what a launcher needs besides the PTX.
pub fn launch_description(program: &LoopProgram, source_file: &str) -> String {
    let c = &program.cascade;
    let batch: Vec<String> = launch::batch_ranks(c).iter().map(|r| format!("\"{}\"", c.rank(*r).name)).collect();
    let inputs: Vec<String> = c.inputs().iter().map(|t| format!("\"{}\"", c.tensor(*t).name)).collect();
    let outputs: Vec<String> = c.outputs.iter().map(|o| format!("\"{}\"", c.tensor(o.tensor).name)).collect();
    let buffers: Vec<String> = program.buffers.iter().map(|b| format!("\"{}\"", c.tensor(b.tensor).name)).collect();
    format!(
        "{{\n  \"kernel\": \"{}\",\n  \"source\": \"{}\",\n  \"entry\": \"{}\",\n  \"block\": [{}, 1, 1],\n  \
         \"grid\": \"ceil(threads / {}) blocks in x; threads = the product of the batch ranks' extents\",\n  \
         \"batch_ranks\": [{}],\n  \"shared_memory_bytes\": 0,\n  \
         \"arguments\": [\"values: float*[buffers]\", \"masks: u8*[buffers]\", \"extents: i64[ranks], batch ranks as 1\", \
         \"dims: i64[positions of all buffers]\", \"strides: i64[positions of all buffers]\", \
         \"batch: i64[batch ranks + buffers * (batch ranks + 1)]\", \"threads: i64\"],\n  \
         \"buffers\": [{}],\n  \"inputs\": [{}],\n  \"outputs\": [{}]\n}}\n",
        c.name,
        source_file.replace('\\', "\\\\").replace('"', "\\\""),
        c.name,
        launch::BLOCK,
        launch::BLOCK,
        batch.join(", "),
        buffers.join(", "),
        inputs.join(", "),
        outputs.join(", ")
    )
}

#[cfg(feature = "llvm")]
mod compiled {
    use super::*;
    use crate::cpu::helpers;

    /// PTX of a cascade's thread kernel for `sm` (`sm_80` unless a test asks for another).
    pub fn compile_ptx(program: &LoopProgram, sm: &str) -> Result<String, LlvmError> {
        machine::ptx(&nvptx_ir(program), sm)
    }

    type ThreadFn =
        unsafe extern "C" fn(*const *mut f32, *const *mut u8, *const i64, *const i64, *const i64, *const i64, i64, i64);

    /// A thread kernel compiled for the host, the grid run as loops: how CI checks the GPU
    /// kernels' logic without a GPU.
    pub struct EmulatedKernel {
        program: LoopProgram,
        function: ThreadFn,
        _code: machine::HostCode,
    }

    // SAFETY: the machine code is immutable once compiled and reads only the buffers of a call.
    unsafe impl Send for EmulatedKernel {}
    unsafe impl Sync for EmulatedKernel {}

    impl EmulatedKernel {
        pub fn new(program: &LoopProgram) -> Result<EmulatedKernel, LlvmError> {
            let symbol = format!("einfuse_emulated_{}", program.cascade.name);
            let text = lower::lower(program, Flavor::Host, Abi::Thread, &symbol);
            let helpers: Vec<(&str, usize)> = helpers::symbols().iter().map(|(n, p)| (*n, *p as usize)).collect();
            let code = machine::HostCode::new(&text, &symbol, &helpers)?;
            // SAFETY: the symbol was defined with this signature.
            let function: ThreadFn = unsafe { std::mem::transmute::<usize, ThreadFn>(code.address()) };
            Ok(EmulatedKernel { program: program.clone(), function, _code: code })
        }

        /// Runs the kernel as the GPU would, one emulated thread after another.
        pub fn run(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, LlvmError> {
            let layout = launch::ThreadLayout::new(&self.program, extents, crate::cpu::MAX_CALL_BYTES)
                .map_err(LlvmError::Run)?;
            let (mut values, mut masks) = layout.host_buffers(&self.program, inputs).map_err(LlvmError::Run)?;
            let value_pointers: Vec<*mut f32> = values.iter_mut().map(|v| v.as_mut_ptr()).collect();
            let mask_pointers: Vec<*mut u8> =
                masks.iter_mut().map(|m| if m.is_empty() { std::ptr::null_mut() } else { m.as_mut_ptr() }).collect();
            if layout.threads > 0 {
                // SAFETY: the tables have one entry per buffer (rank, position), and every buffer
                // holds what `ThreadLayout` says the threads address.
                unsafe {
                    (self.function)(
                        value_pointers.as_ptr(),
                        mask_pointers.as_ptr(),
                        layout.local_extents.as_ptr(),
                        layout.dims.as_ptr(),
                        layout.strides.as_ptr(),
                        layout.batch.as_ptr(),
                        layout.threads as i64,
                        layout.block as i64,
                    )
                };
            }
            Ok(layout.outputs(&self.program, values))
        }
    }
}

#[cfg(feature = "llvm")]
pub use compiled::*;
