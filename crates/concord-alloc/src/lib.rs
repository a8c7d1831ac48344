//! The global allocator of concord's binaries and benches: mimalloc.
//!
//! `mimalloc::MiMalloc` asks mimalloc for every block through its aligned
//! entry points (`mi_malloc_aligned`), whatever the alignment. Those serve
//! a block from the free list of its size class only while that list holds
//! one; when it runs empty, a size that is not a power of two (24, 40, 72
//! bytes, ...) is not "naturally aligned" to mimalloc, and the block is
//! over-allocated from the next size class through the slow path, which
//! leaves the empty list empty: every later block of that size takes the
//! slow path too (mimalloc issue #889). Under the coordinator's decisions
//! that cost about a tenth of their instructions.
//!
//! [`Alloc`] calls the plain entry points (`mi_malloc`, `mi_zalloc`,
//! `mi_realloc`) where the alignment asked for is one every mimalloc block
//! has (a machine word), as Rust's own `System` allocator does with
//! `malloc`, and the aligned ones otherwise. Every block is freed by
//! `mi_free`, whichever call made it.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as ffi;

/// The alignment every block mimalloc hands out has: a machine word (its
/// size classes are multiples of it, its pages aligned to more).
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc, asked for an alignment only where a word does not suffice.
#[derive(Clone, Copy, Debug, Default)]
pub struct Alloc;

/// Whether a block of `size` bytes aligned to `align` is what the plain
/// entry points give. Blocks smaller than their alignment go through the
/// aligned ones, as `System` does.
fn plain(align: usize, size: usize) -> bool {
    align <= WORD && align <= size
}

// SAFETY: each method forwards to the mimalloc call for its layout; mimalloc
// returns null or a block of at least `size` bytes aligned to `align` (the
// plain calls only where every block is word-aligned and `align` is at most
// a word), and `mi_free` frees blocks from any of these calls.
unsafe impl GlobalAlloc for Alloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: as above.
        unsafe {
            if plain(align, size) {
                ffi::mi_malloc(size).cast()
            } else {
                ffi::mi_malloc_aligned(size, align).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: as above.
        unsafe {
            if plain(align, size) {
                ffi::mi_zalloc(size).cast()
            } else {
                ffi::mi_zalloc_aligned(size, align).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from one of the calls above.
        unsafe { ffi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        // SAFETY: `ptr` came from one of the calls above; mimalloc keeps
        // the contents up to the smaller size.
        unsafe {
            if plain(align, new_size) {
                ffi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                ffi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, align).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size and alignment a program asks for gets a block aligned as
    /// asked, through either entry point, and keeps its contents across a
    /// reallocation to another size.
    #[test]
    fn blocks_are_aligned_as_asked_and_keep_their_contents() {
        let a = Alloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in (1..=300).chain([1000, 4095, 4096, 70_000, 1 << 20]) {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero size; each block is freed once, by the
                // allocator that made it.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "alloc({size}, {align})");
                    p.write_bytes(0xA5, size);
                    let grown = size * 3 + 1;
                    let q = a.realloc(p, layout, grown);
                    assert_eq!(q as usize % align, 0, "realloc({size} -> {grown}, {align})");
                    assert!((0..size).all(|i| *q.add(i) == 0xA5), "contents kept ({size}, {align})");
                    a.dealloc(q, Layout::from_size_align(grown, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "alloc_zeroed({size}, {align})");
                    assert!((0..size).all(|i| *z.add(i) == 0), "zeroed ({size}, {align})");
                    a.dealloc(z, layout);
                }
            }
        }
    }
}
