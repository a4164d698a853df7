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
    /// Compile a kernel ahead of time: an object file and a C header beside it.
    Compile {
        file: PathBuf,
        /// The kernel (required when the file has several).
        #[arg(long)]
        kernel: Option<String>,
        /// The target (`cpu`: an object file for this machine).
        #[arg(long, value_enum, default_value = "cpu")]
        target: CompileTarget,
        /// The object file to write; the header is written beside it with the extension `.h`.
        #[arg(short, long)]
        output: PathBuf,
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
    /// The Loop IR: buffers, loops and the Einsums in them (of the optimized cascade).
    Loops,
    /// The Cranelift IR of the CPU kernel (of the optimized cascade).
    Clif,
}

#[derive(Clone, Copy, ValueEnum)]
enum CompileTarget {
    /// An object file for this machine (Cranelift), and a C header.
    Cpu,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    /// The reference interpreter.
    Interp,
    /// The Cranelift CPU back end (the kernel is optimized first).
    Cpu,
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
        Command::Emit { stage, file, kernel } => {
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
                Stage::Loops | Stage::Clif => {
                    let program = Program::from_file(&file)?;
                    let mut text = String::new();
                    for k in program.selected(kernel.as_deref())? {
                        let optimized = einfuse::optimize(k)?.cascade;
                        let loops = compiler::schedule::schedule(&optimized)?;
                        text.push_str(&match stage {
                            Stage::Loops => compiler::schedule::print_program(&loops),
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
        Command::Compile { file, kernel, target: CompileTarget::Cpu, output } => {
            let program = Program::from_file(&file)?;
            let optimized = einfuse::optimize(program.kernel(kernel.as_deref())?)?.cascade;
            let loops = compiler::schedule::schedule(&optimized)?;
            let object = compiler::cpu::compile_object(&loops)?;
            let header = compiler::cpu::header::c_header(&loops);
            let header_path = output.with_extension("h");
            let io = |path: &Path, source| Error::Io { path: path.display().to_string(), source };
            std::fs::write(&output, object).map_err(|e| io(&output, e))?;
            std::fs::write(&header_path, header).map_err(|e| io(&header_path, e))?;
            println!("wrote {} and {}", output.display(), header_path.display());
            Ok(())
        }
        Command::Bench { file, kernel, bindings, runs, json, threads } => {
            bench(&file, kernel.as_deref(), bindings, runs, json, threads.unwrap_or_else(einfuse::all_cores))
        }
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
    };
    for (name, path) in &args.inputs {
        let Some(id) = kernel.tensor_by_name(name).filter(|id| kernel.inputs().contains(id)) else {
            return Err(Error::Usage(format!("kernel `{}` has no input `{name}`", kernel.name)));
        };
        let compiler::ir::TensorKind::Input { elem } = kernel.tensor(id).kind else { unreachable!() };
        let tensor = runtime::npy::read_npy(path, einfuse::dtype_of(elem))?;
        options.inputs.push((name.clone(), tensor));
    }
    let (target, kernel) = match args.target {
        TargetArg::Interp => (Target::Interp, kernel.clone()),
        TargetArg::Cpu => (Target::Cpu, einfuse::optimize(kernel)?.cascade),
    };
    let outputs = einfuse::run(&kernel, target, &options)?;
    if args.check {
        let reference = einfuse::run(&kernel, Target::Interp, &RunOptions { check_finite: false, ..options.clone() })?;
        let mut worst_abs = 0.0f64;
        let mut worst_rel = 0.0f64;
        for ((_, got), (_, want)) in outputs.iter().zip(&reference) {
            for (a, b) in got.data().iter().zip(want.data()) {
                let (a, b) = (*a as f64, *b as f64);
                if a.is_nan() && b.is_nan() {
                    continue;
                }
                let abs = (a - b).abs();
                worst_abs = worst_abs.max(abs);
                worst_rel = worst_rel.max(abs / (1.0 + b.abs()));
            }
        }
        println!("check against the interpreter: largest absolute error {worst_abs:.3e}, relative {worst_rel:.3e}");
        if !(worst_rel <= args.tolerance) {
            return Err(Error::Usage(format!(
                "the outputs differ from the interpreter's by {worst_rel:.3e} (relative), more than {}",
                args.tolerance
            )));
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

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

fn bench(
    file: &Path,
    kernel: Option<&str>,
    bindings: Vec<(String, u64)>,
    runs: usize,
    json: bool,
    threads: usize,
) -> Result<(), Error> {
    use std::time::Instant;
    let runs = runs.max(1);
    let program = Program::from_file(file)?;
    let written = program.kernel(kernel)?;
    let options = RunOptions { bindings, seed: 1, ..RunOptions::default() };
    let (extents, inputs) = einfuse::prepare_inputs(written, &options)?;
    let slices: Vec<&[f32]> = inputs.iter().map(einfuse::Tensor::data).collect();
    // Source to a callable kernel: parse, check, optimize, schedule, compile.
    let source = einfuse::read_source(file)?;
    let mut compile_times = Vec::new();
    let mut fused = None;
    for _ in 0..3 {
        let start = Instant::now();
        let program = Program::from_source(&file.display().to_string(), &source)?;
        let optimized = einfuse::optimize(program.kernel(kernel)?)?.cascade;
        fused = Some(einfuse::compile_cpu(&optimized)?);
        compile_times.push(start.elapsed().as_secs_f64());
    }
    let fused = fused.expect("compiled");
    let unfused = einfuse::compile_cpu(written)?;
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
    let median_s = time(&fused)?;
    let unfused_median_s = time(&unfused)?;
    let flops = compiler::schedule::flop_count(written, &extents);
    let bytes: f64 = inputs.iter().map(|t| t.len() as f64 * 4.0).sum::<f64>()
        + written
            .outputs
            .iter()
            .map(|o| compiler::shapes::tensor_shape(written, o.tensor, &extents).iter().product::<u64>() as f64 * 4.0)
            .sum::<f64>();
    let gflops = flops / median_s / 1e9;
    let gbps = bytes / median_s / 1e9;
    let peak_extra_bytes = fused.scratch_bytes(&extents_of(&fused)?);
    let compile_s = median(compile_times);
    let speedup = unfused_median_s / median_s;
    if json {
        println!(
            "{{\"kernel\": {}, \"median_s\": {median_s:.6e}, \"gflops\": {gflops:.3}, \"gbps\": {gbps:.3}, \
             \"unfused_median_s\": {unfused_median_s:.6e}, \"speedup_vs_unfused\": {speedup:.3}, \
             \"peak_extra_bytes\": {peak_extra_bytes}, \"unfused_extra_bytes\": {}, \"compile_s\": {compile_s:.6e}, \
             \"threads\": {threads}, \"runs\": {runs}}}",
            json_string(&written.name),
            unfused.scratch_bytes(&extents)
        );
    } else {
        println!("kernel {} ({runs} runs, medians, {threads} thread(s))", written.name);
        println!(
            "  fused:    {:>10.3} ms  {gflops:>8.2} GFLOP/s  {gbps:>8.2} GB/s  scratch {peak_extra_bytes} bytes",
            median_s * 1e3
        );
        println!("  unfused:  {:>10.3} ms  scratch {} bytes", unfused_median_s * 1e3, unfused.scratch_bytes(&extents));
        println!("  speedup vs unfused: {speedup:.2}x");
        println!("  source to callable kernel: {:.2} ms", compile_s * 1e3);
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
