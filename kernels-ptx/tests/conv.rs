//! Dense `conv2d` over channels-last maps against an f64 convolution with OIHW weights.

mod common;

use common::*;
use retouch_kernels::{Conv2dParams, Conv2dWeight, DType, Error};

/// Runs one conv case (batch 2) and compares with the f64 reference.
fn check_conv(
    (h, w, cin, cout): (usize, usize, usize, usize),
    k: usize,
    params: Conv2dParams,
    with_bias: bool,
    seed: u64,
) {
    let what = format!(
        "conv {k}x{k} s{} p{} {h}x{w} {cin}->{cout} bias={with_bias}",
        params.stride, params.padding
    );
    let (weight, reference) = random_conv(cout, cin, k, with_bias, seed);
    let x = randn(&[2, h, w, cin], seed + 100);
    let y = x.conv2d(&weight, params).unwrap();
    let (oh, ow) = reference.out_size(h, w, params.stride, params.padding);
    let want = reference.apply(&f64s(&x), 2, (h, w), params.stride, params.padding);
    assert_tensor_close(&what, &y, &want, &[2, oh, ow, cout]);
}

#[test]
fn pointwise_1x1() {
    for bias in [false, true] {
        check_conv((5, 7, 13, 7), 1, Conv2dParams::POINTWISE, bias, 1);
        check_conv((9, 6, 3, 37), 1, Conv2dParams::POINTWISE, bias, 2);
    }
}

#[test]
fn pointwise_1x1_strided() {
    // Not the pointwise fast path: stride 2 skips every other row and column.
    let p = Conv2dParams {
        stride: 2,
        padding: 0,
    };
    check_conv((9, 6, 5, 7), 1, p, true, 3);
}

#[test]
fn same_3x3() {
    for bias in [false, true] {
        check_conv((9, 6, 5, 7), 3, Conv2dParams::SAME_3X3, bias, 4);
        check_conv((5, 7, 3, 13), 3, Conv2dParams::SAME_3X3, bias, 5);
    }
}

#[test]
fn same_3x3_many_rows() {
    // 29 * 23 = 667 output rows per image, 1334 in the batch: the row-chunked im2col GEMM
    // (smaller convs run as one GEMM).
    check_conv((29, 23, 37, 13), 3, Conv2dParams::SAME_3X3, true, 6);
}

#[test]
fn down_3x3_odd_and_even_sizes() {
    for bias in [false, true] {
        check_conv((9, 7, 5, 7), 3, Conv2dParams::DOWN_3X3, bias, 7);
        check_conv((8, 6, 5, 7), 3, Conv2dParams::DOWN_3X3, bias, 8);
        check_conv((5, 10, 3, 13), 3, Conv2dParams::DOWN_3X3, bias, 9);
    }
}

#[test]
fn valid_3x3_no_padding() {
    let p = Conv2dParams {
        stride: 1,
        padding: 0,
    };
    for bias in [false, true] {
        check_conv((5, 7, 3, 7), 3, p, bias, 10);
        check_conv((3, 3, 13, 5), 3, p, bias, 11);
    }
}

#[test]
fn output_size_matches_pytorch() {
    let (weight, _) = random_conv(5, 3, 3, false, 12);
    for (h, w, p, oh, ow) in [
        (9, 7, Conv2dParams::DOWN_3X3, 5, 4),
        (8, 6, Conv2dParams::DOWN_3X3, 4, 3),
        (5, 7, Conv2dParams::SAME_3X3, 5, 7),
        (
            5,
            7,
            Conv2dParams {
                stride: 1,
                padding: 0,
            },
            3,
            5,
        ),
    ] {
        let y = randn(&[1, h, w, 3], 13).conv2d(&weight, p).unwrap();
        assert_eq!(y.shape(), [1, oh, ow, 5], "{h}x{w} {p:?}");
    }
}

#[test]
fn half_precision_weights_are_widened() {
    // A weight stored in f16 or bf16 convolves with exactly its stored values.
    for dtype in [DType::F16, DType::BF16] {
        let w32 = randn_affine(&[7, 5, 3, 3], 14, 0.15, 0.0);
        let b32 = randn(&[7], 15);
        let (w, wv) = stored_as(&w32, dtype);
        let (b, bv) = stored_as(&b32, dtype);
        let weight = Conv2dWeight::from_oihw(&w, Some(&b)).unwrap();
        assert_eq!(weight.in_channels(), 5);
        assert_eq!(weight.out_channels(), 7);
        assert_eq!(weight.kernel_size(), (3, 3));
        let reference = ConvRef {
            weight: wv,
            bias: Some(bv),
            cout: 7,
            cin: 5,
            kh: 3,
            kw: 3,
        };
        let x = randn(&[2, 9, 6, 5], 16);
        let y = x.conv2d(&weight, Conv2dParams::SAME_3X3).unwrap();
        let want = reference.apply(&f64s(&x), 2, (9, 6), 1, 1);
        assert_tensor_close(&format!("{dtype:?} weight"), &y, &want, &[2, 9, 6, 7]);
    }
}

#[test]
fn rejects_bad_inputs() {
    let (weight, _) = random_conv(7, 5, 3, true, 17);
    // Wrong channel count.
    assert!(matches!(
        randn(&[1, 5, 5, 4], 18).conv2d(&weight, Conv2dParams::SAME_3X3),
        Err(Error::Shape { .. })
    ));
    // Input smaller than the kernel without padding.
    let p0 = Conv2dParams {
        stride: 1,
        padding: 0,
    };
    assert!(randn(&[1, 2, 5, 5], 19).conv2d(&weight, p0).is_err());
    // Stride 0.
    let s0 = Conv2dParams {
        stride: 0,
        padding: 1,
    };
    assert!(randn(&[1, 5, 5, 5], 20).conv2d(&weight, s0).is_err());
    // Not channels-last rank 4.
    assert!(randn(&[5, 5, 5], 21).conv2d(&weight, p0).is_err());
    // Bias of the wrong length, weight of the wrong rank.
    let w = randn(&[7, 5, 3, 3], 22);
    assert!(Conv2dWeight::from_oihw(&w, Some(&randn(&[5], 23))).is_err());
    assert!(Conv2dWeight::from_oihw(&randn(&[7, 5, 3], 24), None).is_err());
}
