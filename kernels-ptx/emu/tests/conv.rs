//! The convolution kernels against plain f64 convolutions over OIHW weights: the implicit-GEMM
//! convs on CUDA cores and TF32 tensor cores (`conv2d_f32`, `conv2d_tf32`), the patch
//! gathers (`im2col_f32`, `im2col_f16`) and the masked convs over a ragged batch with an
//! f32, f16 or bf16 cache (`masked_conv2d_cache_*`). Sizes are awkward (channels off every
//! tile width, odd maps, partial row and column tiles), and every launch is the host
//! launcher's (`src/cuda/gemm.rs`, `blas.rs`, `ops.rs`): grid, block, shared memory, and the
//! split-K an H100 gets, followed by its `splitk_reduce_f32`.
#![cfg(kernel_emu)]

mod common;
use common::*;
use retouch_kernels_emu::simt::BlockOrder;
use retouch_kernels_emu::{elementwise, gemm, gemm_f16, layout, mma};

/// Block tile of the GEMM-shaped kernels (`src/cuda/gemm.rs`: `TILE_M`, `TILE_N`).
const TILE_M: usize = 128;
const TILE_N: usize = 64;
/// `SHARED_BYTES`, `SHARED_BYTES_TF32` and `SHARED_BYTES_F16` of `src/cuda/gemm.rs`.
const SHARED_BYTES: usize = 2 * (16 * 132 + 16 * 68) * 4;
const SHARED_BYTES_TF32: usize = 2 * (16 * 136 + 16 * 72) * 4;
const SHARED_BYTES_F16: usize = 2 * (128 + 64) * 40 * 2;
/// `ops.rs`'s grid cap for grid-stride kernels.
const MAX_GRID: usize = 1 << 16;

/// The host's split-K plan (`k_splits` in `src/cuda/gemm.rs`), for a device of `sms`
/// multiprocessors.
fn k_splits(blocks: usize, k: usize, sms: usize) -> usize {
    const MIN_TILES_PER_SPLIT: usize = 8;
    const MAX_SPLITS: usize = 16;
    if blocks >= sms {
        return 1;
    }
    let by_k = k.div_ceil(16) / MIN_TILES_PER_SPLIT;
    (2 * sms)
        .div_ceil(blocks.max(1))
        .min(by_k)
        .clamp(1, MAX_SPLITS)
}

/// An H100's multiprocessors: small convs there are split along k.
const H100_SMS: usize = 132;

/// The selftest's tolerance of the f32 GEMM-shaped checks (`GEMM_TOL`), used as both the
/// absolute and the relative part.
const GEMM_TOL: f32 = 2e-4;

/// The selftest's TF32 tolerance (`tf32_tol`): inputs rounded to 10 significand bits.
fn tf32_tol(k: usize) -> f32 {
    (4e-3 * (k as f32).sqrt()).max(1e-2)
}

/// `cvt.rna.tf32.f32` written out: keep 10 significand bits, rounding the 13 dropped bits to
/// nearest with ties away from zero (adding half a unit to the magnitude bits, then cutting).
fn tf32_rna(x: f32) -> f32 {
    let bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    let magnitude = ((bits & 0x7fff_ffff) + 0x1000) & 0x7fff_e000;
    f32::from_bits(sign | magnitude)
}

/// `ops.rs`'s `grid_stride(n)`: 256 threads, enough blocks to cover `n` (at most 2^16).
fn host_grid_stride(n: usize) -> Launch {
    Launch::new([n.div_ceil(256).clamp(1, MAX_GRID) as u32, 1, 1], 256, 0)
}

/// A conv's shape: input `[batch, h, w, cin]`, weight `[cout, cin, kh, kw]`.
#[derive(Clone, Copy, Debug)]
struct Geom {
    batch: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    bias: bool,
}

impl Geom {
    /// The CPU's `ConvGeometry::out_h` / `out_w`.
    fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    fn k(&self) -> usize {
        self.kh * self.kw * self.cin
    }
    fn m(&self) -> usize {
        self.batch * self.out_h() * self.out_w()
    }
    fn name(&self) -> String {
        format!(
            "{}x{}x{}x{}->{} {}x{}/{} p{}{}",
            self.batch,
            self.h,
            self.w,
            self.cin,
            self.cout,
            self.kh,
            self.kw,
            self.stride,
            self.pad,
            if self.bias { " bias" } else { "" }
        )
    }
}

/// PyTorch's weight and bias, and the packed `[kh * kw * cin, cout]` matrix the kernels read
/// (rows by (ky, kx, ci), as `Conv2dWeight::from_oihw` packs it).
struct Weight {
    oihw: Vec<f32>,
    bias: Vec<f32>,
    packed: Vec<f32>,
}

impl Weight {
    fn new(rng: &mut Rng, g: &Geom) -> Weight {
        let oihw = rng.values(g.cout * g.cin * g.kh * g.kw, -1.0, 1.0);
        let bias = rng.values(g.cout, -1.0, 1.0);
        let mut packed = vec![0.0; oihw.len()];
        for co in 0..g.cout {
            for ci in 0..g.cin {
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let src = ((co * g.cin + ci) * g.kh + ky) * g.kw + kx;
                        packed[((ky * g.kw + kx) * g.cin + ci) * g.cout + co] = oihw[src];
                    }
                }
            }
        }
        Weight { oihw, bias, packed }
    }

    fn at(&self, g: &Geom, co: usize, ci: usize, ky: usize, kx: usize) -> f32 {
        self.oihw[((co * g.cin + ci) * g.kh + ky) * g.kw + kx]
    }

    /// The f16 tensor-core kernels' operand: `packed` transposed to `[cout, k]` and rounded
    /// to f16 (its bits), as the host's `transpose_f32_to_f16` makes it.
    fn transposed_f16(&self, g: &Geom) -> Vec<u16> {
        let (k, cout) = (g.k(), g.cout);
        (0..cout * k)
            .map(|i| half::f16::from_f32(self.packed[(i % k) * cout + i / k]).to_bits())
            .collect()
    }
}

/// The weight operand a conv kernel reads: the packed f32 `[k, cout]` (`f32`), or its
/// transpose as f16 bits (`u16`, the tensor-core kernels).
trait WeightOperand: Copy {
    fn of(wt: &Weight, g: &Geom) -> Vec<Self>;
}
impl WeightOperand for f32 {
    fn of(wt: &Weight, _: &Geom) -> Vec<f32> {
        wt.packed.clone()
    }
}
impl WeightOperand for u16 {
    fn of(wt: &Weight, g: &Geom) -> Vec<u16> {
        wt.transposed_f16(g)
    }
}

/// The plain convolution of one channels-last map `[h, w, cin]` at output `(oy, ox)`, every
/// input and weight passed through `operand` first, summed in f64: the `cout` outputs, and
/// the sums of the products' magnitudes (for rounding-error bounds).
fn conv_at(
    g: &Geom,
    map: &[f32],
    wt: &Weight,
    (oy, ox): (usize, usize),
    operand: fn(f32) -> f32,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0f64; g.cout];
    let mut mag = vec![0.0f64; g.cout];
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
            let ix = (ox * g.stride + kx) as isize - g.pad as isize;
            if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                continue;
            }
            let row = &map[(iy as usize * g.w + ix as usize) * g.cin..][..g.cin];
            for co in 0..g.cout {
                for (ci, &v) in row.iter().enumerate() {
                    let p = operand(v) as f64 * operand(wt.at(g, co, ci, ky, kx)) as f64;
                    out[co] += p;
                    mag[co] += p.abs();
                }
            }
        }
    }
    if g.bias {
        for co in 0..g.cout {
            out[co] += wt.bias[co] as f64;
            mag[co] += (wt.bias[co] as f64).abs();
        }
    }
    (out, mag)
}

/// The dense conv of `x = [batch, h, w, cin]`: `[batch * out_h * out_w, cout]` as f32, and
/// the largest sum of product magnitudes of any output.
fn dense_reference(g: &Geom, x: &[f32], wt: &Weight, operand: fn(f32) -> f32) -> (Vec<f32>, f64) {
    let mut out = Vec::with_capacity(g.m() * g.cout);
    let mut largest = 0.0f64;
    let hwc = g.h * g.w * g.cin;
    for b in 0..g.batch {
        for oy in 0..g.out_h() {
            for ox in 0..g.out_w() {
                let (v, mag) = conv_at(g, &x[b * hwc..][..hwc], wt, (oy, ox), operand);
                out.extend(v.iter().map(|&v| v as f32));
                largest = mag.iter().fold(largest, |l, &m| l.max(m));
            }
        }
    }
    (out, largest)
}

/// The conv kernels' signature: `(x, weight, bias, out, residual, m, cout, h, w, cin, kh,
/// kw, stride, pad, out_h, out_w, has_bias, has_residual, ws, counters)`, the weight as
/// `W` says.
type ConvKernel<W> = unsafe fn(
    *const f32,
    *const W,
    *const f32,
    *mut f32,
    *const f32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    *mut f32,
    *mut u32,
    u32,
    *const u32,
);

/// How a split launch sums its slices: `splitk_reduce_f32` after it, or its own last block
/// per tile (`ws` and `counters` given), with the blocks in a shuffled order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sums {
    TwoLaunches,
    OneLaunch,
}

/// Runs the split-K reduction as the host's `finish_split`: `out = sum of the slices +
/// bias + residual` (alpha 1; beta 1 with a residual, else 0 and no `c_in`; without a bias
/// the host passes the workspace as the bias pointer).
fn split_reduce(
    ws: &DeviceBuffer<f32>,
    out: &DeviceBuffer<f32>,
    (bias, (rows_per_sample, sample_of_row)): (Option<&DeviceBuffer<f32>>, (u32, *const u32)),
    residual: Option<&DeviceBuffer<f32>>,
    (m, n): (usize, usize),
    splits: usize,
) {
    let bias_ptr = bias.map_or(ws.ptr(), |b| b.ptr());
    let has_bias = u32::from(bias.is_some());
    let (c_in, beta) = residual.map_or((std::ptr::null(), 0.0), |r| (r.ptr(), 1.0));
    unsafe {
        launch(host_grid_stride(m * n), || {
            gemm::splitk_reduce_f32(
                ws.ptr(),
                out.ptr_mut(),
                c_in,
                bias_ptr,
                (m * n) as u32,
                n as u32,
                splits as u32,
                has_bias,
                1.0,
                beta,
                rows_per_sample,
                sample_of_row,
            )
        })
    };
}

/// A bias per sample in place of the weight's: `[samples, cout]` values, and which sample
/// each output row takes (`rows_per_sample` rows each, or a table).
struct SampleBias {
    values: Vec<f32>,
    rows_per_sample: u32,
    sample_of_row: Option<Vec<u32>>,
}

impl SampleBias {
    /// `want` (which has the weight's bias `own`, if any) with each row's sample bias in
    /// its place.
    fn apply(&self, want: &[f32], own: Option<&[f32]>, cout: usize) -> Vec<f32> {
        want.iter()
            .enumerate()
            .map(|(i, &w)| {
                let (row, col) = (i / cout, i % cout);
                let sample = match &self.sample_of_row {
                    Some(table) => table[row] as usize,
                    None => row / self.rows_per_sample as usize,
                };
                w - own.map_or(0.0, |b| b[col]) + self.values[sample * cout + col]
            })
            .collect()
    }
}

/// The output side of a GEMM-shaped conv launch, set up as the host does: C (NaN until
/// written, as the host's uninitialised output), and when split a NaN `[splits, m, cout]`
/// workspace the launch writes raw sums into (no bias or residual: the reduction adds them).
/// Without a bias the kernel is given the packed weight as its bias pointer, as the host
/// does; without a residual, a null one.
struct ConvOutput {
    out: DeviceBuffer<f32>,
    workspace: Option<DeviceBuffer<f32>>,
    bias: Option<DeviceBuffer<f32>>,
    residual: Option<DeviceBuffer<f32>>,
    m: usize,
    cout: usize,
    splits: usize,
    /// One zeroed counter per output tile when a split launch sums its own slices.
    counters: Option<DeviceBuffer<u32>>,
    /// With a bias per sample: rows per sample, and the table of each row's sample.
    bias_rows: (u32, Option<DeviceBuffer<u32>>),
}

impl ConvOutput {
    fn new(
        g: &Geom,
        wt: &Weight,
        m: usize,
        (splits, sums): (usize, Sums),
        (residual, sample_bias): (Option<&[f32]>, Option<&SampleBias>),
    ) -> ConvOutput {
        let cout = g.cout;
        let tiles = cout.div_ceil(TILE_N) * m.div_ceil(TILE_M);
        let bias = match sample_bias {
            Some(sb) => Some(DeviceBuffer::from_slice(&sb.values)),
            None => g.bias.then(|| DeviceBuffer::from_slice(&wt.bias)),
        };
        let bias_rows = sample_bias.map_or((0, None), |sb| {
            let table = sb.sample_of_row.as_deref().map(DeviceBuffer::from_slice);
            (sb.rows_per_sample, table)
        });
        ConvOutput {
            bias_rows,
            counters: (splits > 1 && sums == Sums::OneLaunch).then(|| DeviceBuffer::zeroed(tiles)),
            out: DeviceBuffer::from_slice(&vec![f32::NAN; m * cout]),
            workspace: (splits > 1)
                .then(|| DeviceBuffer::from_slice(&vec![f32::NAN; splits * m * cout])),
            bias,
            residual: residual.map(DeviceBuffer::from_slice),
            m,
            cout,
            splits,
        }
    }

    fn residual_ptr(&self) -> *const f32 {
        self.residual.as_ref().map_or(std::ptr::null(), |r| r.ptr())
    }

    /// Whether `splitk_reduce_f32` follows the launch (which then writes raw sums).
    fn reduced_after(&self) -> bool {
        self.workspace.is_some() && self.counters.is_none()
    }

    fn has_residual(&self) -> u32 {
        u32::from(self.residual.is_some() && !self.reduced_after())
    }

    /// The kernel's `(ws, counters)`: null unless the launch sums its own slices.
    fn sums_ptrs(&self) -> (*mut f32, *mut u32) {
        match (&self.workspace, &self.counters) {
            (Some(ws), Some(counters)) => (ws.ptr_mut(), counters.ptr_mut()),
            _ => (std::ptr::null_mut(), std::ptr::null_mut()),
        }
    }

    /// The blocks' order: shuffled when the launch sums its own slices, so that different
    /// splits finish last.
    fn order(&self) -> BlockOrder {
        match self.counters {
            Some(_) => BlockOrder::Shuffled(self.m as u64 * 31 + self.splits as u64),
            None => BlockOrder::Grid,
        }
    }

    /// Where the launch writes: the workspace when a reduction follows, else C.
    fn target(&self) -> *mut f32 {
        match &self.workspace {
            Some(ws) if self.reduced_after() => ws.ptr_mut(),
            _ => self.out.ptr_mut(),
        }
    }

    /// The bias pointer, `unused` (any buffer) without a bias.
    fn bias_ptr(&self, unused: *const f32) -> *const f32 {
        self.bias.as_ref().map_or(unused, |b| b.ptr())
    }

    /// The kernel's `(rows_per_sample, sample_of_row)`.
    fn bias_rows(&self) -> (u32, *const u32) {
        let table = self
            .bias_rows
            .1
            .as_ref()
            .map_or(std::ptr::null(), |t| t.ptr());
        (self.bias_rows.0, table)
    }

    fn has_bias(&self) -> u32 {
        u32::from(self.bias.is_some() && !self.reduced_after())
    }

    /// `(ceil(cout / 64), ceil(m / 128), splits)`.
    fn grid(&self) -> [u32; 3] {
        [
            self.cout.div_ceil(TILE_N) as u32,
            self.m.div_ceil(TILE_M) as u32,
            self.splits as u32,
        ]
    }

    /// C after the launch (and, when split in two launches, the reduction); a one-launch
    /// split must leave its counters at zero.
    fn finish(self) -> Vec<f32> {
        match (&self.workspace, &self.counters) {
            (Some(ws), None) => {
                let dims = (self.m, self.cout);
                let bias = (self.bias.as_ref(), self.bias_rows());
                split_reduce(
                    ws,
                    &self.out,
                    bias,
                    self.residual.as_ref(),
                    dims,
                    self.splits,
                );
            }
            (_, Some(counters)) => {
                let left = counters.to_vec();
                assert!(left.iter().all(|&c| c == 0), "counters left set: {left:?}");
            }
            (None, None) => {}
        }
        self.out.to_vec()
    }
}

/// A dense conv launched as `conv2d_on` does: grid `(ceil(cout / 64), ceil(m / 128),
/// splits)`, 256 threads, `shared` bytes; split launches write raw sums (no bias) into a
/// `[splits, m, cout]` workspace that `splitk_reduce_f32` then sums with the bias and the
/// residual. The output and workspace start as NaN (the host's are uninitialised), so an
/// unwritten element fails.
fn run_conv<W: WeightOperand>(
    kernel: ConvKernel<W>,
    shared: usize,
    g: &Geom,
    x: &[f32],
    wt: &Weight,
    (splits, sums): (usize, Sums),
    extras: (Option<&[f32]>, Option<&SampleBias>),
) -> Vec<f32> {
    let (m, cout) = (g.m(), g.cout);
    let xd = DeviceBuffer::from_slice(x);
    let packed = DeviceBuffer::from_slice(&W::of(wt, g));
    let o = ConvOutput::new(g, wt, m, (splits, sums), extras);
    let (target, bias_ptr, has_bias) = (o.target(), o.bias_ptr(xd.ptr()), o.has_bias());
    let (residual_ptr, has_residual) = (o.residual_ptr(), o.has_residual());
    let (ws, counters) = o.sums_ptrs();
    let (rows_per_sample, sample_of_row) = o.bias_rows();
    let u = |v: usize| v as u32;
    unsafe {
        launch(
            Launch::new(o.grid(), 256, shared).in_order(o.order()),
            || {
                kernel(
                    xd.ptr(),
                    packed.ptr(),
                    bias_ptr,
                    target,
                    residual_ptr,
                    u(m),
                    u(cout),
                    u(g.h),
                    u(g.w),
                    u(g.cin),
                    u(g.kh),
                    u(g.kw),
                    u(g.stride),
                    u(g.pad),
                    u(g.out_h()),
                    u(g.out_w()),
                    has_bias,
                    has_residual,
                    ws,
                    counters,
                    rows_per_sample,
                    sample_of_row,
                )
            },
        )
    };
    o.finish()
}

/// The dense conv cases, after the selftest's (3x3 same and downsampling, pointwise, an uneven
/// 2x3 kernel without padding), on other awkward sizes: several row tiles (m up to 286),
/// several column tiles (cout 70, 130), channels 3 to 77, and k long enough that an H100
/// splits it (2 or 3 splits).
const CONVS: [Geom; 8] = [
    geom(2, 7, 9, 3, 5, (3, 3), 1, 1, true),
    geom(2, 7, 9, 40, 77, (3, 3), 2, 1, true),
    geom(2, 7, 9, 77, 40, (2, 3), 2, 0, false),
    geom(3, 5, 11, 19, 70, (1, 1), 1, 0, false),
    geom(2, 6, 7, 5, 9, (1, 1), 2, 1, true),
    geom(1, 13, 11, 21, 130, (3, 3), 1, 1, true),
    geom(2, 11, 13, 30, 33, (3, 3), 1, 1, false),
    geom(3, 9, 8, 6, 17, (3, 3), 2, 0, true),
];

#[allow(clippy::too_many_arguments)]
const fn geom(
    batch: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    (kh, kw): (usize, usize),
    stride: usize,
    pad: usize,
    bias: bool,
) -> Geom {
    Geom {
        batch,
        h,
        w,
        cin,
        cout,
        kh,
        kw,
        stride,
        pad,
        bias,
    }
}

/// `want + residual`, element by element.
fn plus(want: &[f32], residual: &[f32]) -> Vec<f32> {
    want.iter().zip(residual).map(|(w, r)| w + r).collect()
}

/// Which launches of a case add a residual: every other one, alternating between cases, so
/// that split and unsplit launches are each checked with and without one.
fn with_residual(case: usize, launch: usize) -> bool {
    (case + launch) % 2 == 1
}

/// What a kernel's products see: its f32 operands, or the operands rounded to f16 (the f16
/// tensor-core kernels), checked against the f64 reference within the selftest's TF32
/// tolerance and, tighter, against the reference of the rounded operands within `GEMM_TOL`
/// (the products of f16 values are exact in f32; only the sums round).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operands {
    F32,
    F16,
}

impl Operands {
    /// `got` against `reference(operand rounding)`, with `finish` applied to the reference
    /// (the residual or the bias per sample).
    fn check(
        self,
        what: &str,
        got: &[f32],
        k: usize,
        reference: impl Fn(fn(f32) -> f32) -> Vec<f32>,
        finish: impl Fn(&[f32]) -> Vec<f32>,
    ) {
        match self {
            Operands::F32 => {
                let want = finish(&reference(|v| v));
                assert_close(what, got, &want, GEMM_TOL, GEMM_TOL);
            }
            Operands::F16 => {
                let tol = tf32_tol(k);
                assert_close(what, got, &finish(&reference(|v| v)), tol, tol);
                let want = finish(&reference(round_f16));
                let what = format!("{what} (f16 operands)");
                assert_close(&what, got, &want, GEMM_TOL, GEMM_TOL);
            }
        }
    }
}

/// A dense conv kernel against the f64 conv, launched as an H100's host launcher does
/// (split-K where it splits: 2 or 3 k-slices, then `splitk_reduce_f32`, or in one launch)
/// and, where that splits, also unsplit (a device with fewer SMs, or more tiles); every
/// other launch adds a residual, the others a bias per sample (a map's rows).
fn check_conv<W: WeightOperand>(
    name: &str,
    (kernel, shared): (ConvKernel<W>, usize),
    seed: u64,
    operands: Operands,
) {
    let mut rng = Rng::new(seed);
    let mut coverage = Coverage::default();
    for (case, g) in CONVS.iter().enumerate() {
        let x = rng.values(g.batch * g.h * g.w * g.cin, -1.0, 1.0);
        let wt = Weight::new(&mut rng, g);
        let residual = rng.values(g.m() * g.cout, -1.0, 1.0);
        let sample_bias = SampleBias {
            values: rng.values(g.batch * g.cout, -1.0, 1.0),
            rows_per_sample: (g.out_h() * g.out_w()) as u32,
            sample_of_row: None,
        };
        let own_bias = g.bias.then_some(&wt.bias[..]);
        for (i, (splits, sums)) in coverage.plans(g.cout, g.m(), g.k()).into_iter().enumerate() {
            let add = with_residual(case, i).then_some(&residual[..]);
            let sb = add.is_none().then_some(&sample_bias);
            let plan = (splits, sums);
            let got = run_conv(kernel, shared, g, &x, &wt, plan, (add, sb));
            let what = format!(
                "{name} {} splits={splits} {sums:?} residual={} sample bias={}",
                g.name(),
                add.is_some(),
                sb.is_some()
            );
            let reference = |operand| dense_reference(g, &x, &wt, operand).0;
            let finish = |want: &[f32]| with_extras(want, (add, sb), own_bias, g.cout);
            operands.check(&what, &got, g.k(), reference, finish);
            coverage.launched(splits, add.is_some(), sb.is_some());
        }
    }
    coverage.check("a bias per sample");
}

/// Which launches of the conv cases split k and added a residual or a bias per sample,
/// so that a check can require each kind both split and unsplit.
#[derive(Default)]
struct Coverage {
    split_cases: usize,
    /// Launches adding a residual: unsplit, split.
    residual: [usize; 2],
    /// Launches adding a bias per sample: unsplit, split.
    sample_bias: [usize; 2],
}

impl Coverage {
    /// The launches of an `m x cout x k` product as an H100's host launcher makes them
    /// (split-K where it splits, summed in two launches), and where that splits, also in
    /// one launch and unsplit (a device with fewer SMs, or more tiles).
    fn plans(&mut self, cout: usize, m: usize, k: usize) -> Vec<(usize, Sums)> {
        let blocks = cout.div_ceil(TILE_N) * m.div_ceil(TILE_M);
        let splits = k_splits(blocks, k, H100_SMS);
        let mut plans = vec![(splits, Sums::TwoLaunches)];
        if splits > 1 {
            plans.extend([(splits, Sums::OneLaunch), (1, Sums::TwoLaunches)]);
            self.split_cases += 1;
        }
        plans
    }

    fn launched(&mut self, splits: usize, residual: bool, sample_bias: bool) {
        self.residual[usize::from(splits > 1)] += usize::from(residual);
        self.sample_bias[usize::from(splits > 1)] += usize::from(sample_bias);
    }

    /// Fails unless some cases split and split and unsplit launches each added a residual
    /// and a bias (`bias_kind` names it in the message).
    fn check(&self, bias_kind: &str) {
        assert!(self.split_cases >= 2, "the cases must exercise split-K");
        for (what, launches) in [("a residual", self.residual), (bias_kind, self.sample_bias)] {
            assert!(
                launches.iter().all(|&n| n > 0),
                "split and unsplit launches must add {what}: {launches:?}"
            );
        }
    }
}

/// A reference's output rows with what the launch added: the residual, or each row's
/// sample bias in place of the weight's own (`own_bias`).
fn with_extras(
    want: &[f32],
    (residual, sample_bias): (Option<&[f32]>, Option<&SampleBias>),
    own_bias: Option<&[f32]>,
    cout: usize,
) -> Vec<f32> {
    match (residual, sample_bias) {
        (Some(r), _) => plus(want, r),
        (None, Some(sb)) => sb.apply(want, own_bias, cout),
        (None, None) => want.to_vec(),
    }
}

/// `conv2d_f32` against the f64 conv (the selftest's `GEMM_TOL`).
#[test]
fn conv2d_f32_matches_the_reference() {
    let kernel = (gemm::conv2d_f32 as ConvKernel<f32>, SHARED_BYTES);
    check_conv("conv2d_f32", kernel, 11, Operands::F32);
}

/// `conv2d_mma_f16` (f16 tensor cores, the weight transposed to f16): the cases with 4n
/// channels take its vector loads, the others its element-by-element ones.
#[test]
fn conv2d_mma_f16_matches_the_reference() {
    let kernel = (
        gemm_f16::conv2d_mma_f16 as ConvKernel<u16>,
        SHARED_BYTES_F16,
    );
    check_conv("conv2d_mma_f16", kernel, 15, Operands::F16);
}

/// `transpose_f32_to_f16` makes the tensor-core kernels' weight operand from the packed
/// weight exactly (the test's `transposed_f16`), under the host's launch and a 3-block grid.
#[test]
fn transpose_f32_to_f16_matches_the_reference() {
    let mut rng = Rng::new(16);
    for g in &CONVS[..4] {
        let wt = Weight::new(&mut rng, g);
        let want: Vec<f32> = wt
            .transposed_f16(g)
            .into_iter()
            .map(|b| half::f16::from_bits(b).to_f32())
            .collect();
        let (rows, cols) = (g.k(), g.cout);
        for l in [
            host_grid_stride(rows * cols),
            Launch::new([3, 1, 1], 256, 0),
        ] {
            let packed = DeviceBuffer::from_slice(&wt.packed);
            let out = DeviceBuffer::from_slice(&vec![half::f16::NAN; rows * cols]);
            unsafe {
                launch(l, || {
                    elementwise::transpose_f32_to_f16(
                        packed.ptr(),
                        out.ptr_mut() as *mut _,
                        rows as u32,
                        cols as u32,
                    )
                })
            };
            let got: Vec<f32> = out.to_vec().iter().map(|v| v.to_f32()).collect();
            let what = format!("transpose_f32_to_f16 {} grid {:?}", g.name(), l.grid);
            assert_close(&what, &got, &want, 0.0, 0.0);
        }
    }
}

/// `conv2d_tf32` (never split by the host) against the f64 conv within the selftest's TF32
/// tolerance `max(4e-3 sqrt(k), 1e-2)`; and, tighter, against the f64 conv of the operands
/// rounded to TF32 (`cvt.rna`, as the kernel stores its tiles) within the f32 accumulation's
/// error bound `(k / 8 + 2) * 2^-24 * sum |products|` (one rounding per `mma` of 8 k).
#[test]
fn conv2d_tf32_matches_the_reference() {
    let mut rng = Rng::new(12);
    for (case, g) in CONVS.iter().enumerate() {
        let x = rng.values(g.batch * g.h * g.w * g.cin, -1.0, 1.0);
        let wt = Weight::new(&mut rng, g);
        let residual = rng.values(g.m() * g.cout, -1.0, 1.0);
        let add = with_residual(case, 0).then_some(&residual[..]);
        let plan = (1, Sums::TwoLaunches);
        let got = run_conv(
            mma::conv2d_tf32,
            SHARED_BYTES_TF32,
            g,
            &x,
            &wt,
            plan,
            (add, None),
        );
        // The residual is added in f32 as the product is written: one more rounding, within
        // 2 ulp of the result.
        let with = |want: &[f32]| add.map_or_else(|| want.to_vec(), |r| plus(want, r));
        let rounding = if add.is_some() {
            2.0 * f32::EPSILON
        } else {
            0.0
        };
        let what =
            |check: &str| format!("conv2d_tf32 {}{check} residual={}", g.name(), add.is_some());
        let (want, _) = dense_reference(g, &x, &wt, |v| v);
        let tol = tf32_tol(g.k());
        assert_close(&what(""), &got, &with(&want), tol, tol);
        let (want_tf32, largest) = dense_reference(g, &x, &wt, tf32_rna);
        let bound = ((g.k() / 8 + 2) as f64 * f32::EPSILON as f64 / 2.0 * largest) as f32;
        assert_close(
            &what(" (TF32 operands)"),
            &got,
            &with(&want_tf32),
            bound,
            rounding,
        );
    }
}

/// The patch matrix `[m, kh * kw * cin]` of `x`: `x[b, oy * stride - pad + ky, ox * stride -
/// pad + kx, ci]` at row `(b * out_h + oy) * out_w + ox`, column `(ky * kw + kx) * cin + ci`,
/// zero in the padding.
fn patches(g: &Geom, x: &[f32]) -> Vec<f32> {
    let mut cols = Vec::with_capacity(g.m() * g.k());
    for b in 0..g.batch {
        for oy in 0..g.out_h() {
            for ox in 0..g.out_w() {
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        let inside = iy >= 0 && ix >= 0 && iy < g.h as isize && ix < g.w as isize;
                        for ci in 0..g.cin {
                            cols.push(if inside {
                                x[((b * g.h + iy as usize) * g.w + ix as usize) * g.cin + ci]
                            } else {
                                0.0
                            });
                        }
                    }
                }
            }
        }
    }
    cols
}

/// im2col cases: padded 3x3 (stride 1 and 2), an uneven unpadded 2x3, a padded 1x1 stride 2
/// (border patches all padding), odd channel counts.
const IM2COLS: [Geom; 4] = [
    geom(2, 7, 9, 3, 1, (3, 3), 1, 1, false),
    geom(2, 7, 9, 19, 1, (3, 3), 2, 1, false),
    geom(3, 5, 8, 7, 1, (2, 3), 2, 0, false),
    geom(2, 6, 7, 5, 1, (1, 1), 2, 1, false),
];

/// `im2col_f32` equals the patch matrix exactly, under the host's launch (`grid_stride`: one
/// thread per element) and under a 3-block grid (the grid-stride loop); the output starts as
/// NaN, so an unwritten element fails.
#[test]
fn im2col_f32_matches_the_reference() {
    let mut rng = Rng::new(13);
    for g in &IM2COLS {
        let x = rng.values(g.batch * g.h * g.w * g.cin, -1.0, 1.0);
        let want = patches(g, &x);
        let n = g.m() * g.k();
        for l in [host_grid_stride(n), Launch::new([3, 1, 1], 256, 0)] {
            let xd = DeviceBuffer::from_slice(&x);
            let cols = DeviceBuffer::from_slice(&vec![f32::NAN; n]);
            let u = |v: usize| v as u32;
            unsafe {
                launch(l, || {
                    layout::im2col_f32(
                        xd.ptr(),
                        cols.ptr_mut(),
                        u(g.m()),
                        u(g.h),
                        u(g.w),
                        u(g.cin),
                        u(g.kh),
                        u(g.kw),
                        u(g.stride),
                        u(g.pad),
                        u(g.out_h()),
                        u(g.out_w()),
                    )
                })
            };
            let what = format!("im2col_f32 {} grid {:?}", g.name(), l.grid);
            assert_close(&what, &cols.to_vec(), &want, 0.0, 0.0);
        }
    }
}

/// `im2col_f16` equals the patch matrix rounded to f16 (nearest even) exactly, under the
/// host's launch and a 3-block grid.
#[test]
fn im2col_f16_matches_the_reference() {
    let mut rng = Rng::new(14);
    for g in &IM2COLS {
        let x = rng.values(g.batch * g.h * g.w * g.cin, -1.0, 1.0);
        let want: Vec<f32> = patches(g, &x).into_iter().map(round_f16).collect();
        let n = g.m() * g.k();
        for l in [host_grid_stride(n), Launch::new([3, 1, 1], 256, 0)] {
            let xd = DeviceBuffer::from_slice(&x);
            let cols = DeviceBuffer::from_slice(&vec![half::f16::NAN; n]);
            let u = |v: usize| v as u32;
            unsafe {
                launch(l, || {
                    layout::im2col_f16(
                        xd.ptr(),
                        cols.ptr_mut() as *mut _,
                        u(g.m()),
                        u(g.h),
                        u(g.w),
                        u(g.cin),
                        u(g.kh),
                        u(g.kw),
                        u(g.stride),
                        u(g.pad),
                        u(g.out_h()),
                        u(g.out_w()),
                    )
                })
            };
            let got: Vec<f32> = cols.to_vec().iter().map(|v| v.to_f32()).collect();
            let what = format!("im2col_f16 {} grid {:?}", g.name(), l.grid);
            assert_close(&what, &got, &want, 0.0, 0.0);
        }
    }
}

/// One request of a masked conv, as `MaskedConvSegment`: sorted active positions of the input
/// grid with their fresh rows (in that order), the template's cached map, and sorted output
/// positions of the output grid.
struct Segment {
    active: Vec<u32>,
    fresh: Vec<f32>,
    cached: Vec<f32>,
    outputs: Vec<u32>,
}

/// About `percent`% of `0..len`, sorted; `None` picks every position, `Some(0)` none.
fn pick(rng: &mut Rng, len: usize, percent: Option<usize>) -> Vec<u32> {
    match percent {
        None => (0..len as u32).collect(),
        Some(p) => {
            let mut v: Vec<u32> = (0..len as u32).filter(|_| rng.below(100) < p).collect();
            if v.is_empty() && p > 0 {
                v.push(rng.below(len) as u32);
            }
            v
        }
    }
}

/// A masked conv: its geometry (`batch` unused: one map per segment) and segments, each as
/// (percent active, percent of outputs), `None` for all.
struct MaskedCase {
    g: Geom,
    segments: Vec<(Option<usize>, Option<usize>)>,
}

/// The selftest's masked cases (7x9 maps, two segments, ~30% active, ~30% or all outputs,
/// stride 1 and 2), and a third with four segments on an 11x5 map: one all cached (no active
/// position), one all fresh, one with no output at all, and a 1x1 conv.
fn masked_cases() -> Vec<MaskedCase> {
    let two = |all_outputs: bool| {
        let outputs = if all_outputs { None } else { Some(30) };
        vec![(Some(30), outputs), (Some(30), outputs)]
    };
    let four = vec![
        (Some(0), Some(50)),
        (None, Some(40)),
        (Some(40), Some(0)),
        (Some(25), None),
    ];
    vec![
        MaskedCase {
            g: geom(1, 7, 9, 40, 77, (3, 3), 1, 1, true),
            segments: two(false),
        },
        MaskedCase {
            g: geom(1, 7, 9, 3, 5, (3, 3), 1, 1, true),
            segments: two(true),
        },
        MaskedCase {
            g: geom(1, 7, 9, 40, 77, (3, 3), 2, 1, true),
            segments: two(false),
        },
        MaskedCase {
            g: geom(1, 7, 9, 77, 40, (3, 3), 2, 1, false),
            segments: two(true),
        },
        MaskedCase {
            g: geom(1, 11, 5, 21, 70, (3, 3), 1, 1, true),
            segments: four.clone(),
        },
        MaskedCase {
            g: geom(1, 11, 5, 13, 9, (1, 1), 1, 0, false),
            segments: four,
        },
    ]
}

fn make_segments(rng: &mut Rng, case: &MaskedCase) -> Vec<Segment> {
    let g = &case.g;
    let (hw, out_hw) = (g.h * g.w, g.out_h() * g.out_w());
    case.segments
        .iter()
        .map(|&(active_pct, out_pct)| {
            let active = pick(rng, hw, active_pct);
            let outputs = pick(rng, out_hw, out_pct);
            Segment {
                fresh: rng.values(active.len() * g.cin, -1.0, 1.0),
                cached: rng.values(hw * g.cin, -1.0, 1.0),
                active,
                outputs,
            }
        })
        .collect()
}

/// The semantic reference: per segment, the full map (the cached map as the cache's type
/// holds it, `round`; the fresh rows at the active positions), convolved densely at its
/// output positions; all segments' rows stacked.
/// `operand` rounds every input and weight as the kernel's products see them.
fn masked_reference(
    g: &Geom,
    segs: &[Segment],
    wt: &Weight,
    round: fn(f32) -> f32,
    operand: fn(f32) -> f32,
) -> Vec<f32> {
    let mut out = Vec::new();
    for s in segs {
        let mut map: Vec<f32> = s.cached.iter().map(|&v| round(v)).collect();
        for (row, &p) in s.active.iter().enumerate() {
            map[p as usize * g.cin..][..g.cin].copy_from_slice(&s.fresh[row * g.cin..][..g.cin]);
        }
        for &p in &s.outputs {
            let (oy, ox) = (p as usize / g.out_w(), p as usize % g.out_w());
            let (v, _) = conv_at(g, &map, wt, (oy, ox), operand);
            out.extend(v.iter().map(|&v| v as f32));
        }
    }
    out
}

/// The masked conv kernels' signature: `(fresh, cached, row_of, rows, weight, bias, out,
/// residual, m, cout, h, w, cin, kh, kw, stride, pad, out_w, has_bias, has_residual)`, the
/// weight as `W` says.
type MaskedKernel<W> = unsafe fn(
    *const u64,
    *const u64,
    *const u32,
    *const u32,
    *const W,
    *const f32,
    *mut f32,
    *const f32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    *mut f32,
    *mut u32,
    u32,
    *const u32,
);

/// A masked conv launched as the host's `masked_conv2d`: every segment's fresh rows stacked
/// in one buffer with a table of each segment's start address, a table of the cached maps'
/// addresses (elements `C`), `row_of` of every segment concatenated (`u32::MAX` inactive),
/// `rows` as (segment, output position) pairs; grid `(ceil(cout / 64), ceil(m / 128),
/// splits)`, 256 threads, `SHARED_BYTES`; split launches write raw sums into a workspace,
/// summed with the bias and the residual by `splitk_reduce_f32`. Returns the output rows
/// (NaN where never written).
#[allow(clippy::too_many_arguments)]
fn run_masked<C: Copy, W: WeightOperand>(
    (kernel, shared, shift): (MaskedKernel<W>, usize, usize),
    g: &Geom,
    segs: &[Segment],
    cached: &[Vec<C>],
    wt: &Weight,
    (splits, sums): (usize, Sums),
    extras: (Option<&[f32]>, Option<&SampleBias>),
) -> Vec<f32> {
    let (hw, cout) = (g.h * g.w, g.cout);
    // `shift` elements before the data: maps that start past an aligned address.
    let stacked: Vec<f32> = std::iter::repeat_n(0.0, shift)
        .chain(segs.iter().flat_map(|s| s.fresh.iter().copied()))
        .collect();
    let fresh = DeviceBuffer::from_slice(&stacked);
    let mut at = shift;
    let starts: Vec<u64> = segs
        .iter()
        .map(|s| {
            let start = fresh.address() + (at * size_of::<f32>()) as u64;
            at += s.fresh.len();
            start
        })
        .collect();
    let fresh_table = DeviceBuffer::from_slice(&starts);
    let cached_d: Vec<DeviceBuffer<C>> = cached
        .iter()
        .map(|c| {
            let shifted: Vec<C> = std::iter::repeat_n(c[0], shift)
                .chain(c.iter().copied())
                .collect();
            DeviceBuffer::from_slice(&shifted)
        })
        .collect();
    let cached_table = DeviceBuffer::from_slice(
        &cached_d
            .iter()
            .map(|c| c.address() + (shift * size_of::<C>()) as u64)
            .collect::<Vec<_>>(),
    );
    let mut rows = Vec::new();
    let mut row_of = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        for &p in &s.outputs {
            rows.extend_from_slice(&[i as u32, p]);
        }
        let mut inverse = vec![u32::MAX; hw];
        for (row, &p) in s.active.iter().enumerate() {
            inverse[p as usize] = row as u32;
        }
        row_of.extend(inverse);
    }
    let m = rows.len() / 2;
    let (rows_d, row_of_d) = (
        DeviceBuffer::from_slice(&rows),
        DeviceBuffer::from_slice(&row_of),
    );
    let packed = DeviceBuffer::from_slice(&W::of(wt, g));
    let o = ConvOutput::new(g, wt, m, (splits, sums), extras);
    let (target, bias_ptr, has_bias) = (o.target(), o.bias_ptr(fresh.ptr()), o.has_bias());
    let (residual_ptr, has_residual) = (o.residual_ptr(), o.has_residual());
    let (ws, counters) = o.sums_ptrs();
    let (rows_per_sample, sample_of_row) = o.bias_rows();
    let u = |v: usize| v as u32;
    unsafe {
        launch(
            Launch::new(o.grid(), 256, shared).in_order(o.order()),
            || {
                kernel(
                    fresh_table.ptr(),
                    cached_table.ptr(),
                    row_of_d.ptr(),
                    rows_d.ptr(),
                    packed.ptr(),
                    bias_ptr,
                    target,
                    residual_ptr,
                    u(m),
                    u(cout),
                    u(g.h),
                    u(g.w),
                    u(g.cin),
                    u(g.kh),
                    u(g.kw),
                    u(g.stride),
                    u(g.pad),
                    u(g.out_w()),
                    has_bias,
                    has_residual,
                    ws,
                    counters,
                    rows_per_sample,
                    sample_of_row,
                )
            },
        )
    };
    o.finish()
}

/// A cache's element type: how it is made from f32 values, and what of them it keeps.
type Cache<C> = (fn(&[f32]) -> Vec<C>, fn(f32) -> f32);

/// Runs every masked case with the cache as `C` (`convert` makes it from f32, `round` is
/// what that keeps), as an H100 launches it and, where that splits, unsplit too, every other
/// launch adding a residual; compares with the semantic reference as `operands` says.
fn check_masked<C: Copy, W: WeightOperand>(
    name: &str,
    kernel: (MaskedKernel<W>, usize),
    seed: u64,
    (convert, round): Cache<C>,
    operands: Operands,
) {
    let mut rng = Rng::new(seed);
    let mut coverage = Coverage::default();
    for (index, case) in masked_cases().into_iter().enumerate() {
        let g = &case.g;
        let wt = Weight::new(&mut rng, g);
        let segs = make_segments(&mut rng, &case);
        let cached: Vec<Vec<C>> = segs.iter().map(|s| convert(&s.cached)).collect();
        let reference = |operand| masked_reference(g, &segs, &wt, round, operand);
        let rows: usize = segs.iter().map(|s| s.outputs.len()).sum();
        let residual = rng.values(rows * g.cout, -1.0, 1.0);
        // A bias per segment, each output row taking its segment's.
        let sample_bias = SampleBias {
            values: rng.values(segs.len() * g.cout, -1.0, 1.0),
            rows_per_sample: 0,
            sample_of_row: Some(
                (0..segs.len())
                    .flat_map(|i| std::iter::repeat_n(i as u32, segs[i].outputs.len()))
                    .collect(),
            ),
        };
        let own_bias = g.bias.then_some(&wt.bias[..]);
        let m = rows;
        for (i, (splits, sums)) in coverage.plans(g.cout, m, g.k()).into_iter().enumerate() {
            let add = with_residual(index, i).then_some(&residual[..]);
            let sb = add.is_none().then_some(&sample_bias);
            let plan = (splits, sums);
            let got = run_masked(
                (kernel.0, kernel.1, 0),
                g,
                &segs,
                &cached,
                &wt,
                plan,
                (add, sb),
            );
            let what = format!(
                "{name} {} segments={} m={m} splits={splits} {sums:?} residual={} sample bias={}",
                g.name(),
                segs.len(),
                add.is_some(),
                sb.is_some()
            );
            let finish = |want: &[f32]| with_extras(want, (add, sb), own_bias, g.cout);
            operands.check(&what, &got, g.k(), reference, finish);
            coverage.launched(splits, add.is_some(), sb.is_some());
        }
    }
    coverage.check("a bias per segment");
}

/// Masked conv kernels and their caches: the CUDA-core kernels (f32 products) and the f16
/// tensor-core ones, each with an f32, f16 and bf16 cache (the cache's values as it keeps
/// them, `round`, in the reference).
macro_rules! masked_tests {
    ($($test:ident: $kernel:path, $w:ty, $shared:expr, $operands:expr, $cache:expr, $seed:expr;)*) => {
        $(
            #[test]
            fn $test() {
                let kernel = ($kernel as MaskedKernel<$w>, $shared);
                check_masked(stringify!($kernel), kernel, $seed, $cache, $operands);
            }
        )*
    };
}

const F32_CACHE: Cache<f32> = (|v| v.to_vec(), |v| v);
const F16_CACHE: Cache<half::f16> = (to_f16, round_f16);
const BF16_CACHE: Cache<u16> = (to_bf16, round_bf16);

masked_tests! {
    masked_conv2d_cache_f32_matches_the_reference:
        gemm::masked_conv2d_cache_f32, f32, SHARED_BYTES, Operands::F32, F32_CACHE, 21;
    masked_conv2d_cache_f16_matches_the_reference:
        gemm::masked_conv2d_cache_f16, f32, SHARED_BYTES, Operands::F32, F16_CACHE, 22;
    masked_conv2d_cache_bf16_matches_the_reference:
        gemm::masked_conv2d_cache_bf16, f32, SHARED_BYTES, Operands::F32, BF16_CACHE, 23;
    masked_conv2d_mma_f16_cache_f32_matches_the_reference:
        gemm_f16::masked_conv2d_mma_f16_cache_f32, u16, SHARED_BYTES_F16, Operands::F16,
        F32_CACHE, 24;
    masked_conv2d_mma_f16_cache_f16_matches_the_reference:
        gemm_f16::masked_conv2d_mma_f16_cache_f16, u16, SHARED_BYTES_F16, Operands::F16,
        F16_CACHE, 25;
    masked_conv2d_mma_f16_cache_bf16_matches_the_reference:
        gemm_f16::masked_conv2d_mma_f16_cache_bf16, u16, SHARED_BYTES_F16, Operands::F16,
        BF16_CACHE, 26;
}

/// The f16 tensor-core masked conv where the fresh rows and the cached maps start one
/// element past an aligned address (4n channels, so its vector loads would be misaligned):
/// it must read them element by element, as the CUDA-core kernel does, and match the same
/// reference. (Debug builds check every dereference's alignment.)
#[test]
fn masked_conv2d_mma_f16_reads_misaligned_maps_by_element() {
    let mut rng = Rng::new(27);
    let case = &masked_cases()[0];
    let g = &case.g;
    assert_eq!(
        g.cin % 4,
        0,
        "the case must take the vector loads when aligned"
    );
    let wt = Weight::new(&mut rng, g);
    let segs = make_segments(&mut rng, case);
    // One element before every map: each starts past an aligned address.
    let shifted = |kernel: MaskedKernel<u16>| (kernel, SHARED_BYTES_F16, 1);
    let unsplit = (1, Sums::TwoLaunches);
    let f32_cached: Vec<Vec<f32>> = segs.iter().map(|s| s.cached.clone()).collect();
    let f16_cached: Vec<Vec<half::f16>> = segs.iter().map(|s| to_f16(&s.cached)).collect();
    for (name, got, round) in [
        (
            "f32 cache",
            run_masked(
                shifted(gemm_f16::masked_conv2d_mma_f16_cache_f32),
                g,
                &segs,
                &f32_cached,
                &wt,
                unsplit,
                (None, None),
            ),
            (|v| v) as fn(f32) -> f32,
        ),
        (
            "f16 cache",
            run_masked(
                shifted(gemm_f16::masked_conv2d_mma_f16_cache_f16),
                g,
                &segs,
                &f16_cached,
                &wt,
                unsplit,
                (None, None),
            ),
            round_f16 as fn(f32) -> f32,
        ),
    ] {
        let want = masked_reference(g, &segs, &wt, round, round_f16);
        let what = format!("masked_conv2d_mma_f16 {name}, maps shifted by one element");
        assert_close(&what, &got, &want, GEMM_TOL, GEMM_TOL);
    }
}
