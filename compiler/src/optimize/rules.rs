//! The rewrite rules of the optimizer, as named, tested data.
//!
//! Every rule is sound over the reals under its side condition, and is checked against the
//! interpreter on random data by `tests/rules.rs`. There is no general commutativity or
//! associativity: each rule that needs an operand order is written in both orders.
//!
//! Left out on purpose: `exp(a - b) = exp(a) / exp(b)`. It is exact in real arithmetic, but it
//! lets the e-graph factor `exp(-max)` out of a sum, which leaves `exp(a)` unbounded and overflows
//! for logits near 100 in f32. `unsafe_rules` holds it for the tests that show extraction never
//! chooses its result.

use egg::{rewrite as rw, EGraph, Id, Rewrite, Subst, Symbol, Var};

use super::lang::{Ein, EinAnalysis};

type Rule = Rewrite<Ein, EinAnalysis>;
type Graph = EGraph<Ein, EinAnalysis>;

fn var(name: &str) -> Var {
    name.parse().expect("a pattern variable")
}

/// `?k` binds an index that `?b` does not depend on.
fn independent(k: &str, b: &str) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let (k, b) = (var(k), var(b));
    move |egraph, _, subst| {
        let reduced: Vec<Symbol> = egraph[subst[k]].data.free.iter().copied().collect();
        reduced.iter().all(|index| !egraph[subst[b]].data.free.contains(index))
    }
}

/// `?a` depends on the index `?k` binds.
fn depends(k: &str, a: &str) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let independent = independent(k, a);
    move |egraph, id, subst| !independent(egraph, id, subst)
}

/// `?b` is > 0 wherever it is defined, or is a sum of positive terms (> 0 unless empty).
fn positive_divisor(b: &str) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let b = var(b);
    move |egraph, _, subst| {
        let facts = &egraph[subst[b]].data;
        facts.positive || facts.positive_unless_empty
    }
}

/// `?a` is defined at every point: moving it out of a reduction cannot turn an empty reduction
/// (a value) into no value.
fn total(a: &str) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let a = var(a);
    move |egraph, _, subst| egraph[subst[a]].data.total
}

/// `?a` is finite: moving it out of a reduction over an empty set gives `a * 0 = 0` or
/// `-inf + a = -inf`, as the reduction as written does.
fn finite(a: &str) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let a = var(a);
    move |egraph, _, subst| egraph[subst[a]].data.finite
}

/// `?b` depends on fewer indices than `?a` and `?c` together, and `?c` on one `?b` does not.
fn fewer_indices(b: &str, a: &str, c: &str) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let (b, a, c) = (var(b), var(a), var(c));
    move |egraph, _, subst| {
        let free = |v: Var| &egraph[subst[v]].data.free;
        let others: std::collections::BTreeSet<Symbol> = free(a).union(free(c)).copied().collect();
        free(b).is_subset(&others) && free(b).len() < others.len() && !free(c).is_subset(free(b))
    }
}

/// Where `?k` is the tile index of a split the source made by hand (`m1`), the online sum is
/// lowered as a recurrence along that rank itself (tiling it again would make tiles of tiles), and
/// every step of a recurrence must be defined: the scores `?a` and the summand `?x` are total.
/// Not a condition of soundness, but of the lowering: the rules build only sums it can emit.
fn lowerable(k: &str, a: &str, x: Option<&str>) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let (k, a, x) = (var(k), var(a), x.map(var));
    move |egraph, _, subst| {
        let along_tiles = egraph[subst[k]].data.free.iter().any(|i| egraph.analysis.is_tile_index(*i));
        !along_tiles || (egraph[subst[a]].data.total && x.is_none_or(|x| egraph[subst[x]].data.total))
    }
}

/// The maximum `(rmax ?k ?a)` is finite (a maximum over a set that is never empty, such as a
/// hand-made tile, of finite values). The class exists: the pattern holds it.
fn inner_max_finite(k: &str, a: &str) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let (k, a) = (var(k), var(a));
    move |egraph, _, subst| {
        egraph.lookup(Ein::RMax([subst[k], subst[a]])).is_some_and(|class| egraph[class].data.finite)
    }
}

/// `?c` is > 0 wherever it is defined.
fn positive(c: &str) -> impl Fn(&mut Graph, Id, &Subst) -> bool {
    let c = var(c);
    move |egraph, _, subst| egraph[subst[c]].data.positive
}

/// The rules that the optimizer runs.
#[rustfmt::skip]
pub fn rules() -> Vec<Rule> {
    vec![
        // Division moves outward through products: (a / b) * c = (a * c) / b.
        rw!("div-out-of-mul-left";  "(* (/ ?a ?b) ?c)" => "(/ (* ?a ?c) ?b)"),
        rw!("div-out-of-mul-right"; "(* ?c (/ ?a ?b))" => "(/ (* ?c ?a) ?b)"),
        // Deferring a per-fiber divisor past a reduction (FuseMax §IV-D). A divisor that is > 0
        // unless its set is empty is 0 exactly when the sum is empty too: dividing by at least the
        // smallest normal f32 keeps that row at 0, as the sum as written is, instead of 0 / 0.
        rw!("defer-division"; "(sum ?k (/ ?a ?b))" => "(/ (sum ?k ?a) (max2 ?b 1.1754943508222875e-38))"
            if independent("?k", "?b") if positive_divisor("?b") if total("?b")),
        // The product form: an invariant factor leaves the sum (FuseMax Cascade 1 to 2).
        rw!("defer-factor-left";  "(sum ?k (* ?a ?b))" => "(* ?a (sum ?k ?b))" if independent("?k", "?a") if total("?a") if finite("?a")),
        rw!("defer-factor-right"; "(sum ?k (* ?b ?a))" => "(* (sum ?k ?b) ?a)" if independent("?k", "?a") if total("?a") if finite("?a")),
        // The online (running-max) sum: one streaming pass computes sum_k exp(a - max_k a) * x.
        // (Scores that do not vary along k need no running maximum.)
        rw!("online-sum-right"; "(sum ?k (* (exp (- ?a (rmax ?k ?a))) ?x))" => "(rsum ?k ?a ?x)"
            if depends("?k", "?a") if lowerable("?k", "?a", Some("?x"))),
        rw!("online-sum-left";  "(sum ?k (* ?x (exp (- ?a (rmax ?k ?a)))))" => "(rsum ?k ?a ?x)"
            if depends("?k", "?a") if lowerable("?k", "?a", Some("?x"))),
        rw!("online-sum-one";   "(sum ?k (exp (- ?a (rmax ?k ?a))))" => "(rsum ?k ?a 1)"
            if depends("?k", "?a") if lowerable("?k", "?a", None)),
        // A shift by a maximum with extra terms (a sink, a bias: `max(max[k](a), c)`) is the
        // shift by the maximum alone, rescaled once per row by a factor of at most 1, which
        // leaves the sum; both exponents stay <= 0.
        rw!("shift-by-larger-max-left"; "(exp (- ?a (max2 (rmax ?k ?a) ?c)))"
            => "(* (exp (- ?a (rmax ?k ?a))) (exp (- (rmax ?k ?a) (max2 (rmax ?k ?a) ?c))))" if depends("?k", "?a")),
        rw!("shift-by-larger-max-right"; "(exp (- ?a (max2 ?c (rmax ?k ?a))))"
            => "(* (exp (- ?a (rmax ?k ?a))) (exp (- (rmax ?k ?a) (max2 ?c (rmax ?k ?a)))))" if depends("?k", "?a")),
        // A shift by the maximum over two indices (a hand-split rank's tiles, then the points of
        // each) is the shift by the inner maximum, rescaled by that maximum's shift by the outer
        // one: exp(a - G) = exp(a - L) * exp(L - G) with L = max[k](a), exact where L is finite;
        // both exponents stay <= 0 (L >= a, G >= L).
        rw!("shift-by-nested-max"; "(exp (- ?a (rmax ?j (rmax ?k ?a))))"
            => "(* (exp (- ?a (rmax ?k ?a))) (exp (- (rmax ?k ?a) (rmax ?j (rmax ?k ?a)))))"
            if depends("?k", "?a") if inner_max_finite("?k", "?a")),
        // A factor indexed by fewer indices than its neighbours moves outward in a product, so
        // that the factor rules above see it (`(x * e) * v` with `e` per row: `(x * v) * e`).
        // Only towards fewer indices, which bounds the orders a product takes.
        rw!("mul-assoc"; "(* ?a (* ?b ?c))" => "(* (* ?a ?b) ?c)"),
        rw!("mul-factor-outward"; "(* (* ?a ?b) ?c)" => "(* (* ?a ?c) ?b)" if fewer_indices("?b", "?a", "?c")),
        // A positive scale applied after the shift is a scale of the scores: the maximum of the
        // scaled scores is the scaled maximum (`exp((s - max s) * c) = exp(s c - max(s c))`).
        rw!("scale-after-shift-right"; "(exp (* (- ?a (rmax ?k ?a)) ?c))" => "(exp (- (* ?a ?c) (rmax ?k (* ?a ?c))))"
            if independent("?k", "?c") if positive("?c") if total("?c") if finite("?c")),
        rw!("scale-after-shift-left"; "(exp (* ?c (- ?a (rmax ?k ?a))))" => "(exp (- (* ?a ?c) (rmax ?k (* ?a ?c))))"
            if independent("?k", "?c") if positive("?c") if total("?c") if finite("?c")),
        // A shift by a log-sum-exp is a division by the sum: exp(a - (b + log c)) = exp(a - b) / c.
        // The exponent keeps the shift by b (a maximum, where the source wrote one).
        rw!("exp-minus-log-right"; "(exp (- ?a (+ ?b (log ?c))))" => "(/ (exp (- ?a ?b)) ?c)" if positive_divisor("?c")),
        rw!("exp-minus-log-left";  "(exp (- ?a (+ (log ?c) ?b)))" => "(/ (exp (- ?a ?b)) ?c)" if positive_divisor("?c")),
        rw!("exp-minus-log-after"; "(exp (- (- ?a ?b) (log ?c)))" => "(/ (exp (- ?a ?b)) ?c)" if positive_divisor("?c")),
        // A product by a reciprocal is a division.
        rw!("reciprocal-right"; "(* ?a (/ 1 ?b))" => "(/ ?a ?b)"),
        rw!("reciprocal-left";  "(* (/ 1 ?b) ?a)" => "(/ ?a ?b)"),
        // Filters move inward through element-wise operations, so that a masked score and a
        // mask applied after the exponential meet in one form.
        rw!("filter-into-exp"; "(filt ?c (exp ?x))" => "(exp (filt ?c ?x))"),
        rw!("filter-into-sub"; "(filt ?c (- ?a ?b))" => "(- (filt ?c ?a) ?b)"),
        rw!("filter-into-mul"; "(filt ?c (* ?a ?b))" => "(* (filt ?c ?a) ?b)"),
        // And out of products, so that the filters of both factors meet: a product is undefined
        // wherever either factor is, so filtering a factor or the product is the same.
        rw!("filter-out-of-mul-left";  "(* (filt ?c ?a) ?b)" => "(filt ?c (* ?a ?b))"),
        rw!("filter-out-of-mul-right"; "(* ?a (filt ?c ?b))" => "(filt ?c (* ?a ?b))"),
        // A quotient is undefined wherever its numerator is: the filter may move into it.
        rw!("filter-into-div"; "(filt ?c (/ ?a ?b))" => "(/ (filt ?c ?a) ?b)"),
        // A filter applied twice is applied once (every read through a hand-split pair carries
        // the pair's validity, so an Einsum that reads another meets it twice).
        rw!("filter-twice"; "(filt ?c (filt ?c ?x))" => "(filt ?c ?x)"),
        // The larger of a value and a bound, bounded again by the same, is bounded once (a
        // division deferred past two sums in turn bounds its divisor twice).
        rw!("max-twice"; "(max2 (max2 ?a ?b) ?b)" => "(max2 ?a ?b)"),
        // A positive invariant factor or an invariant bias leaves a maximum.
        rw!("max-positive-factor"; "(rmax ?k (* ?a ?c))" => "(* (rmax ?k ?a) ?c)"
            if independent("?k", "?c") if positive("?c") if total("?c") if finite("?c")),
        rw!("max-bias"; "(rmax ?k (+ ?a ?b))" => "(+ (rmax ?k ?a) ?b)" if independent("?k", "?b") if total("?b") if finite("?b")),
    ]
}

/// Rules that are exact in real arithmetic but must never decide the result, for tests.
#[rustfmt::skip]
pub fn unsafe_rules() -> Vec<Rule> {
    vec![
        rw!("exp-split"; "(exp (- ?a ?b))" => "(/ (exp ?a) (exp ?b))"),
        rw!("div-of-div"; "(/ (/ ?a ?c) (/ ?b ?c))" => "(/ ?a ?b)"),
    ]
}

/// What a rule does, in words, for `einfuse explain`.
pub fn describe(rule: &str) -> &'static str {
    match rule {
        "div-out-of-mul-left" => "(a / b) * c  =>  (a * c) / b",
        "div-out-of-mul-right" => "c * (a / b)  =>  (c * a) / b",
        "defer-division" => "sum[k](a / b)  =>  sum[k](a) / max(b, tiny)   (b independent of k, > 0 unless empty)",
        "defer-factor-left" => "sum[k](a * b)  =>  a * sum[k](b)   (a independent of k)",
        "defer-factor-right" => "sum[k](b * a)  =>  sum[k](b) * a   (a independent of k)",
        "online-sum-right" | "online-sum-left" => {
            "sum[k](exp(a - max[k](a)) * x)  =>  online sum: running max, rescaled running sum (1 pass)"
        }
        "online-sum-one" => "sum[k](exp(a - max[k](a)))  =>  online sum of 1 (running max and denominator, 1 pass)",
        "shift-by-larger-max-left" | "shift-by-larger-max-right" => {
            "exp(a - max(max[k](a), c))  =>  exp(a - max[k](a)) * exp(max[k](a) - max(max[k](a), c))"
        }
        "exp-minus-log-right" | "exp-minus-log-left" | "exp-minus-log-after" => {
            "exp(a - (b + log c))  =>  exp(a - b) / c   (c > 0 unless empty)"
        }
        "reciprocal-right" | "reciprocal-left" => "a * (1 / b)  =>  a / b",
        "mul-assoc" => "a * (b * c)  =>  (a * b) * c",
        "shift-by-nested-max" => {
            "exp(a - max[j](max[k](a)))  =>  exp(a - max[k](a)) * exp(max[k](a) - max[j](max[k](a)))   (max[k](a) finite)"
        }
        "scale-after-shift-right" | "scale-after-shift-left" => {
            "exp((a - max[k](a)) * c)  =>  exp(a c - max[k](a c))   (c > 0, independent of k)"
        }
        "mul-factor-outward" => "(a * b) * c  =>  (a * c) * b   (b has fewer indices)",
        "filter-into-exp" => "exp(x) where c  =>  exp(x where c)",
        "filter-into-sub" => "(a - b) where c  =>  (a where c) - b",
        "filter-into-mul" => "(a * b) where c  =>  (a where c) * b",
        "filter-out-of-mul-left" => "(a where c) * b  =>  (a * b) where c",
        "filter-out-of-mul-right" => "a * (b where c)  =>  (a * b) where c",
        "filter-into-div" => "(a / b) where c  =>  (a where c) / b",
        "filter-twice" => "(x where c) where c  =>  x where c",
        "max-twice" => "max(max(a, b), b)  =>  max(a, b)",
        "max-positive-factor" => "max[k](a * c)  =>  max[k](a) * c   (c > 0, independent of k)",
        "max-bias" => "max[k](a + b)  =>  max[k](a) + b   (b independent of k)",
        "exp-split" => "exp(a - b)  =>  exp(a) / exp(b)   (unsafe: exp(a) can overflow)",
        "div-of-div" => "(a / c) / (b / c)  =>  a / b",
        _ => "",
    }
}
