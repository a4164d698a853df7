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

/// Attention under a causal filter shifted by the param `shift` (`m <= p + shift`): the tests of
/// steps that the filter admits whole or empties (`schedule::full_steps`) on both CPU tiers.
#[allow(dead_code)]
pub const SHIFTED_CAUSAL: &str = "kernel shifted {
  rank E = 8, F = 8, M, P
  input Q[E, P], K[E, M], V[F, M]
  param scale = 0.3, shift = 0
  QK[m, p] = Q[e, p] * K[e, m] * scale
  S[m, p]  = QK[m, p] where m <= p + shift
  GM[p]    = max[m](S[m, p])
  SN[m, p] = exp(S[m, p] - GM[p])
  SD[p]    = SN[m, p]
  AV[f, p] = SN[m, p] * V[f, m] / SD[p]
  output AV
}";

/// Softmax attention over keys `m` for queries `p` (head dimension `e`, value dimension `f`),
/// with the given ranks, inputs (their storage types) and outputs.
#[allow(dead_code)]
pub fn attention(name: &str, ranks: &str, inputs: &str, outputs: &str) -> String {
    format!(
        "kernel {name} {{
      rank {ranks}
      input {inputs}
      param scale = 0.05
      QK[m, p] = Q[e, p] * K[e, m] * scale
      GM[p] = max[m](QK[m, p])
      SN[m, p] = exp(QK[m, p] - GM[p])
      SD[p] = SN[m, p]
      AV[f, p] = SN[m, p] * V[f, m] / SD[p]
      output {outputs}
    }}"
    )
}
