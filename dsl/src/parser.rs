//! The parser: tokens to an AST, by recursive descent.
//!
//! Statements end at a newline or `;`, except inside `()` and `[]`. On an error the parser
//! records a diagnostic, skips to the end of the statement and goes on, so that one run reports
//! every error in a file. Nesting is bounded, so hostile input cannot overflow the stack.

use crate::ast::*;
use crate::diagnostic::Diagnostic;
use crate::lexer::{lex, Lexeme, Token};

/// The deepest expression tree the parser accepts: parentheses, calls, unary minus and each
/// operator of a chain (`a + b + c` is two deep) count one level. Later passes recurse over
/// expressions, so this bound keeps every one of them within its stack.
pub const MAX_NESTING: usize = 256;

/// Parses a whole file. The AST holds everything that parsed; the diagnostics list every error.
pub fn parse(source: &str) -> (File, Vec<Diagnostic>) {
    let (tokens, bad_chars) = lex(source);
    let mut diagnostics: Vec<Diagnostic> = bad_chars
        .into_iter()
        .map(|span| {
            Diagnostic::error("unexpected character", span).with_label("this is not part of the `.ein` language")
        })
        .collect();
    let mut parser =
        Parser { tokens, pos: 0, brackets: 0, depth: 0, diagnostics: Vec::new(), source_len: source.len() };
    let file = parser.file();
    diagnostics.extend(parser.diagnostics);
    diagnostics.sort_by_key(|d| d.span.start);
    (file, diagnostics)
}

/// A parse failure inside a statement; the diagnostic is already recorded.
struct Failed;

type PResult<T> = Result<T, Failed>;

struct Parser<'src> {
    tokens: Vec<Lexeme<'src>>,
    pos: usize,
    /// How many `(` and `[` are open: newlines inside them are not statement ends.
    brackets: usize,
    /// Expression recursion depth.
    depth: usize,
    diagnostics: Vec<Diagnostic>,
    source_len: usize,
}

impl<'src> Parser<'src> {
    // ---- Token access -------------------------------------------------------------------------

    fn skip_bracketed_newlines(&mut self) {
        if self.brackets > 0 {
            while self.pos < self.tokens.len() && self.tokens[self.pos].token == Token::Newline {
                self.pos += 1;
            }
        }
    }

    fn peek(&mut self) -> Option<Token> {
        self.skip_bracketed_newlines();
        self.tokens.get(self.pos).map(|l| l.token.clone())
    }

    fn at(&mut self, token: Token) -> bool {
        self.peek() == Some(token)
    }

    /// The span of the next token, or an empty span at the end of the source.
    fn here(&mut self) -> Span {
        self.skip_bracketed_newlines();
        match self.tokens.get(self.pos) {
            // Point at the end of the line rather than across it.
            Some(l) if l.token == Token::Newline => Span::new(l.span.start, l.span.start),
            Some(l) => l.span,
            None => Span::new(self.source_len, self.source_len),
        }
    }

    fn prev_span(&self) -> Span {
        self.pos.checked_sub(1).and_then(|i| self.tokens.get(i)).map_or(Span::default(), |l| l.span)
    }

    fn bump(&mut self) -> Lexeme<'src> {
        self.skip_bracketed_newlines();
        let lexeme = self.tokens[self.pos].clone();
        self.pos += 1;
        match lexeme.token {
            Token::LParen | Token::LBracket => self.brackets += 1,
            Token::RParen | Token::RBracket => self.brackets = self.brackets.saturating_sub(1),
            _ => {}
        }
        lexeme
    }

    fn eat(&mut self, token: Token) -> Option<Lexeme<'src>> {
        if self.at(token) {
            Some(self.bump())
        } else {
            None
        }
    }

    fn error_here(&mut self, message: impl Into<String>, label: impl Into<String>) -> Failed {
        let span = self.here();
        self.diagnostics.push(Diagnostic::error(message, span).with_label(label));
        Failed
    }

    fn unexpected(&mut self, expected: &str) -> Failed {
        let found = match self.peek() {
            Some(token) => token.describe(),
            None => "end of file",
        };
        self.error_here(format!("expected {expected}, found {found}"), format!("expected {expected}"))
    }

    fn expect(&mut self, token: Token, expected: &str) -> PResult<Lexeme<'src>> {
        match self.eat(token) {
            Some(lexeme) => Ok(lexeme),
            None => Err(self.unexpected(expected)),
        }
    }

    fn name(&mut self, expected: &str) -> PResult<Name> {
        let lexeme = self.expect(Token::Ident, expected)?;
        Ok(Name { text: lexeme.text.to_string(), span: lexeme.span })
    }

    /// Skips to the end of the current statement (a newline or `;` outside brackets, or a `}`
    /// that closes the kernel), after an error.
    fn recover_statement(&mut self) {
        // An unclosed bracket swallows newlines; when the error is at the start of a line, the
        // statement most likely ended on the line before, so the next one starts here.
        let open = self.brackets > 0;
        self.brackets = 0;
        if open && self.pos > 0 && self.tokens.get(self.pos - 1).map(|l| &l.token) == Some(&Token::Newline) {
            return;
        }
        while let Some(lexeme) = self.tokens.get(self.pos) {
            match lexeme.token {
                Token::Newline | Token::Semi => {
                    self.pos += 1;
                    return;
                }
                Token::RBrace | Token::Kernel => return,
                _ => self.pos += 1,
            }
        }
    }

    fn skip_separators(&mut self) {
        while matches!(self.tokens.get(self.pos).map(|l| &l.token), Some(Token::Newline | Token::Semi)) {
            self.pos += 1;
        }
    }

    // ---- Kernels and statements ---------------------------------------------------------------

    fn file(&mut self) -> File {
        let mut file = File::default();
        loop {
            self.skip_separators();
            match self.peek() {
                None => break,
                Some(Token::Kernel) => {
                    if let Some(kernel) = self.kernel() {
                        file.kernels.push(kernel);
                    }
                }
                Some(_) => {
                    self.unexpected("`kernel`");
                    // Skip to the next kernel.
                    while !matches!(self.peek(), None | Some(Token::Kernel)) {
                        self.pos += 1;
                    }
                }
            }
        }
        file
    }

    fn kernel(&mut self) -> Option<Kernel> {
        let start = self.bump().span;
        let name = match self.name("a kernel name") {
            Ok(name) => name,
            Err(Failed) => {
                self.recover_statement();
                Name { text: String::new(), span: start }
            }
        };
        if self.expect(Token::LBrace, "`{`").is_err() {
            while !matches!(self.peek(), None | Some(Token::Kernel) | Some(Token::LBrace)) {
                self.pos += 1;
            }
            if self.eat(Token::LBrace).is_none() {
                return None;
            }
        }
        let mut items = Vec::new();
        loop {
            self.skip_separators();
            match self.peek() {
                Some(Token::RBrace) => {
                    let end = self.bump().span;
                    return Some(Kernel { name, items, span: start.to(end) });
                }
                None | Some(Token::Kernel) => {
                    self.error_here("this kernel is not closed", "expected `}` before this");
                    let end = self.prev_span();
                    return Some(Kernel { name, items, span: start.to(end) });
                }
                Some(_) => match self.statement() {
                    Ok(item) => {
                        items.push(item);
                        if !self.end_of_statement() {
                            self.recover_statement();
                        }
                    }
                    Err(Failed) => self.recover_statement(),
                },
            }
        }
    }

    /// After a statement: a newline, `;` or `}` must follow.
    fn end_of_statement(&mut self) -> bool {
        match self.tokens.get(self.pos).map(|l| l.token.clone()) {
            None | Some(Token::Newline | Token::Semi | Token::RBrace) => true,
            Some(_) => {
                self.unexpected("the end of the statement");
                false
            }
        }
    }

    fn statement(&mut self) -> PResult<Item> {
        match self.peek() {
            Some(Token::Rank) => {
                self.bump();
                Ok(Item::Ranks(self.comma_list(Self::rank_decl)?))
            }
            Some(Token::Input) => {
                self.bump();
                Ok(Item::Inputs(self.comma_list(Self::input_decl)?))
            }
            Some(Token::Param) => {
                self.bump();
                Ok(Item::Params(self.comma_list(Self::param_decl)?))
            }
            Some(Token::Output) => {
                self.bump();
                Ok(Item::Outputs(self.comma_list(Self::output_decl)?))
            }
            Some(Token::Ident) => Ok(Item::Einsum(self.einsum()?)),
            _ => Err(self.unexpected("a statement (`rank`, `input`, `param`, `output` or an Einsum)")),
        }
    }

    fn comma_list<T>(&mut self, mut item: impl FnMut(&mut Self) -> PResult<T>) -> PResult<Vec<T>> {
        let mut items = vec![item(self)?];
        while self.eat(Token::Comma).is_some() {
            items.push(item(self)?);
        }
        Ok(items)
    }

    fn rank_decl(&mut self) -> PResult<RankDecl> {
        let name = self.name("a rank name")?;
        if self.eat(Token::Assign).is_none() {
            return Ok(RankDecl { span: name.span, name, def: RankDef::Symbolic });
        }
        if let Some(int) = self.eat(Token::Int) {
            let extent = int.text.parse::<u64>().map_err(|_| {
                self.diagnostics.push(Diagnostic::error("rank extent is too large", int.span).with_label("too large"));
                Failed
            })?;
            return Ok(RankDecl { span: name.span.to(int.span), name, def: RankDef::Fixed { extent, span: int.span } });
        }
        if self.at(Token::Ident) {
            let whole = self.name("a rank name")?;
            self.expect(Token::Slash, "`/` (a split is written `M1 = M / M0`)")?;
            let tile = self.name("the name of the within-tile rank")?;
            return Ok(RankDecl { span: name.span.to(tile.span), name, def: RankDef::Split { whole, tile } });
        }
        Err(self.unexpected("an integer extent or a split `M / M0`"))
    }

    fn elem_type(&mut self) -> PResult<Option<ElemType>> {
        if self.eat(Token::Colon).is_none() {
            return Ok(None);
        }
        let name = self.name("an element type (`f32`, `f16` or `bf16`)")?;
        match ElemType::parse(&name.text) {
            Some(elem) => Ok(Some(elem)),
            None => {
                self.diagnostics.push(
                    Diagnostic::error(format!("unknown element type `{}`", name.text), name.span)
                        .with_label("expected `f32`, `f16` or `bf16`"),
                );
                Err(Failed)
            }
        }
    }

    fn input_decl(&mut self) -> PResult<TensorDecl> {
        let name = self.name("an input tensor name")?;
        self.expect(Token::LBracket, "`[` and the input's ranks (`T[]` for a scalar)")?;
        let mut ranks = Vec::new();
        if !self.at(Token::RBracket) {
            ranks = self.comma_list(|p| p.name("a rank name"))?;
        }
        let close = self.expect(Token::RBracket, "`]`")?;
        let elem = self.elem_type()?;
        Ok(TensorDecl { span: name.span.to(close.span), name, ranks, elem })
    }

    fn param_decl(&mut self) -> PResult<ParamDecl> {
        let name = self.name("a param name")?;
        self.expect(Token::Assign, "`=` and the param's value")?;
        let negative = self.eat(Token::Minus).is_some();
        let lexeme = match self.peek() {
            Some(Token::Int | Token::Float | Token::Inf) => self.bump(),
            _ => return Err(self.unexpected("a number")),
        };
        let magnitude = number_value(&lexeme);
        let value = if negative { -magnitude } else { magnitude };
        Ok(ParamDecl { span: name.span.to(lexeme.span), name, value })
    }

    fn output_decl(&mut self) -> PResult<OutputDecl> {
        let name = self.name("an output tensor name")?;
        let elem = self.elem_type()?;
        let span = name.span.to(self.prev_span());
        Ok(OutputDecl { name, elem, span })
    }

    fn einsum(&mut self) -> PResult<Einsum> {
        let target = self.name("a tensor name")?;
        if !self.at(Token::LBracket) {
            return Err(self.unexpected("`[` after the tensor name (`T[]` for a scalar)"));
        }
        let subscripts = self.subscripts()?;
        self.expect(Token::Assign, "`=`")?;
        let value = self.expr()?;
        let mut filter = Vec::new();
        if self.eat(Token::Where).is_some() {
            filter.push(self.comparison()?);
            while self.eat(Token::AndAnd).is_some() {
                filter.push(self.comparison()?);
            }
        }
        let span = target.span.to(self.prev_span());
        Ok(Einsum { target, subscripts, value, filter, span })
    }

    /// `[e1, e2, ...]`, possibly empty.
    fn subscripts(&mut self) -> PResult<Vec<Expr>> {
        self.expect(Token::LBracket, "`[`")?;
        let mut subscripts = Vec::new();
        if !self.at(Token::RBracket) {
            subscripts = self.comma_list(Self::expr)?;
        }
        self.expect(Token::RBracket, "`]`")?;
        Ok(subscripts)
    }

    fn comparison(&mut self) -> PResult<Comparison> {
        let lhs = self.expr()?;
        let op = match self.peek() {
            Some(Token::Lt) => CmpOp::Lt,
            Some(Token::Le) => CmpOp::Le,
            Some(Token::Gt) => CmpOp::Gt,
            Some(Token::Ge) => CmpOp::Ge,
            Some(Token::EqEq) => CmpOp::Eq,
            Some(Token::NotEq) => CmpOp::Ne,
            Some(Token::Assign) => {
                return Err(self.error_here("`=` is not a comparison", "write `==` to compare"));
            }
            _ => return Err(self.unexpected("a comparison (`<`, `<=`, `>`, `>=`, `==` or `!=`)")),
        };
        self.bump();
        let rhs = self.expr()?;
        Ok(Comparison { span: lhs.span.to(rhs.span), lhs, op, rhs })
    }

    // ---- Expressions --------------------------------------------------------------------------

    fn enter(&mut self) -> PResult<()> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(self.error_here(
                format!("expression nested more than {MAX_NESTING} deep (operators and parentheses)"),
                "nesting limit reached here",
            ));
        }
        Ok(())
    }

    fn expr(&mut self) -> PResult<Expr> {
        let depth = self.depth;
        let result = self.enter().and_then(|()| self.additive());
        self.depth = depth;
        result
    }

    fn additive(&mut self) -> PResult<Expr> {
        let depth = self.depth;
        let result = self.additive_chain();
        self.depth = depth;
        result
    }

    fn additive_chain(&mut self) -> PResult<Expr> {
        let mut lhs = self.multiplicative()?;
        loop {
            let op = match self.peek() {
                Some(Token::Plus) => BinOp::Add,
                Some(Token::Minus) => BinOp::Sub,
                _ => return Ok(lhs),
            };
            self.bump();
            // Each operator deepens the (left-leaning) tree by one.
            self.enter()?;
            let rhs = self.multiplicative()?;
            lhs = Expr { span: lhs.span.to(rhs.span), kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)) };
        }
    }

    fn multiplicative(&mut self) -> PResult<Expr> {
        let depth = self.depth;
        let result = self.multiplicative_chain();
        self.depth = depth;
        result
    }

    fn multiplicative_chain(&mut self) -> PResult<Expr> {
        let mut lhs = self.unary()?;
        loop {
            let op = match self.peek() {
                Some(Token::Star) => BinOp::Mul,
                Some(Token::Slash) => BinOp::Div,
                _ => return Ok(lhs),
            };
            self.bump();
            self.enter()?;
            let rhs = self.unary()?;
            lhs = Expr { span: lhs.span.to(rhs.span), kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)) };
        }
    }

    fn unary(&mut self) -> PResult<Expr> {
        if let Some(minus) = self.eat(Token::Minus) {
            let depth = self.depth;
            let arg = self.enter().and_then(|()| self.unary());
            self.depth = depth;
            let arg = arg?;
            return Ok(Expr { span: minus.span.to(arg.span), kind: ExprKind::Neg(Box::new(arg)) });
        }
        self.primary()
    }

    fn primary(&mut self) -> PResult<Expr> {
        match self.peek() {
            Some(Token::Int | Token::Float | Token::Inf) => {
                let lexeme = self.bump();
                Ok(Expr { kind: ExprKind::Number(number_value(&lexeme)), span: lexeme.span })
            }
            Some(Token::LParen) => {
                self.bump();
                let inner = self.expr()?;
                self.expect(Token::RParen, "`)`")?;
                Ok(inner)
            }
            Some(Token::Sum | Token::Max | Token::Min) => self.reduction_or_call(),
            Some(Token::Ident) => {
                let name = self.name("a name")?;
                match self.peek() {
                    Some(Token::LBracket) => {
                        let subscripts = self.subscripts()?;
                        let span = name.span.to(self.prev_span());
                        Ok(Expr { kind: ExprKind::Access { tensor: name, subscripts }, span })
                    }
                    Some(Token::LParen) => {
                        let args = self.call_args()?;
                        let span = name.span.to(self.prev_span());
                        Ok(Expr { kind: ExprKind::Call { func: name, args }, span })
                    }
                    _ => Ok(Expr { span: name.span, kind: ExprKind::Name(name.text) }),
                }
            }
            _ => Err(self.unexpected("an expression")),
        }
    }

    fn call_args(&mut self) -> PResult<Vec<Expr>> {
        self.expect(Token::LParen, "`(`")?;
        let mut args = Vec::new();
        if !self.at(Token::RParen) {
            args = self.comma_list(Self::expr)?;
        }
        self.expect(Token::RParen, "`)`")?;
        Ok(args)
    }

    /// `sum[i](x)`, `max[i](x)`, `min[i](x)`, or the element-wise `max(a, b)` and `min(a, b)`.
    fn reduction_or_call(&mut self) -> PResult<Expr> {
        let keyword = self.bump();
        let op = match keyword.token {
            Token::Sum => ReduceOp::Sum,
            Token::Max => ReduceOp::Max,
            _ => ReduceOp::Min,
        };
        match self.peek() {
            Some(Token::LBracket) => {
                self.bump();
                let mut indices = Vec::new();
                if !self.at(Token::RBracket) {
                    indices = self.comma_list(|p| p.name("an index"))?;
                }
                self.expect(Token::RBracket, "`]`")?;
                let open = self.here();
                if !self.at(Token::LParen) {
                    return Err(self.unexpected("`(` and the reduced expression"));
                }
                let args = self.call_args()?;
                let span = keyword.span.to(self.prev_span());
                if args.len() != 1 {
                    self.diagnostics.push(
                        Diagnostic::error(
                            format!("`{}[..]` takes exactly one argument, found {}", op.name(), args.len()),
                            open.to(self.prev_span()),
                        )
                        .with_label("one expression expected here"),
                    );
                    return Err(Failed);
                }
                let arg = Box::new(args.into_iter().next().expect("one argument"));
                Ok(Expr { kind: ExprKind::Reduce { op, indices, arg }, span })
            }
            Some(Token::LParen) if op != ReduceOp::Sum => {
                let args = self.call_args()?;
                let span = keyword.span.to(self.prev_span());
                let func = Name { text: keyword.text.to_string(), span: keyword.span };
                Ok(Expr { kind: ExprKind::Call { func, args }, span })
            }
            _ => Err(self.unexpected(&format!("`[` and the indices that `{}` reduces", op.name()))),
        }
    }
}

fn number_value(lexeme: &Lexeme<'_>) -> f64 {
    match lexeme.token {
        Token::Inf => f64::INFINITY,
        // The lexer's patterns only admit valid decimal literals; an integer too long for u64 still
        // parses as a float.
        _ => lexeme.text.parse::<f64>().unwrap_or(f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newlines_inside_brackets_do_not_end_statements() {
        let (file, errors) = parse("kernel k {\n rank M\n input A[M]\n X[] = sum[m](\n A[m]\n )\n output X\n}\n");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(file.kernels[0].items.len(), 4);
    }

    #[test]
    fn every_error_is_reported() {
        let (_, errors) = parse("kernel k {\n rank = 3\n input A[M\n X[] = * 2\n}\n");
        assert_eq!(errors.len(), 3, "{errors:?}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let source = format!("kernel k {{\n X[] = {}1{}\n}}\n", "(".repeat(100_000), ")".repeat(100_000));
        let (_, errors) = parse(&source);
        assert!(errors.iter().any(|d| d.message.contains("nested")));
    }
}
