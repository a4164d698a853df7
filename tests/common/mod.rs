//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

use einfuse::compiler::ir::Cascade;
use einfuse::Program;

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every kernel of the `.ein` files of a folder of the repository, files in name order.
pub fn kernels_in(dir: &str) -> Vec<Cascade> {
    let dir: &Path = &root().join(dir);
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "ein"))
        .flat_map(|p| Program::from_file(p).unwrap().kernels)
        .collect()
}
