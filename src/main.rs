//! The `einfuse` command line: check, emit every stage, draw, and run cascades.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use einfuse::{compiler, dsl, runtime, Error, Program, RunOptions, Target};

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
        stage: Stage,
        file: PathBuf,
        /// Only this kernel (default: every kernel).
        #[arg(long)]
        kernel: Option<String>,
        /// For `--stage llvm`: the module for the GPU (`nvptx`) or for this CPU (`cpu-llvm`).
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
        /// keys).
        #[arg(long, default_value_t = 64)]
        tile: u64,
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
enum Stage {
    Ast,
    Ir,
    /// The cascade after the e-graph optimizer, as `.ein`.
    Opt,
    /// The split-key (Flash-Decoding) form of the optimized cascade: the chunk kernel and the
    /// merge kernel, as `.ein` (see `--chunk`).
    Split,
    /// The Loop IR: buffers, loops and the Einsums in them (of the optimized cascade).
    Loops,
    /// The Cranelift IR of the CPU kernel (of the optimized cascade).
    Clif,
    /// The LLVM IR the LLVM back ends start from (see `--target`).
    Llvm,
    /// The LLVM IR after LLVM's O3 pipeline (see `--target`).
    LlvmOpt,
    /// The PTX of the GPU kernel (for sm_80, PTX ISA 7.5).
    Ptx,
}

#[derive(Clone, Copy, ValueEnum)]
enum LlvmTarget {
    Nvptx,
    CpuLlvm,
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
            match &err {
                Error::Source { rendered, count } => {
                    eprint!("{rendered}");
                    eprintln!("error: {count} error(s) found");
                }
                other => eprintln!("error: {other}"),
            }
            ExitCode::from(1)
        }
    }
}

fn execute(command: Command) -> Result<(), Error> {
    match command {
        Command::Check { files } => check(&files),
        Command::Emit { stage, file, kernel, target, chunk } => {
            let text = match stage {
                Stage::Ast => emit_ast(&file, kernel.as_deref())?,
                Stage::Ir => {
                    let program = Program::from_file(&file)?;
                    let kernels: Vec<_> = program.selected(kernel.as_deref())?.into_iter().cloned().collect();
                    compiler::print::print_cascades(&kernels)
                }
                Stage::Opt => {
                    let program = Program::from_file(&file)?;
                    let mut kernels = Vec::new();
                    for k in program.selected(kernel.as_deref())? {
                        kernels.push(einfuse::optimize(k)?.cascade);
                    }
                    compiler::print::print_cascades(&kernels)
                }
                Stage::Split => {
                    let program = Program::from_file(&file)?;
                    let mut kernels = Vec::new();
                    for k in program.selected(kernel.as_deref())? {
                        let optimized = einfuse::optimize(k)?.cascade;
                        let split = compiler::split::split_keys(&optimized, chunk).map_err(|why| {
                            Error::Usage(format!("kernel `{}` does not split into chunks: {why}", k.name))
                        })?;
                        kernels.push(split.chunks);
                        kernels.push(split.merge);
                    }
                    compiler::print::print_cascades(&kernels)
                }
                Stage::Loops | Stage::Clif | Stage::Llvm | Stage::LlvmOpt | Stage::Ptx => {
                    let program = Program::from_file(&file)?;
                    let mut text = String::new();
                    for k in program.selected(kernel.as_deref())? {
                        let optimized = einfuse::optimize(k)?.cascade;
                        let loops = compiler::schedule::schedule(&optimized)?;
                        text.push_str(&match stage {
                            Stage::Loops => compiler::schedule::print_program(&loops),
                            Stage::Llvm => match target {
                                LlvmTarget::Nvptx => compiler::llvm::nvptx_ir(&loops),
                                LlvmTarget::CpuLlvm => {
                                    compiler::llvm::host_ir(&loops, &compiler::cpu::object_symbol(&loops.cascade))
                                }
                            },
                            Stage::LlvmOpt => optimized_llvm(&loops, matches!(target, LlvmTarget::Nvptx))?,
                            Stage::Ptx => ptx(&loops)?,
                            _ => compiler::cpu::compile(&loops)?.clif.clone(),
                        });
                    }
                    text
                }
            };
            print!("{text}");
            Ok(())
        }
        Command::Graph { file, kernel, passes, optimized, rank } => {
            let program = Program::from_file(&file)?;
            print!("{}", graph_dot(program.kernel(kernel.as_deref())?, passes, optimized, rank)?);
            Ok(())
        }
        Command::Analyze { file, kernel, json } => analyze(&file, kernel.as_deref(), json),
        Command::Explain { file, kernel } => explain(&file, kernel.as_deref()),
        Command::Run(args) => run(args),
        Command::Compile { file, kernel, target, output, split_keys, tile } => {
            let program = Program::from_file(&file)?;
            let written = program.kernel(kernel.as_deref())?;
            let runs_on = if matches!(target, CompileTarget::Nvptx) { Target::Gpu } else { Target::Cpu };
            let optimized = einfuse::optimize_for_target(written, runs_on, tile)?.cascade;
            let loops = compiler::schedule::schedule(&optimized)?;
            let io = |path: &Path, source| Error::Io { path: path.display().to_string(), source };
            if let Some(chunk) = split_keys {
                if !matches!(target, CompileTarget::Nvptx) {
                    return Err(Error::Usage("--split-keys is for `--target nvptx`".into()));
                }
                let split = compiler::split::split_keys(&optimized, chunk).map_err(|why| {
                    Error::Usage(format!("kernel `{}` does not split into chunks: {why}", optimized.name))
                })?;
                for (part, cascade) in [("chunks", &split.chunks), ("merge", &split.merge)] {
                    let loops = compiler::schedule::schedule(cascade)?;
                    let path = output.with_extension(format!("{part}.ptx"));
                    std::fs::write(&path, ptx(&loops)?).map_err(|e| io(&path, e))?;
                    let sidecar = output.with_extension(format!("{part}.json"));
                    let description = compiler::llvm::launch_description(&loops, &file.display().to_string());
                    std::fs::write(&sidecar, description).map_err(|e| io(&sidecar, e))?;
                    println!("wrote {} and {}", path.display(), sidecar.display());
                }
                return Ok(());
            }
            if let CompileTarget::Nvptx = target {
                let text = ptx(&loops)?;
                let sidecar = output.with_extension("json");
                std::fs::write(&output, text).map_err(|e| io(&output, e))?;
                let description = compiler::llvm::launch_description(&loops, &file.display().to_string());
                std::fs::write(&sidecar, description).map_err(|e| io(&sidecar, e))?;
                println!("wrote {} and {}", output.display(), sidecar.display());
                return Ok(());
            }
            let object = match target {
                CompileTarget::CpuLlvm => cpu_llvm_object(&loops)?,
                _ => compiler::cpu::compile_object(&loops)?,
            };
            let header = compiler::cpu::header::c_header(&loops);
            let header_path = output.with_extension("h");
            std::fs::write(&output, object).map_err(|e| io(&output, e))?;
            std::fs::write(&header_path, header).map_err(|e| io(&header_path, e))?;
            println!("wrote {} and {}", output.display(), header_path.display());
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

fn analyze(file: &Path, kernel: Option<&str>, json: bool) -> Result<(), Error> {
    let program = Program::from_file(file)?;
    let kernels = program.selected(kernel)?;
    let mut results = Vec::new();
    for kernel in &kernels {
        let written = compiler::passcount::analyze(kernel);
        let optimized = einfuse::optimize(kernel)?;
        let optimized_report = compiler::passcount::analyze(&optimized.cascade);
        results.push((written, optimized, optimized_report));
    }
    if json {
        let entries: Vec<String> = results
            .iter()
            .map(|(written, _, optimized)| {
                format!(
                    "{{\"name\": {}, \"passes\": {}, \"optimized_passes\": {}}}",
                    json_string(&written.kernel),
                    json_counts(&written.counts()),
                    json_counts(&optimized.counts())
                )
            })
            .collect();
        println!("{{\"kernels\": [{}]}}", entries.join(", "));
        return Ok(());
    }
    for (kernel, (written, optimized, optimized_report)) in kernels.iter().zip(&results) {
        println!("kernel {}", kernel.name);
        println!("  as written:");
        for line in compiler::passcount::describe(kernel, written).lines() {
            println!("  {line}");
        }
        match &optimized.note {
            Some(note) => println!("  optimized: kept as written ({note})"),
            None => {
                println!(
                    "  optimized ({} rewrite iterations, {} e-nodes, {}):",
                    optimized.iterations, optimized.nodes, optimized.stop
                );
                for line in compiler::passcount::describe(&optimized.cascade, optimized_report).lines() {
                    println!("  {line}");
                }
            }
        }
    }
    Ok(())
}

fn explain(file: &Path, kernel: Option<&str>) -> Result<(), Error> {
    let program = Program::from_file(file)?;
    for kernel in program.selected(kernel)? {
        let result = einfuse::optimize(kernel)?;
        println!("kernel {}", kernel.name);
        println!("== as written");
        print!("{}", compiler::print::print_cascade(kernel));
        println!("== rewrites ({} iterations, {} e-nodes, {})", result.iterations, result.nodes, result.stop);
        for (iteration, rule, times) in &result.applied {
            println!("  iteration {iteration}: {rule} x{times}: {}", compiler::optimize::rules::describe(rule));
        }
        let passes = |map: &std::collections::BTreeMap<String, u32>| {
            map.iter().map(|(r, n)| format!("{r}: {n}")).collect::<Vec<_>>().join(", ")
        };
        println!(
            "== passes: as written {{{}}}, chosen {{{}}}",
            passes(&result.input_passes),
            passes(&result.claimed_passes)
        );
        let steps = compiler::optimize::derivation(kernel, &compiler::optimize::OptimizeOptions::default());
        if steps.len() > 1 {
            println!(
                "== derivation of the first output's term ({} rewrites; each line is the term after one)",
                steps.len() - 1
            );
            for (n, step) in steps.iter().enumerate() {
                println!("  {n:>2}: {step}");
            }
        }
        match &result.note {
            Some(note) => println!("== kept as written: {note}"),
            None => {
                println!("== optimized");
                print!("{}", compiler::print::print_cascade(&result.cascade));
            }
        }
        println!();
    }
    Ok(())
}

fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_counts(counts: &[(String, usize)]) -> String {
    let fields: Vec<String> = counts.iter().map(|(rank, n)| format!("{}: {n}", json_string(rank))).collect();
    format!("{{{}}}", fields.join(", "))
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

/// The syntax tree is printed even when checking would fail, but not when parsing fails.
fn emit_ast(file: &Path, kernel: Option<&str>) -> Result<String, Error> {
    let source = einfuse::read_source(file)?;
    let (mut ast, diagnostics) = dsl::parse(&source);
    if !diagnostics.is_empty() {
        let path = file.display().to_string();
        return Err(Error::Source {
            rendered: dsl::diagnostic::render_all(&diagnostics, &path, &source),
            count: diagnostics.len(),
        });
    }
    if let Some(name) = kernel {
        ast.kernels.retain(|k| k.name.text == name);
        if ast.kernels.is_empty() {
            return Err(Error::Usage(format!("{} has no kernel `{name}`", file.display())));
        }
    }
    Ok(ast.to_string())
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
    let kernel = match target {
        Target::Interp if args.split_keys.is_none() => kernel.clone(),
        _ => einfuse::optimize_for_target(kernel, target, args.tile)?.cascade,
    };
    let outputs = einfuse::run(&kernel, target, &options)?;
    if args.check {
        let reference = einfuse::run(
            &kernel,
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

/// The largest absolute and relative (`|a - b| / (1 + |b|)`) differences between one output of
/// a run and the interpreter's, both rounded to the output's storage type. NaN against NaN
/// agrees; NaN against a number (or infinities of opposite signs) is as far off as can be.
fn output_difference(dtype: einfuse::DType, got: &[f32], want: &[f32]) -> (f64, f64) {
    let (mut worst_abs, mut worst_rel) = (0.0f64, 0.0f64);
    for (a, b) in got.iter().zip(want) {
        let (a, b) = (dtype.round(*a) as f64, dtype.round(*b) as f64);
        if a.is_nan() && b.is_nan() {
            continue;
        }
        let abs = match (a - b).abs() {
            d if d.is_nan() => f64::INFINITY,
            d => d,
        };
        worst_abs = worst_abs.max(abs);
        worst_rel = worst_rel.max(abs / (1.0 + b.abs()));
    }
    (worst_abs, worst_rel)
}

/// The largest relative spacing of neighbouring values of a storage type (f32 needs none here).
fn unit_in_last_place(dtype: einfuse::DType) -> f64 {
    match dtype {
        einfuse::DType::F32 => 0.0,
        einfuse::DType::F16 => 2f64.powi(-10),
        einfuse::DType::Bf16 => 2f64.powi(-7),
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
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

/// Compiles a cascade on one CPU tier.
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
    tile: u64,
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
    let time = |k: &compiler::cpu::CpuKernel| -> Result<f64, Error> {
        let extents = extents_of(k)?;
        k.run_threads(&extents, &slices, threads)?;
        let mut samples = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            std::hint::black_box(k.run_threads(&extents, &slices, threads)?);
            samples.push(start.elapsed().as_secs_f64());
        }
        Ok(median(samples))
    };
    let tiers: Vec<(&'static str, bool)> = match target {
        BenchTarget::Cpu => vec![("cpu", false)],
        BenchTarget::CpuLlvm => vec![("cpu-llvm", true)],
        BenchTarget::Both => vec![("cpu", false), ("cpu-llvm", true)],
    };
    let mut results = Vec::new();
    for (tier, llvm) in tiers {
        // Source to a callable kernel: parse, check, optimize, schedule, compile.
        let mut compile_times = Vec::new();
        let mut fused = None;
        for _ in 0..3 {
            let start = Instant::now();
            let program = Program::from_source(&file.display().to_string(), &source)?;
            let optimized = einfuse::optimize_tiled(program.kernel(kernel)?, tile)?.cascade;
            fused = Some(compile_tier(&optimized, llvm)?);
            compile_times.push(start.elapsed().as_secs_f64());
        }
        let fused = fused.expect("compiled");
        let unfused = compile_tier(written, llvm)?;
        let split_median_s = match split_keys {
            None => None,
            Some(chunk) => {
                let optimized = fused.cascade().clone();
                let split = compiler::split::split_keys(&optimized, chunk).map_err(|why| {
                    Error::Usage(format!("kernel `{}` does not split into chunks: {why}", optimized.name))
                })?;
                let (chunks, merge) = (compile_tier(&split.chunks, llvm)?, compile_tier(&split.merge, llvm)?);
                let once = || {
                    einfuse::run_split_with(&optimized, &split, &extents, &slices, &mut |part, extents, inputs| {
                        let kernel = if part == einfuse::SplitPart::Chunks { &chunks } else { &merge };
                        Ok(kernel.run_threads(extents, inputs, threads)?)
                    })
                };
                once()?;
                let mut samples = Vec::new();
                for _ in 0..runs {
                    let start = Instant::now();
                    std::hint::black_box(once()?);
                    samples.push(start.elapsed().as_secs_f64());
                }
                Some(median(samples))
            }
        };
        results.push(BenchResult {
            tier,
            split_median_s,
            median_s: time(&fused)?,
            unfused_median_s: time(&unfused)?,
            compile_s: median(compile_times),
            peak_extra_bytes: fused.peak_scratch_bytes(&extents_of(&fused)?, threads),
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
    let fields = |r: &BenchResult| -> String {
        let split = match r.split_median_s {
            Some(t) => format!(", \"split_median_s\": {t:.6e}, \"split_speedup_vs_fused\": {:.3}", r.median_s / t),
            None => String::new(),
        };
        format!(
            "\"target\": \"{}\", \"median_s\": {:.6e}, \"gflops\": {:.3}, \"gbps\": {:.3}, \"unfused_median_s\": {:.6e}, \
             \"speedup_vs_unfused\": {:.3}, \"peak_extra_bytes\": {}, \"unfused_extra_bytes\": {}, \"compile_s\": {:.6e}",
            r.tier,
            r.median_s,
            flops / r.median_s / 1e9,
            bytes / r.median_s / 1e9,
            r.unfused_median_s,
            r.unfused_median_s / r.median_s,
            r.peak_extra_bytes,
            r.unfused_extra_bytes,
            r.compile_s
        ) + &split
    };
    if json {
        let mut text = format!("{{\"kernel\": {}, {}", json_string(&written.name), fields(&results[0]));
        for other in &results[1..] {
            text.push_str(&format!(", \"{}\": {{{}}}", other.tier, fields(other)));
        }
        if results.len() == 2 {
            text.push_str(&format!(", \"llvm_speedup_vs_cpu\": {:.3}", results[0].median_s / results[1].median_s));
        }
        println!("{text}, \"threads\": {threads}, \"runs\": {runs}}}");
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

#[cfg(feature = "llvm")]
fn ptx(program: &compiler::schedule::LoopProgram) -> Result<String, Error> {
    Ok(compiler::llvm::compile_ptx(program, "sm_80")?)
}

#[cfg(not(feature = "llvm"))]
fn ptx(_: &compiler::schedule::LoopProgram) -> Result<String, Error> {
    Err(Error::Usage("PTX needs LLVM, and this einfuse was built without the `llvm` feature".into()))
}

#[cfg(feature = "llvm")]
fn cpu_llvm_object(program: &compiler::schedule::LoopProgram) -> Result<Vec<u8>, Error> {
    Ok(compiler::cpu::compile_object_llvm(program)?)
}

#[cfg(not(feature = "llvm"))]
fn cpu_llvm_object(_: &compiler::schedule::LoopProgram) -> Result<Vec<u8>, Error> {
    Err(Error::Usage("the cpu-llvm target needs LLVM, and this einfuse was built without the `llvm` feature".into()))
}

/// The largest relative difference (`|a - b| / (1 + |b|)`) between a kernel's outputs and the
/// interpreter's, both rounded to each output's storage type, less one unit in the last place of
/// an f16 or bf16 output (two values a rounding error apart may round to neighbours); NaN against
/// NaN agrees.
#[cfg(feature = "cuda")]
fn largest_difference(cascade: &compiler::ir::Cascade, got: &[Vec<f32>], want: &[Vec<f32>]) -> f64 {
    let mut worst = 0.0f64;
    for ((g, w), output) in got.iter().zip(want).zip(&cascade.outputs) {
        if g.len() != w.len() {
            return f64::INFINITY;
        }
        let dtype = einfuse::dtype_of(output.elem);
        let (_, relative) = output_difference(dtype, g, w);
        worst = worst.max((relative - unit_in_last_place(dtype)).max(0.0));
    }
    worst
}

/// A kernel that `gpu-check` runs: its PTX loaded on the GPU, or the emulation of the same
/// kernel on this CPU (`--emulate`).
#[cfg(feature = "cuda")]
enum CheckedKernel {
    Gpu(einfuse::gpu::GpuKernel),
    #[cfg(feature = "llvm")]
    Emulated(compiler::llvm::EmulatedKernel),
}

#[cfg(feature = "cuda")]
impl CheckedKernel {
    fn run(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, Error> {
        match self {
            CheckedKernel::Gpu(k) => k.run(extents, inputs).map_err(|e| Error::Usage(e.to_string())),
            #[cfg(feature = "llvm")]
            CheckedKernel::Emulated(k) => k.run(extents, inputs).map_err(|e| Error::Usage(e.to_string())),
        }
    }

    /// The outputs and the time of each of `runs` calls after a warm-up (launch to completion
    /// on the GPU).
    fn time(&self, extents: &[u64], inputs: &[&[f32]], runs: usize) -> Result<(Vec<Vec<f32>>, Vec<f64>), Error> {
        match self {
            CheckedKernel::Gpu(k) => k.time(extents, inputs, runs).map_err(|e| Error::Usage(e.to_string())),
            #[cfg(feature = "llvm")]
            CheckedKernel::Emulated(_) => {
                let mut times = Vec::new();
                let mut outputs = self.run(extents, inputs)?;
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
            #[cfg(feature = "llvm")]
            CheckedKernel::Emulated(_) => Ok((0, 0)),
        }
    }
}

/// Loads a kernel for `gpu-check` from its loop program and PTX.
#[cfg(feature = "cuda")]
type KernelLoader<'a> = dyn Fn(&compiler::schedule::LoopProgram, &str) -> Result<CheckedKernel, Error> + 'a;

#[cfg(feature = "cuda")]
fn gpu_check(artifacts: &Path, out: &Path, emulate: bool) -> Result<(), Error> {
    let io = |path: &Path, source| Error::Io { path: path.display().to_string(), source };
    let gpu = |e: einfuse::gpu::GpuError| Error::Usage(e.to_string());
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let mut report = String::new();
    let mut say = |line: String| {
        println!("{line}");
        report.push_str(&line);
        report.push('\n');
    };
    let device = if emulate { None } else { Some(einfuse::gpu::GpuDevice::open().map_err(gpu)?) };
    let load: Box<KernelLoader> = match &device {
        Some(device) => {
            say(format!(
                "device: {} (compute capability {}.{})",
                device.name, device.capability.0, device.capability.1
            ));
            Box::new(move |loops, ptx| {
                Ok(CheckedKernel::Gpu(einfuse::gpu::GpuKernel::load(device, loops, ptx).map_err(gpu)?))
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
        // `compile --target nvptx` compiles this optimized cascade; the launch must see the same one.
        let cascade = einfuse::optimize_for_gpu(written)?.cascade;
        if let Some(chunk) = form.strip_prefix("split") {
            let chunk: u64 = chunk.parse().map_err(|_| Error::Usage(format!("{line}: form `split<KEYS>` expected")))?;
            failures += gpu_check_split(&*load, emulate, artifacts, out, file, &cascade, chunk, ptx_file, &mut say)?;
            continue;
        }
        let loops = compiler::schedule::schedule(&cascade)?;
        let ptx_path = artifacts.join(ptx_file);
        let ptx = std::fs::read_to_string(&ptx_path).map_err(|e| io(&ptx_path, e))?;
        let kernel = load(&loops, &ptx)?;
        let (registers, local) = kernel.resources()?;
        let bench = form == "bench";
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
            let (extents, inputs) = einfuse::prepare_inputs(&cascade, &options)?;
            let slices: Vec<&[f32]> = inputs.iter().map(einfuse::Tensor::data).collect();
            if bench && s == 1 {
                let (outputs, times) = kernel.time(&extents, &slices, 10)?;
                let seconds = median(times);
                let flops = compiler::schedule::flop_count(&cascade, &extents);
                say(format!(
                    "bench {file} {name}: {:.3} ms, {:.1} GFLOP/s, registers {registers}, local bytes {local}",
                    seconds * 1e3,
                    flops / seconds / 1e9
                ));
                for (id, tensor) in cascade.inputs().iter().zip(&inputs) {
                    let path = out.join(format!("{name}.{}.npy", cascade.tensor(*id).name));
                    runtime::npy::write_npy(&path, tensor)?;
                }
                for (output_name, tensor) in einfuse::output_tensors(&cascade, &extents, outputs) {
                    runtime::npy::write_npy(&out.join(format!("{name}.{output_name}.npy")), &tensor)?;
                }
                let timing = out.join(format!("{name}.time.txt"));
                std::fs::write(&timing, format!("{seconds:.9}\n")).map_err(|e| io(&timing, e))?;
                continue;
            }
            let got = kernel.run(&extents, &slices)?;
            let reference =
                einfuse::run(&cascade, einfuse::Target::Interp, &RunOptions { check_finite: false, ..options })?;
            let want: Vec<Vec<f32>> = reference.iter().map(|(_, t)| t.data().to_vec()).collect();
            let error = largest_difference(&cascade, &got, &want);
            let verdict = if error <= 1e-4 { "ok" } else { "MISMATCH" };
            failures += usize::from(error > 1e-4);
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
#[cfg(feature = "cuda")]
const BENCH_SEED: u64 = 1;

/// The shape at which `gpu-check` checks a benchmark kernel against the interpreter (and, when
/// emulated, times it).
#[cfg(feature = "cuda")]
fn small_shape() -> Vec<(String, u64)> {
    vec![("M".into(), 100), ("P".into(), 70)]
}

/// The benchmark shape of a kernel of `benches/attention.ein`: decode streams 16384 keys for one
/// query, the others P = M = 4096.
#[cfg(feature = "cuda")]
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
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn gpu_check_split(
    load: &KernelLoader,
    emulate: bool,
    artifacts: &Path,
    out: &Path,
    file: &str,
    cascade: &compiler::ir::Cascade,
    chunk: u64,
    ptx_files: &str,
    say: &mut dyn FnMut(String),
) -> Result<usize, Error> {
    let io = |path: &Path, source| Error::Io { path: path.display().to_string(), source };
    let name = &cascade.name;
    let split = compiler::split::split_keys(cascade, chunk)
        .map_err(|why| Error::Usage(format!("kernel `{name}` does not split into chunks: {why}")))?;
    let Some((chunks_file, merge_file)) = ptx_files.split_once(',') else {
        return Err(Error::Usage(format!("{ptx_files}: two PTX files, comma-separated, expected")));
    };
    let mut kernels = Vec::new();
    for (part, ptx_file) in [(&split.chunks, chunks_file), (&split.merge, merge_file)] {
        let loops = compiler::schedule::schedule(part)?;
        let path = artifacts.join(ptx_file);
        let ptx = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        kernels.push(load(&loops, &ptx)?);
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
        let (extents, inputs) = einfuse::prepare_inputs(cascade, &options)?;
        let slices: Vec<&[f32]> = inputs.iter().map(einfuse::Tensor::data).collect();
        let got = einfuse::run_split_with(cascade, &split, &extents, &slices, &mut |part, extents, inputs| {
            let kernel = &kernels[usize::from(part == einfuse::SplitPart::Merge)];
            kernel.run(extents, inputs)
        })?;
        let reference = einfuse::run(cascade, einfuse::Target::Interp, &RunOptions { check_finite: false, ..options })?;
        let want: Vec<Vec<f32>> = reference.iter().map(|(_, t)| t.data().to_vec()).collect();
        let error = largest_difference(cascade, &got, &want);
        let verdict = if error <= 1e-4 { "ok" } else { "MISMATCH" };
        failures += usize::from(error > 1e-4);
        say(format!(
            "{verdict} {file} {name} split{chunk} {sizes:?}: relative error {error:.3e}, chunk kernel registers {registers}, local bytes {local}"
        ));
    }
    // Timed at the benchmark shape on a GPU (the small shape when emulated), on the inputs the
    // plain kernel was timed on.
    let shape = if emulate { small_shape() } else { bench_shape(name) };
    let bindings: Vec<(String, u64)> = shape.into_iter().filter(|(r, _)| symbolic(r)).collect();
    let options = RunOptions { bindings, seed: BENCH_SEED, ..RunOptions::default() };
    let (extents, inputs) = einfuse::prepare_inputs(cascade, &options)?;
    let slices: Vec<&[f32]> = inputs.iter().map(einfuse::Tensor::data).collect();
    let mut seconds = 0.0;
    let outputs = einfuse::run_split_with(cascade, &split, &extents, &slices, &mut |part, extents, inputs| {
        let kernel = &kernels[usize::from(part == einfuse::SplitPart::Merge)];
        let (outputs, times) = kernel.time(extents, inputs, 10)?;
        seconds += median(times);
        Ok(outputs)
    })?;
    say(format!("bench {file} {name} split{chunk}: {:.3} ms (chunks and merge, medians added)", seconds * 1e3));
    for (output_name, tensor) in einfuse::output_tensors(cascade, &extents, outputs) {
        runtime::npy::write_npy(&out.join(format!("{name}_split{chunk}.{output_name}.npy")), &tensor)?;
    }
    let timing = out.join(format!("{name}_split{chunk}.time.txt"));
    std::fs::write(&timing, format!("{seconds:.9}\n")).map_err(|e| io(&timing, e))?;
    Ok(failures)
}

/// The emulated kernels' loader (`gpu-check --emulate`): the PTX is read, not used.
#[cfg(all(feature = "cuda", feature = "llvm"))]
fn emulated_loader() -> Result<Box<KernelLoader<'static>>, Error> {
    Ok(Box::new(|loops, _ptx| Ok(CheckedKernel::Emulated(compiler::llvm::EmulatedKernel::new(loops)?))))
}

#[cfg(all(feature = "cuda", not(feature = "llvm")))]
fn emulated_loader() -> Result<Box<KernelLoader<'static>>, Error> {
    Err(Error::Usage("gpu-check --emulate needs LLVM, and this einfuse was built without the `llvm` feature".into()))
}

#[cfg(not(feature = "cuda"))]
fn gpu_check(_: &Path, _: &Path, _: bool) -> Result<(), Error> {
    Err(Error::Usage("gpu-check needs the `cuda` feature, and this einfuse was built without it".into()))
}

#[cfg(feature = "llvm")]
fn optimized_llvm(program: &compiler::schedule::LoopProgram, nvptx: bool) -> Result<String, Error> {
    let text = if nvptx {
        compiler::llvm::nvptx_ir(program)
    } else {
        compiler::llvm::host_ir(program, &compiler::cpu::object_symbol(&program.cascade))
    };
    Ok(compiler::llvm::machine::optimized_ir(&text, nvptx)?)
}

#[cfg(not(feature = "llvm"))]
fn optimized_llvm(_: &compiler::schedule::LoopProgram, _: bool) -> Result<String, Error> {
    Err(Error::Usage("LLVM IR needs LLVM, and this einfuse was built without the `llvm` feature".into()))
}
