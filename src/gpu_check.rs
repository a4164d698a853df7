//! `einfuse gpu-check`: on a GPU machine, the PTX kernels of a folder made by
//! `scripts/gpu-build.sh` against the interpreter, and the benchmark kernels timed (or, with
//! `--emulate`, the same kernels emulated on this CPU: a rehearsal of the GPU run).
//!
//! Needs no LLVM on the GPU machine: the PTX comes from the folder, the launch from the Loop IR
//! that `pipeline::schedule_kernel` makes of the same source.

use std::path::Path;

use crate::compiler;
use crate::pipeline::Scheduled;
use crate::runtime;
use crate::{median, output_difference, unit_in_last_place, BuildOptions, Error, Program, RunOptions, Target};

/// The largest relative difference (`|a - b| / (1 + |b|)`) between a kernel's outputs and the
/// interpreter's, both rounded to each output's storage type, less one unit in the last place of
/// an f16 or bf16 output (two values a rounding error apart may round to neighbours); NaN against
/// NaN agrees.
fn largest_difference(cascade: &compiler::ir::Cascade, got: &[Vec<f32>], want: &[Vec<f32>]) -> f64 {
    let mut worst = 0.0f64;
    for ((g, w), output) in got.iter().zip(want).zip(&cascade.outputs) {
        if g.len() != w.len() {
            return f64::INFINITY;
        }
        let dtype = crate::dtype_of(output.elem);
        let (_, relative) = output_difference(dtype, g, w);
        worst = worst.max((relative - unit_in_last_place(dtype)).max(0.0));
    }
    worst
}

/// The relative difference a GPU kernel may have from the interpreter.
const TOLERANCE: f64 = 1e-4;

/// The same for a tensor-core kernel, whose probabilities are rounded to 16 bits before the
/// value product, as FlashAttention's are (the emulation measures 1.2e-4 to 1.3e-3 on
/// `tests/tensor_cores/kernels.ein`).
const TENSOR_CORE_TOLERANCE: f64 = 1e-2;

/// The largest relative difference of a kernel's outputs `got` from the interpreter's on the
/// inputs of `options`, and the verdict.
fn against_interpreter(
    cascade: &compiler::ir::Cascade,
    options: RunOptions,
    got: &[Vec<f32>],
    tolerance: f64,
) -> Result<(f64, &'static str), Error> {
    let reference = crate::run(cascade, crate::Target::Interp, &RunOptions { check_finite: false, ..options })?;
    let want: Vec<Vec<f32>> = reference.iter().map(|(_, t)| t.data().to_vec()).collect();
    let error = largest_difference(cascade, got, &want);
    Ok((error, if error <= tolerance { "ok" } else { "MISMATCH" }))
}

/// A kernel that `gpu-check` runs: its PTX loaded on the GPU, or the emulation of the same
/// kernel on this CPU (`--emulate`).
enum CheckedKernel {
    Gpu(crate::gpu::GpuKernel),
    TensorCoreGpu(crate::gpu::TensorCoreGpuKernel),
    #[cfg(feature = "llvm")]
    Emulated(compiler::llvm::EmulatedKernel),
    #[cfg(feature = "llvm")]
    TensorCoreEmulated(compiler::llvm::warp_emulator::EmulatedTensorCoreKernel),
}

impl CheckedKernel {
    fn run(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, Error> {
        match self {
            CheckedKernel::Gpu(k) => k.run(extents, inputs).map_err(|e| Error::Usage(e.to_string())),
            CheckedKernel::TensorCoreGpu(k) => k.run(extents, inputs).map_err(|e| Error::Usage(e.to_string())),
            #[cfg(feature = "llvm")]
            CheckedKernel::Emulated(k) => k.run(extents, inputs).map_err(|e| Error::Usage(e.to_string())),
            #[cfg(feature = "llvm")]
            CheckedKernel::TensorCoreEmulated(k) => k.run(extents, inputs).map_err(Error::Usage),
        }
    }

    /// The outputs and the time of each of `runs` calls after a warm-up (between two CUDA events
    /// on the GPU).
    fn time(&self, extents: &[u64], inputs: &[&[f32]], runs: usize) -> Result<(Vec<Vec<f32>>, Vec<f64>), Error> {
        match self {
            CheckedKernel::Gpu(k) => k.time(extents, inputs, runs).map_err(|e| Error::Usage(e.to_string())),
            CheckedKernel::TensorCoreGpu(k) => k.time(extents, inputs, runs).map_err(|e| Error::Usage(e.to_string())),
            #[cfg(feature = "llvm")]
            CheckedKernel::Emulated(_) | CheckedKernel::TensorCoreEmulated(_) => {
                // No warm-up: an emulated time means nothing.
                let mut times = Vec::new();
                let mut outputs = Vec::new();
                for _ in 0..runs.max(1) {
                    let start = std::time::Instant::now();
                    outputs = self.run(extents, inputs)?;
                    times.push(start.elapsed().as_secs_f64());
                }
                Ok((outputs, times))
            }
        }
    }

    /// Registers per thread and local bytes per thread (0 and 0 in the emulation).
    fn resources(&self) -> Result<(i32, i32), Error> {
        match self {
            CheckedKernel::Gpu(k) => k.resources().map_err(|e| Error::Usage(e.to_string())),
            CheckedKernel::TensorCoreGpu(k) => k.resources().map_err(|e| Error::Usage(e.to_string())),
            #[cfg(feature = "llvm")]
            CheckedKernel::Emulated(_) | CheckedKernel::TensorCoreEmulated(_) => Ok((0, 0)),
        }
    }
}

/// Loads a kernel for `gpu-check` from its loop program and PTX: a thread kernel, or a
/// tensor-core kernel.
type KernelLoader<'a> = dyn Fn(&compiler::schedule::LoopProgram, &str, bool) -> Result<CheckedKernel, Error> + 'a;

pub fn gpu_check(artifacts: &Path, out: &Path, emulate: bool) -> Result<(), Error> {
    let io = |path: &Path, source| Error::Io { path: path.display().to_string(), source };
    let gpu = |e: crate::gpu::GpuError| Error::Usage(e.to_string());
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let mut report = String::new();
    let mut say = |line: String| {
        println!("{line}");
        report.push_str(&line);
        report.push('\n');
    };
    let device = if emulate { None } else { Some(crate::gpu::GpuDevice::open().map_err(gpu)?) };
    let load: Box<KernelLoader> = match &device {
        Some(device) => {
            say(format!(
                "device: {} (compute capability {}.{})",
                device.name, device.capability.0, device.capability.1
            ));
            Box::new(move |loops, ptx, tensor_cores| {
                Ok(if tensor_cores {
                    CheckedKernel::TensorCoreGpu(
                        crate::gpu::TensorCoreGpuKernel::load(device, loops, ptx).map_err(gpu)?,
                    )
                } else {
                    CheckedKernel::Gpu(crate::gpu::GpuKernel::load(device, loops, ptx).map_err(gpu)?)
                })
            })
        }
        None => {
            say("device: none, the kernels emulated on this CPU (--emulate)".to_string());
            emulated_loader()?
        }
    };
    let manifest_path = artifacts.join("kernels.txt");
    let manifest = std::fs::read_to_string(&manifest_path).map_err(|e| io(&manifest_path, e))?;
    let mut failures = 0;
    for line in manifest.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [file, name, form, ptx_file] = fields[..] else {
            return Err(Error::Usage(format!(
                "{}: a line is not `file kernel form ptx`: {line}",
                manifest_path.display()
            )));
        };
        let program = Program::from_file(&artifacts.join(file))?;
        let written = program.kernel(Some(name))?;
        let split_keys = match form.strip_prefix("split") {
            Some(chunk) => {
                Some(chunk.parse().map_err(|_| Error::Usage(format!("{line}: form `split<KEYS>` expected")))?)
            }
            None => None,
        };
        // `compile --target nvptx` compiles the same through the same pipeline; the launch must
        // see the loops its PTX was made from.
        let options = BuildOptions { split_keys, ..BuildOptions::new(Target::Gpu) };
        let scheduled = crate::pipeline::schedule_kernel(written, &options)?;
        if scheduled.split.is_some() {
            failures += gpu_check_split(&*load, emulate, artifacts, out, file, &scheduled, ptx_file, &mut say)?;
            continue;
        }
        // A tensor-core kernel (`compile --tensor-cores`) runs the streamed schedule.
        let tensor_cores = form.starts_with("tensor-cores");
        let tolerance = if tensor_cores { TENSOR_CORE_TOLERANCE } else { TOLERANCE };
        let streamed;
        let (cascade, loops) = if tensor_cores {
            // Its cascade (streamed, other tiles) is the one its extents are for.
            streamed = crate::optimize_for_tensor_cores(written)?;
            (&streamed.cascade, &streamed)
        } else {
            (&scheduled.cascade, &scheduled.loops[0])
        };
        let ptx_path = artifacts.join(ptx_file);
        let ptx = std::fs::read_to_string(&ptx_path).map_err(|e| io(&ptx_path, e))?;
        let kernel = load(loops, &ptx, tensor_cores)?;
        let (registers, local) = kernel.resources()?;
        let bench = form == "bench" || form == "tensor-cores-bench";
        // A benchmark kernel is checked at a small shape first, then timed at its own (at the
        // small one again when emulated).
        let shapes: Vec<Vec<(String, u64)>> = if bench {
            vec![small_shape(), if emulate { small_shape() } else { bench_shape(name) }]
        } else {
            [[100u64, 7], [1, 3], [65, 70]]
                .iter()
                .map(|[m, p]| {
                    vec![("M".into(), *m), ("P".into(), *p), ("K".into(), 37), ("H".into(), 2), ("T".into(), 20)]
                })
                .collect()
        };
        for (s, sizes) in shapes.iter().enumerate() {
            let bindings: Vec<(String, u64)> = sizes
                .iter()
                .filter(|(r, _)| {
                    cascade
                        .rank_by_name(r)
                        .is_some_and(|id| matches!(cascade.rank(id).extent, compiler::ir::Extent::Symbolic))
                })
                .cloned()
                .collect();
            // The timed inputs are those of seed `BENCH_SEED`, as for the split forms, so that
            // `benches/compare_torch.py` compares every form on the inputs saved here.
            let seed = if bench && s == 1 { BENCH_SEED } else { s as u64 + 1 };
            let options = RunOptions { bindings, seed, ..RunOptions::default() };
            let (extents, inputs) = crate::prepare_inputs(cascade, &options)?;
            let slices: Vec<&[f32]> = inputs.iter().map(crate::Tensor::data).collect();
            if bench && s == 1 {
                // Emulated, a timing means nothing: one run writes what the comparison reads.
                let (outputs, times) = kernel.time(&extents, &slices, if emulate { 1 } else { 10 })?;
                let seconds = median(times);
                let flops = compiler::schedule::flop_count(cascade, &extents);
                say(format!(
                    "bench {file} {name}: {:.3} ms, {:.1} GFLOP/s, registers {registers}, local bytes {local}",
                    seconds * 1e3,
                    flops / seconds / 1e9
                ));
                for (id, tensor) in cascade.inputs().iter().zip(&inputs) {
                    let path = out.join(format!("{name}.{}.npy", cascade.tensor(*id).name));
                    runtime::npy::write_npy(&path, tensor)?;
                }
                for (output_name, tensor) in crate::output_tensors(cascade, &extents, outputs) {
                    runtime::npy::write_npy(&out.join(format!("{name}.{output_name}.npy")), &tensor)?;
                }
                let timing = out.join(format!("{name}.time.txt"));
                std::fs::write(&timing, format!("{seconds:.9}\n")).map_err(|e| io(&timing, e))?;
                continue;
            }
            let got = kernel.run(&extents, &slices)?;
            let (error, verdict) = against_interpreter(cascade, options, &got, tolerance)?;
            failures += usize::from(error > tolerance);
            say(format!(
                "{verdict} {file} {name} {form} {sizes:?}: relative error {error:.3e}, registers {registers}, local bytes {local}"
            ));
        }
    }
    say(format!("{failures} mismatch(es)"));
    let path = out.join("results.txt");
    std::fs::write(&path, report).map_err(|e| io(&path, e))?;
    if failures > 0 {
        return Err(Error::Usage(format!("{failures} GPU run(s) disagree with the interpreter")));
    }
    Ok(())
}

/// The seed of the benchmark kernels' random inputs in `gpu-check`.
const BENCH_SEED: u64 = 1;

/// The shape at which `gpu-check` checks a benchmark kernel against the interpreter (and, when
/// emulated, times it).
fn small_shape() -> Vec<(String, u64)> {
    vec![("M".into(), 100), ("P".into(), 70)]
}

/// The benchmark shape of a kernel of `benches/attention.ein`: decode streams 16384 keys for one
/// query, the others P = M = 4096.
fn bench_shape(kernel: &str) -> Vec<(String, u64)> {
    if kernel.contains("decode") {
        vec![("M".into(), 16384), ("P".into(), 1)]
    } else {
        vec![("M".into(), 4096), ("P".into(), 4096)]
    }
}

/// The split-key form of `cascade` on the GPU (`ptx_files`: the chunk and the merge kernel,
/// comma-separated): against the interpreter at two small shapes, then timed at the benchmark
/// shape (the sum of both kernels' median times, written as `{name}_split{KEYS}.time.txt`).
/// Returns the number of mismatches.
#[allow(clippy::too_many_arguments)]
fn gpu_check_split(
    load: &KernelLoader,
    emulate: bool,
    artifacts: &Path,
    out: &Path,
    file: &str,
    scheduled: &Scheduled,
    ptx_files: &str,
    say: &mut dyn FnMut(String),
) -> Result<usize, Error> {
    let io = |path: &Path, source| Error::Io { path: path.display().to_string(), source };
    let cascade = &scheduled.cascade;
    let name = &cascade.name;
    let split = scheduled.split.as_ref().expect("a split-key form");
    let chunk = split.chunk;
    let Some((chunks_file, merge_file)) = ptx_files.split_once(',') else {
        return Err(Error::Usage(format!("{ptx_files}: two PTX files, comma-separated, expected")));
    };
    let mut kernels = Vec::new();
    for (loops, ptx_file) in scheduled.loops.iter().zip([chunks_file, merge_file]) {
        let path = artifacts.join(ptx_file);
        let ptx = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        kernels.push(load(loops, &ptx, false)?);
    }
    let (registers, local) = kernels[0].resources()?;
    let mut failures = 0;
    let symbolic = |r: &str| {
        cascade.rank_by_name(r).is_some_and(|id| matches!(cascade.rank(id).extent, compiler::ir::Extent::Symbolic))
    };
    for (s, sizes) in
        [vec![("M".to_string(), 1000u64), ("P".to_string(), 3)], vec![("M".to_string(), 1), ("P".to_string(), 1)]]
            .into_iter()
            .enumerate()
    {
        let bindings: Vec<(String, u64)> = sizes.iter().filter(|(r, _)| symbolic(r)).cloned().collect();
        let options = RunOptions { bindings, seed: s as u64 + 1, ..RunOptions::default() };
        let (extents, inputs) = crate::prepare_inputs(cascade, &options)?;
        let slices: Vec<&[f32]> = inputs.iter().map(crate::Tensor::data).collect();
        let got = crate::run_split_with(cascade, split, &extents, &slices, &mut |part, extents, inputs| {
            let kernel = &kernels[usize::from(part == crate::SplitPart::Merge)];
            kernel.run(extents, inputs)
        })?;
        let (error, verdict) = against_interpreter(cascade, options, &got, TOLERANCE)?;
        failures += usize::from(error > TOLERANCE);
        say(format!(
            "{verdict} {file} {name} split{chunk} {sizes:?}: relative error {error:.3e}, chunk kernel registers {registers}, local bytes {local}"
        ));
    }
    // Timed at the benchmark shape on a GPU (the small shape when emulated), on the inputs the
    // plain kernel was timed on.
    let shape = if emulate { small_shape() } else { bench_shape(name) };
    let bindings: Vec<(String, u64)> = shape.into_iter().filter(|(r, _)| symbolic(r)).collect();
    let options = RunOptions { bindings, seed: BENCH_SEED, ..RunOptions::default() };
    let (extents, inputs) = crate::prepare_inputs(cascade, &options)?;
    let slices: Vec<&[f32]> = inputs.iter().map(crate::Tensor::data).collect();
    let mut seconds = 0.0;
    let outputs = crate::run_split_with(cascade, split, &extents, &slices, &mut |part, extents, inputs| {
        let kernel = &kernels[usize::from(part == crate::SplitPart::Merge)];
        let (outputs, times) = kernel.time(extents, inputs, 10)?;
        seconds += median(times);
        Ok(outputs)
    })?;
    say(format!("bench {file} {name} split{chunk}: {:.3} ms (chunks and merge, medians added)", seconds * 1e3));
    for (output_name, tensor) in crate::output_tensors(cascade, &extents, outputs) {
        runtime::npy::write_npy(&out.join(format!("{name}_split{chunk}.{output_name}.npy")), &tensor)?;
    }
    let timing = out.join(format!("{name}_split{chunk}.time.txt"));
    std::fs::write(&timing, format!("{seconds:.9}\n")).map_err(|e| io(&timing, e))?;
    Ok(failures)
}

/// The emulated kernels' loader (`gpu-check --emulate`): the PTX is read, not used.
#[cfg(feature = "llvm")]
fn emulated_loader() -> Result<Box<KernelLoader<'static>>, Error> {
    use compiler::llvm::warp_emulator::EmulatedTensorCoreKernel;
    Ok(Box::new(|loops, _ptx, tensor_cores| {
        Ok(if tensor_cores {
            CheckedKernel::TensorCoreEmulated(EmulatedTensorCoreKernel::new(loops).map_err(Error::Usage)?)
        } else {
            CheckedKernel::Emulated(compiler::llvm::EmulatedKernel::new(loops)?)
        })
    }))
}

#[cfg(not(feature = "llvm"))]
fn emulated_loader() -> Result<Box<KernelLoader<'static>>, Error> {
    Err(Error::Usage("gpu-check --emulate needs LLVM, and this einfuse was built without the `llvm` feature".into()))
}
