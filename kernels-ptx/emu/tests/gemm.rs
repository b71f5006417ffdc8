//! The GEMM kernels (CUDA cores, TF32 and f16 tensor cores) and the split-K reduction against
//! a plain f64 product, on sizes that leave partial tiles in every dimension.
#![cfg(kernel_emu)]

mod common;
use common::*;
use retouch_kernels_emu::simt::BlockOrder;
use retouch_kernels_emu::{gemm, gemm_f16, mma};

/// Block tile of every GEMM-shaped kernel (`gemm.rs`): 128 rows x 64 columns, 256 threads.
const TILE_M: usize = 128;
const TILE_N: usize = 64;
const SHARED_BYTES: usize = 25_600;
const SHARED_BYTES_TF32: usize = 26_624;
const SHARED_BYTES_F16: usize = 30_720;

struct Product {
    m: usize,
    n: usize,
    k: usize,
    a: Vec<f32>,
    /// `[k, n]` when `b_kn`, else `[n, k]`.
    b: Vec<f32>,
    b_kn: bool,
    bias: Vec<f32>,
    c0: Vec<f32>,
}

impl Product {
    fn new(rng: &mut Rng, (m, n, k): (usize, usize, usize), b_kn: bool) -> Product {
        Product {
            m,
            n,
            k,
            a: rng.values(m * k, -1.0, 1.0),
            b: rng.values(k * n, -1.0, 1.0),
            b_kn,
            bias: rng.values(n, -1.0, 1.0),
            c0: rng.values(m * n, -1.0, 1.0),
        }
    }

    fn b_at(&self, kk: usize, j: usize) -> f64 {
        (if self.b_kn {
            self.b[kk * self.n + j]
        } else {
            self.b[j * self.k + kk]
        }) as f64
    }

    /// `alpha * A op(B) + beta * C0 + bias`.
    fn reference(&self, alpha: f32, beta: f32, bias: bool) -> Vec<f32> {
        let mut out = vec![0.0; self.m * self.n];
        for i in 0..self.m {
            for j in 0..self.n {
                let mut s = 0.0f64;
                for kk in 0..self.k {
                    s += self.a[i * self.k + kk] as f64 * self.b_at(kk, j);
                }
                let mut v = alpha as f64 * s + beta as f64 * self.c0[i * self.n + j] as f64;
                if bias {
                    v += self.bias[j] as f64;
                }
                out[i * self.n + j] = v as f32;
            }
        }
        out
    }
}

type GemmKernel = unsafe fn(
    *const f32,
    *const f32,
    *mut f32,
    *const f32,
    *const f32,
    u32,
    u32,
    u32,
    u32,
    u32,
    f32,
    f32,
    *mut f32,
    *mut u32,
);

/// Where the epilogue's `beta` term reads: C itself (an in-place product), or a separate
/// buffer (a residual), with C starting as NaN so that reading C instead would show.
#[derive(Clone, Copy, Debug)]
enum CIn {
    InPlace,
    Separate,
}

/// C's starting values and the `c_in` buffer (None: C itself) for `c_in` holding `c0`.
fn c_buffers(c0: &[f32], c_in: CIn) -> (DeviceBuffer<f32>, Option<DeviceBuffer<f32>>) {
    match c_in {
        CIn::InPlace => (DeviceBuffer::from_slice(c0), None),
        CIn::Separate => (
            DeviceBuffer::from_slice(&vec![f32::NAN; c0.len()]),
            Some(DeviceBuffer::from_slice(c0)),
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    kernel: GemmKernel,
    shared: usize,
    p: &Product,
    alpha: f32,
    beta: f32,
    bias: bool,
    c_in: CIn,
) -> Vec<f32> {
    let (a, b, bias_buf) = (
        DeviceBuffer::from_slice(&p.a),
        DeviceBuffer::from_slice(&p.b),
        DeviceBuffer::from_slice(&p.bias),
    );
    let (c, separate) = c_buffers(&p.c0, c_in);
    let c_in = separate.as_ref().map_or(c.ptr(), |s| s.ptr());
    let grid = [p.n.div_ceil(TILE_N) as u32, p.m.div_ceil(TILE_M) as u32, 1];
    let (m, n, k) = (p.m as u32, p.n as u32, p.k as u32);
    unsafe {
        launch(Launch::new(grid, 256, shared), || {
            kernel(
                a.ptr(),
                b.ptr(),
                c.ptr_mut(),
                c_in,
                bias_buf.ptr(),
                m,
                n,
                k,
                u32::from(p.b_kn),
                u32::from(bias),
                alpha,
                beta,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        })
    };
    c.to_vec()
}

/// Sizes with partial tiles in m, n and k (k not a multiple of the 16-wide k-step).
const SHAPES: [(usize, usize, usize); 3] = [(130, 70, 37), (19, 129, 50), (257, 9, 16)];

#[test]
fn sgemm_f32_matches_the_reference() {
    let mut rng = Rng::new(1);
    for (i, &shape) in SHAPES.iter().enumerate() {
        for b_kn in [true, false] {
            let p = Product::new(&mut rng, shape, b_kn);
            let (alpha, beta, bias) = if i % 2 == 0 {
                (0.75, 0.0, true)
            } else {
                (1.25, 0.5, false)
            };
            let want = p.reference(alpha, beta, bias);
            for c_in in [CIn::InPlace, CIn::Separate] {
                let got = run(gemm::sgemm_f32, SHARED_BYTES, &p, alpha, beta, bias, c_in);
                assert_close(
                    &format!("sgemm_f32 {shape:?} b_kn={b_kn} {c_in:?}"),
                    &got,
                    &want,
                    1e-5,
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn sgemm_tf32_matches_the_reference() {
    let mut rng = Rng::new(2);
    for (i, &shape) in SHAPES.iter().enumerate() {
        for b_kn in [true, false] {
            let p = Product::new(&mut rng, shape, b_kn);
            let (alpha, beta, bias) = if i % 2 == 0 {
                (1.0, 0.0, true)
            } else {
                (0.5, 1.5, true)
            };
            // A residual in every other product (beta 1.5 reads a separate buffer).
            let c_in = if b_kn { CIn::InPlace } else { CIn::Separate };
            let got = run(
                mma::sgemm_tf32,
                SHARED_BYTES_TF32,
                &p,
                alpha,
                beta,
                bias,
                c_in,
            );
            let want = p.reference(alpha, beta, bias);
            // TF32 keeps 10 significand bits per operand: about 1e-3 * sqrt(k) for unit inputs.
            let tol = 1e-3 * (p.k as f32).sqrt();
            assert_close(
                &format!("sgemm_tf32 {shape:?} b_kn={b_kn} {c_in:?}"),
                &got,
                &want,
                tol,
                1e-3,
            );
        }
    }
}

#[test]
fn split_k_gemm_and_reduction_match_the_reference() {
    let mut rng = Rng::new(3);
    let p = Product::new(&mut rng, (70, 45, 300), false);
    let splits = 3u32;
    let (m, n, k) = (p.m as u32, p.n as u32, p.k as u32);
    let (a, b, bias) = (
        DeviceBuffer::from_slice(&p.a),
        DeviceBuffer::from_slice(&p.b),
        DeviceBuffer::from_slice(&p.bias),
    );
    // NaN to start: every split must write its whole slice (the host does not clear it).
    let ws = DeviceBuffer::from_slice(&vec![f32::NAN; splits as usize * p.m * p.n]);
    let grid = [
        p.n.div_ceil(TILE_N) as u32,
        p.m.div_ceil(TILE_M) as u32,
        splits,
    ];
    unsafe {
        // As the host's split launch: raw partial sums, alpha 1, beta 0, no bias, no C_in.
        launch(Launch::new(grid, 256, SHARED_BYTES), || {
            gemm::sgemm_f32(
                a.ptr(),
                b.ptr(),
                ws.ptr_mut(),
                std::ptr::null(),
                bias.ptr(),
                m,
                n,
                k,
                0,
                0,
                1.0,
                0.0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        });
    }
    for c_in in [CIn::InPlace, CIn::Separate] {
        let (c, separate) = c_buffers(&p.c0, c_in);
        let c_in_ptr = separate.as_ref().map_or(c.ptr(), |s| s.ptr());
        unsafe {
            launch(grid_stride(p.m * p.n, 4), || {
                gemm::splitk_reduce_f32(
                    ws.ptr(),
                    c.ptr_mut(),
                    c_in_ptr,
                    bias.ptr(),
                    m * n,
                    n,
                    splits,
                    1,
                    0.5,
                    2.0,
                    0,
                    std::ptr::null(),
                )
            });
        }
        assert_close(
            &format!("split-K sgemm_f32 {c_in:?}"),
            &c.to_vec(),
            &p.reference(0.5, 2.0, true),
            1e-5,
            1e-5,
        );
    }
}

/// One-launch split-K (`ws` and `counters` given): each block writes its slice and the last
/// of an output tile's blocks to arrive sums them through the epilogue. Run with the blocks
/// in several shuffled orders, so that different splits are last: the same bits as the
/// two-launch path (slices summed in slice order either way), and every counter back at zero
/// for the next launch.
#[test]
fn one_launch_split_k_matches_the_two_launch_path() {
    let mut rng = Rng::new(4);
    let p = Product::new(&mut rng, (300, 70, 300), true);
    let splits = 3u32;
    let grid = [
        p.n.div_ceil(TILE_N) as u32,
        p.m.div_ceil(TILE_M) as u32,
        splits,
    ];
    let tiles = (grid[0] * grid[1]) as usize;
    let (m, n, k) = (p.m as u32, p.n as u32, p.k as u32);
    let (a, b, bias) = (
        DeviceBuffer::from_slice(&p.a),
        DeviceBuffer::from_slice(&p.b),
        DeviceBuffer::from_slice(&p.bias),
    );
    let (alpha, beta) = (0.5, 2.0);
    // The two-launch path: raw slices, then the reduction.
    let ws = DeviceBuffer::from_slice(&vec![f32::NAN; splits as usize * p.m * p.n]);
    let two = DeviceBuffer::from_slice(&p.c0);
    unsafe {
        launch(Launch::new(grid, 256, SHARED_BYTES), || {
            gemm::sgemm_f32(
                a.ptr(),
                b.ptr(),
                ws.ptr_mut(),
                std::ptr::null(),
                bias.ptr(),
                m,
                n,
                k,
                1,
                0,
                1.0,
                0.0,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        });
        launch(grid_stride(p.m * p.n, 4), || {
            gemm::splitk_reduce_f32(
                ws.ptr(),
                two.ptr_mut(),
                two.ptr(),
                bias.ptr(),
                m * n,
                n,
                splits,
                1,
                alpha,
                beta,
                0,
                std::ptr::null(),
            )
        });
    }
    let two = two.to_vec();
    assert_close(
        "two-launch split-K",
        &two,
        &p.reference(alpha, beta, true),
        1e-5,
        1e-5,
    );
    let counters = DeviceBuffer::<u32>::zeroed(tiles);
    for (seed, c_in) in [(1, CIn::InPlace), (2, CIn::Separate), (3, CIn::InPlace)] {
        let (c, separate) = c_buffers(&p.c0, c_in);
        let c_in_ptr = separate.as_ref().map_or(c.ptr(), |s| s.ptr());
        let ws = DeviceBuffer::from_slice(&vec![f32::NAN; splits as usize * p.m * p.n]);
        let order = BlockOrder::Shuffled(seed);
        unsafe {
            launch(Launch::new(grid, 256, SHARED_BYTES).in_order(order), || {
                gemm::sgemm_f32(
                    a.ptr(),
                    b.ptr(),
                    c.ptr_mut(),
                    c_in_ptr,
                    bias.ptr(),
                    m,
                    n,
                    k,
                    1,
                    1,
                    alpha,
                    beta,
                    ws.ptr_mut(),
                    counters.ptr_mut(),
                )
            });
        }
        let got = c.to_vec();
        let same = got
            .iter()
            .zip(&two)
            .all(|(g, t)| g.to_bits() == t.to_bits());
        assert!(
            same,
            "one-launch split-K ({order:?}, {c_in:?}) differs from two launches"
        );
        assert!(
            counters.to_vec().iter().all(|&c| c == 0),
            "one-launch split-K ({order:?}) left a counter set: {:?}",
            counters.to_vec()
        );
    }
}

/// How `gemm_mma_f16` is launched: unsplit, or split along k in `splits` slices summed by
/// `splitk_reduce_f32` after it or by its own last block per tile (blocks shuffled).
#[derive(Clone, Copy, Debug)]
enum F16Launch {
    Whole,
    Split(u32),
    SplitOneLaunch(u32, u64),
}

/// `gemm_mma_f16` on `p` (B `[n, k]`, passed as f16 bits), C in place (beta reads C).
fn run_mma_f16(p: &Product, alpha: f32, beta: f32, bias: bool, how: F16Launch) -> Vec<f32> {
    assert!(!p.b_kn, "the f16 kernel reads B as [n, k]");
    let b16: Vec<u16> =
        p.b.iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
    let (a, b, bias_buf) = (
        DeviceBuffer::from_slice(&p.a),
        DeviceBuffer::from_slice(&b16),
        DeviceBuffer::from_slice(&p.bias),
    );
    let c = DeviceBuffer::from_slice(&p.c0);
    let (m, n, k) = (p.m as u32, p.n as u32, p.k as u32);
    let (splits, order) = match how {
        F16Launch::Whole => (1, BlockOrder::Grid),
        F16Launch::Split(s) => (s, BlockOrder::Grid),
        F16Launch::SplitOneLaunch(s, seed) => (s, BlockOrder::Shuffled(seed)),
    };
    let grid = [
        p.n.div_ceil(TILE_N) as u32,
        p.m.div_ceil(TILE_M) as u32,
        splits,
    ];
    let ws = DeviceBuffer::from_slice(&vec![f32::NAN; splits as usize * p.m * p.n]);
    let counters = DeviceBuffer::<u32>::zeroed((grid[0] * grid[1]) as usize);
    // The launch's C, C_in, (has_bias, alpha, beta) and (ws, counters): a split in two
    // launches writes raw sums into the workspace, as the host's, and the reduction applies
    // the epilogue; otherwise the kernel does, summing its own slices when given counters.
    let no_sums = (std::ptr::null_mut(), std::ptr::null_mut());
    let epilogue = (u32::from(bias), alpha, beta);
    let (target, c_in, (has_bias, k_alpha, k_beta), (k_ws, k_counters)) = match how {
        F16Launch::Split(_) => (ws.ptr_mut(), std::ptr::null(), (0, 1.0, 0.0), no_sums),
        F16Launch::Whole => (c.ptr_mut(), c.ptr(), epilogue, no_sums),
        F16Launch::SplitOneLaunch(..) => (
            c.ptr_mut(),
            c.ptr(),
            epilogue,
            (ws.ptr_mut(), counters.ptr_mut()),
        ),
    };
    unsafe {
        launch(
            Launch::new(grid, 256, SHARED_BYTES_F16).in_order(order),
            || {
                gemm_f16::gemm_mma_f16(
                    a.ptr(),
                    b.ptr(),
                    target,
                    c_in,
                    bias_buf.ptr(),
                    m,
                    n,
                    k,
                    has_bias,
                    k_alpha,
                    k_beta,
                    k_ws,
                    k_counters,
                )
            },
        );
        if let F16Launch::Split(_) = how {
            launch(grid_stride(p.m * p.n, 4), || {
                gemm::splitk_reduce_f32(
                    ws.ptr(),
                    c.ptr_mut(),
                    c.ptr(),
                    bias_buf.ptr(),
                    m * n,
                    n,
                    splits,
                    u32::from(bias),
                    alpha,
                    beta,
                    0,
                    std::ptr::null(),
                )
            });
        }
    }
    assert!(
        counters.to_vec().iter().all(|&c| c == 0),
        "gemm_mma_f16 {how:?} left a counter set"
    );
    c.to_vec()
}

/// `gemm_mma_f16` against the f64 product: within the TF32-sized tolerance of f16 operands
/// (10 stored significand bits, as TF32) and, tighter, against the product of the operands
/// rounded to f16 within the f32 kernels' tolerance (products of f16 values are exact in
/// f32). Sizes: the shapes above (k of 37 and 50 take the element-by-element loads), k a
/// multiple of 8 (every load a vector) and of 4 only (A's vector loads, B's by element);
/// split in two launches and in one (blocks shuffled).
#[test]
fn gemm_mma_f16_matches_the_reference() {
    let mut rng = Rng::new(5);
    let shapes = [
        SHAPES[0],
        SHAPES[1],
        SHAPES[2],
        (70, 45, 64),
        (33, 70, 52),
        (200, 130, 520),
    ];
    for (i, &shape) in shapes.iter().enumerate() {
        let p = Product::new(&mut rng, shape, false);
        let rounded = Product {
            a: p.a.iter().map(|&v| round_f16(v)).collect(),
            b: p.b.iter().map(|&v| round_f16(v)).collect(),
            bias: p.bias.clone(),
            c0: p.c0.clone(),
            ..p
        };
        let (alpha, beta, bias) = if i % 2 == 0 {
            (1.0, 0.0, true)
        } else {
            (0.5, 1.5, i % 3 == 0)
        };
        let want = p.reference(alpha, beta, bias);
        let want16 = rounded.reference(alpha, beta, bias);
        let tol = (4e-3 * (p.k as f32).sqrt()).max(1e-2);
        for how in [
            F16Launch::Whole,
            F16Launch::Split(3),
            F16Launch::SplitOneLaunch(3, i as u64),
        ] {
            let got = run_mma_f16(&p, alpha, beta, bias, how);
            let what = format!("gemm_mma_f16 {shape:?} {how:?}");
            assert_close(&what, &got, &want, tol, tol);
            assert_close(&format!("{what} (f16 operands)"), &got, &want16, 2e-4, 2e-4);
        }
    }
}
