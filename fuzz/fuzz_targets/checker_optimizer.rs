//! Generated cascades (from the fuzzer's bytes as a seed) through the checker, the analysis and
//! the optimizer: the result verifies and re-checks, and never needs more passes than the
//! optimizer claimed. (The claim is computed on terms and can be higher than what the analysis
//! finds on the cascade, which also traces fibers to the inputs they come from; on the examples
//! the two are equal, a test checks it.)
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut seed = [0u8; 8];
    for (i, b) in data.iter().take(8).enumerate() {
        seed[i] = *b;
    }
    let generated = einfuse::compiler::generate::generate(u64::from_le_bytes(seed));
    let cascade = &generated.cascade;
    let _ = einfuse::compiler::passcount::analyze(cascade);
    let result = einfuse::optimize(cascade).expect("the optimizer never fails on checked IR");
    assert!(einfuse::compiler::verify::verify(&result.cascade).is_ok());
    let printed = einfuse::compiler::print::print_cascade(&result.cascade);
    einfuse::compiler::compile_source(&printed).expect("optimized cascades re-check");
    if result.changed {
        let report = einfuse::compiler::passcount::analyze(&result.cascade);
        for (rank, claimed) in &result.claimed_passes {
            if let Some(found) = report.passes(rank) {
                assert!(found <= *claimed as usize, "rank {rank}: {found} passes, {claimed} claimed");
            }
        }
    }
});
