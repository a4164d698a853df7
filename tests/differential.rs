//! Differential testing with generated cascades: the interpreter on the cascade as written, the
//! interpreter on the optimized cascade, the Cranelift back end on both, the LLVM CPU tier on the
//! cascade as written and the host emulation of the GPU kernel on the optimized one, and the
//! split-key form of the optimized one (where it splits, chunks of two tiles) must agree; so must
//! the optimized one run as a shard of a longer sequence (every batch rank offset) on the
//! interpreter and both CPU tiers. A
//! failure is shrunk (smaller extents, fewer lines, while it still fails), printed as `.ein` with
//! its extents and, when `EINFUSE_SAVE_REGRESSIONS` is set, saved under `tests/regressions/`;
//! every file there is run by `regressions_still_pass`.
//!
//! `cargo test --release --test differential -- --ignored` runs a longer campaign
//! (`EINFUSE_DIFF_CASES`, default 5000 cascades).

use einfuse::compiler::generate::{generate, Generated};
use einfuse::compiler::interp::{interpret, InterpLimits};
use einfuse::compiler::ir::{Cascade, TensorKind};
use einfuse::compiler::print::print_cascade;
use einfuse::compiler::shapes::{bind_extents, tensor_shape};
use einfuse::{DType, Tensor};

fn inputs(cascade: &Cascade, extents: &[u64], seed: u64) -> Vec<Tensor> {
    cascade
        .inputs()
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let shape = tensor_shape(cascade, *id, extents).iter().map(|s| *s as usize).collect();
            let TensorKind::Input { elem } = cascade.tensor(*id).kind else { unreachable!("an input") };
            Tensor::random(einfuse::dtype_of(elem), shape, seed * 31 + n as u64).unwrap()
        })
        .collect()
}

fn interp(cascade: &Cascade, bindings: &[(String, u64)], inputs: &[Tensor]) -> Vec<Vec<f64>> {
    let extents = bind_extents(cascade, bindings, &[]).unwrap();
    let data: Vec<Vec<f64>> = inputs.iter().map(Tensor::to_f64).collect();
    let slices: Vec<&[f64]> = data.iter().map(Vec::as_slice).collect();
    interpret(cascade, &extents, &slices, InterpLimits::default()).unwrap()
}

fn cpu(cascade: &Cascade, bindings: &[(String, u64)], inputs: &[Tensor]) -> Vec<Vec<f64>> {
    let extents = bind_extents(cascade, bindings, &[]).unwrap();
    let kernel = einfuse::compile_cpu(cascade).unwrap();
    let slices: Vec<&[f32]> = inputs.iter().map(Tensor::data).collect();
    kernel.run(&extents, &slices).unwrap().into_iter().map(|o| o.into_iter().map(|x| x as f64).collect()).collect()
}

fn to_f64(outputs: Vec<Vec<f32>>) -> Vec<Vec<f64>> {
    outputs.into_iter().map(|o| o.into_iter().map(|x| x as f64).collect()).collect()
}

#[cfg(feature = "llvm")]
fn cpu_llvm(cascade: &Cascade, bindings: &[(String, u64)], inputs: &[Tensor]) -> Vec<Vec<f64>> {
    let extents = bind_extents(cascade, bindings, &[]).unwrap();
    let kernel = einfuse::compile_cpu_llvm(cascade).unwrap();
    let slices: Vec<&[f32]> = inputs.iter().map(Tensor::data).collect();
    to_f64(kernel.run(&extents, &slices).unwrap())
}

#[cfg(feature = "llvm")]
fn emulated(cascade: &Cascade, bindings: &[(String, u64)], inputs: &[Tensor]) -> Vec<Vec<f64>> {
    let extents = bind_extents(cascade, bindings, &[]).unwrap();
    let kernel = einfuse::compile_emulated(cascade).unwrap();
    let slices: Vec<&[f32]> = inputs.iter().map(Tensor::data).collect();
    to_f64(kernel.run(&extents, &slices).unwrap())
}

/// How strictly two runs must agree.
#[derive(Clone, Copy)]
enum Strictness {
    /// Same NaNs, same values within the tolerance.
    Exact,
    /// As `Exact`, except that where the cascade as written gives NaN because every score of an
    /// online sum is -inf (`exp(-inf - -inf)`), the optimized form gives a number: its running
    /// maximum starts at the lowest finite f32 (see `optimize::from_egg`), a documented divergence.
    Optimized,
}

/// Whether two runs' outputs agree. An output stored as f16 or bf16 is compared rounded to its
/// type (a GPU kernel stores it rounded), within one unit in its last place more, since two
/// values a rounding error apart may round to neighbours.
fn agree(
    cascade: &Cascade,
    a: &[Vec<f64>],
    b: &[Vec<f64>],
    tolerance: f64,
    strictness: Strictness,
) -> Result<(), String> {
    for (o, (x, y)) in a.iter().zip(b).enumerate() {
        if x.len() != y.len() {
            return Err(format!("output {o}: {} vs {} elements", x.len(), y.len()));
        }
        let dtype = einfuse::dtype_of(cascade.outputs[o].elem);
        let (tolerance, round): (f64, &dyn Fn(f64) -> f64) = match dtype {
            DType::F32 => (tolerance, &|v| v),
            DType::F16 => (tolerance + 2f64.powi(-10), &|v| DType::F16.round(v as f32) as f64),
            DType::Bf16 => (tolerance + 2f64.powi(-7), &|v| DType::Bf16.round(v as f32) as f64),
        };
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            let (p, q) = (&round(*p), &round(*q));
            let forgiven = matches!(strictness, Strictness::Optimized) && p.is_nan();
            let same = forgiven
                || (p.is_nan() && q.is_nan())
                || p == q
                || (p - q).abs() <= tolerance * (1.0 + p.abs().max(q.abs()));
            if !same {
                return Err(format!("output {o}, element {i}: {p} vs {q}"));
            }
        }
    }
    Ok(())
}

/// Runs every path on one generated cascade.
fn check(generated: &Generated) -> Result<(), String> {
    let Generated { cascade, bindings } = generated;
    let text = print_cascade(cascade);
    let parsed = einfuse::compiler::compile_source(&text).map_err(|d| format!("does not check: {d:?}"))?;
    if parsed[0] != *cascade {
        return Err("printing does not round-trip".into());
    }
    let optimized = einfuse::optimize(cascade).map_err(|e| e.to_string())?.cascade;
    let extents = bind_extents(cascade, bindings, &[]).map_err(|e| e.to_string())?;
    let data = inputs(cascade, &extents, 7);
    let reference = interp(cascade, bindings, &data);
    let optimized_reference = interp(&optimized, bindings, &data);
    agree(cascade, &reference, &optimized_reference, 1e-9, Strictness::Optimized)
        .map_err(|e| format!("optimized interpreter: {e}"))?;
    agree(cascade, &reference, &cpu(cascade, bindings, &data), 1e-4, Strictness::Exact)
        .map_err(|e| format!("cpu as written: {e}"))?;
    agree(cascade, &optimized_reference, &cpu(&optimized, bindings, &data), 1e-4, Strictness::Exact)
        .map_err(|e| format!("cpu optimized: {e}"))?;
    if let Some(split) = split_form(&optimized) {
        let slices: Vec<&[f32]> = data.iter().map(Tensor::data).collect();
        for target in [einfuse::Target::Interp, einfuse::Target::Cpu] {
            let options = einfuse::BuildOptions {
                optimize: false,
                split_keys: Some(split.chunk),
                ..einfuse::BuildOptions::new(target)
            };
            let built = einfuse::build(&optimized, &options).map_err(|e| e.to_string())?;
            let got = built.run(&extents, &slices, 2).map_err(|e| e.to_string())?;
            agree(cascade, &optimized_reference, &to_f64(got), 1e-4, Strictness::Exact)
                .map_err(|e| format!("split-key form on {}: {e}", target.name()))?;
        }
    }
    let optimized_extents = bind_extents(&optimized, bindings, &[]).map_err(|e| e.to_string())?;
    shifted(&optimized, &optimized_extents, &data)?;
    #[cfg(feature = "llvm")]
    {
        agree(cascade, &reference, &cpu_llvm(cascade, bindings, &data), 1e-4, Strictness::Exact)
            .map_err(|e| format!("cpu-llvm as written: {e}"))?;
        agree(cascade, &optimized_reference, &emulated(&optimized, bindings, &data), 1e-4, Strictness::Exact)
            .map_err(|e| format!("emulated GPU kernel, optimized: {e}"))?;
    }
    Ok(())
}

/// The cascade run as a shard of a longer sequence: every batch rank offset (`origins`, as
/// `CallOptions::offsets`), the interpreter against both CPU tiers on two threads, so that the
/// calls' chunk bases and the caller's offsets add up.
fn shifted(cascade: &Cascade, extents: &[u64], data: &[Tensor]) -> Result<(), String> {
    use einfuse::compiler::schedule::layout::is_batch_rank;
    let origins: Vec<i64> = (0..cascade.ranks.len())
        .map(|r| match is_batch_rank(cascade, einfuse::compiler::ir::RankId::new(r)) {
            true => 37 * r as i64 - 50,
            false => 0,
        })
        .collect();
    if origins.iter().all(|o| *o == 0) {
        return Ok(());
    }
    SHIFTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let wide: Vec<Vec<f64>> = data.iter().map(Tensor::to_f64).collect();
    let wide: Vec<&[f64]> = wide.iter().map(Vec::as_slice).collect();
    let want = einfuse::compiler::interp::interpret_at(cascade, extents, &origins, &wide, InterpLimits::default())
        .map_err(|e| e.to_string())?;
    let slices: Vec<&[f32]> = data.iter().map(Tensor::data).collect();
    let cpu = einfuse::compile_cpu(cascade).map_err(|e| e.to_string())?;
    let got = cpu.run_threads_at(extents, &slices, 2, &origins).map_err(|e| e.to_string())?;
    agree(cascade, &want, &to_f64(got), 1e-4, Strictness::Exact).map_err(|e| format!("cpu with offsets: {e}"))?;
    #[cfg(feature = "llvm")]
    {
        let llvm = einfuse::compile_cpu_llvm(cascade).map_err(|e| e.to_string())?;
        let got = llvm.run_threads_at(extents, &slices, 2, &origins).map_err(|e| e.to_string())?;
        agree(cascade, &want, &to_f64(got), 1e-4, Strictness::Exact)
            .map_err(|e| format!("cpu-llvm with offsets: {e}"))?;
    }
    Ok(())
}

/// The split-key form of a cascade with chunks of two tiles, where it splits.
fn split_form(cascade: &Cascade) -> Option<einfuse::compiler::split::SplitKeys> {
    let index = cascade.einsums.iter().find_map(|e| e.recurrence_index())?;
    let einfuse::compiler::ir::Extent::Split { tile, .. } = cascade.rank(index.rank).extent else { return None };
    let einfuse::compiler::ir::Extent::Fixed(tile) = cascade.rank(tile).extent else { return None };
    let split = einfuse::compiler::split::split_keys(cascade, 2 * tile).ok()?;
    SPLIT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Some(split)
}

/// How many checked cascades ran as shards (had a batch rank to offset).
static SHIFTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many checked cascades had a split-key form.
static SPLIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `check` that turns a panic into a failure.
fn outcome(generated: &Generated) -> Result<(), String> {
    std::panic::catch_unwind(|| check(generated)).unwrap_or_else(|panic| {
        let text =
            panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(format!("panic: {}", text.unwrap_or_default()))
    })
}

/// A smaller cascade that still fails: extents halved toward 1, then lines of its text (Einsums,
/// outputs) removed one at a time while the rest still checks and still fails, to a fixpoint.
fn shrink(failing: &Generated) -> Generated {
    let mut best = failing.clone();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let mut changed = false;
        for i in 0..best.bindings.len() {
            while best.bindings[i].1 > 1 {
                let mut trial = best.clone();
                trial.bindings[i].1 /= 2;
                if outcome(&trial).is_err() {
                    best = trial;
                    changed = true;
                } else {
                    break;
                }
            }
        }
        let text = print_cascade(&best.cascade);
        let lines: Vec<&str> = text.lines().collect();
        for skip in (0..lines.len()).rev() {
            let line = lines[skip].trim_start();
            if !(line.starts_with("output") || line.contains(" = ")) || line.starts_with("param") {
                continue;
            }
            let candidate: String =
                lines.iter().enumerate().filter(|(n, _)| *n != skip).map(|(_, l)| format!("{l}\n")).collect();
            let Ok(mut parsed) = einfuse::compiler::compile_source(&candidate) else { continue };
            let trial = Generated { cascade: parsed.remove(0), bindings: best.bindings.clone() };
            if !trial.cascade.outputs.is_empty() && outcome(&trial).is_err() {
                best = trial;
                changed = true;
                break;
            }
        }
        if !changed || rounds > 200 {
            return best;
        }
    }
}

fn report(seed: u64, generated: &Generated, why: &str) -> String {
    let bind: Vec<String> = generated.bindings.iter().map(|(r, n)| format!("{r}={n}")).collect();
    let text = format!("# seed {seed}: {why}\n# bind: {}\n{}", bind.join(" "), print_cascade(&generated.cascade));
    if std::env::var_os("EINFUSE_SAVE_REGRESSIONS").is_some() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/regressions");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed{seed}.ein")), &text).unwrap();
    }
    text
}

fn campaign(seeds: std::ops::Range<u64>) {
    let mut failures = Vec::new();
    for seed in seeds {
        let generated = generate(seed);
        if outcome(&generated).is_err() {
            let small = shrink(&generated);
            let why = outcome(&small).err().unwrap_or_default();
            failures.push(report(seed, &small, &why));
        }
    }
    println!("{} checks of a split-key form", SPLIT.load(std::sync::atomic::Ordering::Relaxed));
    println!("{} checks as a shard with offsets", SHIFTED.load(std::sync::atomic::Ordering::Relaxed));
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn fixed_seed_differential_run() {
    campaign(0..300);
}

#[test]
#[ignore = "a long campaign: cargo test --release --test differential -- --ignored"]
fn long_differential_run() {
    let cases: u64 = std::env::var("EINFUSE_DIFF_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let start = std::time::Instant::now();
    campaign(1_000_000..1_000_000 + cases);
    println!("{cases} cascades in {:.1} s", start.elapsed().as_secs_f64());
}

#[test]
fn regressions_still_pass() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/regressions");
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    for path in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "ein")) {
        let source = std::fs::read_to_string(&path).unwrap();
        let bindings: Vec<(String, u64)> = source
            .lines()
            .find_map(|l| l.strip_prefix("# bind:"))
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|b| b.split_once('=').map(|(r, n)| (r.to_string(), n.parse().unwrap())))
            .collect();
        let cascade = einfuse::compiler::compile_source(&source).unwrap().remove(0);
        if let Err(why) = check(&Generated { cascade, bindings }) {
            panic!("{}: {why}", path.display());
        }
    }
}
