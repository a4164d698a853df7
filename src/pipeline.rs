//! The pipeline as one function: source text to a kernel that runs, through parse and check,
//! optimize, schedule and compile, each stage timed.
//!
//! Needs: source text, or a kernel already checked. Guarantees: the command line, the JIT API and
//! the GPU check get their kernels from `build` and nothing else, so a kernel is optimized (the
//! tile for its target chosen by `optimize_for_target`), scheduled and compiled one way whoever
//! asks; `compile_loops` is the one place a Loop IR program becomes machine code.

use std::time::{Duration, Instant};

use crate::compiler::ir::Cascade;
use crate::compiler::schedule::{schedule_host, schedule_threads, HostTier, LoopProgram};
use crate::compiler::split::{split_keys, SplitKeys};
use crate::{Error, Program, Target};

/// A stage of the pipeline, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Lexing, parsing and checking the source.
    Parse,
    /// The e-graph optimizer (and the split-key form, when asked for).
    Optimize,
    /// The Loop IR.
    Schedule,
    /// Machine code, PTX or the emulated GPU kernel.
    Compile,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Parse => "parse and check",
            Stage::Optimize => "optimize",
            Stage::Schedule => "schedule",
            Stage::Compile => "compile",
        }
    }
}

/// How long each stage took, in the order they ran (a stage may appear once per kernel built).
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub stages: Vec<(Stage, Duration)>,
}

impl Timings {
    fn time<T>(&mut self, stage: Stage, work: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let result = work();
        self.stages.push((stage, start.elapsed()));
        result
    }

    /// The time of every stage, added up.
    pub fn total(&self) -> Duration {
        self.stages.iter().map(|(_, d)| *d).sum()
    }

    /// One line a stage (stages that ran several times added up), and the total; for `--timings`.
    pub fn report(&self) -> String {
        let mut text = String::new();
        for stage in [Stage::Parse, Stage::Optimize, Stage::Schedule, Stage::Compile] {
            let times: Vec<Duration> = self.stages.iter().filter(|(s, _)| *s == stage).map(|(_, d)| *d).collect();
            if !times.is_empty() {
                let sum: Duration = times.iter().sum();
                text.push_str(&format!("  {:<16} {:>9.3} ms\n", stage.name(), sum.as_secs_f64() * 1e3));
            }
        }
        text.push_str(&format!("  {:<16} {:>9.3} ms\n", "total", self.total().as_secs_f64() * 1e3));
        text
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Where the kernel runs; `Target::Interp` stops before scheduling.
    pub target: Target,
    /// Run the e-graph optimizer (fewest passes) first.
    pub optimize: bool,
    /// The tile of the split ranks the optimizer creates; `None` lets `optimize_for_target` choose.
    pub tile: Option<u64>,
    /// Param overrides, applied before anything else.
    pub params: Vec<(String, f64)>,
    /// Build the split-key (Flash-Decoding) form with chunks of this many keys.
    pub split_keys: Option<u64>,
}

impl BuildOptions {
    /// The options of a kernel for `target`, optimized, with the default tile.
    pub fn new(target: Target) -> BuildOptions {
        BuildOptions { target, optimize: true, tile: None, params: vec![], split_keys: None }
    }
}

/// A kernel compiled for one target: what `run` calls.
pub enum Executable {
    /// The reference interpreter runs the cascade.
    Interp,
    /// Machine code for this CPU (Cranelift or LLVM).
    Cpu(crate::compiler::cpu::CpuKernel),
    /// The GPU kernel compiled for this CPU, its grid run as loops.
    #[cfg(feature = "llvm")]
    Emulated(crate::compiler::llvm::EmulatedKernel),
    /// PTX for the GPU, loaded onto the device by the first call and kept for the next ones.
    Gpu { loops: LoopProgram, ptx: String, loaded: std::sync::OnceLock<Loaded> },
}

/// A kernel scheduled: everything but machine code.
pub struct Scheduled {
    /// The cascade that runs: optimized when asked for, params applied.
    pub cascade: Cascade,
    /// The optimizer's result (its report), when it ran.
    pub optimized: Option<crate::compiler::optimize::Optimized>,
    /// The split-key form, when asked for.
    pub split: Option<SplitKeys>,
    /// The scheduled loops: of the cascade, or of the split form's chunk and merge kernels; none
    /// for the interpreter, which runs cascades.
    pub loops: Vec<LoopProgram>,
    pub timings: Timings,
}

/// A kernel through the whole pipeline.
pub struct Built {
    pub cascade: Cascade,
    pub optimized: Option<crate::compiler::optimize::Optimized>,
    pub split: Option<SplitKeys>,
    pub loops: Vec<LoopProgram>,
    /// The compiled kernel; for a split-key form, the chunk kernel then the merge kernel.
    pub executables: Vec<Executable>,
    pub timings: Timings,
}

/// Parses and checks `source` (errors rendered with `path`), then builds the kernel `name` (the
/// only one when `None`).
pub fn build_source(path: &str, source: &str, name: Option<&str>, options: &BuildOptions) -> Result<Built, Error> {
    let mut timings = Timings::default();
    let program = timings.time(Stage::Parse, || Program::from_source(path, source))?;
    let mut built = build(program.kernel(name)?, options)?;
    timings.stages.append(&mut built.timings.stages);
    built.timings = timings;
    Ok(built)
}

/// Builds a checked kernel: params, optimize, split, schedule, compile.
pub fn build(written: &Cascade, options: &BuildOptions) -> Result<Built, Error> {
    let Scheduled { cascade, optimized, split, loops, mut timings } = schedule_kernel(written, options)?;
    let executables = match options.target {
        Target::Interp => (0..if split.is_some() { 2 } else { 1 }).map(|_| Executable::Interp).collect(),
        target => timings
            .time(Stage::Compile, || loops.iter().map(|l| compile_loops(l, target)).collect::<Result<Vec<_>, _>>())?,
    };
    Ok(Built { cascade, optimized, split, loops, executables, timings })
}

/// The pipeline up to the Loop IR: params, optimize, split, schedule (not for the interpreter).
pub fn schedule_kernel(written: &Cascade, options: &BuildOptions) -> Result<Scheduled, Error> {
    let mut timings = Timings::default();
    let mut cascade = with_params(written, &options.params)?;
    // A split-key chunk is a whole number of tiles: where a host tier's own tile does not divide
    // the chunk asked for, tiles of 64 (every tier's before Cranelift took 128) where they do.
    let tile = options.tile.or(match (options.split_keys, options.target) {
        (Some(chunk), Target::Cpu | Target::CpuLlvm) => {
            let own = crate::compiler::schedule::layout::host_tile(host_tier(options.target));
            (chunk % own != 0 && chunk % 64 == 0).then_some(64)
        }
        _ => None,
    });
    let optimized = match options.optimize {
        true => Some(timings.time(Stage::Optimize, || crate::optimize_for_target(&cascade, options.target, tile))?),
        false => None,
    };
    if let Some(optimized) = &optimized {
        cascade = optimized.cascade.clone();
    }
    let split = match options.split_keys {
        None => None,
        Some(chunk) => Some(
            timings
                .time(Stage::Optimize, || split_keys(&cascade, chunk))
                .map_err(|why| Error::Usage(format!("kernel `{}` does not split into chunks: {why}", cascade.name)))?,
        ),
    };
    let parts: Vec<&Cascade> = match &split {
        None => vec![&cascade],
        Some(split) => vec![&split.chunks, &split.merge],
    };
    // The host tiers read packed panels and staged tiles (see `schedule::pack`); the thread
    // kernels stage tiles of inputs in shared memory.
    let loops = match options.target {
        Target::Interp => vec![],
        Target::Cpu | Target::CpuLlvm => {
            let tier = host_tier(options.target);
            timings
                .time(Stage::Schedule, || parts.iter().map(|c| schedule_host(c, tier)).collect::<Result<Vec<_>, _>>())?
        }
        Target::GpuEmulated | Target::Gpu => timings
            .time(Stage::Schedule, || parts.iter().map(|c| schedule_threads(c)).collect::<Result<Vec<_>, _>>())?,
    };
    Ok(Scheduled { cascade, optimized, split, loops, timings })
}

/// The host tier that runs `target`'s code, as the schedule needs to know it.
pub fn host_tier(target: Target) -> HostTier {
    #[cfg(feature = "llvm")]
    if target == Target::CpuLlvm {
        return crate::compiler::llvm::lower::host_tier();
    }
    let _ = target;
    crate::compiler::cpu::TIER
}

/// `cascade` with its params overridden.
pub fn with_params(cascade: &Cascade, params: &[(String, f64)]) -> Result<Cascade, Error> {
    let mut cascade = cascade.clone();
    for (name, value) in params {
        match cascade.params.iter_mut().find(|p| &p.name == name) {
            Some(param) => param.value = *value,
            None => return Err(Error::Usage(format!("kernel `{}` has no param `{name}`", cascade.name))),
        }
    }
    Ok(cascade)
}

/// PTX of a scheduled program for the architecture `sm` (for example `sm_80`).
#[cfg(feature = "llvm")]
pub fn ptx(loops: &LoopProgram, sm: &str) -> Result<String, Error> {
    Ok(crate::compiler::llvm::compile_ptx(loops, sm)?)
}

#[cfg(not(feature = "llvm"))]
pub fn ptx(_: &LoopProgram, _: &str) -> Result<String, Error> {
    Err(Error::Usage("PTX needs LLVM, and this einfuse was built without the `llvm` feature".into()))
}

/// An object file for this machine (Cranelift, or LLVM with `llvm`) and its C header.
pub fn object(loops: &LoopProgram, llvm: bool) -> Result<(Vec<u8>, String), Error> {
    let header = crate::compiler::cpu::header::c_header(loops);
    if !llvm {
        return Ok((crate::compiler::cpu::compile_object(loops)?, header));
    }
    #[cfg(feature = "llvm")]
    return Ok((crate::compiler::llvm::compile_object(loops)?, header));
    #[cfg(not(feature = "llvm"))]
    Err(Error::Usage("the cpu-llvm target needs LLVM, and this einfuse was built without the `llvm` feature".into()))
}

/// The one place a scheduled program becomes code for a target.
pub fn compile_loops(loops: &LoopProgram, target: Target) -> Result<Executable, Error> {
    Ok(match target {
        Target::Interp => Executable::Interp,
        Target::Cpu => Executable::Cpu(crate::compiler::cpu::compile(loops)?),
        #[cfg(feature = "llvm")]
        Target::CpuLlvm => Executable::Cpu(crate::compiler::llvm::compile_host(loops)?),
        #[cfg(feature = "llvm")]
        Target::GpuEmulated => Executable::Emulated(crate::compiler::llvm::EmulatedKernel::new(loops)?),
        #[cfg(feature = "llvm")]
        Target::Gpu => {
            Executable::Gpu { loops: loops.clone(), ptx: ptx(loops, "sm_80")?, loaded: std::sync::OnceLock::new() }
        }
        #[cfg(not(feature = "llvm"))]
        other => {
            return Err(Error::Usage(format!(
                "the target `{}` needs LLVM, and this einfuse was built without the `llvm` feature",
                other.name()
            )))
        }
    })
}

impl Executable {
    /// Runs the kernel of `cascade` on f32 data: its outputs, dense.
    pub fn run(
        &self,
        cascade: &Cascade,
        extents: &[u64],
        inputs: &[&[f32]],
        threads: usize,
    ) -> Result<Vec<Vec<f32>>, Error> {
        self.run_at(cascade, extents, inputs, threads, &[])
    }

    /// `run` where each rank's points start at a global position (`origins[r]`, 0 where short):
    /// index values and filters see global positions (see `interp::interpret_at`). The GPU
    /// kernels take none.
    pub fn run_at(
        &self,
        cascade: &Cascade,
        extents: &[u64],
        inputs: &[&[f32]],
        threads: usize,
        origins: &[i64],
    ) -> Result<Vec<Vec<f32>>, Error> {
        use crate::compiler::interp::{interpret_at, InterpLimits};
        if origins.iter().any(|o| *o != 0) && !matches!(self, Executable::Interp | Executable::Cpu(_)) {
            return Err(Error::Usage("rank offsets are supported on the interp, cpu and cpu-llvm targets".into()));
        }
        Ok(match self {
            Executable::Interp => {
                let data: Vec<Vec<f64>> = inputs.iter().map(|s| s.iter().map(|x| *x as f64).collect()).collect();
                let slices: Vec<&[f64]> = data.iter().map(Vec::as_slice).collect();
                let outputs = interpret_at(cascade, extents, origins, &slices, InterpLimits::default())?;
                outputs.into_iter().map(|o| o.into_iter().map(|x| x as f32).collect()).collect()
            }
            Executable::Cpu(kernel) => kernel.run_threads_at(extents, inputs, threads, origins)?,
            #[cfg(feature = "llvm")]
            Executable::Emulated(kernel) => kernel.run(extents, inputs)?,
            Executable::Gpu { loops, ptx, loaded } => {
                // A failure to load is not kept: a later call tries again.
                let kernel = match loaded.get() {
                    Some(kernel) => kernel,
                    None => {
                        let _ = loaded.set(load_gpu(loops, ptx).map_err(Error::Usage)?);
                        loaded.get().expect("set above")
                    }
                };
                run_gpu(kernel, extents, inputs)?
            }
        })
    }
}

impl Built {
    /// Runs the kernel (the split-key form: its chunks, then the merge) on f32 data.
    pub fn run(&self, extents: &[u64], inputs: &[&[f32]], threads: usize) -> Result<Vec<Vec<f32>>, Error> {
        self.run_at(extents, inputs, threads, &[])
    }

    /// `run` with each rank's global origin (see `Executable::run_at`); not for a split-key form.
    pub fn run_at(
        &self,
        extents: &[u64],
        inputs: &[&[f32]],
        threads: usize,
        origins: &[i64],
    ) -> Result<Vec<Vec<f32>>, Error> {
        match &self.split {
            None => self.executables[0].run_at(&self.cascade, extents, inputs, threads, origins),
            Some(_) if origins.iter().any(|o| *o != 0) => {
                Err(Error::Usage("rank offsets are not supported with split keys".into()))
            }
            Some(split) => crate::run_split_with(&self.cascade, split, extents, inputs, &mut |part, e, i| match part {
                crate::SplitPart::Chunks => self.executables[0].run(&split.chunks, e, i, threads),
                crate::SplitPart::Merge => self.executables[1].run(&split.merge, e, i, threads),
            }),
        }
    }

    /// The CPU kernel of a whole (not split) kernel built for a CPU target.
    pub fn cpu(&self) -> Option<&crate::compiler::cpu::CpuKernel> {
        match (&self.split, &self.executables[..]) {
            (None, [Executable::Cpu(kernel)]) => Some(kernel),
            _ => None,
        }
    }
}

/// A GPU kernel loaded onto GPU 0 (its module and function); nothing without `cuda`.
#[cfg(feature = "cuda")]
pub type Loaded = crate::gpu::GpuKernel;
#[cfg(not(feature = "cuda"))]
pub type Loaded = ();

#[cfg(feature = "cuda")]
fn load_gpu(loops: &LoopProgram, ptx: &str) -> Result<Loaded, String> {
    let device = crate::gpu::GpuDevice::open().map_err(|e| e.to_string())?;
    crate::gpu::GpuKernel::load(&device, loops, ptx).map_err(|e| e.to_string())
}

#[cfg(feature = "cuda")]
fn run_gpu(kernel: &Loaded, extents: &[u64], inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, Error> {
    kernel.run(extents, inputs).map_err(|e| Error::Usage(e.to_string()))
}

#[cfg(not(feature = "cuda"))]
fn load_gpu(_: &LoopProgram, _: &str) -> Result<Loaded, String> {
    Err("the GPU target needs the `cuda` feature, and this einfuse was built without it".into())
}

#[cfg(not(feature = "cuda"))]
fn run_gpu(_: &Loaded, _: &[u64], _: &[&[f32]]) -> Result<Vec<Vec<f32>>, Error> {
    unreachable!("load_gpu fails first")
}
