//! Pointwise activations and GEGLU against f64 formulas.

mod common;

use common::*;
use retouch_kernels::{DType, Tensor};

/// Random values of several magnitudes plus edge points (large negative and positive inputs,
/// where exp overflows or underflows), 5x7x37 = 1295 values after the edge points.
fn activation_input() -> Tensor {
    let mut v = randn_affine(&[5, 7, 37], 1, 3.0, 0.0).to_vec_f32();
    let edges = [
        -100.0f32, -88.5, -30.0, -10.0, -3.1, -1.0, -1e-3, 1e-6, 0.5, 2.5, 10.0, 30.0, 88.5, 100.0,
    ];
    v[..edges.len()].copy_from_slice(&edges);
    Tensor::from_vec(v, &[5, 7, 37]).unwrap()
}

fn check(name: &str, f: impl Fn(&Tensor) -> retouch_kernels::Result<Tensor>, r: fn(f64) -> f64) {
    let x = activation_input();
    let y = f(&x).unwrap();
    let want: Vec<f64> = f64s(&x).into_iter().map(r).collect();
    assert_tensor_close(name, &y, &want, x.shape());
}

#[test]
fn relu() {
    check("relu", Tensor::relu, |x| x.max(0.0));
}

#[test]
fn silu() {
    check("silu", Tensor::silu, silu_ref);
}

#[test]
fn gelu_erf_form() {
    check("gelu", Tensor::gelu, gelu_ref);
}

#[test]
fn gelu_tanh() {
    check("gelu_tanh", Tensor::gelu_tanh, gelu_tanh_ref);
}

#[test]
fn quick_gelu() {
    check("quick_gelu", Tensor::quick_gelu, quick_gelu_ref);
}

#[test]
fn gelu_forms_differ() {
    // The erf and tanh forms must not be swapped: they differ by ~4.4e-4 at |x| = 2.5, far
    // more than either kernel's error.
    let x = Tensor::from_vec(vec![-2.5f32, 2.5], &[2]).unwrap();
    let (a, b) = (
        x.gelu().unwrap().to_vec_f32(),
        x.gelu_tanh().unwrap().to_vec_f32(),
    );
    for (i, &xv) in [-2.5f64, 2.5].iter().enumerate() {
        assert!((a[i] as f64 - gelu_ref(xv)).abs() < 1e-6, "gelu({xv})");
        assert!(
            (b[i] as f64 - gelu_tanh_ref(xv)).abs() < 1e-6,
            "gelu_tanh({xv})"
        );
        assert!((a[i] - b[i]).abs() > 4e-4, "forms at {xv}");
    }
}

#[test]
fn reference_erf_is_accurate() {
    // Spot values of erf (the reference GELU depends on it).
    for (x, want) in [
        (0.1, 0.112_462_916_018_284_9),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (-1.7, -0.983_790_458_590_774_6),
        (3.0, 0.999_977_909_503_001_4),
    ] {
        assert!((erf_ref(x) - want).abs() < 1e-14, "erf_ref({x})");
    }
}

#[test]
fn geglu_matches_diffusers() {
    // diffusers: hidden, gate = proj(x).chunk(2, dim=-1); hidden * gelu(gate).
    for (shape, seed) in [
        (vec![2, 5, 2 * 37], 10u64),
        (vec![3, 2], 11),
        (vec![300, 26], 12),
    ] {
        let x = randn_affine(&shape, seed, 2.0, 0.0);
        let last = *shape.last().unwrap();
        let half = last / 2;
        let xv = f64s(&x);
        let want: Vec<f64> = xv
            .chunks(last)
            .flat_map(|row| {
                let (hidden, gate) = row.split_at(half);
                hidden
                    .iter()
                    .zip(gate)
                    .map(|(h, g)| h * gelu_ref(*g))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut out_shape = shape.clone();
        *out_shape.last_mut().unwrap() = half;
        assert_tensor_close(
            &format!("geglu {shape:?}"),
            &x.geglu().unwrap(),
            &want,
            &out_shape,
        );
    }
    assert!(randn(&[4, 7], 13).geglu().is_err(), "odd last dimension");
}

#[test]
fn activations_reject_half_tensors() {
    let x = randn(&[3, 5], 20).to_dtype(DType::F16).unwrap();
    assert!(x.silu().is_err());
    assert!(x.softmax_last_dim().is_err());
}
