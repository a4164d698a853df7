//! The e-graph language of the optimizer, and its analysis (free indices and sign facts).
//!
//! Terms use named indices: `(in K e m)` reads input `K`, `(sum m body)` sums over index `m`,
//! `(filt cond body)` is `body` where `cond` holds and undefined elsewhere. `(rsum m a x)` is the
//! online (max-shifted) sum `sum_m exp(a - max_m a) * x`, which one streaming pass computes.
//! Subscripts use their own operators (`a+`, `a*`, ...), so value rewrites never touch them.

use std::collections::BTreeSet;
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
    /// is infinite), nor is an infinite constant.
    pub finite: bool,
}

/// The e-class analysis; it knows which params are positive (params are fixed when a kernel is
/// compiled, so `exp((s - max s) * scale)` may use the sign of `scale`).
#[derive(Default)]
pub struct EinAnalysis {
    pub positive_params: BTreeSet<Symbol>,
}

impl EinAnalysis {
    /// The analysis of a cascade's terms: its positive params.
    pub fn of(cascade: &crate::ir::Cascade) -> EinAnalysis {
        let positive_params =
            cascade.params.iter().filter(|p| p.value > 0.0).map(|p| Symbol::from(p.name.as_str())).collect();
        EinAnalysis { positive_params }
    }
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
                Ein::RMax(_) | Ein::RMin(_) => false,
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
                    out.nonnegative = f(body).nonnegative;
                    out.positive_unless_empty = f(body).positive;
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
                out.nonnegative = f(x).nonnegative;
                out.positive_unless_empty = f(x).positive;
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
            }
            Ein::Mul([a, b]) | Ein::Div([a, b]) => {
                out.free = union(&[*a, *b]);
                out.positive = f(a).positive && f(b).positive;
                out.nonnegative = f(a).nonnegative && f(b).nonnegative;
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
