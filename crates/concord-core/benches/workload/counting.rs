//! A global allocator that counts live heap bytes, for the benches that
//! measure memory (per in-flight plan, per day of observations). Included
//! with `#[path]` by each bench binary that installs it. It forwards to
//! `concord_alloc::Alloc` (mimalloc), the allocator of concord's binaries,
//! so that time is measured with the allocator concord runs with.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

use concord_alloc::Alloc;

/// Counts live heap bytes.
pub struct Counting;
/// Live heap bytes now.
pub static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to concord's allocator unchanged and only
// counts sizes (`unsafe` is allowed here, in the benches, and in
// `concord-alloc` alone).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { Alloc.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { Alloc.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { Alloc.dealloc(p, l) }
    }
    // Without it a growing vector would be copied on every growth (the
    // default allocates anew), which the binaries' allocator does not do.
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { Alloc.realloc(p, l, new_size) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
pub static GLOBAL: Counting = Counting;
