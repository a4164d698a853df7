//! LLVM itself (through inkwell, LLVM 14): parsing the lowered text, the O3 pipeline, PTX for
//! NVPTX, and machine code for the host JIT-compiled by MCJIT.
//!
//! Needs: a module from `lower`. Guarantees: PTX text for `sm_80` (PTX ISA 7.5, which the driver
//! compiles forward for newer GPUs), or a callable host function that lives as long as its
//! `HostCode`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use inkwell::attributes::AttributeLoc;
use inkwell::context::Context;
use inkwell::execution_engine::ExecutionEngine;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::module::Module;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple};
use inkwell::OptimizationLevel;

use super::LlvmError;

fn initialize() -> Result<(), LlvmError> {
    static INIT: Once = Once::new();
    static mut NATIVE: Result<(), String> = Ok(());
    INIT.call_once(|| {
        Target::initialize_nvptx(&InitializationConfig::default());
        let native = Target::initialize_native(&InitializationConfig::default());
        // SAFETY: written once, here, before any read (reads happen after `call_once`).
        unsafe { NATIVE = native };
    });
    // SAFETY: `call_once` has returned, so the write above happened before this read.
    #[allow(static_mut_refs)]
    unsafe { NATIVE.clone() }.map_err(LlvmError::Internal)
}

fn parse<'ctx>(context: &'ctx Context, text: &str, name: &str) -> Result<Module<'ctx>, LlvmError> {
    let buffer = MemoryBuffer::create_from_memory_range_copy(text.as_bytes(), name);
    let module = context
        .create_module_from_ir(buffer)
        .map_err(|e| LlvmError::Internal(format!("the lowered module does not parse: {}", e.to_string())))?;
    module.verify().map_err(|e| LlvmError::Internal(format!("the lowered module is invalid: {}", e.to_string())))?;
    Ok(module)
}

fn optimize(module: &Module, machine: &TargetMachine) -> Result<(), LlvmError> {
    module.set_triple(&machine.get_triple());
    module.set_data_layout(&machine.get_target_data().get_data_layout());
    let options = PassBuilderOptions::create();
    // On the GPU, unrolled loops cost registers that the thread kernels cannot spare.
    let gpu = machine.get_triple().as_str().to_string_lossy().starts_with("nvptx");
    options.set_loop_unrolling(!gpu);
    module
        .run_passes("default<O3>", machine, options)
        .map_err(|e| LlvmError::Internal(format!("LLVM's optimizer failed: {}", e.to_string())))
}

/// The NVPTX target machine for `sm`, at PTX ISA 7.5 (LLVM 14's newest).
fn nvptx_machine(sm: &str) -> Result<TargetMachine, LlvmError> {
    initialize()?;
    let triple = TargetTriple::create("nvptx64-nvidia-cuda");
    let target = Target::from_triple(&triple).map_err(|e| LlvmError::Internal(e.to_string()))?;
    target
        .create_target_machine(
            &triple,
            sm,
            "+ptx75",
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| LlvmError::Internal(format!("LLVM cannot target NVPTX {sm}")))
}

/// The host's target machine: its own CPU name and features (AVX-512 where present), code
/// independent of its position and reaching its constants relative to the instruction (the small
/// code model, as a C compiler's objects do). The JIT makes its own machine (see `HostCode`).
fn host_machine() -> Result<TargetMachine, LlvmError> {
    initialize()?;
    let triple = TargetMachine::get_default_triple();
    let target = Target::from_triple(&triple).map_err(|e| LlvmError::Internal(e.to_string()))?;
    let cpu = TargetMachine::get_host_cpu_name().to_string();
    let features = TargetMachine::get_host_cpu_features().to_string();
    target
        .create_target_machine(
            &triple,
            &cpu,
            &features,
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Small,
        )
        .ok_or_else(|| LlvmError::Internal("LLVM cannot target this CPU".into()))
}

/// The module after LLVM's O3 pipeline, as text.
pub fn optimized_ir(text: &str, nvptx: bool) -> Result<String, LlvmError> {
    let context = Context::create();
    let module = parse(&context, text, "kernel")?;
    let machine = if nvptx { nvptx_machine("sm_80")? } else { host_machine()? };
    if !nvptx {
        set_host_attributes(&module);
    }
    optimize(&module, &machine)?;
    Ok(module.print_to_string().to_string())
}

/// PTX for an NVPTX module.
pub fn ptx(text: &str, sm: &str) -> Result<String, LlvmError> {
    let context = Context::create();
    let module = parse(&context, text, "kernel")?;
    let machine = nvptx_machine(sm)?;
    optimize(&module, &machine)?;
    let buffer = machine
        .write_to_memory_buffer(&module, FileType::Assembly)
        .map_err(|e| LlvmError::Internal(format!("NVPTX code generation failed: {}", e.to_string())))?;
    String::from_utf8(buffer.as_slice().to_vec()).map_err(|e| LlvmError::Internal(e.to_string()))
}

/// An object file for the host (the `cpu-llvm` tier ahead of time).
pub fn host_object(text: &str) -> Result<Vec<u8>, LlvmError> {
    let context = Context::create();
    let module = parse(&context, text, "kernel")?;
    let machine = host_machine()?;
    set_host_attributes(&module);
    optimize(&module, &machine)?;
    let buffer = machine
        .write_to_memory_buffer(&module, FileType::Object)
        .map_err(|e| LlvmError::Internal(format!("code generation failed: {}", e.to_string())))?;
    Ok(buffer.as_slice().to_vec())
}

/// Every function compiles for this CPU, whatever CPU the JIT's own machine assumes.
fn set_host_attributes(module: &Module) {
    let context = module.get_context();
    let cpu = TargetMachine::get_host_cpu_name().to_string();
    let features = TargetMachine::get_host_cpu_features().to_string();
    for function in module.get_functions() {
        if function.count_basic_blocks() == 0 {
            continue;
        }
        function.add_attribute(AttributeLoc::Function, context.create_string_attribute("target-cpu", &cpu));
        function.add_attribute(AttributeLoc::Function, context.create_string_attribute("target-features", &features));
    }
}

/// Machine code in this process, JIT-compiled by MCJIT. The engine owns the module; the context
/// is dropped after the engine (field order).
pub struct HostCode {
    _engine: ExecutionEngine<'static>,
    _context: Box<Context>,
    address: usize,
}

impl HostCode {
    /// Compiles `text` for the host and finds `symbol`; `helpers` binds the functions the module
    /// imports.
    pub fn new(text: &str, symbol: &str, helpers: &[(&str, usize)]) -> Result<HostCode, LlvmError> {
        let context = Box::new(Context::create());
        // SAFETY: the context is boxed (it does not move) and `HostCode` drops the engine, which
        // owns everything made in the context, before the context.
        let context_ref: &'static Context = unsafe { &*(context.as_ref() as *const Context) };
        let module = parse(context_ref, text, symbol)?;
        let machine = host_machine()?;
        set_host_attributes(&module);
        optimize(&module, &machine)?;
        let level = OptimizationLevel::Aggressive;
        // The small code model in one arena below 2 GB (see `arena`); where the module is too
        // large to be sure of its arena, or the system has no room below 2 GB, MCJIT's own
        // memory manager and the large code model.
        let failed = Arc::new(AtomicBool::new(false));
        let arena =
            super::arena::reservation(text.len()).and_then(|size| super::arena::Arena::new(size, failed.clone()));
        let engine = match arena {
            Some(arena) => {
                module.create_mcjit_execution_engine_with_memory_manager(arena, level, CodeModel::Small, false, false)
            }
            None => module.create_jit_execution_engine(level),
        }
        .map_err(|e| LlvmError::Internal(format!("the LLVM JIT failed to start: {}", e.to_string())))?;
        for (name, address) in helpers {
            if let Some(function) = module.get_function(name) {
                engine.add_global_mapping(&function, *address);
            }
        }
        let address = engine
            .get_function_address(symbol)
            .map_err(|e| LlvmError::Internal(format!("the JIT has no `{symbol}`: {e}")))?;
        if failed.load(Ordering::Relaxed) {
            return Err(LlvmError::Internal("the JIT could not place or protect its code".into()));
        }
        Ok(HostCode { _engine: engine, _context: context, address })
    }

    pub fn address(&self) -> usize {
        self.address
    }
}
