//! The row, norm, layout and elementwise kernels (`device/softmax.rs`, `norm.rs`, `rows.rs`,
//! `layout.rs`, `elementwise.rs`) against plain f64 references on random inputs of awkward
//! sizes, with the host launchers' launch shapes (`cuda/ops.rs`: one block of whole warps
//! per row with 128 bytes of reduction scratch; grid-stride kernels on 256-thread blocks,
//! here at most 3 blocks so the stride loop runs) and the GPU selftest's tolerances
//! (`cuda/selftest.rs`). Every output buffer starts as NaN and has a guard tail past its
//! end, so an element left unwritten or a write past the end fails.
#![cfg(kernel_emu)]

mod common;
use common::*;
use retouch_kernels_emu::{elementwise, layout, norm, rows, softmax};

/// Bit-for-bit equality (copies, conversions), naming the first differing element.
fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(
        want.iter().any(|&w| w != 0.0),
        "{what}: the reference is all zeros"
    );
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} is {} ({:#010x}) where the reference has {} ({:#010x})",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

/// Elements past the end of every output buffer, checked unchanged afterwards.
const GUARD: usize = 37;
/// What output buffers hold before a launch: a NaN no kernel computes here.
const UNWRITTEN: u32 = 0x7fc0_1234;

/// An output of `n` f32 elements, all [`UNWRITTEN`], and a guard tail of them.
fn output(n: usize) -> DeviceBuffer<f32> {
    DeviceBuffer::from_slice(&vec![f32::from_bits(UNWRITTEN); n + GUARD])
}

/// A buffer of `values` followed by a guard tail of [`UNWRITTEN`] (an in-place output).
fn output_from(values: &[f32]) -> DeviceBuffer<f32> {
    let mut v = values.to_vec();
    v.resize(values.len() + GUARD, f32::from_bits(UNWRITTEN));
    DeviceBuffer::from_slice(&v)
}

/// The first `n` elements of an [`output`], after checking its guard tail is unchanged.
fn read(what: &str, buf: &DeviceBuffer<f32>, n: usize) -> Vec<f32> {
    let mut v = buf.to_vec();
    assert_eq!(v.len(), n + GUARD, "{what}: buffer length");
    if let Some(i) = (n..v.len()).find(|&i| v[i].to_bits() != UNWRITTEN) {
        panic!(
            "{what}: element {i}, past the {n} outputs, was written ({})",
            v[i]
        );
    }
    v.truncate(n);
    v
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The host's row-kernel launch (`per_row` in `cuda/ops.rs`): grid `(grid.0, grid.1)`, whole
/// warps enough for `cols` up to 8 of them, 128 bytes of reduction scratch.
fn per_row(grid: (u32, u32), cols: usize) -> Launch {
    let threads = cols.div_ceil(32).clamp(1, 8) as u32 * 32;
    Launch::new([grid.0, grid.1, 1], threads, 128)
}

/// The selftest's row counts and widths, with 33 rows for 333 (the widths span one partial
/// warp, several warps, and rows wider than the 256-thread block).
const ROWS: [usize; 3] = [1, 7, 33];
/// Row counts of the one-block-per-row kernels, smaller: each row is a block of up to 256
/// emulated threads meeting at every reduction step.
const ROW_BLOCKS: [usize; 2] = [1, 5];
const COLS: [usize; 5] = [3, 40, 77, 320, 1283];

/// A random permutation of `0..n`.
fn permutation(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

// ---------------------------------------------------------------------------------------
// Softmax and layer norm (one block per row).

fn softmax_reference(x: &[f32], cols: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        if m == f64::NEG_INFINITY {
            out.extend(std::iter::repeat_n(0.0, cols));
            continue;
        }
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| v / s));
    }
    out
}

fn run_softmax(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let xd = DeviceBuffer::from_slice(x);
    let out = output(rows * cols);
    let cols_u = cols as u32;
    unsafe {
        launch(per_row((rows as u32, 1), cols), || {
            softmax::softmax_rows_f32(xd.ptr(), out.ptr_mut(), cols_u)
        })
    };
    read("softmax_rows_f32", &out, rows * cols)
}

/// `softmax_rows_f32` over rows 1/5 x widths 3 to 1283 of inputs in [-6, 6], and of rows
/// scaled to [-60, 60] (the max subtraction matters), against f64 (selftest tolerance 1e-5).
#[test]
fn softmax_rows_matches_the_reference() {
    let mut rng = Rng::new(101);
    for rows in ROW_BLOCKS {
        for cols in COLS {
            let spread = if rows == 5 { 60.0 } else { 6.0 };
            let x = rng.values(rows * cols, -spread, spread);
            let got = run_softmax(&x, rows, cols);
            assert_within(
                &format!("softmax_rows_f32 {rows}x{cols} in +-{spread}"),
                &got,
                &softmax_reference(&x, cols),
                1e-5,
            );
        }
    }
}

/// `softmax_rows_f32` with masked (-inf) entries (every third from the sixth, as the
/// selftest's), and a row of only -inf, which must become zeros.
#[test]
fn softmax_rows_with_masked_entries_and_an_all_masked_row() {
    let mut rng = Rng::new(102);
    let (rows, cols) = (3, 77);
    let mut x = rng.values(rows * cols, -4.0, 4.0);
    for v in x[..cols].iter_mut().skip(5).step_by(3) {
        *v = f32::NEG_INFINITY;
    }
    x[cols..2 * cols].fill(f32::NEG_INFINITY);
    for v in x[2 * cols..].iter_mut().step_by(2) {
        *v = f32::NEG_INFINITY;
    }
    let got = run_softmax(&x, rows, cols);
    let want = softmax_reference(&x, cols);
    assert_within("softmax_rows_f32 3x77 masked", &got, &want, 1e-5);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        if w == 0.0 {
            assert!(
                g == 0.0,
                "softmax_rows_f32 masked: element {i} is {g}, not 0"
            );
        }
    }
}

/// `layer_norm_rows_f32` over rows 1/5 x widths 3 to 1283 of inputs in [-1.5, 2.5] with
/// random gamma and beta, eps 1e-5, against the two-pass f64 layer norm (selftest
/// tolerance 1e-4).
#[test]
fn layer_norm_rows_matches_the_reference() {
    let mut rng = Rng::new(103);
    let eps = 1e-5f32;
    for rows in ROW_BLOCKS {
        for cols in COLS {
            let x = rng.values(rows * cols, -1.5, 2.5);
            let gamma = rng.values(cols, -2.0, 2.0);
            let beta = rng.values(cols, -1.0, 1.0);
            let (xd, gd, bd) = (
                DeviceBuffer::from_slice(&x),
                DeviceBuffer::from_slice(&gamma),
                DeviceBuffer::from_slice(&beta),
            );
            let out = output(rows * cols);
            let cols_u = cols as u32;
            unsafe {
                launch(per_row((rows as u32, 1), cols), || {
                    norm::layer_norm_rows_f32(
                        xd.ptr(),
                        gd.ptr(),
                        bd.ptr(),
                        out.ptr_mut(),
                        cols_u,
                        eps,
                    )
                })
            };
            let what = format!("layer_norm_rows_f32 {rows}x{cols}");
            let got = read(&what, &out, rows * cols);
            let mut want = Vec::with_capacity(rows * cols);
            for row in x.chunks(cols) {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
                let rstd = 1.0 / (var + eps as f64).sqrt();
                for (c, &v) in row.iter().enumerate() {
                    want.push((v as f64 - mean) * rstd * gamma[c] as f64 + beta[c] as f64);
                }
            }
            assert_within(&what, &got, &want, 1e-4);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Group norm.

/// (mean, rstd) per (sample, group) of `x = [batch, hw, c]`, two-pass in f64: `[batch,
/// groups, 2]` flattened, as the kernel writes them.
fn group_stats_reference(
    x: &[f32],
    batch: usize,
    hw: usize,
    c: usize,
    groups: usize,
    eps: f32,
) -> Vec<f64> {
    let cpg = c / groups;
    let count = (hw * cpg) as f64;
    let mut stats = Vec::with_capacity(batch * groups * 2);
    for b in 0..batch {
        let sample = &x[b * hw * c..(b + 1) * hw * c];
        for g in 0..groups {
            let values = || {
                sample
                    .chunks(c)
                    .flat_map(move |row| row[g * cpg..(g + 1) * cpg].iter().map(|&v| v as f64))
            };
            let mean = values().sum::<f64>() / count;
            let var = values().map(|v| (v - mean).powi(2)).sum::<f64>() / count;
            stats.extend([mean, 1.0 / (var + eps as f64).sqrt()]);
        }
    }
    stats
}

/// `(x - mean) * rstd * gamma + beta` (then SiLU) with `stats` as `[batch, groups, 2]`.
#[allow(clippy::too_many_arguments)]
fn group_apply_reference(
    x: &[f32],
    stats: &[f64],
    gamma: &[f32],
    beta: &[f32],
    hw: usize,
    c: usize,
    groups: usize,
    with_silu: bool,
) -> Vec<f64> {
    let cpg = c / groups;
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let (b, ch) = (i / (hw * c), i % c);
            let at = 2 * (b * groups + ch / cpg);
            let y = (v as f64 - stats[at]) * stats[at + 1] * gamma[ch] as f64 + beta[ch] as f64;
            if with_silu { silu(y) } else { y }
        })
        .collect()
}

/// The host's `group_norm_stats` launch: grid `(groups, batch)`, `per_row` over a group's
/// `hw * c / groups` values.
fn run_group_stats(
    x: &DeviceBuffer<f32>,
    batch: usize,
    hw: usize,
    c: usize,
    groups: usize,
    eps: f32,
) -> Vec<f32> {
    let n = batch * groups * 2;
    let stats = output(n);
    let (hw_u, c_u, g_u) = (hw as u32, c as u32, groups as u32);
    let cfg = per_row((g_u, batch as u32), hw * (c / groups));
    unsafe {
        launch(cfg, || {
            norm::group_norm_stats_f32(x.ptr(), stats.ptr_mut(), hw_u, c_u, g_u, eps)
        })
    };
    read("group_norm_stats_f32", &stats, n)
}

/// The host's `group_norm_with_stats` launch (grid-stride over `batch * hw * c`).
#[allow(clippy::too_many_arguments)]
fn run_group_apply(
    x: &DeviceBuffer<f32>,
    stats: &[f32],
    gamma: &[f32],
    beta: &[f32],
    batch: usize,
    hw: usize,
    c: usize,
    groups: usize,
    with_silu: bool,
    sample_of_row: Option<&[u32]>,
) -> Vec<f32> {
    // By row, `x` is `[rows, c]` and `hw` is not read.
    let n = sample_of_row.map_or(batch * hw, <[u32]>::len) * c;
    let rows = sample_of_row.map(DeviceBuffer::from_slice);
    let rows_ptr = rows.as_ref().map_or(std::ptr::null(), |r| r.ptr());
    let (sd, gd, bd) = (
        DeviceBuffer::from_slice(stats),
        DeviceBuffer::from_slice(gamma),
        DeviceBuffer::from_slice(beta),
    );
    let out = output(n);
    let kernel = if with_silu {
        norm::group_norm_silu_apply_f32
    } else {
        norm::group_norm_apply_f32
    };
    let (n_u, hw_u, c_u, g_u) = (n as u32, hw as u32, c as u32, groups as u32);
    unsafe {
        launch(grid_stride(n, 3), || {
            kernel(
                x.ptr(),
                sd.ptr(),
                gd.ptr(),
                bd.ptr(),
                out.ptr_mut(),
                n_u,
                hw_u,
                c_u,
                g_u,
                rows_ptr,
            )
        })
    };
    read("group_norm_apply", &out, n)
}

/// (batch, hw), (channels, groups) as the selftest's, smaller: one position, one group, odd
/// group sizes (77 / 7), SD's 32 groups, and groups of more values than a block has
/// threads (the strided group sums).
const GROUP_CASES: [((usize, usize), (usize, usize)); 7] = [
    ((1, 1), (3, 1)),
    ((1, 1), (40, 8)),
    ((2, 7), (3, 1)),
    ((2, 7), (77, 7)),
    ((2, 3), (320, 32)),
    ((1, 333), (40, 8)),
    ((1, 45), (77, 7)),
];

/// `group_norm_stats_f32` (mean, rstd) per (sample, group) against two-pass f64 statistics,
/// then `group_norm_apply_f32` and `group_norm_silu_apply_f32` with those statistics
/// against the f64 group norm (+ SiLU), on `[batch, hw, c]` inputs in [-1.5, 2.5]
/// (selftest tolerance 1e-4, eps 1e-5).
#[test]
fn group_norm_matches_the_reference() {
    let mut rng = Rng::new(104);
    let eps = 1e-5f32;
    for ((batch, hw), (c, groups)) in GROUP_CASES {
        let size = format!("{batch}x{hw}x{c} g{groups}");
        let x = rng.values(batch * hw * c, -1.5, 2.5);
        let gamma = rng.values(c, -2.0, 2.0);
        let beta = rng.values(c, -1.0, 1.0);
        let xd = DeviceBuffer::from_slice(&x);
        let stats = run_group_stats(&xd, batch, hw, c, groups, eps);
        let want_stats = group_stats_reference(&x, batch, hw, c, groups, eps);
        assert_within(
            &format!("group_norm_stats_f32 {size}"),
            &stats,
            &want_stats,
            1e-4,
        );
        for with_silu in [false, true] {
            let got = run_group_apply(
                &xd, &stats, &gamma, &beta, batch, hw, c, groups, with_silu, None,
            );
            let want =
                group_apply_reference(&x, &want_stats, &gamma, &beta, hw, c, groups, with_silu);
            let op = if with_silu {
                "group_norm_silu"
            } else {
                "group_norm"
            };
            assert_within(&format!("{op} {size}"), &got, &want, 1e-4);
        }
    }
}

/// `group_norm_apply_f32` / `group_norm_silu_apply_f32` with given statistics (a template's,
/// as in masked execution: not the input's own), against the f64 apply with the same
/// statistics (selftest tolerance 1e-4).
#[test]
fn group_norm_apply_with_given_stats_matches_the_reference() {
    let mut rng = Rng::new(105);
    for ((batch, hw), (c, groups)) in [((3, 5), (77, 7)), ((2, 13), (40, 8)), ((1, 9), (320, 32))] {
        let x = rng.values(batch * hw * c, -3.0, 3.0);
        let gamma = rng.values(c, -2.0, 2.0);
        let beta = rng.values(c, -1.0, 1.0);
        let stats: Vec<f32> = (0..batch * groups)
            .flat_map(|_| [rng.uniform(-1.0, 1.0), rng.uniform(0.25, 3.0)])
            .collect();
        let xd = DeviceBuffer::from_slice(&x);
        for with_silu in [false, true] {
            let got = run_group_apply(
                &xd, &stats, &gamma, &beta, batch, hw, c, groups, with_silu, None,
            );
            let want =
                group_apply_reference(&x, &f64s(&stats), &gamma, &beta, hw, c, groups, with_silu);
            let op = if with_silu {
                "group_norm_silu_apply_f32"
            } else {
                "group_norm_apply_f32"
            };
            assert_within(
                &format!("{op} {batch}x{hw}x{c} g{groups}"),
                &got,
                &want,
                1e-4,
            );
        }
    }
}

/// A ragged batch's sample of each row: `rows` rows over `samples` samples, in runs of
/// uneven length, one sample skipped and one coming back, as no dense layout would have it.
fn samples_of_rows(rng: &mut Rng, rows: usize, samples: usize) -> Vec<u32> {
    (0..rows)
        .map(|r| {
            let s = (r * samples / rows + rng.below(2)) % samples;
            if s == 1 { 0 } else { s as u32 }
        })
        .collect()
}

/// The group norm apply kernels reading each row's statistics through `sample_of_row` (the
/// masked step's ragged rows, each with its segment's statistics) against the f64 apply of
/// the statistics gathered per row (selftest tolerance 1e-4). `hw` is passed as 0: the row
/// mode must not read it.
#[test]
fn group_norm_apply_by_row_matches_the_reference() {
    let mut rng = Rng::new(106);
    for (rows, samples, (c, groups)) in [(37, 3, (77, 7)), (130, 4, (320, 32)), (5, 2, (40, 8))] {
        let x = rng.values(rows * c, -3.0, 3.0);
        let gamma = rng.values(c, -2.0, 2.0);
        let beta = rng.values(c, -1.0, 1.0);
        let stats: Vec<f32> = (0..samples * groups)
            .flat_map(|_| [rng.uniform(-1.0, 1.0), rng.uniform(0.25, 3.0)])
            .collect();
        let sample_of_row = samples_of_rows(&mut rng, rows, samples);
        let per_row: Vec<f32> = sample_of_row
            .iter()
            .flat_map(|&s| {
                stats[s as usize * 2 * groups..][..2 * groups]
                    .iter()
                    .copied()
            })
            .collect();
        let xd = DeviceBuffer::from_slice(&x);
        for with_silu in [false, true] {
            let got = run_group_apply(
                &xd,
                &stats,
                &gamma,
                &beta,
                rows,
                0,
                c,
                groups,
                with_silu,
                Some(&sample_of_row),
            );
            let want =
                group_apply_reference(&x, &f64s(&per_row), &gamma, &beta, 1, c, groups, with_silu);
            assert_within(
                &format!("group_norm apply by row {rows}x{c} g{groups} silu={with_silu}"),
                &got,
                &want,
                1e-4,
            );
        }
    }
}

/// One segment of a blended-statistics batch: its template map `[hw, c]`, the template's
/// statistics (f32, as the host passes them), its per-position moments (f16), its active
/// positions and their fresh rows `[active, c]`.
struct Blended {
    template: Vec<f32>,
    stats: Vec<f32>,
    moments: Vec<half::f16>,
    /// The moments before their rounding to f16.
    moments_exact: Vec<f64>,
    active: Vec<u32>,
    fresh: Vec<f32>,
}

impl Blended {
    fn new(
        rng: &mut Rng,
        hw: usize,
        c: usize,
        groups: usize,
        active: Vec<u32>,
        offset: f32,
        eps: f32,
    ) -> Blended {
        let cpg = c / groups;
        let template: Vec<f32> = rng
            .values(hw * c, -2.6, 2.6)
            .iter()
            .map(|v| v + offset)
            .collect();
        let stats: Vec<f32> = group_stats_reference(&template, 1, hw, c, groups, eps)
            .iter()
            .map(|&s| s as f32)
            .collect();
        // sum z and sum z^2 per (position, group), z = (x - mean) * rstd: the template's
        // recording (`group_position_moments`), kept in f16.
        let mut moments_exact = Vec::with_capacity(hw * groups * 2);
        for row in template.chunks(c) {
            for g in 0..groups {
                let (mean, rstd) = (stats[2 * g] as f64, stats[2 * g + 1] as f64);
                let z = row[g * cpg..(g + 1) * cpg]
                    .iter()
                    .map(|&v| (v as f64 - mean) * rstd);
                let (s, sq) = z.fold((0.0, 0.0), |(s, sq), z| (s + z, sq + z * z));
                moments_exact.extend([s, sq]);
            }
        }
        let moments = moments_exact
            .iter()
            .map(|&m| half::f16::from_f64(m))
            .collect();
        let fresh = rng.values(active.len() * c, -2.4, 1.6);
        Blended {
            template,
            stats,
            moments,
            moments_exact,
            active,
            fresh,
        }
    }

    /// The statistics of the map itself (template values, fresh rows at the active
    /// positions), two-pass in f64.
    fn map_reference(&self, hw: usize, c: usize, groups: usize, eps: f32) -> Vec<f64> {
        let mut map = self.template.clone();
        for (row, &p) in self.fresh.chunks(c).zip(&self.active) {
            map[p as usize * c..(p as usize + 1) * c].copy_from_slice(row);
        }
        group_stats_reference(&map, 1, hw, c, groups, eps)
    }

    /// The statistics the CPU's `blended_group_stats` derives from the template's statistics,
    /// its moments and the fresh rows, in f64: from the f16 moments the kernel reads, or
    /// (`exact`) from the moments before their rounding to f16.
    fn moments_reference(
        &self,
        hw: usize,
        c: usize,
        groups: usize,
        eps: f32,
        exact: bool,
    ) -> Vec<f64> {
        let cpg = c / groups;
        let count = (hw * cpg) as f64;
        let eps = eps as f64;
        let mut out = Vec::with_capacity(groups * 2);
        for g in 0..groups {
            let (mean_t, rstd_t) = (self.stats[2 * g] as f64, self.stats[2 * g + 1] as f64);
            let (mut sum, mut squares) = (0.0f64, 0.0f64);
            for (row, &p) in self.fresh.chunks(c).zip(&self.active) {
                for &v in &row[g * cpg..(g + 1) * cpg] {
                    let z = (v as f64 - mean_t) * rstd_t;
                    sum += z;
                    squares += z * z;
                }
                let m = (p as usize * groups + g) * 2;
                let moment = |k: usize| {
                    if exact {
                        self.moments_exact[k]
                    } else {
                        self.moments[k].to_f64()
                    }
                };
                sum -= moment(m);
                squares -= moment(m + 1);
            }
            let rstd2 = rstd_t * rstd_t;
            let template_squares = (count * (1.0 - eps * rstd2)).max(0.0);
            let mean_z = sum / count;
            let var_z = ((template_squares + squares) / count - mean_z * mean_z).max(0.0);
            out.extend([mean_t + mean_z / rstd_t, 1.0 / (var_z / rstd2 + eps).sqrt()]);
        }
        out
    }
}

/// `n` distinct positions of `0..hw` in random order.
fn positions(rng: &mut Rng, hw: usize, n: usize) -> Vec<u32> {
    let mut p = permutation(rng, hw);
    p.truncate(n);
    p
}

/// `group_norm_blended_stats_f16` over four segments (5%, 30% and all of the positions
/// active, and none), each with its own template, launched as the host's
/// `group_norm_blended_stats`: (mean, rstd) per (segment, group) against the f64
/// statistics the CPU's `blended_group_stats` derives from the same inputs (the f16
/// moments; selftest tolerance 1e-4, eps 1e-5). That derivation, from the moments before
/// their rounding to f16, is first checked against the f64 statistics of each blended map
/// itself (to 1e-6: the template's statistics are f32), so the reference is the blended
/// map's statistics up to the f16 moments the kernel is given.
#[test]
fn group_norm_blended_stats_matches_the_reference() {
    let mut rng = Rng::new(106);
    let eps = 1e-5f32;
    for (hw, c, groups) in [(23usize, 40, 8), (11, 77, 7), (9, 64, 32)] {
        let counts = [hw.div_ceil(20), hw * 3 / 10, hw, 0];
        let segments: Vec<Blended> = counts
            .iter()
            .enumerate()
            .map(|(s, &n)| {
                let active = positions(&mut rng, hw, n);
                Blended::new(&mut rng, hw, c, groups, active, 0.7 + s as f32, eps)
            })
            .collect();
        let mut offsets = vec![0u32];
        let (mut x, mut pos, mut template) = (Vec::new(), Vec::new(), Vec::new());
        for s in &segments {
            x.extend_from_slice(&s.fresh);
            pos.extend_from_slice(&s.active);
            offsets.push(pos.len() as u32);
            template.extend_from_slice(&s.stats);
        }
        let moment_bufs: Vec<DeviceBuffer<half::f16>> = segments
            .iter()
            .map(|s| DeviceBuffer::from_slice(&s.moments))
            .collect();
        let table: Vec<u64> = moment_bufs.iter().map(|b| b.address()).collect();
        let (xd, od, pd, td, md) = (
            DeviceBuffer::from_slice(&x),
            DeviceBuffer::from_slice(&offsets),
            DeviceBuffer::from_slice(&pos),
            DeviceBuffer::from_slice(&template),
            DeviceBuffer::from_slice(&table),
        );
        let n = segments.len() * groups * 2;
        let stats = output(n);
        let widest = segments.iter().map(|s| s.active.len()).max().unwrap_or(0);
        let cfg = per_row(
            (groups as u32, segments.len() as u32),
            widest * (c / groups),
        );
        let (c_u, g_u, hw_u) = (c as u32, groups as u32, hw as u32);
        unsafe {
            launch(cfg, || {
                norm::group_norm_blended_stats_f16(
                    xd.ptr(),
                    od.ptr(),
                    pd.ptr(),
                    td.ptr(),
                    md.ptr(),
                    stats.ptr_mut(),
                    c_u,
                    g_u,
                    hw_u,
                    eps,
                )
            })
        };
        let size = format!("segments {counts:?} of {hw}x{c} g{groups}");
        let got = read(&format!("group_norm_blended_stats_f16 {size}"), &stats, n);
        let maps: Vec<f64> = segments
            .iter()
            .flat_map(|s| s.map_reference(hw, c, groups, eps))
            .collect();
        let exact: Vec<f64> = segments
            .iter()
            .flat_map(|s| s.moments_reference(hw, c, groups, eps, true))
            .collect();
        let exact_f32: Vec<f32> = exact.iter().map(|&v| v as f32).collect();
        assert_within(
            &format!("the blended-statistics reference {size} vs the blended maps"),
            &exact_f32,
            &maps,
            1e-6,
        );
        let derived: Vec<f64> = segments
            .iter()
            .flat_map(|s| s.moments_reference(hw, c, groups, eps, false))
            .collect();
        assert_within(
            &format!("group_norm_blended_stats_f16 {size} vs the CPU's derivation"),
            &got,
            &derived,
            1e-4,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Rows and layout (copies: bit-exact).

/// `gather_rows_f32`: rows of `src` picked in random order, some twice, into `[count,
/// cols]`; `scatter_rows_f32`: fresh rows written to a random set of distinct rows of `dst`
/// in random order, the others untouched. Bit-exact (selftest tolerance 0).
#[test]
fn gather_and_scatter_rows_match_the_reference() {
    let mut rng = Rng::new(107);
    for n_rows in [1, 7, 40] {
        for cols in [3, 77, 320] {
            let src = rng.values(n_rows * cols, -1.0, 1.0);
            let size = format!("{n_rows}x{cols}");
            // Gather: more indices than rows, repeats included.
            let count = n_rows + n_rows / 2 + 1;
            let index: Vec<u32> = (0..count).map(|_| rng.below(n_rows) as u32).collect();
            let (sd, id) = (
                DeviceBuffer::from_slice(&src),
                DeviceBuffer::from_slice(&index),
            );
            let out = output(count * cols);
            let (count_u, cols_u) = (count as u32, cols as u32);
            unsafe {
                launch(grid_stride(count * cols, 3), || {
                    rows::gather_rows_f32(sd.ptr(), id.ptr(), out.ptr_mut(), count_u, cols_u)
                })
            };
            let what = format!("gather_rows_f32 {size} n{count}");
            let got = read(&what, &out, count * cols);
            let want: Vec<f32> = index
                .iter()
                .flat_map(|&r| {
                    src[r as usize * cols..(r as usize + 1) * cols]
                        .iter()
                        .copied()
                })
                .collect();
            assert_bits(&what, &got, &want);

            // Scatter: a distinct subset of the rows (every row for a single one).
            let count = n_rows.div_ceil(2);
            let mut index = permutation(&mut rng, n_rows);
            index.truncate(count);
            let fresh = rng.values(count * cols, 2.0, 3.0);
            let (id, fd) = (
                DeviceBuffer::from_slice(&index),
                DeviceBuffer::from_slice(&fresh),
            );
            let dst = output_from(&src);
            let count_u = count as u32;
            unsafe {
                launch(grid_stride(count * cols, 3), || {
                    rows::scatter_rows_f32(dst.ptr_mut(), id.ptr(), fd.ptr(), count_u, cols_u)
                })
            };
            let what = format!("scatter_rows_f32 {size} n{count}");
            let got = read(&what, &dst, n_rows * cols);
            let mut want = src.clone();
            for (k, &r) in index.iter().enumerate() {
                want[r as usize * cols..(r as usize + 1) * cols]
                    .copy_from_slice(&fresh[k * cols..(k + 1) * cols]);
            }
            assert_bits(&what, &got, &want);
        }
    }
}

/// `copy_cols_f32`: concatenations along the last dimension as the host's `concat_last`
/// (one launch per part at its column offset), of 2 and 3 parts of widths 3 to 320 over 63,
/// 30 and 33 rows; every output element written, bit-exact (selftest tolerance 0).
#[test]
fn copy_cols_concatenates_as_the_reference() {
    let mut rng = Rng::new(108);
    let widths: [&[usize]; 4] = [&[3, 77], &[320, 40], &[77, 3, 320], &[40, 320, 3]];
    for rows in [63, 30, 33] {
        for parts in widths {
            let total: usize = parts.iter().sum();
            let values: Vec<Vec<f32>> = parts
                .iter()
                .map(|&w| rng.values(rows * w, -1.0, 1.0))
                .collect();
            let out = output(rows * total);
            let mut offset = 0usize;
            for (p, &w) in values.iter().zip(parts) {
                let src = DeviceBuffer::from_slice(p);
                let (rows_u, w_u, total_u, off_u) =
                    (rows as u32, w as u32, total as u32, offset as u32);
                unsafe {
                    launch(grid_stride(rows * w, 3), || {
                        layout::copy_cols_f32(src.ptr(), out.ptr_mut(), rows_u, w_u, total_u, off_u)
                    })
                };
                offset += w;
            }
            let what = format!("copy_cols_f32 {rows}x{parts:?}");
            let got = read(&what, &out, rows * total);
            let mut want = Vec::with_capacity(rows * total);
            for r in 0..rows {
                for (p, &w) in values.iter().zip(parts) {
                    want.extend_from_slice(&p[r * w..(r + 1) * w]);
                }
            }
            assert_bits(&what, &got, &want);
        }
    }
}

/// `upsample_nearest2x_f32` on `[batch, h, w, c]` maps (odd sizes, one pixel, 320
/// channels): `dst[b, y, x] = src[b, y / 2, x / 2]`, bit-exact (selftest tolerance 0).
#[test]
fn upsample_nearest2x_matches_the_reference() {
    let mut rng = Rng::new(109);
    for [batch, h, w, c] in [[2, 7, 9, 3], [1, 4, 4, 320], [2, 3, 5, 77], [1, 1, 1, 40]] {
        let src = rng.values(batch * h * w * c, -1.0, 1.0);
        let n = 4 * src.len();
        let sd = DeviceBuffer::from_slice(&src);
        let out = output(n);
        let (b_u, h_u, w_u, c_u) = (batch as u32, h as u32, w as u32, c as u32);
        unsafe {
            launch(grid_stride(n, 3), || {
                layout::upsample_nearest2x_f32(sd.ptr(), out.ptr_mut(), b_u, h_u, w_u, c_u)
            })
        };
        let what = format!("upsample_nearest2x_f32 {batch}x{h}x{w}x{c}");
        let got = read(&what, &out, n);
        let mut want = Vec::with_capacity(n);
        for b in 0..batch {
            for y in 0..2 * h {
                for x in 0..2 * w {
                    let at = ((b * h + y / 2) * w + x / 2) * c;
                    want.extend_from_slice(&src[at..at + c]);
                }
            }
        }
        assert_bits(&what, &got, &want);
    }
}

/// `add_per_sample_f32` on `x` and `v`: per sample of `per_sample` values, or with a
/// row-to-sample table per row of `c` values.
fn run_add_per_sample(
    x: &[f32],
    v: &[f32],
    (per_sample, c): (usize, usize),
    sample_of_row: Option<&[u32]>,
    what: &str,
) -> Vec<f32> {
    let n = x.len();
    let (xd, vd) = (DeviceBuffer::from_slice(x), DeviceBuffer::from_slice(v));
    let rows = sample_of_row.map(DeviceBuffer::from_slice);
    let rows_ptr = rows.as_ref().map_or(std::ptr::null(), |r| r.ptr());
    let out = output(n);
    let (n_u, ps_u, c_u) = (n as u32, per_sample as u32, c as u32);
    unsafe {
        launch(grid_stride(n, 3), || {
            layout::add_per_sample_f32(xd.ptr(), vd.ptr(), out.ptr_mut(), n_u, ps_u, c_u, rows_ptr)
        })
    };
    read(what, &out, n)
}

/// `add_per_sample_f32`: `x = [samples, ..., c]` plus `v[sample]` broadcast over each
/// sample's positions, on the selftest's shapes (selftest tolerance 1e-6).
#[test]
fn add_per_sample_matches_the_reference() {
    let mut rng = Rng::new(110);
    let shapes: [&[usize]; 5] = [
        &[2, 7, 9, 77],
        &[3, 33, 320],
        &[1, 4, 4, 40],
        &[2, 5, 3],
        &[7, 1283],
    ];
    for shape in shapes {
        let (samples, c) = (shape[0], shape[shape.len() - 1]);
        let n: usize = shape.iter().product();
        let per_sample = n / samples;
        let x = rng.values(n, -1.0, 1.0);
        let v = rng.values(samples * c, -1.0, 1.0);
        let what = format!("add_per_sample_f32 {shape:?}");
        let got = run_add_per_sample(&x, &v, (per_sample, c), None, &what);
        let want: Vec<f64> = (0..n)
            .map(|i| x[i] as f64 + v[(i / per_sample) * c + i % c] as f64)
            .collect();
        assert_within(&what, &got, &want, 1e-6);
    }
}

/// `add_per_sample_f32` with `sample_of_row`: row `r` of `x = [rows, c]` plus
/// `v[sample_of_row[r]]` (the masked step's time embedding per segment). `per_sample` is
/// passed as 0: the row mode must not read it.
#[test]
fn add_per_sample_by_row_matches_the_reference() {
    let mut rng = Rng::new(111);
    for (rows, samples, c) in [(37, 3, 77), (130, 4, 320), (5, 2, 3)] {
        let n = rows * c;
        let x = rng.values(n, -1.0, 1.0);
        let v = rng.values(samples * c, -1.0, 1.0);
        let sample_of_row = samples_of_rows(&mut rng, rows, samples);
        let what = format!("add_per_sample_f32 by row {rows}x{c}");
        let got = run_add_per_sample(&x, &v, (0, c), Some(&sample_of_row), &what);
        let want: Vec<f64> = (0..n)
            .map(|i| x[i] as f64 + v[sample_of_row[i / c] as usize * c + i % c] as f64)
            .collect();
        assert_within(&what, &got, &want, 1e-6);
    }
}

// ---------------------------------------------------------------------------------------
// Elementwise.

/// erf in f64: its Maclaurin series below 2.5, the continued fraction of erfc above.
fn erf(x: f64) -> f64 {
    let a = x.abs();
    let y = if a < 2.5 {
        let z = a * a;
        let (mut term, mut sum) = (a, a);
        for n in 1..200 {
            term *= -z / n as f64;
            let t = term / (2 * n + 1) as f64;
            sum += t;
            if t.abs() < 1e-18 * sum.abs() {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc(a) = e^(-a^2) / sqrt(pi) / (a + (1/2) / (a + 1 / (a + (3/2) / (a + ...)))).
        let mut f = a;
        for k in (1..=80).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    if x < 0.0 { -y } else { y }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn silu(x: f64) -> f64 {
    x * sigmoid(x)
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

fn gelu_tanh(x: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
}

fn quick_gelu(x: f64) -> f64 {
    x * sigmoid(1.702 * x)
}

/// The f64 erf of the references, against tabulated values (so the GELU check rests on a
/// reference that is itself right).
#[test]
fn reference_erf_matches_tabulated_values() {
    for (x, want) in [
        (0.1, 0.112_462_916_018_284_9),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (-1.7, -0.983_790_458_590_774_6),
        (2.4, 0.999_311_486_103_354_9),
        (2.5, 0.999_593_047_982_555),
        (3.0, 0.999_977_909_503_001_4),
        (-4.0, -0.999_999_984_582_742_1),
    ] {
        assert!(
            (erf(x) - want).abs() < 1e-14,
            "erf({x}) = {}, want {want}",
            erf(x)
        );
    }
}

/// The shapes of the elementwise checks: `ROWS x COLS`.
fn shapes() -> impl Iterator<Item = (usize, usize)> {
    ROWS.into_iter()
        .flat_map(|r| COLS.into_iter().map(move |c| (r, c)))
}

type Binary = unsafe fn(*const f32, *const f32, *mut f32, u32, u32);
/// A binary kernel's name, the kernel, and its f64 reference.
type BinaryCase = (&'static str, Binary, fn(f64, f64) -> f64);

/// `binary_{add,sub,mul,div}_f32` on equal shapes and with `b` one trailing row repeated
/// over `a`'s rows (`b_len = cols`), divisors in +-[0.5, 2] (selftest tolerance 1e-6).
#[test]
fn binary_ops_match_the_reference() {
    let mut rng = Rng::new(111);
    let ops: [BinaryCase; 4] = [
        ("binary_add_f32", elementwise::binary_add_f32, |a, b| a + b),
        ("binary_sub_f32", elementwise::binary_sub_f32, |a, b| a - b),
        ("binary_mul_f32", elementwise::binary_mul_f32, |a, b| a * b),
        ("binary_div_f32", elementwise::binary_div_f32, |a, b| a / b),
    ];
    let away_from_zero = |rng: &mut Rng, n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let m = rng.uniform(0.5, 2.0);
                if rng.next_u64() & 1 == 0 { m } else { -m }
            })
            .collect()
    };
    for (rows, cols) in shapes() {
        let n = rows * cols;
        let a = rng.values(n, -3.0, 3.0);
        let b = away_from_zero(&mut rng, n);
        let row = away_from_zero(&mut rng, cols);
        let ad = DeviceBuffer::from_slice(&a);
        for (name, kernel, f) in ops {
            for (b, label) in [(&b, ""), (&row, " + row")] {
                let bd = DeviceBuffer::from_slice(b);
                let out = output(n);
                let (n_u, b_len) = (n as u32, b.len() as u32);
                unsafe {
                    launch(grid_stride(n, 3), || {
                        kernel(ad.ptr(), bd.ptr(), out.ptr_mut(), n_u, b_len)
                    })
                };
                let what = format!("{name} {rows}x{cols}{label}");
                let got = read(&what, &out, n);
                let want: Vec<f64> = (0..n)
                    .map(|i| f(a[i] as f64, b[i % b.len()] as f64))
                    .collect();
                assert_within(&what, &got, &want, 1e-6);
            }
        }
    }
}

type Unary = unsafe fn(*const f32, *mut f32, u32);
/// An activation kernel's name, the kernel, its f64 reference and the selftest tolerance.
type UnaryCase = (&'static str, Unary, fn(f64) -> f64, f64);

/// `relu_f32` (exact), `silu_f32`, `gelu_erf_f32`, `gelu_tanh_f32` and `quick_gelu_f32`
/// against the standard formulas in f64 (erf from [`erf`], tanh from std), on inputs in
/// [-9, 9] (selftest tolerance 1e-5 for all but relu).
#[test]
fn activations_match_the_reference() {
    let mut rng = Rng::new(112);
    let ops: [UnaryCase; 5] = [
        ("relu_f32", elementwise::relu_f32, |x| x.max(0.0), 0.0),
        ("silu_f32", elementwise::silu_f32, silu, 1e-5),
        ("gelu_erf_f32", elementwise::gelu_erf_f32, gelu, 1e-5),
        ("gelu_tanh_f32", elementwise::gelu_tanh_f32, gelu_tanh, 1e-5),
        (
            "quick_gelu_f32",
            elementwise::quick_gelu_f32,
            quick_gelu,
            1e-5,
        ),
    ];
    for (rows, cols) in shapes() {
        let n = rows * cols;
        let x = rng.values(n, -9.0, 9.0);
        let xd = DeviceBuffer::from_slice(&x);
        for (name, kernel, f, tol) in ops {
            let out = output(n);
            let n_u = n as u32;
            unsafe { launch(grid_stride(n, 3), || kernel(xd.ptr(), out.ptr_mut(), n_u)) };
            let what = format!("{name} {rows}x{cols}");
            let got = read(&what, &out, n);
            let want: Vec<f64> = x.iter().map(|&v| f(v as f64)).collect();
            assert_within(&what, &got, &want, tol);
        }
    }
}

/// `affine_f32` (`x * 1.5 - 0.25`, selftest tolerance 1e-6) and `geglu_f32` (`hidden *
/// gelu(gate)` over rows of `2 * half`, half 1, 20, 39 and 160; selftest tolerance 1e-5).
#[test]
fn affine_and_geglu_match_the_reference() {
    let mut rng = Rng::new(113);
    for (rows, cols) in shapes() {
        let n = rows * cols;
        let x = rng.values(n, -3.0, 3.0);
        let xd = DeviceBuffer::from_slice(&x);
        let out = output(n);
        let n_u = n as u32;
        unsafe {
            launch(grid_stride(n, 3), || {
                elementwise::affine_f32(xd.ptr(), out.ptr_mut(), n_u, 1.5, -0.25)
            })
        };
        let what = format!("affine_f32 {rows}x{cols}");
        let got = read(&what, &out, n);
        let want: Vec<f64> = x.iter().map(|&v| v as f64 * 1.5 - 0.25).collect();
        assert_within(&what, &got, &want, 1e-6);
    }
    for rows in ROWS {
        for half in [1, 20, 39, 160] {
            let n = rows * half;
            let x = rng.values(2 * n, -5.0, 5.0);
            let xd = DeviceBuffer::from_slice(&x);
            let out = output(n);
            let (n_u, half_u) = (n as u32, half as u32);
            unsafe {
                launch(grid_stride(n, 3), || {
                    elementwise::geglu_f32(xd.ptr(), out.ptr_mut(), n_u, half_u)
                })
            };
            let what = format!("geglu_f32 {rows}x{}", 2 * half);
            let got = read(&what, &out, n);
            let want: Vec<f64> = (0..n)
                .map(|i| {
                    let (r, j) = (i / half, i % half);
                    x[r * 2 * half + j] as f64 * gelu(x[r * 2 * half + half + j] as f64)
                })
                .collect();
            assert_within(&what, &got, &want, 1e-5);
        }
    }
}

/// `convert_f32_to_f16`: values over f16's whole range (subnormals, halfway cases, past the
/// largest finite f16) rounded to nearest even as `half::f16::from_f32`, bit-exact
/// (selftest tolerance 0).
#[test]
fn convert_f32_to_f16_rounds_to_nearest_even() {
    let mut rng = Rng::new(114);
    let n = 1283;
    let mut x: Vec<f32> = (0..n)
        .map(|_| {
            let e = rng.below(45) as i32 - 27;
            rng.uniform(-1.0, 1.0) * 2f32.powi(e)
        })
        .collect();
    // Halfway between neighbours (ties to even both ways), the largest finite f16, the
    // first value that rounds to infinity, the smallest subnormal and half of it.
    x[..10].copy_from_slice(&[
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        -(2048.0 + 1.0),
        2048.0 + 3.0,
        65504.0,
        65520.0,
        -65520.0,
        2f32.powi(-24),
        2f32.powi(-25),
        3.0 * 2f32.powi(-25),
    ]);
    let xd = DeviceBuffer::from_slice(&x);
    let sentinel = half::f16::from_bits(0x7e77);
    let out = DeviceBuffer::from_slice(&vec![sentinel; n + GUARD]);
    let n_u = n as u32;
    unsafe {
        launch(grid_stride(n, 3), || {
            elementwise::convert_f32_to_f16(xd.ptr(), out.ptr_mut().cast(), n_u)
        })
    };
    let got = out.to_vec();
    for (i, g) in got[n..].iter().enumerate() {
        assert_eq!(
            g.to_bits(),
            sentinel.to_bits(),
            "convert_f32_to_f16: element {} past the end written",
            n + i
        );
    }
    for (i, (&v, g)) in x.iter().zip(&got[..n]).enumerate() {
        let want = half::f16::from_f32(v);
        assert_eq!(
            g.to_bits(),
            want.to_bits(),
            "convert_f32_to_f16: element {i} ({v:e}) is {g} ({:#06x}), want {want} ({:#06x})",
            g.to_bits(),
            want.to_bits()
        );
    }
}

/// `convert_f16_to_f32`: random f16 bit patterns (subnormals, zeros, infinities; no NaN)
/// widened exactly (selftest tolerance 0).
#[test]
fn convert_f16_to_f32_is_exact() {
    let mut rng = Rng::new(115);
    let n = 1283;
    let x: Vec<half::f16> = (0..n)
        .map(|_| {
            loop {
                let h = half::f16::from_bits(rng.next_u64() as u16);
                if !h.is_nan() {
                    break h;
                }
            }
        })
        .collect();
    let xd = DeviceBuffer::from_slice(&x);
    let out = output(n);
    let n_u = n as u32;
    unsafe {
        launch(grid_stride(n, 3), || {
            elementwise::convert_f16_to_f32(xd.ptr().cast(), out.ptr_mut(), n_u)
        })
    };
    let got = read("convert_f16_to_f32", &out, n);
    let want: Vec<f32> = x.iter().map(|h| h.to_f32()).collect();
    assert_bits("convert_f16_to_f32 1283", &got, &want);
}
