//! The reference interpreter against softmax attention written directly in Rust: both attention
//! kernels of the language contract, ragged tile counts, causal and sliding-window filters, fully
//! masked rows, and logits near 1e4.

use einfuse::{run, DType, Program, RunOptions, Target, Tensor};

const E: usize = 64;

/// Softmax attention: AV[f, p] = sum_m softmax_m(scale * Q[:, p] . K[:, m]) V[f, m], over the keys
/// that `keep(m, p)` allows; a row with no key gives 0.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, keep: impl Fn(usize, usize) -> bool) -> Vec<f64> {
    let (p_len, m_len, f_len) = (q.shape()[1], k.shape()[1], v.shape()[0]);
    let (q, k, v) = (q.data(), k.data(), v.data());
    let mut out = vec![0.0; f_len * p_len];
    for p in 0..p_len {
        let scores: Vec<Option<f64>> = (0..m_len)
            .map(|m| {
                keep(m, p)
                    .then(|| scale * (0..E).map(|e| q[e * p_len + p] as f64 * k[e * m_len + m] as f64).sum::<f64>())
            })
            .collect();
        let max = scores.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
        if max == f64::NEG_INFINITY {
            continue;
        }
        let weights: Vec<f64> = scores.iter().map(|s| s.map_or(0.0, |s| (s - max).exp())).collect();
        let denominator: f64 = weights.iter().sum();
        for f in 0..f_len {
            let numerator: f64 = (0..m_len).map(|m| weights[m] * v[f * m_len + m] as f64).sum();
            out[f * p_len + p] = numerator / denominator;
        }
    }
    out
}

fn program(path: &str) -> Program {
    Program::from_file(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

struct Case {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

fn case(p: usize, m: usize, seed: u64) -> Case {
    Case {
        q: Tensor::random(DType::F32, vec![E, p], seed).unwrap(),
        k: Tensor::random(DType::F32, vec![E, m], seed + 1).unwrap(),
        v: Tensor::random(DType::F32, vec![E, m], seed + 2).unwrap(),
    }
}

fn run_kernel(program: &Program, kernel: &str, case: &Case, params: &[(&str, f64)]) -> Tensor {
    let options = RunOptions {
        inputs: vec![("Q".into(), case.q.clone()), ("K".into(), case.k.clone()), ("V".into(), case.v.clone())],
        params: params.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
        ..RunOptions::default()
    };
    let mut outputs = run(program.kernel(Some(kernel)).unwrap(), Target::Interp, &options).unwrap();
    outputs.remove(0).1
}

fn assert_close(actual: &Tensor, expected: &[f64], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}");
    for (i, (a, e)) in actual.data().iter().zip(expected).enumerate() {
        assert!(a.is_finite(), "{what}: non-finite output at {:?}", actual.coordinates(i));
        let tolerance = 1e-5 * (1.0 + e.abs());
        assert!(((*a as f64) - e).abs() <= tolerance, "{what}: at {:?}: {a} vs {e}", actual.coordinates(i));
    }
}

#[test]
fn both_contract_kernels_match_direct_attention() {
    let attention = program("examples/attention.ein");
    // M a multiple of M0 = 64, and not; a single key; fewer keys than one tile.
    for (p, m) in [(5, 128), (7, 100), (3, 1), (4, 65), (2, 63)] {
        let case = case(p, m, (p * 1000 + m) as u64);
        let expected = reference(&case.q, &case.k, &case.v, 0.125, |_, _| true);
        for kernel in ["attention", "attention_1pass"] {
            assert_close(&run_kernel(&attention, kernel, &case, &[]), &expected, &format!("{kernel} P={p} M={m}"));
        }
    }
}

#[test]
fn causal_and_sliding_window() {
    let masks = program("tests/filetests/masks.ein");
    for (p, m) in [(70, 70), (80, 50), (9, 130)] {
        let case = case(p, m, 17 + m as u64);
        let causal = reference(&case.q, &case.k, &case.v, 0.125, |m, p| m <= p);
        assert_close(&run_kernel(&masks, "causal", &case, &[]), &causal, &format!("causal P={p} M={m}"));
        let window = reference(&case.q, &case.k, &case.v, 0.125, |m, p| m <= p && p - m < 16);
        assert_close(&run_kernel(&masks, "sliding_window", &case, &[]), &window, &format!("window P={p} M={m}"));
    }
}

const STRICT: &str = "
kernel strictly_causal {
  rank E = 64, F = 64, M, P
  input Q[E, P], K[E, M], V[F, M]
  param scale = 0.125

  QK[m, p] = Q[e, p] * K[e, m] * scale
  S[m, p]  = QK[m, p] where m < p
  GM[p]    = max[m](S[m, p])
  SN[m, p] = exp(S[m, p] - GM[p])
  SD[p]    = SN[m, p]
  A[m, p]  = SN[m, p] / SD[p]
  AV[f, p] = A[m, p] * V[f, m]

  output AV
}
";

#[test]
fn a_fully_masked_row_gives_zero() {
    let program = Program::from_source("strict.ein", STRICT).unwrap();
    let case = case(6, 10, 5);
    let out = run_kernel(&program, "strictly_causal", &case, &[]);
    let expected = reference(&case.q, &case.k, &case.v, 0.125, |m, p| m < p);
    assert_close(&out, &expected, "strictly causal");
    // Row p = 0 has no key at all.
    for f in 0..E {
        assert_eq!(out.data()[f * 6], 0.0);
    }
}

#[test]
fn a_padding_mask_with_an_empty_row() {
    let masks = program("tests/filetests/masks.ein");
    let (p, m, e) = (4, 9, 32);
    let q = Tensor::random(DType::F32, vec![e, p], 1).unwrap();
    let k = Tensor::random(DType::F32, vec![e, m], 2).unwrap();
    let v = Tensor::random(DType::F32, vec![e, m], 3).unwrap();
    // Row 2 masks every key; the others keep every other key.
    let mask: Vec<f32> = (0..p * m).map(|i| if i / m == 2 { 0.0 } else { ((i % m) % 2) as f32 }).collect();
    let mask = Tensor::new(DType::F32, vec![p, m], mask).unwrap();
    let options = RunOptions {
        inputs: vec![
            ("Q".into(), q.clone()),
            ("K".into(), k.clone()),
            ("V".into(), v.clone()),
            ("Mask".into(), mask.clone()),
        ],
        ..RunOptions::default()
    };
    let out = run(masks.kernel(Some("padded")).unwrap(), Target::Interp, &options).unwrap().remove(0).1;
    for pp in 0..p {
        let keep: Vec<usize> = (0..m).filter(|mm| mask.data()[pp * m + mm] != 0.0).collect();
        for ee in 0..e {
            let got = out.data()[ee * p + pp] as f64;
            if keep.is_empty() {
                assert_eq!(got, 0.0);
                continue;
            }
            let scores: Vec<f64> = keep
                .iter()
                .map(|mm| (0..e).map(|x| q.data()[x * p + pp] as f64 * k.data()[x * m + mm] as f64).sum())
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let want = keep.iter().zip(&w).map(|(mm, w)| w * v.data()[ee * m + mm] as f64).sum::<f64>()
                / w.iter().sum::<f64>();
            assert!((got - want).abs() < 1e-5, "p={pp} e={ee}: {got} vs {want}");
        }
    }
}

#[test]
fn logits_near_1e4_stay_finite() {
    let attention = program("examples/attention.ein");
    // With |Q . K| up to about 5, a scale of 2000 puts the logits near 1e4: a naive exp overflows.
    let scale = 2000.0;
    let case = case(5, 100, 99);
    let expected = reference(&case.q, &case.k, &case.v, scale, |_, _| true);
    for kernel in ["attention", "attention_1pass"] {
        assert_close(&run_kernel(&attention, kernel, &case, &[("scale", scale)]), &expected, kernel);
    }
}
