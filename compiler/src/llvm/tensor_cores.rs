//! Lowering a tensor-core plan (`schedule::tensor_cores`) to LLVM IR, as text: the NVPTX kernel
//! and its host emulation, from one walk.
//!
//! Needs: a `LoopProgram` and its `TensorCorePlan`. Guarantees: a module whose kernel computes
//! what the cascade means (up to the 16-bit rounding of the probabilities before the value
//! product, as FlashAttention does), or the reason it cannot (an expression the fragments cannot
//! evaluate). The kernel is entered once per thread:
//! - NVPTX: `void @<name>(i8** %values, i64* %extents, i64* %strides)`, a block of
//!   `THREADS` threads per `BLOCK_ROWS` query rows of a batch point, `plan.shared_bytes` of
//!   dynamic shared memory;
//! - host: the same tables, then the block, the thread, the block's shared memory and the
//!   emulator's block state (see `warp_emulator`).
//!
//! `values` holds one pointer per tensor (inputs and outputs as the caller stores them, in their
//! storage type), `extents` every rank's extent, `strides` every tensor's element strides, one
//! per position, tensor after tensor (see `stride_slots`).
//!
//! The warp-collective instructions (`mma.sync`, `ldmatrix`, `cp.async` and its waits) are
//! inline PTX with side effects on NVPTX, so that LLVM 14, which does not know they are
//! convergent, cannot sink them into a branch that only some lanes take; the host emulation calls
//! the emulator for each. Every lane of a warp runs every collective: the only branches that
//! depend on the lane are the final stores.

use std::fmt::Write;

use super::launch::HostValues;
use super::lower::{declarations, float, Abi, Flavor, Lowering};
use crate::ir::*;
use crate::schedule::tensor_cores::{Class, SharedTile, TensorCorePlan, BLOCK_ROWS, THREADS, WARP_ROWS};
use crate::schedule::LoopProgram;

/// Where a tensor's first stride is in the strides table, per tensor.
pub fn stride_slots(cascade: &Cascade) -> Vec<usize> {
    let mut at = 0;
    cascade
        .tensors
        .iter()
        .map(|t| {
            let here = at;
            at += t.ranks.len();
            here
        })
        .collect()
}

/// Everything one call of a tensor-core kernel passes, for one set of extents: shared by the
/// host emulation and the CUDA launcher.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorCoreCall {
    /// Blocks in x (of `THREADS` threads, `shared_bytes` of dynamic shared memory each).
    pub grid: u64,
    pub shared_bytes: u64,
    /// The `extents` and `strides` tables.
    pub extents: Vec<i64>,
    pub strides: Vec<i64>,
    /// Per tensor: its storage type and element count where the caller passes it (an input or
    /// an output), else `None` (a null pointer in `values`).
    pub buffers: Vec<Option<(ElemType, usize)>>,
}

impl TensorCoreCall {
    /// The call of `program` for `extents` (every rank's), its inputs and outputs dense and
    /// row-major.
    pub fn new(program: &LoopProgram, plan: &TensorCorePlan, extents: &[u64]) -> TensorCoreCall {
        let c = &program.cascade;
        let mut strides = Vec::new();
        let mut buffers = Vec::new();
        for (t, tensor) in c.tensors.iter().enumerate() {
            let dims: Vec<u64> = tensor.ranks.iter().map(|r| extents[r.index()]).collect();
            strides.extend(super::launch::row_major(&dims).iter().map(|s| *s as i64));
            let count = dims.iter().product::<u64>() as usize;
            let output = c.outputs.iter().find(|o| o.tensor.index() == t);
            buffers.push(match (tensor.kind, output) {
                (TensorKind::Input { elem }, _) => Some((elem, count)),
                (_, Some(o)) => Some((o.elem, count)),
                _ => None,
            });
        }
        let points: u64 = plan.batch.iter().map(|r| extents[r.index()]).product();
        TensorCoreCall {
            grid: points * extents[plan.query.rank.index()].div_ceil(BLOCK_ROWS),
            shared_bytes: plan.shared_bytes,
            extents: extents.iter().map(|e| *e as i64).collect(),
            strides,
            buffers,
        }
    }

    /// The buffers of a call in their storage types, from f32 inputs (rounded to nearest even)
    /// and zeroed outputs; `None` where the kernel takes no buffer.
    pub fn host_buffers(&self, program: &LoopProgram, inputs: &[&[f32]]) -> Result<Vec<Option<HostValues>>, String> {
        let c = &program.cascade;
        let mut given = inputs.iter();
        let mut out = Vec::new();
        for (tensor, buffer) in c.tensors.iter().zip(&self.buffers) {
            let Some((elem, count)) = *buffer else {
                out.push(None);
                continue;
            };
            let data: &[f32] = match tensor.kind {
                TensorKind::Input { .. } => {
                    let data = given.next().ok_or_else(|| format!("input `{}` is missing", tensor.name))?;
                    if data.len() != count {
                        return Err(format!(
                            "input `{}` has {} elements, its shape needs {count}",
                            tensor.name,
                            data.len()
                        ));
                    }
                    data
                }
                TensorKind::Defined { .. } => &[],
            };
            out.push(Some(match elem {
                ElemType::F32 => {
                    let mut v = vec![0f32; count];
                    v[..data.len()].copy_from_slice(data);
                    HostValues::F32(v)
                }
                _ => {
                    let mut v = vec![0u16; count];
                    v.iter_mut().zip(data).for_each(|(to, x)| *to = super::storage::narrow_bits(elem, *x));
                    HostValues::Narrow(v)
                }
            }));
        }
        Ok(out)
    }

    /// The outputs, widened to f32, from the buffers of a call.
    pub fn outputs(&self, program: &LoopProgram, buffers: &[Option<HostValues>]) -> Vec<Vec<f32>> {
        program
            .cascade
            .outputs
            .iter()
            .map(|o| match (&buffers[o.tensor.index()], self.buffers[o.tensor.index()]) {
                (Some(HostValues::F32(v)), _) => v.clone(),
                (Some(HostValues::Narrow(v)), Some((elem, _))) => {
                    v.iter().map(|b| super::storage::widen_bits(elem, *b)).collect()
                }
                _ => Vec::new(),
            })
            .collect()
    }
}

/// What a launcher needs to know of a tensor-core kernel besides its PTX.
#[derive(Debug, serde::Serialize)]
pub struct TensorCoreLaunch {
    pub kernel: String,
    pub source: String,
    pub entry: String,
    pub block: String,
    pub grid: String,
    pub shared_memory_bytes: u64,
    pub arguments: Vec<&'static str>,
    pub batch_ranks: Vec<String>,
    pub query_rank: String,
    pub key_tile: u64,
    pub operands: String,
}

/// The launch description of a tensor-core kernel, as JSON (`einfuse compile --target nvptx
/// --tensor-cores`).
pub fn launch_description(program: &LoopProgram, plan: &TensorCorePlan, source: &str) -> String {
    let c = &program.cascade;
    let name = |r: RankId| c.rank(r).name.clone();
    let description = TensorCoreLaunch {
        kernel: c.name.clone(),
        source: source.to_string(),
        entry: c.name.clone(),
        block: format!("{THREADS} threads (4 warps of 16 query rows each)"),
        grid: format!(
            "(the product of the batch ranks' extents) * ceil({} / {BLOCK_ROWS}) blocks in x, the query blocks fastest",
            name(plan.query.rank)
        ),
        shared_memory_bytes: plan.shared_bytes,
        arguments: vec![
            "i8** values: one pointer per tensor of the cascade, in order (inputs and outputs as stored, 16-byte aligned)",
            "i64* extents: every rank's extent, in order",
            "i64* strides: every tensor's element strides, one per position, tensor after tensor",
        ],
        batch_ranks: plan.batch.iter().map(|r| name(*r)).collect(),
        query_rank: name(plan.query.rank),
        key_tile: plan.key_tile,
        operands: format!(
            "{}, {} and {}: {:?}, rows 16-byte aligned",
            c.tensor(plan.q).name,
            c.tensor(plan.k).name,
            c.tensor(plan.v).name,
            plan.elem
        ),
    };
    serde_json::to_string_pretty(&description).expect("plain data serializes") + "\n"
}

/// The module text of the tensor-core kernel of `program`, named `symbol`.
pub fn lower(program: &LoopProgram, plan: &TensorCorePlan, flavor: Flavor, symbol: &str) -> Result<String, String> {
    let mut g = Gen::new(program, plan, flavor);
    g.kernel()?;
    let (allocas, code) = g.l.take_code();
    let mut module = String::new();
    writeln!(module, "; einfuse tensor-core kernel `{}`", program.cascade.name).unwrap();
    match flavor {
        Flavor::Nvptx => {
            module.push_str("target triple = \"nvptx64-nvidia-cuda\"\n\n");
            writeln!(module, "define void @\"{symbol}\"(i8** %values, i64* %extents, i64* %strides) nounwind {{")
                .unwrap();
        }
        Flavor::Host => writeln!(
            module,
            "define void @\"{symbol}\"(i8** %values, i64* %extents, i64* %strides, i64 %ctaid, i64 %tid, \
             i8* %shared, i8* %sync) nounwind {{"
        )
        .unwrap(),
    }
    module.push_str("entry:\n");
    module.push_str(&allocas);
    module.push_str("  br label %start\nstart:\n");
    module.push_str(&code);
    module.push_str("  ret void\n}\n\n");
    module.push_str(&declarations(flavor));
    module.push_str(&g.l.constant_globals());
    match flavor {
        Flavor::Nvptx => {
            module.push_str("@einfuse_shared = external addrspace(3) global [0 x i8], align 16\n");
            writeln!(
                module,
                "\n!nvvm.annotations = !{{!0}}\n!0 = !{{void (i8**, i64*, i64*)* @\"{symbol}\", !\"kernel\", i32 1}}"
            )
            .unwrap();
        }
        Flavor::Host => module.push_str(HOST_DECLARATIONS),
    }
    Ok(module)
}

/// The emulator's entry points (see `warp_emulator`).
const HOST_DECLARATIONS: &str = "declare void @einfuse_tc_mma(i8*, i64, i32, i32, i32, i32, i32, i32, i32, float, \
     float, float, float, float*) nounwind\n\
     declare void @einfuse_tc_ldmatrix(i8*, i64, i8*, i32, i32, i32*) nounwind\n\
     declare void @einfuse_tc_cp_async(i8*, i64, i8*, i32, i8*, i32) nounwind\n\
     declare void @einfuse_tc_commit(i8*, i64) nounwind\n\
     declare void @einfuse_tc_wait(i8*, i64, i32) nounwind\n\
     declare void @einfuse_tc_barrier(i8*, i64) nounwind\n\
     declare float @einfuse_tc_shuffle_xor(i8*, i64, float, i32) nounwind\n";

/// Where an expression is evaluated: a score element (its accumulator tile `j` of 8 keys and
/// register `i`), a query row (`r`: the thread's first or second row), an output element (tile
/// `j` of 8 columns, register `i`), or once per thread.
#[derive(Clone, Copy, Debug, PartialEq)]
enum At {
    Score { j: u64, i: u64 },
    Row { r: u64 },
    Out { j: u64, i: u64 },
}

impl At {
    fn row(self) -> u64 {
        match self {
            At::Score { i, .. } | At::Out { i, .. } => i / 2,
            At::Row { r } => r,
        }
    }
}

/// The iterate of a tensor that a subscript of the streamed position names.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Iterate {
    /// The current step's value, or a running value before this step's update.
    Old,
    /// A running value after this step's update (`m1 + 1`).
    New,
}

/// A tensor's storage in a thread: one slot per fragment element, values and definedness.
#[derive(Clone)]
struct Store {
    class: Class,
    values: [String; 2],
    defined: [String; 2],
    length: u64,
    /// Whether the tensor has a streamed position with two iterates.
    running: bool,
}

struct Gen<'a> {
    l: Lowering<'a>,
    program: &'a LoopProgram,
    plan: &'a TensorCorePlan,
    flavor: Flavor,
    stores: Vec<Option<Store>>,
    /// Per rank, its extent (i64).
    extents: Vec<String>,
    /// Per batch rank (in `plan.batch` order), the block's coordinate.
    batch: Vec<String>,
    /// The thread's two query rows, `2 * t` (the first column of a fragment), the streamed
    /// loop's step.
    rows: [String; 2],
    two_t: String,
    /// The first query row of the thread's warp, and of its block.
    warp_first: String,
    block_first: String,
    /// Whether the code being generated is a full step's: every key inside its rank, every
    /// filter of the loop's Einsums holding.
    full: bool,
    step: String,
    tid: String,
    lane: String,
    warp: String,
    /// The queries' fragments (A operands), per step of 16 along the head dimension.
    q_fragments: Vec<[String; 4]>,
    /// A scratch slot for the emulator's results.
    scratch: Option<String>,
    /// Where each tensor's strides start in the strides table (`stride_slots`).
    stride_slots: Vec<usize>,
    /// This lane's `ldmatrix` row and chunk (see `lane_rows`).
    a_lanes: (String, String),
    b_lanes: (String, String),
}

impl<'a> Gen<'a> {
    fn new(program: &'a LoopProgram, plan: &'a TensorCorePlan, flavor: Flavor) -> Gen<'a> {
        Gen {
            l: Lowering::new(program, flavor, Abi::Thread, vec![]),
            program,
            plan,
            flavor,
            stores: vec![None; program.cascade.tensors.len()],
            extents: vec![],
            batch: vec![],
            rows: [String::new(), String::new()],
            two_t: String::new(),
            warp_first: String::new(),
            block_first: String::new(),
            full: false,
            step: String::new(),
            tid: String::new(),
            lane: String::new(),
            warp: String::new(),
            q_fragments: vec![],
            scratch: None,
            stride_slots: stride_slots(&program.cascade),
            a_lanes: Default::default(),
            b_lanes: Default::default(),
        }
    }

    fn cascade(&self) -> &'a Cascade {
        &self.program.cascade
    }

    fn ins(&mut self, text: impl AsRef<str>) -> String {
        self.l.ins(text)
    }

    fn emit(&mut self, text: impl AsRef<str>) {
        self.l.emit(text)
    }

    fn score_elements(&self) -> u64 {
        self.plan.key_tile / 8 * 4
    }

    fn out_elements(&self) -> u64 {
        self.plan.columns / 8 * 4
    }

    // The warp-collective primitives, on NVPTX and in the emulator.

    fn kind(&self) -> u32 {
        match self.plan.elem {
            ElemType::Bf16 => 1,
            _ => 0,
        }
    }

    fn scratch(&mut self) -> String {
        if self.scratch.is_none() {
            self.scratch = Some(self.l.slot("[4 x i32]"));
        }
        self.scratch.clone().unwrap()
    }

    /// `D = A * B + C` for one m16n8k16 tile.
    fn mma(&mut self, a: &[String; 4], b: &[String; 2], c: &[String; 4]) -> [String; 4] {
        match self.flavor {
            Flavor::Nvptx => {
                let ty = if self.plan.elem == ElemType::Bf16 { "bf16" } else { "f16" };
                let call = self.ins(format!(
                    "call {{float, float, float, float}} asm sideeffect \"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 \
                     {{$0, $1, $2, $3}}, {{$4, $5, $6, $7}}, {{$8, $9}}, {{$10, $11, $12, $13}};\", \
                     \"=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f\"(i32 {}, i32 {}, i32 {}, i32 {}, i32 {}, i32 {}, float {}, float {}, \
                     float {}, float {})",
                    a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], c[2], c[3]
                ));
                std::array::from_fn(|k| self.ins(format!("extractvalue {{float, float, float, float}} {call}, {k}")))
            }
            Flavor::Host => {
                let out = self.scratch();
                let d = self.ins(format!("bitcast [4 x i32]* {out} to float*"));
                let kind = self.kind();
                let tid = self.tid.clone();
                self.emit(format!(
                    "call void @einfuse_tc_mma(i8* %sync, i64 {tid}, i32 {kind}, i32 {}, i32 {}, i32 {}, i32 {}, i32 {}, \
                     i32 {}, float {}, float {}, float {}, float {}, float* {d})",
                    a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], c[2], c[3]
                ));
                std::array::from_fn(|k| {
                    let p = self.ins(format!("getelementptr float, float* {d}, i64 {k}"));
                    self.ins(format!("load float, float* {p}"))
                })
            }
        }
    }

    /// Four 8x8 matrices of 16-bit elements from shared memory; `offset` (i32) is this lane's
    /// row address.
    fn ldmatrix(&mut self, offset: &str, transposed: bool) -> [String; 4] {
        match self.flavor {
            Flavor::Nvptx => {
                let address = self.shared_address(offset);
                let trans = if transposed { ".trans" } else { "" };
                let call = self.ins(format!(
                    "call {{i32, i32, i32, i32}} asm sideeffect \"ldmatrix.sync.aligned.m8n8.x4{trans}.shared.b16 \
                     {{$0, $1, $2, $3}}, [$4];\", \"=r,=r,=r,=r,r,~{{memory}}\"(i32 {address})"
                ));
                std::array::from_fn(|k| self.ins(format!("extractvalue {{i32, i32, i32, i32}} {call}, {k}")))
            }
            Flavor::Host => {
                let out = self.scratch();
                let p = self.ins(format!("getelementptr [4 x i32], [4 x i32]* {out}, i64 0, i64 0"));
                let tid = self.tid.clone();
                self.emit(format!(
                    "call void @einfuse_tc_ldmatrix(i8* %sync, i64 {tid}, i8* %shared, i32 {offset}, i32 {}, i32* {p})",
                    transposed as u32
                ));
                std::array::from_fn(|k| {
                    let q = self.ins(format!("getelementptr i32, i32* {p}, i64 {k}"));
                    self.ins(format!("load i32, i32* {q}"))
                })
            }
        }
    }

    /// The shared-memory address (32 bits) of byte `offset` of the block's tiles (NVPTX).
    fn shared_address(&mut self, offset: &str) -> String {
        let base = self.ins(
            "ptrtoint i8 addrspace(3)* getelementptr inbounds ([0 x i8], [0 x i8] addrspace(3)* @einfuse_shared, \
             i64 0, i64 0) to i32",
        );
        self.ins(format!("add i32 {base}, {offset}"))
    }

    /// Copies 16 bytes from `source` (only its first `bytes`, the rest zero) to byte `offset` of
    /// shared memory, asynchronously.
    fn cp_async(&mut self, offset: &str, source: &str, bytes: &str) {
        match self.flavor {
            Flavor::Nvptx => {
                let address = self.shared_address(offset);
                self.emit(format!(
                    "call void asm sideeffect \"cp.async.cg.shared.global [$0], [$1], 16, $2;\", \"r,l,r,~{{memory}}\"\
                     (i32 {address}, i8* {source}, i32 {bytes})"
                ));
            }
            Flavor::Host => {
                let tid = self.tid.clone();
                self.emit(format!(
                    "call void @einfuse_tc_cp_async(i8* %sync, i64 {tid}, i8* %shared, i32 {offset}, i8* {source}, \
                     i32 {bytes})"
                ))
            }
        }
    }

    fn commit(&mut self) {
        match self.flavor {
            Flavor::Nvptx => self.emit("call void asm sideeffect \"cp.async.commit_group;\", \"~{memory}\"()"),
            Flavor::Host => {
                let tid = self.tid.clone();
                self.emit(format!("call void @einfuse_tc_commit(i8* %sync, i64 {tid})"))
            }
        }
    }

    /// Waits until at most `pending` of this thread's committed groups of copies are in flight.
    fn wait(&mut self, pending: u32) {
        match self.flavor {
            Flavor::Nvptx => {
                self.emit(format!("call void asm sideeffect \"cp.async.wait_group {pending};\", \"~{{memory}}\"()"))
            }
            Flavor::Host => {
                let tid = self.tid.clone();
                self.emit(format!("call void @einfuse_tc_wait(i8* %sync, i64 {tid}, i32 {pending})"))
            }
        }
    }

    fn barrier(&mut self) {
        match self.flavor {
            Flavor::Nvptx => self.emit("call void @llvm.nvvm.barrier0()"),
            Flavor::Host => {
                let tid = self.tid.clone();
                self.emit(format!("call void @einfuse_tc_barrier(i8* %sync, i64 {tid})"))
            }
        }
    }

    /// The value of the lane `distance` lanes away (in xor) within the warp.
    fn shuffle_xor(&mut self, value: &str, distance: u32) -> String {
        match self.flavor {
            Flavor::Nvptx => self.ins(format!(
                "call float @llvm.nvvm.shfl.sync.bfly.f32(i32 -1, float {value}, i32 {distance}, i32 31)"
            )),
            Flavor::Host => {
                let tid = self.tid.clone();
                self.ins(format!(
                    "call float @einfuse_tc_shuffle_xor(i8* %sync, i64 {tid}, float {value}, i32 {distance})"
                ))
            }
        }
    }

    // Tables.

    /// An entry of a table, loaded where it is used (hoisting every entry to the kernel's start
    /// would hold them all in registers for the whole kernel: the causal kernels then spill).
    fn load_i64(&mut self, table: &str, at: usize) -> String {
        let p = self.ins(format!("getelementptr i64, i64* {table}, i64 {at}"));
        self.ins(format!("load i64, i64* {p}, align 8"))
    }

    fn stride(&mut self, tensor: TensorId, position: usize) -> String {
        let at = self.stride_slots[tensor.index()] + position;
        self.load_i64("%strides", at)
    }

    fn base(&mut self, tensor: TensorId) -> String {
        let p = self.ins(format!("getelementptr i8*, i8** %values, i64 {}", tensor.index()));
        self.ins(format!("load i8*, i8** {p}, align 8"))
    }

    // The kernel.

    fn kernel(&mut self) -> Result<(), String> {
        let c = self.cascade();
        let plan = self.plan;
        // Where the thread is.
        let (tid, ctaid) = match self.flavor {
            Flavor::Nvptx => {
                let t = self.ins("call i32 @llvm.nvvm.read.ptx.sreg.tid.x()");
                let b = self.ins("call i32 @llvm.nvvm.read.ptx.sreg.ctaid.x()");
                (self.ins(format!("zext i32 {t} to i64")), self.ins(format!("zext i32 {b} to i64")))
            }
            Flavor::Host => ("%tid".to_string(), "%ctaid".to_string()),
        };
        self.tid = tid.clone();
        for r in 0..c.ranks.len() {
            let e = self.load_i64("%extents", r);
            self.extents.push(e);
        }
        self.lane = self.ins(format!("and i64 {tid}, 31"));
        self.warp = self.ins(format!("lshr i64 {tid}, 5"));
        let lane = self.lane.clone();
        let g = self.ins(format!("lshr i64 {lane}, 2"));
        let t = self.ins(format!("and i64 {lane}, 3"));
        self.two_t = self.ins(format!("shl i64 {t}, 1"));
        let queries = self.extents[plan.query.rank.index()].clone();
        let more = self.ins(format!("add i64 {queries}, {}", BLOCK_ROWS - 1));
        let query_blocks = self.ins(format!("udiv i64 {more}, {BLOCK_ROWS}"));
        let point = self.ins(format!("udiv i64 {ctaid}, {query_blocks}"));
        // The last query blocks first: under a causal mask they have the most keys.
        let backwards = self.ins(format!("urem i64 {ctaid}, {query_blocks}"));
        let last = self.ins(format!("sub i64 {query_blocks}, 1"));
        let query_block = self.ins(format!("sub i64 {last}, {backwards}"));
        let mut rest = point;
        let mut batch = vec![String::new(); plan.batch.len()];
        for (k, r) in plan.batch.iter().enumerate().rev() {
            let e = self.extents[r.index()].clone();
            batch[k] = self.ins(format!("urem i64 {rest}, {e}"));
            rest = self.ins(format!("udiv i64 {rest}, {e}"));
        }
        self.batch = batch;
        let first_row = self.ins(format!("mul i64 {query_block}, {BLOCK_ROWS}"));
        self.block_first = first_row.clone();
        let warp_row = self.ins(format!("mul i64 {}, {WARP_ROWS}", self.warp));
        let warp_first = self.ins(format!("add i64 {first_row}, {warp_row}"));
        self.warp_first = warp_first.clone();
        let row0 = self.ins(format!("add i64 {warp_first}, {g}"));
        let row1 = self.ins(format!("add i64 {row0}, 8"));
        self.rows = [row0, row1];

        // Storage for every tensor a warp keeps.
        for (t, class) in plan.classes.iter().enumerate() {
            let Some(class) = class else { continue };
            let length = match class {
                Class::Input => continue,
                Class::Score => self.score_elements(),
                Class::Row => 2,
                Class::Out => self.out_elements(),
            };
            let running = matches!(c.tensors[t].kind, TensorKind::Defined { iterative: Some(_) });
            let mut values = [String::new(), String::new()];
            let mut defined = [String::new(), String::new()];
            for k in 0..if running { 2 } else { 1 } {
                values[k] = self.l.slot(&format!("[{length} x float]"));
                defined[k] = self.l.slot(&format!("[{length} x i1]"));
            }
            self.stores[t] = Some(Store { class: *class, values, defined, length, running });
        }

        // The queries of the block, then the first key and value tiles.
        let q_rows = self.operand_rows(plan.q, &first_row)?;
        let q_base = plan.q_tile.offset.to_string();
        self.copy_tile(plan.q, &q_rows, &queries, plan.q_tile, plan.head_dim, &q_base);
        self.commit();
        self.copy_key_tiles("0")?;
        self.commit();
        self.wait(1);
        self.barrier();
        let [a_lanes, b_lanes] = self.lane_rows();
        self.a_lanes = a_lanes.clone();
        self.b_lanes = b_lanes;
        let warp_rows = self.ins(format!("mul i64 {}, {WARP_ROWS}", self.warp));
        let warp_lanes = (self.ins(format!("add i64 {}, {warp_rows}", a_lanes.0)), a_lanes.1.clone());
        for kstep in 0..plan.head_dim / 16 {
            // The warp's 16 rows, 16 dimensions: rows 0-7 and 8-15 of 8 dimensions, then the
            // next 8.
            let fragment = self.ldmatrix_at(plan.q_tile, &q_base, &warp_lanes, 0, 2 * kstep, false);
            self.q_fragments.push(fragment);
        }

        for e in plan.before.clone() {
            self.einsum(e)?;
        }

        // The loop over the tiles of the keys.
        let steps = self.extents[plan.tile.rank.index()].clone();
        let counter = self.l.slot("i64");
        self.emit(format!("store i64 0, i64* {counter}"));
        let head = self.l.label("tc.step");
        let body = self.l.label("tc.body");
        let exit = self.l.label("tc.exit");
        self.emit(format!("br label %{head}"));
        self.l.start_block(&head);
        let step = self.ins(format!("load i64, i64* {counter}"));
        self.step = step.clone();
        let mut more = self.ins(format!("icmp slt i64 {step}, {steps}"));
        if let Some(done) = self.block_done() {
            let going = self.ins(format!("xor i1 {done}, true"));
            more = self.ins(format!("and i1 {more}, {going}"));
        }
        self.emit(format!("br i1 {more}, label %{body}, label %{exit}"));
        self.l.start_block(&body);
        self.step = step.clone();
        let next = self.ins(format!("add i64 {step}, 1"));
        self.copy_key_tiles(&next)?;
        self.commit();
        self.wait(1);
        self.barrier();
        // A step whose skippable tensor is empty for the warp's rows changes nothing: the warp
        // (every lane alike) goes straight to the step's end.
        let skip = self.step_empty();
        let joined = self.l.label("tc.joined");
        if let Some(empty) = &skip {
            let compute = self.l.label("tc.compute");
            self.emit(format!("br i1 {empty}, label %{joined}, label %{compute}"));
            self.l.start_block(&compute);
        }
        match self.step_full() {
            Some(full) => {
                let (whole, partial) = (self.l.label("tc.full"), self.l.label("tc.partial"));
                self.emit(format!("br i1 {full}, label %{whole}, label %{partial}"));
                self.l.start_block(&whole);
                self.full = true;
                self.step_body()?;
                self.full = false;
                self.emit(format!("br label %{joined}"));
                self.l.start_block(&partial);
                self.step_body()?;
            }
            None => self.step_body()?,
        }
        self.emit(format!("br label %{joined}"));
        self.l.start_block(&joined);
        self.barrier();
        self.emit(format!("store i64 {next}, i64* {counter}"));
        self.emit(format!("br label %{head}"));
        self.l.start_block(&exit);
        self.step = String::new();
        self.wait(0);

        for e in plan.after.clone() {
            self.einsum(e)?;
        }
        for o in c.outputs.clone() {
            self.store_output(o)?;
        }
        Ok(())
    }

    /// The first row of the block's tile of `operand` (queries: the block's first query row;
    /// keys and values: the step's first key), as the coordinate of the operand's row rank, and
    /// the offset of the batch point, in elements.
    fn operand_rows(&mut self, operand: TensorId, first: &str) -> Result<(String, String, String), String> {
        let c = self.cascade();
        let plan = self.plan;
        let Some((_, subscripts)) =
            c.einsums.iter().flat_map(|e| e.body.accesses()).find(|(t, _)| *t == operand).map(|(t, s)| (t, s.to_vec()))
        else {
            return Err("an operand is not read".into());
        };
        let mut offset = "0".to_string();
        let mut row_stride = None;
        for (position, s) in subscripts.iter().enumerate() {
            let stride = self.stride(operand, position);
            if crate::schedule::layout::split_point(c, s) == Some(plan.key) || s.as_index() == Some(plan.query) {
                row_stride = Some(stride);
                continue;
            }
            match s.as_index() {
                Some(i) if i == plan.head || i == plan.column => continue,
                Some(i) => {
                    let Some(k) = plan.batch.iter().position(|r| *r == i.rank) else {
                        return Err(format!(
                            "`{}` is read at a coordinate that is not a batch rank's",
                            c.tensor(operand).name
                        ));
                    };
                    let b = self.batch[k].clone();
                    let m = self.ins(format!("mul i64 {b}, {stride}"));
                    offset = self.ins(format!("add i64 {offset}, {m}"));
                }
                None => return Err(format!("`{}` is read at a computed coordinate", c.tensor(operand).name)),
            }
        }
        let row_stride = row_stride.ok_or("an operand has no row")?;
        Ok((first.to_string(), offset, row_stride))
    }

    /// The Einsums of one step, then the running tensors' new iterates copied into the old.
    fn step_body(&mut self) -> Result<(), String> {
        for e in self.plan.inside.clone() {
            self.einsum(e)?;
        }
        // The running tensors' new iterates become the old ones.
        for store in self.stores.clone().into_iter().flatten().filter(|s| s.running) {
            for k in 0..store.length {
                for (ty, pair) in [("float", &store.values), ("i1", &store.defined)] {
                    let from = self.ins(format!(
                        "getelementptr [{0} x {ty}], [{0} x {ty}]* {1}, i64 0, i64 {k}",
                        store.length, pair[1]
                    ));
                    let v = self.ins(format!("load {ty}, {ty}* {from}"));
                    let to = self.ins(format!(
                        "getelementptr [{0} x {ty}], [{0} x {ty}]* {1}, i64 0, i64 {k}",
                        store.length, pair[0]
                    ));
                    self.emit(format!("store {ty} {v}, {ty}* {to}"));
                }
            }
        }
        Ok(())
    }

    /// Whether the warp's part of the current step is empty (an i1, the same in every lane), where
    /// the plan can tell: the largest margin of a filter of the skippable tensor over the step's
    /// keys and the warp's rows is below its least.
    fn step_empty(&mut self) -> Option<String> {
        let rows = (self.warp_first.clone(), WARP_ROWS);
        self.some_margin_below(rows, false)
    }

    /// Whether the block is done with the keys at the current step (an i1, the same in every
    /// thread): a margin of the skippable tensor's filter that only falls as the step grows (the
    /// causal mask's `p - m`) is below its least for every key of the step and row of the block,
    /// so this step and every later one are empty.
    fn block_done(&mut self) -> Option<String> {
        let rows = (self.block_first.clone(), BLOCK_ROWS);
        self.some_margin_below(rows, true)
    }

    /// Whether some margin of the skippable tensor's filter (with `falling`, only those that fall
    /// as the step grows) is below its least over the step's keys and `rows.1` rows from `rows.0`;
    /// `None` where no margin can tell.
    fn some_margin_below(&mut self, rows: (String, u64), falling: bool) -> Option<String> {
        let plan = self.plan;
        let mut below: Option<String> = None;
        for margin in &plan.skip {
            if falling && margin.margin.indices.get(&plan.tile).is_none_or(|k| *k >= 0) {
                continue;
            }
            let Some(value) = self.margin_extreme_over(margin, true, rows.clone()) else { continue };
            let under = self.ins(format!("icmp slt i64 {value}, {}", margin.least));
            below = Some(match below {
                None => under,
                Some(b) => self.ins(format!("or i1 {b}, {under}")),
            });
        }
        below
    }

    /// Whether the warp's part of the current step is full (an i1, the same in every lane): its
    /// keys all inside their rank and every filter's smallest margin over the step's keys and
    /// the warp's rows at least its least.
    fn step_full(&mut self) -> Option<String> {
        let plan = self.plan;
        let margins = plan.full.as_ref()?;
        let next = self.ins(format!("add i64 {}, 1", self.step));
        let end = self.ins(format!("mul i64 {next}, {}", plan.key_tile));
        let keys = self.extents[plan.keys.index()].clone();
        let mut full = self.ins(format!("icmp sle i64 {end}, {keys}"));
        for margin in margins {
            let value = self.margin_extreme(margin, false)?;
            let holds = self.ins(format!("icmp sge i64 {value}, {}", margin.least));
            full = self.ins(format!("and i1 {full}, {holds}"));
        }
        Some(full)
    }

    /// The largest (or smallest) value of a margin over the current step's keys and the warp's
    /// rows (an i64), where its indices are the step's, the keys', the rows' or batch ranks'.
    fn margin_extreme(&mut self, margin: &crate::schedule::full_steps::Margin, largest: bool) -> Option<String> {
        let rows = (self.warp_first.clone(), WARP_ROWS);
        self.margin_extreme_over(margin, largest, rows)
    }

    /// The same over `rows.1` query rows from `rows.0`.
    fn margin_extreme_over(
        &mut self,
        margin: &crate::schedule::full_steps::Margin,
        largest: bool,
        rows: (String, u64),
    ) -> Option<String> {
        use crate::schedule::full_steps::{At as Place, MarginTerm};
        let plan = self.plan;
        let terms = margin.extreme_terms(plan.tile, largest)?;
        let mut value = margin.margin.constant.to_string();
        for term in terms {
            let (x, k) = match term {
                MarginTerm::Extent { rank, k } => (self.extents[rank.index()].clone(), k),
                MarginTerm::Coordinate { index, at, k } => {
                    let x = if index == plan.tile {
                        self.step.clone()
                    } else if index == plan.key {
                        if at == Place::Last {
                            (plan.key_tile - 1).to_string()
                        } else {
                            "0".into()
                        }
                    } else if index == plan.query {
                        let first = rows.0.clone();
                        if at == Place::Last {
                            self.ins(format!("add i64 {first}, {}", rows.1 - 1))
                        } else {
                            first
                        }
                    } else {
                        let k = plan.batch.iter().position(|r| *r == index.rank && index.primes == 0)?;
                        self.batch[k].clone()
                    };
                    (x, k)
                }
            };
            let part = self.ins(format!("mul i64 {x}, {k}"));
            value = self.ins(format!("add i64 {value}, {part}"));
        }
        Some(value)
    }

    /// Starts copying rows `first..first + tile.rows` of `operand` into the tile at byte
    /// `tile_base` with `tile`'s geometry (rows past `extent` read as zeros): each thread copies
    /// every `THREADS`-th chunk of 16 bytes.
    fn copy_tile(
        &mut self,
        operand: TensorId,
        rows: &(String, String, String),
        extent: &str,
        tile: SharedTile,
        columns: u64,
        tile_base: &str,
    ) {
        let (first, batch_offset, row_stride) = rows.clone();
        let base = self.base(operand);
        let chunks_per_row = columns / 8;
        let total = tile.rows * chunks_per_row;
        let tid = self.tid.clone();
        for k in 0..total.div_ceil(THREADS) {
            let chunk_id = self.ins(format!("add i64 {tid}, {}", k * THREADS));
            let within = self.ins(format!("icmp ult i64 {chunk_id}, {total}"));
            let kept_id = self.ins(format!("select i1 {within}, i64 {chunk_id}, i64 0"));
            let row = self.ins(format!("udiv i64 {kept_id}, {chunks_per_row}"));
            let chunk = self.ins(format!("urem i64 {kept_id}, {chunks_per_row}"));
            let global_row = self.ins(format!("add i64 {first}, {row}"));
            let inside = self.ins(format!("icmp slt i64 {global_row}, {extent}"));
            let kept_row = self.ins(format!("select i1 {inside}, i64 {global_row}, i64 0"));
            let row_offset = self.ins(format!("mul i64 {kept_row}, {row_stride}"));
            let column = self.ins(format!("mul i64 {chunk}, 8"));
            let element = self.ins(format!("add i64 {row_offset}, {column}"));
            let element = self.ins(format!("add i64 {element}, {batch_offset}"));
            let byte = self.ins(format!("mul i64 {element}, 2"));
            let source = self.ins(format!("getelementptr i8, i8* {base}, i64 {byte}"));
            let bytes = self.ins(format!("select i1 {inside}, i32 16, i32 0"));
            let offset = self.tile_offset(tile, tile_base, &row, &chunk);
            if total % THREADS == 0 {
                self.cp_async(&offset, &source, &bytes);
            } else {
                // Only where the tile has fewer chunks than threads: the branch depends on the
                // thread, and holds no warp-collective instruction.
                let go = self.l.label("tc.copy");
                let done = self.l.label("tc.copied");
                self.emit(format!("br i1 {within}, label %{go}, label %{done}"));
                self.l.start_block(&go);
                self.cp_async(&offset, &source, &bytes);
                self.emit(format!("br label %{done}"));
                self.l.start_block(&done);
            }
        }
    }

    /// The byte (i32) of chunk `chunk` of row `row` of a tile with `tile`'s geometry at byte
    /// `base` (an i64).
    fn tile_offset(&mut self, tile: SharedTile, base: &str, row: &str, chunk: &str) -> String {
        let row_part = self.ins(format!("mul i64 {row}, {}", tile.row_bytes));
        let phase = self.ins(format!("and i64 {row}, {}", tile.swizzle - 1));
        let swizzled = self.ins(format!("xor i64 {chunk}, {phase}"));
        let chunk_part = self.ins(format!("shl i64 {swizzled}, 4"));
        let offset = self.ins(format!("add i64 {base}, {row_part}"));
        let offset = self.ins(format!("add i64 {offset}, {chunk_part}"));
        self.ins(format!("trunc i64 {offset} to i32"))
    }

    /// The byte (i64) where the tile of this parity of `tiles` starts.
    fn parity_base(&mut self, step: &str, tiles: [SharedTile; 2]) -> String {
        let parity = self.ins(format!("and i64 {step}, 1"));
        let shift = self.ins(format!("mul i64 {parity}, {}", tiles[1].offset - tiles[0].offset));
        self.ins(format!("add i64 {shift}, {}", tiles[0].offset))
    }

    /// Starts copying the key and value tiles of step `step` into the buffers of its parity.
    fn copy_key_tiles(&mut self, step: &str) -> Result<(), String> {
        let plan = self.plan;
        let first = self.ins(format!("mul i64 {step}, {}", plan.key_tile));
        let keys = self.extents[plan.keys.index()].clone();
        for (operand, tiles, columns) in [(plan.k, plan.k_tiles, plan.head_dim), (plan.v, plan.v_tiles, plan.columns)] {
            let rows = self.operand_rows(operand, &first)?;
            let base = self.parity_base(step, tiles);
            self.copy_tile(operand, &rows, &keys, tiles[0], columns, &base);
        }
        Ok(())
    }

    /// `ldmatrix` row addresses: lane `l` gives row `l % 8 + 8 * ((l / 8) % 2)` and chunk
    /// `l / 16` (an A operand, or a transposed B operand), or row `l % 8 + 8 * (l / 16)` and chunk
    /// `(l / 8) % 2` (a B operand stored by its n rows).
    fn lane_rows(&mut self) -> [(String, String); 2] {
        let lane = self.lane.clone();
        let low = self.ins(format!("and i64 {lane}, 7"));
        let eighth = self.ins(format!("lshr i64 {lane}, 3"));
        let odd = self.ins(format!("and i64 {eighth}, 1"));
        let sixteenth = self.ins(format!("lshr i64 {lane}, 4"));
        let a_high = self.ins(format!("shl i64 {odd}, 3"));
        let a_row = self.ins(format!("add i64 {low}, {a_high}"));
        let b_high = self.ins(format!("shl i64 {sixteenth}, 3"));
        let b_row = self.ins(format!("add i64 {low}, {b_high}"));
        [(a_row, sixteenth), (b_row, odd)]
    }

    fn ldmatrix_at(
        &mut self,
        tile: SharedTile,
        base: &str,
        lane: &(String, String),
        row: u64,
        chunk: u64,
        trans: bool,
    ) -> [String; 4] {
        let r = self.ins(format!("add i64 {}, {row}", lane.0));
        let c = self.ins(format!("add i64 {}, {chunk}", lane.1));
        let offset = self.tile_offset(tile, base, &r, &c);
        self.ldmatrix(&offset, trans)
    }
}

/// Evaluating Einsums on fragments.
impl Gen<'_> {
    /// The elements of a class, as places to evaluate at.
    fn places(&self, class: Class) -> Vec<At> {
        match class {
            Class::Score => (0..self.plan.key_tile / 8).flat_map(|j| (0..4).map(move |i| At::Score { j, i })).collect(),
            Class::Out => (0..self.plan.columns / 8).flat_map(|j| (0..4).map(move |i| At::Out { j, i })).collect(),
            Class::Row => vec![At::Row { r: 0 }, At::Row { r: 1 }],
            Class::Input => vec![],
        }
    }

    fn slot_of(at: At) -> u64 {
        match at {
            At::Score { j, i } | At::Out { j, i } => j * 4 + i,
            At::Row { r } => r,
        }
    }

    /// The iterate that the subscripts of a tensor's streamed position name.
    fn iterate(&self, tensor: TensorId, subscripts: &[Affine]) -> Iterate {
        let c = self.cascade();
        for (s, r) in subscripts.iter().zip(&c.tensor(tensor).ranks) {
            if *r == self.plan.tile.rank {
                if let Affine::Add(a, b) = s {
                    if a.as_index() == Some(self.plan.tile) && matches!(**b, Affine::Const(1)) {
                        return Iterate::New;
                    }
                }
            }
        }
        Iterate::Old
    }

    fn store_element(&self, tensor: TensorId, at: At) -> Result<(Store, u64), String> {
        let c = self.cascade();
        let store =
            self.stores[tensor.index()].clone().ok_or_else(|| format!("`{}` has no storage", c.tensor(tensor).name))?;
        let slot = match (store.class, at) {
            (Class::Row, _) => at.row(),
            (Class::Score, At::Score { .. }) | (Class::Out, At::Out { .. }) => Self::slot_of(at),
            _ => {
                return Err(format!(
                    "`{}` is read where the warp keeps other elements than its own",
                    c.tensor(tensor).name
                ))
            }
        };
        Ok((store, slot))
    }

    fn read(&mut self, tensor: TensorId, subscripts: &[Affine], at: At) -> Result<(String, Option<String>), String> {
        let (store, slot) = self.store_element(tensor, at)?;
        let k = match self.iterate(tensor, subscripts) {
            Iterate::New if store.running => 1,
            _ => 0,
        };
        let n = store.length;
        let p = self.ins(format!("getelementptr [{n} x float], [{n} x float]* {}, i64 0, i64 {slot}", store.values[k]));
        let v = self.ins(format!("load float, float* {p}"));
        let q = self.ins(format!("getelementptr [{n} x i1], [{n} x i1]* {}, i64 0, i64 {slot}", store.defined[k]));
        let d = self.ins(format!("load i1, i1* {q}"));
        Ok((v, Some(d)))
    }

    fn write(&mut self, einsum: &Einsum, at: At, value: &str, defined: Option<String>) -> Result<(), String> {
        let (store, slot) = self.store_element(einsum.target, at)?;
        let k = usize::from(einsum.recurrence_index().is_some() && store.running);
        let n = store.length;
        let p = self.ins(format!("getelementptr [{n} x float], [{n} x float]* {}, i64 0, i64 {slot}", store.values[k]));
        self.emit(format!("store float {value}, float* {p}"));
        let q = self.ins(format!("getelementptr [{n} x i1], [{n} x i1]* {}, i64 0, i64 {slot}", store.defined[k]));
        self.emit(format!("store i1 {}, i1* {q}", defined.as_deref().unwrap_or("true")));
        Ok(())
    }

    /// Writes an Einsum's value at `at`: defined where its operands are, its key is inside its
    /// rank and its filter holds.
    fn write_where(&mut self, einsum: &Einsum, at: At, value: &str, defined: Option<String>) -> Result<(), String> {
        let inside = self.key_inside(at);
        let kept = self.filter(einsum, at)?;
        let d = self.and(defined, inside);
        let d = self.and(d, kept);
        self.write(einsum, at, value, d)
    }

    /// The coordinate (i64) of `index` at `at`.
    fn coordinate(&mut self, index: Index, at: At) -> Result<String, String> {
        let plan = self.plan;
        let column_of = |g: &mut Self, j: u64, i: u64| {
            let two_t = g.two_t.clone();
            g.ins(format!("add i64 {two_t}, {}", 8 * j + (i & 1)))
        };
        if index == plan.query {
            return Ok(self.rows[at.row() as usize].clone());
        }
        if index == plan.key {
            if let At::Score { j, i } = at {
                return Ok(column_of(self, j, i));
            }
        }
        if index == plan.column {
            if let At::Out { j, i } = at {
                return Ok(column_of(self, j, i));
            }
        }
        if index == plan.tile && !self.step.is_empty() {
            return Ok(self.step.clone());
        }
        if index.primes == 0 {
            if let Some(k) = plan.batch.iter().position(|r| *r == index.rank) {
                return Ok(self.batch[k].clone());
            }
        }
        Err(format!("the index `{}` is used where a warp has no single value of it", self.cascade().index_name(index)))
    }

    fn affine(&mut self, a: &Affine, at: At) -> Result<String, String> {
        Ok(match a {
            Affine::Const(k) => k.to_string(),
            Affine::Index(i) => self.coordinate(*i, at)?,
            Affine::Extent(r) => self.extents[r.index()].clone(),
            Affine::Add(x, y) | Affine::Sub(x, y) | Affine::Mul(x, y) => {
                let (u, v) = (self.affine(x, at)?, self.affine(y, at)?);
                let op = match a {
                    Affine::Add(..) => "add",
                    Affine::Sub(..) => "sub",
                    _ => "mul",
                };
                self.ins(format!("{op} i64 {u}, {v}"))
            }
            Affine::Neg(x) => {
                let u = self.affine(x, at)?;
                self.ins(format!("sub i64 0, {u}"))
            }
        })
    }

    /// Whether the score element at `at` is a key of the rank (its tile may be ragged).
    fn key_inside(&mut self, at: At) -> Option<String> {
        let At::Score { .. } = at else { return None };
        if self.full {
            return None;
        }
        let plan = self.plan;
        let key = self.coordinate(plan.key, at).ok()?;
        let first = self.ins(format!("mul i64 {}, {}", self.step, plan.key_tile));
        let m = self.ins(format!("add i64 {first}, {key}"));
        let keys = self.extents[plan.keys.index()].clone();
        Some(self.ins(format!("icmp slt i64 {m}, {keys}")))
    }

    fn and(&mut self, a: Option<String>, b: Option<String>) -> Option<String> {
        self.l.and_def(a, b)
    }

    /// Whether an Einsum's filter holds at `at` (always, in a full step).
    fn filter(&mut self, einsum: &Einsum, at: At) -> Result<Option<String>, String> {
        if self.full {
            return Ok(None);
        }
        self.conditions(&einsum.filter, at)
    }

    fn conditions(&mut self, conds: &[Cond], at: At) -> Result<Option<String>, String> {
        let mut ok = None;
        for cond in conds {
            let (a, da) = self.eval(&cond.lhs, at)?;
            let (b, db) = self.eval(&cond.rhs, at)?;
            let holds = self.ins(format!("fcmp {} float {a}, {b}", Lowering::condition_code(cond.op)));
            let holds = self.and(Some(holds), da);
            let holds = self.and(holds, db);
            ok = self.and(ok, holds);
        }
        Ok(ok)
    }

    /// The value of `expr` at `at` and whether it is defined.
    fn eval(&mut self, expr: &Expr, at: At) -> Result<(String, Option<String>), String> {
        let c = self.cascade();
        Ok(match expr {
            Expr::Const(x) => (float(*x as f32), None),
            Expr::Param(p) => (float(c.param(*p).value as f32), None),
            Expr::Extent(r) => {
                let e = self.extents[r.index()].clone();
                (self.ins(format!("sitofp i64 {e} to float")), None)
            }
            Expr::Index(i) => {
                let v = self.coordinate(*i, at)?;
                (self.ins(format!("sitofp i64 {v} to float")), None)
            }
            Expr::Access { tensor, subscripts } => match c.tensor(*tensor).kind {
                TensorKind::Input { .. } => self.load_input(*tensor, subscripts, at)?,
                TensorKind::Defined { .. } => self.read(*tensor, subscripts, at)?,
            },
            Expr::Unary(op, x) => {
                let (x, d) = self.eval(x, at)?;
                (self.l.unary(*op, &x), d)
            }
            Expr::Binary(op, x, y) => {
                let (x, dx) = self.eval(x, at)?;
                let (y, dy) = self.eval(y, at)?;
                let v = self.l.binary(*op, &x, &y);
                (v, self.and(dx, dy))
            }
            Expr::Reduce { op, indices, filter, body } => {
                let At::Row { r } = at else { return Err("a reduction is nested in an element-wise Einsum".into()) };
                if indices.as_slice() != [self.plan.key] {
                    return Err("a reduction runs over other indices than the keys of a tile".into());
                }
                let mut acc = float(reduce_identity(*op) as f32);
                for j in 0..self.plan.key_tile / 8 {
                    for i in [2 * r, 2 * r + 1] {
                        let place = At::Score { j, i };
                        let (x, d) = self.eval(body, place)?;
                        let inside = self.key_inside(place);
                        let kept = self.conditions(filter, place)?;
                        let d = self.and(d, inside);
                        let d = self.and(d, kept);
                        let folded = self.fold(*op, &acc, &x);
                        acc = match d {
                            None => folded,
                            Some(d) => self.ins(format!("select i1 {d}, float {folded}, float {acc}")),
                        };
                    }
                }
                // The four threads of a quad hold the row's other columns.
                for distance in [1, 2] {
                    let other = self.shuffle_xor(&acc, distance);
                    acc = self.fold(*op, &acc, &other);
                }
                (acc, None)
            }
        })
    }

    fn fold(&mut self, op: ReduceOp, acc: &str, x: &str) -> String {
        match op {
            ReduceOp::Sum => self.l.binary(BinaryOp::Add, acc, x),
            ReduceOp::Max => self.l.binary(BinaryOp::Max, acc, x),
            ReduceOp::Min => self.l.binary(BinaryOp::Min, acc, x),
        }
    }

    /// An f32 input's element, read from global memory; undefined (and read at its first
    /// element) where a coordinate is out of range.
    fn load_input(
        &mut self,
        tensor: TensorId,
        subscripts: &[Affine],
        at: At,
    ) -> Result<(String, Option<String>), String> {
        let c = self.cascade();
        let ranks = c.tensor(tensor).ranks.clone();
        let mut offset = "0".to_string();
        let mut ok = None;
        for (position, (s, r)) in subscripts.iter().zip(&ranks).enumerate() {
            let v = self.affine(s, at)?;
            let extent = self.extents[r.index()].clone();
            let low = self.ins(format!("icmp sge i64 {v}, 0"));
            let high = self.ins(format!("icmp slt i64 {v}, {extent}"));
            let inside = self.ins(format!("and i1 {low}, {high}"));
            ok = self.and(ok, Some(inside.clone()));
            let kept = self.ins(format!("select i1 {inside}, i64 {v}, i64 0"));
            let stride = self.stride(tensor, position);
            let part = self.ins(format!("mul i64 {kept}, {stride}"));
            offset = self.ins(format!("add i64 {offset}, {part}"));
        }
        if let Some(ok) = &ok {
            offset = self.ins(format!("select i1 {ok}, i64 {offset}, i64 0"));
        }
        let base = self.base(tensor);
        let floats = self.ins(format!("bitcast i8* {base} to float*"));
        let p = self.ins(format!("getelementptr float, float* {floats}, i64 {offset}"));
        Ok((self.ins(format!("load float, float* {p}")), ok))
    }

    fn einsum(&mut self, e: EinsumId) -> Result<(), String> {
        if e == self.plan.scores {
            return self.scores();
        }
        if e == self.plan.product {
            return self.product();
        }
        if self.plan.accumulate.as_ref().is_some_and(|a| a.einsum == e) {
            // Run by the product's multiply-accumulates.
            return Ok(());
        }
        let c = self.cascade();
        let einsum = &c.einsums[e.index()];
        let class = self.stores[einsum.target.index()].as_ref().map(|s| s.class).ok_or("an Einsum writes an input")?;
        for at in self.places(class) {
            let (v, d) = self.eval(&einsum.body, at)?;
            self.write_where(einsum, at, &v, d)?;
        }
        Ok(())
    }

    /// The scores of the step: the key tile's fragments by the queries' fragments, then the
    /// factors besides `Q` and `K` and the Einsum's filter on each element.
    fn scores(&mut self) -> Result<(), String> {
        let c = self.cascade();
        let plan = self.plan;
        let einsum = &c.einsums[plan.scores.index()];
        if let Expr::Reduce { filter, .. } = &einsum.body {
            if !filter.is_empty() {
                return Err("the scores' reduction has a filter".into());
            }
        }
        let zero = float(0.0);
        let mut acc: Vec<[String; 4]> = (0..plan.key_tile / 8).map(|_| std::array::from_fn(|_| zero.clone())).collect();
        let base = self.parity_base(&self.step.clone(), plan.k_tiles);
        let lanes = self.b_lanes.clone();
        for kstep in 0..plan.head_dim / 16 {
            let a = self.q_fragments[kstep as usize].clone();
            for n in 0..plan.key_tile / 16 {
                let b = self.ldmatrix_at(plan.k_tiles[0], &base, &lanes, 16 * n, 2 * kstep, false);
                let j = 2 * n as usize;
                acc[j] = self.mma(&a, &[b[0].clone(), b[1].clone()], &acc[j]);
                acc[j + 1] = self.mma(&a, &[b[2].clone(), b[3].clone()], &acc[j + 1]);
            }
        }
        for at in self.places(Class::Score) {
            let At::Score { j, i } = at else { unreachable!() };
            let mut v = acc[j as usize][i as usize].clone();
            let mut d = None;
            for f in &plan.score_factors {
                let (x, dx) = self.eval(f, at)?;
                v = self.l.binary(BinaryOp::Mul, &v, &x);
                d = self.and(d, dx);
            }
            self.write_where(einsum, at, &v, d)?;
        }
        Ok(())
    }

    /// The value product of the step: the probabilities, rounded to 16 bits in the registers of
    /// the score fragments (zero where undefined), by the value tile's fragments.
    fn product(&mut self) -> Result<(), String> {
        let c = self.cascade();
        let plan = self.plan;
        let einsum = &c.einsums[plan.product.index()];
        let Expr::Reduce { filter, .. } = &einsum.body else { return Err("the value product is not a sum".into()) };
        if !einsum.filter.is_empty() {
            return Err("the value product has a filter".into());
        }
        let mut a_fragments = Vec::new();
        for kk in 0..plan.key_tile / 16 {
            let mut regs: [String; 4] = Default::default();
            for (reg, (j, i0)) in [(2 * kk, 0), (2 * kk, 2), (2 * kk + 1, 0), (2 * kk + 1, 2)].into_iter().enumerate() {
                let mut halves = Vec::new();
                for i in [i0, i0 + 1] {
                    let at = At::Score { j, i };
                    let mut v: Option<String> = None;
                    let mut d = None;
                    for f in &plan.probability_factors {
                        let (x, dx) = self.eval(f, at)?;
                        v = Some(match v {
                            None => x,
                            Some(v) => self.l.binary(BinaryOp::Mul, &v, &x),
                        });
                        d = self.and(d, dx);
                    }
                    let v = v.unwrap_or_else(|| float(1.0));
                    let inside = self.key_inside(at);
                    let kept = self.conditions(filter, at)?;
                    let d = self.and(d, inside);
                    let d = self.and(d, kept);
                    let v = match d {
                        None => v,
                        Some(d) => self.ins(format!("select i1 {d}, float {v}, float 0.0")),
                    };
                    let bits = self.l.narrow(plan.elem, &v).expect("a 16-bit type");
                    halves.push(self.ins(format!("zext i16 {bits} to i32")));
                }
                let high = self.ins(format!("shl i32 {}, 16", halves[1]));
                regs[reg] = self.ins(format!("or i32 {high}, {}", halves[0]));
            }
            a_fragments.push(regs);
        }
        let base = self.parity_base(&self.step.clone(), plan.v_tiles);
        let lanes = self.a_lanes.clone();
        // The accumulators start at zero, or at the running output's previous iterate (scaled).
        let zero = float(0.0);
        let mut acc: Vec<[String; 4]> = (0..plan.columns / 8).map(|_| std::array::from_fn(|_| zero.clone())).collect();
        let mut target = einsum;
        if let Some(accumulate) = &plan.accumulate {
            target = &c.einsums[accumulate.einsum.index()];
            let previous: Vec<Affine> = target
                .lhs
                .iter()
                .map(|l| match l {
                    Lhs::Next(i) | Lhs::Index(i) => Affine::Index(*i),
                    Lhs::Initial => Affine::Const(0),
                })
                .collect();
            for at in self.places(Class::Out) {
                let At::Out { j, i } = at else { unreachable!() };
                let (mut v, _) = self.read(target.target, &previous, at)?;
                if let Some(scale) = &accumulate.scale {
                    let (x, _) = self.eval(scale, at)?;
                    v = self.l.binary(BinaryOp::Mul, &v, &x);
                }
                acc[j as usize][i as usize] = v;
            }
        }
        for n in 0..plan.columns / 16 {
            for (kk, a) in a_fragments.iter().enumerate() {
                let b = self.ldmatrix_at(plan.v_tiles[0], &base, &lanes, 16 * kk as u64, 2 * n, true);
                let j = 2 * n as usize;
                acc[j] = self.mma(a, &[b[0].clone(), b[1].clone()], &acc[j]);
                acc[j + 1] = self.mma(a, &[b[2].clone(), b[3].clone()], &acc[j + 1]);
            }
        }
        for at in self.places(Class::Out) {
            let At::Out { j, i } = at else { unreachable!() };
            let v = acc[j as usize][i as usize].clone();
            self.write(target, at, &v, None)?;
        }
        Ok(())
    }

    /// Writes an output's elements of the thread's rows that exist (undefined points as 0).
    fn store_output(&mut self, output: Output) -> Result<(), String> {
        let c = self.cascade();
        let plan = self.plan;
        let tensor = output.tensor;
        let class = self.stores[tensor.index()].as_ref().map(|s| s.class).ok_or("an output is an input")?;
        let base = self.base(tensor);
        let queries = self.extents[plan.query.rank.index()].clone();
        let ranks = c.tensor(tensor).ranks.clone();
        let first_of_quad = {
            let two_t = self.two_t.clone();
            self.ins(format!("icmp eq i64 {two_t}, 0"))
        };
        for at in self.places(class) {
            let subscripts: Vec<Affine> = ranks
                .iter()
                .map(|r| {
                    if *r == plan.column.rank {
                        Affine::Index(plan.column)
                    } else if *r == plan.query.rank {
                        Affine::Index(plan.query)
                    } else {
                        Affine::Index(Index { rank: *r, primes: 0 })
                    }
                })
                .collect();
            let (v, d) = self.read(tensor, &subscripts, at)?;
            let v = match d {
                None => v,
                Some(d) => self.ins(format!("select i1 {d}, float {v}, float 0.0")),
            };
            let mut offset = "0".to_string();
            for (position, s) in subscripts.iter().enumerate() {
                let x = self.affine(s, at)?;
                let stride = self.stride(tensor, position);
                let part = self.ins(format!("mul i64 {x}, {stride}"));
                offset = self.ins(format!("add i64 {offset}, {part}"));
            }
            let row = self.rows[at.row() as usize].clone();
            let mut live = self.ins(format!("icmp slt i64 {row}, {queries}"));
            if class == Class::Row {
                live = self.ins(format!("and i1 {live}, {first_of_quad}"));
            }
            let go = self.l.label("tc.store");
            let done = self.l.label("tc.stored");
            self.emit(format!("br i1 {live}, label %{go}, label %{done}"));
            self.l.start_block(&go);
            match self.l.narrow(output.elem, &v) {
                None => {
                    let floats = self.ins(format!("bitcast i8* {base} to float*"));
                    let p = self.ins(format!("getelementptr float, float* {floats}, i64 {offset}"));
                    self.emit(format!("store float {v}, float* {p}"));
                }
                Some(bits) => {
                    let halves = self.ins(format!("bitcast i8* {base} to i16*"));
                    let p = self.ins(format!("getelementptr i16, i16* {halves}, i64 {offset}"));
                    self.emit(format!("store i16 {bits}, i16* {p}"));
                }
            }
            self.emit(format!("br label %{done}"));
            self.l.start_block(&done);
        }
        Ok(())
    }
}
