//! Row gather and scatter: packing the active tokens of a map and writing them back.
//!
//! Launch: 1-D grid-stride over `count * cols` elements, any grid and block.

use crate::elementwise::grid_stride;
use crate::gpu::{block, block_dim, grid_dim, thread};

/// `out[r, :] = src[index[r], :]` for `r < count`. Indices are checked on the host.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn gather_rows_f32(
    src: *const f32,
    index: *const u32,
    out: *mut f32,
    count: u32,
    cols: u32,
) {
    grid_stride!(count * cols, |i| {
        let r = i / cols;
        let c = i - r * cols;
        unsafe {
            let from = *index.add(r as usize) as usize * cols as usize + c as usize;
            *out.add(i as usize) = *src.add(from);
        }
    });
}

/// `dst[index[r], :] = rows[r, :]` for `r < count`. Indices are unique (checked on the host),
/// so no two threads write one element.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn scatter_rows_f32(
    dst: *mut f32,
    index: *const u32,
    rows: *const f32,
    count: u32,
    cols: u32,
) {
    grid_stride!(count * cols, |i| {
        let r = i / cols;
        let c = i - r * cols;
        unsafe {
            let to = *index.add(r as usize) as usize * cols as usize + c as usize;
            *dst.add(to) = *rows.add(i as usize);
        }
    });
}
