//! The NVPTX back end without a GPU: the PTX of every corpus kernel (as written and optimized)
//! must assemble with `ptxas` for sm_80 and sm_90, without local-memory spills; the PTX of the
//! attention kernels is pinned by snapshots. `scripts/test.sh` installs `ptxas` (from the
//! `nvidia-cuda-nvcc-cu12` wheel, into `.venv`); where it is missing outside CI, the test says so
//! and skips.
#![cfg(feature = "llvm")]

use std::path::{Path, PathBuf};
use std::process::Command;

use einfuse::Program;

mod common;

fn root() -> PathBuf {
    common::root()
}

/// `ptxas`: `$EINFUSE_PTXAS`, the one in `.venv`, or the one on the `PATH`.
fn ptxas() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("EINFUSE_PTXAS") {
        return Some(PathBuf::from(path));
    }
    let lib = root().join(".venv/lib");
    if let Ok(entries) = std::fs::read_dir(&lib) {
        for entry in entries.flatten() {
            let candidate = entry.path().join("site-packages/nvidia/cuda_nvcc/bin/ptxas");
            if candidate.exists() {
                return Some(candidate);
            }
        }
    }
    Command::new("ptxas").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| "ptxas".into())
}

/// `ptxas`, or `None` after saying why the test skips (never in CI, where it must be installed).
fn ptxas_or_skip() -> Option<PathBuf> {
    let found = ptxas();
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "ptxas is missing in CI; scripts/test.sh installs it");
        eprintln!("skipped: no ptxas (run scripts/test.sh, which installs it into .venv)");
    }
    found
}

/// What `ptxas -v` says about one kernel.
#[derive(Debug)]
struct Assembled {
    registers: u32,
    spill_bytes: u32,
}

fn assemble(ptxas: &Path, ptx: &str, arch: &str, name: &str) -> Result<Assembled, String> {
    let dir = std::env::temp_dir().join(format!("einfuse-ptx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}-{arch}.ptx"));
    std::fs::write(&file, ptx).unwrap();
    let output = Command::new(ptxas)
        .args(["-v", "-arch", arch, "-o"])
        .arg(dir.join(format!("{name}-{arch}.cubin")))
        .arg(&file)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    let log = String::from_utf8_lossy(&output.stderr).to_string();
    if !output.status.success() {
        return Err(log);
    }
    let number_before = |text: &str, marker: &str| -> Option<u32> {
        let at = text.find(marker)?;
        text[..at].split_whitespace().last()?.parse().ok()
    };
    let registers = log.lines().find_map(|l| number_before(l, " registers")).ok_or_else(|| log.clone())?;
    let spill_bytes = log
        .lines()
        .filter_map(|l| Some(number_before(l, " bytes spill stores")? + number_before(l, " bytes spill loads")?))
        .sum();
    Ok(Assembled { registers, spill_bytes })
}

#[test]
fn every_corpus_kernel_assembles_for_sm80_and_sm90_without_spills() {
    let Some(ptxas) = ptxas_or_skip() else { return };
    let mut kernels = common::kernels_in("examples");
    kernels.extend(common::kernels_in("benches"));
    let mut report = Vec::new();
    for cascade in &kernels {
        // Optimized as for the GPU targets (the key tile that fits in shared memory).
        let optimized = einfuse::optimize_for_gpu(cascade).unwrap().cascade;
        for (form, kernel) in [("written", cascade), ("optimized", &optimized)] {
            let ptx = einfuse::compile_ptx(kernel, "sm_80").unwrap();
            for arch in einfuse::compiler::llvm::CHECKED_ARCHITECTURES {
                let name = format!("{}-{form}", kernel.name);
                let assembled = assemble(&ptxas, &ptx, arch, &name)
                    .unwrap_or_else(|log| panic!("ptxas -arch {arch} rejects {name}:\n{log}"));
                report.push(format!(
                    "{name} {arch}: {} registers, {} spill bytes",
                    assembled.registers, assembled.spill_bytes
                ));
            }
        }
    }
    println!("{}", report.join("\n"));
    let spilling: Vec<&String> = report.iter().filter(|l| !l.ends_with(" 0 spill bytes")).collect();
    assert!(spilling.is_empty(), "kernels that spill: {spilling:#?}");
    assert!(report.iter().any(|l| l.starts_with("gpu_prefill-optimized sm_90")));
    assert!(report.iter().any(|l| l.starts_with("gpu_prefill_d128-optimized sm_90")));
}

#[test]
fn ptx_of_the_attention_kernels() {
    for cascade in Program::from_file(&root().join("examples/attention.ein")).unwrap().kernels {
        let optimized = einfuse::optimize(&cascade).unwrap().cascade;
        let ptx = einfuse::compile_ptx(&optimized, "sm_80").unwrap();
        assert!(ptx.contains(".target sm_80") && ptx.contains("ex2.approx"), "{}", cascade.name);
        insta::assert_snapshot!(format!("ptx_{}", cascade.name), ptx);
    }
}

#[test]
fn ptx_is_deterministic() {
    let cascade = Program::from_file(&root().join("examples/fusemax.ein")).unwrap().kernels.remove(0);
    let optimized = einfuse::optimize(&cascade).unwrap().cascade;
    let a = einfuse::compile_ptx(&optimized, "sm_80").unwrap();
    let b = einfuse::compile_ptx(&optimized, "sm_80").unwrap();
    assert_eq!(a, b);
}

/// The split-key form's two kernels (decode, and causal attention) assemble without spills.
#[test]
fn split_key_kernels_assemble_without_spills() {
    let Some(ptxas) = ptxas_or_skip() else { return };
    let mut kernels = common::kernels_in("benches");
    kernels.extend(common::kernels_in("examples"));
    for name in ["decode", "causal"] {
        let cascade = kernels.iter().find(|k| k.name == name).unwrap();
        let optimized = einfuse::optimize(cascade).unwrap().cascade;
        let split = einfuse::compiler::split::split_keys(&optimized, 256).unwrap();
        for part in [&split.chunks, &split.merge] {
            let ptx = einfuse::compile_ptx(part, "sm_80").unwrap();
            for arch in einfuse::compiler::llvm::CHECKED_ARCHITECTURES {
                let assembled = assemble(&ptxas, &ptx, arch, &part.name)
                    .unwrap_or_else(|log| panic!("ptxas -arch {arch} rejects {}:\n{log}", part.name));
                assert_eq!(assembled.spill_bytes, 0, "{} spills on {arch}", part.name);
            }
        }
    }
}

/// f16 and bf16 storage (see `llvm::storage`): 16-bit loads widened by `cvt.f32.f16` or a shift,
/// an f16 output rounded by `cvt.rn.f16.f32` and a bf16 one by integer arithmetic, and
/// 16-bit stores, all accepted by ptxas without spills.
#[test]
fn narrow_storage_assembles() {
    let Some(ptxas) = ptxas_or_skip() else { return };
    let inputs = "Q[E, P]: bf16, K[E, M]: f16, V[F, M]: bf16";
    let source = common::attention("narrow_storage", "E = 64, F = 64, M, P", inputs, "AV: f16, SD: bf16");
    let cascade = einfuse::compiler::compile_source(&source).unwrap().remove(0);
    let optimized = einfuse::optimize_for_gpu(&cascade).unwrap().cascade;
    let ptx = einfuse::compile_ptx(&optimized, "sm_80").unwrap();
    for needle in ["cvt.f32.f16", "cvt.rn.f16.f32", "ld.u16", "st.u16"] {
        assert!(ptx.contains(needle), "no {needle} in the PTX");
    }
    for arch in einfuse::compiler::llvm::CHECKED_ARCHITECTURES {
        let assembled = assemble(&ptxas, &ptx, arch, "narrow_storage")
            .unwrap_or_else(|log| panic!("ptxas -arch {arch} rejects narrow_storage:\n{log}"));
        assert_eq!(assembled.spill_bytes, 0, "narrow_storage spills on {arch}");
    }
}

/// The tensor-core kernels (`tests/tensor_cores/`) assemble for sm_80 and sm_90 without spills,
/// and their PTX has the warp-level instructions, none of them after a branch on the thread.
#[test]
fn tensor_core_kernels_assemble_without_spills() {
    let Some(ptxas) = ptxas_or_skip() else { return };
    for cascade in common::kernels_in("tests/tensor_cores") {
        let program = einfuse::optimize_for_tensor_cores(&cascade).unwrap();
        // LLVM 14 does not know the warp-level intrinsics are convergent: every one is inline
        // PTX with side effects, which it cannot sink into a branch that only some lanes take.
        let plan = einfuse::compiler::schedule::tensor_cores::plan(&program).unwrap();
        let ir =
            einfuse::compiler::llvm::tensor_cores::lower(&program, &plan, einfuse::compiler::llvm::Flavor::Nvptx, "k")
                .unwrap();
        assert!(!ir.contains("@llvm.nvvm.mma") && !ir.contains("@llvm.nvvm.ldmatrix"), "{}", cascade.name);
        for instruction in ["mma.sync", "ldmatrix.sync", "cp.async.cg", "cp.async.wait_group"] {
            let uses = ir.matches(instruction).count();
            let guarded = ir.matches(&format!("asm sideeffect \"{instruction}")).count();
            assert!(
                uses > 0 && uses == guarded,
                "{}: {instruction} {uses} times, {guarded} as asm sideeffect",
                cascade.name
            );
        }
        let ptx = einfuse::compiler::llvm::tensor_core_ptx(&program, "sm_80").unwrap();
        for arch in einfuse::compiler::llvm::CHECKED_ARCHITECTURES {
            for instruction in
                ["mma.sync.aligned.m16n8k16", "ldmatrix.sync.aligned.m8n8.x4", "cp.async.cg.shared.global"]
            {
                assert!(ptx.contains(instruction), "{}: no {instruction}", cascade.name);
            }
            let assembled = assemble(&ptxas, &ptx, arch, &format!("tc-{}", cascade.name)).unwrap();
            eprintln!(
                "{} {arch}: {} registers, {} spill bytes",
                cascade.name, assembled.registers, assembled.spill_bytes
            );
            assert_eq!(assembled.spill_bytes, 0, "{} spills on {arch}", cascade.name);
        }
    }
}
