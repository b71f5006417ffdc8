//! Binary elementwise ops with NumPy broadcasting.

use multiversion::multiversion;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    #[inline(always)]
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
        }
    }
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn zip_chunk(a: &[f32], b: &[f32], out: &mut [f32], op: BinaryOp) {
    match op {
        BinaryOp::Add => zip_with(a, b, out, |x, y| x + y),
        BinaryOp::Sub => zip_with(a, b, out, |x, y| x - y),
        BinaryOp::Mul => zip_with(a, b, out, |x, y| x * y),
        BinaryOp::Div => zip_with(a, b, out, |x, y| x / y),
    }
}

#[inline(always)]
fn zip_with(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = f(x, y);
    }
}

/// Strides of `shape` broadcast to `out_shape` (0 where a dimension is broadcast).
fn broadcast_strides(shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let offset = out_shape.len() - shape.len();
    let mut strides = vec![0; out_shape.len()];
    let mut stride = 1;
    for i in (0..shape.len()).rev() {
        if shape[i] != 1 {
            strides[offset + i] = stride;
        }
        stride *= shape[i];
    }
    strides
}

/// `out = a op b` where `a` and `b` broadcast to `out_shape` (already validated).
pub fn binary(
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    out: &mut [f32],
    out_shape: &[usize],
    op: BinaryOp,
) {
    const CHUNK: usize = 16384;
    if a.len() == out.len() && b.len() == out.len() {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| zip_chunk(a, b, o, op));
        return;
    }
    // The common broadcast: `b` repeats along leading dims (a bias over rows), or `a` does.
    let inner = *out_shape.last().unwrap_or(&1);
    if a.len() == out.len() && b_shape.iter().rev().skip(1).all(|&d| d == 1) && b.len() == inner {
        out.par_chunks_mut(inner)
            .zip(a.par_chunks(inner))
            .for_each(|(o, a)| zip_chunk(a, b, o, op));
        return;
    }
    // Per-sample channel vectors, `b = [batch, 1, ..., 1, c]` over `a = [batch, ..., c]` (a
    // time embedding added to a feature map).
    let rank = out_shape.len();
    if rank >= 3
        && a.len() == out.len()
        && b_shape.len() == rank
        && b_shape[0] == out_shape[0]
        && b_shape[1..rank - 1].iter().all(|&d| d == 1)
        && b_shape[rank - 1] == inner
    {
        let per_sample = out.len() / out_shape[0].max(1);
        out.par_chunks_mut(per_sample.max(1))
            .zip(a.par_chunks(per_sample.max(1)))
            .zip(b.par_chunks(inner.max(1)))
            .for_each(|((o, a), b)| {
                for (o, a) in o.chunks_mut(inner).zip(a.chunks(inner)) {
                    zip_chunk(a, b, o, op);
                }
            });
        return;
    }
    // General case: walk the output index by index (rare shapes; correctness over speed).
    let a_strides = broadcast_strides(a_shape, out_shape);
    let b_strides = broadcast_strides(b_shape, out_shape);
    out.par_iter_mut().enumerate().for_each(|(flat, o)| {
        let (mut rem, mut ai, mut bi) = (flat, 0, 0);
        for d in (0..rank).rev() {
            let idx = rem % out_shape[d];
            rem /= out_shape[d];
            ai += idx * a_strides[d];
            bi += idx * b_strides[d];
        }
        *o = op.apply(a[ai], b[bi]);
    });
}

/// `x = x * scale + shift`, in place.
#[multiversion(targets("x86_64+avx2+fma"))]
fn affine_chunk(x: &mut [f32], scale: f32, shift: f32) {
    for v in x {
        *v = *v * scale + shift;
    }
}

pub fn affine_in_place(x: &mut [f32], scale: f32, shift: f32) {
    x.par_chunks_mut(16384)
        .for_each(|c| affine_chunk(c, scale, shift));
}
