//! The e-graph language of the optimizer, and its analysis (free indices and sign facts).
//!
//! Terms use named indices: `(in K e m)` reads input `K`, `(sum m body)` sums over index `m`,
//! `(filt cond body)` is `body` where `cond` holds and undefined elsewhere. `(rsum m a x)` is the
//! online (max-shifted) sum `sum_m exp(a - max_m a) * x`, which one streaming pass computes.
//! Subscripts use their own operators (`a+`, `a*`, ...), so value rewrites never touch them.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use egg::{define_language, Analysis, DidMerge, EGraph, Id, Language, Symbol};

/// A constant, stored by its bits so that it can be hashed and ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Constant(pub u64);

impl Constant {
    pub fn new(value: f64) -> Constant {
        // One NaN and one zero, so that equal values hash-cons.
        let value = if value.is_nan() {
            f64::NAN
        } else if value == 0.0 {
            0.0
        } else {
            value
        };
        Constant(value.to_bits())
    }

    pub fn value(self) -> f64 {
        f64::from_bits(self.0)
    }
}

impl FromStr for Constant {
    type Err = ();
    fn from_str(text: &str) -> Result<Self, ()> {
        match text {
            "inf" => Ok(Constant::new(f64::INFINITY)),
            "-inf" => Ok(Constant::new(f64::NEG_INFINITY)),
            _ => text.parse::<f64>().map(Constant::new).map_err(|_| ()),
        }
    }
}

impl fmt::Display for Constant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&einfuse_dsl::ast::format_number(self.value()))
    }
}

macro_rules! named_leaf {
    ($(#[$meta:meta])* $name:ident, $prefix:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Symbol);

        impl FromStr for $name {
            type Err = ();
            fn from_str(text: &str) -> Result<Self, ()> {
                text.strip_prefix($prefix).map(|rest| $name(Symbol::from(rest))).ok_or(())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, self.0)
            }
        }
    };
}

named_leaf!(
    /// An index variable (`m`, `m'`).
    IndexName,
    "%"
);
named_leaf!(
    /// A tensor's name, first child of `in`.
    TensorName,
    "@"
);
named_leaf!(
    /// A param's name.
    ParamName,
    "$"
);
named_leaf!(
    /// A rank's extent, as a number or in a subscript.
    ExtentName,
    "#"
);

define_language! {
    /// Terms of the optimizer's e-graph.
    pub enum Ein {
        "in" = In(Box<[Id]>),
        "ival" = IndexValue(Id),
        "+" = Add([Id; 2]),
        "-" = Sub([Id; 2]),
        "*" = Mul([Id; 2]),
        "/" = Div([Id; 2]),
        "neg" = Neg(Id),
        "exp" = Exp(Id),
        "log" = Log(Id),
        "sqrt" = Sqrt(Id),
        "tanh" = Tanh(Id),
        "sigmoid" = Sigmoid(Id),
        "softplus" = Softplus(Id),
        "relu" = Relu(Id),
        "abs" = Abs(Id),
        "max2" = Max2([Id; 2]),
        "min2" = Min2([Id; 2]),
        "sum" = Sum([Id; 2]),
        "rmax" = RMax([Id; 2]),
        "rmin" = RMin([Id; 2]),
        "rsum" = RSum([Id; 3]),
        "filt" = Filter([Id; 2]),
        "lt" = Lt([Id; 2]),
        "le" = Le([Id; 2]),
        "gt" = Gt([Id; 2]),
        "ge" = Ge([Id; 2]),
        "eq" = Eq([Id; 2]),
        "ne" = Ne([Id; 2]),
        "and" = And([Id; 2]),
        "a+" = AffAdd([Id; 2]),
        "a-" = AffSub([Id; 2]),
        "a*" = AffMul([Id; 2]),
        "aneg" = AffNeg(Id),
        Num(Constant),
        Index(IndexName),
        Tensor(TensorName),
        Param(ParamName),
        Extent(ExtentName),
    }
}

/// What the analysis knows of an e-class.
#[derive(Clone, Debug, PartialEq)]
pub struct Facts {
    /// The indices the value depends on (free). All nodes of a class have the same.
    pub free: BTreeSet<Symbol>,
    /// The value is > 0 wherever it is defined.
    pub positive: bool,
    /// The value is >= 0 wherever it is defined.
    pub nonnegative: bool,
    /// The value is <= 0 wherever it is defined.
    pub nonpositive: bool,
    /// The value is a constant, when known.
    pub constant: Option<Constant>,
    /// A sum or online sum of positive terms: > 0 exactly when its set is not empty.
    pub positive_unless_empty: bool,
    /// Defined at every point of its indices (no filter, no read that can fall outside).
    pub total: bool,
    /// Never infinite or NaN for finite inputs: a maximum or minimum is not (over an empty set it
    /// is infinite) unless its set is provably not empty, nor is an infinite constant.
    pub finite: bool,
    /// Defined wherever the validity of every split pair whose both indices are free in it holds
    /// (`m1 * M0 + m0 < M`): its only filters are such validities and its reads fall inside their
    /// tensors at those points. Implied by `total`.
    pub valid_total: bool,
    /// A condition that is a conjunction of split pairs' validities (`m1 * M0 + m0 < M`).
    pub pair_validity: bool,
}

/// The e-class analysis; it knows which params are positive (params are fixed when a kernel is
/// compiled, so `exp((s - max s) * scale)` may use the sign of `scale`), the cascade's split
/// pairs and the ranks of its inputs.
#[derive(Default)]
pub struct EinAnalysis {
    pub positive_params: BTreeSet<Symbol>,
    /// The split pairs, by rank name: (tile rank `M1`, within-tile rank `M0`, whole rank `M`).
    pub splits: Vec<(Symbol, Symbol, Symbol)>,
    /// The rank names of each input, by the input's name.
    pub input_ranks: HashMap<Symbol, Vec<Symbol>>,
}

impl EinAnalysis {
    /// The analysis of a cascade's terms: its positive params, split pairs and input ranks.
    pub fn of(cascade: &crate::ir::Cascade) -> EinAnalysis {
        let positive_params =
            cascade.params.iter().filter(|p| p.value > 0.0).map(|p| Symbol::from(p.name.as_str())).collect();
        let name = |r: crate::ir::RankId| Symbol::from(cascade.rank(r).name.as_str());
        let splits = cascade
            .split_pairs()
            .into_iter()
            .map(|(tile, inner, whole)| (name(tile), name(inner), name(whole)))
            .collect();
        let input_ranks = cascade
            .tensors
            .iter()
            .filter(|t| matches!(t.kind, crate::ir::TensorKind::Input { .. }))
            .map(|t| (Symbol::from(t.name.as_str()), t.ranks.iter().map(|r| name(*r)).collect()))
            .collect();
        EinAnalysis { positive_params, splits, input_ranks }
    }

    /// The split pair an index belongs to, with its primes: (tile index, within-tile index, whole
    /// rank's name). Index names are their rank's name in lower case, then primes.
    pub fn pair_of_index(&self, index: Symbol) -> Option<(Symbol, Symbol, Symbol)> {
        let text = index.as_str();
        let base = text.trim_end_matches('\'');
        let primes = &text[base.len()..];
        self.splits.iter().find_map(|(tile, inner, whole)| {
            let (t, i) = (tile.as_str().to_lowercase(), inner.as_str().to_lowercase());
            (base == t || base == i)
                .then(|| (Symbol::from(format!("{t}{primes}")), Symbol::from(format!("{i}{primes}")), *whole))
        })
    }

    /// Whether `index` is the within-tile index of a split pair (`m0`), and its tile index.
    pub fn tile_of_inner(&self, index: Symbol) -> Option<Symbol> {
        self.pair_of_index(index).and_then(|(tile, inner, _)| (inner == index).then_some(tile))
    }

    /// Whether `index` is the tile index of a split pair (`m1`).
    pub fn is_tile_index(&self, index: Symbol) -> bool {
        self.pair_of_index(index).is_some_and(|(tile, _, _)| tile == index)
    }

    /// The pairs whose both indices are in `free`: (tile index, within-tile index).
    fn pairs_in(&self, free: &BTreeSet<Symbol>) -> Vec<(Symbol, Symbol)> {
        free.iter()
            .filter_map(|i| self.pair_of_index(*i))
            .filter(|(tile, inner, _)| free.contains(tile) && free.contains(inner))
            .map(|(tile, inner, _)| (tile, inner))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }
}

/// The pair a subscript class addresses as `t * Inner + i` (a node `(a+ (a* t #Inner) i)`):
/// (tile index, within-tile index, whole rank), when `t` and `i` form a split pair.
fn pair_position(egraph: &EGraph<Ein, EinAnalysis>, id: Id) -> Option<(Symbol, Symbol, Symbol)> {
    let index_of = |id: Id| {
        egraph[id].nodes.iter().find_map(|n| match n {
            Ein::Index(name) => Some(name.0),
            _ => None,
        })
    };
    egraph[id].nodes.iter().find_map(|node| {
        let Ein::AffAdd([scaled, inner]) = node else { return None };
        let inner = index_of(*inner)?;
        egraph[*scaled].nodes.iter().find_map(|n| {
            let Ein::AffMul([tile, extent]) = n else { return None };
            let tile = index_of(*tile)?;
            let pair = egraph.analysis.pair_of_index(tile)?;
            let extent_is_inner = egraph[*extent].nodes.iter().any(|e| match e {
                Ein::Extent(name) => name.0.as_str().to_lowercase() == pair.1.as_str().trim_end_matches('\''),
                _ => false,
            });
            (pair.0 == tile && pair.1 == inner && extent_is_inner).then_some(pair)
        })
    })
}

/// Whether the reduction `(rmax k body)` (or any reduction over `k` of `body`) is over a set
/// that is never empty: `k` is the within-tile index of a split pair whose tile index is free in
/// `body`, the body is defined wherever that pair is valid, and no other pair constrains it. Every
/// tile `m1 < M1` keeps its first point, `m1 * M0 + 0 < M`.
pub fn never_empty(egraph: &EGraph<Ein, EinAnalysis>, k: Id, body: Id) -> bool {
    let indices = &egraph[k].data.free;
    let facts = &egraph[body].data;
    let Some(index) = indices.iter().next() else { return false };
    let Some(tile) = egraph.analysis.tile_of_inner(*index) else { return false };
    indices.len() == 1
        && facts.free.contains(&tile)
        && facts.valid_total
        && egraph.analysis.pairs_in(&facts.free) == vec![(tile, *index)]
}

/// Whether class `id` holds `a - max[k](a)` for a finite `a` that depends on `k`: where it is
/// defined, `a` is one of the values the maximum is over, so the difference is finite and <= 0.
fn shift_by_own_max(egraph: &EGraph<Ein, EinAnalysis>, id: Id) -> bool {
    egraph[id].nodes.iter().any(|node| {
        let Ein::Sub([a, max]) = node else { return false };
        egraph[*a].data.finite
            && egraph[*max].nodes.iter().any(|m| match m {
                Ein::RMax([k, b]) => {
                    egraph.find(*b) == egraph.find(*a)
                        && egraph[*k].data.free.iter().all(|i| egraph[*a].data.free.contains(i))
                        && !egraph[*k].data.free.is_empty()
                }
                _ => false,
            })
    })
}

/// Whether class `id` holds `m - max(m, c)` (or `m - max(c, m)`) for a finite `c`.
fn shift_by_larger(egraph: &EGraph<Ein, EinAnalysis>, id: Id) -> bool {
    egraph[id].nodes.iter().any(|node| {
        let Ein::Sub([m, bound]) = node else { return false };
        egraph[*bound].nodes.iter().any(|b| match b {
            Ein::Max2([x, y]) => {
                (egraph.find(*x) == egraph.find(*m) && egraph[*y].data.finite)
                    || (egraph.find(*y) == egraph.find(*m) && egraph[*x].data.finite)
            }
            _ => false,
        })
    })
}

fn facts(egraph: &EGraph<Ein, EinAnalysis>, id: Id) -> &Facts {
    &egraph[id].data
}

impl Analysis<Ein> for EinAnalysis {
    type Data = Facts;

    fn make(egraph: &mut EGraph<Ein, Self>, enode: &Ein, _id: Id) -> Facts {
        let f = |id: &Id| facts(egraph, *id);
        let union = |ids: &[Id]| -> BTreeSet<Symbol> { ids.iter().flat_map(|id| f(id).free.iter().copied()).collect() };
        let mut out = Facts {
            free: BTreeSet::new(),
            positive: false,
            nonnegative: false,
            nonpositive: false,
            constant: None,
            positive_unless_empty: false,
            finite: match enode {
                // A maximum over a set that is never empty is one of its finite values.
                Ein::RMax([k, body]) | Ein::RMin([k, body]) => {
                    egraph[*body].data.finite && never_empty(egraph, *k, *body)
                }
                // `exp(a - max[k](a))` is in (0, 1].
                Ein::Exp(a) if shift_by_own_max(egraph, *a) => true,
                // `exp(m - max(m, c))` with `c` finite is in [0, 1], also where `m` is the maximum
                // of an empty set (-inf).
                Ein::Exp(a) if shift_by_larger(egraph, *a) => true,
                Ein::Num(c) => c.value().is_finite(),
                Ein::Div(_) => false,
                other => other.children().iter().all(|c| egraph[*c].data.finite),
            },
            total: match enode {
                // A reduction is defined even over an empty set.
                Ein::Sum(_) | Ein::RMax(_) | Ein::RMin(_) | Ein::RSum(_) => true,
                Ein::Filter(_) => false,
                // Reads through a bare index never fall outside their tensor.
                Ein::In(children) => {
                    children[1..].iter().all(|c| egraph[*c].nodes.iter().any(|n| matches!(n, Ein::Index(_))))
                }
                other => other.children().iter().all(|c| egraph[*c].data.total),
            },
            valid_total: false,
            pair_validity: false,
        };
        out.valid_total = out.total
            || match enode {
                Ein::Filter([cond, body]) => egraph[*cond].data.pair_validity && egraph[*body].data.valid_total,
                // A read at bare indices or at a valid pair's position of the whole rank.
                Ein::In(children) => {
                    let ranks = egraph[children[0]].nodes.iter().find_map(|n| match n {
                        Ein::Tensor(t) => egraph.analysis.input_ranks.get(&t.0),
                        _ => None,
                    });
                    ranks.is_some_and(|ranks| {
                        ranks.len() + 1 == children.len()
                            && children[1..].iter().zip(ranks).all(|(c, rank)| {
                                egraph[*c].nodes.iter().any(|n| matches!(n, Ein::Index(_)))
                                    || pair_position(egraph, *c).is_some_and(|(_, _, whole)| whole == *rank)
                            })
                    })
                }
                Ein::Sum(_) | Ein::RMax(_) | Ein::RMin(_) | Ein::RSum(_) => true,
                other => other.children().iter().all(|c| egraph[*c].data.valid_total),
            };
        out.pair_validity = match enode {
            Ein::And([a, b]) => egraph[*a].data.pair_validity && egraph[*b].data.pair_validity,
            Ein::Lt([at, extent]) => egraph[*at].nodes.iter().any(|n| match n {
                Ein::IndexValue(position) => pair_position(egraph, *position).is_some_and(|(_, _, whole)| {
                    egraph[*extent].nodes.iter().any(|e| matches!(e, Ein::Extent(name) if name.0 == whole))
                }),
                _ => false,
            }),
            _ => false,
        };
        match enode {
            Ein::Num(c) => {
                out.constant = Some(*c);
                out.positive = c.value() > 0.0;
                out.nonnegative = c.value() >= 0.0;
                out.nonpositive = c.value() <= 0.0;
            }
            Ein::Index(name) => {
                out.free.insert(name.0);
            }
            Ein::Tensor(_) => {}
            Ein::Param(name) => {
                let positive = egraph.analysis.positive_params.contains(&name.0);
                out.positive = positive;
                out.nonnegative = positive;
            }
            Ein::Extent(_) => {
                // A zero extent empties every reduction over it, so as a divisor it is positive
                // wherever it matters.
                out.positive = true;
                out.nonnegative = true;
            }
            Ein::In(children) => out.free = union(&children[1..]),
            Ein::Sum([k, body]) | Ein::RMax([k, body]) | Ein::RMin([k, body]) => {
                out.free = f(body).free.clone();
                for index in &f(k).free {
                    out.free.remove(index);
                }
                if let Ein::Sum(_) = enode {
                    out.nonnegative = f(body).nonnegative || f(body).positive_unless_empty;
                    // A sum of terms that are each > 0 unless their own set is empty is > 0 unless
                    // the union of those sets (its own set) is empty.
                    out.positive_unless_empty = f(body).positive || f(body).positive_unless_empty;
                } else {
                    out.positive = f(body).positive;
                    out.nonnegative = f(body).nonnegative;
                }
            }
            Ein::RSum([k, a, x]) => {
                out.free = union(&[*a, *x]);
                for index in &f(k).free {
                    out.free.remove(index);
                }
                out.nonnegative = f(x).nonnegative || f(x).positive_unless_empty;
                out.positive_unless_empty = f(x).positive || f(x).positive_unless_empty;
            }
            Ein::Exp(a) => {
                out.free = f(a).free.clone();
                out.positive = true;
                out.nonnegative = true;
            }
            Ein::Sigmoid(a) | Ein::Softplus(a) => {
                out.free = f(a).free.clone();
                out.positive = true;
                out.nonnegative = true;
            }
            Ein::Relu(a) | Ein::Abs(a) | Ein::Sqrt(a) => {
                out.free = f(a).free.clone();
                out.nonnegative = true;
            }
            Ein::Filter([cond, body]) => {
                out.free = union(&[*cond, *body]);
                out.positive = f(body).positive;
                out.nonnegative = f(body).nonnegative;
                out.positive_unless_empty = f(body).positive_unless_empty;
            }
            Ein::Mul([a, b]) | Ein::Div([a, b]) => {
                out.free = union(&[*a, *b]);
                out.positive = f(a).positive && f(b).positive;
                out.nonnegative = f(a).nonnegative && f(b).nonnegative;
                // A per-tile sum scaled by a positive factor (`SLD[m1, p] * PRM[m1, p]`) is > 0
                // unless the tile is empty, and >= 0.
                let pue_or_positive = |x: &Facts| x.positive || x.positive_unless_empty;
                if let Ein::Mul(_) = enode {
                    out.positive_unless_empty = !out.positive
                        && ((f(a).positive_unless_empty && f(b).positive)
                            || (f(a).positive && f(b).positive_unless_empty));
                    out.nonnegative |= pue_or_positive(f(a)) && pue_or_positive(f(b));
                }
            }
            Ein::Add([a, b]) => {
                out.free = union(&[*a, *b]);
                out.positive = (f(a).positive && f(b).nonnegative) || (f(a).nonnegative && f(b).positive);
                out.nonnegative = f(a).nonnegative && f(b).nonnegative;
            }
            Ein::Max2([a, b]) => {
                out.free = union(&[*a, *b]);
                out.positive = f(a).positive || f(b).positive;
                out.nonnegative = f(a).nonnegative || f(b).nonnegative;
                out.nonpositive = f(a).nonpositive && f(b).nonpositive;
            }
            Ein::Min2([a, b]) => {
                out.free = union(&[*a, *b]);
                out.positive = f(a).positive && f(b).positive;
                out.nonnegative = f(a).nonnegative && f(b).nonnegative;
                out.nonpositive = f(a).nonpositive || f(b).nonpositive;
            }
            Ein::Sub([a, b]) => {
                out.free = union(&[*a, *b]);
                out.positive = f(a).positive && f(b).nonpositive;
                out.nonnegative = f(a).nonnegative && f(b).nonpositive;
                out.nonpositive = f(a).nonpositive && f(b).nonnegative;
            }
            Ein::Neg(a) => {
                out.free = f(a).free.clone();
                out.nonnegative = f(a).nonpositive;
                out.nonpositive = f(a).nonnegative;
            }
            other => {
                out.free = union(other.children());
            }
        }
        out
    }

    fn merge(&mut self, to: &mut Facts, from: Facts) -> DidMerge {
        let before = to.clone();
        // Equal values have equal free sets in principle; intersect to stay safe.
        to.free = to.free.intersection(&from.free).copied().collect();
        to.positive |= from.positive;
        to.nonnegative |= from.nonnegative;
        to.nonpositive |= from.nonpositive;
        to.positive_unless_empty |= from.positive_unless_empty;
        to.total |= from.total;
        to.finite |= from.finite;
        to.valid_total |= from.valid_total;
        to.pair_validity |= from.pair_validity;
        if to.constant.is_none() {
            to.constant = from.constant;
        }
        let changed_to = *to != before;
        let mut merged_from = from;
        merged_from.free = to.free.clone();
        let changed_from = merged_from != *to;
        DidMerge(changed_to, changed_from)
    }
}
