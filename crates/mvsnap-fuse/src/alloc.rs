//! The global allocator of a process that serves FUSE files: the system allocator, except that
//! blocks of [`HUGE_MIN`] bytes and more get their own mapping, aligned to a huge page and
//! advised for transparent huge pages (`MADV_HUGEPAGE`; THP is often `madvise` only).
//!
//! Why: fuser gives every event loop a request buffer of 16 MiB (+ 4 KiB) and reads
//! /dev/fuse into it with read(2). For every request the kernel pins the buffer's pages one at
//! a time (`gup_fast_fallback` under `fuse_dev_do_read`) and copies the payload in; the loop
//! device's ~512 KiB writes then go round the 16 event loops, so 16 buffers of 4 KiB pages
//! are touched in turn. With huge pages a buffer's first 2 MiB is one page: the pinning walks
//! no page tables and takes no 128 page references, and the TLB covers all buffers. The other
//! allocations stay with the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;

/// Blocks this big (or bigger) are mapped on their own and advised for huge pages.
pub const HUGE_MIN: usize = 8 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// See the module documentation. Install with `#[global_allocator]` in the binary.
pub struct HugeBufAlloc;

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// A mapping of `size` bytes (a multiple of [`HUGE_PAGE`]) starting at a multiple of
/// [`HUGE_PAGE`], advised for huge pages; null on failure.
fn map_huge(size: usize) -> *mut u8 {
    let len = size + HUGE_PAGE;
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing; it touches
    // no existing memory.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return ptr::null_mut();
    }
    let start = p as usize;
    let aligned = round_up(start, HUGE_PAGE);
    let head = aligned - start;
    let tail = len - head - size;
    // SAFETY: both ranges lie inside the mapping just made and nobody else knows of it.
    unsafe {
        if head > 0 {
            libc::munmap(p, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
        // Advice only: if THP is off, the mapping works with small pages.
        libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
    }
    aligned as *mut u8
}

fn is_huge(layout: &Layout) -> bool {
    layout.size() >= HUGE_MIN && layout.align() <= HUGE_PAGE
}

// SAFETY: small blocks are the system allocator's; big ones are whole private mappings of at
// least their size, aligned to 2 MiB (so to any alignment up to that), zero-filled by the
// kernel, and unmapped exactly once, in dealloc, with the size rounded as at mapping time.
unsafe impl GlobalAlloc for HugeBufAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_huge(&layout) {
            return map_huge(round_up(layout.size(), HUGE_PAGE));
        }
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_huge(&layout) {
            // A fresh anonymous mapping reads as zeros.
            return map_huge(round_up(layout.size(), HUGE_PAGE));
        }
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        if is_huge(&layout) {
            // SAFETY: `p` came from map_huge with this rounded size (same layout).
            unsafe { libc::munmap(p.cast(), round_up(layout.size(), HUGE_PAGE)) };
            return;
        }
        // SAFETY: `p` came from the system allocator with this layout.
        unsafe { System.dealloc(p, layout) }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout for `new_size`.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !is_huge(&layout) && !is_huge(&new) {
            // SAFETY: small to small: the system allocator's block, the caller's contract.
            return unsafe { System.realloc(p, layout, new_size) };
        }
        // SAFETY: allocate, copy what both hold, free the old block (the caller's contract).
        unsafe {
            let q = self.alloc(new);
            if !q.is_null() {
                ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                self.dealloc(p, layout);
            }
            q
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_blocks_are_aligned_zeroed_and_reallocated() {
        let a = HugeBufAlloc;
        let l = Layout::from_size_align(HUGE_MIN + 4096, 8).unwrap();
        // SAFETY: a valid non-zero layout; every block is freed with its own layout.
        unsafe {
            let p = a.alloc_zeroed(l);
            assert!(!p.is_null());
            assert_eq!(p as usize % HUGE_PAGE, 0);
            assert!(std::slice::from_raw_parts(p, l.size())
                .iter()
                .all(|&b| b == 0));
            *p.add(l.size() - 1) = 7;
            // Big to small and back keeps the bytes both sizes hold.
            let q = a.realloc(p, l, 4096);
            *q = 9;
            let small = Layout::from_size_align(4096, 8).unwrap();
            let r = a.realloc(q, small, l.size());
            assert_eq!(*r, 9);
            assert_eq!(r as usize % HUGE_PAGE, 0);
            a.dealloc(r, l);
        }
    }
}
