//! The same kernels in other layouts: every kernel of `examples/` and `benches/` with the
//! positions of its inputs permuted (generated, seeded), built for both CPU tiers and run on
//! ragged sizes against the interpreter. The host schedule packs inputs that a streamed
//! contraction reads across its lanes (`schedule::pack`); this checks that the panels it makes
//! compute what the kernel says, in layouts nobody wrote by hand, and that it makes them.

use std::collections::BTreeMap;

mod common;

use einfuse::compiler::interp::{interpret, InterpLimits};
use einfuse::compiler::ir::{Cascade, Expr, Extent};
use einfuse::compiler::schedule::print_program;
use einfuse::compiler::shapes::bind_extents;
use einfuse::{BuildOptions, Target, Tensor};

/// A small deterministic generator (xorshift), so that the layouts are the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// `cascade` with the positions of every input permuted at random (its reads follow).
fn permuted_inputs(cascade: &Cascade, rng: &mut Rng) -> Cascade {
    let mut c = cascade.clone();
    let mut orders = BTreeMap::new();
    for id in cascade.inputs() {
        let n = cascade.tensor(id).ranks.len();
        let mut order: Vec<usize> = (0..n).collect();
        for k in (1..n).rev() {
            order.swap(k, rng.below(k + 1));
        }
        c.tensors[id.index()].ranks = order.iter().map(|q| cascade.tensor(id).ranks[*q]).collect();
        orders.insert(id, order);
    }
    let permute = &mut |e: &mut Expr| {
        if let Expr::Access { tensor, subscripts } = e {
            if let Some(order) = orders.get(tensor) {
                *subscripts = order.iter().map(|q| subscripts[*q].clone()).collect();
            }
        }
    };
    for einsum in &mut c.einsums {
        einsum.body.walk_mut(permute);
        for cond in &mut einsum.filter {
            cond.lhs.walk_mut(permute);
            cond.rhs.walk_mut(permute);
        }
    }
    c
}

/// The largest relative difference between `target`'s outputs and the interpreter's.
fn difference(cascade: &Cascade, target: Target, sizes: &BTreeMap<&str, u64>, seed: u64) -> f64 {
    let (bindings, extents, inputs) = common::random_call(cascade, sizes, seed);
    let built = einfuse::build(cascade, &BuildOptions { tile: Some(16), ..BuildOptions::new(target) }).unwrap();
    let slices: Vec<&[f32]> = inputs.iter().map(Tensor::data).collect();
    let built_extents = bind_extents(&built.cascade, &bindings, &[]).unwrap();
    let got = built.run(&built_extents, &slices, 2).unwrap();
    let data: Vec<Vec<f64>> = inputs.iter().map(Tensor::to_f64).collect();
    let slices: Vec<&[f64]> = data.iter().map(Vec::as_slice).collect();
    let want = interpret(cascade, &extents, &slices, InterpLimits::default()).unwrap();
    let mut worst = 0.0f64;
    for (output, (g, w)) in cascade.outputs.iter().zip(got.iter().zip(&want)) {
        let w: Vec<f32> = w.iter().map(|x| *x as f32).collect();
        worst = worst.max(einfuse::output_difference(einfuse::dtype_of(output.elem), g, &w).1);
    }
    worst
}

/// Both host tiers compute what the interpreter does, within a relative 1e-5, at each `(M, P)`.
fn agrees_on_both_tiers(cascade: &Cascade, name: &str, sizes: &[(u64, u64)]) {
    for &(m, p) in sizes {
        let bound: BTreeMap<&str, u64> = [("M", m), ("P", p)].into();
        for target in [Target::Cpu, Target::CpuLlvm] {
            let error = difference(cascade, target, &bound, m);
            assert!(error <= 1e-5, "{name}, M = {m}, P = {p} on {target:?}: relative error {error:.3e}");
        }
    }
}

/// Whether the host schedule of `cascade` (optimized) reads a packed panel.
fn packs(cascade: &Cascade) -> bool {
    let options = BuildOptions { tile: Some(16), ..BuildOptions::new(Target::Cpu) };
    let scheduled = einfuse::pipeline::schedule_kernel(cascade, &options).unwrap();
    scheduled.loops.iter().any(|l| l.cascade.tensors.len() > scheduled.cascade.tensors.len())
}

#[test]
fn kernels_in_permuted_layouts_agree_with_the_interpreter() {
    let mut kernels = common::kernels_in("examples");
    kernels.extend(common::kernels_in("benches"));
    let mut rng = Rng(0x5eed_1a70);
    let sizes: BTreeMap<&str, u64> = [("M", 37), ("P", 19), ("K", 13), ("T", 11), ("N", 9)].into();
    let (mut tried, mut packed) = (0, 0);
    for kernel in &kernels {
        // Large fixed ranks (the benchmark heads) make the interpreter slow; two layouts each.
        let points: u64 = kernel
            .ranks
            .iter()
            .map(|r| match r.extent {
                Extent::Fixed(n) => n,
                _ => 1,
            })
            .product();
        if points > 1 << 16 {
            continue;
        }
        for round in 0..2 {
            let layout = permuted_inputs(kernel, &mut rng);
            tried += 1;
            packed += packs(&layout) as usize;
            for target in [Target::Cpu, Target::CpuLlvm] {
                let error = difference(&layout, target, &sizes, round);
                assert!(error <= 1e-4, "{} (layout {round}) on {target:?}: relative error {error:.3e}", kernel.name);
            }
        }
    }
    eprintln!("{packed} of {tried} layouts read packed panels");
    // The test means something only if layouts that need panels were tried.
    assert!(packed >= 4, "only {packed} of {tried} layouts were packed");
}

/// The host schedules of the benchmark kernels in PyTorch's layout, as `einfuse emit --stage
/// loops` prints them: packed panels, and sigmoid and softplus-l1 streamed over key tiles.
#[test]
fn pytorch_layout_loops() {
    let mut text = String::new();
    let program = einfuse::Program::from_file(&common::root().join("benches/pytorch.ein")).unwrap();
    for kernel in program
        .kernels
        .iter()
        .filter(|k| ["prefill", "decode", "gqa", "prefill_phe", "sigmoid", "softplus_l1"].contains(&k.name.as_str()))
    {
        let options = BuildOptions { tile: Some(64), ..BuildOptions::new(Target::Cpu) };
        let scheduled = einfuse::pipeline::schedule_kernel(kernel, &options).unwrap();
        text.push_str(&einfuse::compiler::schedule::print_program(&scheduled.loops[0]));
        text.push('\n');
    }
    insta::assert_snapshot!(text);
}

/// A transpose the source writes itself walks in the layer's blocks on both tiers, and the
/// blocks' edges (sizes that are not multiples of the block, a block of rows cut by the extent)
/// copy every point once.
#[test]
fn transposing_copies_walk_in_blocks() {
    let source = "
kernel transpose {
  rank H = 3, M, P
  input X[P, M], Y[H, P, M]
  T[m, p] = X[p, m]
  U[h, m, p] = Y[h, p, m]
  output T, U
}";
    let program = einfuse::Program::from_source("transpose.ein", source).unwrap();
    let kernel = &program.kernels[0];
    let options = BuildOptions::new(Target::Cpu);
    let scheduled = einfuse::pipeline::schedule_kernel(kernel, &options).unwrap();
    let text = einfuse::compiler::schedule::print_program(&scheduled.loops[0]);
    assert_eq!(text.matches("# in blocks of 8 along m").count(), 2, "{text}");
    for (m, p) in [(1, 1), (7, 9), (8, 8), (17, 3), (37, 19), (64, 65)] {
        let sizes: BTreeMap<&str, u64> = [("M", m), ("P", p)].into();
        for target in [Target::Cpu, Target::CpuLlvm] {
            let error = difference(kernel, target, &sizes, m);
            assert!(error == 0.0, "M = {m}, P = {p} on {target:?}: relative error {error:.3e}");
        }
    }
}

/// The host tiers take longer key tiles only where a step's runs of keys are too short to stream:
/// decode reading `K[h, e, m]` (one query, 128 rows of keys), not decode in PyTorch's layout (a
/// tile is one block) nor prefill in `[H, E, P]` (64 queries read each tile).
#[test]
fn longer_key_tiles_only_for_short_runs() {
    let tile = |file: &str, name: &str, target: Target| {
        let program = einfuse::Program::from_file(&common::root().join(file)).unwrap();
        let kernel = program.kernel(Some(name)).unwrap();
        let scheduled = einfuse::pipeline::schedule_kernel(kernel, &BuildOptions::new(target)).unwrap();
        let c = &scheduled.loops[0].cascade;
        c.ranks.iter().find(|r| r.name == "M0").map(|r| r.extent.clone())
    };
    for target in [Target::Cpu, Target::CpuLlvm] {
        // The tier's own tile: 128 keys for Cranelift's 4 lanes, 64 for LLVM's 8 (`host_tile`).
        let own = einfuse::compiler::schedule::layout::host_tile(einfuse::pipeline::host_tier(target));
        assert_eq!(own, if einfuse::pipeline::host_tier(target).lanes >= 8 { 64 } else { 128 });
        assert_eq!(tile("examples/variants.ein", "decode", target), Some(Extent::Fixed(4096)));
        assert_eq!(tile("examples/heads.ein", "gqa_decode", target), Some(Extent::Fixed(4096)));
        assert_eq!(tile("benches/pytorch.ein", "decode", target), Some(Extent::Fixed(own)));
        assert_eq!(tile("benches/pytorch.ein", "prefill_hep", target), Some(Extent::Fixed(own)));
        assert_eq!(tile("examples/attention.ein", "attention", target), Some(Extent::Fixed(own)));
        // Every query `m'` of a self-attention reads the step's tile of `K[e, m]`, though `K` has
        // the queries' rank.
        assert_eq!(tile("examples/masks.ein", "document_mask", target), Some(Extent::Fixed(own)));
    }
    // An explicit tile is kept.
    let program = einfuse::Program::from_file(&common::root().join("examples/variants.ein")).unwrap();
    let options = BuildOptions { tile: Some(64), ..BuildOptions::new(Target::Cpu) };
    let scheduled = einfuse::pipeline::schedule_kernel(program.kernel(Some("decode")).unwrap(), &options).unwrap();
    let m0 = scheduled.loops[0].cascade.ranks.iter().find(|r| r.name == "M0").map(|r| r.extent.clone());
    assert_eq!(m0, Some(Extent::Fixed(64)));
}

/// On every host tier, a register block that reads an input its lanes share, with rows a whole
/// rank apart (`K[e, m]` along `e`, einfuse's own layout), stages the step's tile of it, and the
/// staged kernel computes what the interpreter does on ragged sizes over several tiles.
#[test]
fn strided_shared_reads_are_staged_per_step() {
    let program = einfuse::Program::from_file(&common::root().join("examples/attention.ein")).unwrap();
    let kernel = program.kernel(Some("attention")).unwrap();
    let loops = |target| {
        let options = BuildOptions { tile: Some(16), ..BuildOptions::new(target) };
        let scheduled = einfuse::pipeline::schedule_kernel(kernel, &options).unwrap();
        einfuse::compiler::schedule::print_program(&scheduled.loops[0])
    };
    for target in [Target::Cpu, Target::CpuLlvm] {
        let text = loops(target);
        assert!(text.contains("buffer staged_K[E, M1: current, M0]: temp"), "{text}");
        assert!(text.contains("staged_K[e, m1, m0] = K[e, m1 * M0 + m0]"), "{text}");
        assert!(text.contains("Q[e, p] * staged_K[e, m1, m0]"), "{text}");
    }
    agrees_on_both_tiers(kernel, "attention", &[(1, 3), (15, 19), (16, 16), (17, 5), (37, 19), (70, 9)]);
}

/// A tile staged by hand and read at a shifted subscript keeps its copy (the copy's last point is
/// absent where the input's next point is not), and both host tiers agree with the interpreter;
/// read at bare indices, the copy is read in place.
#[test]
fn hand_staged_tiles_read_off_their_edge_stay() {
    let source = "
kernel shifted {
  rank E = 4, M, P
  rank M0 = 4, M1 = M / M0
  input K[E, M], Q[E, P]
  BK[e, m1, m0] = K[e, m1 * M0 + m0]
  S[m1, m0, p] = Q[e, p] * BK[e, m1, m0 + 1]
  output S
}
kernel plain {
  rank E = 4, M, P
  rank M0 = 4, M1 = M / M0
  input K[E, M], Q[E, P]
  BK[e, m1, m0] = K[e, m1 * M0 + m0]
  S[m1, m0, p] = Q[e, p] * BK[e, m1, m0]
  output S
}";
    let program = einfuse::Program::from_source("staged.ein", source).unwrap();
    for (name, stays) in [("shifted", true), ("plain", false)] {
        let kernel = program.kernel(Some(name)).unwrap();
        let unstaged = einfuse::compiler::schedule::pack::unstage(kernel);
        assert_eq!(unstaged.tensor_by_name("BK").is_some(), stays, "{name}");
        agrees_on_both_tiers(kernel, name, &[(7, 3), (8, 5), (13, 9)]);
    }
}

/// A sum that one Einsum adds to something at the same point is computed by that Einsum
/// (`schedule::accumulate`): FlashAttention's partial products `SLNV` and `SLD` disappear into the
/// running output and denominator, which their register blocks update as they store them. Sums
/// read twice, read in another order, filtered, or holding a reduction stay; of two sums added
/// together, one is folded. Written by hand (`X[f, p] = sum[m](...) +
/// C[f, p]`, with `C` undefined at some points), the same form runs on both tiers as the
/// interpreter says, on ragged sizes, in blocks and in the points left over.
#[test]
fn sums_fold_into_the_running_outputs_they_update() {
    let program = einfuse::Program::from_file(&common::root().join("examples/attention.ein")).unwrap();
    let kernel = program.kernel(Some("attention_deferred")).unwrap();
    let options = BuildOptions { tile: Some(16), ..BuildOptions::new(Target::Cpu) };
    let text = print_program(&einfuse::pipeline::schedule_kernel(kernel, &options).unwrap().loops[0]);
    assert!(!text.contains("SLNV") && !text.contains("SLD"), "{text}");
    assert!(
        text.contains("RNV[f, m1 + 1, p] = sum[m0](SLN[m1, m0, p] * V[f, m1 * M0 + m0]) + RNV[f, m1, p] * PRM[m1, p]"),
        "{text}"
    );
    let source = "
kernel folded {
  rank F = 5, M, P
  input A[M, P], B[F, M], C[F, P]
  S[f, p] = sum[m](A[m, p] * B[f, m])
  D[f, p] = C[f, p] where C[f, p] > -0.5
  X[f, p] = D[f, p] * 2 + S[f, p]
  output X
}
kernel read_twice {
  rank F = 5, M, P
  input A[M, P], B[F, M], C[F, P]
  S[f, p] = sum[m](A[m, p] * B[f, m])
  X[f, p] = S[f, p] + C[f, p]
  Y[f, p] = S[f, p] * 3
  output X, Y
}
kernel transposed {
  rank F = 5, M, P
  input A[M, P], B[F, M], C[P, F]
  S[f, p] = sum[m](A[m, p] * B[f, m])
  X[p, f] = S[f, p] + C[p, f]
  output X
}
kernel filtered {
  rank F = 5, M, P
  input A[M, P], B[F, M], C[F, P]
  S[f, p] = sum[m](A[m, p] * B[f, m]) where p > 1
  X[f, p] = S[f, p] + C[f, p]
  output X
}
kernel two_sums {
  rank F = 5, M, P
  input A[M, P], B[F, M], C[M, P], D[F, M]
  S1[f, p] = sum[m](A[m, p] * B[f, m])
  S2[f, p] = sum[m](C[m, p] * D[f, m])
  X[f, p] = S1[f, p] + S2[f, p]
  output X
}
kernel nested {
  rank F = 5, M, P
  input A[M, P], B[F, M], C[F, P], Y[P]
  S[p] = sum[m](A[m, p] * sum[f](B[f, m] * C[f, p]))
  X[p] = S[p] + Y[p]
  output X
}
kernel written {
  rank F = 5, M, P
  input A[M, P], B[F, M], C[F, P]
  D[f, p] = C[f, p] where C[f, p] > -0.5
  X[f, p] = sum[m](A[m, p] * B[f, m]) + D[f, p]
  output X
}
kernel written_in_lanes {
  rank F = 5, M, P
  input A[P, M], B[F, M], C[P, F]
  X[p, f] = sum[m](A[p, m] * B[f, m]) + C[p, f]
  output X
}";
    let program = einfuse::Program::from_source("folds.ein", source).unwrap();
    let expected =
        [("folded", 1), ("read_twice", 0), ("transposed", 0), ("filtered", 0), ("two_sums", 1), ("nested", 0)];
    for (name, folds) in expected {
        let kernel = program.kernel(Some(name)).unwrap();
        let program = einfuse::compiler::schedule::schedule(kernel).unwrap();
        let planned = einfuse::compiler::schedule::accumulate::plan(&program, WIDE);
        assert_eq!(planned.len(), folds, "{name}: {planned:?}");
    }
    let all = ["folded", "read_twice", "transposed", "filtered", "two_sums", "nested", "written", "written_in_lanes"];
    for name in all {
        let kernel = program.kernel(Some(name)).unwrap();
        // Each call takes a share of the queries `P`: enough of them for whole blocks per call.
        agrees_on_both_tiers(kernel, name, &[(1, 3), (7, 9), (16, 16), (13, 33), (9, 64), (5, 130)]);
    }
}

/// A host tier with AVX-512's thirty-two vector registers, and one with sixteen.
const WIDE: einfuse::compiler::schedule::HostTier = einfuse::compiler::schedule::HostTier { lanes: 16, registers: 32 };
const NARROW: einfuse::compiler::schedule::HostTier = einfuse::compiler::schedule::HostTier { lanes: 4, registers: 16 };

/// A sum read by an element-wise Einsum that does more than add to it (a score modification:
/// soft-capping, a bias from positions, a sigmoid) folds into that Einsum, under its statement
/// filter too, where the reader reads nothing that may be undefined, on a tier with thirty-two
/// vector registers; the register block applies the rest to its accumulators. A value written
/// around its sum is blocked so on every tier. Both tiers against the interpreter, folded or not.
#[test]
fn score_modifications_fold_into_the_contraction() {
    let source = "
kernel capped {
  rank F = 5, M, P
  input A[M, P], B[F, M], C[F, P]
  S[f, p] = sum[m](A[m, p] * B[f, m])
  X[f, p] = 3 * tanh(S[f, p] * 0.1) + C[f, p]
  output X
}
kernel biased_under_a_filter {
  rank F = 5, M, P
  input A[M, P], B[F, M], W[F]
  S[f, p] = sum[m](A[m, p] * B[f, m])
  X[f, p] = W[f] * (f - p) + S[f, p] * 0.5 where f <= p + 2
  output X
}
kernel inside_a_function {
  rank F = 5, M, P
  input A[M, P], B[F, M], C[F, P]
  S[f, p] = sum[m](A[m, p] * B[f, m])
  X[f, p] = exp(C[f, p] - S[f, p]) where f <= p
  output X
}
kernel masked_read_under_a_filter {
  rank F = 5, M, P
  input A[M, P], B[F, M], C[F, P]
  S[f, p] = sum[m](A[m, p] * B[f, m])
  D[f, p] = C[f, p] where C[f, p] > -0.5
  X[f, p] = S[f, p] + D[f, p] where f <= p
  output X
}
kernel read_in_the_filter {
  rank F = 5, M, P
  input A[M, P], B[F, M]
  S[f, p] = sum[m](A[m, p] * B[f, m])
  X[f, p] = tanh(S[f, p]) where S[f, p] > 0
  output X
}
kernel written_around_the_sum {
  rank F = 5, M, P
  input A[M, P], B[F, M], W[F]
  X[f, p] = 2 * tanh(sum[m](A[m, p] * B[f, m]) * 0.3) + W[f] * (p - f) where f <= p + 1
  output X
}
kernel read_inside_a_reduction {
  rank F = 5, K = 3, M, P
  input A[M, P], B[F, M], D[K, P]
  S[f, p] = sum[m](A[m, p] * B[f, m])
  X[f, p] = sum[k](S[f, p] * D[k, p])
  output X
}
kernel read_twice_in_the_value {
  rank F = 5, M, P
  input A[M, P], B[F, M]
  S[f, p] = sum[m](A[m, p] * B[f, m])
  X[f, p] = S[f, p] * sigmoid(S[f, p])
  output X
}";
    let program = einfuse::Program::from_source("modified.ein", source).unwrap();
    let expected = [
        ("capped", 1),
        ("biased_under_a_filter", 1),
        ("inside_a_function", 1),
        ("masked_read_under_a_filter", 0),
        ("read_in_the_filter", 0),
        ("read_inside_a_reduction", 0),
        ("read_twice_in_the_value", 0),
        ("written_around_the_sum", 0),
    ];
    for (name, folds) in expected {
        let kernel = program.kernel(Some(name)).unwrap();
        let scheduled = einfuse::compiler::schedule::schedule(kernel).unwrap();
        let planned = einfuse::compiler::schedule::accumulate::plan(&scheduled, WIDE);
        assert_eq!(planned.len(), folds, "{name}: {planned:?}");
        // Sixteen registers keep a modification in its own pass.
        assert!(einfuse::compiler::schedule::accumulate::plan(&scheduled, NARROW).is_empty(), "{name}");
        agrees_on_both_tiers(kernel, name, &[(1, 3), (7, 9), (16, 16), (13, 33), (9, 64), (5, 130)]);
    }
    // ALiBi with soft-capping under a causal mask, written other ways: the terms swapped, other
    // index names, the scale inside the score. Each folds (no scores tensor is left in the
    // streamed loop) and agrees with the interpreter at ragged sizes, masked rows among them.
    let alibi = std::fs::read_to_string(common::root().join("benches/pytorch.ein")).unwrap();
    let start = alibi.find("kernel alibi_softcap_causal").unwrap();
    let alibi = &alibi[start..start + alibi[start..].find("\n}").unwrap() + 2];
    let rewritings = [
        alibi.to_string(),
        alibi.replace(
            "cap * tanh(QK[h, p, m] / cap) + Slope[h] * (m - p)",
            "Slope[h] * (m - p) + tanh(QK[h, p, m] / cap) * cap",
        ),
        [
            ("[h, p, ", "[h, p', "),
            ("[h, p]", "[h, p']"),
            (", m]", ", m']"),
            ("[h, m, ", "[h, m', "),
            ("max[m]", "max[m']"),
        ]
        .iter()
        .fold(alibi.to_string(), |text, (from, to)| text.replace(from, to))
        .replace("(m - p) where m <= p", "(m' - p') where m' <= p'"),
        alibi
            .replace("K[h, m, e] * scale", "K[h, m, e]")
            .replace("tanh(QK[h, p, m] / cap)", "tanh(QK[h, p, m] * scale / cap)"),
    ];
    for (k, text) in rewritings.iter().enumerate() {
        let text = text.replace("rank H = 8, E = 64, F = 64", "rank H = 2, E = 8, F = 8");
        let program = einfuse::Program::from_source("alibi.ein", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let kernel = &program.kernels[0];
        let options = BuildOptions { tile: Some(16), ..BuildOptions::new(Target::CpuLlvm) };
        let optimized = einfuse::pipeline::schedule_kernel(kernel, &options).unwrap().cascade;
        let loops = print_program(&einfuse::compiler::schedule::schedule_host(&optimized, WIDE).unwrap());
        let streamed = &loops[loops.find("loop ").unwrap()..];
        assert!(streamed.contains("tanh(sum["), "rewriting {k}: the scores stay apart\n{loops}");
        agrees_on_both_tiers(kernel, &format!("alibi rewriting {k}"), &[(1, 1), (7, 9), (16, 16), (33, 40), (130, 77)]);
    }
}

#[test]
fn a_ragged_tile_writes_its_invalid_points_only_where_they_are_read() {
    use einfuse::compiler::schedule::layout::unread_past_valid;
    // Decode takes tiles of 4096 keys: at M = 2048 its one tile is half outside the keys, and
    // the score tile and its exponentials are read only where their pair is valid.
    let variants = einfuse::Program::from_file(&common::root().join("examples/variants.ein")).unwrap();
    let decode = einfuse::compiler::schedule::schedule(
        &einfuse::optimize_for_target(variants.kernel(Some("decode")).unwrap(), Target::CpuLlvm, None).unwrap().cascade,
    )
    .unwrap();
    let c = &decode.cascade;
    let inner = c.split_pairs()[0].1;
    let along = |name: &str| {
        let einsum = c.einsums.iter().find(|e| c.tensor(e.target).name == name).unwrap();
        let v = einsum.lhs_indices().find(|i| i.rank == inner).unwrap();
        unread_past_valid(c, einsum, v)
    };
    assert!(along("BQK") && along("SLN"), "{}", print_program(&decode));
    // A tile read one point ahead (`S[m1, m0 + 1, p]`) is read past the valid points: there it
    // must hold nothing, not the previous tile's values (the loop over tiles keeps one tile).
    let source = "
kernel shifted {
  rank M, P, M0 = 4, M1 = M / M0
  input A[M, P]
  R[0, p] = 0
  S[m1, m0, p] = exp(A[m1 * M0 + m0, p])
  T[m1, m0, p] = S[m1, m0 + 1, p] + S[m1, m0, p]
  R[m1 + 1, p] = R[m1, p] * 0.5 + sum[m0](T[m1, m0, p])
  output R
}
kernel bare {
  rank M, P, M0 = 4, M1 = M / M0
  input A[M, P]
  R[0, p] = 0
  S[m1, m0, p] = exp(A[m1 * M0 + m0, p])
  T[m1, m0, p] = S[m1, m0, p] * 2
  R[m1 + 1, p] = R[m1, p] * 0.5 + sum[m0](T[m1, m0, p])
  output R
}";
    let program = einfuse::Program::from_source("ragged.ein", source).unwrap();
    for (name, unread) in [("shifted", false), ("bare", true)] {
        let kernel = program.kernel(Some(name)).unwrap();
        let s = kernel.einsums.iter().find(|e| kernel.tensor(e.target).name == "S").unwrap();
        let v = s.lhs_indices().find(|i| kernel.rank(i.rank).name == "M0").unwrap();
        assert_eq!(unread_past_valid(kernel, s, v), unread, "{name}");
        agrees_on_both_tiers(kernel, name, &[(1, 3), (6, 9), (7, 16), (13, 33), (9, 64), (5, 130)]);
    }
}

/// A recurrence that is itself the output is kept whole, not in two alternating slots: a step that
/// its causal mask empties carries it to its next point (Cranelift panicked there).
#[test]
fn an_output_recurrence_is_carried_over_empty_steps() {
    let source = "
kernel causal {
  rank M, P, M0 = 8, M1 = M / M0
  input A[M, P], B[M, P]
  RM[0, p] = -inf
  RD[0, p] = 0
  S[m1, m0, p] = A[m1 * M0 + m0, p] where m1 * M0 + m0 <= p
  LM[m1, p] = max[m0](S[m1, m0, p])
  RM[m1 + 1, p] = max(RM[m1, p], LM[m1, p])
  E[m1, m0, p] = exp(S[m1, m0, p] - RM[m1 + 1, p])
  RD[m1 + 1, p] = RD[m1, p] * exp(RM[m1, p] - RM[m1 + 1, p]) + sum[m0](E[m1, m0, p] * B[m1 * M0 + m0, p])
  output RD
}";
    let program = einfuse::Program::from_source("carried.ein", source).unwrap();
    let kernel = program.kernel(Some("causal")).unwrap();
    agrees_on_both_tiers(kernel, "causal", &[(5, 3), (20, 3), (37, 9), (16, 16), (41, 64)]);
}

/// `text` (one kernel) with its rank declarations in another order and the positions of each
/// tensor it defines but does not output in another order, every use following (generated,
/// seeded): the same computation as a person might have declared and written it.
fn rewritten(text: &str, rng: &mut Rng) -> String {
    let shuffled = |items: &mut Vec<String>, rng: &mut Rng| {
        for k in (1..items.len()).rev() {
            items.swap(k, rng.below(k + 1));
        }
    };
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let rank = lines.iter().position(|l| l.trim_start().starts_with("rank ")).unwrap();
    let mut declared: Vec<String> = lines[rank].trim_start()["rank ".len()..].split(", ").map(str::to_string).collect();
    shuffled(&mut declared, rng);
    lines[rank] = format!("  rank {}", declared.join(", "));
    let outputs: Vec<&str> =
        lines.iter().find_map(|l| l.trim_start().strip_prefix("output ")).unwrap().split(", ").map(str::trim).collect();
    let declared = lines.iter().find_map(|l| l.trim_start().strip_prefix("input ")).unwrap();
    let inputs: Vec<&str> = declared.split("], ").map(|d| d.split('[').next().unwrap().trim()).collect();
    let defined: Vec<String> = lines
        .iter()
        .filter_map(|l| l.trim_start().split_once('[').map(|(name, _)| name.to_string()))
        .filter(|name| name.chars().all(|c| c.is_alphanumeric() || c == '_') && !name.is_empty())
        .filter(|name| !outputs.contains(&name.as_str()))
        .filter(|name| !inputs.contains(&name.as_str()))
        .collect();
    let mut text = lines.join("\n");
    for name in defined.iter().collect::<std::collections::BTreeSet<_>>() {
        let uses = uses_of(&text, name);
        let arity = text[uses[0].0..uses[0].1].split(", ").count();
        let mut order: Vec<String> = (0..arity).map(|k| k.to_string()).collect();
        shuffled(&mut order, rng);
        let order: Vec<usize> = order.iter().map(|k| k.parse().unwrap()).collect();
        for (start, end) in uses.into_iter().rev() {
            let subscripts: Vec<&str> = text[start + name.len() + 1..end].split(", ").collect();
            let permuted: Vec<&str> = order.iter().map(|q| subscripts[*q]).collect();
            text.replace_range(start..=end, &format!("{name}[{}]", permuted.join(", ")));
        }
    }
    text
}

/// Where `name[...]` stands in `text` as a whole word: the start of the name and the closing
/// bracket, for every occurrence.
fn uses_of(text: &str, name: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let needle = format!("{name}[");
    let mut from = 0;
    while let Some(k) = text[from..].find(&needle) {
        let start = from + k;
        let before = if start == 0 { b' ' } else { text.as_bytes()[start - 1] };
        let whole = !before.is_ascii_alphanumeric() && before != b'_';
        let end = start + text[start..].find(']').unwrap();
        if whole {
            found.push((start, end));
        }
        from = end;
    }
    found
}

/// For each scratch buffer of the host schedule, by name: the ranks of its last two positions of
/// more than one point, which run in lanes and in a register block's rows.
fn lanes_and_rows(kernel: &Cascade, tier: einfuse::compiler::schedule::HostTier) -> BTreeMap<String, Vec<String>> {
    let options = BuildOptions { tile: Some(16), ..BuildOptions::new(Target::CpuLlvm) };
    let optimized = einfuse::pipeline::schedule_kernel(kernel, &options).unwrap().cascade;
    let program = einfuse::compiler::schedule::schedule_host(&optimized, tier).unwrap();
    let c = &program.cascade;
    let mut found = BTreeMap::new();
    for buffer in &program.buffers {
        if buffer.role != einfuse::compiler::schedule::BufferRole::Temp {
            continue;
        }
        let tensor = c.tensor(buffer.tensor);
        let wide: Vec<String> = tensor
            .ranks
            .iter()
            .filter(|r| !matches!(c.rank(**r).extent, Extent::Fixed(1)))
            .map(|r| c.rank(*r).name.clone())
            .collect();
        found.insert(tensor.name.clone(), wide[wide.len().saturating_sub(2)..].to_vec());
    }
    found
}

/// The thread kernel's lane rank (the batch rank whose neighbouring points a block's threads
/// compute) and how many input tiles its blocks stage in shared memory.
#[cfg(feature = "llvm")]
fn thread_lanes(kernel: &Cascade) -> (String, usize) {
    use einfuse::compiler::llvm::{launch::batch_ranks, staging::staged_reads};
    let optimized = einfuse::optimize_for_gpu(kernel).unwrap().cascade;
    let program = einfuse::compiler::schedule::schedule_threads(&optimized).unwrap();
    let lane = batch_ranks(&program.cascade).last().map(|r| program.cascade.rank(*r).name.clone());
    (lane.unwrap_or_default(), staged_reads(&program).len())
}

/// Where a rank qualifies for the lanes, the order in which a kernel declares its ranks and writes
/// its intermediate tensors' indices does not decide where the host tiers put their lanes: the
/// scheduling layer orders every scratch buffer (`schedule::arrange`), and the thread kernels'
/// blocks span the same rank. Declared `rank P, M, F, E, H`, prefill ran its lanes along the
/// eight heads, thirty times slower, and its GPU blocks staged no tiles. Each kernel in eight
/// generated rewritings: the same lanes and rows in every scratch buffer as written in the
/// repository, the same lane rank and staged tiles in the thread kernel, and both tiers (and the
/// emulated GPU kernel) agree with the interpreter at ragged sizes.
#[test]
fn scratch_layouts_do_not_follow_the_declaration_order() {
    let kernels = [
        ("benches/pytorch.ein", "prefill"),
        ("benches/pytorch.ein", "decode"),
        ("benches/pytorch.ein", "gqa"),
        ("benches/pytorch.ein", "alibi_softcap_causal"),
        ("benches/pytorch.ein", "sigmoid"),
        ("examples/heads.ein", "mqa"),
        ("examples/heads.ein", "gqa_decode"),
        ("examples/masks.ein", "document_mask"),
        ("examples/masks.ein", "padding_mask"),
        // No rank qualifies for the lanes here: the written order stands, so only the values
        // are compared.
        ("examples/linear.ein", "causal_linear"),
        ("examples/linear.ein", "ssm_scan"),
        ("examples/softmax.ein", "softmax"),
    ];
    let mut rng = Rng(0xa11a_9e5);
    for (file, name) in kernels {
        let same_lanes = !file.starts_with("examples/linear") && !file.starts_with("examples/softmax");
        let small = small_kernel(file, name);
        let written = einfuse::Program::from_source("written.ein", &small).unwrap();
        let want = lanes_and_rows(&written.kernels[0], WIDE);
        #[cfg(feature = "llvm")]
        let threads = thread_lanes(&written.kernels[0]);
        for round in 0..8 {
            let text = rewritten(&small, &mut rng);
            let program =
                einfuse::Program::from_source("rewritten.ein", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            let kernel = &program.kernels[0];
            if same_lanes {
                assert_eq!(lanes_and_rows(kernel, WIDE), want, "{name}, rewriting {round}:\n{text}");
                #[cfg(feature = "llvm")]
                assert_eq!(thread_lanes(kernel), threads, "{name}, rewriting {round} (threads):\n{text}");
            }
            if round % 4 == 0 {
                let bound: BTreeMap<&str, u64> = [("M", 33), ("P", 19), ("H", 3), ("T", 7)].into();
                let emulated = if cfg!(feature = "llvm") { &[Target::GpuEmulated][..] } else { &[] };
                for target in [Target::Cpu, Target::CpuLlvm].iter().chain(emulated).copied() {
                    let error = difference(kernel, target, &bound, round);
                    assert!(error <= 1e-5, "{name}, rewriting {round} on {target:?}: {error:.3e}\n{text}");
                }
            }
        }
    }
}

/// The text of kernel `name` of `file`, its fixed ranks made small for the interpreter.
fn small_kernel(file: &str, name: &str) -> String {
    let source = std::fs::read_to_string(common::root().join(file)).unwrap();
    let start = source.find(&format!("kernel {name} ")).unwrap();
    let text = &source[start..start + source[start..].find("\n}").unwrap() + 2];
    // The values' feature rank keeps the sixteen points a lane rank needs on the widest vectors.
    [("H = 8", "H = 2"), ("H = 32", "H = 2"), ("E = 64", "E = 8"), ("E = 128", "E = 8")]
        .iter()
        .chain(&[("F = 64", "F = 16"), ("F = 128", "F = 16")])
        .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
}

/// The layer puts a rank in lanes only where every input read of it reads in lanes and it fills
/// the vector: a row softmax of `X[P, M]` and a product over fixed ranks keep their keys and
/// columns in lanes, a layer norm and a normalised scan their feature rank (nothing qualifies,
/// and the written order stands); decode with four queries runs its keys in lanes on sixteen-lane
/// vectors and its queries on four; prefill its queries. A recurrence along a rank of one point keeps both
/// its iterates (it has two points, not one, whatever its position), on both tiers against the
/// interpreter.
#[test]
fn scratch_layouts_put_in_lanes_only_what_reads_in_lanes() {
    let source = "
kernel rows {
  rank P, M
  input X[P, M]
  GM[p]    = max[m](X[p, m])
  SN[p, m] = exp(X[p, m] - GM[p])
  SD[p]    = SN[p, m]
  Y[p, m]  = SN[p, m] / SD[p]
  output Y
}
kernel mlp {
  rank P, D = 8, J = 32, O = 8
  input X[P, D], W1[D, J], W2[J, O]
  H1[p, j] = X[p, d] * W1[d, j]
  R[p, j]  = max(H1[p, j], 0)
  Y[p, o]  = R[p, j] * W2[j, o]
  output Y
}
kernel layer_norm {
  rank P, D = 32
  input X[P, D], G[D], B[D]
  MU[p]    = X[p, d] / D
  XC[p, d] = X[p, d] - MU[p]
  VAR[p]   = XC[p, d] * XC[p, d] / D
  Y[p, d]  = XC[p, d] / sqrt(VAR[p] + 1e-5) * G[d] + B[d]
  output Y
}
kernel normalised_scan {
  rank T, D = 32
  input X[T, D]
  H[0, d]     = 0
  H[t + 1, d] = 0.9 * H[t, d] + 0.1 * X[t, d]
  N[t]        = H[t + 1, d] * H[t + 1, d]
  Y[t, d]     = H[t + 1, d] / sqrt(N[t] + 1e-6)
  output Y
}
kernel scan_of_one_step {
  rank T = 1, D = 32
  input A[T, D], B[T, D], X[T, D]
  H[d, 0]     = 1
  H[d, t + 1] = A[t, d] * H[d, t] + B[t, d] * X[t, d]
  Y[t, d]     = H[d, t + 1] + H[d, t]
  output Y
}
kernel linear_of_one_token {
  rank T = 1, E = 16, F = 16
  input Q[E, T], K[E, T], V[F, T]
  FK[e, t]       = max(K[e, t], 0) + exp(min(K[e, t], 0))
  S[0, e, f]     = 0
  S[t + 1, e, f] = S[t, e, f] + FK[e, t] * V[f, t]
  O[f, t]        = Q[e, t] * S[t + 1, e, f]
  output O
}";
    let program = einfuse::Program::from_source("lanes.ein", source).unwrap();
    let lanes_of = |kernel: &Cascade, tier, tensor: &str| lanes_and_rows(kernel, tier)[tensor].last().cloned();
    let rows = program.kernel(Some("rows")).unwrap();
    assert_eq!(lanes_of(rows, WIDE, "SLN").as_deref(), Some("M0"));
    let mlp = program.kernel(Some("mlp")).unwrap();
    assert_eq!(lanes_of(mlp, WIDE, "R").as_deref(), Some("J"));
    // No rank qualifies: the written order stands, the feature rank and a recurrence's slots kept
    // as written (a scan's state along `D`, its two iterates outside).
    let norm = program.kernel(Some("layer_norm")).unwrap();
    assert_eq!(lanes_of(norm, WIDE, "XC").as_deref(), Some("D"));
    let scan = program.kernel(Some("normalised_scan")).unwrap();
    assert_eq!(lanes_of(scan, WIDE, "H").as_deref(), Some("D"));
    let decode = small_kernel("benches/pytorch.ein", "decode").replace("P = 1", "P = 4");
    let decode = &einfuse::Program::from_source("decode.ein", &decode).unwrap().kernels[0];
    assert_eq!(lanes_of(decode, WIDE, "BQK").as_deref(), Some("M0"));
    assert_eq!(lanes_of(decode, NARROW, "BQK").as_deref(), Some("P"));
    let prefill =
        &einfuse::Program::from_source("prefill.ein", &small_kernel("benches/pytorch.ein", "prefill")).unwrap();
    assert_eq!(lanes_of(&prefill.kernels[0], WIDE, "BQK").as_deref(), Some("P"));
    for (kernel, name) in [(rows, "rows"), (mlp, "mlp"), (decode, "decode with four queries"), (norm, "layer_norm")] {
        agrees_on_both_tiers(kernel, name, &[(1, 3), (33, 19), (130, 9)]);
    }
    for name in ["scan_of_one_step", "linear_of_one_token"] {
        let kernel = program.kernel(Some(name)).unwrap();
        for target in [Target::Cpu, Target::CpuLlvm] {
            let error = difference(kernel, target, &BTreeMap::new(), 3);
            assert!(error <= 1e-5, "{name} on {target:?}: relative error {error:.3e}");
        }
    }
}
