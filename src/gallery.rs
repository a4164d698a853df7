//! The gallery: every kernel of `examples/` with its source, its passes as written and
//! optimized, the optimized source, and its pictures (`docs/gallery.md`, made by
//! `scripts/gallery.sh`; a test checks that the committed page is up to date).

use std::fmt::Write;
use std::path::Path;

use crate::compiler::{graph, passcount, print};
use crate::{Error, Program};

/// The page and the pictures (as DOT, to be rendered to `gallery/NAME.svg`).
pub struct Gallery {
    pub markdown: String,
    /// (picture name without extension, DOT text).
    pub pictures: Vec<(String, String)>,
}

/// The comment lines just above `kernel NAME`, without their `#`.
fn description(source: &str, kernel: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let Some(at) = lines.iter().position(|l| l.trim_start().starts_with(&format!("kernel {kernel} "))) else {
        return String::new();
    };
    let mut start = at;
    while start > 0 && lines[start - 1].trim_start().starts_with('#') {
        start -= 1;
    }
    lines[start..at].iter().map(|l| l.trim_start().trim_start_matches('#').trim()).collect::<Vec<_>>().join(" ")
}

/// The kernel's source as written, from `kernel` to its closing brace.
fn kernel_source(source: &str, kernel: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let Some(at) = lines.iter().position(|l| l.trim_start().starts_with(&format!("kernel {kernel} "))) else {
        return String::new();
    };
    let end = lines[at..].iter().position(|l| l.trim_end() == "}").map_or(lines.len(), |e| at + e + 1);
    lines[at..end].join("\n")
}

fn counts(report: &passcount::PassReport, rank: &str) -> String {
    report.passes(rank).map_or("-".to_string(), |n| n.to_string())
}

/// Builds the gallery from every `.ein` file of `examples`, in name order.
pub fn build(examples: &Path) -> Result<Gallery, Error> {
    let mut files: Vec<_> = std::fs::read_dir(examples)
        .map_err(|source| Error::Io { path: examples.display().to_string(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "ein"))
        .collect();
    files.sort();
    let mut md = String::new();
    let mut pictures = Vec::new();
    let mut summary = String::new();
    let mut sections = String::new();
    writeln!(summary, "| kernel | file | passes over the streamed rank, as written | optimized |").unwrap();
    writeln!(summary, "| --- | --- | --- | --- |").unwrap();
    for path in &files {
        let program = Program::from_file(path)?;
        let file = path.file_name().expect("a file").to_string_lossy().into_owned();
        let stem = file.trim_end_matches(".ein").to_string();
        for kernel in &program.kernels {
            let written = passcount::analyze(kernel);
            let optimized = crate::optimize(kernel)?;
            let optimized_report = passcount::analyze(&optimized.cascade);
            let rank = graph::streamed_rank(kernel, &written).unwrap_or_default();
            let picture = format!("{stem}-{}", kernel.name);
            pictures.push((picture.clone(), graph::to_dot_with_passes(kernel, &written, &rank)));
            pictures.push((
                format!("{picture}-optimized"),
                graph::to_dot_with_passes(&optimized.cascade, &optimized_report, &rank),
            ));
            writeln!(
                summary,
                "| [{}](#{}) | `{file}` | {} | {} |",
                kernel.name,
                kernel.name.replace('_', "-"),
                counts(&written, &rank),
                counts(&optimized_report, &rank)
            )
            .unwrap();

            writeln!(sections, "### {}\n", kernel.name).unwrap();
            let about = description(&program.source, &kernel.name);
            if !about.is_empty() {
                writeln!(sections, "{about}\n").unwrap();
            }
            writeln!(
                sections,
                "From `examples/{file}`:\n\n```\n{}\n```\n",
                kernel_source(&program.source, &kernel.name)
            )
            .unwrap();
            let mut ranks: Vec<String> = written.ranks.iter().map(|r| r.rank.clone()).collect();
            for r in &optimized_report.ranks {
                if !ranks.contains(&r.rank) {
                    ranks.push(r.rank.clone());
                }
            }
            writeln!(sections, "| rank | passes as written | optimized |\n| --- | --- | --- |").unwrap();
            for r in &ranks {
                writeln!(sections, "| {r} | {} | {} |", counts(&written, r), counts(&optimized_report, r)).unwrap();
            }
            writeln!(sections).unwrap();
            let why: Vec<String> = passcount::describe(kernel, &written)
                .lines()
                .filter(|l| l.contains("is needed because") || l.contains("no rewrite") || l.contains("warning"))
                .map(|l| format!("- {}", l.trim()))
                .collect();
            if !why.is_empty() {
                writeln!(sections, "{}\n", why.join("\n")).unwrap();
            }
            match &optimized.note {
                Some(note) => writeln!(sections, "The optimizer keeps it as written: {note}.\n").unwrap(),
                None => writeln!(
                    sections,
                    "Optimized (`einfuse emit --stage opt examples/{file} --kernel {}`):\n\n```\n{}```\n",
                    kernel.name,
                    print::print_cascade(&optimized.cascade)
                )
                .unwrap(),
            }
            writeln!(
                sections,
                "| as written | optimized |\n| --- | --- |\n| ![{0} as written](gallery/{1}.svg) | ![{0} optimized](gallery/{1}-optimized.svg) |\n",
                kernel.name, picture
            )
            .unwrap();
        }
    }
    writeln!(md, "# Gallery\n").unwrap();
    writeln!(
        md,
        "Every kernel of `examples/`, with its passes over each rank as written and after the e-graph optimizer, \
         the optimized cascade, and its dependency graph: each tensor is coloured by the pass over the streamed \
         rank in which it is computed, and a dashed red edge is a read-read dependency that forces an extra pass. \
         Every kernel here is checked against the reference interpreter, as written and optimized, by the tests \
         (`tests/optimizer.rs`). This page is generated by `bash scripts/gallery.sh`; do not edit it by hand.\n"
    )
    .unwrap();
    writeln!(md, "## Summary\n\n{summary}\n## Kernels\n\n{sections}").unwrap();
    md.push_str(FLEX_COMPARISON);
    Ok(Gallery { markdown: md, pictures })
}

const FLEX_COMPARISON: &str = "\
## einfuse and PyTorch FlexAttention

FlexAttention (`torch.nn.attention.flex_attention`) fixes the algorithm, softmax attention, and lets
a user change the scores (`score_mod(score, b, h, q_idx, kv_idx)`) and skip them (`mask_mod`, turned
into a block mask). einfuse takes the whole cascade as input, so the normalisation, the reductions
and the recurrences are the user's too.

| kernel | FlexAttention | workaround there | einfuse |
| --- | --- | --- | --- |
| softmax attention, scaled | yes | | yes |
| causal, sliding window, document masking | yes (`mask_mod`) | | yes (`where`) |
| padding mask from a tensor | yes (`mask_mod` reading a captured tensor) | | yes (`where Mask[p, m] != 0`) |
| ALiBi, tanh soft-capping | yes (`score_mod`) | | yes |
| grouped-query and multi-query attention, decode | yes (`enable_gqa`; decoding kernels) | | yes |
| learned sink in the denominator | no: the sink joins the denominator only | `return_lse=True`, then rescale: `out * sigmoid(lse - sink)`; or pad K and V with a sink column whose value is 0 | yes |
| sigmoid attention | no: softmax is fixed | a separate kernel (FlashSigmoid) | yes |
| softplus with l1 normalisation, StableMax, ReLU attention | no | a separate kernel | yes |
| softmax with a fixed maximum | no (the online softmax is built in) | not needed there | yes, with a warning and an overflow check |
| softmax alone | no (attention only) | `torch.softmax` | yes (2 passes) |
| causal linear attention, state-space scans | no (not softmax attention) | other libraries (flash-linear-attention, Mamba's kernels) | yes (iterative ranks) |
";
