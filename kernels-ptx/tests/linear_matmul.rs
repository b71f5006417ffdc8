//! `linear`, `matmul` and `matmul_t` against f64 references.

mod common;

use common::*;
use retouch_kernels::{Error, Tensor};

#[test]
fn linear_3d_with_and_without_bias() {
    let x = randn(&[2, 5, 37], 1);
    let w = randn_affine(&[13, 37], 2, 0.2, 0.0);
    let b = randn(&[13], 3);
    let (xv, wv, bv) = (f64s(&x), f64s(&w), f64s(&b));

    let y = x.linear(&w, None).unwrap();
    assert_tensor_close(
        "linear no bias",
        &y,
        &linear_ref(&xv, &wv, None, 13),
        &[2, 5, 13],
    );

    let y = x.linear(&w, Some(&b)).unwrap();
    let want = linear_ref(&xv, &wv, Some(&bv), 13);
    assert_tensor_close("linear bias", &y, &want, &[2, 5, 13]);
}

#[test]
fn linear_1d_input() {
    let x = randn(&[7], 4);
    let w = randn(&[3, 7], 5);
    let b = randn(&[3], 6);
    let y = x.linear(&w, Some(&b)).unwrap();
    let want = linear_ref(&f64s(&x), &f64s(&w), Some(&f64s(&b)), 3);
    assert_tensor_close("linear 1-D", &y, &want, &[3]);

    let y = x.linear(&w, None).unwrap();
    let want = linear_ref(&f64s(&x), &f64s(&w), None, 3);
    assert_tensor_close("linear 1-D no bias", &y, &want, &[3]);
}

#[test]
fn linear_many_rows_and_one_output() {
    // Big enough for the threaded GEMM path; a single output feature as the degenerate case.
    let x = randn(&[300, 65], 7);
    let w = randn_affine(&[97, 65], 8, 0.125, 0.0);
    let b = randn(&[97], 9);
    let y = x.linear(&w, Some(&b)).unwrap();
    let want = linear_ref(&f64s(&x), &f64s(&w), Some(&f64s(&b)), 97);
    assert_tensor_close("linear 300x65 -> 97", &y, &want, &[300, 97]);

    let w1 = randn(&[1, 65], 10);
    let y = x.linear(&w1, None).unwrap();
    let want = linear_ref(&f64s(&x), &f64s(&w1), None, 1);
    assert_tensor_close("linear -> 1", &y, &want, &[300, 1]);
}

#[test]
fn linear_rejects_bad_shapes() {
    let x = randn(&[4, 5], 11);
    assert!(matches!(
        x.linear(&randn(&[3, 6], 12), None),
        Err(Error::Shape { .. })
    ));
    assert!(
        x.linear(&randn(&[3, 5], 13), Some(&randn(&[4], 14)))
            .is_err()
    );
    assert!(x.linear(&randn(&[15], 15), None).is_err());
}

#[test]
fn matmul_2d() {
    let a = randn(&[5, 37], 20);
    let b = randn(&[37, 13], 21);
    let want = matmul_ref(&f64s(&a), &f64s(&b), 5, 37, 13);
    assert_tensor_close("matmul 2-D", &a.matmul(&b).unwrap(), &want, &[5, 13]);
}

#[test]
fn matmul_batched() {
    let a = randn(&[3, 5, 7], 22);
    let b = randn(&[3, 7, 9], 23);
    let (av, bv) = (f64s(&a), f64s(&b));
    let want: Vec<f64> = (0..3)
        .flat_map(|i| {
            matmul_ref(
                &av[i * 35..(i + 1) * 35],
                &bv[i * 63..(i + 1) * 63],
                5,
                7,
                9,
            )
        })
        .collect();
    assert_tensor_close("matmul batched", &a.matmul(&b).unwrap(), &want, &[3, 5, 9]);
}

#[test]
fn matmul_t_2d() {
    let a = randn(&[5, 37], 24);
    let b = randn(&[13, 37], 25);
    let want = matmul_ref(&f64s(&a), &transpose(&f64s(&b), 13, 37), 5, 37, 13);
    assert_tensor_close("matmul_t 2-D", &a.matmul_t(&b).unwrap(), &want, &[5, 13]);
}

#[test]
fn matmul_t_batched() {
    let a = randn(&[3, 5, 7], 26);
    let b = randn(&[3, 9, 7], 27);
    let (av, bv) = (f64s(&a), f64s(&b));
    let want: Vec<f64> = (0..3)
        .flat_map(|i| {
            let bt = transpose(&bv[i * 63..(i + 1) * 63], 9, 7);
            matmul_ref(&av[i * 35..(i + 1) * 35], &bt, 5, 7, 9)
        })
        .collect();
    assert_tensor_close(
        "matmul_t batched",
        &a.matmul_t(&b).unwrap(),
        &want,
        &[3, 5, 9],
    );
}

#[test]
fn matmul_rejects_bad_shapes() {
    let a = randn(&[3, 5, 7], 28);
    assert!(a.matmul(&randn(&[3, 6, 9], 29)).is_err(), "inner mismatch");
    assert!(a.matmul(&randn(&[2, 7, 9], 30)).is_err(), "batch mismatch");
    assert!(a.matmul(&randn(&[7, 9], 31)).is_err(), "rank mismatch");
    assert!(
        a.matmul_t(&randn(&[3, 9, 6], 32)).is_err(),
        "matmul_t inner"
    );
    let a2 = randn(&[4, 6], 33);
    assert!(
        Tensor::matmul(&a2, &randn(&[4, 6], 34)).is_err(),
        "[4,6] x [4,6] has no inner match"
    );
    assert!(a2.matmul_t(&randn(&[4, 6], 35)).is_ok());
}
