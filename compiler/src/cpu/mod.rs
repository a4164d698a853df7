//! The Cranelift CPU back end: a scheduled cascade to machine code, JIT-compiled in-process.
//!
//! Needs: a `LoopProgram` (see `schedule`). Guarantees: a `CpuKernel` whose `run` gives the
//! interpreter's outputs within f32 rounding, for any extents. This first version emits scalar
//! f32 code that follows the schedule literally; it is the unfused baseline, and the fused,
//! vectorised schedules are tested against it and the interpreter alike.

mod codegen;
mod empty_steps;
pub mod full_steps;
pub mod header;
mod induction;
mod vector;

pub use crate::host::{object_symbol, CodegenError, CpuKernel, KernelFn, MAX_CALL_BYTES};
pub use vector::{LANES, TIER};

use cranelift_codegen::ir::{types, AbiParam, InstBuilder, UserFuncName};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};

use crate::helpers;
use crate::schedule::LoopProgram;

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
        let full_steps = crate::schedule::full_steps::plan(program);
        let mut b = FunctionBuilder::new(&mut context.func, &mut builder_context);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let params: [cranelift_codegen::ir::Value; 6] = b.block_params(entry).try_into().expect("six parameters");
        let mut g = codegen::Gen {
            b,
            program,
            helpers,
            values: vec![],
            masks: vec![],
            extents: vec![],
            bases: vec![],
            array_bases: vec![],
            dims: vec![],
            strides: vec![],
            env: vec![],
            flags: cranelift_codegen::ir::MemFlagsData::trusted(),
            planned: vec![],
            cell: 0,
            full_steps: full_steps.as_ref(),
            reduced: None,
            positions: None,
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
    Ok(CpuKernel::new(program, function, Box::new(module), clif))
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

/// The f32 type, for tests of the helper signatures.
pub const F32: cranelift_codegen::ir::Type = types::F32;
