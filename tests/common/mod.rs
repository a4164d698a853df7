//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use einfuse::compiler::ir::{Cascade, Extent, TensorKind};
use einfuse::compiler::shapes::{bind_extents, tensor_shape};
use einfuse::{Program, Tensor};

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

/// The call every comparison with the interpreter makes: each symbolic rank bound from `sizes`
/// (5 where it has none), the extents, and seeded random inputs of the cascade's storage types.
#[allow(dead_code)]
pub fn random_call(
    cascade: &Cascade,
    sizes: &BTreeMap<&str, u64>,
    seed: u64,
) -> (Vec<(String, u64)>, Vec<u64>, Vec<Tensor>) {
    let bindings: Vec<(String, u64)> = cascade
        .ranks
        .iter()
        .filter(|r| matches!(r.extent, Extent::Symbolic))
        .map(|r| (r.name.clone(), sizes.get(r.name.as_str()).copied().unwrap_or(5)))
        .collect();
    let extents = bind_extents(cascade, &bindings, &[]).unwrap();
    let inputs: Vec<Tensor> = cascade
        .inputs()
        .iter()
        .enumerate()
        .map(|(n, id)| {
            let shape = tensor_shape(cascade, *id, &extents).iter().map(|s| *s as usize).collect();
            let TensorKind::Input { elem } = cascade.tensor(*id).kind else { unreachable!("an input") };
            Tensor::random(einfuse::dtype_of(elem), shape, seed * 100 + n as u64).unwrap()
        })
        .collect();
    (bindings, extents, inputs)
}
