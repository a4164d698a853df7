//! Filetests: every `.ein` file under `tests/filetests/` is snapshot-tested at each stage, and
//! its printed IR must re-parse to the same IR and print identically.

use einfuse::compiler::{self, print::print_cascades};
use einfuse::dsl;

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn ast() {
    insta::glob!("filetests/*.ein", |path| {
        let (file, diagnostics) = dsl::parse(&read(path));
        assert!(diagnostics.is_empty(), "{}: {diagnostics:?}", path.display());
        insta::assert_snapshot!(file.to_string());
    });
}

#[test]
fn ir() {
    insta::glob!("filetests/*.ein", |path| {
        let cascades = compiler::compile_source(&read(path))
            .unwrap_or_else(|d| panic!("{}: {}", path.display(), dsl::diagnostic::render_all(&d, "", &read(path))));
        insta::assert_snapshot!(print_cascades(&cascades));
    });
}

/// The Loop IR of each kernel, optimized: loops, buffers and their slots, and which streamed
/// loops may skip an empty step.
#[test]
fn loops() {
    insta::glob!("filetests/*.ein", |path| {
        let cascades = compiler::compile_source(&read(path)).expect("filetests check");
        let mut out = String::new();
        for cascade in &cascades {
            let optimized = einfuse::optimize(cascade).map(|o| o.cascade).unwrap_or_else(|_| cascade.clone());
            match compiler::schedule::schedule(&optimized) {
                Ok(program) => out += &compiler::schedule::print_program(&program),
                Err(e) => out += &format!("{}: {e}\n", cascade.name),
            }
        }
        insta::assert_snapshot!(out);
    });
}

#[test]
fn printed_ir_reparses_to_the_same_ir() {
    insta::glob!("filetests/*.ein", |path| {
        let cascades = compiler::compile_source(&read(path)).expect("filetests check");
        let printed = print_cascades(&cascades);
        let again = compiler::compile_source(&printed).unwrap_or_else(|d| {
            panic!(
                "{}: printed IR does not check:\n{}",
                path.display(),
                dsl::diagnostic::render_all(&d, "printed", &printed)
            )
        });
        assert_eq!(cascades, again, "{}: IR changed through printing", path.display());
        assert_eq!(printed, print_cascades(&again), "{}: printing is not a fixed point", path.display());
    });
}

#[test]
fn examples_and_filetests_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut count = 0;
    for dir in ["examples", "tests/filetests"] {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries.into_iter().filter(|p| p.extension().is_some_and(|e| e == "ein")) {
            let source = read(&path);
            if let Err(d) = compiler::compile_source(&source) {
                panic!("{}", dsl::diagnostic::render_all(&d, &path.display().to_string(), &source));
            }
            count += 1;
        }
    }
    assert!(count >= 2);
}
