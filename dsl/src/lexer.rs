//! The lexer: source text to tokens with byte spans (a thin layer over logos).

use logos::Logos;

use crate::ast::Span;

/// One token of `.ein` source.
#[derive(Logos, Clone, Debug, PartialEq)]
#[logos(skip r"[ \t\r\f]+")]
#[logos(skip(r"#[^\n]*", allow_greedy = true))]
pub enum Token {
    #[token("\n")]
    Newline,
    #[token(";")]
    Semi,
    #[token(",")]
    Comma,
    #[token(":")]
    Colon,
    #[token("(")]
    LParen,
    #[token(")")]
    RParen,
    #[token("[")]
    LBracket,
    #[token("]")]
    RBracket,
    #[token("{")]
    LBrace,
    #[token("}")]
    RBrace,
    #[token("+")]
    Plus,
    #[token("-")]
    Minus,
    #[token("*")]
    Star,
    #[token("/")]
    Slash,
    #[token("=")]
    Assign,
    #[token("==")]
    EqEq,
    #[token("!=")]
    NotEq,
    #[token("<")]
    Lt,
    #[token("<=")]
    Le,
    #[token(">")]
    Gt,
    #[token(">=")]
    Ge,
    #[token("&&")]
    AndAnd,
    #[token("kernel")]
    Kernel,
    #[token("rank")]
    Rank,
    #[token("input")]
    Input,
    #[token("param")]
    Param,
    #[token("output")]
    Output,
    #[token("where")]
    Where,
    #[token("sum")]
    Sum,
    #[token("max")]
    Max,
    #[token("min")]
    Min,
    #[token("inf")]
    Inf,
    /// An integer literal (also used for extents and subscripts).
    #[regex(r"[0-9]+", priority = 3)]
    Int,
    /// A decimal or exponent literal.
    #[regex(r"[0-9]+\.[0-9]*([eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+|\.[0-9]+([eE][+-]?[0-9]+)?")]
    Float,
    /// A name, possibly followed by primes (`m'`).
    #[regex(r"[A-Za-z_][A-Za-z0-9_]*'*")]
    Ident,
}

impl Token {
    /// How the token reads in an error message.
    pub fn describe(&self) -> &'static str {
        match self {
            Token::Newline => "end of line",
            Token::Semi => "`;`",
            Token::Comma => "`,`",
            Token::Colon => "`:`",
            Token::LParen => "`(`",
            Token::RParen => "`)`",
            Token::LBracket => "`[`",
            Token::RBracket => "`]`",
            Token::LBrace => "`{`",
            Token::RBrace => "`}`",
            Token::Plus => "`+`",
            Token::Minus => "`-`",
            Token::Star => "`*`",
            Token::Slash => "`/`",
            Token::Assign => "`=`",
            Token::EqEq => "`==`",
            Token::NotEq => "`!=`",
            Token::Lt => "`<`",
            Token::Le => "`<=`",
            Token::Gt => "`>`",
            Token::Ge => "`>=`",
            Token::AndAnd => "`&&`",
            Token::Kernel => "`kernel`",
            Token::Rank => "`rank`",
            Token::Input => "`input`",
            Token::Param => "`param`",
            Token::Output => "`output`",
            Token::Where => "`where`",
            Token::Sum => "`sum`",
            Token::Max => "`max`",
            Token::Min => "`min`",
            Token::Inf => "`inf`",
            Token::Int => "an integer",
            Token::Float => "a number",
            Token::Ident => "a name",
        }
    }
}

/// A token with its span and text.
#[derive(Clone, Debug, PartialEq)]
pub struct Lexeme<'src> {
    pub token: Token,
    pub span: Span,
    pub text: &'src str,
}

/// Splits `source` into tokens. Unknown characters are returned as errors, one span each, and
/// lexing goes on after them.
pub fn lex(source: &str) -> (Vec<Lexeme<'_>>, Vec<Span>) {
    let mut tokens = Vec::new();
    let mut errors: Vec<Span> = Vec::new();
    let mut lexer = Token::lexer(source);
    while let Some(result) = lexer.next() {
        let range = lexer.span();
        let span = Span::new(range.start, range.end);
        match result {
            Ok(token) => tokens.push(Lexeme { token, span, text: lexer.slice() }),
            Err(()) => match errors.last_mut() {
                // Adjacent bad characters make one error.
                Some(last) if last.end == span.start => last.end = span.end,
                _ => errors.push(span),
            },
        }
    }
    (tokens, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<Token> {
        lex(src).0.into_iter().map(|l| l.token).collect()
    }

    #[test]
    fn primes_and_numbers() {
        assert_eq!(
            kinds("m' 1.5 1e-4 3 inf <= # c\n"),
            vec![Token::Ident, Token::Float, Token::Float, Token::Int, Token::Inf, Token::Le, Token::Newline]
        );
    }

    #[test]
    fn bad_characters_are_reported_once_per_run() {
        let (_, errors) = lex("a $$ b @");
        assert_eq!(errors, vec![Span::new(2, 4), Span::new(7, 8)]);
    }
}
