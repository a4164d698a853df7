//! Checking: the AST of a kernel to a verified Cascade IR, or diagnostics for every error found.
//!
//! Needs: a parsed kernel. Guarantees: names resolved; every index tied to its rank and used at
//! positions of that rank; implicit sums made explicit as the outermost `Reduce`; every `where`
//! comparison attached to the innermost reduction whose index it mentions, or to the output
//! points; iterative tensors recognised (an initial value at `0`, a recurrence at `r + 1`); every
//! read of a tensor after one of its definitions; no dependency cycle that is not carried by a
//! recurrence to an earlier iterate. The result passes `verify::verify`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use einfuse_dsl::ast::{self, ExprKind, Name, RankDef, Span};
use einfuse_dsl::Diagnostic;
use petgraph::graph::DiGraph;

use crate::ir::*;

/// Names that a tensor or param may not take.
const RESERVED: [&str; 9] = ["sum", "max", "min", "where", "kernel", "rank", "input", "param", "output"];

/// Checks every kernel of a file. Kernels with errors are left out of the result.
pub fn check_file(file: &ast::File) -> (Vec<Cascade>, Vec<Diagnostic>) {
    let mut cascades = Vec::new();
    let mut diagnostics = Vec::new();
    let mut seen: HashMap<&str, Span> = HashMap::new();
    for kernel in &file.kernels {
        if let Some(previous) = seen.insert(&kernel.name.text, kernel.name.span) {
            diagnostics.push(
                Diagnostic::error(format!("kernel `{}` is defined twice", kernel.name.text), kernel.name.span)
                    .with_label("second definition")
                    .with_related(previous, "first defined here"),
            );
        }
        match check_kernel(kernel) {
            Ok(cascade) => cascades.push(cascade),
            Err(errors) => diagnostics.extend(errors),
        }
    }
    (cascades, diagnostics)
}

/// The most ranks, tensors and params, and the most Einsums, a kernel may declare.
pub const MAX_DECLARATIONS: usize = 1024;
pub const MAX_EINSUMS: usize = 4096;

/// Checks one kernel.
pub fn check_kernel(kernel: &ast::Kernel) -> Result<Cascade, Vec<Diagnostic>> {
    let declarations: usize = kernel
        .items
        .iter()
        .map(|item| match item {
            ast::Item::Ranks(r) => r.len(),
            ast::Item::Inputs(i) => i.len(),
            ast::Item::Params(p) => p.len(),
            _ => 0,
        })
        .sum();
    let einsums = kernel.items.iter().filter(|i| matches!(i, ast::Item::Einsum(_))).count();
    if declarations > MAX_DECLARATIONS || einsums > MAX_EINSUMS {
        return Err(vec![err(
            format!(
                "kernel `{}` is too large: {declarations} declarations and {einsums} Einsums (the limits are \
                 {MAX_DECLARATIONS} and {MAX_EINSUMS})",
                kernel.name.text
            ),
            kernel.name.span,
            "split it into several kernels",
        )]);
    }
    let mut checker = Checker::new(kernel);
    checker.declarations();
    checker.definitions();
    if checker.diagnostics.is_empty() {
        checker.einsums();
    }
    if checker.diagnostics.is_empty() {
        checker.outputs();
    }
    if checker.diagnostics.is_empty() {
        checker.cycles();
    }
    if !checker.diagnostics.is_empty() {
        let mut diagnostics = checker.diagnostics;
        diagnostics.sort_by_key(|d| d.span.start);
        return Err(diagnostics);
    }
    let cascade = checker.cascade;
    if let Err(errors) = crate::verify::verify(&cascade) {
        // The checker promises verified IR; a failure here is a bug in einfuse, reported at the
        // kernel rather than as a crash.
        return Err(vec![Diagnostic::error(
            format!("internal error: the checked IR does not verify: {errors}"),
            kernel.name.span,
        )]);
    }
    Ok(cascade)
}

#[derive(Clone, Copy, Debug)]
enum Symbol {
    Rank(RankId),
    Tensor(TensorId),
    Param(ParamId),
}

/// How an Einsum statement defines its target.
#[derive(Clone, Copy, Debug, PartialEq)]
enum LineKind {
    Plain,
    Initial { position: usize },
    Recurrence { position: usize },
}

struct Checker<'a> {
    kernel: &'a ast::Kernel,
    cascade: Cascade,
    symbols: HashMap<String, (Symbol, Span)>,
    /// Lower-case rank names, the base names of index variables.
    index_bases: HashMap<String, RankId>,
    /// For each Einsum statement, in order: its target and kind.
    lines: Vec<(&'a ast::Einsum, TensorId, LineKind)>,
    /// The statement index of each defined tensor's first definition.
    first_definition: HashMap<TensorId, usize>,
    diagnostics: Vec<Diagnostic>,
}

/// The indices in scope while resolving an expression.
#[derive(Clone, Default)]
struct Scope {
    /// Bound on the left-hand side.
    lhs: Vec<Index>,
    /// Bound by enclosing explicit reducers, innermost last.
    reduced: Vec<Index>,
}

/// State while resolving one Einsum statement.
struct Statement {
    position: usize,
    target: TensorId,
    kind: LineKind,
    /// Indices used free on the right (neither on the left nor bound by a reducer), to be summed.
    free: Vec<Index>,
    /// Explicit reducers in pre-order: their indices and the pre-order number of their parent.
    reducers: Vec<(Vec<Index>, Option<usize>)>,
    /// The pre-order number of the reducer being resolved.
    current_reducer: Option<usize>,
    failed: bool,
}

fn err(message: impl Into<String>, span: Span, label: impl Into<String>) -> Diagnostic {
    Diagnostic::error(message, span).with_label(label)
}

impl<'a> Checker<'a> {
    fn new(kernel: &'a ast::Kernel) -> Self {
        Checker {
            kernel,
            cascade: Cascade {
                name: kernel.name.text.clone(),
                ranks: vec![],
                params: vec![],
                tensors: vec![],
                einsums: vec![],
                outputs: vec![],
            },
            symbols: HashMap::new(),
            index_bases: HashMap::new(),
            lines: vec![],
            first_definition: HashMap::new(),
            diagnostics: vec![],
        }
    }

    fn error(&mut self, diagnostic: Diagnostic) {
        self.diagnostics.push(diagnostic);
    }

    /// Declares a name, or reports that it is taken. Returns false when it was taken.
    fn declare(&mut self, name: &Name, symbol: Symbol, what: &str) -> bool {
        if let Some((_, previous)) = self.symbols.get(&name.text) {
            let previous = *previous;
            self.error(
                err(format!("`{}` is declared twice", name.text), name.span, format!("this {what} reuses the name"))
                    .with_related(previous, "first declared here"),
            );
            return false;
        }
        self.symbols.insert(name.text.clone(), (symbol, name.span));
        true
    }

    /// A tensor or param name must not be reserved or an index variable.
    fn check_value_name(&mut self, name: &Name, what: &str) -> bool {
        if RESERVED.contains(&name.text.as_str()) {
            self.error(err(format!("`{}` is reserved", name.text), name.span, format!("choose another {what} name")));
            return false;
        }
        if name.text.contains('\'') {
            self.error(err(
                format!("a {what} name cannot have primes: `{}`", name.text),
                name.span,
                "primes are for index variables",
            ));
            return false;
        }
        if let Some(rank) = self.index_base(&name.text) {
            let rank_name = self.cascade.rank(rank).name.clone();
            self.error(err(
                format!("`{}` is an index variable (of rank `{rank_name}`) and cannot name a {what}", name.text),
                name.span,
                "choose another name",
            ));
            return false;
        }
        true
    }

    /// The rank whose index variable `text` is (without primes), if any.
    fn index_base(&self, text: &str) -> Option<RankId> {
        self.index_bases.get(text.trim_end_matches('\'')).copied()
    }

    fn rank_ref(&mut self, name: &Name) -> Option<RankId> {
        match self.symbols.get(&name.text) {
            Some((Symbol::Rank(id), _)) => Some(*id),
            Some(_) => {
                self.error(err(format!("`{}` is not a rank", name.text), name.span, "expected a rank name"));
                None
            }
            None => {
                self.error(err(
                    format!("unknown rank `{}`", name.text),
                    name.span,
                    "not declared by a `rank` statement",
                ));
                None
            }
        }
    }

    // ---- Declarations -------------------------------------------------------------------------

    fn declarations(&mut self) {
        for item in &self.kernel.items {
            match item {
                ast::Item::Ranks(ranks) => {
                    for rank in ranks {
                        self.rank_decl(rank);
                    }
                }
                ast::Item::Inputs(inputs) => {
                    for input in inputs {
                        self.input_decl(input);
                    }
                }
                ast::Item::Params(params) => {
                    for param in params {
                        if self.check_value_name(&param.name, "param") {
                            let id = ParamId::new(self.cascade.params.len());
                            if self.declare(&param.name, Symbol::Param(id), "param") {
                                self.cascade.params.push(Param { name: param.name.text.clone(), value: param.value });
                            }
                        }
                    }
                }
                ast::Item::Outputs(_) | ast::Item::Einsum(_) => {}
            }
        }
    }

    fn rank_decl(&mut self, decl: &ast::RankDecl) {
        let name = &decl.name;
        if !name.text.starts_with(|c: char| c.is_ascii_uppercase()) || name.text.contains('\'') {
            self.error(err(
                format!("rank names start with an upper-case letter and have no primes: `{}`", name.text),
                name.span,
                "not a rank name",
            ));
            return;
        }
        let extent = match &decl.def {
            RankDef::Symbolic => Extent::Symbolic,
            RankDef::Fixed { extent, .. } => Extent::Fixed(*extent),
            RankDef::Split { whole, tile } => {
                let (Some(whole_id), Some(tile_id)) = (self.rank_ref(whole), self.rank_ref(tile)) else {
                    return;
                };
                match self.cascade.rank(tile_id).extent {
                    Extent::Fixed(0) => {
                        self.error(err("a split needs a tile of at least one element", tile.span, "this rank is 0"));
                        return;
                    }
                    Extent::Fixed(_) => {}
                    _ => {
                        self.error(err(
                            format!("the within-tile rank `{}` of a split must have a fixed extent", tile.text),
                            tile.span,
                            "declare it as `NAME = INT`",
                        ));
                        return;
                    }
                }
                if whole_id == tile_id {
                    self.error(err("a rank cannot be split by itself", tile.span, "same rank as the whole"));
                    return;
                }
                Extent::Split { whole: whole_id, tile: tile_id }
            }
        };
        let id = RankId::new(self.cascade.ranks.len());
        if !self.declare(name, Symbol::Rank(id), "rank") {
            return;
        }
        let base = name.text.to_lowercase();
        if let Some(other) = self.index_bases.get(&base) {
            let other = self.cascade.rank(*other).name.clone();
            self.error(err(
                format!("ranks `{other}` and `{}` would share the index variable `{base}`", name.text),
                name.span,
                "rename one of them",
            ));
            return;
        }
        if RESERVED.contains(&base.as_str()) || UnaryOp::from_name(&base).is_some() || base == "inf" {
            self.error(err(
                format!("the index variable `{base}` of rank `{}` would be a reserved word", name.text),
                name.span,
                "rename the rank",
            ));
            return;
        }
        self.index_bases.insert(base, id);
        self.cascade.ranks.push(Rank { name: name.text.clone(), extent });
    }

    fn input_decl(&mut self, decl: &ast::TensorDecl) {
        if !self.check_value_name(&decl.name, "tensor") {
            return;
        }
        let mut ranks = Vec::new();
        for rank in &decl.ranks {
            match self.rank_ref(rank) {
                Some(id) => ranks.push(id),
                None => return,
            }
        }
        let id = TensorId::new(self.cascade.tensors.len());
        if self.declare(&decl.name, Symbol::Tensor(id), "input") {
            let elem = decl.elem.unwrap_or(ElemType::F32);
            self.cascade.tensors.push(Tensor { name: decl.name.text.clone(), ranks, kind: TensorKind::Input { elem } });
        }
    }

    // ---- Definitions: which statements define which tensor ------------------------------------

    fn definitions(&mut self) {
        // Group the statements by target, in order of first appearance.
        let mut groups: Vec<(&'a Name, Vec<(usize, &'a ast::Einsum)>)> = Vec::new();
        let mut statements = 0usize;
        for item in &self.kernel.items {
            let ast::Item::Einsum(einsum) = item else {
                continue;
            };
            match groups.iter_mut().find(|(name, _)| name.text == einsum.target.text) {
                Some((_, lines)) => lines.push((statements, einsum)),
                None => groups.push((&einsum.target, vec![(statements, einsum)])),
            }
            statements += 1;
        }
        let mut line_info: Vec<Option<(&'a ast::Einsum, TensorId, LineKind)>> = vec![None; statements];
        for (name, lines) in groups {
            if let Some((symbol, declared)) = self.symbols.get(&name.text).cloned() {
                let what = match symbol {
                    Symbol::Rank(_) => "a rank",
                    Symbol::Param(_) => "a param",
                    Symbol::Tensor(_) => "an input",
                };
                self.error(
                    err(format!("`{}` is {what} and cannot be assigned", name.text), name.span, "assigned here")
                        .with_related(declared, "declared here"),
                );
                continue;
            }
            if !self.check_value_name(name, "tensor") {
                continue;
            }
            let kinds: Vec<Option<LineKind>> = lines.iter().map(|(_, einsum)| self.line_kind(einsum)).collect();
            if kinds.iter().any(Option::is_none) {
                continue;
            }
            let kinds: Vec<LineKind> = kinds.into_iter().map(Option::unwrap).collect();
            let Some((ranks, iterative)) = self.tensor_shape(name, &lines, &kinds) else {
                continue;
            };
            let id = TensorId::new(self.cascade.tensors.len());
            self.symbols.insert(name.text.clone(), (Symbol::Tensor(id), name.span));
            self.cascade.tensors.push(Tensor {
                name: name.text.clone(),
                ranks,
                kind: TensorKind::Defined { iterative },
            });
            self.first_definition.insert(id, lines[0].0);
            for ((position, einsum), kind) in lines.into_iter().zip(kinds) {
                line_info[position] = Some((einsum, id, kind));
            }
        }
        self.lines = line_info.into_iter().flatten().collect();
        if self.lines.len() != statements {
            // Some targets failed; the einsums pass needs them all.
            debug_assert!(!self.diagnostics.is_empty());
        }
    }

    /// Classifies a statement by its left-hand side, checking each subscript's form.
    fn line_kind(&mut self, einsum: &ast::Einsum) -> Option<LineKind> {
        let mut kind = LineKind::Plain;
        let mut ok = true;
        let mut seen: Vec<&str> = Vec::new();
        for (position, sub) in einsum.subscripts.iter().enumerate() {
            let this = match &sub.kind {
                ExprKind::Name(text) if self.index_base(text).is_some() => {
                    if seen.contains(&text.as_str()) {
                        self.error(err(
                            format!("index `{text}` appears twice on the left-hand side"),
                            sub.span,
                            "repeated index",
                        ));
                        ok = false;
                    }
                    seen.push(text);
                    LineKind::Plain
                }
                ExprKind::Number(value) if *value == 0.0 => LineKind::Initial { position },
                ExprKind::Binary(ast::BinOp::Add, a, b)
                    if matches!(&a.kind, ExprKind::Name(t) if self.index_base(t).is_some())
                        && matches!(b.kind, ExprKind::Number(one) if one == 1.0) =>
                {
                    let ExprKind::Name(text) = &a.kind else { unreachable!() };
                    if seen.contains(&text.as_str()) {
                        self.error(err(
                            format!("index `{text}` appears twice on the left-hand side"),
                            sub.span,
                            "repeated index",
                        ));
                        ok = false;
                    }
                    seen.push(text);
                    LineKind::Recurrence { position }
                }
                _ => {
                    self.error(
                        err(
                            "a left-hand subscript must be an index, `0` (an initial value) or `r + 1` (a recurrence)",
                            sub.span,
                            "not allowed on the left",
                        )
                        .with_note("reads at other coordinates belong on the right-hand side"),
                    );
                    ok = false;
                    continue;
                }
            };
            if this != LineKind::Plain {
                if kind != LineKind::Plain {
                    self.error(err("a tensor iterates along one rank only", sub.span, "a second iterative subscript"));
                    ok = false;
                }
                kind = this;
            }
        }
        ok.then_some(kind)
    }

    /// The ranks of a defined tensor and its iterative position, from its definitions.
    fn tensor_shape(
        &mut self,
        name: &Name,
        lines: &[(usize, &ast::Einsum)],
        kinds: &[LineKind],
    ) -> Option<(Vec<RankId>, Option<usize>)> {
        let plain: Vec<_> = lines.iter().zip(kinds).filter(|(_, k)| **k == LineKind::Plain).collect();
        let initial: Vec<_> = lines.iter().zip(kinds).filter(|(_, k)| matches!(k, LineKind::Initial { .. })).collect();
        let recurrence: Vec<_> =
            lines.iter().zip(kinds).filter(|(_, k)| matches!(k, LineKind::Recurrence { .. })).collect();
        let rank_of = |checker: &Self, sub: &ast::Expr| -> Option<RankId> {
            match &sub.kind {
                ExprKind::Name(text) => checker.index_base(text),
                ExprKind::Binary(_, a, _) => match &a.kind {
                    ExprKind::Name(text) => checker.index_base(text),
                    _ => None,
                },
                _ => None,
            }
        };
        if !plain.is_empty() {
            if lines.len() > 1 {
                let (second, _) = lines.iter().zip(kinds).nth(1).expect("two lines");
                let (first, _) = lines[0];
                let _ = first;
                self.error(
                    err(format!("`{}` is defined twice", name.text), second.1.target.span, "second definition")
                        .with_related(lines[0].1.target.span, "first definition")
                        .with_note("only an iterative tensor has two definitions: `T[0, ..]` and `T[r + 1, ..]`"),
                );
                return None;
            }
            let einsum = plain[0].0 .1;
            let ranks = einsum.subscripts.iter().map(|s| rank_of(self, s).expect("checked index")).collect();
            return Some((ranks, None));
        }
        let (Some(init), Some(rec)) = (initial.first(), recurrence.first()) else {
            if let Some(rec) = recurrence.first() {
                self.error(
                    err(
                        format!("the recurrence of `{}` has no initial value", name.text),
                        rec.0 .1.span,
                        "recurrence defined here",
                    )
                    .with_note(format!("add a line such as `{}[0, ...] = 0` before it", name.text)),
                );
            } else if let Some(init) = initial.first() {
                self.error(
                    err(
                        format!("`{}` has an initial value but no recurrence", name.text),
                        init.0 .1.span,
                        "initial value defined here",
                    )
                    .with_note("an iterative tensor also needs a line `T[r + 1, ...] = ...`"),
                );
            }
            return None;
        };
        if initial.len() > 1 || recurrence.len() > 1 {
            let extra = if initial.len() > 1 { initial[1].0 .1 } else { recurrence[1].0 .1 };
            self.error(err(format!("`{}` is defined twice", name.text), extra.target.span, "second definition"));
            return None;
        }
        let (LineKind::Initial { position: init_pos }, LineKind::Recurrence { position: rec_pos }) = (*init.1, *rec.1)
        else {
            unreachable!("classified above")
        };
        let (init_einsum, rec_einsum) = (init.0 .1, rec.0 .1);
        if rec.0 .0 < init.0 .0 {
            self.error(
                err(
                    format!("the initial value of `{}` must come before its recurrence", name.text),
                    init_einsum.span,
                    "initial value",
                )
                .with_related(rec_einsum.span, "recurrence"),
            );
            return None;
        }
        if init_einsum.subscripts.len() != rec_einsum.subscripts.len() || init_pos != rec_pos {
            self.error(
                err(
                    format!("the initial value and the recurrence of `{}` do not have the same shape", name.text),
                    init_einsum.target.span,
                    "initial value",
                )
                .with_related(rec_einsum.target.span, "recurrence"),
            );
            return None;
        }
        let mut ranks = Vec::new();
        for (position, (a, b)) in init_einsum.subscripts.iter().zip(&rec_einsum.subscripts).enumerate() {
            let rank_b = rank_of(self, b).expect("checked index");
            if position != init_pos {
                let rank_a = rank_of(self, a).expect("checked index");
                if rank_a != rank_b {
                    self.error(err(
                        format!(
                            "position {} of `{}` has rank `{}` here but `{}` in its recurrence",
                            position + 1,
                            name.text,
                            self.cascade.rank(rank_a).name,
                            self.cascade.rank(rank_b).name
                        ),
                        a.span,
                        "rank mismatch",
                    ));
                    return None;
                }
            }
            ranks.push(rank_b);
        }
        Some((ranks, Some(rec_pos)))
    }

    // ---- Einsums ------------------------------------------------------------------------------

    fn einsums(&mut self) {
        let lines = std::mem::take(&mut self.lines);
        for (position, (einsum, target, kind)) in lines.iter().enumerate() {
            if let Some(resolved) = self.einsum(position, einsum, *target, *kind) {
                self.cascade.einsums.push(resolved);
            }
        }
        self.lines = lines;
    }

    fn einsum(&mut self, position: usize, einsum: &ast::Einsum, target: TensorId, kind: LineKind) -> Option<Einsum> {
        let mut lhs = Vec::new();
        let mut scope = Scope::default();
        for sub in &einsum.subscripts {
            let entry = match &sub.kind {
                ExprKind::Name(text) => Lhs::Index(self.index_of(text)),
                ExprKind::Number(_) => Lhs::Initial,
                ExprKind::Binary(_, a, _) => match &a.kind {
                    ExprKind::Name(text) => Lhs::Next(self.index_of(text)),
                    _ => unreachable!("classified by line_kind"),
                },
                _ => unreachable!("classified by line_kind"),
            };
            if let Some(index) = entry.index() {
                scope.lhs.push(index);
            }
            lhs.push(entry);
        }
        let mut statement =
            Statement { position, target, kind, free: vec![], reducers: vec![], current_reducer: None, failed: false };
        let body = self.expr(&einsum.value, &scope, &mut statement);
        let mut body = body?;
        if statement.failed {
            return None;
        }
        // The implicit sum wraps the whole right-hand side.
        let implicit = !statement.free.is_empty();
        if implicit {
            body = Expr::Reduce {
                op: ReduceOp::Sum,
                indices: statement.free.clone(),
                filter: vec![],
                body: Box::new(body),
            };
        }
        let mut output_filter = Vec::new();
        for cmp in &einsum.filter {
            // Pre-order numbering of reducers: the implicit one, when present, is number 0.
            match self.attach_comparison(cmp, &scope, &mut statement, implicit) {
                Some((Attach::Output, cond)) => output_filter.push(cond),
                Some((Attach::Implicit, cond)) => reducer_filter(&mut body, 0).push(cond),
                Some((Attach::Explicit(reducer), cond)) => {
                    reducer_filter(&mut body, reducer + usize::from(implicit)).push(cond)
                }
                None => statement.failed = true,
            }
        }
        if statement.failed {
            return None;
        }
        Some(Einsum { target, lhs, body, filter: output_filter })
    }

    fn index_of(&self, text: &str) -> Index {
        let rank = self.index_base(text).expect("an index variable");
        let primes = text.chars().rev().take_while(|c| *c == '\'').count();
        Index { rank, primes: primes.min(u8::MAX as usize) as u8 }
    }

    fn fail(&mut self, statement: &mut Statement, diagnostic: Diagnostic) -> Option<Expr> {
        self.error(diagnostic);
        statement.failed = true;
        None
    }

    /// Resolves an index variable used on the right: bound, or free (to be summed).
    fn use_index(&mut self, text: &str, scope: &Scope, statement: &mut Statement) -> Index {
        let index = self.index_of(text);
        if !scope.lhs.contains(&index) && !scope.reduced.contains(&index) && !statement.free.contains(&index) {
            statement.free.push(index);
        }
        index
    }

    fn expr(&mut self, expr: &ast::Expr, scope: &Scope, statement: &mut Statement) -> Option<Expr> {
        match &expr.kind {
            ExprKind::Number(value) => Some(Expr::Const(*value)),
            ExprKind::Name(text) => self.name_expr(text, expr.span, scope, statement),
            ExprKind::Access { tensor, subscripts } => self.access(tensor, subscripts, expr.span, scope, statement),
            ExprKind::Neg(arg) => match self.expr(arg, scope, statement)? {
                Expr::Const(value) => Some(Expr::Const(-value)),
                arg => Some(Expr::Unary(UnaryOp::Neg, Box::new(arg))),
            },
            ExprKind::Binary(op, a, b) => {
                let a = self.expr(a, scope, statement);
                let b = self.expr(b, scope, statement);
                let op = match op {
                    ast::BinOp::Add => BinaryOp::Add,
                    ast::BinOp::Sub => BinaryOp::Sub,
                    ast::BinOp::Mul => BinaryOp::Mul,
                    ast::BinOp::Div => BinaryOp::Div,
                };
                Some(Expr::Binary(op, Box::new(a?), Box::new(b?)))
            }
            ExprKind::Call { func, args } => self.call(func, args, expr.span, scope, statement),
            ExprKind::Reduce { op, indices, arg } => self.reduce(*op, indices, arg, scope, statement),
        }
    }

    fn name_expr(&mut self, text: &str, span: Span, scope: &Scope, statement: &mut Statement) -> Option<Expr> {
        if self.index_base(text).is_some() {
            return Some(Expr::Index(self.use_index(text, scope, statement)));
        }
        match self.symbols.get(text).map(|(symbol, _)| *symbol) {
            Some(Symbol::Param(id)) => Some(Expr::Param(id)),
            Some(Symbol::Rank(id)) => Some(Expr::Extent(id)),
            Some(Symbol::Tensor(id)) => {
                let rank_count = self.cascade.tensor(id).ranks.len();
                if rank_count != 0 {
                    return self.fail(
                        statement,
                        err(
                            format!("`{text}` has {rank_count} rank(s) and needs subscripts"),
                            span,
                            format!("write `{text}[...]`"),
                        ),
                    );
                }
                self.access_checked(id, &[], span, scope, statement)
            }
            None if text == "nan" => Some(Expr::Const(f64::NAN)),
            None => self.fail(statement, err(format!("unknown name `{text}`"), span, "not declared in this kernel")),
        }
    }

    fn call(
        &mut self,
        func: &Name,
        args: &[ast::Expr],
        span: Span,
        scope: &Scope,
        statement: &mut Statement,
    ) -> Option<Expr> {
        let (arity, build): (usize, Box<dyn Fn(Vec<Expr>) -> Expr>) = match func.text.as_str() {
            "max" => (
                2,
                Box::new(|mut a: Vec<Expr>| {
                    let b = a.pop().unwrap();
                    Expr::Binary(BinaryOp::Max, Box::new(a.pop().unwrap()), Box::new(b))
                }),
            ),
            "min" => (
                2,
                Box::new(|mut a: Vec<Expr>| {
                    let b = a.pop().unwrap();
                    Expr::Binary(BinaryOp::Min, Box::new(a.pop().unwrap()), Box::new(b))
                }),
            ),
            name => match UnaryOp::from_name(name) {
                Some(op) => (1, Box::new(move |mut a: Vec<Expr>| Expr::Unary(op, Box::new(a.pop().unwrap())))),
                None => {
                    let known: Vec<&str> = UnaryOp::FUNCTIONS.iter().map(|f| f.name()).collect();
                    return self.fail(
                        statement,
                        err(format!("unknown function `{}`", func.text), func.span, "not an element-wise function")
                            .with_note(format!("the functions are {}, max(a, b) and min(a, b)", known.join(", "))),
                    );
                }
            },
        };
        if args.len() != arity {
            return self.fail(
                statement,
                err(
                    format!("`{}` takes {arity} argument(s), found {}", func.text, args.len()),
                    span,
                    "wrong number of arguments",
                ),
            );
        }
        let resolved: Vec<Option<Expr>> = args.iter().map(|a| self.expr(a, scope, statement)).collect();
        let resolved: Option<Vec<Expr>> = resolved.into_iter().collect();
        Some(build(resolved?))
    }

    fn reduce(
        &mut self,
        op: ReduceOp,
        names: &[Name],
        arg: &ast::Expr,
        scope: &Scope,
        statement: &mut Statement,
    ) -> Option<Expr> {
        if names.is_empty() {
            let span = arg.span;
            return self.fail(
                statement,
                err(format!("`{}[]` reduces no index", op.name()), span, "name the indices in `[...]`"),
            );
        }
        let mut indices = Vec::new();
        for name in names {
            if self.index_base(&name.text).is_none() {
                return self.fail(
                    statement,
                    err(
                        format!("`{}` is not an index variable", name.text),
                        name.span,
                        "reducers bind index variables",
                    ),
                );
            }
            let index = self.index_of(&name.text);
            if scope.lhs.contains(&index) {
                return self.fail(
                    statement,
                    err(
                        format!("index `{}` is on the left-hand side and cannot also be reduced", name.text),
                        name.span,
                        "reduced here",
                    )
                    .with_note("an index on the left names an output coordinate"),
                );
            }
            if scope.reduced.contains(&index) || indices.contains(&index) {
                return self.fail(
                    statement,
                    err(format!("index `{}` is already reduced here", name.text), name.span, "bound twice"),
                );
            }
            indices.push(index);
        }
        let number = statement.reducers.len();
        statement.reducers.push((indices.clone(), statement.current_reducer));
        let outer = statement.current_reducer.replace(number);
        let mut inner = scope.clone();
        inner.reduced.extend(indices.iter().copied());
        let body = self.expr(arg, &inner, statement);
        statement.current_reducer = outer;
        Some(Expr::Reduce { op, indices, filter: vec![], body: Box::new(body?) })
    }

    fn access(
        &mut self,
        tensor: &Name,
        subscripts: &[ast::Expr],
        span: Span,
        scope: &Scope,
        statement: &mut Statement,
    ) -> Option<Expr> {
        let id = match self.symbols.get(&tensor.text).map(|(symbol, _)| *symbol) {
            Some(Symbol::Tensor(id)) => id,
            Some(Symbol::Param(_)) => {
                return self.fail(
                    statement,
                    err(
                        format!("`{}` is a param, not a tensor", tensor.text),
                        tensor.span,
                        "params take no subscripts",
                    ),
                )
            }
            Some(Symbol::Rank(_)) => {
                return self.fail(
                    statement,
                    err(format!("`{}` is a rank, not a tensor", tensor.text), tensor.span, "ranks take no subscripts"),
                )
            }
            None => {
                return self
                    .fail(statement, err(format!("unknown tensor `{}`", tensor.text), tensor.span, "not declared"))
            }
        };
        let ranks = self.cascade.tensor(id).ranks.clone();
        if ranks.len() != subscripts.len() {
            return self.fail(
                statement,
                err(
                    format!(
                        "`{}` has {} rank(s) but {} subscript(s) are given",
                        tensor.text,
                        ranks.len(),
                        subscripts.len()
                    ),
                    span,
                    "wrong number of subscripts",
                ),
            );
        }
        let mut resolved = Vec::new();
        for (position, (sub, rank)) in subscripts.iter().zip(&ranks).enumerate() {
            let affine = self.affine(sub, scope, statement)?;
            if let Affine::Index(index) = affine {
                if index.rank != *rank {
                    let index_name = self.cascade.index_name(index);
                    let used_rank = self.cascade.rank(index.rank).name.clone();
                    let wanted = self.cascade.rank(*rank).name.clone();
                    return self.fail(
                        statement,
                        err(
                            format!(
                                "index `{index_name}` ranges over `{used_rank}`, but position {} of `{}` has rank `{wanted}`",
                                position + 1,
                                tensor.text
                            ),
                            sub.span,
                            format!("expected an index of rank `{wanted}`"),
                        )
                        .with_note("an index is tied to one rank; use an affine subscript to map between ranks"),
                    );
                }
            }
            resolved.push(affine);
        }
        let _ = resolved.len();
        self.access_checked(id, &resolved, span, scope, statement)
    }

    /// Checks the order of definitions for a read of `id`, and builds the access.
    fn access_checked(
        &mut self,
        id: TensorId,
        subscripts: &[Affine],
        span: Span,
        _scope: &Scope,
        statement: &mut Statement,
    ) -> Option<Expr> {
        let name = self.cascade.tensor(id).name.clone();
        if let Some(first) = self.first_definition.get(&id).copied() {
            let reads_itself = id == statement.target;
            if reads_itself && !matches!(statement.kind, LineKind::Recurrence { .. }) {
                return self.fail(
                    statement,
                    err(format!("`{name}` is defined in terms of itself"), span, "read of the tensor being defined")
                        .with_note("only a recurrence (`T[r + 1, ..] = ... T[r, ..]`) may read its own tensor"),
                );
            }
            if first > statement.position {
                return self.fail(
                    statement,
                    err(format!("`{name}` is used before it is defined"), span, "read here")
                        .with_note("a cascade defines each tensor from earlier ones"),
                );
            }
        }
        Some(Expr::Access { tensor: id, subscripts: subscripts.to_vec() })
    }

    /// Resolves a subscript to an affine expression of indices and extents.
    fn affine(&mut self, expr: &ast::Expr, scope: &Scope, statement: &mut Statement) -> Option<Affine> {
        let not_affine = |why: &str| {
            err(format!("this subscript is not affine: {why}"), expr.span, "bad subscript")
                .with_note("a subscript is an integer expression of indices, rank extents and +, -, * by a constant")
        };
        match &expr.kind {
            ExprKind::Number(value) => {
                if value.fract() != 0.0 || !value.is_finite() || value.abs() > 1e15 {
                    self.error(not_affine("subscripts are integers"));
                    statement.failed = true;
                    return None;
                }
                Some(Affine::Const(*value as i64))
            }
            ExprKind::Name(text) => {
                if self.index_base(text).is_some() {
                    return Some(Affine::Index(self.use_index(text, scope, statement)));
                }
                match self.symbols.get(text).map(|(symbol, _)| *symbol) {
                    Some(Symbol::Rank(id)) => Some(Affine::Extent(id)),
                    Some(_) => {
                        self.error(not_affine(&format!("`{text}` is not an index or a rank extent")));
                        statement.failed = true;
                        None
                    }
                    None => {
                        self.error(err(format!("unknown name `{text}`"), expr.span, "not declared in this kernel"));
                        statement.failed = true;
                        None
                    }
                }
            }
            ExprKind::Neg(arg) => match self.affine(arg, scope, statement)? {
                Affine::Const(c) => Some(Affine::Const(-c)),
                arg => Some(Affine::Neg(Box::new(arg))),
            },
            ExprKind::Binary(op, a, b) => {
                let a = self.affine(a, scope, statement);
                let b = self.affine(b, scope, statement);
                let (a, b) = (Box::new(a?), Box::new(b?));
                match op {
                    ast::BinOp::Add => Some(Affine::Add(a, b)),
                    ast::BinOp::Sub => Some(Affine::Sub(a, b)),
                    ast::BinOp::Mul => {
                        if a.mentions_index() && b.mentions_index() {
                            self.error(not_affine("it multiplies two indices"));
                            statement.failed = true;
                            return None;
                        }
                        Some(Affine::Mul(a, b))
                    }
                    ast::BinOp::Div => {
                        self.error(not_affine("division is not allowed (split the rank instead)"));
                        statement.failed = true;
                        None
                    }
                }
            }
            ExprKind::Access { .. } | ExprKind::Call { .. } | ExprKind::Reduce { .. } => {
                self.error(not_affine("tensor reads, functions and reductions cannot be subscripts"));
                statement.failed = true;
                None
            }
        }
    }

    /// Resolves one `where` comparison and decides what it restricts: the innermost reducer
    /// (pre-order number among explicit reducers) whose index it mentions, or the output points.
    fn attach_comparison(
        &mut self,
        cmp: &ast::Comparison,
        scope: &Scope,
        statement: &mut Statement,
        implicit: bool,
    ) -> Option<(Attach, Cond)> {
        let mut mentioned = BTreeSet::new();
        self.mentioned_indices(&cmp.lhs, &mut mentioned);
        self.mentioned_indices(&cmp.rhs, &mut mentioned);
        // Candidates: explicit reducers binding a mentioned index.
        let candidates: Vec<usize> = (0..statement.reducers.len())
            .filter(|r| statement.reducers[*r].0.iter().any(|i| mentioned.contains(i)))
            .collect();
        let ancestors = |mut r: usize| {
            let mut chain = vec![r];
            while let Some(parent) = statement.reducers[r].1 {
                chain.push(parent);
                r = parent;
            }
            chain
        };
        let chosen = candidates.iter().copied().max_by_key(|r| ancestors(*r).len());
        let mut inner_scope = scope.clone();
        let target: Attach;
        match chosen {
            Some(r) => {
                let chain = ancestors(r);
                if let Some(other) = candidates.iter().find(|c| !chain.contains(c)) {
                    let _ = other;
                    self.error(err(
                        "this comparison mentions indices of two separate reductions",
                        cmp.span,
                        "ambiguous filter",
                    ));
                    return None;
                }
                for reducer in chain.iter().rev() {
                    inner_scope.reduced.extend(statement.reducers[*reducer].0.iter().copied());
                }
                if implicit {
                    inner_scope.reduced.extend(statement.free.iter().copied());
                }
                target = Attach::Explicit(r);
            }
            None => {
                let implicit_indices: Vec<Index> = statement.free.clone();
                if implicit && implicit_indices.iter().any(|i| mentioned.contains(i)) {
                    inner_scope.reduced.extend(implicit_indices);
                    target = Attach::Implicit;
                } else {
                    target = Attach::Output;
                }
            }
        }
        for index in &mentioned {
            if !inner_scope.lhs.contains(index) && !inner_scope.reduced.contains(index) {
                let name = self.cascade.index_name(*index);
                self.error(
                    err(format!("index `{name}` appears only in the filter"), cmp.span, "not bound by this Einsum")
                        .with_note("a filter restricts indices that the Einsum iterates over"),
                );
                return None;
            }
        }
        let free_before = statement.free.len();
        let lhs = self.expr(&cmp.lhs, &inner_scope, statement);
        let rhs = self.expr(&cmp.rhs, &inner_scope, statement);
        debug_assert_eq!(free_before, statement.free.len());
        let cond = Cond { lhs: lhs?, op: cmp.op, rhs: rhs? };
        Some((target, cond))
    }

    fn mentioned_indices(&self, expr: &ast::Expr, found: &mut BTreeSet<Index>) {
        match &expr.kind {
            ExprKind::Name(text) if self.index_base(text).is_some() => {
                found.insert(self.index_of(text));
            }
            ExprKind::Number(_) | ExprKind::Name(_) => {}
            ExprKind::Access { subscripts, .. } => subscripts.iter().for_each(|s| self.mentioned_indices(s, found)),
            ExprKind::Neg(a) => self.mentioned_indices(a, found),
            ExprKind::Binary(_, a, b) => {
                self.mentioned_indices(a, found);
                self.mentioned_indices(b, found);
            }
            ExprKind::Call { args, .. } => args.iter().for_each(|a| self.mentioned_indices(a, found)),
            ExprKind::Reduce { arg, .. } => self.mentioned_indices(arg, found),
        }
    }

    // ---- Outputs and cycles -------------------------------------------------------------------

    fn outputs(&mut self) {
        let mut seen: HashMap<TensorId, Span> = HashMap::new();
        let mut any = false;
        for item in &self.kernel.items {
            let ast::Item::Outputs(outputs) = item else {
                continue;
            };
            for output in outputs {
                any = true;
                let id = match self.symbols.get(&output.name.text).map(|(s, _)| *s) {
                    Some(Symbol::Tensor(id)) => id,
                    _ => {
                        self.error(err(
                            format!("unknown output `{}`", output.name.text),
                            output.name.span,
                            "no Einsum defines this tensor",
                        ));
                        continue;
                    }
                };
                if matches!(self.cascade.tensor(id).kind, TensorKind::Input { .. }) {
                    self.error(err(
                        format!("`{}` is an input and cannot be an output", output.name.text),
                        output.name.span,
                        "outputs are tensors the kernel defines",
                    ));
                    continue;
                }
                if let Some(previous) = seen.insert(id, output.name.span) {
                    self.error(
                        err(format!("`{}` is an output twice", output.name.text), output.name.span, "repeated")
                            .with_related(previous, "first named here"),
                    );
                    continue;
                }
                self.cascade.outputs.push(Output { tensor: id, elem: output.elem.unwrap_or(ElemType::F32) });
            }
        }
        if !any {
            self.error(err(
                format!("kernel `{}` has no output", self.kernel.name.text),
                self.kernel.name.span,
                "add an `output` statement",
            ));
        }
    }

    /// Every dependency cycle must be carried by a recurrence to an earlier iterate.
    fn cycles(&mut self) {
        if let Err(problem) = dependency_cycles(&self.cascade) {
            let span = self
                .lines
                .iter()
                .find(|(_, target, _)| *target == problem.tensor)
                .map_or(self.kernel.name.span, |(einsum, _, _)| einsum.span);
            self.error(
                err(
                    format!("`{}` depends on itself at the same iterate", self.cascade.tensor(problem.tensor).name),
                    span,
                    "part of a dependency cycle",
                )
                .with_note(format!("the cycle: {}", problem.cycle.join(" -> "))),
            );
        }
    }
}

/// What a `where` comparison restricts.
enum Attach {
    Output,
    Implicit,
    /// An explicit reducer, by its pre-order number among the explicit ones.
    Explicit(usize),
}

/// The filter list of the reducer with pre-order number `number`.
fn reducer_filter(body: &mut Expr, number: usize) -> &mut Vec<Cond> {
    let mut counter = 0usize;
    find_reducer(body, number, &mut counter).expect("the reducer exists")
}

fn find_reducer<'e>(expr: &'e mut Expr, number: usize, counter: &mut usize) -> Option<&'e mut Vec<Cond>> {
    match expr {
        Expr::Reduce { filter, body, .. } => {
            if *counter == number {
                return Some(filter);
            }
            *counter += 1;
            find_reducer(body, number, counter)
        }
        Expr::Unary(_, arg) => find_reducer(arg, number, counter),
        Expr::Binary(_, a, b) => {
            if let Some(found) = find_reducer(a, number, counter) {
                return Some(found);
            }
            find_reducer(b, number, counter)
        }
        _ => None,
    }
}

/// A dependency cycle that no recurrence carries.
pub struct CycleProblem {
    pub tensor: TensorId,
    pub cycle: Vec<String>,
}

/// Checks that every cycle in the tensor dependency graph moves strictly to earlier iterates of
/// one iterative rank. For each strongly connected component, the rank of its iterative tensors
/// gives each edge a weight: how far the read coordinate along that rank is from the written one.
/// A cycle whose weights sum to zero or more would read a value not yet computed.
pub fn dependency_cycles(cascade: &Cascade) -> Result<(), CycleProblem> {
    let mut graph: DiGraph<TensorId, (EinsumId, usize)> = DiGraph::new();
    let nodes: Vec<_> = (0..cascade.tensors.len()).map(|t| graph.add_node(TensorId::new(t))).collect();
    for (e, einsum) in cascade.einsums.iter().enumerate() {
        for (access_number, (read, _)) in einsum.reads().into_iter().enumerate() {
            graph.add_edge(nodes[read.index()], nodes[einsum.target.index()], (EinsumId::new(e), access_number));
        }
    }
    for component in petgraph::algo::tarjan_scc(&graph) {
        let single = component.len() == 1;
        if single && !graph.contains_edge(component[0], component[0]) {
            continue;
        }
        let members: BTreeSet<TensorId> = component.iter().map(|n| graph[*n]).collect();
        let problem = || CycleProblem {
            tensor: *members.iter().next().expect("non-empty"),
            cycle: members.iter().map(|t| cascade.tensor(*t).name.clone()).collect(),
        };
        let ranks: BTreeSet<RankId> = members
            .iter()
            .filter_map(|t| {
                let tensor = cascade.tensor(*t);
                match tensor.kind {
                    TensorKind::Defined { iterative: Some(p) } => Some(tensor.ranks[p]),
                    _ => None,
                }
            })
            .collect();
        if ranks.len() != 1 {
            return Err(problem());
        }
        let rank = *ranks.iter().next().expect("one rank");
        // Weighted edges among the members: (reader, read, weight).
        let mut edges: Vec<(TensorId, TensorId, i64)> = Vec::new();
        for (e, einsum) in cascade.einsums.iter().enumerate() {
            if !members.contains(&einsum.target) {
                continue;
            }
            let _ = e;
            let reads = einsum.reads();
            if einsum.is_initial() {
                // An initial value is iterate 0; it must not read the values that depend on it.
                if reads.into_iter().any(|(read, _)| members.contains(&read)) {
                    return Err(problem());
                }
                continue;
            }
            let Some((written_index, written_offset)) = coordinate_along(einsum, rank) else {
                return Err(problem());
            };
            for (read, subscripts) in einsum.reads() {
                if !members.contains(&read) {
                    continue;
                }
                let tensor = cascade.tensor(read);
                let positions: Vec<usize> =
                    tensor.ranks.iter().enumerate().filter(|(_, r)| **r == rank).map(|(p, _)| p).collect();
                let [position] = positions[..] else {
                    return Err(problem());
                };
                let Some(read_offset) = offset_of(&subscripts[position], written_index) else {
                    return Err(problem());
                };
                edges.push((einsum.target, read, read_offset - written_offset));
            }
        }
        // A cycle with weight sum >= 0 exists iff, with weights -(n + 1) * w - 1, a negative
        // cycle exists (Bellman-Ford from a virtual source).
        let n = members.len() as i64;
        let mut distance: BTreeMap<TensorId, i64> = members.iter().map(|t| (*t, 0)).collect();
        for round in 0..=members.len() {
            let mut changed = false;
            for (from, to, w) in &edges {
                let weight = -(n + 1) * w - 1;
                let candidate = distance[from] + weight;
                if candidate < distance[to] {
                    distance.insert(*to, candidate);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
            if round == members.len() {
                return Err(problem());
            }
        }
    }
    Ok(())
}

/// The index along `rank` that an Einsum binds on its left, and the offset of the written
/// coordinate from it (1 for a recurrence `r + 1`, 0 otherwise).
fn coordinate_along(einsum: &Einsum, rank: RankId) -> Option<(Index, i64)> {
    let found: Vec<(Index, i64)> = einsum
        .lhs
        .iter()
        .filter_map(|lhs| match lhs {
            Lhs::Index(i) if i.rank == rank => Some((*i, 0)),
            Lhs::Next(i) if i.rank == rank => Some((*i, 1)),
            _ => None,
        })
        .collect();
    match found[..] {
        [one] => Some(one),
        _ => None,
    }
}

/// For a subscript `i + c` (or `i - c`, or `i`), the constant `c`.
fn offset_of(subscript: &Affine, index: Index) -> Option<i64> {
    match subscript {
        Affine::Index(i) if *i == index => Some(0),
        Affine::Add(a, b) => match (&**a, &**b) {
            (Affine::Index(i), Affine::Const(c)) | (Affine::Const(c), Affine::Index(i)) if *i == index => Some(*c),
            _ => None,
        },
        Affine::Sub(a, b) => match (&**a, &**b) {
            (Affine::Index(i), Affine::Const(c)) if *i == index => Some(-*c),
            _ => None,
        },
        _ => None,
    }
}
