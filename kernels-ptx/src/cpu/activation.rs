use multiversion::multiversion;
use rayon::prelude::*;

use super::math;

/// Pointwise activations, all computed in f32 with the vectorisable math in [`math`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU.
    GeluTanh,
    QuickGelu,
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn apply_chunk(x: &mut [f32], act: Activation) {
    match act {
        Activation::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Silu => x.iter_mut().for_each(|v| *v = math::silu(*v)),
        Activation::Gelu => x.iter_mut().for_each(|v| *v = math::gelu(*v)),
        Activation::GeluTanh => x.iter_mut().for_each(|v| *v = math::gelu_tanh(*v)),
        Activation::QuickGelu => x.iter_mut().for_each(|v| *v = math::quick_gelu(*v)),
    }
}

pub fn activate_in_place(x: &mut [f32], act: Activation) {
    x.par_chunks_mut(16384).for_each(|c| apply_chunk(c, act));
}

#[multiversion(targets("x86_64+avx2+fma"))]
fn geglu_rows(x: &[f32], out: &mut [f32], half: usize) {
    for (row, o) in x.chunks_exact(2 * half).zip(out.chunks_exact_mut(half)) {
        let (hidden, gate) = row.split_at(half);
        for ((o, &h), &g) in o.iter_mut().zip(hidden).zip(gate) {
            *o = h * math::gelu(g);
        }
    }
}

/// GEGLU as diffusers computes it: the last dimension of `x = [rows, 2 * half]` splits into
/// (hidden, gate) and the result is `hidden * gelu(gate)`, `[rows, half]`.
pub fn geglu(x: &[f32], out: &mut [f32], half: usize) {
    let rows_per_task = super::rows_per_task(2 * half);
    x.par_chunks(rows_per_task * 2 * half)
        .zip(out.par_chunks_mut(rows_per_task * half))
        .for_each(|(x, o)| geglu_rows(x, o, half));
}
