//! The Cranelift side of full steps (see `schedule::full_steps`): the tests, at each step of a
//! streamed loop, of whether every filter holds on the whole step or some filter on none of it.

use cranelift_codegen::ir::{condcodes::IntCC, types, InstBuilder, Value};

use super::codegen::Gen;
use crate::ir::*;
use crate::schedule::full_steps::{At, Margin, MarginTerm};

impl Gen<'_, '_> {
    /// Whether every filter of `margins` holds at every point of the current step of the loop
    /// over `index`.
    pub(super) fn step_is_full(&mut self, margins: &[Margin], index: Index) -> Value {
        let mut all = self.b.ins().iconst(types::I8, 1);
        for m in margins {
            let Some(smallest) = self.extreme_margin(m, index, false) else {
                return self.b.ins().iconst(types::I8, 0);
            };
            let holds = self.b.ins().icmp_imm_s(IntCC::SignedGreaterThanOrEqual, smallest, m.least);
            all = self.b.ins().band(all, holds);
        }
        all
    }

    /// Whether some filter of `margins` holds at no point of the current step.
    pub(super) fn step_is_empty(&mut self, margins: &[Margin], index: Index) -> Value {
        let mut any = self.b.ins().iconst(types::I8, 0);
        for m in margins {
            let Some(largest) = self.extreme_margin(m, index, true) else { continue };
            let fails = self.b.ins().icmp_imm_s(IntCC::SignedLessThan, largest, m.least);
            any = self.b.ins().bor(any, fails);
        }
        any
    }

    /// The smallest (or, with `largest`, the largest) margin over the step's box of points (see
    /// `Margin::extreme_terms`).
    fn extreme_margin(&mut self, m: &Margin, index: Index, largest: bool) -> Option<Value> {
        let mut total = self.b.ins().iconst(types::I64, m.margin.constant);
        for term in m.extreme_terms(index, largest)? {
            let term = match term {
                MarginTerm::Extent { rank, k } => self.b.ins().imul_imm_s(self.extents[rank.index()], k),
                MarginTerm::Coordinate { index: i, at, k } => {
                    let local = match at {
                        At::Current => self.index(i),
                        At::First => self.b.ins().iconst(types::I64, 0),
                        At::Last => self.b.ins().iadd_imm_s(self.extents[i.rank.index()], -1),
                    };
                    let global = self.b.ins().iadd(local, self.bases[i.rank.index()]);
                    self.b.ins().imul_imm_s(global, k)
                }
            };
            total = self.b.ins().iadd(total, term);
        }
        Some(total)
    }
}
