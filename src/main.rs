//! The `einfuse` command line: check, emit every stage, draw, and run cascades.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use einfuse::text::{self, emit, EmitOptions, EmitStage, LlvmTarget};
use einfuse::{compiler, median, output_difference, runtime, unit_in_last_place};
use einfuse::{BuildOptions, Error, Program, RunOptions, Target};

#[derive(Parser)]
#[command(
    name = "einfuse",
    version,
    about = "A compiler for cascades of extended Einsums (attention and its variants)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and check files; print every error with its place.
    Check {
        /// The `.ein` files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print a stage of the compilation as text.
    Emit {
        /// Which stage: `ast` (the syntax tree), `ir` (the checked Cascade IR, as `.ein`) or `opt`
        /// (the optimized cascade, as `.ein`).
        #[arg(long, value_enum)]
        stage: EmitStage,
        file: PathBuf,
        /// Only this kernel (default: every kernel).
        #[arg(long)]
        kernel: Option<String>,
        /// For `--stage llvm`: the module for the GPU (`nvptx`) or for this CPU (`cpu-llvm`); for
        /// `--stage loops`, `cpu-llvm` prints that tier's schedule (otherwise the `cpu` tier's).
        #[arg(long, value_enum, default_value = "nvptx")]
        target: LlvmTarget,
        /// For `--stage split`: keys per chunk (a whole number of the streamed loop's tiles).
        #[arg(long, default_value_t = 1024)]
        chunk: u64,
    },
    /// Print a kernel's dependency graph as Graphviz DOT.
    Graph {
        file: PathBuf,
        /// The kernel (required when the file has several).
        #[arg(long)]
        kernel: Option<String>,
        /// Colour each tensor by its pass, and draw the dependencies that force extra passes
        /// dashed.
        #[arg(long)]
        passes: bool,
        /// Draw the optimized cascade instead of the one as written.
        #[arg(long)]
        optimized: bool,
        /// The rank whose passes to draw (default: the one with the most passes as written).
        #[arg(long)]
        rank: Option<String>,
    },
    /// Count the passes each kernel makes over each rank, and say why each extra pass is needed.
    Analyze {
        file: PathBuf,
        /// Only this kernel (default: every kernel).
        #[arg(long)]
        kernel: Option<String>,
        /// Print one JSON object: {"kernels": [{"name", "passes", "optimized_passes"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Print the optimizer's derivation: the rules it applied and the cascade before and after.
    Explain {
        file: PathBuf,
        /// Only this kernel (default: every kernel).
        #[arg(long)]
        kernel: Option<String>,
    },
    /// Run a kernel on random or given inputs.
    Run(RunArgs),
    /// Compile a kernel ahead of time: an object file and a C header beside it (`cpu`,
    /// `cpu-llvm`), or PTX and a JSON launch description beside it (`nvptx`).
    Compile {
        file: PathBuf,
        /// The kernel (required when the file has several).
        #[arg(long)]
        kernel: Option<String>,
        /// The target.
        #[arg(long, value_enum, default_value = "cpu")]
        target: CompileTarget,
        /// The file to write; the header (`.h`) or launch description (`.json`) goes beside it.
        #[arg(short, long)]
        output: PathBuf,
        /// For `nvptx`: the split-key (Flash-Decoding) form with chunks of this many keys, as two
        /// kernels: `OUTPUT` with `.chunks.ptx` and `.merge.ptx` in place of its extension.
        #[arg(long, value_name = "KEYS")]
        split_keys: Option<u64>,
        /// Tiles of this many points for the split ranks the optimizer creates (the streamed keys).
        /// Default: 64; for `nvptx`, where the kernel keeps register buffers, the largest of 64,
        /// 32 and 16 at which a step's key and value tiles fit in shared memory (32 for a head
        /// dimension of 128), which the register code needs.
        #[arg(long)]
        tile: Option<u64>,
        /// For `nvptx`: the tensor-core kernel (`mma.sync` on 16-bit queries, keys and values,
        /// FlashAttention-2's schedule) where the kernel has one; else the thread kernel, with a
        /// note saying why.
        #[arg(long)]
        tensor_cores: bool,
        /// Print how long each stage of the pipeline took (to standard error).
        #[arg(long)]
        timings: bool,
    },
    /// Time a kernel on the CPU against the same cascade compiled as written (unfused).
    Bench {
        file: PathBuf,
        /// The kernel (required when the file has several).
        #[arg(long)]
        kernel: Option<String>,
        /// Bind a symbolic rank: `--bind M=4096`.
        #[arg(long = "bind", value_name = "RANK=N", value_parser = parse_binding)]
        bindings: Vec<(String, u64)>,
        /// Timed runs of each kernel (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// Which CPU tier: `cpu` (Cranelift), `cpu-llvm`, or `both` (measured in one run).
        #[arg(long, value_enum, default_value = "cpu")]
        target: BenchTarget,
        /// Also time the split-key (Flash-Decoding) form with chunks of this many keys.
        #[arg(long, value_name = "KEYS")]
        split_keys: Option<u64>,
        /// Tiles of this many points for the split ranks the optimizer creates (the streamed
        /// keys); by default the host tiers' own choice (64 on `cpu-llvm`, 128 on `cpu`, or 4096
        /// where a step's runs of keys are too short to stream).
        #[arg(long)]
        tile: Option<u64>,
    },
    /// On a GPU machine: run the PTX kernels of a folder made by `scripts/gpu-build.sh` against
    /// the interpreter and time the attention kernels; needs no LLVM.
    #[command(hide = true)]
    GpuCheck {
        /// The folder with `kernels.txt`, the `.ptx` files and the `.ein` sources.
        artifacts: PathBuf,
        /// Where to write `results.txt` and the benchmark's `.npy` files.
        out: PathBuf,
        /// Run the emulated kernels on this CPU instead (needs LLVM), the benchmarks at the
        /// small shape: a rehearsal of the GPU run on a machine without one.
        #[arg(long)]
        emulate: bool,
    },
    /// Write the gallery page and its pictures (as DOT) for the kernels of a folder.
    #[command(hide = true)]
    Gallery {
        /// The folder of `.ein` files.
        #[arg(long, default_value = "examples")]
        examples: PathBuf,
        /// Where to write `gallery.md` and `gallery/*.dot`.
        #[arg(long, default_value = "docs")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CompileTarget {
    /// An object file for this machine (Cranelift), and a C header.
    Cpu,
    /// An object file for this machine through LLVM (full vector width), and a C header.
    CpuLlvm,
    /// PTX for NVIDIA GPUs (sm_80 and newer), and a JSON launch description.
    Nvptx,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum BenchTarget {
    Cpu,
    CpuLlvm,
    Both,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    /// The reference interpreter.
    Interp,
    /// The Cranelift CPU back end (the kernel is optimized first).
    Cpu,
    /// The LLVM CPU tier (optimized first).
    CpuLlvm,
    /// The GPU kernel compiled for this CPU and run thread by thread (optimized first).
    GpuEmu,
    /// The GPU kernel on GPU 0 through the CUDA driver (optimized first).
    Gpu,
}

#[derive(clap::Args)]
struct RunArgs {
    file: PathBuf,
    /// The kernel (required when the file has several).
    #[arg(long)]
    kernel: Option<String>,
    /// Where to run it.
    #[arg(long, value_enum, default_value = "interp")]
    target: TargetArg,
    /// Bind a symbolic rank: `--bind M=128`.
    #[arg(long = "bind", value_name = "RANK=N", value_parser = parse_binding)]
    bindings: Vec<(String, u64)>,
    /// Override a param: `--param scale=0.1`.
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parse_param)]
    params: Vec<(String, f64)>,
    /// Read an input from a `.npy` file: `--input Q=q.npy`.
    #[arg(long = "input", value_name = "NAME=PATH", value_parser = parse_path)]
    inputs: Vec<(String, PathBuf)>,
    /// Write an output to a `.npy` file: `--output AV=av.npy`.
    #[arg(long = "output", value_name = "NAME=PATH", value_parser = parse_path)]
    outputs: Vec<(String, PathBuf)>,
    /// Seed for the inputs that are not given.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print every value of the outputs not written to files (default: a summary).
    #[arg(long)]
    print: bool,
    /// Do not fail when an output holds an infinity or a NaN.
    #[arg(long)]
    allow_non_finite: bool,
    /// Also run the interpreter and report the largest errors; fail above the tolerance.
    #[arg(long)]
    check: bool,
    /// The relative tolerance of `--check`.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
    /// Threads for the CPU target (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Run the split-key (Flash-Decoding) form: the streamed loop in chunks of this many keys,
    /// all at once, then a merge kernel (`emit --stage split` prints both).
    #[arg(long, value_name = "KEYS")]
    split_keys: Option<u64>,
    /// Tiles of this many points for the split ranks the optimizer creates (the streamed keys).
    /// Default: 64; for the GPU targets, as for `compile --target nvptx`.
    #[arg(long)]
    tile: Option<u64>,
    /// Print how long each stage of the pipeline took (to standard error).
    #[arg(long)]
    timings: bool,
}

fn split_assignment(text: &str) -> Result<(&str, &str), String> {
    text.split_once('=').filter(|(k, _)| !k.is_empty()).ok_or_else(|| format!("expected NAME=VALUE, found `{text}`"))
}

fn parse_binding(text: &str) -> Result<(String, u64), String> {
    let (name, value) = split_assignment(text)?;
    let value = value.parse::<u64>().map_err(|_| format!("`{value}` is not a non-negative integer"))?;
    Ok((name.to_string(), value))
}

fn parse_param(text: &str) -> Result<(String, f64), String> {
    let (name, value) = split_assignment(text)?;
    let value = match value {
        "inf" => f64::INFINITY,
        "-inf" => f64::NEG_INFINITY,
        _ => value.parse::<f64>().map_err(|_| format!("`{value}` is not a number"))?,
    };
    Ok((name.to_string(), value))
}

fn parse_path(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = split_assignment(text)?;
    Ok((name.to_string(), PathBuf::from(path)))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() { ExitCode::from(1) } else { ExitCode::SUCCESS };
        }
    };
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{}", err.report());
            ExitCode::from(1)
        }
    }
}

fn execute(command: Command) -> Result<(), Error> {
    match command {
        Command::Check { files } => check(&files),
        Command::Emit { stage, file, kernel, target, chunk } => {
            let source = einfuse::read_source(&file)?;
            let options = EmitOptions { kernel: kernel.as_deref(), target, chunk };
            print!("{}", emit(&file.display().to_string(), &source, stage, &options)?);
            Ok(())
        }
        Command::Graph { file, kernel, passes, optimized, rank } => {
            let program = Program::from_file(&file)?;
            print!("{}", graph_dot(program.kernel(kernel.as_deref())?, passes, optimized, rank)?);
            Ok(())
        }
        Command::Analyze { file, kernel, json } => {
            let program = Program::from_file(&file)?;
            match json {
                true => println!("{}", text::analyze_json(&program, kernel.as_deref())?),
                false => print!("{}", text::analyze_text(&program, kernel.as_deref())?),
            }
            Ok(())
        }
        Command::Explain { file, kernel } => {
            print!("{}", text::explain(&Program::from_file(&file)?, kernel.as_deref())?);
            Ok(())
        }
        Command::Run(args) => run(args),
        Command::Compile { file, kernel, target, output, split_keys, tile, tensor_cores, timings: show } => {
            let program = Program::from_file(&file)?;
            let written = program.kernel(kernel.as_deref())?;
            if split_keys.is_some() && !matches!(target, CompileTarget::Nvptx) {
                return Err(Error::Usage("--split-keys is for `--target nvptx`".into()));
            }
            let runs_on = match target {
                CompileTarget::Nvptx => Target::Gpu,
                CompileTarget::Cpu => Target::Cpu,
                CompileTarget::CpuLlvm => Target::CpuLlvm,
            };
            let options = BuildOptions { tile, split_keys, ..BuildOptions::new(runs_on) };
            let mut scheduled = einfuse::pipeline::schedule_kernel(written, &options)?;
            let io = |path: &Path, source| Error::Io { path: path.display().to_string(), source };
            let start = std::time::Instant::now();
            let mut written_files = Vec::new();
            match target {
                CompileTarget::Nvptx if tensor_cores && scheduled.split.is_none() => {
                    let streamed = einfuse::optimize_for_tensor_cores(written)?;
                    match tensor_core_ptx(&streamed, &file.display().to_string()) {
                        Ok((ptx, description)) => {
                            std::fs::write(&output, ptx).map_err(|e| io(&output, e))?;
                            let sidecar = output.with_extension("json");
                            std::fs::write(&sidecar, description).map_err(|e| io(&sidecar, e))?;
                            written_files.push((output.clone(), sidecar));
                        }
                        Err(why) => {
                            eprintln!("note: `{}` keeps the thread kernel (no tensor cores): {why}", written.name);
                            let loops = &scheduled.loops[0];
                            std::fs::write(&output, einfuse::pipeline::ptx(loops, "sm_80")?)
                                .map_err(|e| io(&output, e))?;
                            let sidecar = output.with_extension("json");
                            let description = compiler::llvm::launch_description(loops, &file.display().to_string());
                            std::fs::write(&sidecar, description).map_err(|e| io(&sidecar, e))?;
                            written_files.push((output.clone(), sidecar));
                        }
                    }
                }
                CompileTarget::Nvptx => {
                    let names: Vec<PathBuf> = match scheduled.split {
                        None => vec![output.clone()],
                        Some(_) => {
                            ["chunks", "merge"].iter().map(|p| output.with_extension(format!("{p}.ptx"))).collect()
                        }
                    };
                    for (loops, path) in scheduled.loops.iter().zip(names) {
                        std::fs::write(&path, einfuse::pipeline::ptx(loops, "sm_80")?).map_err(|e| io(&path, e))?;
                        let sidecar = path.with_extension("json");
                        let description = compiler::llvm::launch_description(loops, &file.display().to_string());
                        std::fs::write(&sidecar, description).map_err(|e| io(&sidecar, e))?;
                        written_files.push((path, sidecar));
                    }
                }
                CompileTarget::Cpu | CompileTarget::CpuLlvm => {
                    let llvm = matches!(target, CompileTarget::CpuLlvm);
                    let (object, header) = einfuse::pipeline::object(&scheduled.loops[0], llvm)?;
                    let header_path = output.with_extension("h");
                    std::fs::write(&output, object).map_err(|e| io(&output, e))?;
                    std::fs::write(&header_path, header).map_err(|e| io(&header_path, e))?;
                    written_files.push((output.clone(), header_path));
                }
            }
            scheduled.timings.stages.push((einfuse::Stage::Compile, start.elapsed()));
            for (main, beside) in written_files {
                println!("wrote {} and {}", main.display(), beside.display());
            }
            if show {
                eprint!("timings:\n{}", scheduled.timings.report());
            }
            Ok(())
        }
        Command::Bench { file, kernel, bindings, runs, json, threads, target, split_keys, tile } => bench(
            &file,
            kernel.as_deref(),
            bindings,
            runs,
            json,
            threads.unwrap_or_else(einfuse::all_cores),
            target,
            split_keys,
            tile,
        ),
        Command::GpuCheck { artifacts, out, emulate } => gpu_check(&artifacts, &out, emulate),
        Command::Gallery { examples, out } => {
            let gallery = einfuse::gallery::build(&examples)?;
            let io = |path: &Path, source| Error::Io { path: path.display().to_string(), source };
            let pictures = out.join("gallery");
            std::fs::create_dir_all(&pictures).map_err(|e| io(&pictures, e))?;
            for (name, dot) in &gallery.pictures {
                let path = pictures.join(format!("{name}.dot"));
                std::fs::write(&path, dot).map_err(|e| io(&path, e))?;
            }
            let page = out.join("gallery.md");
            std::fs::write(&page, &gallery.markdown).map_err(|e| io(&page, e))?;
            println!("wrote {} and {} pictures", page.display(), gallery.pictures.len());
            Ok(())
        }
    }
}

/// The DOT text of `einfuse graph`.
fn graph_dot(
    kernel: &compiler::ir::Cascade,
    passes: bool,
    optimized: bool,
    rank: Option<String>,
) -> Result<String, Error> {
    let written = compiler::passcount::analyze(kernel);
    let rank = rank.or_else(|| compiler::graph::streamed_rank(kernel, &written));
    let cascade = if optimized { einfuse::optimize(kernel)?.cascade } else { kernel.clone() };
    if !passes {
        return Ok(compiler::graph::to_dot(&cascade));
    }
    let report = compiler::passcount::analyze(&cascade);
    Ok(match rank {
        Some(rank) => compiler::graph::to_dot_with_passes(&cascade, &report, &rank),
        None => compiler::graph::to_dot(&cascade),
    })
}

fn check(files: &[PathBuf]) -> Result<(), Error> {
    let mut failures = Vec::new();
    for file in files {
        match Program::from_file(file) {
            Ok(program) => {
                let names: Vec<&str> = program.kernels.iter().map(|k| k.name.as_str()).collect();
                println!("{}: ok ({})", file.display(), names.join(", "));
            }
            Err(err) => failures.push(err),
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 => Err(failures.pop().expect("one failure")),
        _ => {
            let mut rendered = String::new();
            let mut count = 0;
            for failure in failures {
                match failure {
                    Error::Source { rendered: text, count: n } => {
                        rendered.push_str(&text);
                        count += n;
                    }
                    other => {
                        rendered.push_str(&format!("error: {other}\n"));
                        count += 1;
                    }
                }
            }
            Err(Error::Source { rendered, count })
        }
    }
}

fn run(args: RunArgs) -> Result<(), Error> {
    let program = Program::from_file(&args.file)?;
    let kernel = program.kernel(args.kernel.as_deref())?;
    for (name, _) in &args.outputs {
        if !kernel.outputs.iter().any(|o| &kernel.tensor(o.tensor).name == name) {
            return Err(Error::Usage(format!("kernel `{}` has no output `{name}`", kernel.name)));
        }
    }
    let mut options = RunOptions {
        bindings: args.bindings,
        params: args.params,
        inputs: vec![],
        seed: args.seed,
        check_finite: !args.allow_non_finite,
        threads: args.threads.unwrap_or_else(einfuse::all_cores),
        split_keys: args.split_keys,
    };
    for (name, path) in &args.inputs {
        let Some(id) = kernel.tensor_by_name(name).filter(|id| kernel.inputs().contains(id)) else {
            return Err(Error::Usage(format!("kernel `{}` has no input `{name}`", kernel.name)));
        };
        let compiler::ir::TensorKind::Input { elem } = kernel.tensor(id).kind else { unreachable!() };
        let tensor = runtime::npy::read_npy(path, einfuse::dtype_of(elem))?;
        options.inputs.push((name.clone(), tensor));
    }
    let target = match args.target {
        TargetArg::Interp => Target::Interp,
        TargetArg::Cpu => Target::Cpu,
        TargetArg::CpuLlvm => Target::CpuLlvm,
        TargetArg::GpuEmu => Target::GpuEmulated,
        TargetArg::Gpu => Target::Gpu,
    };
    // The interpreter runs the cascade as written, unless the split-key form (derived from the
    // optimized cascade) is asked for.
    let build_options = BuildOptions {
        optimize: target != Target::Interp || args.split_keys.is_some(),
        tile: args.tile,
        params: std::mem::take(&mut options.params),
        split_keys: args.split_keys,
        ..BuildOptions::new(target)
    };
    let built = einfuse::build(kernel, &build_options)?;
    let outputs = einfuse::run_built(&built, &options)?;
    if args.timings {
        eprint!("timings:\n{}", built.timings.report());
    }
    if args.check {
        let reference = einfuse::run(
            &built.cascade,
            Target::Interp,
            &RunOptions { check_finite: false, split_keys: None, ..options.clone() },
        )?;
        let mut worst_abs = 0.0f64;
        let mut worst_rel = 0.0f64;
        let mut beyond = None;
        for ((name, got), (_, want)) in outputs.iter().zip(&reference) {
            let (output_abs, output_rel) = output_difference(got.dtype(), got.data(), want.data());
            worst_abs = worst_abs.max(output_abs);
            worst_rel = worst_rel.max(output_rel);
            // Both sides are rounded to the output's type, and may round to neighbours: one unit
            // in the last place of an f16 or bf16 is allowed beside the tolerance.
            let allowed = args.tolerance.max(unit_in_last_place(got.dtype()));
            if output_rel > allowed && beyond.is_none() {
                beyond = Some(format!(
                    "output `{name}` ({}) differs from the interpreter's by {output_rel:.3e} (relative), more than {allowed}",
                    got.dtype().name()
                ));
            }
        }
        println!("check against the interpreter: largest absolute error {worst_abs:.3e}, relative {worst_rel:.3e}");
        if let Some(why) = beyond {
            return Err(Error::Usage(why));
        }
    }
    for (name, tensor) in &outputs {
        match args.outputs.iter().find(|(n, _)| n == name) {
            Some((_, path)) => {
                runtime::npy::write_npy(path, tensor)?;
                println!("{name}: {} {:?} written to {}", tensor.dtype().name(), tensor.shape(), path.display());
            }
            None => print_tensor(name, tensor, args.print),
        }
    }
    Ok(())
}

/// One tier's measurements.
struct BenchResult {
    tier: &'static str,
    /// The split-key form (`--split-keys`): chunks, then the merge.
    split_median_s: Option<f64>,
    median_s: f64,
    unfused_median_s: f64,
    compile_s: f64,
    peak_extra_bytes: u64,
    unfused_extra_bytes: u64,
}

/// Compiles a cascade as written on one CPU tier.
fn compile_tier(cascade: &compiler::ir::Cascade, llvm: bool) -> Result<compiler::cpu::CpuKernel, Error> {
    if !llvm {
        return einfuse::compile_cpu(cascade);
    }
    #[cfg(feature = "llvm")]
    return einfuse::compile_cpu_llvm(cascade);
    #[cfg(not(feature = "llvm"))]
    Err(Error::Usage("the cpu-llvm tier needs LLVM, and this einfuse was built without the `llvm` feature".into()))
}

#[allow(clippy::too_many_arguments)]
fn bench(
    file: &Path,
    kernel: Option<&str>,
    bindings: Vec<(String, u64)>,
    runs: usize,
    json: bool,
    threads: usize,
    target: BenchTarget,
    split_keys: Option<u64>,
    tile: Option<u64>,
) -> Result<(), Error> {
    use std::time::Instant;
    let runs = runs.max(1);
    let program = Program::from_file(file)?;
    let written = program.kernel(kernel)?;
    let options = RunOptions { bindings, seed: 1, ..RunOptions::default() };
    let (extents, inputs) = einfuse::prepare_inputs(written, &options)?;
    let slices: Vec<&[f32]> = inputs.iter().map(einfuse::Tensor::data).collect();
    let source = einfuse::read_source(file)?;
    let extents_of = |k: &compiler::cpu::CpuKernel| -> Result<Vec<u64>, Error> {
        let shapes: Vec<_> = k
            .cascade()
            .inputs()
            .into_iter()
            .zip(&inputs)
            .map(|(id, t)| (id, t.shape().iter().map(|n| *n as u64).collect()))
            .collect();
        Ok(compiler::shapes::bind_extents(k.cascade(), &options.bindings, &shapes)?)
    };
    // The fused and the unfused kernel run by turns, so that a burst of load elsewhere on the
    // machine slows both alike rather than one of them: the medians of each.
    let time = |kernels: [&compiler::cpu::CpuKernel; 2]| -> Result<[f64; 2], Error> {
        let extents = [extents_of(kernels[0])?, extents_of(kernels[1])?];
        let mut samples = [Vec::new(), Vec::new()];
        for (k, e) in kernels.iter().zip(&extents) {
            k.run_threads(e, &slices, threads)?;
        }
        for _ in 0..runs {
            for ((k, e), samples) in kernels.iter().zip(&extents).zip(&mut samples) {
                let start = Instant::now();
                std::hint::black_box(k.run_threads(e, &slices, threads)?);
                samples.push(start.elapsed().as_secs_f64());
            }
        }
        let [fused, unfused] = samples;
        Ok([median(fused), median(unfused)])
    };
    let tiers: Vec<(&'static str, bool)> = match target {
        BenchTarget::Cpu => vec![("cpu", false)],
        BenchTarget::CpuLlvm => vec![("cpu-llvm", true)],
        BenchTarget::Both => vec![("cpu", false), ("cpu-llvm", true)],
    };
    let mut results = Vec::new();
    for (tier, llvm) in tiers {
        let target = if llvm { Target::CpuLlvm } else { Target::Cpu };
        let options = BuildOptions { tile, ..BuildOptions::new(target) };
        // Source to a callable kernel: parse, check, optimize, schedule, compile.
        let mut compile_times = Vec::new();
        let mut built = None;
        for _ in 0..3 {
            let start = Instant::now();
            built = Some(einfuse::build_source(&file.display().to_string(), &source, kernel, &options)?);
            compile_times.push(start.elapsed().as_secs_f64());
        }
        let built = built.expect("compiled");
        let fused = built.cpu().expect("a CPU target builds a CPU kernel");
        let unfused = compile_tier(written, llvm)?;
        let split_median_s = match split_keys {
            None => None,
            Some(chunk) => {
                let split = einfuse::build(written, &BuildOptions { split_keys: Some(chunk), ..options.clone() })?;
                split.run(&extents, &slices, threads)?;
                let mut samples = Vec::new();
                for _ in 0..runs {
                    let start = Instant::now();
                    std::hint::black_box(split.run(&extents, &slices, threads)?);
                    samples.push(start.elapsed().as_secs_f64());
                }
                Some(median(samples))
            }
        };
        let [median_s, unfused_median_s] = time([fused, &unfused])?;
        results.push(BenchResult {
            tier,
            split_median_s,
            median_s,
            unfused_median_s,
            compile_s: median(compile_times),
            peak_extra_bytes: fused.peak_scratch_bytes(&extents_of(fused)?, threads),
            unfused_extra_bytes: unfused.peak_scratch_bytes(&extents, threads),
        });
    }
    let flops = compiler::schedule::flop_count(written, &extents);
    let bytes: f64 = inputs.iter().map(|t| t.len() as f64 * 4.0).sum::<f64>()
        + written
            .outputs
            .iter()
            .map(|o| compiler::shapes::tensor_shape(written, o.tensor, &extents).iter().product::<u64>() as f64 * 4.0)
            .sum::<f64>();
    let fields = |r: &BenchResult| -> serde_json::Map<String, serde_json::Value> {
        let mut fields = serde_json::json!({
            "target": r.tier,
            "median_s": r.median_s,
            "gflops": flops / r.median_s / 1e9,
            "gbps": bytes / r.median_s / 1e9,
            "unfused_median_s": r.unfused_median_s,
            "speedup_vs_unfused": r.unfused_median_s / r.median_s,
            "peak_extra_bytes": r.peak_extra_bytes,
            "unfused_extra_bytes": r.unfused_extra_bytes,
            "compile_s": r.compile_s,
        });
        if let Some(t) = r.split_median_s {
            fields["split_median_s"] = t.into();
            fields["split_speedup_vs_fused"] = (r.median_s / t).into();
        }
        let serde_json::Value::Object(map) = fields else { unreachable!("an object") };
        map
    };
    if json {
        // The first tier's fields at the top level, the second's under its name.
        let mut report = serde_json::Map::new();
        report.insert("kernel".into(), written.name.clone().into());
        report.extend(fields(&results[0]));
        for other in &results[1..] {
            report.insert(other.tier.into(), fields(other).into());
        }
        if results.len() == 2 {
            report.insert("llvm_speedup_vs_cpu".into(), (results[0].median_s / results[1].median_s).into());
        }
        report.insert("threads".into(), threads.into());
        report.insert("runs".into(), runs.into());
        println!("{}", serde_json::Value::Object(report));
        return Ok(());
    }
    println!("kernel {} ({runs} runs, medians, {threads} thread(s))", written.name);
    for r in &results {
        println!(
            "  {:<9} fused:   {:>10.3} ms  {:>8.2} GFLOP/s  {:>8.2} GB/s  scratch {} bytes",
            r.tier,
            r.median_s * 1e3,
            flops / r.median_s / 1e9,
            bytes / r.median_s / 1e9,
            r.peak_extra_bytes
        );
        println!(
            "  {:<9} unfused: {:>10.3} ms  scratch {} bytes",
            r.tier,
            r.unfused_median_s * 1e3,
            r.unfused_extra_bytes
        );
        println!("  {:<9} speedup vs unfused: {:.2}x", r.tier, r.unfused_median_s / r.median_s);
        if let Some(t) = r.split_median_s {
            println!(
                "  {:<9} split-key form: {:>10.3} ms  ({:.2}x the fused kernel's speed)",
                r.tier,
                t * 1e3,
                r.median_s / t
            );
        }
        println!("  {:<9} source to callable kernel: {:.2} ms", r.tier, r.compile_s * 1e3);
    }
    if results.len() == 2 {
        println!("  cpu-llvm vs cpu (fused): {:.2}x", results[0].median_s / results[1].median_s);
    }
    Ok(())
}

fn print_tensor(name: &str, tensor: &einfuse::Tensor, all: bool) {
    let data = tensor.data();
    let finite: Vec<f32> = data.iter().copied().filter(|x| x.is_finite()).collect();
    let min = finite.iter().copied().fold(f32::INFINITY, f32::min);
    let max = finite.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mean = finite.iter().map(|x| *x as f64).sum::<f64>() / finite.len().max(1) as f64;
    println!(
        "{name}: {} {:?}  min {min:.6}  max {max:.6}  mean {mean:.6}  non-finite {}",
        tensor.dtype().name(),
        tensor.shape(),
        data.len() - finite.len()
    );
    if all {
        for (offset, value) in data.iter().enumerate() {
            println!("  {:?} {value}", tensor.coordinates(offset));
        }
    }
}

#[cfg(feature = "cuda")]
fn gpu_check(artifacts: &Path, out: &Path, emulate: bool) -> Result<(), Error> {
    einfuse::gpu_check::gpu_check(artifacts, out, emulate)
}

#[cfg(not(feature = "cuda"))]
fn gpu_check(_: &Path, _: &Path, _: bool) -> Result<(), Error> {
    Err(Error::Usage("gpu-check needs the `cuda` feature, and this einfuse was built without it".into()))
}

/// The PTX of a program's tensor-core kernel and its launch description, or why it has none.
#[cfg(feature = "llvm")]
fn tensor_core_ptx(program: &compiler::schedule::LoopProgram, source: &str) -> Result<(String, String), String> {
    let ptx = compiler::llvm::tensor_core_ptx(program, "sm_80")?;
    let plan = compiler::schedule::tensor_cores::plan(program)?;
    let description = compiler::llvm::tensor_cores::launch_description(program, &plan, source);
    Ok((ptx, description))
}

#[cfg(not(feature = "llvm"))]
fn tensor_core_ptx(_: &compiler::schedule::LoopProgram, _: &str) -> Result<(String, String), String> {
    Err("PTX needs LLVM, and this einfuse was built without the `llvm` feature".into())
}
