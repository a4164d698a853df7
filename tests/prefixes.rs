//! No input panics: the front end and the checker run on every prefix of every example file
//! (cut at every character boundary), and on a few hostile inputs.

use einfuse::{compiler, dsl};

fn corpus() -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["examples", "tests/filetests", "tests/errors"] {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries.into_iter().filter(|p| p.extension().is_some_and(|e| e == "ein")) {
            files.push((path.display().to_string(), std::fs::read_to_string(&path).unwrap()));
        }
    }
    files
}

/// Parses, checks (even what did not parse cleanly), verifies, prints and renders.
fn exercise(source: &str) {
    let (file, diagnostics) = dsl::parse(source);
    let _ = dsl::diagnostic::render_all(&diagnostics, "prefix.ein", source);
    let _ = file.to_string();
    let (cascades, check_diagnostics) = compiler::check_file(&file);
    let _ = dsl::diagnostic::render_all(&check_diagnostics, "prefix.ein", source);
    for cascade in &cascades {
        assert!(compiler::verify::verify(cascade).is_ok());
        let _ = compiler::print::print_cascade(cascade);
        let _ = compiler::graph::to_dot(cascade);
    }
}

#[test]
fn every_prefix_of_every_example() {
    let mut prefixes = 0;
    for (_, source) in corpus() {
        for (cut, _) in source.char_indices().chain([(source.len(), ' ')]) {
            exercise(&source[..cut]);
            prefixes += 1;
        }
    }
    assert!(prefixes > 1000, "{prefixes}");
}

#[test]
fn hostile_inputs() {
    let deep = format!(
        "kernel k {{\n rank N\n input X[N]\n Y[n] = {}X[n]{}\n output Y\n}}\n",
        "(".repeat(100_000),
        ")".repeat(100_000)
    );
    let negations = format!("kernel k {{\n rank N\n input X[N]\n Y[n] = {}X[n]\n output Y\n}}\n", "-".repeat(100_000));
    let long_sum =
        format!("kernel k {{\n rank N\n input X[N]\n Y[n] = X[n]{}\n output Y\n}}\n", " + X[n]".repeat(20_000));
    let fine_sum = format!("kernel k {{\n rank N\n input X[N]\n Y[n] = X[n]{}\n output Y\n}}\n", " + X[n]".repeat(200));
    for source in [
        deep.as_str(),
        negations.as_str(),
        long_sum.as_str(),
        "\u{0}\u{feff}kernel",
        "kernel",
        "kernel k {",
        "}}}}",
        "kernel k { rank M = 99999999999999999999999 }",
    ] {
        exercise(source);
    }
    // Tree depth is bounded, with a clear error, whether it comes from parentheses or from a long
    // chain of operators.
    assert!(compiler::compile_source(&fine_sum).is_ok());
    for source in [&deep, &negations, &long_sum] {
        let errors = compiler::compile_source(source).unwrap_err();
        assert!(errors[0].message.contains("nested more than"), "{:?}", errors[0]);
    }
}
