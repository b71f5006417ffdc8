//! Dense scaled dot-product attention, f32, one warp per (query row, head), online softmax.
//!
//! `q = [batch, lq, c]`, `k = v = [batch, lk, c]`, head `h` the channels `h*d..(h+1)*d`.
//! A warp takes 32 keys at a time: lane `j` computes the score of key `kb + j` (the whole
//! dot product, the query read from shared memory), so the softmax's max and sum cost one
//! warp reduction per 32 keys; then each lane adds `p_j * v_j` into the output dimensions
//! it owns (`lane, lane + 32, ...`), reading each value row coalesced. No tensor cores yet:
//! the mma.sync version replaces this one.
//!
//! Launch: grid `(ceil(lq / warps), batch * heads)`, block `32 * warps`, dynamic shared
//! memory `warps * 2 * d * 4` bytes (each warp's scaled query and accumulator).

use crate::gpu::{
    NEG_INF, block, block_dim, block_y, exp, shared_f32, shfl_idx, thread, warp_max, warp_sum,
};

#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn attention_rows_f32(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    out: *mut f32,
    lq: u32,
    lk: u32,
    heads: u32,
    d: u32,
    scale: f32,
    causal: u32,
) {
    let warp = thread() >> 5;
    let lane = thread() & 31;
    let i = block() * (block_dim() >> 5) + warp;
    if i >= lq {
        return;
    }
    let (b, h) = (block_y() / heads, block_y() % heads);
    let c = (heads * d) as usize;
    let q_row = unsafe { q.add((b as usize * lq as usize + i as usize) * c + (h * d) as usize) };
    let out_row =
        unsafe { out.add((b as usize * lq as usize + i as usize) * c + (h * d) as usize) };
    let k_base = unsafe { k.add(b as usize * lk as usize * c + (h * d) as usize) };
    let v_base = unsafe { v.add(b as usize * lk as usize * c + (h * d) as usize) };
    let q_sh = unsafe { shared_f32().add((warp * 2 * d) as usize) };
    let acc = unsafe { q_sh.add(d as usize) };

    let mut t = lane;
    while t < d {
        unsafe {
            *q_sh.add(t as usize) = *q_row.add(t as usize) * scale;
            *acc.add(t as usize) = 0.0;
        }
        t += 32;
    }
    crate::gpu::sync_warp();

    let end = if causal != 0 && i + 1 < lk { i + 1 } else { lk };
    let mut m = NEG_INF;
    let mut l = 0.0f32;
    let mut kb = 0u32;
    while kb < end {
        let j = kb + lane;
        let valid = j < end;
        let mut s = NEG_INF;
        if valid {
            let k_row = unsafe { k_base.add(j as usize * c) };
            let mut dot = 0.0f32;
            let mut t = 0u32;
            while t < d {
                dot = unsafe { (*q_sh.add(t as usize)).mul_add(*k_row.add(t as usize), dot) };
                t += 1;
            }
            s = dot;
        }
        let m_new = m.max(warp_max(s));
        let p = if valid { exp(s - m_new) } else { 0.0 };
        let corr = exp(m - m_new);
        l = l * corr + warp_sum(p);
        let n = if end - kb < 32 { end - kb } else { 32 };
        let mut t = lane;
        while t < d {
            unsafe { *acc.add(t as usize) *= corr };
            t += 32;
        }
        // Every lane runs the shuffles (full-mask `shfl.sync`); then adds to its own dims.
        let mut jj = 0u32;
        while jj < n {
            let pj = shfl_idx(p, jj);
            let v_row = unsafe { v_base.add((kb + jj) as usize * c) };
            let mut t = lane;
            while t < d {
                unsafe {
                    *acc.add(t as usize) = pj.mul_add(*v_row.add(t as usize), *acc.add(t as usize))
                };
                t += 32;
            }
            jj += 1;
        }
        m = m_new;
        kb += 32;
    }
    let inv = 1.0 / l;
    let mut t = lane;
    while t < d {
        unsafe { *out_row.add(t as usize) = *acc.add(t as usize) * inv };
        t += 32;
    }
}
