//! einfuse: a compiler for cascades of extended Einsums, the language of attention and its
//! variants.
//!
//! This facade ties the crates together: `dsl` (the `.ein` front end), `compiler` (the Cascade
//! IR, its checker, printer and reference interpreter) and `runtime` (tensors and `.npy` files).
//!
//! ```
//! use einfuse::{Program, RunOptions, Target};
//!
//! let program = Program::from_source("demo.ein", "
//!     kernel dot {
//!       rank K
//!       input A[K], B[K]
//!       Y[] = A[k] * B[k]
//!       output Y
//!     }
//! ").unwrap();
//! let kernel = program.kernel(None).unwrap();
//! let mut options = RunOptions::default();
//! options.inputs.push(("A".into(), einfuse::Tensor::new(einfuse::DType::F32, vec![3], vec![1.0, 2.0, 3.0]).unwrap()));
//! options.inputs.push(("B".into(), einfuse::Tensor::new(einfuse::DType::F32, vec![3], vec![4.0, 5.0, 6.0]).unwrap()));
//! let outputs = einfuse::run(kernel, Target::Interp, &options).unwrap();
//! assert_eq!(outputs[0].1.data(), &[32.0]);
//! ```

use std::path::Path;

pub mod gallery;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "cuda")]
pub mod gpu_check;
mod jit;
pub mod pipeline;
pub mod text;

pub use jit::{compile, compile_file, compile_named, CallOptions, CompileOptions, Compiled, Kernel, Port};
pub use pipeline::{build, build_source, BuildOptions, Built, Executable, Stage, Timings};

// The README's Rust example is compiled and run as a doc test.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub use einfuse_compiler as compiler;
pub use einfuse_dsl as dsl;
pub use einfuse_runtime as runtime;

use compiler::interp::InterpError;
use compiler::ir::{Cascade, ElemType, TensorKind};
use compiler::shapes::{bind_extents, tensor_shape, ShapeError};
pub use runtime::{DType, Tensor};

/// A user-facing failure: what went wrong, already worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Rendered diagnostics for a source file.
    #[error("{rendered}")]
    Source { rendered: String, count: usize },
    #[error("{0}")]
    Shape(#[from] ShapeError),
    #[error("{0}")]
    Interp(#[from] InterpError),
    #[error("{0}")]
    Npy(#[from] runtime::npy::NpyError),
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Optimize(#[from] compiler::optimize::OptimizeError),
    #[error("{0}")]
    Schedule(#[from] compiler::schedule::ScheduleError),
    #[error("{0}")]
    Codegen(#[from] compiler::cpu::CodegenError),
    #[error("{0}")]
    Llvm(#[from] compiler::llvm::LlvmError),
    #[error(
        "output `{tensor}` has a non-finite value ({value}) at {coordinates:?}; {count} element(s) are not finite \
         (an exponential may have overflowed)"
    )]
    NonFinite { tensor: String, coordinates: Vec<usize>, value: f32, count: usize },
}

impl Error {
    /// The message the command line prints (and the Python package raises): rendered
    /// diagnostics and their count for source errors, `error: ` and the message otherwise.
    pub fn report(&self) -> String {
        match self {
            Error::Source { rendered, count } => format!("{rendered}error: {count} error(s) found"),
            other => format!("error: {other}"),
        }
    }
}

/// Optimizes a kernel with the default options.
pub fn optimize(cascade: &Cascade) -> Result<compiler::optimize::Optimized, Error> {
    Ok(compiler::optimize::optimize(cascade, &compiler::optimize::OptimizeOptions::default())?)
}

/// Optimizes a kernel, the split ranks it creates in tiles of `tile` (the default is 64).
pub fn optimize_tiled(cascade: &Cascade, tile: u64) -> Result<compiler::optimize::Optimized, Error> {
    if tile == 0 {
        return Err(Error::Usage("a tile holds at least one point".into()));
    }
    let options = compiler::optimize::OptimizeOptions { tile, ..Default::default() };
    Ok(compiler::optimize::optimize(cascade, &options)?)
}

/// The smaller tile sizes `optimize_for_gpu` tries, largest first.
pub const SMALLER_GPU_TILES: [u64; 2] = [32, 16];

/// Optimizes a kernel for the GPU: tiles of 64 points for the split ranks the optimizer creates;
/// but where the kernel keeps register buffers (`compiler::llvm::registers`), which a step uses
/// only when all its staged tiles are in shared memory, and they do not all fit at 64, the
/// largest of `SMALLER_GPU_TILES` at which they do (a head dimension of 128 needs 32). A kernel
/// whose tiles fit at none, or whose tile sizes depend on a symbolic extent, gets 64.
pub fn optimize_for_gpu(cascade: &Cascade) -> Result<compiler::optimize::Optimized, Error> {
    use compiler::llvm::{launch::staged_tiles_fit, registers::register_buffers};
    let optimized = optimize_tiled(cascade, 64)?;
    let program = compiler::schedule::schedule(&optimized.cascade)?;
    if staged_tiles_fit(&program) != Some(false) || !register_buffers(&program).contains(&true) {
        return Ok(optimized);
    }
    for tile in SMALLER_GPU_TILES {
        let smaller = optimize_tiled(cascade, tile)?;
        if staged_tiles_fit(&compiler::schedule::schedule(&smaller.cascade)?) == Some(true) {
            return Ok(smaller);
        }
    }
    Ok(optimized)
}

/// Optimizes a kernel for its tensor-core kernel (`compiler::schedule::tensor_cores`): key tiles
/// of 64, or the largest of `SMALLER_GPU_TILES` at which the plan's tiles fit in shared memory (a
/// head dimension of 128 needs 32); with none, 64 (the plan then says why it has none).
pub fn optimize_for_tensor_cores(cascade: &Cascade) -> Result<compiler::schedule::LoopProgram, Error> {
    use compiler::schedule::{schedule_streamed, tensor_cores::plan};
    let first = schedule_streamed(&optimize_tiled(cascade, 64)?.cascade)?;
    if plan(&first).is_ok() {
        return Ok(first);
    }
    for tile in SMALLER_GPU_TILES {
        let smaller = schedule_streamed(&optimize_tiled(cascade, tile)?.cascade)?;
        if plan(&smaller).is_ok() {
            return Ok(smaller);
        }
    }
    Ok(first)
}

/// Optimizes a kernel to run on `target`, the split ranks the optimizer creates in tiles of
/// `tile` points; without one, what `optimize_for_host` or `optimize_for_gpu` chooses.
pub fn optimize_for_target(
    cascade: &Cascade,
    target: Target,
    tile: Option<u64>,
) -> Result<compiler::optimize::Optimized, Error> {
    match tile {
        None if matches!(target, Target::Gpu | Target::GpuEmulated) => optimize_for_gpu(cascade),
        None if matches!(target, Target::Cpu | Target::CpuLlvm) => {
            optimize_for_host(cascade, pipeline::host_tier(target))
        }
        tile => optimize_tiled(cascade, tile.unwrap_or(64)),
    }
}

/// Optimizes a kernel for a host tier: key tiles of the tier's size (`layout::host_tile`), or the
/// longer tile the scheduling layer asks for where a step's runs of keys are too short to stream
/// (`layout::longer_host_tile`).
pub fn optimize_for_host(
    cascade: &Cascade,
    tier: compiler::schedule::HostTier,
) -> Result<compiler::optimize::Optimized, Error> {
    let optimized = optimize_tiled(cascade, compiler::schedule::layout::host_tile(tier))?;
    let program = compiler::schedule::schedule(&optimized.cascade)?;
    match compiler::schedule::layout::longer_host_tile(&program) {
        Some(tile) => optimize_tiled(cascade, tile),
        None => Ok(optimized),
    }
}

/// A checked source file: its text and its kernels.
pub struct Program {
    pub path: String,
    pub source: String,
    pub kernels: Vec<Cascade>,
}

impl Program {
    /// Parses and checks `source`; errors are rendered with `path`.
    pub fn from_source(path: &str, source: &str) -> Result<Program, Error> {
        match compiler::compile_source(source) {
            Ok(kernels) => Ok(Program { path: path.to_string(), source: source.to_string(), kernels }),
            Err(diagnostics) => Err(Error::Source {
                rendered: dsl::diagnostic::render_all(&diagnostics, path, source),
                count: diagnostics.len(),
            }),
        }
    }

    /// Reads, parses and checks a file.
    pub fn from_file(path: &Path) -> Result<Program, Error> {
        let source = read_source(path)?;
        Program::from_source(&path.display().to_string(), &source)
    }

    /// The kernel named `name`, or the only kernel when `name` is `None`.
    pub fn kernel(&self, name: Option<&str>) -> Result<&Cascade, Error> {
        match name {
            Some(name) => self.kernels.iter().find(|k| k.name == name).ok_or_else(|| {
                Error::Usage(format!("{} has no kernel `{name}` (it has: {})", self.path, self.kernel_names()))
            }),
            None => match &self.kernels[..] {
                [one] => Ok(one),
                [] => Err(Error::Usage(format!("{} has no kernels", self.path))),
                _ => Err(Error::Usage(format!(
                    "{} has several kernels ({}): choose one with --kernel",
                    self.path,
                    self.kernel_names()
                ))),
            },
        }
    }

    /// The kernels selected by an optional name: all of them, or the one named.
    pub fn selected(&self, name: Option<&str>) -> Result<Vec<&Cascade>, Error> {
        match name {
            Some(_) => Ok(vec![self.kernel(name)?]),
            None => Ok(self.kernels.iter().collect()),
        }
    }

    fn kernel_names(&self) -> String {
        self.kernels.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// Reads a source file, refusing files that are not text or are unreasonably large.
pub fn read_source(path: &Path) -> Result<String, Error> {
    const MAX_SOURCE_BYTES: u64 = 16 << 20;
    let io = |source| Error::Io { path: path.display().to_string(), source };
    let size = std::fs::metadata(path).map_err(io)?.len();
    if size > MAX_SOURCE_BYTES {
        return Err(Error::Usage(format!("{}: source file is larger than {MAX_SOURCE_BYTES} bytes", path.display())));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    String::from_utf8(bytes).map_err(|_| Error::Usage(format!("{}: source is not UTF-8 text", path.display())))
}

/// Where a kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The reference interpreter (f64, slow, the definition of meaning).
    Interp,
    /// Machine code from the Cranelift back end, JIT-compiled (f32).
    Cpu,
    /// Machine code from LLVM for this CPU (the `cpu-llvm` tier; needs the `llvm` feature).
    CpuLlvm,
    /// The GPU kernel, compiled for the host and run thread by thread (needs `llvm`).
    GpuEmulated,
    /// The GPU kernel on GPU 0 through the CUDA driver (needs `llvm` and `cuda`, and a driver).
    Gpu,
}

impl Target {
    /// The name the command line uses (`--target`).
    pub fn name(self) -> &'static str {
        match self {
            Target::Interp => "interp",
            Target::Cpu => "cpu",
            Target::CpuLlvm => "cpu-llvm",
            Target::GpuEmulated => "gpu-emu",
            Target::Gpu => "gpu",
        }
    }
}

impl Target {
    /// Every target, in the order of `--target`'s help.
    pub const ALL: [Target; 5] = [Target::Interp, Target::Cpu, Target::CpuLlvm, Target::GpuEmulated, Target::Gpu];
}

impl std::str::FromStr for Target {
    type Err = Error;

    /// A target by its command-line name.
    fn from_str(name: &str) -> Result<Target, Error> {
        Target::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Target::ALL.iter().map(|t| t.name()).collect();
            Error::Usage(format!("no target `{name}` (there are: {})", names.join(", ")))
        })
    }
}

/// What a run needs beyond the kernel.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Extents of symbolic ranks (`M=128`), in addition to those the inputs give.
    pub bindings: Vec<(String, u64)>,
    /// Param overrides.
    pub params: Vec<(String, f64)>,
    /// Inputs by name; any input not given is random (uniform in [-1, 1)) from `seed`.
    pub inputs: Vec<(String, Tensor)>,
    pub seed: u64,
    /// Fail with `Error::NonFinite`, naming the tensor and the first bad coordinate, when an
    /// output holds an infinity or a NaN (on by default).
    pub check_finite: bool,
    /// Threads for the CPU target (default: every core).
    pub threads: usize,
    /// Run the split-key (Flash-Decoding) form with chunks of this many keys: the streamed loop
    /// per chunk, every chunk at once, then a merge kernel (see `compiler::split`).
    pub split_keys: Option<u64>,
}

/// Every core of the machine.
pub fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            bindings: vec![],
            params: vec![],
            inputs: vec![],
            seed: 0,
            check_finite: true,
            threads: all_cores(),
            split_keys: None,
        }
    }
}

/// The first non-finite element of each output, as an error.
pub fn check_finite(outputs: &[(String, Tensor)]) -> Result<(), Error> {
    for (name, tensor) in outputs {
        let bad: Vec<usize> =
            tensor.data().iter().enumerate().filter(|(_, x)| !x.is_finite()).map(|(i, _)| i).collect();
        if let Some(first) = bad.first() {
            return Err(Error::NonFinite {
                tensor: name.clone(),
                coordinates: tensor.coordinates(*first),
                value: tensor.data()[*first],
                count: bad.len(),
            });
        }
    }
    Ok(())
}

pub fn dtype_of(elem: ElemType) -> DType {
    match elem {
        ElemType::F32 => DType::F32,
        ElemType::F16 => DType::F16,
        ElemType::Bf16 => DType::Bf16,
    }
}

/// The largest random input `prepare_inputs` makes (4 GiB of f32).
pub const MAX_RANDOM_ELEMENTS: usize = 1 << 30;

/// The inputs a run will use: those given, converted to their declared storage type, and random
/// ones for the rest. Also returns the bound extents.
pub fn prepare_inputs(cascade: &Cascade, options: &RunOptions) -> Result<(Vec<u64>, Vec<Tensor>), Error> {
    let input_ids = cascade.inputs();
    for (name, _) in &options.inputs {
        if !input_ids.iter().any(|id| &cascade.tensor(*id).name == name) {
            return Err(ShapeError::UnknownInput { tensor: name.clone() }.into());
        }
    }
    let given_shapes: Vec<_> = input_ids
        .iter()
        .filter_map(|id| {
            let name = &cascade.tensor(*id).name;
            options
                .inputs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| (*id, t.shape().iter().map(|n| *n as u64).collect()))
        })
        .collect();
    let extents = bind_extents(cascade, &options.bindings, &given_shapes)?;
    let mut tensors = Vec::new();
    for (number, id) in input_ids.iter().enumerate() {
        let tensor = cascade.tensor(*id);
        let TensorKind::Input { elem } = tensor.kind else { unreachable!("inputs() returns inputs") };
        let dtype = dtype_of(elem);
        let given = options.inputs.iter().find(|(n, _)| *n == tensor.name).map(|(_, t)| t.cast(dtype));
        let tensor = match given {
            Some(t) => t,
            None => {
                let shape: Vec<usize> = tensor_shape(cascade, *id, &extents).iter().map(|n| *n as usize).collect();
                let elements = runtime::tensor::element_count(&shape).unwrap_or(usize::MAX);
                if elements > MAX_RANDOM_ELEMENTS {
                    return Err(Error::Usage(format!(
                        "input `{}` would have {elements} elements ({shape:?}); random inputs are limited to \
                         {MAX_RANDOM_ELEMENTS}: give the tensor or smaller extents",
                        tensor.name
                    )));
                }
                let seed = options.seed.wrapping_mul(1_000_003).wrapping_add(number as u64);
                Tensor::random(dtype, shape, seed).map_err(|e| Error::Usage(e.to_string()))?
            }
        };
        tensors.push(tensor);
    }
    Ok((extents, tensors))
}

/// Runs a kernel on `target` as given (not optimized: see `pipeline::build` for that); returns its
/// outputs by name, in declaration order.
pub fn run(cascade: &Cascade, target: Target, options: &RunOptions) -> Result<Vec<(String, Tensor)>, Error> {
    let build_options = BuildOptions {
        optimize: false,
        params: options.params.clone(),
        split_keys: options.split_keys,
        ..BuildOptions::new(target)
    };
    let built = pipeline::build(cascade, &build_options)?;
    run_built(&built, options)
}

/// Runs a built kernel on the inputs of `options` (random where not given; its params and split
/// are those the kernel was built with).
pub fn run_built(built: &Built, options: &RunOptions) -> Result<Vec<(String, Tensor)>, Error> {
    let (extents, inputs) = prepare_inputs(&built.cascade, options)?;
    let slices: Vec<&[f32]> = inputs.iter().map(Tensor::data).collect();
    let values = built.run(&extents, &slices, options.threads)?;
    let outputs = output_tensors(&built.cascade, &extents, values);
    if options.check_finite {
        check_finite(&outputs)?;
    }
    Ok(outputs)
}

/// The extents of `cascade` for a call of `original` at `extents`: each symbolic rank by name,
/// the rest from `inputs`.
fn extents_by_name(
    original: &Cascade,
    extents: &[u64],
    cascade: &Cascade,
    shapes: &[Vec<u64>],
) -> Result<Vec<u64>, Error> {
    let bindings: Vec<(String, u64)> = cascade
        .ranks
        .iter()
        .filter(|r| r.extent == compiler::ir::Extent::Symbolic)
        .filter_map(|r| original.rank_by_name(&r.name).map(|id| (r.name.clone(), extents[id.index()])))
        .collect();
    let given: Vec<_> = cascade.inputs().into_iter().zip(shapes.iter().cloned()).collect();
    Ok(bind_extents(cascade, &bindings, &given)?)
}

/// The two kernels of a split-key form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitPart {
    Chunks,
    Merge,
}

/// Runs one part of a split-key form at the extents and on the inputs it is given.
pub type PartRunner<'r> = dyn FnMut(SplitPart, &[u64], &[&[f32]]) -> Result<Vec<Vec<f32>>, Error> + 'r;

/// Runs the split-key form of `original` with `run`, which runs one part at the extents and on
/// the inputs it is given (a benchmark passes kernels compiled once).
pub fn run_split_with(
    original: &Cascade,
    split: &compiler::split::SplitKeys,
    extents: &[u64],
    inputs: &[&[f32]],
    run: &mut PartRunner<'_>,
) -> Result<Vec<Vec<f32>>, Error> {
    let original_inputs = original.inputs();
    let shape_of = |i: usize| tensor_shape(original, original_inputs[i], extents);
    let chunk_inputs: Vec<&[f32]> = split.chunk_inputs.iter().map(|i| inputs[*i]).collect();
    let chunk_shapes: Vec<Vec<u64>> = split.chunk_inputs.iter().map(|i| shape_of(*i)).collect();
    let chunk_extents = extents_by_name(original, extents, &split.chunks, &chunk_shapes)?;
    let partials = run(SplitPart::Chunks, &chunk_extents, &chunk_inputs)?;
    let mut merge_inputs: Vec<&[f32]> = Vec::new();
    let mut merge_shapes = Vec::new();
    for source in &split.merge_inputs {
        match source {
            compiler::split::MergeInput::Original(i) => {
                merge_inputs.push(inputs[*i]);
                merge_shapes.push(shape_of(*i));
            }
            compiler::split::MergeInput::Partial(k) => {
                merge_inputs.push(&partials[*k]);
                merge_shapes.push(tensor_shape(&split.chunks, split.chunks.outputs[*k].tensor, &chunk_extents));
            }
        }
    }
    let merge_extents = extents_by_name(original, extents, &split.merge, &merge_shapes)?;
    run(SplitPart::Merge, &merge_extents, &merge_inputs)
}

/// Dense outputs as named tensors of their storage types.
pub fn output_tensors(cascade: &Cascade, extents: &[u64], values: Vec<Vec<f32>>) -> Vec<(String, Tensor)> {
    cascade
        .outputs
        .iter()
        .zip(values)
        .map(|(output, values)| {
            let shape: Vec<usize> = tensor_shape(cascade, output.tensor, extents).iter().map(|n| *n as usize).collect();
            let tensor = Tensor::new(dtype_of(output.elem), shape, values).expect("an output has its shape");
            (cascade.tensor(output.tensor).name.clone(), tensor)
        })
        .collect()
}

/// A kernel compiled as given (not optimized) for `target`.
fn compile_as_written(cascade: &Cascade, target: Target) -> Result<Executable, Error> {
    let mut built = pipeline::build(cascade, &BuildOptions { optimize: false, ..BuildOptions::new(target) })?;
    Ok(built.executables.remove(0))
}

/// Schedules and compiles a kernel for the CPU (the Cranelift back end).
pub fn compile_cpu(cascade: &Cascade) -> Result<compiler::cpu::CpuKernel, Error> {
    match compile_as_written(cascade, Target::Cpu)? {
        Executable::Cpu(kernel) => Ok(kernel),
        _ => unreachable!("the cpu target compiles a CPU kernel"),
    }
}

/// Compiles a cascade for the CPU through LLVM (the `cpu-llvm` tier).
#[cfg(feature = "llvm")]
pub fn compile_cpu_llvm(cascade: &Cascade) -> Result<compiler::cpu::CpuKernel, Error> {
    match compile_as_written(cascade, Target::CpuLlvm)? {
        Executable::Cpu(kernel) => Ok(kernel),
        _ => unreachable!("the cpu-llvm target compiles a CPU kernel"),
    }
}

/// Compiles a cascade's GPU kernel for the host, its grid run as loops (the emulation that
/// checks the GPU code without a GPU).
#[cfg(feature = "llvm")]
pub fn compile_emulated(cascade: &Cascade) -> Result<compiler::llvm::EmulatedKernel, Error> {
    match compile_as_written(cascade, Target::GpuEmulated)? {
        Executable::Emulated(kernel) => Ok(kernel),
        _ => unreachable!("the gpu-emu target compiles an emulated kernel"),
    }
}

/// PTX of a cascade's GPU kernel (as given, not optimized) for the architecture `sm` (for
/// example `sm_80`).
#[cfg(feature = "llvm")]
pub fn compile_ptx(cascade: &Cascade, sm: &str) -> Result<String, Error> {
    let scheduled =
        pipeline::schedule_kernel(cascade, &BuildOptions { optimize: false, ..BuildOptions::new(Target::Gpu) })?;
    pipeline::ptx(&scheduled.loops[0], sm)
}

/// The largest absolute and relative (`|a - b| / (1 + |b|)`) differences between one output of
/// a run and the interpreter's, both rounded to the output's storage type. NaN against NaN
/// agrees, and so do equal infinities; NaN against a number, or an infinity against anything
/// else, is as far off as can be.
pub fn output_difference(dtype: DType, got: &[f32], want: &[f32]) -> (f64, f64) {
    let (mut worst_abs, mut worst_rel) = (0.0f64, 0.0f64);
    for (a, b) in got.iter().zip(want) {
        let (a, b) = (dtype.round(*a) as f64, dtype.round(*b) as f64);
        if (a.is_nan() && b.is_nan()) || a == b {
            continue;
        }
        let abs = match (a - b).abs() {
            d if d.is_nan() => f64::INFINITY,
            d => d,
        };
        worst_abs = worst_abs.max(abs);
        // An infinity against any other value differs by everything (`inf / inf` would be NaN,
        // which `max` passes over).
        worst_rel = worst_rel.max(if b.is_infinite() { f64::INFINITY } else { abs / (1.0 + b.abs()) });
    }
    (worst_abs, worst_rel)
}

/// The largest relative spacing of neighbouring values of a storage type (f32 needs none here).
pub fn unit_in_last_place(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 0.0,
        DType::F16 => 2f64.powi(-10),
        DType::Bf16 => 2f64.powi(-7),
    }
}

/// The median of some samples (the upper one of an even count).
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_infinity_against_a_number_is_as_far_off_as_can_be() {
        let inf = f32::INFINITY;
        assert_eq!(output_difference(DType::F32, &[1.0, inf, f32::NAN], &[1.0, inf, f32::NAN]), (0.0, 0.0));
        assert_eq!(output_difference(DType::F32, &[-1.0e30], &[inf]).1, f64::INFINITY);
        assert_eq!(output_difference(DType::F32, &[inf], &[3.0]).1, f64::INFINITY);
        assert_eq!(output_difference(DType::F32, &[-inf], &[inf]).1, f64::INFINITY);
    }
}
