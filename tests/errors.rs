//! Error tests: every file under `tests/errors/` is malformed. Its rendered diagnostics are
//! snapshot-tested, each names the file, line and column and draws a caret, and the CLI exits
//! with status 1 on it.

use std::process::Command;

use einfuse::compiler;
use einfuse::dsl::diagnostic::{line_column, render_all};

#[test]
fn diagnostics() {
    let mut count = 0;
    insta::glob!("errors/*.ein", |path| {
        count += 1;
        let source = std::fs::read_to_string(path).unwrap();
        let name = format!("errors/{}", path.file_name().unwrap().to_string_lossy());
        let diagnostics = match compiler::compile_source(&source) {
            Ok(_) => panic!("{name} is accepted but should be an error"),
            Err(d) => d,
        };
        for diagnostic in &diagnostics {
            let (line, column) = line_column(&source, diagnostic.span.start);
            let rendered = diagnostic.render(&name, &source);
            assert!(rendered.contains(&format!("{name}:{line}:{column}")), "{rendered}");
            assert!(rendered.contains('^'), "no caret:\n{rendered}");
        }
        insta::assert_snapshot!(render_all(&diagnostics, &name, &source));
    });
    assert!(count >= 25, "only {count} error files");
}

#[test]
fn the_cli_exits_with_status_1_and_a_caret() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/errors");
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let output = Command::new(env!("CARGO_BIN_EXE_einfuse")).arg("check").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{}: {stderr}", path.display());
        assert!(stderr.contains('^') && stderr.contains("error:"), "{}: {stderr}", path.display());
    }
}
