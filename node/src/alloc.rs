//! The global allocator: mimalloc, called the way a C program calls it.
//!
//! Rust hands every allocation its alignment, and the `mimalloc` crate passes
//! each one to `mi_malloc_aligned`. mimalloc's aligned entry point takes its
//! fast path only for blocks of at most 1 KiB that happen to be aligned
//! already; everything else (a connection's 8 KiB buffers, a header map's
//! table) goes through the generic aligned path, about 200 instructions and an
//! over-allocated block each, nine times per new HTTP connection. A plain
//! `mi_malloc` block of 16 bytes or more is aligned to 16 (mimalloc's block
//! sizes on 64-bit targets are 8 and then multiples of 16, from 16-aligned
//! page starts), which is all Rust asks of almost every type; only larger
//! alignments take the aligned calls.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every plain mimalloc block of at least that size has
/// (`MI_MAX_ALIGN_SIZE`, the alignment of C's `max_align_t`).
const PLAIN_ALIGN: usize = 16;

pub struct Allocator;

/// Whether a plain block of `size` bytes is aligned enough: an alignment up
/// to 16 that is not larger than the size (an 8-byte block is only 8-aligned,
/// so an 8-byte request aligned to 16 takes the aligned call).
fn plain(size: usize, align: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc with at least the layout's alignment
// (see `plain`) and goes back to it through `mi_free`, which takes blocks from
// both the plain and the aligned calls.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.size(), layout.align()) {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.size(), layout.align()) {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(new_size, layout.align()) {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size up to 5 KiB and past mimalloc's small and medium limits, with
    /// every alignment up to 4 KiB, comes back aligned as the layout asks:
    /// fresh, zeroed, grown and shrunk. Blocks are held in pairs, so two
    /// neighbours in a page are checked, not one block reused.
    #[test]
    fn blocks_are_aligned_as_the_layout_asks() {
        let aligned = |p: *mut u8, align: usize| !p.is_null() && (p as usize).is_multiple_of(align);
        let sizes = (1..=5120).chain([8191, 8192, 65_536, 131_073, 1 << 21, (1 << 22) + 3]);
        for size in sizes {
            for align in (0..=12).map(|s| 1usize << s) {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: each block is used within its size and freed once with its layout.
                unsafe {
                    let p = Allocator.alloc(layout);
                    assert!(aligned(p, align), "alloc size {size} align {align}: {p:p}");
                    p.write_bytes(0xa5, size);
                    let z = Allocator.alloc_zeroed(layout);
                    assert!(aligned(z, align), "alloc_zeroed size {size} align {align}: {z:p}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|b| *b == 0), "alloc_zeroed size {size} is zeroed");
                    Allocator.dealloc(z, layout);
                    let grown = Allocator.realloc(p, layout, size * 2 + 5);
                    assert!(aligned(grown, align), "realloc {size} -> {} align {align}: {grown:p}", size * 2 + 5);
                    assert!(std::slice::from_raw_parts(grown, size).iter().all(|b| *b == 0xa5), "realloc keeps the bytes");
                    let shrunk = Allocator.realloc(grown, Layout::from_size_align(size * 2 + 5, align).unwrap(), size / 3 + 1);
                    assert!(aligned(shrunk, align), "realloc {} -> {} align {align}: {shrunk:p}", size * 2 + 5, size / 3 + 1);
                    Allocator.dealloc(shrunk, Layout::from_size_align(size / 3 + 1, align).unwrap());
                }
            }
        }
    }
}
