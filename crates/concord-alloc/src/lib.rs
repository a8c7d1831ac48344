//! The global allocator of concord's binaries and benches: mimalloc.
//!
//! `mimalloc::MiMalloc` asks mimalloc for every block through its aligned
//! entry points (`mi_malloc_aligned`), whatever the alignment. Those serve
//! a small block from its size class's free list while the list holds one;
//! when it is empty and the class's block size is not a power of two, they
//! over-allocate `size + align - 1` bytes through the slow path. Where that
//! crosses into the next size class (with 8-byte alignment: blocks of 48,
//! 80, 96, 112, 160, 192, ... bytes), the empty list is never refilled and
//! every later block of that size takes the slow path too (mimalloc issue
//! #889); blocks over 1 KiB that are not a power of two always take it.
//! Under the coordinator's decisions that cost a tenth of their
//! instructions.
//!
//! [`Alloc`] calls the plain entry points (`mi_malloc`, `mi_zalloc`,
//! `mi_realloc`) where the alignment asked for is one every such block has
//! (at most [`MIN_ALIGN`], and at most the size), with the same condition
//! as Rust's own `System` allocator on `malloc`, and the aligned ones
//! otherwise. Every block is freed by `mi_free`, whichever call made it.
//!
//! This relies on mimalloc as `libmimalloc-sys` builds it by default: its
//! `debug` features (which build guarded pages, whose "precise" mode places
//! a block unaligned) must stay off.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as ffi;

/// The alignment every block of at least this many bytes has: that of C's
/// `max_align_t`, which `malloc` (and mimalloc, a `malloc`) guarantees; on
/// 64-bit targets 16 bytes (mimalloc's size classes from 16 bytes up are
/// multiples of 16, placed on 16-byte boundaries), as `System` assumes.
#[cfg(target_pointer_width = "64")]
pub const MIN_ALIGN: usize = 16;
/// The alignment every block of at least this many bytes has (32-bit
/// targets: a conservative 8 bytes).
#[cfg(not(target_pointer_width = "64"))]
pub const MIN_ALIGN: usize = 8;

/// mimalloc, asked for an alignment only where its own does not suffice.
#[derive(Clone, Copy, Debug, Default)]
pub struct Alloc;

/// Whether a block of `size` bytes aligned to `align` is what the plain
/// entry points give. Blocks smaller than their alignment go through the
/// aligned ones, as `System` does.
fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

/// A new block for `layout` from the plain mimalloc call or the aligned
/// one (`mi_malloc` or `mi_zalloc`, and their `_aligned` forms).
///
/// # Safety
/// `plain_call` and `aligned_call` are a mimalloc allocation call and its aligned form.
#[inline]
unsafe fn new_block(
    layout: Layout,
    plain_call: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned_call: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    // SAFETY: mimalloc calls, each for a layout it serves aligned (see
    // `GlobalAlloc for Alloc`).
    unsafe {
        if plain(align, size) {
            plain_call(size).cast()
        } else {
            aligned_call(size, align).cast()
        }
    }
}

// SAFETY: each method forwards to the mimalloc call for its layout; mimalloc
// returns null or a block of at least `size` bytes aligned to `align` (the
// plain calls only where `align` is at most `MIN_ALIGN` and at most `size`,
// which every such block meets), and `mi_free` frees blocks from any of
// these calls, as `mi_realloc` and `mi_realloc_aligned` take them.
unsafe impl GlobalAlloc for Alloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe { new_block(layout, ffi::mi_malloc, ffi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe { new_block(layout, ffi::mi_zalloc, ffi::mi_zalloc_aligned) }
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

    // In the C library whatever `libmimalloc-sys`'s features (its Rust
    // declaration is behind `extended`).
    unsafe extern "C" {
        fn mi_usable_size(p: *const c_void) -> usize;
    }

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    /// Every size and alignment a program asks for gets a block aligned as
    /// asked, through either entry point, and keeps its contents when it
    /// grows, or shrinks below its alignment.
    #[test]
    fn blocks_are_aligned_as_asked_and_keep_their_contents() {
        let a = Alloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 4096] {
            for size in (1..=300).chain([1000, 4095, 4096, 70_000, 1 << 20]) {
                // SAFETY: non-zero sizes; each block is freed once, by the
                // allocator that made it, with the layout it has then.
                unsafe {
                    // Grown, kept at its size, shrunk below its alignment:
                    // each from a fresh block holding the pattern.
                    for to in [size * 3 + 1, size, 1] {
                        let p = a.alloc(layout(size, align));
                        assert!(
                            !p.is_null() && (p as usize).is_multiple_of(align),
                            "alloc({size}, {align})"
                        );
                        p.write_bytes(0xA5, size);
                        let q = a.realloc(p, layout(size, align), to);
                        assert!(
                            !q.is_null() && (q as usize).is_multiple_of(align),
                            "realloc({size} -> {to}, {align})"
                        );
                        let kept = size.min(to);
                        assert!(
                            (0..kept).all(|i| *q.add(i) == 0xA5),
                            "contents kept ({size} -> {to}, {align})"
                        );
                        a.dealloc(q, layout(to, align));
                    }
                    let z = a.alloc_zeroed(layout(size, align));
                    assert!(
                        !z.is_null() && (z as usize).is_multiple_of(align),
                        "alloc_zeroed({size}, {align})"
                    );
                    assert!((0..size).all(|i| *z.add(i) == 0), "zeroed ({size}, {align})");
                    a.dealloc(z, layout(size, align));
                }
            }
        }
    }

    /// Blocks of a size class that is not a power of two stay in their
    /// class while many are live (its free list drained and refilled): the
    /// aligned calls would hand out blocks of the next class instead.
    #[test]
    fn blocks_stay_in_their_size_class() {
        let a = Alloc;
        for (size, align) in [(48, 8), (80, 8), (160, 8), (48, 16), (96, 16)] {
            let blocks: Vec<*mut u8> = (0..5_000)
                // SAFETY: a non-zero size.
                .map(|_| unsafe { a.alloc(layout(size, align)) })
                .collect();
            for &p in &blocks {
                assert!(!p.is_null() && (p as usize).is_multiple_of(align));
                // SAFETY: a live block from mimalloc.
                assert_eq!(unsafe { mi_usable_size(p.cast()) }, size, "({size}, {align})");
            }
            for p in blocks {
                // SAFETY: each block once, with its layout.
                unsafe { a.dealloc(p, layout(size, align)) };
            }
        }
    }
}
