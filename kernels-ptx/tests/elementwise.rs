//! Binary elementwise ops with NumPy broadcasting, and `affine`.

mod common;

use common::*;
use retouch_kernels::{Error, Tensor};

type Op = fn(&Tensor, &Tensor) -> retouch_kernels::Result<Tensor>;
type Reference = fn(f64, f64) -> f64;

const OPS: [(&str, Op, Reference); 4] = [
    ("add", Tensor::add, |a, b| a + b),
    ("sub", Tensor::sub, |a, b| a - b),
    ("mul", Tensor::mul, |a, b| a * b),
    ("div", Tensor::div, |a, b| a / b),
];

/// NumPy broadcasting, written independently: for each output index, each operand's index
/// is the output index with broadcast (size-1 or missing) dimensions set to 0.
fn broadcast_ref(
    a: &[f64],
    a_shape: &[usize],
    b: &[f64],
    b_shape: &[usize],
    out_shape: &[usize],
    f: Reference,
) -> Vec<f64> {
    let offset_of = |shape: &[usize], idx: &[usize]| {
        let lead = idx.len() - shape.len();
        shape.iter().enumerate().fold(0, |acc, (d, &n)| {
            let i = if n == 1 { 0 } else { idx[lead + d] };
            acc * n + i
        })
    };
    (0..out_shape.iter().product())
        .map(|flat| {
            let idx = unravel(flat, out_shape);
            f(a[offset_of(a_shape, &idx)], b[offset_of(b_shape, &idx)])
        })
        .collect()
}

/// A divisor-safe random tensor: magnitudes in [0.5, ...), random signs.
fn away_from_zero(shape: &[usize], seed: u64) -> Tensor {
    let v: Vec<f32> = randn(shape, seed)
        .to_vec_f32()
        .into_iter()
        .map(|x| x.signum() * (0.5 + x.abs()))
        .collect();
    Tensor::from_vec(v, shape).unwrap()
}

fn check_all(a_shape: &[usize], b_shape: &[usize], out_shape: &[usize], seed: u64) {
    let a = randn(a_shape, seed);
    let b = away_from_zero(b_shape, seed + 1);
    for (name, op, f) in OPS {
        let got = op(&a, &b).unwrap();
        let want = broadcast_ref(&f64s(&a), a_shape, &f64s(&b), b_shape, out_shape, f);
        assert_tensor_close(
            &format!("{name} {a_shape:?} with {b_shape:?}"),
            &got,
            &want,
            out_shape,
        );
    }
}

#[test]
fn same_shape() {
    check_all(&[3, 5, 7], &[3, 5, 7], &[3, 5, 7], 1);
    check_all(&[37], &[37], &[37], 2);
}

#[test]
fn bias_over_rows() {
    check_all(&[13, 7], &[7], &[13, 7], 3);
    check_all(&[2, 9, 6, 5], &[5], &[2, 9, 6, 5], 4);
    check_all(&[13, 7], &[1, 7], &[13, 7], 5);
}

#[test]
fn both_sides_broadcast() {
    check_all(&[2, 1, 4], &[3, 1], &[2, 3, 4], 6);
    check_all(&[3, 1], &[2, 1, 4], &[2, 3, 4], 7);
}

#[test]
fn left_side_broadcasts() {
    // The smaller operand on the left: sub and div are not symmetric.
    check_all(&[7], &[13, 7], &[13, 7], 8);
    check_all(&[5, 1], &[5, 3], &[5, 3], 9);
    check_all(&[1], &[4, 5], &[4, 5], 10);
}

#[test]
fn per_row_scale() {
    check_all(&[9, 6], &[9, 1], &[9, 6], 11);
    check_all(&[2, 5, 3], &[2, 1, 1], &[2, 5, 3], 12);
}

#[test]
fn incompatible_shapes_are_rejected() {
    for (a, b) in [
        (vec![2, 3], vec![4]),
        (vec![3, 5], vec![5, 3]),
        (vec![2, 3, 4], vec![3, 3]),
    ] {
        for (name, op, _) in OPS {
            let r = op(&randn(&a, 20), &randn(&b, 21));
            assert!(
                matches!(r, Err(Error::Shape { .. })),
                "{name} {a:?} {b:?} should fail, got {r:?}"
            );
        }
    }
}

#[test]
fn affine() {
    let x = randn(&[5, 7, 13], 30);
    for (scale, shift) in [(0.18215f32, 0.0f32), (2.0, -1.0), (-0.5, 3.25)] {
        let y = x.affine(scale, shift).unwrap();
        let want: Vec<f64> = f64s(&x)
            .iter()
            .map(|v| v * scale as f64 + shift as f64)
            .collect();
        assert_tensor_close(&format!("affine {scale} {shift}"), &y, &want, &[5, 7, 13]);
    }
}
