//! The `.ein` language front end: lexer, parser, AST with byte spans, and diagnostics.
//!
//! This crate knows nothing of the Cascade IR: it turns text into syntax and reports what is
//! malformed, with the file, line, column and a caret. Name resolution and rank checking happen
//! in `einfuse-compiler`.

pub mod ast;
pub mod diagnostic;
pub mod lexer;
pub mod parser;

pub use ast::{ElemType, File, Span};
pub use diagnostic::Diagnostic;
pub use parser::parse;
