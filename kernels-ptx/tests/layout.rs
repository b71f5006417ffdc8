//! Data movement: up-sampling, concat/split, NCHW <-> NHWC, row gather/scatter. These ops
//! copy values, so results must be exact.

mod common;

use common::*;
use retouch_kernels::{Error, Tensor};

#[test]
fn upsample_nearest2x_matches_reference() {
    let (b, h, w, c) = (2, 5, 7, 3);
    let x = randn(&[b, h, w, c], 1);
    let xv = x.to_vec_f32();
    let y = x.upsample_nearest2x().unwrap();
    assert_eq!(y.shape(), [b, 2 * h, 2 * w, c]);
    let mut want = vec![0.0f32; b * 4 * h * w * c];
    for n in 0..b {
        for oy in 0..2 * h {
            for ox in 0..2 * w {
                for ch in 0..c {
                    want[((n * 2 * h + oy) * 2 * w + ox) * c + ch] =
                        xv[((n * h + oy / 2) * w + ox / 2) * c + ch];
                }
            }
        }
    }
    assert_bits_eq("upsample", &y.to_vec_f32(), &want);
    assert!(randn(&[5, 7, 3], 2).upsample_nearest2x().is_err());
}

#[test]
fn concat_last_values_and_split_round_trip() {
    let a = randn(&[2, 3, 5], 10);
    let b = randn(&[2, 3, 1], 11);
    let c = randn(&[2, 3, 7], 12);
    let cat = Tensor::concat_last(&[&a, &b, &c]).unwrap();
    assert_eq!(cat.shape(), [2, 3, 13]);
    let (av, bv, cv) = (a.to_vec_f32(), b.to_vec_f32(), c.to_vec_f32());
    let want: Vec<f32> = (0..6)
        .flat_map(|r| {
            av[r * 5..(r + 1) * 5]
                .iter()
                .chain(&bv[r..r + 1])
                .chain(&cv[r * 7..(r + 1) * 7])
                .cloned()
                .collect::<Vec<_>>()
        })
        .collect();
    assert_bits_eq("concat", &cat.to_vec_f32(), &want);

    let parts = cat.split_last(&[5, 1, 7]).unwrap();
    assert_eq!(parts.len(), 3);
    for (p, orig) in parts.iter().zip([&a, &b, &c]) {
        assert_eq!(p.shape(), orig.shape());
        assert_bits_eq("split part", &p.to_vec_f32(), &orig.to_vec_f32());
    }
}

#[test]
fn split_last_values() {
    let x = randn(&[9, 13], 13);
    let xv = x.to_vec_f32();
    let parts = x.split_last(&[4, 0, 9]).unwrap();
    assert_eq!(parts[0].shape(), [9, 4]);
    assert_eq!(parts[1].shape(), [9, 0]);
    assert_eq!(parts[2].shape(), [9, 9]);
    let want0: Vec<f32> = xv.chunks(13).flat_map(|r| r[..4].to_vec()).collect();
    let want2: Vec<f32> = xv.chunks(13).flat_map(|r| r[4..].to_vec()).collect();
    assert_bits_eq("split 0", &parts[0].to_vec_f32(), &want0);
    assert_bits_eq("split 2", &parts[2].to_vec_f32(), &want2);
    // Split then concat is the identity too.
    let back = Tensor::concat_last(&parts.iter().collect::<Vec<_>>()).unwrap();
    assert_bits_eq("split+concat", &back.to_vec_f32(), &xv);
}

#[test]
fn concat_and_split_reject_mismatches() {
    let a = randn(&[2, 3, 5], 14);
    assert!(Tensor::concat_last(&[&a, &randn(&[2, 4, 5], 15)]).is_err());
    assert!(Tensor::concat_last(&[&a, &randn(&[6, 5], 16)]).is_err());
    assert!(Tensor::concat_last(&[]).is_err());
    assert!(a.split_last(&[2, 2]).is_err());
}

#[test]
fn nchw_nhwc_transposes() {
    // 9 * 6 = 54 positions and 37 channels: more than one 32-wide tile both ways.
    for (b, c, h, w, seed) in [(2, 3, 5, 7, 20u64), (1, 37, 9, 6, 21)] {
        let x = randn(&[b, c, h, w], seed);
        let xv = x.to_vec_f32();
        let y = x.nchw_to_nhwc().unwrap();
        assert_eq!(y.shape(), [b, h, w, c]);
        let mut want = vec![0.0f32; xv.len()];
        for n in 0..b {
            for ch in 0..c {
                for yy in 0..h {
                    for xx in 0..w {
                        want[((n * h + yy) * w + xx) * c + ch] =
                            xv[((n * c + ch) * h + yy) * w + xx];
                    }
                }
            }
        }
        assert_bits_eq("nchw_to_nhwc", &y.to_vec_f32(), &want);
        let back = y.nhwc_to_nchw().unwrap();
        assert_eq!(back.shape(), [b, c, h, w]);
        assert_bits_eq("nhwc_to_nchw round trip", &back.to_vec_f32(), &xv);
    }
}

#[test]
fn gather_rows_values() {
    let x = randn(&[37, 13], 30);
    let index = [36u32, 0, 5, 5, 17];
    let g = x.gather_rows(&index).unwrap();
    assert_eq!(g.shape(), [5, 13]);
    let want = rows_ref(&f64s(&x), 13, &index);
    assert_tensor_close_tol("gather", &g, &want, &[5, 13], 0.0, 0.0);
    let empty = x.gather_rows(&[]).unwrap();
    assert_eq!(empty.shape(), [0, 13]);
}

#[test]
fn gather_rejects_out_of_range() {
    let x = randn(&[37, 13], 31);
    assert!(matches!(
        x.gather_rows(&[3, 37]),
        Err(Error::Invalid { .. })
    ));
    assert!(randn(&[37], 32).gather_rows(&[0]).is_err());
}

#[test]
fn scatter_rows_values() {
    let mut x = randn(&[37, 13], 33);
    let before = x.to_vec_f32();
    let index = [4u32, 36, 0];
    let rows = randn(&[3, 13], 34);
    x.scatter_rows(&index, &rows).unwrap();
    let mut want = before.clone();
    let rv = rows.to_vec_f32();
    for (i, &r) in index.iter().enumerate() {
        want[r as usize * 13..(r as usize + 1) * 13].copy_from_slice(&rv[i * 13..(i + 1) * 13]);
    }
    assert_bits_eq("scatter", &x.to_vec_f32(), &want);
}

#[test]
fn scatter_rejects_bad_indices_and_leaves_target_alone() {
    let mut x = randn(&[37, 13], 35);
    let before = x.to_vec_f32();
    let rows = randn(&[3, 13], 36);
    assert!(matches!(
        x.scatter_rows(&[1, 37, 2], &rows),
        Err(Error::Invalid { .. })
    ));
    assert!(matches!(
        x.scatter_rows(&[1, 5, 1], &rows),
        Err(Error::Invalid { .. })
    ));
    assert!(
        x.scatter_rows(&[1, 5], &rows).is_err(),
        "row count mismatch"
    );
    assert!(x.scatter_rows(&[1, 2, 3], &randn(&[3, 12], 37)).is_err());
    assert_bits_eq("target after rejected scatters", &x.to_vec_f32(), &before);
}
