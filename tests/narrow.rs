//! Narrowing (`optimize::narrow`): a tensor read only under a filter takes the filter, so that a
//! mask written after a function of the scores (ALiBi with soft-capping) still skips the masked
//! part of the contraction.
//!
//! The narrowed cascade must give the same bits as the one it came from on the interpreter, for
//! every kernel of the corpus and its optimized form, and for the same variant written other ways
//! (other layouts and index names, the mask on another statement or on a reduction, the
//! comparison turned around, the modification in two steps); and a tensor must stay as it is
//! where some read is not under the filter.

mod common;

use std::collections::BTreeMap;

use einfuse::compiler::interp::{interpret, InterpLimits};
use einfuse::compiler::ir::*;
use einfuse::compiler::optimize::narrow::narrow;
use einfuse::compiler::optimize::{optimize, OptimizeOptions};
use einfuse::compiler::print::print_cascade;

fn kernel(source: &str) -> Cascade {
    einfuse::compiler::compile_source(source).unwrap_or_else(|e| panic!("{e:?}")).remove(0)
}

/// Both cascades' outputs on the interpreter, bit for bit, on ragged sizes, a query row whose
/// every key is masked (`P` past `M`), and logits of 1e4.
fn same_bits(before: &Cascade, after: &Cascade) {
    agree(before, after, 0.0);
}

/// Both cascades' outputs on the interpreter, within `tolerance` relative to `1 + |x|`.
fn agree(before: &Cascade, after: &Cascade, tolerance: f64) {
    for (m, p, scale) in [(70u64, 5u64, 1.0f32), (3, 9, 1.0), (130, 66, 1e4)] {
        let sizes: BTreeMap<&str, u64> = [("M", m), ("P", p), ("J", m), ("I", p)].into_iter().collect();
        let (bindings, extents, inputs) = common::random_call(before, &sizes, m + p);
        let data: Vec<Vec<f64>> =
            inputs.iter().map(|t| t.data().iter().map(|x| (*x * scale) as f64).collect()).collect();
        let slices: Vec<&[f64]> = data.iter().map(Vec::as_slice).collect();
        let want = interpret(before, &extents, &slices, InterpLimits::default()).unwrap();
        let after_extents = einfuse::compiler::shapes::bind_extents(after, &bindings, &[]).unwrap();
        let got = interpret(after, &after_extents, &slices, InterpLimits::default()).unwrap();
        for (w, g) in want.iter().zip(&got) {
            for (a, b) in w.iter().zip(g) {
                let close = if tolerance == 0.0 {
                    a.to_bits() == b.to_bits()
                } else {
                    (a - b).abs() <= tolerance * (1.0 + a.abs())
                };
                assert!(close, "{}: M={m} P={p}: {a} before, {b} after", before.name);
            }
        }
    }
}

/// The filter of the Einsum that contracts `Q` with `K` (the one whose value reads `K`), split
/// validity left out.
fn contraction_filter(c: &Cascade) -> Vec<Cond> {
    let k = (0..c.tensors.len()).map(TensorId::new).find(|t| c.tensor(*t).name == "K").expect("an input K");
    let einsum = c.einsums.iter().find(|e| e.body.accesses().iter().any(|(t, _)| *t == k)).expect("a contraction");
    einsum.filter.iter().filter(|cond| !c.is_split_validity(cond)).cloned().collect()
}

#[test]
fn narrowing_keeps_every_bit_of_the_corpus() {
    let mut narrowed = 0;
    for dir in ["examples", "benches"] {
        for written in common::kernels_in(dir) {
            for c in [written.clone(), optimize(&written, &OptimizeOptions::default()).unwrap().cascade] {
                if let Some(after) = narrow(&c) {
                    einfuse::compiler::verify::verify(&after).unwrap();
                    same_bits(&c, &after);
                    narrowed += 1;
                }
            }
        }
    }
    // ALiBi in `examples/variants.ein` and `benches/pytorch.ein`, as written and optimized.
    assert!(narrowed >= 4, "only {narrowed} kernels narrowed");
}

/// ALiBi + soft-capping + causal as the benchmarks write it, in a small shape.
const ALIBI: &str = "rank H = 2, E = 8, F = 8, M, P
  input Q[H, P, E], K[H, M, E], V[H, M, F], Slope[H]
  QK[h, p, m] = Q[h, p, e] * K[h, m, e] * 0.3
  S[h, p, m]  = 5 * tanh(QK[h, p, m] / 5) + Slope[h] * (m - p) where m <= p
  GM[h, p]    = max[m](S[h, p, m])
  SN[h, p, m] = exp(S[h, p, m] - GM[h, p])
  SD[h, p]    = SN[h, p, m]
  AV[h, p, f] = SN[h, p, m] * V[h, m, f] / SD[h, p]
  output AV";

/// The same computation written in ways the corpus does not write it.
fn alibi_ways() -> Vec<(&'static str, String)> {
    let scores = "S[h, p, m]  = 5 * tanh(QK[h, p, m] / 5) + Slope[h] * (m - p) where m <= p";
    vec![
        ("as in the benchmarks", ALIBI.to_string()),
        (
            "sequence first, other names, the comparison turned around",
            "rank G = 2, D = 8, F = 8, J, I
             input Q[I, G, D], K[J, G, D], V[J, G, F], Slope[G]
             L[j, i, g] = Q[i, g, d] * K[j, g, d] * 0.3
             S[j, i, g] = Slope[g] * (j - i) + 5 * tanh(L[j, i, g] / 5) where i >= j
             B[i, g]    = max[j](S[j, i, g])
             W[j, i, g] = exp(S[j, i, g] - B[i, g])
             Z[i, g]    = W[j, i, g]
             AV[i, g, f] = W[j, i, g] * V[j, g, f] / Z[i, g]
             output AV"
                .to_string(),
        ),
        (
            "the modification in two steps",
            ALIBI.replace(
                scores,
                "C[h, p, m] = 5 * tanh(QK[h, p, m] / 5)\n  S[h, p, m] = C[h, p, m] + Slope[h] * (m - p) where m <= p",
            ),
        ),
        (
            "the mask on the reductions and the exponential",
            ALIBI
                .replace(" where m <= p", "")
                .replace("max[m](S[h, p, m])", "max[m](S[h, p, m]) where m <= p")
                .replace("exp(S[h, p, m] - GM[h, p])", "exp(S[h, p, m] - GM[h, p]) where m <= p"),
        ),
        ("a window and the causal mask together", ALIBI.replace("where m <= p", "where m <= p && m + 4 > p")),
        (
            "the value contraction reads the scores under the mask again",
            ALIBI.replace("SN[h, p, m] = exp(S[h, p, m] - GM[h, p])\n", "").replace(
                "SD[h, p]    = SN[h, p, m]\n  AV[h, p, f] = SN[h, p, m] * V[h, m, f] / SD[h, p]",
                "SD[h, p] = sum[m](exp(S[h, p, m] - GM[h, p]))\n  \
                 AV[h, p, f] = sum[m](exp(S[h, p, m] - GM[h, p]) * V[h, m, f]) / SD[h, p]",
            ),
        ),
    ]
}

#[test]
fn alibi_written_every_way_masks_its_contraction() {
    let ways = alibi_ways();
    assert!(ways.iter().skip(1).all(|(_, body)| body != ALIBI), "a rewriting changed nothing");
    for (way, body) in ways {
        let written = kernel(&format!("kernel alibi {{\n{body}\n}}"));
        let optimized = optimize(&written, &OptimizeOptions::default()).unwrap().cascade;
        let filter = contraction_filter(&optimized);
        assert!(!filter.is_empty(), "{way}: the contraction computes masked scores:\n{}", print_cascade(&optimized));
        // The optimizer reorders sums: the same values within rounding.
        agree(&written, &optimized, 1e-6);
        // As written, too: narrowing needs no split ranks.
        let narrowed = narrow(&written).unwrap_or_else(|| panic!("{way}: not narrowed"));
        assert!(!contraction_filter(&narrowed).is_empty(), "{way}:\n{}", print_cascade(&narrowed));
        same_bits(&written, &narrowed);
    }
}

/// Generated cascades (`compiler::generate`: filters, reductions, split ranks, primed indices of
/// their own), narrowed, give the same bits.
#[test]
fn narrowing_keeps_every_bit_of_generated_cascades() {
    let mut narrowed = 0;
    for seed in 0..400 {
        let generated = einfuse::compiler::generate::generate(seed);
        let c = &generated.cascade;
        let Some(after) = narrow(c) else { continue };
        einfuse::compiler::verify::verify(&after).unwrap();
        let extents = einfuse::compiler::shapes::bind_extents(c, &generated.bindings, &[]).unwrap();
        let inputs: Vec<Vec<f64>> = c
            .inputs()
            .iter()
            .enumerate()
            .map(|(n, id)| {
                let shape: Vec<usize> =
                    einfuse::compiler::shapes::tensor_shape(c, *id, &extents).iter().map(|x| *x as usize).collect();
                let t = einfuse::Tensor::random(einfuse::DType::F32, shape, seed * 10 + n as u64).unwrap();
                t.data().iter().map(|x| *x as f64).collect()
            })
            .collect();
        let slices: Vec<&[f64]> = inputs.iter().map(Vec::as_slice).collect();
        let want = interpret(c, &extents, &slices, InterpLimits::default()).unwrap();
        let got = interpret(&after, &extents, &slices, InterpLimits::default()).unwrap();
        for (w, g) in want.iter().zip(&got) {
            for (a, b) in w.iter().zip(g) {
                assert!(a.to_bits() == b.to_bits(), "seed {seed}: {a} before, {b} narrowed\n{}", print_cascade(&after));
            }
        }
        narrowed += 1;
    }
    // The generator rarely reads a tensor only under a filter: the sweep must still meet one.
    assert!(narrowed >= 1, "no generated cascade narrowed");
}

/// A read at swapped indices renames the comparison into the tensor's own indices at once
/// (`n' < n` read at `D[n', n]` is `n < n'` of `D[n, n']`; renamed one index at a time it would be
/// `n < n`, and `D` empty).
#[test]
fn a_read_at_swapped_indices_renames_its_filter() {
    let written = kernel(
        "kernel swapped {
           rank N
           input X[N]
           D[n, n'] = X[n] - X[n'] * 0.5
           U[] = sum[n', n](abs(D[n', n])) where n' < n
           output U
         }",
    );
    let narrowed = narrow(&written).expect("narrowed");
    let d = narrowed.einsums.iter().find(|e| narrowed.tensor(e.target).name == "D").unwrap();
    assert_eq!(d.filter.len(), 1, "{}", print_cascade(&narrowed));
    same_bits(&written, &narrowed);
}

/// Where some read of the scores is not under the filter, or reads them at a shifted point, or
/// in a filter, or the scores are an output, the contraction keeps every point.
#[test]
fn a_read_outside_the_filter_keeps_the_tensor_whole() {
    let ways = [
        (
            "a second reader without the mask",
            "S[m, p] = tanh(QK[m, p]) where m <= p\n T[p] = sum[m](QK[m, p])\n output S, T",
        ),
        (
            "readers with different masks",
            "S[m, p] = tanh(QK[m, p]) where m <= p\n T[m, p] = exp(QK[m, p]) where m >= p\n output S, T",
        ),
        ("a shifted read", "S[m, p] = tanh(QK[m + 1, p]) where m <= p\n output S"),
        ("a read in the filter", "S[m, p] = QK[m, p] * 2 where QK[m, p] > 0 && m <= p\n output S"),
        ("the scores an output", "S[m, p] = tanh(QK[m, p]) where m <= p\n output S, QK"),
        (
            "a sibling reduction without the mask",
            "Y[p] = max[m](QK[m, p]) + sum[m'](QK[m', p]) where m <= p\n output Y",
        ),
    ];
    for (way, rest) in ways {
        let source = format!(
            "kernel whole {{\n rank E = 4, M, P\n input Q[E, P], K[E, M]\n QK[m, p] = Q[e, p] * K[e, m]\n {rest}\n}}"
        );
        let written = kernel(&source);
        if let Some(narrowed) = narrow(&written) {
            assert!(contraction_filter(&narrowed).is_empty(), "{way}: narrowed\n{}", print_cascade(&narrowed));
            same_bits(&written, &narrowed);
        }
    }
}
