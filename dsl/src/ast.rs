//! The abstract syntax tree of `.ein` source: plain data with byte spans, no name resolution.

use std::fmt;

/// A half-open byte range `start..end` in the source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

/// An identifier as written, with its span.
#[derive(Clone, Debug, PartialEq)]
pub struct Name {
    pub text: String,
    pub span: Span,
}

/// A whole source file: one or more kernels.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct File {
    pub kernels: Vec<Kernel>,
}

/// `kernel NAME { ... }`.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: Name,
    pub items: Vec<Item>,
    pub span: Span,
}

/// One statement of a kernel body.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Ranks(Vec<RankDecl>),
    Inputs(Vec<TensorDecl>),
    Params(Vec<ParamDecl>),
    Outputs(Vec<OutputDecl>),
    Einsum(Einsum),
}

/// One rank of a `rank` statement.
#[derive(Clone, Debug, PartialEq)]
pub struct RankDecl {
    pub name: Name,
    pub def: RankDef,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RankDef {
    /// `M`: bound when the kernel is called.
    Symbolic,
    /// `E = 64`.
    Fixed { extent: u64, span: Span },
    /// `M1 = M / M0`: the tile rank of `whole`, in tiles of the fixed rank `tile`.
    Split { whole: Name, tile: Name },
}

/// The storage type of an input or output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    F16,
    Bf16,
}

impl ElemType {
    pub fn parse(text: &str) -> Option<ElemType> {
        match text {
            "f32" => Some(ElemType::F32),
            "f16" => Some(ElemType::F16),
            "bf16" => Some(ElemType::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "f32",
            ElemType::F16 => "f16",
            ElemType::Bf16 => "bf16",
        }
    }

    /// Bytes per element in storage.
    pub fn size(self) -> usize {
        match self {
            ElemType::F32 => 4,
            ElemType::F16 | ElemType::Bf16 => 2,
        }
    }
}

impl fmt::Display for ElemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `input T[R1, R2]: bf16`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDecl {
    pub name: Name,
    pub ranks: Vec<Name>,
    pub elem: Option<ElemType>,
    pub span: Span,
}

/// `param NAME = NUMBER`.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamDecl {
    pub name: Name,
    pub value: f64,
    pub span: Span,
}

/// One name of an `output` statement.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputDecl {
    pub name: Name,
    pub elem: Option<ElemType>,
    pub span: Span,
}

/// `T[subscripts] = value where filter`.
#[derive(Clone, Debug, PartialEq)]
pub struct Einsum {
    pub target: Name,
    pub subscripts: Vec<Expr>,
    pub value: Expr,
    pub filter: Vec<Comparison>,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CmpOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
        }
    }

    pub fn holds(self, a: f64, b: f64) -> bool {
        match self {
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
        }
    }
}

/// One comparison of a `where` filter.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub lhs: Expr,
    pub op: CmpOp,
    pub rhs: Expr,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    /// A numeric literal (`inf` included).
    Number(f64),
    /// A bare name: an index variable, a rank extent, a param or a rank-0 tensor.
    Name(String),
    /// `T[s1, s2]`.
    Access {
        tensor: Name,
        subscripts: Vec<Expr>,
    },
    Neg(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `exp(x)`, `max(a, b)`, ...
    Call {
        func: Name,
        args: Vec<Expr>,
    },
    /// `sum[i, j](x)`.
    Reduce {
        op: ReduceOp,
        indices: Vec<Name>,
        arg: Box<Expr>,
    },
}

/// Formats a number so that it lexes back to the same value (`inf`, `-inf`, shortest round-trip
/// decimal).
pub fn format_number(value: f64) -> String {
    if value == f64::INFINITY {
        "inf".to_string()
    } else if value == f64::NEG_INFINITY {
        "-inf".to_string()
    } else if value.is_nan() {
        "nan".to_string()
    } else {
        let text = format!("{value:?}");
        text.strip_suffix(".0").map(str::to_string).unwrap_or(text)
    }
}

/// The AST's text form (`einfuse emit --stage ast`): one line per item, expressions as
/// s-expressions, spans as byte ranges.
impl fmt::Display for File {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for kernel in &self.kernels {
            writeln!(f, "(kernel {} @{}..{}", kernel.name.text, kernel.span.start, kernel.span.end)?;
            for item in &kernel.items {
                write!(f, "  ")?;
                write_item(f, item)?;
                writeln!(f)?;
            }
            writeln!(f, ")")?;
        }
        Ok(())
    }
}

fn write_item(f: &mut fmt::Formatter<'_>, item: &Item) -> fmt::Result {
    match item {
        Item::Ranks(ranks) => {
            write!(f, "(rank")?;
            for rank in ranks {
                match &rank.def {
                    RankDef::Symbolic => write!(f, " {}", rank.name.text)?,
                    RankDef::Fixed { extent, .. } => write!(f, " (= {} {extent})", rank.name.text)?,
                    RankDef::Split { whole, tile } => {
                        write!(f, " (= {} (/ {} {}))", rank.name.text, whole.text, tile.text)?
                    }
                }
            }
            write!(f, ")")
        }
        Item::Inputs(inputs) => {
            write!(f, "(input")?;
            for input in inputs {
                write!(f, " ({}", input.name.text)?;
                for rank in &input.ranks {
                    write!(f, " {}", rank.text)?;
                }
                if let Some(elem) = input.elem {
                    write!(f, " : {elem}")?;
                }
                write!(f, ")")?;
            }
            write!(f, ")")
        }
        Item::Params(params) => {
            write!(f, "(param")?;
            for param in params {
                write!(f, " (= {} {})", param.name.text, format_number(param.value))?;
            }
            write!(f, ")")
        }
        Item::Outputs(outputs) => {
            write!(f, "(output")?;
            for output in outputs {
                match output.elem {
                    Some(elem) => write!(f, " ({} : {elem})", output.name.text)?,
                    None => write!(f, " {}", output.name.text)?,
                }
            }
            write!(f, ")")
        }
        Item::Einsum(einsum) => {
            write!(f, "(einsum @{}..{} ({}", einsum.span.start, einsum.span.end, einsum.target.text)?;
            for sub in &einsum.subscripts {
                write!(f, " ")?;
                write_expr(f, sub)?;
            }
            write!(f, ") ")?;
            write_expr(f, &einsum.value)?;
            if !einsum.filter.is_empty() {
                write!(f, " (where")?;
                for cmp in &einsum.filter {
                    write!(f, " ({} ", cmp.op.symbol())?;
                    write_expr(f, &cmp.lhs)?;
                    write!(f, " ")?;
                    write_expr(f, &cmp.rhs)?;
                    write!(f, ")")?;
                }
                write!(f, ")")?;
            }
            write!(f, ")")
        }
    }
}

fn write_expr(f: &mut fmt::Formatter<'_>, expr: &Expr) -> fmt::Result {
    match &expr.kind {
        ExprKind::Number(value) => write!(f, "{}", format_number(*value)),
        ExprKind::Name(name) => write!(f, "{name}"),
        ExprKind::Access { tensor, subscripts } => {
            write!(f, "({}[]", tensor.text)?;
            for sub in subscripts {
                write!(f, " ")?;
                write_expr(f, sub)?;
            }
            write!(f, ")")
        }
        ExprKind::Neg(arg) => {
            write!(f, "(neg ")?;
            write_expr(f, arg)?;
            write!(f, ")")
        }
        ExprKind::Binary(op, a, b) => {
            write!(f, "({} ", op.symbol())?;
            write_expr(f, a)?;
            write!(f, " ")?;
            write_expr(f, b)?;
            write!(f, ")")
        }
        ExprKind::Call { func, args } => {
            write!(f, "({}", func.text)?;
            for arg in args {
                write!(f, " ")?;
                write_expr(f, arg)?;
            }
            write!(f, ")")
        }
        ExprKind::Reduce { op, indices, arg } => {
            let names: Vec<&str> = indices.iter().map(|n| n.text.as_str()).collect();
            write!(f, "({}[{}] ", op.name(), names.join(" "))?;
            write_expr(f, arg)?;
            write!(f, ")")
        }
    }
}
