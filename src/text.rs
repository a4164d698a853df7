//! The text the inspecting commands print: `emit` (every stage), `analyze` (passes per rank, as
//! text or JSON) and `explain` (the optimizer's derivation).
//!
//! Needs: a checked `Program` (or, for the syntax tree, its source). Guarantees: the command line
//! and the Python package (`einfuse.emit`, `einfuse.analyze`) print and return the same text and
//! the same JSON, because both call these functions and nothing else.

use crate::{compiler, dsl, BuildOptions, Error, Program, Target};

/// A stage of compilation `emit` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EmitStage {
    /// The syntax tree (printed even when checking fails, but not when parsing fails).
    Ast,
    /// The checked Cascade IR, as `.ein`.
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

/// Which LLVM module `emit --stage llvm` and `llvm-opt` print.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LlvmTarget {
    Nvptx,
    CpuLlvm,
}

/// What `emit` prints besides the stage.
#[derive(Clone, Copy, Debug)]
pub struct EmitOptions<'a> {
    /// Only this kernel (default: every kernel).
    pub kernel: Option<&'a str>,
    /// For the LLVM stages: the module for the GPU or for this CPU; for the loops, `CpuLlvm`
    /// prints the `cpu-llvm` tier's schedule (else the `cpu` tier's).
    pub target: LlvmTarget,
    /// For the split stage: keys per chunk.
    pub chunk: u64,
}

impl Default for EmitOptions<'_> {
    fn default() -> Self {
        EmitOptions { kernel: None, target: LlvmTarget::Nvptx, chunk: 1024 }
    }
}

/// The text of `einfuse emit --stage STAGE` for the source `source` (errors rendered with `path`).
pub fn emit(path: &str, source: &str, stage: EmitStage, options: &EmitOptions) -> Result<String, Error> {
    if stage == EmitStage::Ast {
        return emit_ast(path, source, options.kernel);
    }
    let program = Program::from_source(path, source)?;
    let selected = program.selected(options.kernel)?;
    Ok(match stage {
        EmitStage::Ast => unreachable!("above"),
        EmitStage::Ir => compiler::print::print_cascades(&selected.into_iter().cloned().collect::<Vec<_>>()),
        EmitStage::Opt => {
            let mut kernels = Vec::new();
            for k in selected {
                kernels.push(crate::optimize(k)?.cascade);
            }
            compiler::print::print_cascades(&kernels)
        }
        EmitStage::Split => {
            let mut kernels = Vec::new();
            for k in selected {
                let optimized = crate::optimize(k)?.cascade;
                let split = compiler::split::split_keys(&optimized, options.chunk)
                    .map_err(|why| Error::Usage(format!("kernel `{}` does not split into chunks: {why}", k.name)))?;
                kernels.push(split.chunks);
                kernels.push(split.merge);
            }
            compiler::print::print_cascades(&kernels)
        }
        EmitStage::Loops | EmitStage::Clif | EmitStage::Llvm | EmitStage::LlvmOpt | EmitStage::Ptx => {
            let mut text = String::new();
            for k in selected {
                // The stages of the kernel as its target builds it: the loops as `cpu-llvm`
                // builds them with `--target cpu-llvm`, else as `cpu`; CLIF as `cpu`; LLVM IR as
                // `cpu-llvm` or the GPU; PTX as the GPU.
                let built_for = match (stage, options.target) {
                    (EmitStage::Ptx, _) | (EmitStage::Llvm | EmitStage::LlvmOpt, LlvmTarget::Nvptx) => Target::Gpu,
                    (EmitStage::Loops | EmitStage::Llvm | EmitStage::LlvmOpt, LlvmTarget::CpuLlvm) => Target::CpuLlvm,
                    _ => Target::Cpu,
                };
                let build = BuildOptions { tile: None, ..BuildOptions::new(built_for) };
                let scheduled = crate::pipeline::schedule_kernel(k, &build)?;
                let loops = &scheduled.loops[0];
                let nvptx = options.target == LlvmTarget::Nvptx;
                text.push_str(&match stage {
                    EmitStage::Loops => compiler::schedule::print_program(loops),
                    EmitStage::Llvm => llvm_ir(loops, nvptx)?,
                    EmitStage::LlvmOpt => optimized_llvm(&llvm_ir(loops, nvptx)?, nvptx)?,
                    EmitStage::Ptx => crate::pipeline::ptx(loops, "sm_80")?,
                    _ => compiler::cpu::compile(loops)?.clif.clone(),
                });
            }
            text
        }
    })
}

/// The syntax tree is printed even when checking would fail, but not when parsing fails.
fn emit_ast(path: &str, source: &str, kernel: Option<&str>) -> Result<String, Error> {
    let (mut ast, diagnostics) = dsl::parse(source);
    if !diagnostics.is_empty() {
        return Err(Error::Source {
            rendered: dsl::diagnostic::render_all(&diagnostics, path, source),
            count: diagnostics.len(),
        });
    }
    if let Some(name) = kernel {
        ast.kernels.retain(|k| k.name.text == name);
        if ast.kernels.is_empty() {
            return Err(Error::Usage(format!("{path} has no kernel `{name}`")));
        }
    }
    Ok(ast.to_string())
}

#[cfg(feature = "llvm")]
fn llvm_ir(program: &compiler::schedule::LoopProgram, nvptx: bool) -> Result<String, Error> {
    Ok(match nvptx {
        true => compiler::llvm::nvptx_ir(program),
        false => compiler::llvm::host_ir(program, &compiler::cpu::object_symbol(&program.cascade)),
    })
}

#[cfg(feature = "llvm")]
fn optimized_llvm(text: &str, nvptx: bool) -> Result<String, Error> {
    Ok(compiler::llvm::machine::optimized_ir(text, nvptx)?)
}

#[cfg(not(feature = "llvm"))]
fn llvm_ir(_: &compiler::schedule::LoopProgram, _: bool) -> Result<String, Error> {
    Err(Error::Usage("LLVM IR needs LLVM, and this einfuse was built without the `llvm` feature".into()))
}

#[cfg(not(feature = "llvm"))]
fn optimized_llvm(_: &str, _: bool) -> Result<String, Error> {
    unreachable!("llvm_ir fails first")
}

/// The pass analysis of each selected kernel, as written and optimized.
struct Analysis<'a> {
    kernel: &'a compiler::ir::Cascade,
    written: compiler::passcount::PassReport,
    optimized: compiler::optimize::Optimized,
    optimized_report: compiler::passcount::PassReport,
}

fn analyses<'a>(program: &'a Program, kernel: Option<&str>) -> Result<Vec<Analysis<'a>>, Error> {
    let mut results = Vec::new();
    for kernel in program.selected(kernel)? {
        let optimized = crate::optimize(kernel)?;
        let optimized_report = compiler::passcount::analyze(&optimized.cascade);
        results.push(Analysis { kernel, written: compiler::passcount::analyze(kernel), optimized, optimized_report });
    }
    Ok(results)
}

/// `einfuse analyze --json`: `{"kernels": [{"name", "passes", "optimized_passes"}]}`, passes by
/// rank.
pub fn analyze_json(program: &Program, kernel: Option<&str>) -> Result<serde_json::Value, Error> {
    let counts = |c: Vec<(String, usize)>| -> serde_json::Map<String, serde_json::Value> {
        c.into_iter().map(|(rank, n)| (rank, n.into())).collect()
    };
    let entries: Vec<serde_json::Value> = analyses(program, kernel)?
        .into_iter()
        .map(|a| {
            serde_json::json!({
                "name": a.written.kernel,
                "passes": counts(a.written.counts()),
                "optimized_passes": counts(a.optimized_report.counts()),
            })
        })
        .collect();
    Ok(serde_json::json!({ "kernels": entries }))
}

/// `einfuse analyze`: the passes as written, why each extra one is needed, and after optimizing.
pub fn analyze_text(program: &Program, kernel: Option<&str>) -> Result<String, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    for a in analyses(program, kernel)? {
        writeln!(out, "kernel {}", a.kernel.name).unwrap();
        writeln!(out, "  as written:").unwrap();
        for line in compiler::passcount::describe(a.kernel, &a.written).lines() {
            writeln!(out, "  {line}").unwrap();
        }
        match &a.optimized.note {
            Some(note) => writeln!(out, "  optimized: kept as written ({note})").unwrap(),
            None => {
                let o = &a.optimized;
                writeln!(out, "  optimized ({} rewrite iterations, {} e-nodes, {}):", o.iterations, o.nodes, o.stop)
                    .unwrap();
                for line in compiler::passcount::describe(&o.cascade, &a.optimized_report).lines() {
                    writeln!(out, "  {line}").unwrap();
                }
            }
        }
    }
    Ok(out)
}

/// `einfuse explain`: the rewrites, the derivation of the first output's term, what forces the
/// passes that remain, and the optimized cascade.
pub fn explain(program: &Program, kernel: Option<&str>) -> Result<String, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    for kernel in program.selected(kernel)? {
        let result = crate::optimize(kernel)?;
        writeln!(out, "kernel {}", kernel.name).unwrap();
        writeln!(out, "== as written").unwrap();
        out.push_str(&compiler::print::print_cascade(kernel));
        writeln!(out, "== rewrites ({} iterations, {} e-nodes, {})", result.iterations, result.nodes, result.stop)
            .unwrap();
        for (iteration, rule, times) in &result.applied {
            let what = compiler::optimize::rules::describe(rule);
            writeln!(out, "  iteration {iteration}: {rule} x{times}: {what}").unwrap();
        }
        let passes = |map: &std::collections::BTreeMap<String, u32>| {
            map.iter().map(|(r, n)| format!("{r}: {n}")).collect::<Vec<_>>().join(", ")
        };
        writeln!(
            out,
            "== passes: as written {{{}}}, chosen {{{}}}",
            passes(&result.input_passes),
            passes(&result.claimed_passes)
        )
        .unwrap();
        let steps = compiler::optimize::derivation(kernel, &compiler::optimize::OptimizeOptions::default());
        if steps.len() > 1 {
            writeln!(
                out,
                "== derivation of the first output's term ({} rewrites; each line is the term after one)",
                steps.len() - 1
            )
            .unwrap();
            for (n, step) in steps.iter().enumerate() {
                writeln!(out, "  {n:>2}: {step}").unwrap();
            }
        }
        // Where more than one pass remains, the reads that force each extra one.
        let report = compiler::passcount::analyze(&result.cascade);
        if report.ranks.iter().any(|r| r.passes > 1) {
            writeln!(out, "== what forces the passes that remain").unwrap();
            for line in compiler::passcount::describe(&result.cascade, &report).lines() {
                if line.contains("needed because") || line.contains("no rewrite removes") {
                    writeln!(out, "  {}", line.trim_start()).unwrap();
                }
            }
        }
        match &result.note {
            Some(note) => writeln!(out, "== kept as written: {note}").unwrap(),
            None => {
                writeln!(out, "== optimized").unwrap();
                out.push_str(&compiler::print::print_cascade(&result.cascade));
            }
        }
        writeln!(out).unwrap();
    }
    Ok(out)
}
