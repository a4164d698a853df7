//! The Loop IR verifier (`schedule::verify`): every program the scheduler returns passes it, on
//! every kernel of `examples/` and `benches/` as written, optimized and packed; and it rejects
//! programs that break each of its invariants.

mod common;

use einfuse::compiler::ir::RankId;
use einfuse::compiler::schedule::layout::is_batch_rank;
use einfuse::compiler::schedule::verify::verify;
use einfuse::compiler::schedule::{
    print_program, schedule, schedule_host, schedule_threads, BufferRole, HostTier, Node, Slot,
};

#[test]
fn every_scheduled_kernel_verifies() {
    let mut kernels = common::kernels_in("examples");
    kernels.extend(common::kernels_in("benches"));
    assert!(kernels.len() > 30, "{} kernels", kernels.len());
    for kernel in &kernels {
        let optimized = einfuse::optimize(kernel).unwrap().cascade;
        for cascade in [kernel, &optimized] {
            // Both host tiers: Cranelift's 4 lanes and 8.
            let host = |lanes| schedule_host(cascade, HostTier { lanes, registers: 16 }).unwrap();
            for program in [schedule(cascade).unwrap(), host(4), host(8)] {
                verify(&program).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

#[test]
fn broken_programs_are_rejected() {
    let kernel = common::kernels_in("benches").into_iter().find(|k| k.name == "prefill").unwrap();
    let optimized = einfuse::optimize(&kernel).unwrap().cascade;
    let program = schedule(&optimized).unwrap();
    let expect = |program: &einfuse::compiler::schedule::LoopProgram, words: &str| {
        let error = verify(program).expect_err(words).to_string();
        assert!(error.contains(words), "{error}");
    };
    // An Einsum computed twice.
    let mut twice = program.clone();
    let first = twice.body.iter().find(|n| matches!(n, Node::Compute { .. })).unwrap().clone();
    twice.body.push(first);
    expect(&twice, "computed 2 times");
    // The output written first, before what it reads.
    let mut early = program.clone();
    let last = early.body.pop().unwrap();
    early.body.insert(0, last);
    expect(&early, "before it is written");
    // A loop's tensor kept for the current step, yet read after the loop.
    let mut escaped = program.clone();
    let read = match escaped.body.last().unwrap() {
        Node::Compute { einsum } => escaped.cascade.einsums[einsum.index()].reads()[0].0,
        _ => unreachable!("the output is computed after the loop"),
    };
    let position = escaped.buffers[read.index()].slots.iter().position(|s| *s == Slot::Alternate).unwrap();
    escaped.buffers[read.index()].slots[position] = Slot::Current;
    expect(&escaped, "used outside the loop");
    // An input given the role of scratch.
    let mut role = program.clone();
    role.buffers[0].role = BufferRole::Temp;
    expect(&role, "has the role");
}

/// Tiles staged by hand (FuseMax's `BK[e, m1, m0] = K[e, m1 * M0 + m0]`) keep the queries a batch
/// rank, so that the host tiers run the kernel a chunk of queries at a time and the thread kernels
/// a thread per query. Every schedule reads the inputs in place and stages what the layer
/// chooses instead: the thread kernels stage tiles in shared memory, and every host tier stages
/// the keys (read along `e` a whole rank apart) and not the values.
#[test]
fn hand_staged_tiles_keep_the_batch_rank() {
    let kernel = common::kernels_in("examples").into_iter().find(|k| k.name == "attention_1pass").unwrap();
    let p = (0..kernel.ranks.len()).map(RankId::new).find(|r| kernel.rank(*r).name == "P").unwrap();
    assert!(is_batch_rank(&kernel, p));
    for lanes in [4, 8] {
        let host = schedule_host(&kernel, HostTier { lanes, registers: 16 }).unwrap();
        assert!(is_batch_rank(&host.cascade, p));
        let text = print_program(&host);
        assert!(!text.contains("BK") && !text.contains("BV"), "{text}");
        assert!(text.contains("staged_K[e, m1, m0] = K[e, m1 * M0 + m0]"), "{text}");
        assert!(text.contains("V[f, m1 * M0 + m0]") && !text.contains("staged_V"), "{text}");
    }
    let threads = schedule_threads(&kernel).unwrap();
    verify(&threads).unwrap();
    assert!(is_batch_rank(&threads.cascade, p));
    let text = print_program(&threads);
    assert!(!text.contains("BK") && !text.contains("BV"), "{text}");
    assert!(text.contains("sum[e](Q[e, p] * K[e, m1 * M0 + m0] * scale)"), "{text}");
    assert!(text.contains("sum[m0](SLN[m1, m0, p] * V[f, m1 * M0 + m0])"), "{text}");
}

/// A staged tile serves only the reads that step through its split pair: another read of the
/// same input in the same Einsum (`K[e, 0]`) still reads the input.
#[test]
fn a_staged_tile_serves_only_reads_of_its_steps() {
    use einfuse::compiler::ir::{EinsumId, TensorId};
    use einfuse::compiler::schedule::pack::{apply, Pack, Staging};
    let source = "
kernel two_reads {
  rank E = 4, M, P
  rank M0 = 4, M1 = M / M0
  input K[E, M], Q[E, P]
  S[m1, m0, p] = Q[e, p] * (K[e, m1 * M0 + m0] - K[e, 0])
  output S
}";
    let program = einfuse::Program::from_source("two.ein", source).unwrap();
    let c = &program.kernels[0];
    let rank = |name: &str| (0..c.ranks.len()).map(RankId::new).find(|r| c.rank(*r).name == name).unwrap();
    let k = (0..c.tensors.len()).map(TensorId::new).find(|t| c.tensor(*t).name == "K").unwrap();
    let reader = (0..c.einsums.len()).map(EinsumId::new).find(|e| c.einsums[e.index()].target != k).unwrap();
    let staging = Staging::Tile { tile: rank("M1"), inner: rank("M0") };
    let packed = apply(c, &[Pack { tensor: k, position: 1, readers: vec![reader], staging }]);
    let text = einfuse::compiler::print::print_cascades(&[packed]);
    assert!(text.contains("staged_K[e, m1, m0] = K[e, m1 * M0 + m0]"), "{text}");
    assert!(text.contains("staged_K[e, m1, m0] - K[e, 0]"), "{text}");
}
