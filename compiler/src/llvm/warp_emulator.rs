//! The host emulation of tensor-core kernels (`tensor_cores`): 32-lane warps whose lanes are OS
//! threads that meet at every warp-collective instruction.
//!
//! Needs: a kernel lowered by `tensor_cores::lower` for `Flavor::Host`. Guarantees: each
//! collective computes what the PTX ISA says, with its fragment layouts: `mma.sync.m16n8k16`
//! (f16 or bf16 operands, f32 accumulation; the products summed in order, in f32), `ldmatrix
//! .x4` with and without `.trans` (rows must be 16-byte aligned), `shfl.sync.bfly`, and
//! `cp.async` with its groups: the destination reads as NaN from the copy's start until a
//! `cp.async.wait_group` completes it, so a missing wait or barrier shows in the results. An
//! instruction used against its rules (a misaligned address) fails the call with a message.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use super::BlockBarrier;

/// A warp's meeting point and the values its lanes exchange.
struct Warp {
    barrier: BlockBarrier,
    /// Per lane: A (4 registers), B (2), C (4 f32 bits).
    registers: Vec<[AtomicU32; 10]>,
    /// Per lane: an `ldmatrix` row address (a byte of shared memory).
    addresses: Vec<AtomicU64>,
}

/// One copy of a `cp.async`: 16 bytes to shared memory, the first `bytes` from `source`.
struct Copy {
    destination: usize,
    source: usize,
    bytes: usize,
}

#[derive(Default)]
struct Copies {
    open: Vec<Copy>,
    committed: std::collections::VecDeque<Vec<Copy>>,
}

/// The state of one emulated block.
pub struct Block {
    barrier: BlockBarrier,
    warps: Vec<Warp>,
    copies: Vec<Mutex<Copies>>,
    shared: *mut u8,
    shared_bytes: usize,
    error: Mutex<Option<String>>,
}

// SAFETY: the threads of a block touch shared memory only as the kernel's barriers allow.
unsafe impl Sync for Block {}
unsafe impl Send for Block {}

impl Block {
    pub fn new(threads: usize, shared: *mut u8, shared_bytes: usize) -> Block {
        let warps = threads.div_ceil(32);
        Block {
            barrier: BlockBarrier::new(threads as u64),
            warps: (0..warps)
                .map(|_| Warp {
                    barrier: BlockBarrier::new(32),
                    registers: (0..32).map(|_| std::array::from_fn(|_| AtomicU32::new(0))).collect(),
                    addresses: (0..32).map(|_| AtomicU64::new(0)).collect(),
                })
                .collect(),
            copies: (0..threads).map(|_| Mutex::new(Copies::default())).collect(),
            shared,
            shared_bytes,
            error: Mutex::new(None),
        }
    }

    /// The first misuse a thread reported, if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn fail(&self, why: String) {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(why);
    }

    fn warp(&self, tid: usize) -> (&Warp, usize) {
        (&self.warps[tid / 32], tid % 32)
    }

    fn shared_u16(&self, byte: usize) -> u16 {
        if byte + 2 > self.shared_bytes {
            self.fail(format!("a read of shared memory at byte {byte} is past its {} bytes", self.shared_bytes));
            return 0;
        }
        // SAFETY: inside the block's shared memory (checked above).
        unsafe { (self.shared.add(byte) as *const u16).read_unaligned() }
    }

    fn mma(&self, tid: usize, kind: u32, a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
        let (warp, lane) = self.warp(tid);
        let mine = &warp.registers[lane];
        for (k, x) in a.iter().chain(&b).copied().chain(c.iter().map(|f| f.to_bits())).enumerate() {
            mine[k].store(x, Relaxed);
        }
        warp.barrier.wait();
        let widen = |bits: u32, high: bool| {
            let h = if high { (bits >> 16) as u16 } else { bits as u16 };
            if kind == 1 {
                half::bf16::from_bits(h).to_f32()
            } else {
                half::f16::from_bits(h).to_f32()
            }
        };
        // A[row][k] and B[k][col] as the PTX ISA lays them out in the lanes' registers.
        let a_at = |row: usize, k: usize| {
            let register = (row / 8) + 2 * (k / 8);
            let owner = 4 * (row % 8) + (k % 8) / 2;
            widen(warp.registers[owner][register].load(Relaxed), k % 2 == 1)
        };
        let b_at = |k: usize, col: usize| {
            let owner = 4 * col + (k % 8) / 2;
            widen(warp.registers[owner][4 + k / 8].load(Relaxed), k % 2 == 1)
        };
        let (g, t) = (lane / 4, lane % 4);
        let d = std::array::from_fn(|i| {
            let (row, col) = (g + 8 * (i / 2), 2 * t + i % 2);
            let mut sum = c[i];
            for k in 0..16 {
                sum += a_at(row, k) * b_at(k, col);
            }
            sum
        });
        warp.barrier.wait();
        d
    }

    fn ldmatrix(&self, tid: usize, offset: usize, transposed: bool) -> [u32; 4] {
        let (warp, lane) = self.warp(tid);
        if offset % 16 != 0 {
            self.fail(format!("ldmatrix: lane {lane} gave the row address {offset}, not 16-byte aligned"));
        }
        warp.addresses[lane].store(offset as u64, Relaxed);
        warp.barrier.wait();
        let (g, t) = (lane / 4, lane % 4);
        let row = |matrix: usize, r: usize| warp.addresses[8 * matrix + r].load(Relaxed) as usize;
        let out = std::array::from_fn(|matrix| {
            let (low, high) = if transposed {
                (self.shared_u16(row(matrix, 2 * t) + 2 * g), self.shared_u16(row(matrix, 2 * t + 1) + 2 * g))
            } else {
                let at = row(matrix, g) + 4 * t;
                (self.shared_u16(at), self.shared_u16(at + 2))
            };
            u32::from(low) | (u32::from(high) << 16)
        });
        warp.barrier.wait();
        out
    }

    fn shuffle_xor(&self, tid: usize, value: f32, distance: usize) -> f32 {
        let (warp, lane) = self.warp(tid);
        warp.registers[lane][0].store(value.to_bits(), Relaxed);
        warp.barrier.wait();
        let other = f32::from_bits(warp.registers[lane ^ distance][0].load(Relaxed));
        warp.barrier.wait();
        other
    }

    fn cp_async(&self, tid: usize, offset: usize, source: *const u8, bytes: usize) {
        if offset % 16 != 0 || offset + 16 > self.shared_bytes {
            self.fail(format!("cp.async: thread {tid} wrote shared byte {offset}, not an aligned chunk inside"));
            return;
        }
        if bytes > 0 && (source as usize) % 16 != 0 {
            self.fail(format!("cp.async: thread {tid} read from {source:p}, not 16-byte aligned"));
            return;
        }
        // Until its wait, the destination holds NaN (all ones) in every 16-bit element.
        // SAFETY: inside the block's shared memory (checked above).
        unsafe { std::ptr::write_bytes(self.shared.add(offset), 0xff, 16) };
        let mut copies = self.copies[tid].lock().unwrap_or_else(|e| e.into_inner());
        copies.open.push(Copy { destination: offset, source: source as usize, bytes });
    }

    fn commit(&self, tid: usize) {
        let mut copies = self.copies[tid].lock().unwrap_or_else(|e| e.into_inner());
        let group = std::mem::take(&mut copies.open);
        copies.committed.push_back(group);
    }

    fn wait(&self, tid: usize, pending: usize) {
        let mut copies = self.copies[tid].lock().unwrap_or_else(|e| e.into_inner());
        while copies.committed.len() > pending {
            for copy in copies.committed.pop_front().expect("a group") {
                // SAFETY: the source was a live input element when the copy started (the
                // kernel's arguments outlive the call) and the destination is checked above.
                unsafe {
                    let to = self.shared.add(copy.destination);
                    std::ptr::write_bytes(to, 0, 16);
                    std::ptr::copy_nonoverlapping(copy.source as *const u8, to, copy.bytes.min(16));
                }
            }
        }
    }
}

/// The block state behind the `sync` pointer the kernels pass on.
unsafe fn block<'a>(sync: *const u8) -> &'a Block {
    // SAFETY: the emulator passes a live `Block` for the whole call.
    unsafe { &*(sync as *const Block) }
}

extern "C" fn einfuse_tc_mma(
    sync: *const u8,
    tid: i64,
    kind: i32,
    a0: i32,
    a1: i32,
    a2: i32,
    a3: i32,
    b0: i32,
    b1: i32,
    c0: f32,
    c1: f32,
    c2: f32,
    c3: f32,
    d: *mut f32,
) {
    // SAFETY: see `block`; `d` is the kernel's slot of four floats.
    unsafe {
        let out = block(sync).mma(
            tid as usize,
            kind as u32,
            [a0, a1, a2, a3].map(|x| x as u32),
            [b0 as u32, b1 as u32],
            [c0, c1, c2, c3],
        );
        std::ptr::copy_nonoverlapping(out.as_ptr(), d, 4);
    }
}

extern "C" fn einfuse_tc_ldmatrix(
    sync: *const u8,
    tid: i64,
    _shared: *const u8,
    offset: i32,
    trans: i32,
    out: *mut u32,
) {
    // SAFETY: see `block`; `out` is the kernel's slot of four words.
    unsafe {
        let d = block(sync).ldmatrix(tid as usize, offset as usize, trans != 0);
        std::ptr::copy_nonoverlapping(d.as_ptr(), out, 4);
    }
}

extern "C" fn einfuse_tc_cp_async(
    sync: *const u8,
    tid: i64,
    _shared: *const u8,
    offset: i32,
    source: *const u8,
    bytes: i32,
) {
    // SAFETY: see `block`.
    unsafe { block(sync).cp_async(tid as usize, offset as usize, source, bytes as usize) }
}

extern "C" fn einfuse_tc_commit(sync: *const u8, tid: i64) {
    // SAFETY: see `block`.
    unsafe { block(sync).commit(tid as usize) }
}

extern "C" fn einfuse_tc_wait(sync: *const u8, tid: i64, pending: i32) {
    // SAFETY: see `block`.
    unsafe { block(sync).wait(tid as usize, pending as usize) }
}

extern "C" fn einfuse_tc_barrier(sync: *const u8, _tid: i64) {
    // SAFETY: see `block`.
    unsafe { block(sync).barrier.wait() }
}

extern "C" fn einfuse_tc_shuffle_xor(sync: *const u8, tid: i64, value: f32, distance: i32) -> f32 {
    // SAFETY: see `block`.
    unsafe { block(sync).shuffle_xor(tid as usize, value, distance as usize) }
}

/// The emulator's entry points by name, for the JIT's symbol table.
pub fn symbols() -> [(&'static str, usize); 7] {
    [
        ("einfuse_tc_mma", einfuse_tc_mma as *const () as usize),
        ("einfuse_tc_ldmatrix", einfuse_tc_ldmatrix as *const () as usize),
        ("einfuse_tc_cp_async", einfuse_tc_cp_async as *const () as usize),
        ("einfuse_tc_commit", einfuse_tc_commit as *const () as usize),
        ("einfuse_tc_wait", einfuse_tc_wait as *const () as usize),
        ("einfuse_tc_barrier", einfuse_tc_barrier as *const () as usize),
        ("einfuse_tc_shuffle_xor", einfuse_tc_shuffle_xor as *const () as usize),
    ]
}

/// One thread of an emulated tensor-core kernel (see `tensor_cores::lower`).
type ThreadFn = unsafe extern "C" fn(*const *mut u8, *const i64, *const i64, i64, i64, *mut u8, *const u8);

/// A tensor-core kernel compiled for the host, its blocks run one after another, the threads of
/// a block side by side.
pub struct EmulatedTensorCoreKernel {
    program: crate::schedule::LoopProgram,
    plan: crate::schedule::tensor_cores::TensorCorePlan,
    function: ThreadFn,
    text: String,
    _code: super::machine::HostCode,
}

// SAFETY: the machine code is immutable once compiled and reads only the buffers of a call.
unsafe impl Send for EmulatedTensorCoreKernel {}
unsafe impl Sync for EmulatedTensorCoreKernel {}

/// Bytes in 16-byte aligned storage (as `cudaMalloc` gives).
fn aligned(bytes: usize) -> Vec<u128> {
    vec![0u128; bytes.div_ceil(16).max(1)]
}

impl EmulatedTensorCoreKernel {
    /// The emulated tensor-core kernel of `program`, or why it has none.
    pub fn new(program: &crate::schedule::LoopProgram) -> Result<EmulatedTensorCoreKernel, String> {
        use super::lower::Flavor;
        let plan = crate::schedule::tensor_cores::plan(program)?;
        let symbol = format!("einfuse_tc_{}", program.cascade.name);
        let text = super::tensor_cores::lower(program, &plan, Flavor::Host, &symbol)?;
        let mut helpers: Vec<(&str, usize)> =
            crate::helpers::symbols().iter().map(|(n, p)| (*n, *p as usize)).collect();
        helpers.extend(symbols());
        let code = super::machine::HostCode::new(&text, &symbol, &helpers).map_err(|e| e.to_string())?;
        // SAFETY: the symbol was defined with this signature.
        let function: ThreadFn = unsafe { std::mem::transmute::<usize, ThreadFn>(code.address()) };
        Ok(EmulatedTensorCoreKernel { program: program.clone(), plan, function, text, _code: code })
    }

    /// The LLVM IR the kernel was compiled from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Runs the kernel on dense row-major inputs (f32 values, rounded to the inputs' storage
    /// types): its outputs, dense, widened to f32.
    pub fn run(&self, extents: &[u64], inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, String> {
        use super::launch::HostValues;
        let call = super::tensor_cores::TensorCoreCall::new(&self.program, &self.plan, extents);
        let mut buffers = call.host_buffers(&self.program, inputs)?;
        // Copies 16-byte aligned, as `cudaMalloc` gives them (the emulator checks `cp.async`'s
        // alignment).
        let mut storage: Vec<Vec<u128>> = buffers
            .iter()
            .map(|b| {
                let (bytes, source) = match b {
                    Some(HostValues::F32(v)) => (v.len() * 4, v.as_ptr() as *const u8),
                    Some(HostValues::Narrow(v)) => (v.len() * 2, v.as_ptr() as *const u8),
                    None => return aligned(0),
                };
                let mut copy = aligned(bytes);
                // SAFETY: `copy` holds at least `bytes` bytes.
                unsafe { std::ptr::copy_nonoverlapping(source, copy.as_mut_ptr() as *mut u8, bytes) };
                copy
            })
            .collect();
        let pointers: Vec<*mut u8> = storage.iter_mut().map(|d| d.as_mut_ptr() as *mut u8).collect();
        let threads = crate::schedule::tensor_cores::THREADS as usize;
        let shared_bytes = call.shared_bytes as usize;
        for block_id in 0..call.grid {
            let mut shared = aligned(shared_bytes);
            let block = Block::new(threads, shared.as_mut_ptr() as *mut u8, shared_bytes);
            struct Args(*const *mut u8, *const i64, *const i64);
            // SAFETY: the tables are read only and outlive the scoped threads.
            unsafe impl Sync for Args {}
            let args = Args(pointers.as_ptr(), call.extents.as_ptr(), call.strides.as_ptr());
            std::thread::scope(|scope| {
                for tid in 0..threads {
                    let (block, args, function) = (&block, &args, self.function);
                    std::thread::Builder::new()
                        .stack_size(1 << 20)
                        .spawn_scoped(scope, move || {
                            let sync = block as *const Block as *const u8;
                            // SAFETY: every table has what the kernel addresses for these
                            // extents; the block's threads meet at its barriers.
                            unsafe { function(args.0, args.1, args.2, block_id as i64, tid as i64, block.shared, sync) }
                        })
                        .expect("a thread of the emulated block");
                }
            });
            if let Some(why) = block.error() {
                return Err(why);
            }
        }
        for (buffer, copy) in buffers.iter_mut().zip(&storage) {
            let bytes = copy.as_ptr() as *const u8;
            // SAFETY: each copy holds its buffer's bytes.
            match buffer {
                Some(HostValues::F32(v)) => unsafe {
                    std::ptr::copy_nonoverlapping(bytes, v.as_mut_ptr() as *mut u8, v.len() * 4)
                },
                Some(HostValues::Narrow(v)) => unsafe {
                    std::ptr::copy_nonoverlapping(bytes, v.as_mut_ptr() as *mut u8, v.len() * 2)
                },
                None => {}
            }
        }
        Ok(call.outputs(&self.program, &buffers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `each(lane)` on the 32 lanes of one warp, side by side.
    fn warp<T: Send>(each: impl Fn(usize) -> T + Sync) -> Vec<T> {
        let each = &each;
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..32).map(|lane| scope.spawn(move || each(lane))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn bf16(x: f32) -> u32 {
        u32::from(half::bf16::from_f32(x).to_bits())
    }

    /// The fragments written out as the PTX ISA's tables give them ("Matrix Fragments for
    /// mma.m16n8k16 with floating point type"), element by element, against a product in f64.
    #[test]
    fn mma_follows_the_isa_fragment_layouts() {
        let a = |r: usize, k: usize| ((r * 16 + k) % 7) as f32 - 3.0;
        let b = |k: usize, n: usize| ((k * 8 + n) % 5) as f32 * 0.5 - 1.0;
        let c = |r: usize, n: usize| (r + n) as f32 * 0.25;
        let mut shared = [0u128; 1];
        let block = Block::new(32, shared.as_mut_ptr() as *mut u8, 16);
        let pair = |x: f32, y: f32| bf16(x) | (bf16(y) << 16);
        let results = warp(|lane| {
            let (g, t) = (lane / 4, lane % 4);
            let fa = [
                pair(a(g, 2 * t), a(g, 2 * t + 1)),
                pair(a(g + 8, 2 * t), a(g + 8, 2 * t + 1)),
                pair(a(g, 2 * t + 8), a(g, 2 * t + 9)),
                pair(a(g + 8, 2 * t + 8), a(g + 8, 2 * t + 9)),
            ];
            let fb = [pair(b(2 * t, g), b(2 * t + 1, g)), pair(b(2 * t + 8, g), b(2 * t + 9, g))];
            let fc = [c(g, 2 * t), c(g, 2 * t + 1), c(g + 8, 2 * t), c(g + 8, 2 * t + 1)];
            block.mma(lane, 1, fa, fb, fc)
        });
        for (lane, d) in results.iter().enumerate() {
            let (g, t) = (lane / 4, lane % 4);
            for (i, (r, n)) in [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)].into_iter().enumerate()
            {
                let want: f64 = c(r, n) as f64 + (0..16).map(|k| a(r, k) as f64 * b(k, n) as f64).sum::<f64>();
                assert_eq!(d[i] as f64, want, "lane {lane} element {i}");
            }
        }
    }

    /// `ldmatrix.x4`: lane `l` gets row `l / 4`, columns `2 (l % 4)` and the next, of each matrix;
    /// with `.trans`, column `l / 4` of rows `2 (l % 4)` and the next.
    #[test]
    fn ldmatrix_follows_the_isa() {
        // Four 8 x 8 matrices of 16-bit values `matrix * 64 + row * 8 + column`, rows 16 bytes apart.
        let mut shared = vec![0u128; 32];
        let bytes = shared.as_mut_ptr() as *mut u16;
        for k in 0..256 {
            unsafe { bytes.add(k).write(k as u16) };
        }
        let block = Block::new(32, shared.as_mut_ptr() as *mut u8, 512);
        for transposed in [false, true] {
            let got = warp(|lane| block.ldmatrix(lane, 16 * lane, transposed));
            for (lane, regs) in got.iter().enumerate() {
                let (g, t) = (lane / 4, lane % 4);
                for (m, reg) in regs.iter().enumerate() {
                    let at = |row: usize, col: usize| (m * 64 + row * 8 + col) as u32;
                    let want = if transposed {
                        at(2 * t, g) | (at(2 * t + 1, g) << 16)
                    } else {
                        at(g, 2 * t) | (at(g, 2 * t + 1) << 16)
                    };
                    assert_eq!(*reg, want, "lane {lane} matrix {m} transposed {transposed}");
                }
            }
        }
        assert!(block.error().is_none());
        // A misaligned row address is an error.
        let _ = warp(|lane| block.ldmatrix(lane, 16 * lane + 2, false));
        assert!(block.error().is_some());
    }

    /// A `cp.async` destination is NaN until its group's wait, then the copied bytes with the
    /// rest zero.
    #[test]
    fn cp_async_is_poisoned_until_its_wait() {
        let mut shared = vec![0u128; 2];
        let block = Block::new(1, shared.as_mut_ptr() as *mut u8, 32);
        let source = [0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10u128];
        block.cp_async(0, 0, source.as_ptr() as *const u8, 6);
        block.commit(0);
        block.cp_async(0, 16, source.as_ptr() as *const u8, 16);
        block.commit(0);
        assert_eq!(block.shared_u16(0), 0xffff);
        block.wait(0, 1);
        assert_eq!(block.shared_u16(0), 0x0f10);
        assert_eq!(block.shared_u16(6), 0, "past the copied bytes: zeros");
        assert_eq!(block.shared_u16(16), 0xffff, "the newer group is still in flight");
        block.wait(0, 0);
        assert_eq!(block.shared_u16(16), 0x0f10);
    }
}
