//! Lowering the Loop IR to LLVM IR, as text: one lowering for the host CPU and for NVPTX.
//!
//! Needs: a `LoopProgram`. Guarantees: a module (LLVM 14 syntax, typed pointers) whose kernel
//! computes what the Cranelift kernel computes, with the same tables (see `cpu::codegen`): the
//! buffers' values and masks, the rank extents, every buffer's dimensions and strides, and each
//! rank's first coordinate. The body is one function, `@<name>.body`; the entry points around it
//! differ by `Abi`:
//! - `Abi::Cpu`: the body is the kernel, called once per chunk of a batch rank by the runtime;
//! - `Abi::Thread`: the kernel takes the global tables once and a thread count; each thread
//!   finds its point of the batch ranks from its block and its place in it (see `launch`) and
//!   calls the body on its own part of every buffer. On NVPTX the block and thread come from
//!   `ctaid.x` and `tid.x`; the host emulation's entry is one thread, called by the emulator.
//!   At each step of a top-level streamed loop the block stages the reads that `staging` finds
//!   into shared memory between two barriers; with a warp per point, the lanes split each
//!   outermost reduction and combine it with shuffles. The scratch buffers that `registers`
//!   picks are private arrays that LLVM promotes to registers: the loops over their fixed ranks
//!   are unrolled, and a step runs them only where every split pair is valid and every filter
//!   holds (`full_or_partial_step`), else the same code on global scratch.
//!
//! Arithmetic is f32; in a thread kernel the buffers that `storage` picks hold f16 or bf16 as
//! 16 bits, widened on load and rounded on store. A value travels with its definedness (an
//! `i1`); a read out of range reads nothing (its address is clamped and the result marked
//! undefined). Maxima and minima propagate NaN, as the interpreter's do.

use std::fmt::Write;

use super::staging::StagedRead;
use crate::ir::*;
use crate::math;
use crate::schedule::lanes::{reduction, Reduction};
use crate::schedule::walk::{IntOp, Walker};
use crate::schedule::{LoopProgram, Node, Slot};

/// The instruction set the module is for; it decides how `exp` and friends are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// The host CPU: `exp` inline (a polynomial that vectorizes), the other functions through the
    /// runtime's scalar helpers.
    Host,
    /// NVPTX: `exp` and `log` through the `ex2.approx`/`lg2.approx` instructions.
    Nvptx,
}

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abi {
    /// `void @<name>(float**, i8**, i64*, i64*, i64*, i64*)`, as the Cranelift kernels.
    Cpu,
    /// `void @<name>(float**, i8**, i64*, i64*, i64*, i64*, i64)`: values, masks, extents,
    /// dimensions, strides, the batch table, the thread count. On the host, a block size follows.
    Thread,
}

/// One f32 constant in LLVM's text form (the double with the same value, in hex).
pub(super) fn float(x: f32) -> String {
    format!("0x{:016X}", (x as f64).to_bits())
}

/// The module text of `program` for `flavor` and `abi`, with the kernel named `symbol`.
pub fn lower(program: &LoopProgram, flavor: Flavor, abi: Abi, symbol: &str) -> String {
    let mut module = String::new();
    let triple = match flavor {
        Flavor::Host => None,
        Flavor::Nvptx => Some("nvptx64-nvidia-cuda"),
    };
    writeln!(module, "; einfuse kernel `{}`", program.cascade.name).unwrap();
    if let Some(triple) = triple {
        writeln!(module, "target triple = \"{triple}\"").unwrap();
    }
    module.push('\n');
    // Steps that every filter admits whole run a variant without filters (on the CPU; in a thread
    // kernel, the steps that keep register buffers).
    let full_steps = crate::schedule::full_steps::plan(program);
    // The reads the threads of a block share through shared memory (thread kernels only).
    let staged = if abi == Abi::Thread { super::staging::staged_reads(program) } else { vec![] };
    let mut body = Lowering::new(program, flavor, abi, staged.clone());
    match abi {
        Abi::Cpu => body.full_steps = full_steps.as_ref(),
        Abi::Thread => body.thread_full_steps = full_steps.as_ref(),
    }
    body.function_body();
    let attributes = "alwaysinline nounwind";
    writeln!(
        module,
        "define internal void @\"{symbol}.body\"(float** noalias %values, i8** noalias %masks, i64* noalias %extents, \
         i64* noalias %dims, i64* noalias %strides, i64* noalias %bases, i64* noalias %batch, i64 %threads, \
         i64 %tid, i64 %ntid, float* %shared, i8* %sync, i64 %lane, i64 %lanes) {attributes} {{"
    )
    .unwrap();
    module.push_str("entry:\n");
    module.push_str(&body.allocas);
    module.push_str("  br label %start\nstart:\n");
    module.push_str(&body.out);
    module.push_str("  ret void\n}\n\n");
    match (abi, flavor) {
        (Abi::Cpu, _) => {
            writeln!(
                module,
                "define void @\"{symbol}\"(float** %values, i8** %masks, i64* %extents, i64* %dims, i64* %strides, \
                 i64* %bases) nounwind {{\n  call void @\"{symbol}.body\"(float** %values, i8** %masks, \
                 i64* %extents, i64* %dims, i64* %strides, i64* %bases, i64* null, i64 0, i64 0, i64 1, float* null, \
                 i8* null, i64 0, i64 1)\n  ret void\n}}\n"
            )
            .unwrap();
        }
        (Abi::Thread, _) => module.push_str(&thread_entry(program, flavor, symbol, &staged, &body.storage)),
    }
    module.push_str(&declarations(flavor));
    module.push_str(&body.constant_globals());
    if flavor == Flavor::Nvptx && !staged.is_empty() {
        // The staged tiles, in dynamic shared memory sized at launch.
        module.push_str("@einfuse_shared = external addrspace(3) global [0 x float], align 16\n");
    }
    if flavor == Flavor::Nvptx && abi == Abi::Thread {
        writeln!(
            module,
            "\n!nvvm.annotations = !{{!0}}\n!0 = !{{void (float**, i8**, i64*, i64*, i64*, i64*, i64)* \
             @\"{symbol}\", !\"kernel\", i32 1}}"
        )
        .unwrap();
    }
    module
}

/// The declarations of the intrinsics and helpers a flavor's modules may call.
pub(super) fn declarations(flavor: Flavor) -> String {
    let mut out = String::from(
        "declare float @llvm.sqrt.f32(float)\ndeclare float @llvm.fabs.f32(float)\n\
         declare float @llvm.floor.f32(float)\ndeclare float @llvm.fma.f32(float, float, float)\n",
    );
    if flavor == Flavor::Host {
        for w in HOST_WIDTHS {
            for (name, arity) in [("sqrt", 1), ("fabs", 1), ("floor", 1), ("fma", 3)] {
                let args = vec![format!("<{w} x float>"); arity].join(", ");
                writeln!(out, "declare <{w} x float> @llvm.{name}.v{w}f32({args})").unwrap();
            }
            writeln!(out, "declare i1 @llvm.vector.reduce.or.v{w}i1(<{w} x i1>)").unwrap();
        }
    }
    match flavor {
        Flavor::Host => out.push_str(
            "declare void @einfuse_barrier(i8*) nounwind\n\
             declare float @einfuse_shuffle_xor(i8*, float, i64, i64) nounwind\n\
             declare float @einfuse_logf(float) nounwind readnone\n\
             declare float @einfuse_tanhf(float) nounwind readnone\n\
             declare float @einfuse_sigmoidf(float) nounwind readnone\n\
             declare float @einfuse_softplusf(float) nounwind readnone\n\
             declare float @einfuse_f16_to_f32(i16) nounwind readnone\n\
             declare i16 @einfuse_f32_to_f16(float) nounwind readnone\n",
        ),
        Flavor::Nvptx => out.push_str(
            "declare float @llvm.nvvm.ex2.approx.f(float)\ndeclare float @llvm.nvvm.lg2.approx.f(float)\n\
             declare i32 @llvm.nvvm.read.ptx.sreg.tid.x()\ndeclare i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()\n\
             declare i32 @llvm.nvvm.read.ptx.sreg.ntid.x()\ndeclare void @llvm.nvvm.barrier0()\n\
             declare float @llvm.nvvm.shfl.sync.bfly.f32(i32, float, i32, i32)\n",
        ),
    }
    out
}

/// The thread entry: finds the thread's batch point, offsets every buffer to it (scratch buffers
/// to its own copy), and runs the body. The batch table holds the global extents of the batch
/// ranks, then per buffer one element stride per batch rank and one per thread, then the staged
/// reads' entries and the threads per point (see `launch::ThreadLayout`).
fn thread_entry(
    program: &LoopProgram,
    flavor: Flavor,
    symbol: &str,
    staged_reads: &[StagedRead],
    storage: &[ElemType],
) -> String {
    let c = &program.cascade;
    let batch = super::launch::batch_ranks(c);
    let k = batch.len();
    let nb = program.buffers.len();
    let nr = c.ranks.len();
    let mut s = String::new();
    let sync = match flavor {
        Flavor::Nvptx => "i8* null",
        Flavor::Host => "i8* %sync",
    };
    let per_thread = |s: &mut String, t: &str, t_scratch: &str| {
        // Decompose the thread into batch coordinates, the last batch rank fastest.
        for r in 0..nr {
            writeln!(
                s,
                "  %bz{r} = getelementptr [{0} x i64], [{0} x i64]* %bt, i64 0, i64 {r}\n  store i64 0, i64* %bz{r}\n  \
                 %bg{r} = getelementptr [{0} x i64], [{0} x i64]* %bt, i64 0, i64 {1}\n  store i64 0, i64* %bg{r}",
                (2 * nr).max(1),
                nr + r
            )
            .unwrap();
        }
        writeln!(s, "  %rest{k} = add i64 {t}, 0").unwrap();
        for j in (0..k).rev() {
            writeln!(
                s,
                "  %ep{j} = getelementptr i64, i64* %batch, i64 {j}\n  %e{j} = load i64, i64* %ep{j}\n  \
                 %b{j} = urem i64 %rest{0}, %e{j}\n  %rest{j} = udiv i64 %rest{0}, %e{j}\n  \
                 %bp{j} = getelementptr [{1} x i64], [{1} x i64]* %bt, i64 0, i64 {2}\n  store i64 %b{j}, i64* %bp{j}\n  \
                 %bq{j} = getelementptr [{1} x i64], [{1} x i64]* %bt, i64 0, i64 {3}\n  store i64 %b{j}, i64* %bq{j}",
                j + 1,
                (2 * nr).max(1),
                batch[j].index(),
                nr + batch[j].index()
            )
            .unwrap();
        }
        for (b, elem) in storage.iter().enumerate() {
            let row = k + b * (k + 1);
            for j in 0..=k {
                let coordinate = if j == k { t_scratch.to_string() } else { format!("%b{j}") };
                writeln!(
                    s,
                    "  %sp{b}_{j} = getelementptr i64, i64* %batch, i64 {}\n  %s{b}_{j} = load i64, i64* %sp{b}_{j}\n  \
                     %m{b}_{j} = mul i64 {coordinate}, %s{b}_{j}",
                    row + j
                )
                .unwrap();
            }
            let mut acc = format!("%m{b}_{k}");
            for j in 0..k {
                writeln!(s, "  %a{b}_{j} = add i64 {acc}, %m{b}_{j}").unwrap();
                acc = format!("%a{b}_{j}");
            }
            // A buffer of 16-bit elements is offset in its own elements.
            let offset = match elem {
                ElemType::F32 => format!("%vo{b} = getelementptr float, float* %vb{b}, i64 {acc}"),
                _ => format!(
                    "%vn{b} = bitcast float* %vb{b} to i16*\n  %vq{b} = getelementptr i16, i16* %vn{b}, i64 {acc}\n  \
                     %vo{b} = bitcast i16* %vq{b} to float*"
                ),
            };
            writeln!(
                s,
                "  %vin{b} = getelementptr float*, float** %values, i64 {b}\n  %vb{b} = load float*, float** %vin{b}\n  \
                 {offset}\n  \
                 %vs{b} = getelementptr [{nb} x float*], [{nb} x float*]* %vt, i64 0, i64 {b}\n  \
                 store float* %vo{b}, float** %vs{b}\n  \
                 %min{b} = getelementptr i8*, i8** %masks, i64 {b}\n  %mb{b} = load i8*, i8** %min{b}\n  \
                 %mo{b} = getelementptr i8, i8* %mb{b}, i64 {acc}\n  \
                 %ms{b} = getelementptr [{nb} x i8*], [{nb} x i8*]* %mt, i64 0, i64 {b}\n  \
                 store i8* %mo{b}, i8** %ms{b}"
            )
            .unwrap();
        }
        writeln!(
            s,
            "  %vtp = getelementptr [{nb} x float*], [{nb} x float*]* %vt, i64 0, i64 0\n  \
             %mtp = getelementptr [{nb} x i8*], [{nb} x i8*]* %mt, i64 0, i64 0\n  \
             %btp = getelementptr [{0} x i64], [{0} x i64]* %bt, i64 0, i64 0\n  \
             call void @\"{symbol}.body\"(float** %vtp, i8** %mtp, i64* %extents, i64* %dims, i64* %strides, i64* %btp, \
             i64* %batch, i64 %threads, i64 %tid, i64 %ntid, float* %shared, {sync}, i64 %warp.lane, i64 %lanes)",
            (2 * nr).max(1)
        )
        .unwrap();
    };
    let allocas = format!(
        "  %vt = alloca [{nb} x float*]\n  %mt = alloca [{nb} x i8*]\n  %bt = alloca [{} x i64]",
        (2 * nr).max(1)
    );
    let staged = !staged_reads.is_empty();
    let lanes_at = k + nb * (k + 1) + staged_reads.iter().map(|r| 1 + r.subscripts.len()).sum::<usize>();
    let header = match flavor {
        Flavor::Nvptx => format!(
                "define void @\"{symbol}\"(float** %values, i8** %masks, i64* %extents, i64* %dims, i64* %strides, \
                 i64* %batch, i64 %threads) nounwind {{\nentry:\n{allocas}\n  \
                 %tid32 = call i32 @llvm.nvvm.read.ptx.sreg.tid.x()\n  \
                 %ctaid32 = call i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()\n  \
                 %ntid32 = call i32 @llvm.nvvm.read.ptx.sreg.ntid.x()\n  \
                 %tid = zext i32 %tid32 to i64\n  %ctaid = zext i32 %ctaid32 to i64\n  %ntid = zext i32 %ntid32 to i64\n  {}",
                if staged {
                    "%shared = addrspacecast float addrspace(3)* getelementptr inbounds ([0 x float], \
                     [0 x float] addrspace(3)* @einfuse_shared, i64 0, i64 0) to float*"
                } else {
                    "%shared = getelementptr float, float* null, i64 0"
                }
            ),
        // One thread of the emulated grid; the emulator runs a block's threads side by side
        // where the kernel has barriers, else one after another.
        Flavor::Host => format!(
            "define void @\"{symbol}\"(float** %values, i8** %masks, i64* %extents, i64* %dims, i64* %strides, \
             i64* %batch, i64 %threads, i64 %ctaid, i64 %tid, i64 %ntid, float* %shared, i8* %sync) nounwind \
             {{\nentry:\n{allocas}"
        ),
    };
    s.push_str(&header);
    // The block's row of the lane rank, and the thread's place in it.
    let lane = if k == 0 { "1" } else { "%lane.extent" };
    if k > 0 {
        writeln!(
            s,
            "\n  %lane.at = getelementptr i64, i64* %batch, i64 {}\n  %lane.extent = load i64, i64* %lane.at",
            k - 1
        )
        .unwrap();
    } else {
        s.push('\n');
    }
    // With a warp per point, its lanes are the threads of one point.
    writeln!(
        s,
        "  %lanes.at = getelementptr i64, i64* %batch, i64 {lanes_at}\n  %lanes = load i64, i64* %lanes.at\n  \
         %points = udiv i64 %ntid, %lanes\n  %warp.lane = urem i64 %tid, %lanes\n  \
         %point.in.block = udiv i64 %tid, %lanes\n  \
         %lane.more = add i64 {lane}, %points\n  %lane.more1 = sub i64 %lane.more, 1\n  \
         %lane.blocks = udiv i64 %lane.more1, %points\n  %row = udiv i64 %ctaid, %lane.blocks\n  \
         %column = urem i64 %ctaid, %lane.blocks\n  %lane.first = mul i64 %column, %points\n  \
         %inner = add i64 %lane.first, %point.in.block\n  %live = icmp ult i64 %inner, {lane}\n  \
         %row.first = mul i64 %row, {lane}"
    )
    .unwrap();
    if staged {
        // Past the row's end a thread computes its last point again: every thread meets every barrier.
        writeln!(
            s,
            "  %lane.last = sub i64 {lane}, 1\n  %inner.kept = select i1 %live, i64 %inner, i64 %lane.last\n  \
             %t = add i64 %row.first, %inner.kept\n  br label %run\nrun:"
        )
        .unwrap();
    } else {
        writeln!(s, "  %t = add i64 %row.first, %inner\n  br i1 %live, label %run, label %done\nrun:").unwrap();
    }
    // Each lane of a point keeps its own copy of the scratch buffers.
    writeln!(s, "  %t.lanes = mul i64 %t, %lanes\n  %t.scratch = add i64 %t.lanes, %warp.lane").unwrap();
    per_thread(&mut s, "%t", "%t.scratch");
    writeln!(s, "  br label %done\ndone:\n  ret void\n}}\n").unwrap();
    s
}

/// Definedness: `None` when a value is defined wherever it is computed, else an `i1` (or, in
/// lanes, a `<W x i1>`).
type Def = Option<String>;

/// A scalar (1) or a vector of that many lanes, for the code both share.
#[derive(Clone, Copy)]
struct Ty(usize);

impl Ty {
    fn wrap(self, scalar: &str) -> String {
        if self.0 == 1 {
            scalar.to_string()
        } else {
            format!("<{} x {scalar}>", self.0)
        }
    }

    fn float(self) -> String {
        self.wrap("float")
    }

    fn int(self) -> String {
        self.wrap("i32")
    }

    fn bool(self) -> String {
        self.wrap("i1")
    }

    /// The intrinsics' type suffix: `f32` or `v16f32`.
    fn suffix(self) -> String {
        if self.0 == 1 {
            "f32".into()
        } else {
            format!("v{}f32", self.0)
        }
    }

    fn splat_literal(self, scalar_type: &str, value: &str) -> String {
        if self.0 == 1 {
            value.to_string()
        } else {
            format!("<{}>", vec![format!("{scalar_type} {value}"); self.0].join(", "))
        }
    }

    fn constant(self, x: f32) -> String {
        self.splat_literal("float", &float(x))
    }

    fn int_constant(self, x: i32) -> String {
        self.splat_literal("i32", &x.to_string())
    }
}

/// The vector widths the host flavour may use, for its intrinsic declarations.
const HOST_WIDTHS: [usize; 3] = [4, 8, 16];

/// The host's tier: its widest float vectors and its vector registers.
pub fn host_tier() -> crate::schedule::HostTier {
    #[cfg(target_arch = "x86_64")]
    let registers = if std::is_x86_feature_detected!("avx512f") { 32 } else { 16 };
    #[cfg(not(target_arch = "x86_64"))]
    let registers = 32;
    crate::schedule::HostTier { lanes: host_lanes(), registers }
}

/// The lanes of the host's widest float vectors: 16 with AVX-512, 8 with AVX, else 4.
pub fn host_lanes() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return 16;
        }
        if std::is_x86_feature_detected!("avx") {
            return 8;
        }
    }
    4
}

pub(super) struct Lowering<'a> {
    program: &'a LoopProgram,
    flavor: Flavor,
    /// The entry: thread kernels address their inputs and outputs with global strides and
    /// interleave their scratch buffers.
    abi: Abi,
    /// The batch ranks (thread kernels only).
    batch: Vec<RankId>,
    allocas: String,
    /// The vector constants of the math functions, by lanes and bits, each loaded once in the
    /// entry block (see `vector_constant`), and the scalar globals they load.
    vector_constants: std::collections::BTreeMap<(usize, u32), String>,
    /// The strides of inputs and outputs read from a host kernel's table, by buffer and
    /// position, each loaded once in the entry block.
    table_strides: std::collections::BTreeMap<(usize, usize), String>,
    out: String,
    next: usize,
    values: Vec<String>,
    masks: Vec<Option<String>>,
    extents: Vec<String>,
    /// Each rank's first global position in this call (what `Index` values and filters see).
    bases: Vec<String>,
    /// Each rank's first coordinate within the arrays of this call.
    array_bases: Vec<String>,
    /// Bound indices and the `i64` slot holding each.
    env: Vec<(Index, String)>,
    /// Float lanes of the register blocks (host only).
    lanes: usize,
    /// The register blocks' shape for the host's tier (`lanes::register_block`).
    block: crate::schedule::lanes::RegisterShape,
    /// Reduced inner indices of split pairs whose loops stop at the last valid point, so that
    /// their pairs need no check (see `reduced_loop`).
    bounded: Vec<Index>,
    /// The variant for steps that every filter admits whole (see `schedule::full_steps`).
    full_steps: Option<&'a crate::schedule::full_steps::FullSteps>,
    /// While a register block's epilogue is evaluated, the vector its reduction stands for (see
    /// `lanes::Reduction`).
    reduced: Option<String>,
    /// The same, for the steps of a thread kernel that keep register buffers (see
    /// `full_or_partial_step`).
    thread_full_steps: Option<&'a crate::schedule::full_steps::FullSteps>,
    /// The reads the threads of a block share through shared memory (thread kernels only).
    staged: Vec<StagedRead>,
    /// The staged reads of the current step, and where each reads from.
    views: Vec<View>,
    /// How many streamed loops enclose the code being generated.
    depth: usize,
    /// Whether the code being generated is inside a reduction that the lanes of a warp split.
    in_split: bool,
    /// Whether the next reduced loop is the outermost of such a reduction.
    split_next: bool,
    /// Per buffer, whether each thread keeps it in registers (thread kernels only; see
    /// `registers`).
    registers: Vec<bool>,
    /// The indices whose loops are unrolled in the Einsum being generated.
    unroll: Vec<Index>,
    /// A register buffer's global scratch (values and mask), for the steps that do not keep it
    /// in registers (see `full_or_partial_step`).
    scratch: Vec<Option<(String, Option<String>)>>,
    /// Whether every staged tile of the current step is in shared memory, so that the views
    /// read the tiles alone.
    shared_tiles: bool,
    /// Per buffer, the type its elements are stored in (see `storage`; f32 for the CPU entry).
    storage: Vec<ElemType>,
}

/// Where a staged read reads at the current step: the shared copy, or (where it did not fit)
/// global memory as any other read. Its element at coordinates `first + local` is at
/// `base + sum(local * stride)`, where `local` is what the indices that vary within the step add
/// to each subscript (`StagedRead::terms`): an unrolled index's part of the address is then a
/// constant. `safe` is an address to read instead where a coordinate is out of range.
struct View {
    read: usize,
    base: String,
    safe: String,
    strides: Vec<String>,
    /// Whether the tile is in shared memory, and there its start and strides (used alone in
    /// the steps that `full_or_partial_step` runs with every tile in shared memory).
    on: String,
    tile: String,
    tile_strides: Vec<String>,
    /// The box's first element in global memory, and the whole buffer (typed as it is stored:
    /// for 16-bit elements, `base` and `safe` are unused and `load_narrow_view` reads these).
    global: String,
    whole: String,
}

impl<'a> Lowering<'a> {
    pub(super) fn new(program: &'a LoopProgram, flavor: Flavor, abi: Abi, staged: Vec<StagedRead>) -> Self {
        Lowering {
            program,
            flavor,
            abi,
            batch: if abi == Abi::Thread { super::launch::batch_ranks(&program.cascade) } else { vec![] },
            allocas: String::new(),
            vector_constants: Default::default(),
            table_strides: Default::default(),
            out: String::new(),
            next: 0,
            values: vec![],
            masks: vec![],
            extents: vec![],
            bases: vec![],
            array_bases: vec![],
            env: vec![],
            // The host emulation of a thread kernel runs the GPU's code, one point at a time.
            lanes: if flavor == Flavor::Host && abi == Abi::Cpu { host_lanes() } else { 1 },
            block: crate::schedule::lanes::register_block(host_tier()),
            bounded: vec![],
            full_steps: None,
            reduced: None,
            thread_full_steps: None,
            staged,
            views: vec![],
            depth: 0,
            in_split: false,
            split_next: false,
            registers: if abi == Abi::Thread {
                super::registers::register_buffers(program)
            } else {
                vec![false; program.buffers.len()]
            },
            unroll: vec![],
            scratch: vec![],
            shared_tiles: false,
            storage: if abi == Abi::Thread {
                super::storage::storage_types(program)
            } else {
                vec![ElemType::F32; program.buffers.len()]
            },
        }
    }

    fn cascade(&self) -> &'a Cascade {
        &self.program.cascade
    }

    /// A fresh value name.
    pub(super) fn fresh(&mut self) -> String {
        self.next += 1;
        format!("%v{}", self.next)
    }

    /// A fresh block label (without the `%`).
    pub(super) fn label(&mut self, what: &str) -> String {
        self.next += 1;
        format!("{what}{}", self.next)
    }

    /// Emits `%x = <text>` and returns `%x`.
    pub(super) fn ins(&mut self, text: impl AsRef<str>) -> String {
        let v = self.fresh();
        writeln!(self.out, "  {v} = {}", text.as_ref()).unwrap();
        v
    }

    pub(super) fn emit(&mut self, text: impl AsRef<str>) {
        writeln!(self.out, "  {}", text.as_ref()).unwrap();
    }

    pub(super) fn start_block(&mut self, label: &str) {
        writeln!(self.out, "{label}:").unwrap();
    }

    /// A stack slot of `ty`, in the entry block (so that it becomes a register).
    pub(super) fn slot(&mut self, ty: &str) -> String {
        let v = self.fresh();
        writeln!(self.allocas, "  {v} = alloca {ty}").unwrap();
        v
    }

    /// `x` in every lane of `t`. In a host kernel's vectors, a value loaded once in the entry
    /// block from a global that LLVM may not fold (`externally_initialized`): a literal vector
    /// constant would be rematerialized in every loop that uses it (two instructions each time
    /// in the JIT's large code model, a quarter of an exponential's), where a value stays in a
    /// register or is read from the stack as an operand of the arithmetic.
    fn vector_constant(&mut self, t: Ty, x: f32) -> String {
        if t.0 == 1 || self.flavor != Flavor::Host || self.abi != Abi::Cpu {
            return t.constant(x);
        }
        if let Some(v) = self.vector_constants.get(&(t.0, x.to_bits())) {
            return v.clone();
        }
        let (scalar, one, splat) = (self.fresh(), self.fresh(), self.fresh());
        let f = t.float();
        writeln!(self.allocas, "  {scalar} = load float, float* @einfuse.k.{:08X}", x.to_bits()).unwrap();
        writeln!(self.allocas, "  {one} = insertelement {f} undef, float {scalar}, i32 0").unwrap();
        writeln!(self.allocas, "  {splat} = shufflevector {f} {one}, {f} undef, <{} x i32> zeroinitializer", t.0)
            .unwrap();
        self.vector_constants.insert((t.0, x.to_bits()), splat.clone());
        splat
    }

    /// The globals `vector_constant` loads.
    pub(super) fn constant_globals(&self) -> String {
        let bits: std::collections::BTreeSet<u32> = self.vector_constants.keys().map(|(_, b)| *b).collect();
        bits.iter()
            .map(|b| {
                format!(
                    "@einfuse.k.{b:08X} = internal externally_initialized global float {}\n",
                    float(f32::from_bits(*b))
                )
            })
            .collect()
    }

    fn load_i64(&mut self, table: &str, at: usize) -> String {
        let p = self.ins(format!("getelementptr i64, i64* {table}, i64 {at}"));
        self.ins(format!("load i64, i64* {p}"))
    }

    fn function_body(&mut self) {
        let c = self.cascade();
        for r in 0..c.ranks.len() {
            // A thread kernel's body sees each batch rank as one point (see `launch`).
            let e = if self.batch.contains(&RankId::new(r)) { "1".to_string() } else { self.load_i64("%extents", r) };
            self.extents.push(e);
            let b = self.load_i64("%bases", r);
            self.array_bases.push(b);
            let b = self.load_i64("%bases", c.ranks.len() + r);
            self.bases.push(b);
        }
        for (b, buffer) in self.program.buffers.iter().enumerate() {
            self.scratch.push(None);
            if self.registers[b] {
                let p = self.ins(format!("getelementptr float*, float** %values, i64 {b}"));
                let v = self.ins(format!("load float*, float** {p}"));
                let mask = buffer.masked.then(|| {
                    let p = self.ins(format!("getelementptr i8*, i8** %masks, i64 {b}"));
                    self.ins(format!("load i8*, i8** {p}"))
                });
                self.scratch[b] = Some((v, mask));
                // A private array in the entry block, which LLVM promotes to registers where
                // every offset is constant.
                let size = super::registers::private_size(self.program, b).expect("a register buffer has a size");
                let array = self.fresh();
                writeln!(self.allocas, "  {array} = alloca [{size} x float], align 16").unwrap();
                let v = self
                    .ins(format!("getelementptr inbounds [{size} x float], [{size} x float]* {array}, i64 0, i64 0"));
                self.values.push(v);
                // The mask as the bits of one integer (a register buffer has at most 64 points).
                let mask = buffer.masked.then(|| {
                    let bits = self.fresh();
                    writeln!(self.allocas, "  {bits} = alloca i64").unwrap();
                    bits
                });
                self.masks.push(mask);
                continue;
            }
            let p = self.ins(format!("getelementptr float*, float** %values, i64 {b}"));
            let mut v = self.ins(format!("load float*, float** {p}"));
            if self.storage[b] != ElemType::F32 {
                v = self.ins(format!("bitcast float* {v} to i16*"));
            }
            self.values.push(v);
            let mask = if buffer.masked {
                let p = self.ins(format!("getelementptr i8*, i8** %masks, i64 {b}"));
                Some(self.ins(format!("load i8*, i8** {p}")))
            } else {
                None
            };
            self.masks.push(mask);
        }
        let body = self.program.body.clone();
        self.nodes(&body);
    }

    /// The extent of position `d` of buffer `b` as the body sees it (batch ranks as 1 in a
    /// thread kernel). Computed from the extents rather than read from the tables, so that
    /// equal sizes are one value and the GPU kernels keep few registers.
    fn dim(&mut self, b: usize, d: usize) -> String {
        let tensor = self.cascade().tensor(self.program.buffers[b].tensor);
        let extent = self.extents[tensor.ranks[d].index()].clone();
        match tensor.kind {
            TensorKind::Defined { iterative: Some(k) } if k == d => self.ins(format!("add i64 {extent}, 1")),
            _ => extent,
        }
    }

    /// The element stride of position `d` of buffer `b`: row-major over the stored extents; in a
    /// thread kernel, over the global extents for inputs and outputs, and times the thread count
    /// for scratch buffers.
    fn stride(&mut self, b: usize, d: usize) -> String {
        if self.registers[b] {
            return super::registers::private_strides(self.program, b)[d].to_string();
        }
        let buffer = &self.program.buffers[b];
        let tensor = self.cascade().tensor(buffer.tensor);
        let scratch = buffer.role == crate::schedule::BufferRole::Temp;
        if self.abi == Abi::Cpu && !scratch && d + 1 < tensor.ranks.len() {
            // A host call may read and write a box of a larger array in place: the caller's
            // strides, from the table (the last position is contiguous in every array).
            // Loaded once, in the entry block, so that the value dominates every use.
            if let Some(v) = self.table_strides.get(&(b, d)) {
                return v.clone();
            }
            let at = crate::schedule::layout::table_offsets(self.program)[b] + d;
            let (p, v) = (self.fresh(), self.fresh());
            writeln!(self.allocas, "  {p} = getelementptr i64, i64* %strides, i64 {at}").unwrap();
            writeln!(self.allocas, "  {v} = load i64, i64* {p}").unwrap();
            self.table_strides.insert((b, d), v.clone());
            return v;
        }
        let mut factors: Vec<String> = Vec::new();
        for later in d + 1..tensor.ranks.len() {
            let rank = tensor.ranks[later];
            let batch_position = self.batch.iter().position(|r| *r == rank);
            let dim = match (self.abi, scratch, batch_position) {
                (Abi::Thread, false, Some(j)) => {
                    let p = self.ins(format!("getelementptr i64, i64* %batch, i64 {j}"));
                    self.ins(format!("load i64, i64* {p}"))
                }
                _ => self.dim(b, later),
            };
            let stored = match buffer.slots[later] {
                Slot::Full => dim,
                Slot::Current => continue,
                Slot::Alternate => {
                    let small = self.ins(format!("icmp slt i64 {dim}, 2"));
                    self.ins(format!("select i1 {small}, i64 {dim}, i64 2"))
                }
            };
            factors.push(stored);
        }
        if self.abi == Abi::Thread && scratch {
            factors.push("%threads".to_string());
        }
        let mut product = "1".to_string();
        for f in factors {
            product = if product == "1" { f } else { self.ins(format!("mul i64 {product}, {f}")) };
        }
        product
    }

    fn nodes(&mut self, body: &[Node]) {
        for node in body {
            match node {
                Node::Loop { index, body, skip } => {
                    let extent = self.extents[index.rank.index()].clone();
                    let staged: Vec<usize> = if self.depth == 0 {
                        (0..self.staged.len()).filter(|j| self.staged[*j].step == *index).collect()
                    } else {
                        vec![]
                    };
                    self.depth += 1;
                    let full = self.full_steps.and_then(|f| {
                        f.margins.iter().find(|(i, _)| i == index).map(|(_, margins)| (&f.variant, margins))
                    });
                    self.for_loop(*index, "0", &extent, &mut |g| {
                        if !staged.is_empty() {
                            g.stage(&staged);
                        }
                        let join = g.label("stepped");
                        if let Some((variant, margins)) = full {
                            // A step the skippable tensor's filter empties: carried over first.
                            let empty: Vec<_> = match skip {
                                Some(tensor) => margins.iter().filter(|m| m.tensor == *tensor).cloned().collect(),
                                None => vec![],
                            };
                            if !empty.is_empty() {
                                let none = g.step_is_empty(&empty, *index);
                                let (carry, compute) = (g.label("carry"), g.label("compute"));
                                g.emit(format!("br i1 {none}, label %{carry}, label %{compute}"));
                                g.start_block(&carry);
                                g.carry_recurrences(*index, body);
                                g.emit(format!("br label %{join}"));
                                g.start_block(&compute);
                            }
                            let whole = g.step_is_full(margins, *index);
                            let (fast, slow) = (g.label("full"), g.label("partial"));
                            g.emit(format!("br i1 {whole}, label %{fast}, label %{slow}"));
                            g.start_block(&fast);
                            g.with_program(variant, &mut |g| g.nodes(body));
                            g.emit(format!("br label %{join}"));
                            g.start_block(&slow);
                        }
                        g.full_or_partial_step(*index, body, *skip);
                        g.emit(format!("br label %{join}"));
                        g.start_block(&join);
                        g.views.clear();
                        g.rotate_running(*index);
                    });
                    self.depth -= 1;
                }
                Node::Compute { einsum } => self.compute(*einsum),
            }
        }
    }

    /// One step of the top-level loop over `index`, whose Einsums are `body`. Where the step
    /// keeps register buffers, a step whose split pairs are all valid (every step but a ragged
    /// last one) and whose filters admit every point (see `schedule::full_steps`) runs with neither
    /// checked, so that the unrolled points need no conditions and no masks; the other steps run
    /// with the step's register buffers in global scratch and nothing unrolled, as a kernel
    /// without register buffers (the same values).
    fn full_or_partial_step(&mut self, index: Index, body: &[Node], skip: Option<TensorId>) {
        let local: Vec<usize> = (0..self.registers.len())
            .filter(|b| self.registers[*b] && super::registers::place(self.program, *b) == Some(Some(index)))
            .collect();
        let pairs: Vec<(RankId, RankId)> = self
            .cascade()
            .split_pairs()
            .into_iter()
            .filter(|(t, _, _)| *t == index.rank)
            .map(|(_, i, w)| (i, w))
            .collect();
        let full = self.thread_full_steps.and_then(|f| {
            f.margins.iter().find(|(i, _)| *i == index).map(|(_, margins)| (&f.variant, margins.clone()))
        });
        let step = |g: &mut Self| match skip {
            Some(tensor) => g.skippable_step(index, body, tensor),
            None => g.nodes(body),
        };
        if local.is_empty() || (pairs.is_empty() && full.is_none()) {
            step(self);
            return;
        }
        let mut whole = "true".to_string();
        for (inner, extent) in &pairs {
            let t = self.index(index);
            let n = self.extents[inner.index()].clone();
            let next = self.ins(format!("add i64 {t}, 1"));
            let end = self.ins(format!("mul i64 {next}, {n}"));
            let extent = self.extents[extent.index()].clone();
            let inside = self.ins(format!("icmp sle i64 {end}, {extent}"));
            whole = self.ins(format!("and i1 {whole}, {inside}"));
        }
        if let Some((_, margins)) = &full {
            let admitted = self.step_is_full(margins, index);
            whole = self.ins(format!("and i1 {whole}, {admitted}"));
        }
        for view in 0..self.views.len() {
            let on = self.views[view].on.clone();
            whole = self.ins(format!("and i1 {whole}, {on}"));
        }
        let (fast, slow, join) = (self.label("full.tile"), self.label("partial.tile"), self.label("tile.done"));
        self.emit(format!("br i1 {whole}, label %{fast}, label %{slow}"));
        self.start_block(&fast);
        let bounded = self.bounded.len();
        self.bounded.extend(pairs.iter().map(|(inner, _)| Index { rank: *inner, primes: index.primes }));
        self.shared_tiles = true;
        match full {
            // A full step is never empty: no skipping.
            Some((variant, _)) => self.with_program(variant, &mut |g| g.nodes(body)),
            None => step(self),
        }
        self.shared_tiles = false;
        self.bounded.truncate(bounded);
        self.emit(format!("br label %{join}"));
        self.start_block(&slow);
        let saved = (self.values.clone(), self.masks.clone());
        for &b in &local {
            let (values, mask) = self.scratch[b].clone().expect("a register buffer keeps its scratch");
            self.registers[b] = false;
            self.values[b] = values;
            self.masks[b] = mask;
        }
        step(self);
        for &b in &local {
            self.registers[b] = true;
        }
        (self.values, self.masks) = saved;
        self.emit(format!("br label %{join}"));
        self.start_block(&join);
    }

    /// The end of a step of the loop over `index`: each running tensor that a thread keeps in
    /// registers moves its next iterate into the current one (see `registers::running_loop`).
    fn rotate_running(&mut self, index: Index) {
        for b in 0..self.registers.len() {
            if !self.registers[b] || super::registers::running_loop(self.program, b) != Some(index) {
                continue;
            }
            let current = self.values[b].clone();
            let next = self.ins(format!("getelementptr inbounds float, float* {current}, i64 1"));
            let x = self.ins(format!("load float, float* {next}"));
            self.emit(format!("store float {x}, float* {current}"));
            if let Some(mask) = self.masks[b].clone() {
                let bits = self.ins(format!("load i64, i64* {mask}"));
                let next = self.ins(format!("lshr i64 {bits}, 1"));
                self.emit(format!("store i64 {next}, i64* {mask}"));
            }
        }
    }

    /// A block-wide barrier: every thread of the block gets here before any goes on.
    fn barrier(&mut self) {
        match self.flavor {
            Flavor::Nvptx => self.emit("call void @llvm.nvvm.barrier0()"),
            Flavor::Host => self.emit("call void @einfuse_barrier(i8* %sync)"),
        }
    }

    /// The start of a step with staged reads: the block copies each read's box for the step
    /// into shared memory (where the launch gave it room) and sets up its view.
    fn stage(&mut self, reads: &[usize]) {
        let c = self.cascade();
        let k = super::launch::batch_ranks(c).len();
        let nb = self.program.buffers.len();
        // No thread may still read the previous step's tiles.
        self.barrier();
        for &j in reads {
            let read = self.staged[j].clone();
            let at = k + nb * (k + 1) + self.staged[..j].iter().map(|r| 1 + r.subscripts.len()).sum::<usize>();
            let offset = self.load_i64("%batch", at);
            let extents: Vec<String> =
                (0..read.subscripts.len()).map(|d| self.load_i64("%batch", at + 1 + d)).collect();
            // Row-major strides of the box, and its size.
            let mut box_strides = vec!["1".to_string(); extents.len()];
            for d in (0..extents.len().saturating_sub(1)).rev() {
                box_strides[d] = self.ins(format!("mul i64 {}, {}", box_strides[d + 1], extents[d + 1]));
            }
            let size = match extents.first() {
                Some(n) => self.ins(format!("mul i64 {}, {n}", box_strides[0])),
                None => "1".to_string(),
            };
            // In shared memory the box's rows are padded to a multiple of 4 floats and the tile
            // starts at a multiple of 4 (see `launch`), so that 4 neighbouring elements of a row
            // are one aligned 16-byte read; the masks make the alignment visible to LLVM.
            let mut tile_strides = vec!["1".to_string(); extents.len()];
            for d in (0..extents.len().saturating_sub(1)).rev() {
                let next = if d + 2 == extents.len() {
                    let padded = self.ins(format!("add i64 {}, 3", extents[d + 1]));
                    self.ins(format!("and i64 {padded}, -4"))
                } else {
                    extents[d + 1].clone()
                };
                tile_strides[d] = self.ins(format!("mul i64 {}, {next}", tile_strides[d + 1]));
            }
            // The box's first point: the subscripts with every index but the streamed one at 0.
            let zero = self.slot("i64");
            self.emit(format!("store i64 0, i64* {zero}"));
            let mut bound = 0;
            for s in &read.subscripts {
                s.for_each_index(&mut |i| {
                    if i != read.step && !self.env[self.env.len() - bound..].iter().any(|(b, _)| *b == i) {
                        self.env.push((i, zero.clone()));
                        bound += 1;
                    }
                });
            }
            let first = self.coordinates(read.tensor, &read.subscripts);
            self.env.truncate(self.env.len() - bound);
            let buffer = read.tensor.index();
            let on = self.ins(format!("icmp sge i64 {offset}, 0"));
            let aligned = self.ins(format!("and i64 {offset}, -4"));
            let tile = self.ins(format!("getelementptr inbounds float, float* %shared, i64 {aligned}"));
            let (copy, copied) = (self.label("copy"), self.label("copied"));
            self.emit(format!("br i1 {on}, label %{copy}, label %{copied}"));
            self.start_block(&copy);
            // Each thread copies every `ntid`-th element of the box, from `tid` on.
            self.counted_loop("%tid", &size, "%ntid", &mut |g, element| {
                let e = g.ins(format!("load i64, i64* {element}"));
                let mut coords = Vec::new();
                let mut at = "0".to_string();
                for d in 0..extents.len() {
                    let q = g.ins(format!("udiv i64 {e}, {}", box_strides[d]));
                    let within = g.ins(format!("urem i64 {q}, {}", extents[d]));
                    coords.push(g.ins(format!("add i64 {}, {within}", first[d])));
                    let term = g.ins(format!("mul i64 {within}, {}", tile_strides[d]));
                    at = g.ins(format!("add i64 {at}, {term}"));
                }
                let (from, _) = g.offset(buffer, &coords, &vec![false; coords.len()]);
                let base = g.values[buffer].clone();
                let source = g.element_address(buffer, &base, &from);
                let x = g.load_element(buffer, &source);
                let target = g.ins(format!("getelementptr inbounds float, float* {tile}, i64 {at}"));
                g.emit(format!("store float {x}, float* {target}"));
            });
            self.emit(format!("br label %{copied}"));
            self.start_block(&copied);
            let whole = self.values[buffer].clone();
            let mut at_first = "0".to_string();
            let mut strides = vec![];
            for (d, first) in first.iter().enumerate() {
                let global = self.stride(buffer, d);
                let term = self.ins(format!("mul i64 {first}, {global}"));
                at_first = self.ins(format!("add i64 {at_first}, {term}"));
                strides.push(self.ins(format!("select i1 {on}, i64 {}, i64 {global}", tile_strides[d])));
            }
            let ty = self.stored_type(buffer);
            let global = self.ins(format!("getelementptr {ty}, {ty}* {whole}, i64 {at_first}"));
            // A tile of 16-bit elements is widened in shared memory, so that its reads from
            // there and from global memory have different types: `load_view` picks one.
            let (base, safe) = match self.storage[buffer] {
                ElemType::F32 => (
                    self.ins(format!("select i1 {on}, float* {tile}, float* {global}")),
                    self.ins(format!("select i1 {on}, float* {tile}, float* {whole}")),
                ),
                _ => (String::new(), String::new()),
            };
            self.views.push(View { read: j, base, safe, strides, on, tile, tile_strides, global, whole });
        }
        // Every tile is whole before any thread reads it.
        self.barrier();
    }

    /// A staged read through its view: in range as any read (the values outside the input are
    /// undefined), its element at `coords` less the box's first point.
    fn load_view(&mut self, view: usize, tensor: TensorId, coords: &[String], always_inside: &[bool]) -> (String, Def) {
        let buffer = tensor.index();
        let mut inside: Def = None;
        let mut offset = "0".to_string();
        let terms = self.staged[self.views[view].read].terms.clone();
        for (d, c) in coords.iter().enumerate() {
            if !always_inside[d] {
                let both = self.in_range(buffer, d, c);
                inside = self.and_def(inside, Some(both));
            }
            let mut local = "0".to_string();
            for (index, k) in &terms[d] {
                let i = self.index(*index);
                let term = if *k == 1 { i } else { self.ins(format!("mul i64 {i}, {k}")) };
                local = self.ins(format!("add i64 {local}, {term}"));
            }
            let stride = match self.shared_tiles {
                true => self.views[view].tile_strides[d].clone(),
                false => self.views[view].strides[d].clone(),
            };
            let term = self.ins(format!("mul i64 {local}, {stride}"));
            offset = self.ins(format!("add i64 {offset}, {term}"));
        }
        let narrow = self.storage[buffer] != ElemType::F32;
        let (base, safe) = match self.shared_tiles {
            true => (self.views[view].tile.clone(), self.views[view].tile.clone()),
            false if narrow => return (self.load_narrow_view(view, buffer, &offset, &inside), inside),
            false => (self.views[view].base.clone(), self.views[view].safe.clone()),
        };
        let mut address = self.ins(format!("getelementptr inbounds float, float* {base}, i64 {offset}"));
        if let Some(check) = &inside {
            address = self.ins(format!("select i1 {check}, float* {address}, float* {safe}"));
        }
        (self.ins(format!("load float, float* {address}")), inside)
    }

    /// A view's element at `offset` (in the strides its tile uses at this step) where the buffer
    /// holds 16-bit elements: from the widened tile in shared memory, or from global memory.
    fn load_narrow_view(&mut self, view: usize, buffer: usize, offset: &str, inside: &Def) -> String {
        let View { on, tile, global, whole, .. } = &self.views[view];
        let (on, tile, global, whole) = (on.clone(), tile.clone(), global.clone(), whole.clone());
        let (shared, from_global, join) = (self.label("tileread"), self.label("globalread"), self.label("read"));
        self.emit(format!("br i1 {on}, label %{shared}, label %{from_global}"));
        self.start_block(&shared);
        let mut address = self.ins(format!("getelementptr inbounds float, float* {tile}, i64 {offset}"));
        if let Some(check) = inside {
            address = self.ins(format!("select i1 {check}, float* {address}, float* {tile}"));
        }
        let x = self.ins(format!("load float, float* {address}"));
        self.emit(format!("br label %{join}"));
        self.start_block(&from_global);
        let mut address = self.element_address(buffer, &global, offset);
        if let Some(check) = inside {
            address = self.ins(format!("select i1 {check}, i16* {address}, i16* {whole}"));
        }
        let y = self.load_element(buffer, &address);
        self.emit(format!("br label %{join}"));
        self.start_block(&join);
        self.ins(format!("phi float [ {x}, %{shared} ], [ {y}, %{from_global} ]"))
    }

    /// The LLVM type of buffer `buffer`'s elements in memory: `float`, or `i16` for f16 and bf16.
    fn stored_type(&self, buffer: usize) -> &'static str {
        match self.storage[buffer] {
            ElemType::F32 => "float",
            ElemType::F16 | ElemType::Bf16 => "i16",
        }
    }

    /// The address of the element at `offset` from `base`, a pointer into buffer `buffer`.
    fn element_address(&mut self, buffer: usize, base: &str, offset: &str) -> String {
        let ty = self.stored_type(buffer);
        self.ins(format!("getelementptr inbounds {ty}, {ty}* {base}, i64 {offset}"))
    }

    /// The element of buffer `buffer` at `address`, as f32 (widened exactly from f16 or bf16).
    fn load_element(&mut self, buffer: usize, address: &str) -> String {
        match self.storage[buffer] {
            ElemType::F32 => self.ins(format!("load float, float* {address}")),
            ElemType::Bf16 => {
                // The bf16 bits are the high half of the f32 with the same value.
                let bits = self.ins(format!("load i16, i16* {address}"));
                let wide = self.ins(format!("zext i16 {bits} to i32"));
                let high = self.ins(format!("shl i32 {wide}, 16"));
                self.ins(format!("bitcast i32 {high} to float"))
            }
            ElemType::F16 => {
                let bits = self.ins(format!("load i16, i16* {address}"));
                match self.flavor {
                    Flavor::Nvptx => {
                        let h = self.ins(format!("bitcast i16 {bits} to half"));
                        self.ins(format!("fpext half {h} to float"))
                    }
                    Flavor::Host => self.ins(format!("call float @einfuse_f16_to_f32(i16 {bits})")),
                }
            }
        }
    }

    /// Stores the f32 `value` at `address` in buffer `buffer`, rounded to nearest even where the
    /// buffer holds f16 or bf16.
    fn store_element(&mut self, buffer: usize, value: &str, address: &str) {
        match self.narrow(self.storage[buffer], value) {
            None => self.emit(format!("store float {value}, float* {address}")),
            Some(bits) => self.emit(format!("store i16 {bits}, i16* {address}")),
        }
    }

    /// The f32 `value` rounded to nearest even as the bits of an f16 or bf16 (an `i16`); `None`
    /// for f32.
    pub(super) fn narrow(&mut self, elem: ElemType, value: &str) -> Option<String> {
        Some(match elem {
            ElemType::F32 => return None,
            ElemType::Bf16 => {
                // Round the low 16 bits away, ties to even; a NaN stays a (quiet) NaN.
                let x = self.ins(format!("bitcast float {value} to i32"));
                let high = self.ins(format!("lshr i32 {x}, 16"));
                let odd = self.ins(format!("and i32 {high}, 1"));
                let half_up = self.ins(format!("add i32 {x}, 32767"));
                let rounded = self.ins(format!("add i32 {half_up}, {odd}"));
                let kept = self.ins(format!("lshr i32 {rounded}, 16"));
                let quiet = self.ins(format!("or i32 {high}, 64"));
                let nan = self.ins(format!("fcmp uno float {value}, 0.0"));
                let chosen = self.ins(format!("select i1 {nan}, i32 {quiet}, i32 {kept}"));
                self.ins(format!("trunc i32 {chosen} to i16"))
            }
            ElemType::F16 => match self.flavor {
                Flavor::Nvptx => {
                    let h = self.ins(format!("fptrunc float {value} to half"));
                    self.ins(format!("bitcast half {h} to i16"))
                }
                Flavor::Host => self.ins(format!("call i16 @einfuse_f32_to_f16(float {value})")),
            },
        })
    }

    /// One step of the loop over `index` that may be empty (see `crate::skip`): the body up to
    /// the Einsum writing `skip`, then the rest only where `skip` has a defined point at this
    /// step (among the points this call or thread computes), else every running tensor's current
    /// iterate copied into its next slot.
    fn skippable_step(&mut self, index: Index, body: &[Node], skip: TensorId) {
        let c = self.cascade();
        let writes =
            |n: &Node, t: TensorId| matches!(n, Node::Compute { einsum } if c.einsums[einsum.index()].target == t);
        let at = body.iter().position(|n| writes(n, skip)).expect("the skipped tensor is written in the loop");
        self.nodes(&body[..=at]);
        let Node::Compute { einsum: filtered } = &body[at] else { unreachable!("found above") };
        let filtered = &c.einsums[filtered.index()];
        let seen = self.slot("i8");
        self.emit(format!("store i8 0, i8* {seen}"));
        assert!(self.masks[skip.index()].is_some(), "a skipped tensor has a mask");
        self.each_point(filtered, &mut |g, coords| {
            let always = vec![true; coords.len()];
            let (offset, _) = g.offset(skip.index(), coords, &always);
            let flag = g.read_mask(skip.index(), &offset);
            let flag = g.ins(format!("zext i1 {flag} to i8"));
            let so_far = g.ins(format!("load i8, i8* {seen}"));
            let both = g.ins(format!("or i8 {so_far}, {flag}"));
            g.emit(format!("store i8 {both}, i8* {seen}"));
        });
        let seen = self.ins(format!("load i8, i8* {seen}"));
        let any = self.ins(format!("icmp ne i8 {seen}, 0"));
        let (rest, carry, join) = (self.label("step"), self.label("carry"), self.label("stepped"));
        self.emit(format!("br i1 {any}, label %{rest}, label %{carry}"));
        self.start_block(&rest);
        self.nodes(&body[at + 1..]);
        self.emit(format!("br label %{join}"));
        self.start_block(&carry);
        self.carry_recurrences(index, &body[at + 1..]);
        self.emit(format!("br label %{join}"));
        self.start_block(&join);
    }

    /// Copies the current iterate of every recurrence of `body` into its next slot.
    fn carry_recurrences(&mut self, index: Index, body: &[Node]) {
        let c = self.cascade();
        for node in body {
            let Node::Compute { einsum } = node else { continue };
            let einsum = &c.einsums[einsum.index()];
            if einsum.recurrence_index() != Some(index) {
                continue;
            }
            let buffer = einsum.target.index();
            let position = einsum.lhs.iter().position(|l| *l == Lhs::Next(index)).expect("a recurrence");
            self.each_point(einsum, &mut |g, coords| {
                let always = vec![true; coords.len()];
                let mut current = coords.to_vec();
                current[position] = g.index(index);
                let (from, _) = g.offset(buffer, &current, &always);
                let (to, _) = g.offset(buffer, coords, &always);
                let base = g.values[buffer].clone();
                let source = g.ins(format!("getelementptr inbounds float, float* {base}, i64 {from}"));
                let target = g.ins(format!("getelementptr inbounds float, float* {base}, i64 {to}"));
                let x = g.ins(format!("load float, float* {source}"));
                g.emit(format!("store float {x}, float* {target}"));
                if let Some(mask) = g.masks[buffer].clone() {
                    let source = g.ins(format!("getelementptr inbounds i8, i8* {mask}, i64 {from}"));
                    let target = g.ins(format!("getelementptr inbounds i8, i8* {mask}, i64 {to}"));
                    let m = g.ins(format!("load i8, i8* {source}"));
                    g.emit(format!("store i8 {m}, i8* {target}"));
                }
            });
        }
    }

    /// Generates `emit` as `variant` (the same buffers, fewer masks) says: a buffer without a
    /// mask there is treated as wholly defined.
    fn with_program(&mut self, variant: &'a LoopProgram, emit: &mut dyn FnMut(&mut Self)) {
        let (program, masks) = (self.program, self.masks.clone());
        self.masks = crate::schedule::full_steps::variant_masks(&masks, variant);
        self.program = variant;
        emit(self);
        self.program = program;
        self.masks = masks;
    }

    /// Whether every filter of `margins` holds at every point of the current step.
    fn step_is_full(&mut self, margins: &[crate::schedule::full_steps::Margin], index: Index) -> String {
        let mut all = "true".to_string();
        for m in margins {
            let Some(smallest) = self.extreme_margin(m, index, false) else { return "false".into() };
            let holds = self.ins(format!("icmp sge i64 {smallest}, {}", m.least));
            all = self.ins(format!("and i1 {all}, {holds}"));
        }
        all
    }

    /// Whether some filter of `margins` holds at no point of the current step.
    fn step_is_empty(&mut self, margins: &[crate::schedule::full_steps::Margin], index: Index) -> String {
        let mut any = "false".to_string();
        for m in margins {
            let Some(largest) = self.extreme_margin(m, index, true) else { continue };
            let fails = self.ins(format!("icmp slt i64 {largest}, {}", m.least));
            any = self.ins(format!("or i1 {any}, {fails}"));
        }
        any
    }

    /// The smallest (or largest) margin over the step's box of points (see
    /// `schedule::full_steps::Margin::extreme_terms`).
    fn extreme_margin(
        &mut self,
        m: &crate::schedule::full_steps::Margin,
        index: Index,
        largest: bool,
    ) -> Option<String> {
        use crate::schedule::full_steps::{At, MarginTerm};
        let mut total = m.margin.constant.to_string();
        for term in m.extreme_terms(index, largest)? {
            let term = match term {
                MarginTerm::Extent { rank, k } => {
                    let extent = self.extents[rank.index()].clone();
                    self.ins(format!("mul i64 {extent}, {k}"))
                }
                MarginTerm::Coordinate { index: i, at, k } => {
                    let local = match at {
                        At::Current => self.index(i),
                        At::First => "0".to_string(),
                        At::Last => {
                            let extent = self.extents[i.rank.index()].clone();
                            self.ins(format!("sub i64 {extent}, 1"))
                        }
                    };
                    let base = self.bases[i.rank.index()].clone();
                    let global = self.ins(format!("add i64 {local}, {base}"));
                    self.ins(format!("mul i64 {global}, {k}"))
                }
            };
            total = self.ins(format!("add i64 {total}, {term}"));
        }
        Some(total)
    }

    /// Runs `each` at every point of `einsum`'s left-hand side not bound by an enclosing loop,
    /// with the point's coordinates (an iterate's next slot for `Lhs::Next`).
    fn each_point(&mut self, einsum: &Einsum, each: &mut dyn FnMut(&mut Self, &[String])) {
        let free: Vec<Index> = einsum.lhs_indices().filter(|i| !self.env.iter().any(|(bound, _)| bound == i)).collect();
        let unroll = self.unrolled_indices(einsum);
        let outer = std::mem::replace(&mut self.unroll, unroll);
        self.point_loops(einsum, &free, each);
        self.unroll = outer;
    }

    /// The indices to unroll in `einsum` (see `registers::unrolled_indices`).
    fn unrolled_indices(&self, einsum: &Einsum) -> Vec<Index> {
        if !self.registers.contains(&true) {
            return vec![];
        }
        let bound: Vec<Index> = self.env.iter().map(|(i, _)| *i).collect();
        let mut unroll = super::registers::unrolled_indices(self.program, &self.registers, einsum);
        unroll.retain(|i| !bound.contains(i));
        unroll
    }

    fn point_loops(&mut self, einsum: &Einsum, free: &[Index], each: &mut dyn FnMut(&mut Self, &[String])) {
        let Some((first, rest)) = free.split_first() else {
            let coords = self.target_coords(einsum);
            each(self, &coords);
            return;
        };
        let extent = self.extents[first.rank.index()].clone();
        self.for_loop(*first, "0", &extent, &mut |g| g.point_loops(einsum, rest, each));
    }

    /// `for index in start..end { body }`, with `index` bound in the environment.
    fn for_loop(&mut self, index: Index, start: &str, end: &str, body: &mut dyn FnMut(&mut Self)) {
        self.for_loop_step(index, start, end, 1, body)
    }

    /// `for index in (start..end).step_by(step) { body }`; callers make `end - start` a multiple
    /// of `step`.
    fn for_loop_step(&mut self, index: Index, start: &str, end: &str, step: usize, body: &mut dyn FnMut(&mut Self)) {
        self.for_loop_by(index, start, end, &step.to_string(), body)
    }

    /// `for index in (start..end).step_by(step) { body }`, the step an `i64` value or number.
    fn for_loop_by(&mut self, index: Index, start: &str, end: &str, step: &str, body: &mut dyn FnMut(&mut Self)) {
        if start == "0" && step == "1" && self.unroll.contains(&index) {
            self.unrolled_loop(index, body);
            return;
        }
        self.counted_loop(start, end, step, &mut |g, var| {
            g.env.push((index, var.to_string()));
            body(g);
            g.env.pop();
        });
    }

    /// `body` once for each point of `index`'s rank (of fixed extent), with the index a constant.
    fn unrolled_loop(&mut self, index: Index, body: &mut dyn FnMut(&mut Self)) {
        let Extent::Fixed(n) = self.cascade().rank(index.rank).extent else {
            unreachable!("an unrolled rank is fixed")
        };
        let var = self.slot("i64");
        for k in 0..n {
            self.emit(format!("store i64 {k}, i64* {var}"));
            self.env.push((index, var.clone()));
            body(self);
            self.env.pop();
        }
    }

    /// `for i in (start..end).step_by(step) { body }`, the body given the `i64` slot of `i`.
    fn counted_loop(&mut self, start: &str, end: &str, step: &str, body: &mut dyn FnMut(&mut Self, &str)) {
        let var = self.slot("i64");
        self.emit(format!("store i64 {start}, i64* {var}"));
        let header = self.label("loop");
        let inner = self.label("body");
        let exit = self.label("exit");
        self.emit(format!("br label %{header}"));
        self.start_block(&header);
        let i = self.ins(format!("load i64, i64* {var}"));
        let more = self.ins(format!("icmp slt i64 {i}, {end}"));
        self.emit(format!("br i1 {more}, label %{inner}, label %{exit}"));
        self.start_block(&inner);
        body(self, &var);
        let i = self.ins(format!("load i64, i64* {var}"));
        let next = self.ins(format!("add nsw i64 {i}, {step}"));
        self.emit(format!("store i64 {next}, i64* {var}"));
        self.emit(format!("br label %{header}"));
        self.start_block(&exit);
    }

    fn index(&mut self, index: Index) -> String {
        let var = self.env.iter().rev().find(|(i, _)| *i == index).map(|(_, v)| v.clone()).expect("a bound index");
        self.ins(format!("load i64, i64* {var}"))
    }

    /// The coordinates of an access (see `walk::coordinates`).
    fn coordinates(&mut self, tensor: TensorId, subscripts: &[Affine]) -> Vec<String> {
        crate::schedule::walk::coordinates(self, tensor, subscripts)
    }

    pub(super) fn and_def(&mut self, a: Def, b: Def) -> Def {
        match (a, b) {
            (None, x) | (x, None) => x,
            (Some(x), Some(y)) => Some(self.ins(format!("and i1 {x}, {y}"))),
        }
    }

    /// As `cpu::codegen`: whether every split pair bound in the environment, with one of `new` in
    /// it, is inside its whole rank.
    fn valid_pairs(&mut self, new: &[Index]) -> Def {
        let bound: Vec<Index> = self.env.iter().map(|(i, _)| *i).collect();
        let bounded = self.bounded.clone();
        crate::schedule::walk::valid_pairs(self, &bound, new, &|partner, _| bounded.contains(&partner))
    }

    fn always_inside(&self, subscript: &Affine, rank: RankId) -> bool {
        crate::schedule::layout::always_inside(self.cascade(), subscript, rank)
    }

    fn conds(&mut self, conds: &[Cond]) -> Def {
        crate::schedule::walk::conjunction(self, conds, None)
    }

    /// Whether coordinate `c` lies inside position `d` of buffer `buffer`.
    fn in_range(&mut self, buffer: usize, d: usize, c: &str) -> String {
        let dim = self.dim(buffer, d);
        let below = self.ins(format!("icmp slt i64 {c}, {dim}"));
        let nonneg = self.ins(format!("icmp sge i64 {c}, 0"));
        self.ins(format!("and i1 {below}, {nonneg}"))
    }

    /// The element offset of `coords` in buffer `buffer`, clamped to 0 when out of range, and
    /// whether it is in range.
    fn offset(&mut self, buffer: usize, coords: &[String], always_inside: &[bool]) -> (String, Def) {
        let mut inside: Def = None;
        let mut offset: Option<String> = None;
        let slots = self.program.buffers[buffer].slots.clone();
        for (d, c) in coords.iter().enumerate() {
            if !always_inside[d] {
                let both = self.in_range(buffer, d, c);
                inside = self.and_def(inside, Some(both));
            }
            let stored = match slots[d] {
                Slot::Full => c.clone(),
                Slot::Current => continue,
                // A running tensor in registers: the current iterate in slot 0, the next in 1.
                Slot::Alternate if self.registers[buffer] => {
                    let rank = self.cascade().tensor(self.program.buffers[buffer].tensor).ranks[d];
                    match self.env.iter().rev().find(|(i, _)| i.rank == rank).map(|(i, _)| *i) {
                        Some(i) => {
                            let i = self.index(i);
                            self.ins(format!("sub i64 {c}, {i}"))
                        }
                        None => "0".to_string(),
                    }
                }
                Slot::Alternate => self.ins(format!("and i64 {c}, 1")),
            };
            let stride = self.stride(buffer, d);
            if stride == "0" {
                continue;
            }
            let term = if stride == "1" { stored } else { self.ins(format!("mul i64 {stored}, {stride}")) };
            offset = Some(match offset {
                Some(o) => self.ins(format!("add i64 {o}, {term}")),
                None => term,
            });
        }
        let offset = offset.unwrap_or_else(|| "0".to_string());
        let Some(check) = inside else { return (offset, None) };
        let offset = self.ins(format!("select i1 {check}, i64 {offset}, i64 0"));
        (offset, Some(check))
    }

    fn load(&mut self, tensor: TensorId, coords: &[String], always_inside: &[bool]) -> (String, Def) {
        let buffer = tensor.index();
        let (offset, inside) = self.offset(buffer, coords, always_inside);
        let base = self.values[buffer].clone();
        let address = self.element_address(buffer, &base, &offset);
        let value = self.load_element(buffer, &address);
        let defined = match self.masks[buffer].is_some() {
            true => {
                let m = self.read_mask(buffer, &offset);
                self.and_def(Some(m), inside)
            }
            false => inside,
        };
        (value, defined)
    }

    /// Whether the point at `offset` of masked buffer `buffer` is defined (an `i1`). A register
    /// buffer keeps its mask as the bits of one `i64` (see `function_body`), so that its 64
    /// points take two registers rather than 64 predicates.
    fn read_mask(&mut self, buffer: usize, offset: &str) -> String {
        let mask = self.masks[buffer].clone().expect("a masked buffer");
        if self.registers[buffer] {
            let bits = self.ins(format!("load i64, i64* {mask}"));
            let shifted = self.ins(format!("lshr i64 {bits}, {offset}"));
            return self.ins(format!("trunc i64 {shifted} to i1"));
        }
        let address = self.ins(format!("getelementptr inbounds i8, i8* {mask}, i64 {offset}"));
        let m = self.ins(format!("load i8, i8* {address}"));
        self.ins(format!("icmp ne i8 {m}, 0"))
    }

    /// Sets the definedness of the point at `offset` of masked buffer `buffer` (`defined` an
    /// `i1`).
    fn write_mask(&mut self, buffer: usize, offset: &str, defined: &str) {
        let mask = self.masks[buffer].clone().expect("a masked buffer");
        if self.registers[buffer] {
            let bits = self.ins(format!("load i64, i64* {mask}"));
            let bit = self.ins(format!("shl i64 1, {offset}"));
            let others = self.ins(format!("xor i64 {bit}, -1"));
            let kept = self.ins(format!("and i64 {bits}, {others}"));
            let d = self.ins(format!("zext i1 {defined} to i64"));
            let d = self.ins(format!("shl i64 {d}, {offset}"));
            let bits = self.ins(format!("or i64 {kept}, {d}"));
            self.emit(format!("store i64 {bits}, i64* {mask}"));
            return;
        }
        let address = self.ins(format!("getelementptr inbounds i8, i8* {mask}, i64 {offset}"));
        let d = self.ins(format!("zext i1 {defined} to i8"));
        self.emit(format!("store i8 {d}, i8* {address}"));
    }

    fn call(&mut self, function: &str, x: &str) -> String {
        self.ins(format!("call float @{function}(float {x})"))
    }

    /// `max` or `min` with NaN propagating from either side.
    pub(super) fn extremum(&mut self, op: &str, x: &str, y: &str) -> String {
        let better = self.ins(format!("fcmp {op} float {x}, {y}"));
        let pick = self.ins(format!("select i1 {better}, float {x}, float {y}"));
        let nan = self.ins(format!("fcmp uno float {x}, 0.0"));
        self.ins(format!("select i1 {nan}, float {x}, float {pick}"))
    }

    fn exp(&mut self, x: &str) -> String {
        match self.flavor {
            Flavor::Nvptx => {
                let scaled = self.ins(format!("fmul float {x}, {}", float(std::f32::consts::LOG2_E)));
                self.call("llvm.nvvm.ex2.approx.f", &scaled)
            }
            Flavor::Host => self.host_exp(x),
        }
    }

    /// `exp` as Cephes' `expf`: `x = n ln 2 + r`, a degree-6 polynomial in `r`, and `2^n` applied
    /// in two halves; 0 where the result would be subnormal (see `math`). `lanes` is 1
    /// for a scalar, else the vector width.
    fn host_exp(&mut self, x: &str) -> String {
        self.host_exp_lanes(x, 1, math::Range::Any)
    }

    fn host_exp_lanes(&mut self, x: &str, lanes: usize, range: math::Range) -> String {
        let t = Ty(lanes);
        let (f, i, b, s) = (t.float(), t.int(), t.bool(), t.suffix());
        let [lo, hi, log2e, a_half, ln2_hi, ln2_lo, one] =
            [math::EXP_LO, math::EXP_HI, std::f32::consts::LOG2_E, 0.5, math::EXP_LN2_HI, math::EXP_LN2_LO, 1.0]
                .map(|k| self.vector_constant(t, k));
        let below = self.ins(format!("fcmp olt {f} {x}, {lo}"));
        let x1 = self.ins(format!("select {b} {below}, {f} {lo}, {f} {x}"));
        let x2 = match range {
            math::Range::Any => {
                let above = self.ins(format!("fcmp ogt {f} {x1}, {hi}"));
                self.ins(format!("select {b} {above}, {f} {hi}, {f} {x1}"))
            }
            math::Range::NonPositive => x1,
        };
        let fma = |g: &mut Self, a: &str, m: &str, c: &str| {
            g.ins(format!("call {f} @llvm.fma.{s}({f} {a}, {f} {m}, {f} {c})"))
        };
        let t_ = fma(self, &x2, &log2e, &a_half);
        let n = self.ins(format!("call {f} @llvm.floor.{s}({f} {t_})"));
        let r = fma(self, &n, &ln2_hi, &x2);
        let r = fma(self, &n, &ln2_lo, &r);
        let mut p = self.vector_constant(t, math::EXP_POLY[0]);
        for c in &math::EXP_POLY[1..] {
            let c = self.vector_constant(t, *c);
            p = fma(self, &p, &r, &c);
        }
        let rr = self.ins(format!("fmul {f} {r}, {r}"));
        let y = fma(self, &p, &rr, &r);
        let y = self.ins(format!("fadd {f} {y}, {one}"));
        let ni = self.ins(format!("fptosi {f} {n} to {i}"));
        let factors = match range {
            math::Range::Any => {
                let half = self.ins(format!("ashr {i} {ni}, {}", t.int_constant(1)));
                vec![half.clone(), self.ins(format!("sub {i} {ni}, {half}"))]
            }
            math::Range::NonPositive => vec![ni],
        };
        let mut scaled = y;
        for k in factors {
            let biased = self.ins(format!("add {i} {k}, {}", t.int_constant(127)));
            let bits = self.ins(format!("shl {i} {biased}, {}", t.int_constant(23)));
            let factor = self.ins(format!("bitcast {i} {bits} to {f}"));
            scaled = self.ins(format!("fmul {f} {scaled}, {factor}"));
        }
        let zeroed = self.ins(format!("select {b} {below}, {f} {}, {f} {scaled}", t.constant(0.0)));
        let nan = self.ins(format!("fcmp uno {f} {x}, {x}"));
        self.ins(format!("select {b} {nan}, {f} {x}, {f} {zeroed}"))
    }

    /// `log`, `tanh`, `sigmoid` and `softplus` on the host in `lanes` lanes (1 for a scalar),
    /// instruction for instruction as `crate::math` computes them, so a lane, a ragged tail and
    /// the Cranelift tier give the same bits.
    fn host_function_lanes(&mut self, op: UnaryOp, x: &str, lanes: usize) -> String {
        let t = Ty(lanes);
        let (f, b, s) = (t.float(), t.bool(), t.suffix());
        let fabs = |g: &mut Self, v: &str| g.ins(format!("call {f} @llvm.fabs.{s}({f} {v})"));
        let (zero, one) = (t.constant(0.0), self.vector_constant(t, 1.0));
        match op {
            UnaryOp::Log => self.host_log_lanes(x, lanes),
            UnaryOp::Sigmoid => {
                let a = fabs(self, x);
                let na = self.ins(format!("fneg {f} {a}"));
                let e = self.host_exp_lanes(&na, lanes, math::Range::NonPositive);
                let d = self.ins(format!("fadd {f} {e}, {one}"));
                let q = self.ins(format!("fdiv {f} {one}, {d}"));
                let eq = self.ins(format!("fmul {f} {e}, {q}"));
                let negative = self.ins(format!("fcmp olt {f} {x}, {zero}"));
                self.ins(format!("select {b} {negative}, {f} {eq}, {f} {q}"))
            }
            UnaryOp::Tanh => {
                // The polynomial alone where every lane is small (`math::tanh`), else lane by
                // lane; a scalar computes both.
                let a = fabs(self, x);
                let bound = self.vector_constant(t, math::TANH_SMALL);
                let large = self.ins(format!("fcmp uge {f} {a}, {bound}"));
                if lanes == 1 {
                    let near = self.host_tanh_small(x, lanes);
                    let far = self.host_tanh_rational(x, lanes);
                    return self.ins(format!("select {b} {large}, {f} {far}, {f} {near}"));
                }
                let (polynomial, both, join) = (self.label("tanh_small"), self.label("tanh_both"), self.label("tanh"));
                let any = self.ins(format!("call i1 @llvm.vector.reduce.or.v{lanes}i1({b} {large})"));
                self.emit(format!("br i1 {any}, label %{both}, label %{polynomial}"));
                self.start_block(&polynomial);
                let alone = self.host_tanh_small(x, lanes);
                self.emit(format!("br label %{join}"));
                self.start_block(&both);
                let near = self.host_tanh_small(x, lanes);
                let far = self.host_tanh_rational(x, lanes);
                let chosen = self.ins(format!("select {b} {large}, {f} {far}, {f} {near}"));
                self.emit(format!("br label %{join}"));
                self.start_block(&join);
                self.ins(format!("phi {f} [ {alone}, %{polynomial} ], [ {chosen}, %{both} ]"))
            }
            UnaryOp::Softplus => {
                let a = fabs(self, x);
                let na = self.ins(format!("fneg {f} {a}"));
                let y = self.host_exp_lanes(&na, lanes, math::Range::NonPositive);
                let p = self.host_horner(t, &math::LOG1P_POLY, &y);
                let log1p = self.ins(format!("fmul {f} {y}, {p}"));
                let positive = self.ins(format!("fcmp ogt {f} {x}, {zero}"));
                let part = self.ins(format!("select {b} {positive}, {f} {x}, {f} {zero}"));
                let sum = self.ins(format!("fadd {f} {part}, {log1p}"));
                let nan = self.ins(format!("fcmp uno {f} {x}, {x}"));
                self.ins(format!("select {b} {nan}, {f} {x}, {f} {sum}"))
            }
            _ => unreachable!("only log, tanh, sigmoid and softplus"),
        }
    }

    /// Horner's rule with fused multiply-adds in `t`'s lanes, highest degree first (`math::horner`).
    fn host_horner(&mut self, t: Ty, coefficients: &[f32], z: &str) -> String {
        let (f, s) = (t.float(), t.suffix());
        let mut p = self.vector_constant(t, coefficients[0]);
        for c in &coefficients[1..] {
            let c = self.vector_constant(t, *c);
            p = self.ins(format!("call {f} @llvm.fma.{s}({f} {p}, {f} {z}, {f} {c})"));
        }
        p
    }

    /// `math::tanh_small` in `lanes` lanes.
    fn host_tanh_small(&mut self, x: &str, lanes: usize) -> String {
        let t = Ty(lanes);
        let (f, s) = (t.float(), t.suffix());
        let z = self.ins(format!("fmul {f} {x}, {x}"));
        let p = self.host_horner(t, &math::TANH_POLY, &z);
        let xz = self.ins(format!("fmul {f} {x}, {z}"));
        let r = self.ins(format!("call {f} @llvm.fma.{s}({f} {xz}, {f} {p}, {f} {x})"));
        let zero = t.constant(0.0);
        let b = t.bool();
        let at_zero = self.ins(format!("fcmp oeq {f} {x}, {zero}"));
        self.ins(format!("select {b} {at_zero}, {f} {x}, {f} {r}"))
    }

    /// `math::tanh_rational` in `lanes` lanes.
    fn host_tanh_rational(&mut self, x: &str, lanes: usize) -> String {
        let t = Ty(lanes);
        let (f, b) = (t.float(), t.bool());
        let one = self.vector_constant(t, 1.0);
        let (hi, lo) = (self.vector_constant(t, math::TANH_CLAMP), self.vector_constant(t, -math::TANH_CLAMP));
        let minus_one = self.vector_constant(t, -1.0);
        let above = self.ins(format!("fcmp ogt {f} {x}, {hi}"));
        let x1 = self.ins(format!("select {b} {above}, {f} {hi}, {f} {x}"));
        let below = self.ins(format!("fcmp olt {f} {x1}, {lo}"));
        let x2 = self.ins(format!("select {b} {below}, {f} {lo}, {f} {x1}"));
        let z = self.ins(format!("fmul {f} {x2}, {x2}"));
        let n = self.host_horner(t, &math::TANH_NUM, &z);
        let d = self.host_horner(t, &math::TANH_DEN, &z);
        let xn = self.ins(format!("fmul {f} {x2}, {n}"));
        let r = self.ins(format!("fdiv {f} {xn}, {d}"));
        let above = self.ins(format!("fcmp ogt {f} {r}, {one}"));
        let r = self.ins(format!("select {b} {above}, {f} {one}, {f} {r}"));
        let below = self.ins(format!("fcmp olt {f} {r}, {minus_one}"));
        self.ins(format!("select {b} {below}, {f} {minus_one}, {f} {r}"))
    }

    /// `math::log` in `lanes` lanes: `log(0) = -inf`, `log(x < 0) = NaN`, `log(inf) = inf`, NaN
    /// stays NaN.
    fn host_log_lanes(&mut self, x: &str, lanes: usize) -> String {
        let t = Ty(lanes);
        let (f, i, b, s) = (t.float(), t.int(), t.bool(), t.suffix());
        let fma = |g: &mut Self, a: &str, m: &str, c: &str| {
            g.ins(format!("call {f} @llvm.fma.{s}({f} {a}, {f} {m}, {f} {c})"))
        };
        let [tiny_limit, two_23, sqrt_half, one, ln2_lo, minus_half, ln2_hi] = [
            f32::MIN_POSITIVE,
            8_388_608.0,
            std::f32::consts::FRAC_1_SQRT_2,
            1.0,
            math::LOG_LN2_LO,
            -0.5,
            math::LOG_LN2_HI,
        ]
        .map(|k| self.vector_constant(t, k));
        let tiny = self.ins(format!("fcmp olt {f} {x}, {tiny_limit}"));
        let scaled = self.ins(format!("fmul {f} {x}, {two_23}"));
        let xs = self.ins(format!("select {b} {tiny}, {f} {scaled}, {f} {x}"));
        let bias = self.ins(format!("select {b} {tiny}, {i} {}, {i} {}", t.int_constant(-149), t.int_constant(-126)));
        let bits = self.ins(format!("bitcast {f} {xs} to {i}"));
        let shifted = self.ins(format!("lshr {i} {bits}, {}", t.int_constant(23)));
        let biased = self.ins(format!("and {i} {shifted}, {}", t.int_constant(255)));
        let exponent = self.ins(format!("add {i} {biased}, {bias}"));
        let mantissa = self.ins(format!("and {i} {bits}, {}", t.int_constant(0x007f_ffff)));
        let mantissa = self.ins(format!("or {i} {mantissa}, {}", t.int_constant(0x3f00_0000)));
        let m = self.ins(format!("bitcast {i} {mantissa} to {f}"));
        let e = self.ins(format!("sitofp {i} {exponent} to {f}"));
        let low = self.ins(format!("fcmp olt {f} {m}, {sqrt_half}"));
        let doubled = self.ins(format!("fadd {f} {m}, {m}"));
        let m = self.ins(format!("select {b} {low}, {f} {doubled}, {f} {m}"));
        let e_less = self.ins(format!("fsub {f} {e}, {one}"));
        let e = self.ins(format!("select {b} {low}, {f} {e_less}, {f} {e}"));
        let z = self.ins(format!("fsub {f} {m}, {one}"));
        let z2 = self.ins(format!("fmul {f} {z}, {z}"));
        let mut p = self.vector_constant(t, math::LOG_POLY[0]);
        for c in &math::LOG_POLY[1..] {
            let c = self.vector_constant(t, *c);
            p = fma(self, &p, &z, &c);
        }
        let zz2 = self.ins(format!("fmul {f} {z}, {z2}"));
        let y = self.ins(format!("fmul {f} {zz2}, {p}"));
        let y = fma(self, &e, &ln2_lo, &y);
        let y = fma(self, &z2, &minus_half, &y);
        let r = self.ins(format!("fadd {f} {z}, {y}"));
        let r = fma(self, &e, &ln2_hi, &r);
        let zero = self.ins(format!("fcmp oeq {f} {x}, {}", t.constant(0.0)));
        let r = self.ins(format!("select {b} {zero}, {f} {}, {f} {r}", t.constant(f32::NEG_INFINITY)));
        let negative = self.ins(format!("fcmp olt {f} {x}, {}", t.constant(0.0)));
        let r = self.ins(format!("select {b} {negative}, {f} {}, {f} {r}", t.constant(f32::NAN)));
        let special = self.ins(format!("fcmp ueq {f} {x}, {}", t.constant(f32::INFINITY)));
        self.ins(format!("select {b} {special}, {f} {x}, {f} {r}"))
    }

    fn log(&mut self, x: &str) -> String {
        match self.flavor {
            Flavor::Host => self.host_log_lanes(x, 1),
            Flavor::Nvptx => {
                let l = self.call("llvm.nvvm.lg2.approx.f", x);
                self.ins(format!("fmul float {l}, {}", float(std::f32::consts::LN_2)))
            }
        }
    }

    /// `tanh`, `sigmoid` and `softplus` from `exp` and `log` (NVPTX only: the host calls the
    /// runtime's helpers).
    fn nvptx_function(&mut self, op: UnaryOp, x: &str) -> String {
        match op {
            UnaryOp::Tanh => {
                // tanh x = sign(x) (1 - e) / (1 + e), e = exp(-2|x|); a series near 0.
                let a = self.call("llvm.fabs.f32", x);
                let m = self.ins(format!("fmul float {a}, -2.0"));
                let e = self.exp(&m);
                let num = self.ins(format!("fsub float 1.0, {e}"));
                let den = self.ins(format!("fadd float 1.0, {e}"));
                let q = self.ins(format!("fdiv float {num}, {den}"));
                let x2 = self.ins(format!("fmul float {x}, {x}"));
                let s = self.ins(format!(
                    "call float @llvm.fma.f32(float {x2}, float {}, float {})",
                    float(2.0 / 15.0),
                    float(-1.0 / 3.0)
                ));
                let s = self.ins(format!("call float @llvm.fma.f32(float {s}, float {x2}, float 1.0)"));
                let series = self.ins(format!("fmul float {s}, {x}"));
                let neg = self.ins(format!("fcmp olt float {x}, 0.0"));
                let nq = self.ins(format!("fneg float {q}"));
                let signed = self.ins(format!("select i1 {neg}, float {nq}, float {q}"));
                let small = self.ins(format!("fcmp olt float {a}, {}", float(0.01)));
                let v = self.ins(format!("select i1 {small}, float {series}, float {signed}"));
                let nan = self.ins(format!("fcmp uno float {x}, 0.0"));
                self.ins(format!("select i1 {nan}, float {x}, float {v}"))
            }
            UnaryOp::Sigmoid => {
                let m = self.ins(format!("fneg float {x}"));
                let e = self.exp(&m);
                let d = self.ins(format!("fadd float {e}, 1.0"));
                self.ins(format!("fdiv float 1.0, {d}"))
            }
            UnaryOp::Softplus => {
                // max(x, 0) + log(1 + exp(-|x|)), with log(1 + y) ~ y - y^2/2 for small y.
                let a = self.call("llvm.fabs.f32", x);
                let m = self.ins(format!("fneg float {a}"));
                let y = self.exp(&m);
                let one_plus = self.ins(format!("fadd float {y}, 1.0"));
                let l = self.log(&one_plus);
                let half = self.ins(format!("fmul float {y}, -0.5"));
                let series = self.ins(format!("call float @llvm.fma.f32(float {half}, float {y}, float {y})"));
                let small = self.ins(format!("fcmp olt float {y}, {}", float(1e-3)));
                let l = self.ins(format!("select i1 {small}, float {series}, float {l}"));
                let positive = self.extremum("ogt", x, "0.0");
                self.ins(format!("fadd float {positive}, {l}"))
            }
            _ => unreachable!("only tanh, sigmoid and softplus"),
        }
    }

    /// The value of an expression and whether it is defined.
    fn expr(&mut self, expr: &Expr) -> (String, Def) {
        match expr {
            Expr::Const(c) => (float(*c as f32), None),
            Expr::Param(p) => (float(self.cascade().param(*p).value as f32), None),
            Expr::Extent(r) => {
                let e = self.extents[r.index()].clone();
                (self.ins(format!("sitofp i64 {e} to float")), None)
            }
            Expr::Index(i) => {
                let v = self.index(*i);
                let base = self.bases[i.rank.index()].clone();
                let v = self.ins(format!("add i64 {v}, {base}"));
                (self.ins(format!("sitofp i64 {v} to float")), None)
            }
            Expr::Access { tensor, subscripts } => {
                let coords = self.coordinates(*tensor, subscripts);
                let ranks = self.cascade().tensor(*tensor).ranks.clone();
                let always: Vec<bool> = subscripts.iter().zip(&ranks).map(|(s, r)| self.always_inside(s, *r)).collect();
                let view = self.views.iter().position(|v| {
                    let read = &self.staged[v.read];
                    read.tensor == *tensor && read.subscripts == *subscripts
                });
                match view {
                    Some(view) => self.load_view(view, *tensor, &coords, &always),
                    None => self.load(*tensor, &coords, &always),
                }
            }
            Expr::Unary(op, arg) => {
                let (x, d) = self.expr(arg);
                (self.unary(*op, &x), d)
            }
            Expr::Binary(BinaryOp::Mul, ..) if self.hoistable_factors(expr) => {
                // The factors that do not change across the unrolled points first (`Q * scale`
                // once for 64 keys), then the others; LLVM computes the first product once.
                let mut factors = Vec::new();
                expr.operands(BinaryOp::Mul, &mut factors);
                let (fixed, varying): (Vec<&Expr>, Vec<&Expr>) = factors.into_iter().partition(|f| !self.varies(f));
                let mut product: Option<(String, Def)> = None;
                for factor in fixed.into_iter().chain(varying) {
                    let (y, dy) = self.expr(factor);
                    product = Some(match product {
                        None => (y, dy),
                        Some((x, dx)) => {
                            let v = self.ins(format!("fmul contract float {x}, {y}"));
                            (v, self.and_def(dx, dy))
                        }
                    });
                }
                product.expect("a product has factors")
            }
            Expr::Binary(op, a, b) => {
                let (x, dx) = self.expr(a);
                let (y, dy) = self.expr(b);
                let v = self.binary(*op, &x, &y);
                (v, self.and_def(dx, dy))
            }
            Expr::Reduce { op, indices, filter, body } => {
                let acc = self.slot("float");
                self.emit(format!("store float {}, float* {acc}", float(reduce_identity(*op) as f32)));
                // In a thread kernel the lanes of a point split its outermost reductions.
                let split = self.splits(indices);
                self.in_split |= split;
                self.split_next = split;
                self.reduce_loops(Reduction { op: *op, indices, filter, body, epilogue: None }, indices, &acc);
                self.split_next = false;
                let partial = self.ins(format!("load float, float* {acc}"));
                if !split {
                    return (partial, None);
                }
                self.in_split = false;
                (self.combine_lanes(*op, &partial), None)
            }
        }
    }

    /// A function of the language applied to the scalar `x`.
    pub(super) fn unary(&mut self, op: UnaryOp, x: &str) -> String {
        match op {
            UnaryOp::Neg => self.ins(format!("fneg float {x}")),
            UnaryOp::Abs => self.call("llvm.fabs.f32", x),
            UnaryOp::Sqrt => self.call("llvm.sqrt.f32", x),
            UnaryOp::Relu => self.extremum("ogt", x, "0.0"),
            UnaryOp::Exp => self.exp(x),
            UnaryOp::Log => self.log(x),
            UnaryOp::Tanh | UnaryOp::Sigmoid | UnaryOp::Softplus if self.flavor == Flavor::Nvptx => {
                self.nvptx_function(op, x)
            }
            UnaryOp::Tanh | UnaryOp::Sigmoid | UnaryOp::Softplus => self.host_function_lanes(op, x, 1),
        }
    }

    /// An arithmetic operator of the language on the scalars `x` and `y`.
    pub(super) fn binary(&mut self, op: BinaryOp, x: &str, y: &str) -> String {
        match op {
            // `contract` lets LLVM fuse a product into the sum that uses it (FMA).
            BinaryOp::Add => self.ins(format!("fadd contract float {x}, {y}")),
            BinaryOp::Sub => self.ins(format!("fsub contract float {x}, {y}")),
            BinaryOp::Mul => self.ins(format!("fmul contract float {x}, {y}")),
            BinaryOp::Div => self.ins(format!("fdiv float {x}, {y}")),
            BinaryOp::Max => self.extremum("ogt", x, y),
            BinaryOp::Min => self.extremum("olt", x, y),
        }
    }

    /// The comparison of a filter, as an `fcmp` condition code.
    pub(super) fn condition_code(op: CmpOp) -> &'static str {
        match op {
            CmpOp::Lt => "olt",
            CmpOp::Le => "ole",
            CmpOp::Gt => "ogt",
            CmpOp::Ge => "oge",
            CmpOp::Eq => "oeq",
            CmpOp::Ne => "une",
        }
    }

    /// The module text around a body this lowering wrote: its entry-block slots and its code.
    pub(super) fn take_code(&mut self) -> (String, String) {
        (std::mem::take(&mut self.allocas), std::mem::take(&mut self.out))
    }

    /// Whether `expr` is a product with a factor that varies across the unrolled points after one
    /// that does not (so that reordering the factors lets the fixed ones be multiplied once).
    fn hoistable_factors(&self, expr: &Expr) -> bool {
        if self.unroll.is_empty() {
            return false;
        }
        let mut factors = Vec::new();
        expr.operands(BinaryOp::Mul, &mut factors);
        let first_fixed = factors.iter().rposition(|f| !self.varies(f));
        let first_varying = factors.iter().position(|f| self.varies(f));
        matches!((first_varying, first_fixed), (Some(v), Some(f)) if v < f)
    }

    /// Whether `expr` may differ between the unrolled points (it mentions an unrolled index, or
    /// reduces).
    fn varies(&self, expr: &Expr) -> bool {
        let mut varies = false;
        expr.walk(&mut |e| match e {
            Expr::Index(i) => varies |= self.unroll.contains(i),
            Expr::Access { subscripts, .. } => {
                for s in subscripts {
                    s.for_each_index(&mut |i| varies |= self.unroll.contains(&i));
                }
            }
            Expr::Reduce { .. } => varies = true,
            _ => {}
        });
        varies
    }

    /// Runs `then` only where `condition` holds (always, when it is `None`).
    fn when(&mut self, condition: Def, then: &mut dyn FnMut(&mut Self)) {
        let Some(condition) = condition else {
            then(self);
            return;
        };
        let inside = self.label("then");
        let after = self.label("join");
        self.emit(format!("br i1 {condition}, label %{inside}, label %{after}"));
        self.start_block(&inside);
        then(self);
        self.emit(format!("br label %{after}"));
        self.start_block(&after);
    }

    /// The loops over the `remaining` reduced indices of `red`, folding its body into the float
    /// at `acc` where the point exists.
    fn reduce_loops(&mut self, red: Reduction<'_>, remaining: &[Index], acc: &str) {
        let Some((first, rest)) = remaining.split_first() else {
            let valid = self.valid_pairs(red.indices);
            self.when(valid, &mut |g| g.fold_into(red.op, red.filter, red.body, acc));
            return;
        };
        self.reduced_loop(*first, &mut |g| g.reduce_loops(red, rest, acc));
    }

    /// Whether `expr` can be evaluated at a point whose split pairs are not valid: every read's
    /// subscripts are bare indices of their own rank or checked against the extents (a pair's
    /// `tile * inner + inner` is not: it is inside only where the pair is valid).
    fn speculatable(&self, expr: &Expr) -> bool {
        expr.accesses().iter().all(|(tensor, subscripts)| {
            let ranks = &self.cascade().tensor(*tensor).ranks;
            subscripts
                .iter()
                .zip(ranks)
                .all(|(s, r)| matches!(s, Affine::Index(i) if i.rank == *r) || !self.always_inside(s, *r))
        })
    }

    /// Whether every comparison of `filter` is `speculatable`.
    fn filter_speculatable(&self, filter: &[Cond]) -> bool {
        filter.iter().all(|c| self.speculatable(&c.lhs) && self.speculatable(&c.rhs))
    }

    /// Whether the lanes of a warp split a reduction over `indices` here: in a thread kernel, the
    /// outermost reduction, unless its first loop is unrolled (an unrolled loop cannot be split).
    fn splits(&self, indices: &[Index]) -> bool {
        self.abi == Abi::Thread && !self.in_split && indices.first().is_some_and(|i| !self.unroll.contains(i))
    }

    /// Folds the body at the current point into the float at `address`, where the point passes
    /// the filter and the body is defined.
    fn fold_into(&mut self, op: ReduceOp, filter: &[Cond], body: &Expr, address: &str) {
        let passes = self.conds(filter);
        let (x, defined) = self.expr(body);
        let ok = self.and_def(passes, defined);
        let current = self.ins(format!("load float, float* {address}"));
        let next = match op {
            // Reassociation lets LLVM vectorize a sum; the tolerance covers the rounding.
            ReduceOp::Sum => self.ins(format!("fadd reassoc contract float {current}, {x}")),
            ReduceOp::Max => self.extremum("ogt", &current, &x),
            ReduceOp::Min => self.extremum("olt", &current, &x),
        };
        let chosen = match ok {
            Some(ok) => self.ins(format!("select i1 {ok}, float {next}, float {current}")),
            None => next,
        };
        self.emit(format!("store float {chosen}, float* {address}"));
    }

    /// The loop over a reduced index. For the inner index of a split pair whose tile index is
    /// bound, it stops at the last valid point (`whole - tile * inner`, clamped to the tile), so
    /// that the body needs no validity branch for that pair and LLVM can vectorize it.
    fn reduced_loop(&mut self, index: Index, body: &mut dyn FnMut(&mut Self)) {
        // The outermost loop of a reduction split among the lanes of a warp: lane `l` takes the
        // points `l, l + lanes, ...`.
        let (start, step) = if std::mem::take(&mut self.split_next) { ("%lane", "%lanes") } else { ("0", "1") };
        // An unrolled index runs over its whole rank; `valid_pairs` checks each point.
        let end = if self.unroll.contains(&index) { None } else { self.valid_points(index) };
        let Some(end) = end else {
            let extent = self.extents[index.rank.index()].clone();
            self.for_loop_by(index, start, &extent, step, body);
            return;
        };
        self.bounded.push(index);
        self.for_loop_by(index, start, &end, step, body);
        self.bounded.pop();
    }

    /// Combines the partial results of a reduction split among the lanes of a warp: after a
    /// butterfly of shuffles every lane holds the whole reduction (bit for bit the same, as each
    /// combination is commutative). A no-op with one lane per point.
    fn combine_lanes(&mut self, op: ReduceOp, partial: &str) -> String {
        let slot = self.slot("float");
        self.emit(format!("store float {partial}, float* {slot}"));
        let split = self.ins("icmp ugt i64 %lanes, 1");
        let (shuffle, done) = (self.label("shuffle"), self.label("combined"));
        self.emit(format!("br i1 {split}, label %{shuffle}, label %{done}"));
        self.start_block(&shuffle);
        // Distances lanes / 2, lanes / 4, ..., 1.
        let distance = self.slot("i64");
        let half = self.ins("lshr i64 %lanes, 1");
        self.emit(format!("store i64 {half}, i64* {distance}"));
        let (step, next) = (self.label("butterfly"), self.label("butterfly.next"));
        self.emit(format!("br label %{step}"));
        self.start_block(&step);
        let d = self.ins(format!("load i64, i64* {distance}"));
        let value = self.ins(format!("load float, float* {slot}"));
        let other = match self.flavor {
            Flavor::Nvptx => {
                let d32 = self.ins(format!("trunc i64 {d} to i32"));
                self.ins(format!("call float @llvm.nvvm.shfl.sync.bfly.f32(i32 -1, float {value}, i32 {d32}, i32 31)"))
            }
            Flavor::Host => {
                self.ins(format!("call float @einfuse_shuffle_xor(i8* %sync, float {value}, i64 %tid, i64 {d})"))
            }
        };
        let combined = match op {
            ReduceOp::Sum => self.ins(format!("fadd float {value}, {other}")),
            ReduceOp::Max | ReduceOp::Min => {
                let (cc, bits) = if op == ReduceOp::Max { ("ogt", "and") } else { ("olt", "or") };
                let picked = self.extremum(cc, &value, &other);
                // Equal values differ at most in the sign of a zero: both lanes take +0 for a
                // maximum and -0 for a minimum, so that they keep the same bits.
                let x = self.ins(format!("bitcast float {value} to i32"));
                let y = self.ins(format!("bitcast float {other} to i32"));
                let both = self.ins(format!("{bits} i32 {x}, {y}"));
                let both = self.ins(format!("bitcast i32 {both} to float"));
                let equal = self.ins(format!("fcmp oeq float {value}, {other}"));
                self.ins(format!("select i1 {equal}, float {both}, float {picked}"))
            }
        };
        self.emit(format!("store float {combined}, float* {slot}"));
        let d_next = self.ins(format!("lshr i64 {d}, 1"));
        self.emit(format!("store i64 {d_next}, i64* {distance}"));
        let more = self.ins(format!("icmp ne i64 {d_next}, 0"));
        self.emit(format!("br i1 {more}, label %{step}, label %{next}"));
        self.start_block(&next);
        self.emit(format!("br label %{done}"));
        self.start_block(&done);
        self.ins(format!("load float, float* {slot}"))
    }

    /// For the inner index of a split pair whose tile index is bound: how many of its points are
    /// valid at the current tile (`whole - tile * inner`, clamped to `0..=inner`). `None` for any
    /// other index, whose points are all valid.
    fn valid_points(&mut self, index: Index) -> Option<String> {
        let (tile, whole) = self.split_partner(index)?;
        let n = self.extents[index.rank.index()].clone();
        let t = self.index(tile);
        let first = self.ins(format!("mul i64 {t}, {n}"));
        let whole = self.extents[whole.index()].clone();
        let left = self.ins(format!("sub i64 {whole}, {first}"));
        let short = self.ins(format!("icmp slt i64 {left}, {n}"));
        let limit = self.ins(format!("select i1 {short}, i64 {left}, i64 {n}"));
        let negative = self.ins(format!("icmp slt i64 {limit}, 0"));
        Some(self.ins(format!("select i1 {negative}, i64 0, i64 {limit}")))
    }

    /// The end of the points of `index` at which `einsum` is computed: on the CPU, for the inner
    /// index of a split pair whose points past the valid ones nobody reads
    /// (`layout::unread_past_valid`), the valid ones; otherwise the whole extent.
    fn written_end(&mut self, einsum: &Einsum, index: Index) -> String {
        let extent = self.extents[index.rank.index()].clone();
        // The host emulation of a thread kernel keeps the GPU kernel's bounds.
        if self.flavor != Flavor::Host
            || self.abi != Abi::Cpu
            || self.unroll.contains(&index)
            || !crate::schedule::layout::unread_past_valid(self.cascade(), einsum, index)
        {
            return extent;
        }
        self.valid_points(index).unwrap_or(extent)
    }

    fn compute(&mut self, id: EinsumId) {
        let einsum = &self.cascade().einsums[id.index()];
        let free: Vec<Index> = einsum.lhs_indices().filter(|i| !self.env.iter().any(|(bound, _)| bound == i)).collect();
        let unroll = self.unrolled_indices(einsum);
        if unroll.is_empty() {
            self.compute_loops(einsum, &free);
            return;
        }
        // Loops over the unrolled indices innermost, so that the code between them is one copy.
        let (inner, mut outer): (Vec<Index>, Vec<Index>) = free.iter().partition(|i| unroll.contains(i));
        let reduction = matches!(einsum.body, Expr::Reduce { .. })
            && einsum.lhs.iter().all(|l| matches!(l, Lhs::Index(_)))
            && self.filter_speculatable(&einsum.filter);
        let outside = std::mem::replace(&mut self.unroll, unroll);
        if reduction && !inner.is_empty() {
            self.dynamic_loops(&outer, &mut |g| g.compute_unrolled_reduction(einsum, &inner));
        } else {
            outer.extend(inner);
            self.compute_loops(einsum, &outer);
        }
        self.unroll = outside;
    }

    /// `body` inside loops over `indices`, outermost first.
    fn dynamic_loops(&mut self, indices: &[Index], body: &mut dyn FnMut(&mut Self)) {
        let Some((first, rest)) = indices.split_first() else {
            body(self);
            return;
        };
        let extent = self.extents[first.rank.index()].clone();
        self.for_loop(*first, "0", &extent, &mut |g| g.dynamic_loops(rest, body));
    }

    /// A reduction computed at every point of its unrolled left-hand indices `points` at once:
    /// one accumulator per point (a register), the reduced loops outside, the points' copies of
    /// the body innermost, so that an operand that does not depend on the points (a row of `Q`)
    /// is read once for all of them. Each point is stored as `compute_point` stores it; a point
    /// that the statement's filter leaves out is computed too, and stored undefined.
    fn compute_unrolled_reduction(&mut self, einsum: &'a Einsum, points: &[Index]) {
        let Expr::Reduce { op, indices, filter, body } = &einsum.body else { unreachable!("checked by the caller") };
        let mut all: Vec<Vec<u64>> = vec![vec![]];
        for index in points {
            let Extent::Fixed(n) = self.cascade().rank(index.rank).extent else {
                unreachable!("an unrolled rank is fixed")
            };
            all = all.iter().flat_map(|p| (0..n).map(move |k| [p.clone(), vec![k]].concat())).collect();
        }
        let slots: Vec<String> = points.iter().map(|_| self.slot("i64")).collect();
        let accumulators: Vec<String> = all.iter().map(|_| self.slot("float")).collect();
        for acc in &accumulators {
            self.emit(format!("store float {}, float* {acc}", float(reduce_identity(*op) as f32)));
        }
        let split = self.splits(indices);
        self.in_split |= split;
        self.split_next = split;
        let each_point = |g: &mut Self, point: &[u64], then: &mut dyn FnMut(&mut Self)| {
            for ((index, slot), k) in points.iter().zip(&slots).zip(point) {
                g.emit(format!("store i64 {k}, i64* {slot}"));
                g.env.push((*index, slot.clone()));
            }
            then(g);
            g.env.truncate(g.env.len() - points.len());
        };
        self.reduced_loops(indices, &mut |g| {
            for (point, acc) in all.iter().zip(&accumulators) {
                each_point(g, point, &mut |g| {
                    let valid = g.valid_pairs(indices);
                    g.when(valid, &mut |g| g.fold_into(*op, filter, body, acc));
                });
            }
        });
        self.split_next = false;
        if split {
            self.in_split = false;
        }
        for (point, acc) in all.iter().zip(&accumulators) {
            each_point(self, point, &mut |g| {
                let partial = g.ins(format!("load float, float* {acc}"));
                let value = if split { g.combine_lanes(*op, &partial) } else { partial };
                let valid = g.valid_pairs(&[]);
                let passes = g.conds(&einsum.filter);
                let defined = g.and_def(valid, passes);
                g.store_point(einsum, &value, defined);
            });
        }
    }

    /// `body` inside the loops over the reduced `indices` (see `reduced_loop`).
    fn reduced_loops(&mut self, indices: &[Index], body: &mut dyn FnMut(&mut Self)) {
        let Some((first, rest)) = indices.split_first() else {
            body(self);
            return;
        };
        self.reduced_loop(*first, &mut |g| g.reduced_loops(rest, body));
    }

    fn compute_loops(&mut self, einsum: &'a Einsum, free: &[Index]) {
        if self.lanes > 1 {
            if let Some(order) = crate::schedule::pack::copy_order(self.program, einsum, free) {
                crate::schedule::walk::copy(self, einsum, free, order);
                return;
            }
        }
        // Indices of fixed extent 1 at the end (decode's single query) are bound first, so that
        // lanes run along the last index with more than one point.
        let c = self.cascade();
        let trailing = free.iter().rev().take_while(|i| matches!(c.rank(i.rank).extent, Extent::Fixed(1))).count();
        if self.lanes > 1 && trailing > 0 && trailing < free.len() {
            let (head, tail) = free.split_at(free.len() - trailing);
            let index = tail[0];
            let rest: Vec<Index> = head.iter().chain(&tail[1..]).copied().collect();
            self.for_loop(index, "0", "1", &mut |g| g.compute_loops(einsum, &rest));
            return;
        }
        let Some((first, rest)) = free.split_first() else {
            self.compute_point(einsum);
            return;
        };
        if rest.len() == 1 && self.blockable(einsum, Some(*first), rest[0]) {
            self.compute_blocked(einsum, Some(*first), rest[0]);
            return;
        }
        if rest.is_empty() && self.blockable(einsum, None, *first) {
            self.compute_blocked(einsum, None, *first);
            return;
        }
        if rest.is_empty() && self.interchangeable(einsum, *first) {
            self.compute_interchanged(einsum, *first);
            return;
        }
        if rest.is_empty() && self.mappable(einsum, *first) {
            self.compute_map(einsum, *first);
            return;
        }
        let end = self.written_end(einsum, *first);
        self.for_loop(*first, "0", &end, &mut |g| g.compute_loops(einsum, rest));
    }

    /// Whether a reduction can run with the innermost left-hand index `v` inside it (CPU only: on
    /// the GPU, `v` is a batch rank of extent 1 and the accumulator is better in a register). The
    /// Einsum must be exactly a reduction, with no statement filter and plain left-hand indices,
    /// and `v` contiguous wherever it is read and written (as for Cranelift's lanes), the last
    /// index of the target and in no split pair, since the loop over `v` runs over all its points.
    fn interchangeable(&self, einsum: &Einsum, v: Index) -> bool {
        let in_pair = self.cascade().split_pairs().iter().any(|(t, i, w)| [*t, *i, *w].contains(&v.rank));
        self.abi == Abi::Cpu
            && einsum.filter.is_empty()
            && einsum.lhs.iter().all(|l| matches!(l, Lhs::Index(_)))
            && einsum.lhs.last() == Some(&Lhs::Index(v))
            && !in_pair
            && matches!(einsum.body, Expr::Reduce { .. })
            && crate::schedule::lanes::vectorizable(self.program, einsum, v)
    }

    /// The coordinates of the target's current point.
    fn target_coords(&mut self, einsum: &Einsum) -> Vec<String> {
        einsum
            .lhs
            .iter()
            .map(|lhs| match lhs {
                Lhs::Index(i) => self.index(*i),
                Lhs::Initial => "0".to_string(),
                Lhs::Next(i) => {
                    let v = self.index(*i);
                    self.ins(format!("add i64 {v}, 1"))
                }
            })
            .collect()
    }

    /// The target's value and mask addresses at the current point.
    fn target_address(&mut self, einsum: &Einsum) -> (String, Option<String>) {
        let coords = self.target_coords(einsum);
        let buffer = einsum.target.index();
        let (offset, _) = self.offset(buffer, &coords, &vec![true; coords.len()]);
        let base = self.values[buffer].clone();
        let value = self.ins(format!("getelementptr inbounds float, float* {base}, i64 {offset}"));
        let mask =
            self.masks[buffer].clone().map(|m| self.ins(format!("getelementptr inbounds i8, i8* {m}, i64 {offset}")));
        (value, mask)
    }

    /// A reduction computed for every `v` at once: the target row holds the accumulators, the
    /// reduced indices run outside, and the loop over `v` innermost, which LLVM vectorizes.
    fn compute_interchanged(&mut self, einsum: &'a Einsum, v: Index) {
        let Some(red) = reduction(&einsum.body) else { unreachable!("checked") };
        let extent = self.extents[v.rank.index()].clone();
        let valid = self.valid_pairs(&[]);
        let valid_flag = valid.clone().unwrap_or_else(|| "true".into());
        let (inside, outside, after) = (self.label("rows"), self.label("norows"), self.label("rowsdone"));
        self.emit(format!("br i1 {valid_flag}, label %{inside}, label %{outside}"));
        self.start_block(&outside);
        self.for_loop(v, "0", &extent, &mut |g| {
            let (value, mask) = g.target_address(einsum);
            g.emit(format!("store float 0.0, float* {value}"));
            if let Some(mask) = mask {
                g.emit(format!("store i8 0, i8* {mask}"));
            }
        });
        self.emit(format!("br label %{after}"));
        self.start_block(&inside);
        let identity = float(reduce_identity(red.op) as f32);
        self.for_loop(v, "0", &extent, &mut |g| {
            let (value, mask) = g.target_address(einsum);
            g.emit(format!("store float {identity}, float* {value}"));
            if let Some(mask) = mask {
                g.emit(format!("store i8 1, i8* {mask}"));
            }
        });
        self.interchanged_loops(einsum, red, red.indices, v, &extent);
        self.emit(format!("br label %{after}"));
        self.start_block(&after);
    }

    /// The loops over the `remaining` reduced indices of `red`, then over `v`, folding its body
    /// into the target row.
    fn interchanged_loops(&mut self, einsum: &Einsum, red: Reduction<'_>, remaining: &[Index], v: Index, extent: &str) {
        let Some((first, rest)) = remaining.split_first() else {
            let valid = self.valid_pairs(red.indices);
            self.when(valid, &mut |g| {
                g.for_loop(v, "0", extent, &mut |g| {
                    let (address, _) = g.target_address(einsum);
                    g.fold_into(red.op, red.filter, red.body, &address);
                });
            });
            return;
        };
        self.reduced_loop(*first, &mut |g| g.interchanged_loops(einsum, red, rest, v, extent));
    }

    /// Whether an interchangeable reduction runs as register blocks on the host: `lanes::register_block` rows
    /// along `u` (the next free index out, if any) by one vector of points along `v`, the
    /// accumulators in registers while the reduced indices run. Its body must hold no other
    /// reduction, read `v` only at positions of `v`'s rank, and `u` must not be in a split pair.
    fn blockable(&self, einsum: &Einsum, u: Option<Index>, v: Index) -> bool {
        let plain = self.abi == Abi::Cpu && crate::schedule::lanes::blockable_reduction(self.program, einsum);
        if self.flavor != Flavor::Host || self.lanes < 2 || !plain || !self.lanes_along(einsum, v) {
            return false;
        }
        // A statement filter is evaluated in lanes when the block is stored; `lanes_along` has
        // checked how every read and write meets `v`.
        let mut ok = true;
        if let Some(u) = u {
            ok &= einsum.lhs.contains(&Lhs::Index(u));
            // `u` may be the inner index of a split pair whose tile index is bound: the blocks
            // then stop at the last valid row (see `compute_blocked`).
            let pairs = self.cascade().split_pairs();
            let in_pair = |r: RankId| pairs.iter().any(|(t, i, w)| r == *t || r == *i || r == *w);
            ok &= !in_pair(u.rank) || self.split_partner(u).is_some();
        }
        ok
    }

    /// For the inner index `u` of a split pair whose tile index is bound: the tile index and the
    /// whole rank.
    fn split_partner(&self, u: Index) -> Option<(Index, RankId)> {
        let pairs = self.cascade().split_pairs();
        let (tile, _, whole) = pairs.iter().find(|(_, inner, _)| *inner == u.rank)?;
        let partner = Index { rank: *tile, primes: u.primes };
        let uses_whole =
            pairs.iter().filter(|(t, i, w)| *t == u.rank || *w == u.rank || (*i == u.rank && w != whole)).count();
        (uses_whole == 0 && self.env.iter().any(|(i, _)| *i == partner)).then_some((partner, *whole))
    }

    /// Whether consecutive points along `v` sit at consecutive addresses in the target and in
    /// every read that mentions `v` (`schedule::lanes::vectorizable`), and, where `v` is the inner
    /// index of a split pair, its tile index is bound here, so that whole vectors stop at the
    /// pair's last valid point (`lane_blocks_end`).
    fn lanes_along(&self, einsum: &Einsum, v: Index) -> bool {
        let inner = self.cascade().split_pairs().iter().any(|(_, i, _)| *i == v.rank);
        crate::schedule::lanes::vectorizable(self.program, einsum, v) && (!inner || self.split_partner(v).is_some())
    }

    /// The end of whole vectors along `v`: the points before it are all valid (for a split
    /// pair's inner index, inside the whole rank) and fill whole vectors.
    fn lane_blocks_end(&mut self, v: Index) -> String {
        let lanes = self.lanes;
        let valid = self.valid_points(v).unwrap_or_else(|| self.extents[v.rank.index()].clone());
        let rest = self.ins(format!("srem i64 {valid}, {lanes}"));
        self.ins(format!("sub i64 {valid}, {rest}"))
    }

    /// Whether an element-wise Einsum (no reduction) computes a vector of points along `v` at once
    /// on the host: `v` contiguous wherever it is read and written, at positions of its rank.
    fn mappable(&self, einsum: &Einsum, v: Index) -> bool {
        if self.flavor != Flavor::Host || self.abi != Abi::Cpu || self.lanes < 2 || !self.lanes_along(einsum, v) {
            return false;
        }
        crate::schedule::lanes::without_reductions(&einsum.body, &einsum.filter)
    }

    /// An element-wise Einsum a vector of points at a time along `v`, the last points one by one.
    fn compute_map(&mut self, einsum: &'a Einsum, v: Index) {
        let lanes = self.lanes;
        let n = self.written_end(einsum, v);
        let main = self.lane_blocks_end(v);
        self.for_loop_step(v, "0", &main, lanes, &mut |g| {
            let t = Ty(g.lanes);
            let (f, b) = (t.float(), t.bool());
            let valid = g.valid_pairs(&[]);
            let value_slot = g.slot(&f);
            let defined_slot = g.slot(&b);
            g.emit(format!("store {f} {}, {f}* {value_slot}", t.constant(0.0)));
            g.emit(format!("store {b} zeroinitializer, {b}* {defined_slot}"));
            g.when(valid, &mut |g| {
                let passes = g.vconds(&einsum.filter, v);
                let (value, defined) = g.vexpr(&einsum.body, v);
                let defined = g.vand(passes, defined).unwrap_or_else(|| t.splat_literal("i1", "true"));
                g.emit(format!("store {f} {value}, {f}* {value_slot}"));
                g.emit(format!("store {b} {defined}, {b}* {defined_slot}"));
            });
            let value = g.ins(format!("load {f}, {f}* {value_slot}"));
            let defined = g.ins(format!("load {b}, {b}* {defined_slot}"));
            g.store_masked_row(einsum, &value, &defined);
        });
        self.for_loop_step(v, &main, &n, 1, &mut |g| g.compute_point(einsum));
    }

    /// Runs `each` once per row of a block: `u` bound to its first row, then the next ones.
    fn each_row(&mut self, u: Option<Index>, rows: usize, each: &mut dyn FnMut(&mut Self, usize)) {
        let Some(u) = u else {
            each(self, 0);
            return;
        };
        let first = self.index(u);
        for k in 0..rows {
            if k == 0 {
                each(self, 0);
                continue;
            }
            let slot = self.slot("i64");
            let row = self.ins(format!("add i64 {first}, {k}"));
            self.emit(format!("store i64 {row}, i64* {slot}"));
            self.env.push((u, slot));
            each(self, k);
            self.env.pop();
        }
    }

    /// Runs `each` once per vector of a block: per row (see `each_row`), `v` bound to the first
    /// lane of each of `columns` vectors side by side; `each` gets the vector's number.
    fn each_vector(
        &mut self,
        u: Option<Index>,
        rows: usize,
        v: Index,
        columns: usize,
        each: &mut dyn FnMut(&mut Self, usize),
    ) {
        let lanes = self.lanes;
        self.each_row(u, rows, &mut |g, k| {
            let first = g.index(v);
            for c in 0..columns {
                if c == 0 {
                    each(g, k * columns);
                    continue;
                }
                let slot = g.slot("i64");
                let at = g.ins(format!("add i64 {first}, {}", c * lanes));
                g.emit(format!("store i64 {at}, i64* {slot}"));
                g.env.push((v, slot));
                each(g, k * columns + c);
                g.env.pop();
            }
        });
    }

    fn compute_blocked(&mut self, einsum: &'a Einsum, u: Option<Index>, v: Index) {
        let rows = self.block.rows;
        let Some(u) = u else {
            // No rows to block: vectors side by side.
            let streams = self.streams_input(einsum, None, v);
            self.wide_row_blocks(einsum, v, streams);
            return;
        };
        if self.streams_input(einsum, Some(u), v) {
            let n = self.written_end(einsum, u);
            self.for_loop(u, "0", &n, &mut |g| g.wide_row_blocks(einsum, v, true));
            return;
        }
        let n = self.written_end(einsum, u);
        // Whole blocks only over valid rows: for a split pair, those inside the whole rank.
        let valid_rows = self.valid_points(u).unwrap_or_else(|| n.clone());
        let rest = self.ins(format!("srem i64 {valid_rows}, {rows}"));
        let main = self.ins(format!("sub i64 {valid_rows}, {rest}"));
        // Columns outside, rows inside: the columns' part of the operand read in lanes
        // stays in cache while every block of rows passes over it, and the rows' operand
        // (a tile of keys or values) is read once per block of columns.
        let (lanes, columns) = (self.lanes, self.block.columns);
        let nv = self.written_end(einsum, v);
        let vectors_end = self.lane_blocks_end(v);
        let rest_v = self.ins(format!("srem i64 {vectors_end}, {}", lanes * columns));
        let wide_end = self.ins(format!("sub i64 {vectors_end}, {rest_v}"));
        let spans = [("0".to_string(), wide_end.clone(), columns), (wide_end, vectors_end.clone(), 1)];
        for (start, end, width) in spans {
            self.for_loop_step(v, &start, &end, lanes * width, &mut |g| {
                g.for_loop_step(u, "0", &main, rows, &mut |g| g.vector_block(einsum, Some(u), rows, v, width));
                g.for_loop_step(u, &main, &n, 1, &mut |g| g.vector_block(einsum, Some(u), 1, v, width));
            });
        }
        self.for_loop_step(v, &vectors_end, &nv, 1, &mut |g| {
            g.for_loop(u, "0", &n, &mut |g| g.compute_point(einsum));
        });
    }

    /// See `schedule::lanes::streams_input`.
    fn streams_input(&self, einsum: &Einsum, u: Option<Index>, v: Index) -> bool {
        crate::schedule::lanes::streams_input(self.program, einsum, u, v)
    }

    /// A reduction into one row along `v` (no rows to block, or a row along a strided input):
    /// blocks of vectors side by side along `v` (`lanes::side_by_side`), so that each step of the
    /// reduction reads a run of whole cache lines into independent accumulators; then single
    /// vectors, then the last points one by one.
    fn wide_row_blocks(&mut self, einsum: &'a Einsum, v: Index, streams: bool) {
        let lanes = self.lanes;
        let columns = crate::schedule::lanes::side_by_side(lanes, streams);
        let n = self.written_end(einsum, v);
        let valid = self.valid_points(v).unwrap_or_else(|| n.clone());
        let rest = self.ins(format!("srem i64 {valid}, {}", lanes * columns));
        let wide_end = self.ins(format!("sub i64 {valid}, {rest}"));
        self.for_loop_step(v, "0", &wide_end, lanes * columns, &mut |g| {
            g.vector_block(einsum, None, 1, v, columns);
        });
        let main = self.lane_blocks_end(v);
        self.for_loop_step(v, &wide_end, &main, lanes, &mut |g| g.vector_block(einsum, None, 1, v, 1));
        self.for_loop_step(v, &main, &n, 1, &mut |g| g.compute_point(einsum));
    }

    /// A block of `rows` rows along `u` by `columns` vectors side by side along `v`, every point
    /// valid: the accumulators in registers while the reduced indices run, then stored.
    fn vector_block(&mut self, einsum: &'a Einsum, u: Option<Index>, rows: usize, v: Index, columns: usize) {
        let Some(red) = reduction(&einsum.body) else { unreachable!("checked") };
        let Reduction { op, indices, body, epilogue, .. } = red;
        // Constant factors of a sum (`Q * K * scale`) multiply the accumulators once, at the end.
        let factored = crate::schedule::lanes::invariant_factors(self.cascade(), op, body);
        let (body, factor) = match &factored {
            Some((rest, k)) => (rest, Some(*k)),
            None => (body, None),
        };
        let red = Reduction { body, ..red };
        let t = Ty(self.lanes);
        let (f, w) = (t.float(), self.lanes);
        let valid = self.valid_pairs(&[]).unwrap_or_else(|| "true".into());
        let (inside, outside, after) = (self.label("block"), self.label("noblock"), self.label("blockdone"));
        self.emit(format!("br i1 {valid}, label %{inside}, label %{outside}"));
        self.start_block(&outside);
        self.each_vector(u, rows, v, columns, &mut |g, _| g.store_row(einsum, &t.constant(0.0), "0"));
        self.emit(format!("br label %{after}"));
        self.start_block(&inside);
        let accumulators: Vec<String> = (0..rows * columns).map(|_| self.slot(&f)).collect();
        let identity = t.constant(reduce_identity(op) as f32);
        for acc in &accumulators {
            self.emit(format!("store {f} {identity}, {f}* {acc}"));
        }
        if einsum.filter.is_empty() {
            self.block_reduce(red, indices, (u, rows, v, columns), &accumulators);
            self.scale_accumulators(&accumulators, factor);
            self.each_vector(u, rows, v, columns, &mut |g, k| {
                let value = g.ins(format!("load {f}, {f}* {}", accumulators[k]));
                // Without a statement filter, the epilogue's definedness is the points'.
                match g.epilogue(epilogue, value, v) {
                    (value, Some(holds)) => g.store_masked_row(einsum, &value, &holds),
                    (value, None) => g.store_row(einsum, &value, "1"),
                }
            });
        } else {
            // The statement filter decides which points exist: a block where no point does is
            // skipped (an empty tile), the others computed whole and stored masked.
            let b = t.bool();
            // A scratch tensor takes its filter's mask now and its values, unzeroed, after the
            // reduction, so that no lane mask stays live across it beside the accumulators.
            let buffer = einsum.target.index();
            let early_mask =
                self.program.buffers[buffer].role == crate::schedule::BufferRole::Temp && self.masks[buffer].is_some();
            let passes: Vec<String> = (0..rows * columns).map(|_| self.slot(&b)).collect();
            let mut any = "false".to_string();
            self.each_vector(u, rows, v, columns, &mut |g, k| {
                let holds = g.vconds(&einsum.filter, v).expect("a filter");
                if early_mask {
                    let (_, mask) = g.target_address(einsum);
                    let mask = mask.expect("a masked target");
                    let bytes = t.wrap("i8");
                    let flags = g.ins(format!("zext {b} {holds} to {bytes}"));
                    let vector = g.ins(format!("bitcast i8* {mask} to {bytes}*"));
                    g.emit(format!("store {bytes} {flags}, {bytes}* {vector}, align 1"));
                } else {
                    g.emit(format!("store {b} {holds}, {b}* {}", passes[k]));
                }
                let some = g.ins(format!("call i1 @llvm.vector.reduce.or.v{w}i1({b} {holds})"));
                any = g.ins(format!("or i1 {any}, {some}"));
            });
            self.when(Some(any), &mut |g| g.block_reduce(red, indices, (u, rows, v, columns), &accumulators));
            self.scale_accumulators(&accumulators, factor);
            self.each_vector(u, rows, v, columns, &mut |g, k| {
                // Under a filter, an epilogue reads only points that always exist
                // (`blockable_reduction`).
                let value = g.ins(format!("load {f}, {f}* {}", accumulators[k]));
                let (value, defined) = g.epilogue(epilogue, value, v);
                debug_assert!(defined.is_none(), "an epilogue under a filter reads only points that exist");
                if early_mask {
                    let (address, _) = g.target_address(einsum);
                    let vector = g.ins(format!("bitcast float* {address} to {f}*"));
                    g.emit(format!("store {f} {value}, {f}* {vector}, align 4"));
                    return;
                }
                let holds = g.ins(format!("load {b}, {b}* {}", passes[k]));
                g.store_masked_row(einsum, &value, &holds);
            });
        }
        self.emit(format!("br label %{after}"));
        self.start_block(&after);
    }

    /// A register block's vector of results (`value`) through the reduction's epilogue, if any,
    /// at the lanes along `v` (see `lanes::Reduction`), and their definedness.
    fn epilogue(&mut self, epilogue: Option<&Expr>, value: String, v: Index) -> (String, Def) {
        let Some(around) = epilogue else { return (value, None) };
        self.reduced = Some(value);
        let result = self.vexpr(around, v);
        self.reduced = None;
        result
    }

    /// Stores a vector at the target's current point and the lanes after it: zero where `holds`
    /// is false, and each lane's mask set to `holds`.
    fn store_masked_row(&mut self, einsum: &Einsum, value: &str, holds: &str) {
        let t = Ty(self.lanes);
        let (f, b) = (t.float(), t.bool());
        let value = self.ins(format!("select {b} {holds}, {f} {value}, {f} {}", t.constant(0.0)));
        self.store_lanes(einsum, &value, &|g| g.ins(format!("zext {b} {holds} to {}", t.wrap("i8"))));
    }

    /// Multiplies each accumulator of a block by a sum's constant factor, if it has one.
    fn scale_accumulators(&mut self, accumulators: &[String], factor: Option<f32>) {
        let Some(k) = factor else { return };
        let t = Ty(self.lanes);
        let (f, k) = (t.float(), t.constant(k));
        for acc in accumulators {
            let value = self.ins(format!("load {f}, {f}* {acc}"));
            let scaled = self.ins(format!("fmul {f} {value}, {k}"));
            self.emit(format!("store {f} {scaled}, {f}* {acc}"));
        }
    }

    /// Stores a vector at the target's current point and the lanes after it, with every lane's
    /// mask set to `defined`.
    fn store_row(&mut self, einsum: &Einsum, value: &str, defined: &str) {
        let t = Ty(self.lanes);
        self.store_lanes(einsum, value, &|_| t.splat_literal("i8", defined));
    }

    /// Stores a vector at the target's current point and the lanes after it, and, where the
    /// target has a mask, the vector of `i8` flags that `flags` makes for them.
    fn store_lanes(&mut self, einsum: &Einsum, value: &str, flags: &dyn Fn(&mut Self) -> String) {
        let t = Ty(self.lanes);
        let f = t.float();
        let (address, mask) = self.target_address(einsum);
        let vector = self.ins(format!("bitcast float* {address} to {f}*"));
        self.emit(format!("store {f} {value}, {f}* {vector}, align 4"));
        if let Some(mask) = mask {
            let bytes = t.wrap("i8");
            let flags = flags(self);
            let vector = self.ins(format!("bitcast i8* {mask} to {bytes}*"));
            self.emit(format!("store {bytes} {flags}, {bytes}* {vector}, align 1"));
        }
    }

    /// The loops over the `remaining` reduced indices of `red`, folding its body into one
    /// accumulator per vector of the block (`rows` along `u` by `columns` vectors along `v`).
    fn block_reduce(
        &mut self,
        red: Reduction<'_>,
        remaining: &[Index],
        (u, rows, v, columns): (Option<Index>, usize, Index, usize),
        accumulators: &[String],
    ) {
        let Reduction { op, filter, body, .. } = red;
        let Some((first, rest)) = remaining.split_first() else {
            let valid = self.valid_pairs(red.indices);
            let t = Ty(self.lanes);
            let (f, b) = (t.float(), t.bool());
            self.when(valid, &mut |g| {
                g.each_vector(u, rows, v, columns, &mut |g, k| {
                    let passes = g.vconds(filter, v);
                    let (x, defined) = g.vexpr(body, v);
                    let ok = g.vand(passes, defined);
                    let current = g.ins(format!("load {f}, {f}* {}", accumulators[k]));
                    let next = match op {
                        ReduceOp::Sum => g.ins(format!("fadd reassoc contract {f} {current}, {x}")),
                        ReduceOp::Max => g.vextremum("ogt", &current, &x),
                        ReduceOp::Min => g.vextremum("olt", &current, &x),
                    };
                    let chosen = match ok {
                        Some(ok) => g.ins(format!("select {b} {ok}, {f} {next}, {f} {current}")),
                        None => next,
                    };
                    g.emit(format!("store {f} {chosen}, {f}* {}", accumulators[k]));
                });
            });
            return;
        };
        self.reduced_loop(*first, &mut |g| g.block_reduce(red, rest, (u, rows, v, columns), accumulators));
    }

    fn vand(&mut self, a: Def, b: Def) -> Def {
        let bools = Ty(self.lanes).bool();
        match (a, b) {
            (None, x) | (x, None) => x,
            (Some(x), Some(y)) => Some(self.ins(format!("and {bools} {x}, {y}"))),
        }
    }

    fn splat(&mut self, scalar_type: &str, x: &str) -> String {
        let w = self.lanes;
        let one = self.ins(format!("insertelement <{w} x {scalar_type}> undef, {scalar_type} {x}, i32 0"));
        self.ins(format!(
            "shufflevector <{w} x {scalar_type}> {one}, <{w} x {scalar_type}> undef, <{w} x i32> zeroinitializer"
        ))
    }

    fn vextremum(&mut self, op: &str, x: &str, y: &str) -> String {
        let t = Ty(self.lanes);
        let (f, b) = (t.float(), t.bool());
        let better = self.ins(format!("fcmp {op} {f} {x}, {y}"));
        let pick = self.ins(format!("select {b} {better}, {f} {x}, {f} {y}"));
        let nan = self.ins(format!("fcmp uno {f} {x}, {x}"));
        self.ins(format!("select {b} {nan}, {f} {x}, {f} {pick}"))
    }

    fn vconds(&mut self, conds: &[Cond], v: Index) -> Def {
        crate::schedule::walk::conjunction(self, conds, Some(v))
    }

    /// An expression at the lanes `v`, `v + 1`, ...: a vector and its definedness lanes.
    fn vexpr(&mut self, expr: &Expr, v: Index) -> (String, Def) {
        let t = Ty(self.lanes);
        let (f, w) = (t.float(), self.lanes);
        if let (Expr::Reduce { .. }, Some(x)) = (expr, &self.reduced) {
            return (x.clone(), None);
        }
        if !expr.mentions(v) && !(self.reduced.is_some() && expr.holds_reduction()) {
            let (x, d) = self.expr(expr);
            let x = self.splat("float", &x);
            let d = d.map(|d| self.splat("i1", &d));
            return (x, d);
        }
        match expr {
            Expr::Index(i) => {
                let x = self.index(*i);
                let base = self.bases[i.rank.index()].clone();
                let x = self.ins(format!("add i64 {x}, {base}"));
                let steps = |ty: &str| (0..w).map(|k| format!("{ty} {k}")).collect::<Vec<_>>().join(", ");
                // A vector of positions below 2^31 (all of them, unless the caller's offsets
                // reach past that) converts from 32-bit integers in one instruction; others
                // exactly through f64. Both give the bits `sitofp` gives the scalar path.
                let (narrow, wide, join) = (self.label("narrow"), self.label("wide"), self.label("converted"));
                let shifted = self.ins(format!("add i64 {x}, 2147483648"));
                let fits = self.ins(format!("icmp ult i64 {shifted}, {}", (1i64 << 32) - w as i64));
                self.emit(format!("br i1 {fits}, label %{narrow}, label %{wide}"));
                self.start_block(&narrow);
                let x32 = self.ins(format!("trunc i64 {x} to i32"));
                let x32 = self.splat("i32", &x32);
                let x32 = self.ins(format!("add <{w} x i32> {x32}, <{}>", steps("i32")));
                let small = self.ins(format!("sitofp <{w} x i32> {x32} to {f}"));
                self.emit(format!("br label %{join}"));
                self.start_block(&wide);
                let x = self.splat("i64", &x);
                let x = self.ins(format!("add <{w} x i64> {x}, <{}>", steps("i64")));
                // A position lies in (-2^51, 2^51) (a call's offsets are bounded, see
                // `jit::MAX_OFFSET`): added to the bits of 2^52 + 2^51 it is that number plus the
                // position, exactly; subtracting 2^52 + 2^51 in f64 leaves the position, rounded
                // once to f32, the bits `sitofp` gives. AVX2 has no vector conversion from i64,
                // which LLVM would do lane by lane.
                let magic = t.splat_literal("i64", "4843621399236968448");
                let bits = self.ins(format!("add <{w} x i64> {x}, {magic}"));
                let wide_bits = self.ins(format!("bitcast <{w} x i64> {bits} to <{w} x double>"));
                let bias = t.splat_literal("double", "0x4338000000000000");
                let exact = self.ins(format!("fsub <{w} x double> {wide_bits}, {bias}"));
                let large = self.ins(format!("fptrunc <{w} x double> {exact} to {f}"));
                self.emit(format!("br label %{join}"));
                self.start_block(&join);
                (self.ins(format!("phi {f} [ {small}, %{narrow} ], [ {large}, %{wide} ]")), None)
            }
            Expr::Access { tensor, subscripts } => {
                let coords = self.coordinates(*tensor, subscripts);
                let ranks = self.cascade().tensor(*tensor).ranks.clone();
                let always: Vec<bool> = subscripts.iter().zip(&ranks).map(|(s, r)| self.always_inside(s, *r)).collect();
                let buffer = tensor.index();
                let (offset, inside) = self.offset(buffer, &coords, &always);
                let base = self.values[buffer].clone();
                let address = self.ins(format!("getelementptr inbounds float, float* {base}, i64 {offset}"));
                let vector = self.ins(format!("bitcast float* {address} to {f}*"));
                let value = self.ins(format!("load {f}, {f}* {vector}, align 4"));
                let inside = inside.map(|d| self.splat("i1", &d));
                let defined = match self.masks[buffer].clone() {
                    Some(mask) => {
                        let bytes = t.wrap("i8");
                        let address = self.ins(format!("getelementptr inbounds i8, i8* {mask}, i64 {offset}"));
                        let vector = self.ins(format!("bitcast i8* {address} to {bytes}*"));
                        let m = self.ins(format!("load {bytes}, {bytes}* {vector}, align 1"));
                        let m = self.ins(format!("icmp ne {bytes} {m}, zeroinitializer"));
                        self.vand(Some(m), inside)
                    }
                    None => inside,
                };
                (value, defined)
            }
            Expr::Unary(op, arg) => {
                let (x, d) = self.vexpr(arg, v);
                let s = t.suffix();
                let value = match op {
                    UnaryOp::Neg => self.ins(format!("fneg {f} {x}")),
                    UnaryOp::Abs => self.ins(format!("call {f} @llvm.fabs.{s}({f} {x})")),
                    UnaryOp::Sqrt => self.ins(format!("call {f} @llvm.sqrt.{s}({f} {x})")),
                    UnaryOp::Relu => self.vextremum("ogt", &x, &t.constant(0.0)),
                    UnaryOp::Exp => {
                        let range = crate::schedule::sign::exp_range(self.cascade(), arg);
                        self.host_exp_lanes(&x, w, range)
                    }
                    UnaryOp::Log | UnaryOp::Tanh | UnaryOp::Sigmoid | UnaryOp::Softplus => {
                        self.host_function_lanes(*op, &x, w)
                    }
                };
                (value, d)
            }
            Expr::Binary(op, a, b) => {
                let (x, dx) = self.vexpr(a, v);
                let (y, dy) = self.vexpr(b, v);
                let value = match op {
                    BinaryOp::Add => self.ins(format!("fadd contract {f} {x}, {y}")),
                    BinaryOp::Sub => self.ins(format!("fsub contract {f} {x}, {y}")),
                    BinaryOp::Mul => self.ins(format!("fmul contract {f} {x}, {y}")),
                    BinaryOp::Div => self.ins(format!("fdiv {f} {x}, {y}")),
                    BinaryOp::Max => self.vextremum("ogt", &x, &y),
                    BinaryOp::Min => self.vextremum("olt", &x, &y),
                };
                (value, self.vand(dx, dy))
            }
            Expr::Const(_) | Expr::Param(_) | Expr::Extent(_) | Expr::Reduce { .. } => {
                unreachable!("no lanes: handled above or excluded by `blockable`")
            }
        }
    }

    fn compute_point(&mut self, einsum: &Einsum) {
        let valid = self.valid_pairs(&[]);
        let speculate =
            self.abi == Abi::Thread && self.speculatable(&einsum.body) && self.filter_speculatable(&einsum.filter);
        let (value, defined) = match valid {
            None => crate::schedule::walk::point_value(self, einsum),
            Some(valid) if speculate => {
                let (value, defined) = crate::schedule::walk::point_value(self, einsum);
                (value, self.and_def(Some(valid), defined))
            }
            Some(valid) => {
                // Evaluate only where the point exists: a body may read where it should not.
                let value_slot = self.slot("float");
                let defined_slot = self.slot("i1");
                self.emit(format!("store float 0.0, float* {value_slot}"));
                self.emit(format!("store i1 false, i1* {defined_slot}"));
                self.when(Some(valid), &mut |g| {
                    let (value, defined) = crate::schedule::walk::point_value(g, einsum);
                    g.emit(format!("store float {value}, float* {value_slot}"));
                    g.emit(format!("store i1 {}, i1* {defined_slot}", defined.unwrap_or_else(|| "true".into())));
                });
                let value = self.ins(format!("load float, float* {value_slot}"));
                let defined = self.ins(format!("load i1, i1* {defined_slot}"));
                (value, Some(defined))
            }
        };
        self.store_point(einsum, &value, defined);
    }

    /// Stores `value` at the target's current point, with its definedness (0 where undefined).
    fn store_point(&mut self, einsum: &Einsum, value: &str, defined: Def) {
        let coords = self.target_coords(einsum);
        let buffer = einsum.target.index();
        let always = vec![true; coords.len()];
        let (offset, _) = self.offset(buffer, &coords, &always);
        let stored = match &defined {
            Some(d) => self.ins(format!("select i1 {d}, float {value}, float 0.0")),
            None => value.to_string(),
        };
        let base = self.values[buffer].clone();
        let address = self.element_address(buffer, &base, &offset);
        self.store_element(buffer, &stored, &address);
        if self.masks[buffer].is_some() {
            let d = defined.unwrap_or_else(|| "true".to_string());
            self.write_mask(buffer, &offset, &d);
        }
    }
}

impl<'a> Walker<'a> for Lowering<'a> {
    type Int = String;
    type Flag = String;
    type Value = String;

    fn cascade(&self) -> &'a Cascade {
        Lowering::cascade(self)
    }

    fn constant(&mut self, n: i64) -> String {
        n.to_string()
    }

    fn extent(&mut self, rank: RankId) -> String {
        self.extents[rank.index()].clone()
    }

    fn index(&mut self, index: Index) -> String {
        Lowering::index(self, index)
    }

    fn base(&mut self, rank: RankId) -> String {
        self.array_bases[rank.index()].clone()
    }

    fn int(&mut self, op: IntOp, a: String, b: String) -> String {
        let op = match op {
            IntOp::Add => "add",
            IntOp::Sub => "sub",
            IntOp::Mul => "mul",
        };
        self.ins(format!("{op} i64 {a}, {b}"))
    }

    fn less(&mut self, a: String, b: String) -> String {
        self.ins(format!("icmp slt i64 {a}, {b}"))
    }

    fn and(&mut self, a: String, b: String, lanes: Option<Index>) -> String {
        let bools = if lanes.is_some() { Ty(self.lanes).bool() } else { "i1".to_string() };
        self.ins(format!("and {bools} {a}, {b}"))
    }

    fn value(&mut self, expr: &Expr) -> (String, Def) {
        self.expr(expr)
    }

    fn compare(&mut self, op: CmpOp, a: String, b: String, lanes: Option<Index>) -> String {
        let cc = Self::condition_code(op);
        let f = if lanes.is_some() { Ty(self.lanes).float() } else { "float".to_string() };
        self.ins(format!("fcmp {cc} {f} {a}, {b}"))
    }

    fn value_in_lanes(&mut self, expr: &Expr, v: Index) -> (String, Def) {
        self.vexpr(expr, v)
    }

    fn for_range(
        &mut self,
        index: Index,
        start: String,
        end: String,
        step: i64,
        body: &mut dyn FnMut(&mut Self),
    ) -> String {
        let whole = if step == 1 {
            end
        } else {
            let span = self.ins(format!("sub i64 {end}, {start}"));
            let rest = self.ins(format!("srem i64 {span}, {step}"));
            self.ins(format!("sub i64 {end}, {rest}"))
        };
        self.for_loop_step(index, &start, &whole, step as usize, body);
        whole
    }

    fn with_offset(&mut self, index: Index, k: i64, body: &mut dyn FnMut(&mut Self)) {
        let first = self.index(index);
        let moved = self.ins(format!("add i64 {first}, {k}"));
        let var = self.slot("i64");
        self.emit(format!("store i64 {moved}, i64* {var}"));
        self.env.push((index, var));
        body(self);
        self.env.pop();
    }

    fn compute_point(&mut self, einsum: &'a Einsum) {
        Lowering::compute_point(self, einsum)
    }
}
