//! One mapping for every section of a JIT-compiled module, in the low 2 GB of the address space,
//! so that its code reaches its constants by 32-bit addresses (the small code model).
//!
//! MCJIT's own memory manager maps each section wherever the system puts it, so a JIT-compiled
//! module must assume its constants lie anywhere in the address space (the large code model):
//! every vector constant is then loaded through a 64-bit immediate address, a `movabs` and a
//! load for each use. The exponential's loop spent 24 of its 62 instructions so (session 10).
//! Here every section of a module is carved from one reservation below 2 GB (`MAP_32BIT`), so
//! that the code reads a constant as a memory operand of the instruction that uses it, relative
//! to the instruction or, where LLVM's static relocation model chooses one, at an absolute 32-bit
//! address. Calls out of the module (the scalar helpers) go through the stubs that MCJIT's linker
//! writes into the code section.
//!
//! Needs: a module small enough for its reservation (`reservation`: MCJIT aborts the process
//! when a section cannot be placed, so `machine::HostCode` uses the arena only for modules whose
//! text bounds their code well below it). Guarantees: code sections executable and not writable
//! and read-only data read-only once MCJIT finalizes the module, or `failed` set; the mapping is
//! released when the execution engine that owns the manager drops it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use inkwell::memory_manager::McjitMemoryManager;

/// The reservation for a module of `text` bytes of LLVM IR, or `None` where it would be too large
/// to be sure of (then MCJIT's own manager and the large code model). A module's sections,
/// rounded to pages, measured 0.06 to 0.4 bytes per byte of its IR text (`benches/pytorch.ein`'s
/// kernels, 74 to 643 KB of IR, unrolled loops included); the reservation allows eight, and at
/// least a megabyte. Pages are committed only where sections are written.
pub fn reservation(text: usize) -> Option<usize> {
    const LARGEST: usize = 64 << 20;
    let size = text.saturating_mul(8).max(1 << 20);
    (size <= LARGEST).then_some(size)
}

pub struct Arena {
    base: usize,
    size: usize,
    used: usize,
    code: Vec<(usize, usize)>,
    read_only: Vec<(usize, usize)>,
    /// Set where a section did not fit or a protection could not be set: MCJIT ignores the
    /// result of finalizing, so `HostCode` reads this instead.
    failed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Arena({} of {} bytes used at {:#x})", self.used, self.size, self.base)
    }
}

fn page() -> usize {
    // SAFETY: `sysconf` reads a constant of the system.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

impl Arena {
    /// A reservation of `size` bytes below 2 GB, or `None` where the system has none (the
    /// caller then uses MCJIT's own manager).
    pub fn new(size: usize, failed: Arc<AtomicBool>) -> Option<Arena> {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_32BIT;
            let protection = libc::PROT_READ | libc::PROT_WRITE;
            // SAFETY: a fresh anonymous mapping, owned by the arena until `drop`.
            let base = unsafe { libc::mmap(std::ptr::null_mut(), size, protection, flags, -1, 0) };
            (base != libc::MAP_FAILED).then(|| Arena {
                base: base as usize,
                size,
                used: 0,
                code: Vec::new(),
                read_only: Vec::new(),
                failed,
            })
        }
        #[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
        {
            let _ = (size, failed);
            None
        }
    }

    /// The next `size` bytes at an address aligned to `alignment` and to a page (each section
    /// gets its own pages, so that its protection is its own), or `None` when the reservation is
    /// full.
    fn carve(&mut self, size: usize, alignment: u32) -> Option<(usize, usize)> {
        let page = page();
        let start = (self.base + self.used).next_multiple_of(page.max(alignment as usize));
        let length = size.max(1).next_multiple_of(page);
        let end = start.checked_add(length)?;
        if end > self.base + self.size {
            self.failed.store(true, Ordering::Relaxed);
            return None;
        }
        self.used = end - self.base;
        Some((start, length))
    }

    fn protect(&self, (start, length): (usize, usize), protection: libc::c_int) -> bool {
        // SAFETY: whole pages of this arena's own mapping, which MCJIT has written and does not
        // change after it finalizes the module.
        unsafe { libc::mprotect(start as *mut libc::c_void, length, protection) == 0 }
    }
}

impl McjitMemoryManager for Arena {
    fn allocate_code_section(&mut self, size: usize, alignment: u32, _: u32, _: &str) -> *mut u8 {
        match self.carve(size, alignment) {
            Some(section) => {
                self.code.push(section);
                section.0 as *mut u8
            }
            None => std::ptr::null_mut(),
        }
    }

    fn allocate_data_section(&mut self, size: usize, alignment: u32, _: u32, _: &str, read_only: bool) -> *mut u8 {
        match self.carve(size, alignment) {
            Some(section) => {
                if read_only {
                    self.read_only.push(section);
                }
                section.0 as *mut u8
            }
            None => std::ptr::null_mut(),
        }
    }

    fn finalize_memory(&mut self) -> Result<(), String> {
        let code = self.code.iter().all(|s| self.protect(*s, libc::PROT_READ | libc::PROT_EXEC));
        let data = self.read_only.iter().all(|s| self.protect(*s, libc::PROT_READ));
        if !(code && data) {
            self.failed.store(true, Ordering::Relaxed);
            return Err("the JIT could not protect its code".into());
        }
        Ok(())
    }

    fn destroy(&mut self) {}
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the engine that ran its code is gone.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
    }
}

#[cfg(all(test, target_os = "linux", target_arch = "x86_64"))]
mod tests {
    use crate::llvm::machine::HostCode;

    /// A module whose code reads a vector constant runs from below 2 GB, and computes.
    #[test]
    fn modules_run_from_the_arena() {
        let text = "
define void @scale(<8 x float>* %p) {
  %x = load <8 x float>, <8 x float>* %p, align 4
  %y = fmul <8 x float> %x, <float 1.0, float 2.0, float 3.0, float 4.0, float 5.0, float 6.0, float 7.0, float 8.0>
  store <8 x float> %y, <8 x float>* %p, align 4
  ret void
}";
        let code = HostCode::new(text, "scale", &[]).unwrap();
        assert!(code.address() < 1 << 31, "{:#x}", code.address());
        // SAFETY: the function compiled above, with that signature.
        let scale: extern "C" fn(*mut [f32; 8]) = unsafe { std::mem::transmute(code.address()) };
        let mut data = [2.0f32; 8];
        scale(&mut data);
        assert_eq!(data, [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0]);
    }
}
