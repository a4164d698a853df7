//! Generated cascades (from the fuzzer's bytes as a seed) through the checker, the analysis and
//! the optimizer: no panic, and the result verifies and re-checks.
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
    // The pass analysis of the result runs too. (The optimizer's claimed counts come from its
    // term cost and may differ from the analysis on cascades that read ranks through their own
    // split pairs or reduce along ranks their scores do not depend on; the examples keep them
    // equal, `tests/optimizer.rs`.)
    let _ = einfuse::compiler::passcount::analyze(&result.cascade);
});
