//! Bytes in: diagnostics or IR out, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let source = String::from_utf8_lossy(data);
    let (file, diagnostics) = einfuse::dsl::parse(&source);
    let _ = einfuse::dsl::diagnostic::render_all(&diagnostics, "fuzz.ein", &source);
    let _ = file.to_string();
    let parsed_cleanly = diagnostics.is_empty();
    let (cascades, diagnostics) = einfuse::compiler::check_file(&file);
    let _ = einfuse::dsl::diagnostic::render_all(&diagnostics, "fuzz.ein", &source);
    // Checking goes on after parse errors (for more diagnostics); only a file that parsed is
    // a program whose printed form must round-trip.
    if !parsed_cleanly {
        return;
    }
    for cascade in &cascades {
        assert!(einfuse::compiler::verify::verify(cascade).is_ok());
        let printed = einfuse::compiler::print::print_cascade(cascade);
        let again = einfuse::compiler::compile_source(&printed).expect("printed IR checks");
        assert_eq!(&again[0], cascade, "printing round-trips");
    }
});
