//! One mapping for every section of a JIT-compiled module, so that its code reaches its
//! constants by 32-bit addresses relative to the instruction (the small code model).
//!
//! MCJIT's own memory manager maps each section wherever the system puts it, so a JIT-compiled
//! module must assume its constants lie anywhere in the address space (the large code model):
//! every vector constant is then loaded through a 64-bit immediate address, a `movabs` and a
//! load for each use. The exponential's loop spent 24 of its 62 instructions so (session 10).
//! Here every section of a module is carved from one reservation, so that any two of its bytes
//! lie within 2 GB of each other, and the code reads a constant as a memory operand of the
//! instruction that uses it. Calls out of the module (the scalar helpers) go through the stubs
//! that MCJIT's linker writes into the code section.
//!
//! Needs: a module whose sections fit in `RESERVED` bytes (a section that does not is refused,
//! and `machine::HostCode` compiles the module again with MCJIT's own manager). Guarantees: code
//! sections executable and not writable, read-only data read-only, once MCJIT finalizes the
//! module; the mapping lives as long as the execution engine that owns the manager.

use inkwell::memory_manager::McjitMemoryManager;

/// Address space reserved per module. Pages are committed only where sections are written, so
/// the reservation costs no memory beyond the module's own size.
pub const RESERVED: usize = 64 << 20;

pub struct Arena {
    memory: region::Allocation,
    used: usize,
    code: Vec<(usize, usize)>,
    read_only: Vec<(usize, usize)>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Arena({} of {} bytes used)", self.used, self.memory.len())
    }
}

impl Arena {
    pub fn new() -> Result<Arena, String> {
        let memory = region::alloc(RESERVED, region::Protection::READ_WRITE).map_err(|e| e.to_string())?;
        Ok(Arena { memory, used: 0, code: Vec::new(), read_only: Vec::new() })
    }

    /// The next `size` bytes at a page boundary (each section gets its own pages, so that its
    /// protection is its own), or null when the reservation is full.
    fn carve(&mut self, size: usize, alignment: u32) -> Option<(usize, usize)> {
        let page = region::page::size().max(alignment as usize);
        let start = self.used.next_multiple_of(page);
        let length = size.max(1).next_multiple_of(region::page::size());
        let end = start.checked_add(length)?;
        if end > self.memory.len() {
            return None;
        }
        self.used = end;
        Some((self.memory.as_ptr::<u8>() as usize + start, length))
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
        let sections = self.code.iter().map(|s| (s, region::Protection::READ_EXECUTE));
        for (&(start, length), protection) in
            sections.chain(self.read_only.iter().map(|s| (s, region::Protection::READ)))
        {
            // SAFETY: the range is whole pages of this manager's own mapping, written by MCJIT
            // and not changed after it finalizes the module.
            unsafe { region::protect(start as *const u8, length, protection) }.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn destroy(&mut self) {}
}
