//! The element type each buffer of a thread kernel holds in memory: f16 and bf16 inputs and
//! outputs as 16-bit values, so that a GPU kernel moves half the bytes; arithmetic stays f32.
//!
//! An input is stored in its declared type: a kernel only reads it, widening each element on
//! load (exactly). An output declared f16 or bf16 is stored narrow where its one Einsum writes
//! each element once and nothing in the kernel reads it back, so that rounding happens only to
//! the final value, as the interpreter rounds it; any other output (one read by a later Einsum,
//! or a running tensor kept in the output) is stored as f32 and rounded by the caller. Scratch
//! buffers are f32. The `cpu` and `cpu-llvm` tiers keep every buffer f32 (their callers pass
//! f32 slices holding the rounded values). Needs no LLVM.

use crate::ir::*;
use crate::schedule::{BufferRole, LoopProgram, Slot};

/// Per buffer of `program`, the type a thread kernel stores its elements in.
pub fn storage_types(program: &LoopProgram) -> Vec<ElemType> {
    let c = &program.cascade;
    program
        .buffers
        .iter()
        .map(|buffer| match buffer.role {
            BufferRole::Input(_) => match c.tensor(buffer.tensor).kind {
                TensorKind::Input { elem } => elem,
                TensorKind::Defined { .. } => ElemType::F32,
            },
            BufferRole::Output(o) => {
                let elem = c.outputs[o].elem;
                let full = buffer.slots.iter().all(|s| *s == Slot::Full);
                if elem != ElemType::F32 && full && written_once(c, buffer.tensor) {
                    elem
                } else {
                    ElemType::F32
                }
            }
            BufferRole::Temp => ElemType::F32,
        })
        .collect()
}

/// Whether `tensor` is the target of exactly one Einsum, indexed by bare indices (each point
/// written once), and no Einsum reads it.
fn written_once(c: &Cascade, tensor: TensorId) -> bool {
    let writers: Vec<&Einsum> = c.einsums.iter().filter(|e| e.target == tensor).collect();
    let plain = writers.len() == 1 && writers[0].lhs.iter().all(|l| matches!(l, Lhs::Index(_)));
    let read = c.einsums.iter().any(|e| {
        let mut reads = e.body.accesses().iter().any(|(t, _)| *t == tensor);
        for cond in &e.filter {
            reads |= cond.lhs.accesses().iter().chain(cond.rhs.accesses().iter()).any(|(t, _)| *t == tensor);
        }
        reads
    });
    plain && !read
}

/// The bytes of one element stored as `elem`.
pub fn element_bytes(elem: ElemType) -> u64 {
    match elem {
        ElemType::F32 => 4,
        ElemType::F16 | ElemType::Bf16 => 2,
    }
}

/// The 16 bits of `x` (already representable, or rounded to nearest even) as `elem`.
pub fn narrow_bits(elem: ElemType, x: f32) -> u16 {
    match elem {
        ElemType::F16 => half::f16::from_f32(x).to_bits(),
        ElemType::Bf16 => half::bf16::from_f32(x).to_bits(),
        ElemType::F32 => unreachable!("f32 is not narrow"),
    }
}

/// The value of the 16 bits `bits` of an `elem`, as f32 (exact).
pub fn widen_bits(elem: ElemType, bits: u16) -> f32 {
    match elem {
        ElemType::F16 => half::f16::from_bits(bits).to_f32(),
        ElemType::Bf16 => half::bf16::from_bits(bits).to_f32(),
        ElemType::F32 => unreachable!("f32 is not narrow"),
    }
}
