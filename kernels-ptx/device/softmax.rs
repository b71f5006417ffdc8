//! Softmax over the last dimension.
//!
//! Launch: grid `rows`, block a multiple of 32 up to 1024 (the host uses 256, or fewer
//! warps for short rows), 128 bytes of dynamic shared memory (block-reduction scratch).

use crate::gpu::{NEG_INF, block, block_dim, block_max, block_sum, exp, shared_f32, thread};

/// One block per row: max, then sum of `exp(x - max)`, then the normalised write. A row of
/// only `-inf` becomes zeros, as on the CPU.
#[unsafe(no_mangle)]
pub unsafe extern "ptx-kernel" fn softmax_rows_f32(x: *const f32, out: *mut f32, cols: u32) {
    let scratch = shared_f32();
    let base = block() as usize * cols as usize;
    let (x, out) = unsafe { (x.add(base), out.add(base)) };
    let mut m = NEG_INF;
    let mut c = thread();
    while c < cols {
        m = m.max(unsafe { *x.add(c as usize) });
        c += block_dim();
    }
    let m = block_max(m, scratch);
    let mut s = 0.0f32;
    c = thread();
    while c < cols {
        // An all-masked row has m = -inf, and -inf - -inf is NaN: write zeros instead.
        let e = if m == NEG_INF {
            0.0
        } else {
            exp(unsafe { *x.add(c as usize) } - m)
        };
        unsafe { *out.add(c as usize) = e };
        s += e;
        c += block_dim();
    }
    let s = block_sum(s, scratch);
    let inv = if m == NEG_INF { 0.0 } else { 1.0 / s };
    c = thread();
    while c < cols {
        unsafe { *out.add(c as usize) *= inv };
        c += block_dim();
    }
}
