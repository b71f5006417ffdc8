//! The attention kernels (`device/attention.rs`: rows, tiles, flash f32 dense and masked;
//! `device/attention_mma.rs`: the f16 and bf16 tensor-core flash entries for heads of 40, 64,
//! 80 and 160, dense and masked) against a plain f64 `softmax(scale Q K^T) V`, each launched
//! as the host launchers (`src/cuda/attention.rs`) launch it, on lengths that leave partial
//! tiles (1, 37, 70, 130), several heads and batches, causal rows, ragged segments (each to
//! its own keys) and masked self-attention over cached f16 maps. Tolerances and the error
//! measure are the GPU selftest's (`src/cuda/selftest.rs`).
#![cfg(kernel_emu)]

mod common;
use common::*;
use half::f16;
use retouch_kernels_emu::{attention, attention_mma};
use std::ops::Range;

/// `(q, k, v, out, lq, lk, heads, d, scale, causal)`.
type DenseKernel =
    unsafe fn(*const f32, *const f32, *const f32, *mut f32, u32, u32, u32, u32, f32, u32);

/// `(q, k, v, cached_k, cached_v, row_of, tiles, segs, out, heads, d, scale, has_cache)`.
type MaskedKernel = unsafe fn(
    *const f32,
    *const f32,
    *const f32,
    *const u64,
    *const u64,
    *const u32,
    *const u32,
    *const u32,
    *mut f32,
    u32,
    u32,
    f32,
    u32,
);

/// The selftest's `attention_tol`: f32 kernels sum in another order; the tensor-core kernels
/// round their operands to f16 (or bf16, eight times coarser).
const F32_TOL: f32 = 1e-4;
const F16_TOL: f32 = 1e-2;
const BF16_TOL: f32 = 5e-2;

/// Inputs uniform in `[-1.7, 1.7)`: about unit variance, as the selftest's `randn`.
const SPREAD: f32 = 1.7;

/// `row_of` of an inactive grid position (`tokens::NOT_ACTIVE`).
const NOT_ACTIVE: u32 = u32::MAX;

// ---------------------------------------------------------------------------------------
// Launch shapes, as `src/cuda/attention.rs` computes them.

/// Query rows per block, threads per block and dynamic shared bytes of one launch.
#[derive(Clone, Copy, Debug)]
struct Config {
    rows_per_block: u32,
    threads: u32,
    shared_bytes: usize,
}

/// `SHARED_LIMIT_BYTES`: the default dynamic shared memory.
const SHARED_LIMIT_BYTES: usize = 48 * 1024;

/// `attention_rows_f32`: `ROW_WARPS = 4` warps, each a query and an accumulator.
fn rows_config(d: usize) -> Config {
    Config {
        rows_per_block: 4,
        threads: 128,
        shared_bytes: 4 * 2 * d * 4,
    }
}

/// `attention_tiles_f32`: the most warps (8, 4, 2, 1) whose tiles fit (`tile_warps`).
fn tiles_config(d: usize) -> Config {
    let floats = |w: usize| w * 2 * d + 32 * (d + 1) + 32 * d;
    let warps = [8, 4, 2, 1]
        .into_iter()
        .find(|&w| floats(w) * 4 <= SHARED_LIMIT_BYTES)
        .expect("the host runs the rows kernel for this width");
    Config {
        rows_per_block: warps as u32,
        threads: 32 * warps as u32,
        shared_bytes: floats(warps) * 4,
    }
}

/// `attention_flash_f32` / `attention_masked_flash_f32` (widths `flash_fits` takes).
fn flash_config(d: usize) -> Config {
    let bytes = d * (64 + 36 + 32) * 4;
    assert!(d > 0 && d.is_multiple_of(4) && d <= 80 && bytes <= SHARED_LIMIT_BYTES);
    Config {
        rows_per_block: 64,
        threads: 128,
        shared_bytes: bytes,
    }
}

/// `attention_flash_wide_f32` / `attention_masked_flash_wide_f32` (multiples of 4 up to
/// 160; past 80 their tiles need more than the default shared memory, which the host raises).
fn wide_flash_config(d: usize) -> Config {
    assert!(d > 0 && d.is_multiple_of(4) && d <= 160);
    Config {
        rows_per_block: 64,
        threads: 128,
        shared_bytes: d * (64 + 36 + 32) * 4,
    }
}

/// The tensor-core entries (`mma_shared_bytes`).
fn mma_config(d: usize) -> Config {
    let width = 16 * d.div_ceil(16);
    Config {
        rows_per_block: 64,
        threads: 128,
        shared_bytes: 2 * (64 * (width + 8) + d * 72),
    }
}

/// The host's `1 / sqrt(d)`, in f32.
fn scale_of(d: usize) -> f32 {
    1.0 / (d as f32).sqrt()
}

// ---------------------------------------------------------------------------------------
// The reference and the check.

/// `softmax_j(scale q . k_j) v_j` in f64 over the given (key, value) rows, each `q.len()` wide.
fn attend(q: &[f32], scale: f32, keys: &[(&[f32], &[f32])]) -> Vec<f64> {
    assert!(!keys.is_empty());
    let scores: Vec<f64> = keys
        .iter()
        .map(|(k, _)| {
            let dot: f64 = q.iter().zip(*k).map(|(&a, &b)| a as f64 * b as f64).sum();
            scale as f64 * dot
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut out = vec![0.0f64; q.len()];
    let mut total = 0.0f64;
    for ((_, v), s) in keys.iter().zip(&scores) {
        let p = (s - max).exp();
        total += p;
        for (o, &x) in out.iter_mut().zip(*v) {
            *o += p * x as f64;
        }
    }
    out.iter().map(|o| o / total).collect()
}

/// Fails unless every `got[i]` is within `tol * max(1, |want[i]|)` of `want[i]` (the
/// selftest's error measure), naming the worst element by row, head and channel; `want` must
/// not be all zeros. Prints the largest error.
fn check(what: &str, got: &[f32], want: &[f32], c: usize, d: usize, tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(
        want.iter().any(|&w| w != 0.0),
        "{what}: the reference is all zeros"
    );
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        // A NaN is the worst of all.
        let err = if err.is_nan() { f32::INFINITY } else { err };
        if worst.is_none_or(|(_, e)| err > e) {
            worst = Some((i, err));
        }
    }
    let (i, err) = worst.expect("no elements");
    eprintln!("{what}: largest error {err:.2e} (tolerance {tol:.0e})");
    assert!(
        err <= tol,
        "{what}: row {} head {} channel {} (element {i}) is {} where the reference has {}: \
         error {err:.3e} over the tolerance {tol}",
        i / c,
        (i % c) / d,
        (i % c) % d,
        got[i],
        want[i]
    );
}

/// Guard floats after each output buffer: a kernel writing past the output shows up.
const GUARD: usize = 67;
const SENTINEL: f32 = -12_345.5;

/// An output of `n` zeros (as the host's `CudaTensor::zeros`) and a guard of sentinels after
/// it; `run` gets the output pointer. Returns the `n` outputs once the guard is checked.
fn with_output(what: &str, n: usize, run: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut init = vec![0.0f32; n + GUARD];
    init[n..].fill(SENTINEL);
    let out = DeviceBuffer::from_slice(&init);
    run(out.ptr_mut());
    let mut all = out.to_vec();
    assert!(
        all[n..].iter().all(|&x| x == SENTINEL),
        "{what}: the kernel wrote past its output"
    );
    all.truncate(n);
    all
}

// ---------------------------------------------------------------------------------------
// Dense attention: `q = [batch, lq, c]`, `k = v = [batch, lk, c]`.

struct Dense {
    batch: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    d: usize,
    causal: bool,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Dense {
    fn new(rng: &mut Rng, (batch, lq, lk, heads, d, causal): DenseCase) -> Dense {
        let c = heads * d;
        Dense {
            batch,
            lq,
            lk,
            heads,
            d,
            causal,
            q: rng.values(batch * lq * c, -SPREAD, SPREAD),
            k: rng.values(batch * lk * c, -SPREAD, SPREAD),
            v: rng.values(batch * lk * c, -SPREAD, SPREAD),
        }
    }

    fn c(&self) -> usize {
        self.heads * self.d
    }

    fn name(&self, kernel: &str) -> String {
        format!(
            "{kernel} batch {} lq {} lk {} heads {} d {}{}",
            self.batch,
            self.lq,
            self.lk,
            self.heads,
            self.d,
            if self.causal { " causal" } else { "" }
        )
    }

    /// Query `i` of each sequence and head against its keys `0..lk`, or `0..=i` when causal.
    fn reference(&self) -> Vec<f32> {
        let (c, d) = (self.c(), self.d);
        let scale = scale_of(d);
        let mut out = vec![0.0f32; self.batch * self.lq * c];
        for b in 0..self.batch {
            for h in 0..self.heads {
                let cols = h * d..(h + 1) * d;
                let key_row = |j: usize| (b * self.lk + j) * c;
                for i in 0..self.lq {
                    let seen = if self.causal {
                        (i + 1).min(self.lk)
                    } else {
                        self.lk
                    };
                    let keys: Vec<(&[f32], &[f32])> = (0..seen)
                        .map(|j| {
                            let r = key_row(j);
                            (
                                &self.k[r + cols.start..r + cols.end],
                                &self.v[r + cols.start..r + cols.end],
                            )
                        })
                        .collect();
                    let r = (b * self.lq + i) * c;
                    let o = attend(&self.q[r + cols.start..r + cols.end], scale, &keys);
                    for (t, x) in o.into_iter().enumerate() {
                        out[r + cols.start + t] = x as f32;
                    }
                }
            }
        }
        out
    }

    /// The kernel under the host's launch: grid `(ceil(lq / rows_per_block), batch * heads)`.
    fn run(&self, name: &str, kernel: DenseKernel, cfg: Config) -> Vec<f32> {
        let (q, k, v) = (
            DeviceBuffer::from_slice(&self.q),
            DeviceBuffer::from_slice(&self.k),
            DeviceBuffer::from_slice(&self.v),
        );
        let grid = [
            (self.lq as u32).div_ceil(cfg.rows_per_block),
            (self.batch * self.heads) as u32,
            1,
        ];
        let (lq, lk, heads, d) = (
            self.lq as u32,
            self.lk as u32,
            self.heads as u32,
            self.d as u32,
        );
        let (scale, causal) = (scale_of(self.d), u32::from(self.causal));
        with_output(name, self.q.len(), |out| unsafe {
            launch(Launch::new(grid, cfg.threads, cfg.shared_bytes), || {
                kernel(
                    q.ptr(),
                    k.ptr(),
                    v.ptr(),
                    out,
                    lq,
                    lk,
                    heads,
                    d,
                    scale,
                    causal,
                )
            })
        })
    }

    fn check(&self, kernel_name: &str, kernel: DenseKernel, cfg: Config, tol: f32) {
        let what = self.name(kernel_name);
        let got = self.run(&what, kernel, cfg);
        check(&what, &got, &self.reference(), self.c(), self.d, tol);
    }
}

/// `(batch, lq, lk, heads, d, causal)`.
type DenseCase = (usize, usize, usize, usize, usize, bool);

// ---------------------------------------------------------------------------------------
// Ragged and masked attention: `q = [rows, c]`, segments of stacked query rows.

/// One segment as `FlashPlan` takes it: its query rows (also its output rows), its first
/// fresh key row and key count, and for masked self-attention the grid's position -> fresh
/// row map and the template's cached f16 keys and values `[key_len, c]`.
struct Segment {
    queries: Range<usize>,
    key_start: usize,
    key_len: usize,
    cache: Option<Cache>,
}

struct Cache {
    row_of: Vec<u32>,
    k: Vec<f16>,
    v: Vec<f16>,
}

/// A ragged or masked batch: `q = [rows, c]` stacked segments, the fresh `k`, `v`.
struct Segmented {
    heads: usize,
    d: usize,
    q: Vec<f32>,
    /// `[key_rows, c]`: the fresh keys and values (for masked attention the same rows as `q`).
    k: Vec<f32>,
    v: Vec<f32>,
    segments: Vec<Segment>,
    label: String,
}

impl Segmented {
    fn c(&self) -> usize {
        self.heads * self.d
    }

    /// Ragged cross-attention: segments of `counts[s]` query rows (stacked, one unused row
    /// between the first two) against key rows `keys[s]` of `[key_rows, c]`.
    fn ragged(
        rng: &mut Rng,
        heads: usize,
        d: usize,
        counts: &[usize],
        keys: &[Range<usize>],
    ) -> Segmented {
        let c = heads * d;
        let key_rows = keys.iter().map(|k| k.end).max().unwrap();
        let mut at = 0;
        let mut segments = Vec::new();
        for (s, (&n, keys)) in counts.iter().zip(keys).enumerate() {
            assert!(
                n == 0 || !keys.is_empty(),
                "the host refuses keyless queries"
            );
            segments.push(Segment {
                queries: at..at + n,
                key_start: keys.start,
                key_len: keys.len(),
                cache: None,
            });
            at += n + usize::from(s == 0);
        }
        Segmented {
            heads,
            d,
            q: rng.values(at * c, -SPREAD, SPREAD),
            k: rng.values(key_rows * c, -SPREAD, SPREAD),
            v: rng.values(key_rows * c, -SPREAD, SPREAD),
            segments,
            label: format!("ragged {counts:?} rows to keys {keys:?}"),
        }
    }

    /// Masked self-attention: per segment a grid of `grid_len` positions of which `active`
    /// (random, sorted) have fresh rows, stacked (one unused row between the first two); the
    /// others read the template's cached f16 keys and values.
    fn masked(rng: &mut Rng, heads: usize, d: usize, grids: &[(usize, usize)]) -> Segmented {
        let c = heads * d;
        let mut at = 0;
        let mut segments = Vec::new();
        for (s, &(grid_len, active)) in grids.iter().enumerate() {
            // `active` distinct positions, sorted: a partial Fisher-Yates shuffle.
            let mut order: Vec<usize> = (0..grid_len).collect();
            for i in 0..active {
                let j = i + rng.below(grid_len - i);
                order.swap(i, j);
            }
            let mut positions = order[..active].to_vec();
            positions.sort_unstable();
            let mut row_of = vec![NOT_ACTIVE; grid_len];
            for (row, &p) in positions.iter().enumerate() {
                row_of[p] = row as u32;
            }
            segments.push(Segment {
                queries: at..at + active,
                key_start: at,
                key_len: grid_len,
                cache: Some(Cache {
                    row_of,
                    k: to_f16(&rng.values(grid_len * c, -SPREAD, SPREAD)),
                    v: to_f16(&rng.values(grid_len * c, -SPREAD, SPREAD)),
                }),
            });
            at += active + usize::from(s == 0);
        }
        Segmented {
            heads,
            d,
            q: rng.values(at * c, -SPREAD, SPREAD),
            k: rng.values(at * c, -SPREAD, SPREAD),
            v: rng.values(at * c, -SPREAD, SPREAD),
            segments,
            label: format!("masked (grid, active) {grids:?}"),
        }
    }

    fn name(&self, kernel: &str) -> String {
        format!("{kernel} {} heads {} d {}", self.label, self.heads, self.d)
    }

    /// Each segment's queries against its keys: key `j` is fresh row `key_start + j`, or with
    /// a cache fresh row `key_start + row_of[j]` where position `j` is active, else row `j` of
    /// the cached maps. Rows outside every segment stay zero.
    fn reference(&self) -> Vec<f32> {
        let (c, d) = (self.c(), self.d);
        let scale = scale_of(d);
        let mut out = vec![0.0f32; self.q.len()];
        for seg in &self.segments {
            let widened = seg.cache.as_ref().map(|cache| {
                let w = |x: &[f16]| x.iter().map(|h| h.to_f32()).collect::<Vec<f32>>();
                (w(&cache.k), w(&cache.v))
            });
            for h in 0..self.heads {
                let cols = h * d..(h + 1) * d;
                let keys: Vec<(&[f32], &[f32])> = (0..seg.key_len)
                    .map(|j| {
                        let fresh = match &seg.cache {
                            None => Some(seg.key_start + j),
                            Some(cache) => (cache.row_of[j] != NOT_ACTIVE)
                                .then(|| seg.key_start + cache.row_of[j] as usize),
                        };
                        let (k, v, r): (&[f32], &[f32], usize) = match fresh {
                            Some(row) => (&self.k, &self.v, row),
                            None => {
                                let (k, v) = widened.as_ref().unwrap();
                                (k, v, j)
                            }
                        };
                        let at = r * c;
                        (
                            &k[at + cols.start..at + cols.end],
                            &v[at + cols.start..at + cols.end],
                        )
                    })
                    .collect();
                for row in seg.queries.clone() {
                    let at = row * c;
                    let o = attend(&self.q[at + cols.start..at + cols.end], scale, &keys);
                    for (t, x) in o.into_iter().enumerate() {
                        out[at + cols.start + t] = x as f32;
                    }
                }
            }
        }
        out
    }

    /// The kernel under `masked_flash`'s launch: `FlashPlan`'s tables (segments, tiles, maps)
    /// packed in one buffer, the cached maps' addresses in one table (keys then values; null
    /// without a cache), grid `(tiles, heads)`, block 128.
    fn run(&self, name: &str, kernel: MaskedKernel, cfg: Config) -> Vec<f32> {
        let (mut segs, mut tiles, mut row_of) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in self.segments.iter().enumerate() {
            let map_start = row_of.len() as u32;
            if let Some(cache) = &s.cache {
                row_of.extend_from_slice(&cache.row_of);
            }
            segs.extend_from_slice(&[
                s.queries.start as u32,
                s.queries.len() as u32,
                s.key_start as u32,
                s.key_len as u32,
                map_start,
            ]);
            for q0 in (0..s.queries.len()).step_by(cfg.rows_per_block as usize) {
                tiles.extend_from_slice(&[i as u32, q0 as u32]);
            }
        }
        let n_tiles = (tiles.len() / 2) as u32;
        assert!(n_tiles > 0);
        let tables = DeviceBuffer::from_slice(&[&segs[..], &tiles, &row_of].concat());
        let (segs_d, tiles_d, row_of_d) = unsafe {
            let base = tables.ptr();
            (
                base,
                base.add(segs.len()),
                base.add(segs.len() + tiles.len()),
            )
        };
        let has_cache = self.segments.iter().any(|s| s.cache.is_some());
        assert!(self.segments.iter().all(|s| s.cache.is_some() == has_cache));
        // The cached maps, and their address table (every segment's keys, then values).
        let maps: Vec<(DeviceBuffer<f16>, DeviceBuffer<f16>)> = self
            .segments
            .iter()
            .filter_map(|s| s.cache.as_ref())
            .map(|c| {
                (
                    DeviceBuffer::from_slice(&c.k),
                    DeviceBuffer::from_slice(&c.v),
                )
            })
            .collect();
        let addresses: Vec<u64> = maps
            .iter()
            .map(|m| m.0.address())
            .chain(maps.iter().map(|m| m.1.address()))
            .collect();
        let table = DeviceBuffer::from_slice(&addresses);
        let (cached_k, cached_v) = if has_cache {
            (table.ptr(), unsafe { table.ptr().add(maps.len()) })
        } else {
            (std::ptr::null(), std::ptr::null())
        };
        let (q, k, v) = (
            DeviceBuffer::from_slice(&self.q),
            DeviceBuffer::from_slice(&self.k),
            DeviceBuffer::from_slice(&self.v),
        );
        let (heads, d, scale) = (self.heads as u32, self.d as u32, scale_of(self.d));
        let grid = [n_tiles, heads, 1];
        with_output(name, self.q.len(), |out| unsafe {
            launch(Launch::new(grid, cfg.threads, cfg.shared_bytes), || {
                kernel(
                    q.ptr(),
                    k.ptr(),
                    v.ptr(),
                    cached_k,
                    cached_v,
                    row_of_d,
                    tiles_d,
                    segs_d,
                    out,
                    heads,
                    d,
                    scale,
                    u32::from(has_cache),
                )
            })
        })
    }

    fn check(&self, kernel_name: &str, kernel: MaskedKernel, cfg: Config, tol: f32) {
        let what = self.name(kernel_name);
        let got = self.run(&what, kernel, cfg);
        check(&what, &got, &self.reference(), self.c(), self.d, tol);
    }
}

// ---------------------------------------------------------------------------------------
// The f32 kernels.

/// `attention_rows_f32` (the host's choice for any width, 4 warps a block): one query, odd
/// widths (77, under and over 32 lanes), causal with `lq > lk`, batches and heads.
#[test]
fn rows_kernel_matches_the_reference() {
    let mut rng = Rng::new(11);
    let cases: [DenseCase; 4] = [
        (2, 21, 70, 2, 40, false),
        (1, 1, 130, 1, 77, false),
        (1, 70, 37, 2, 8, true),
        (2, 9, 33, 1, 160, true),
    ];
    for case in cases {
        let p = Dense::new(&mut rng, case);
        p.check(
            "attention_rows_f32",
            attention::attention_rows_f32,
            rows_config(p.d),
            F32_TOL,
        );
    }
}

/// `attention_tiles_f32` with the host's warps per block (8 for 40 and 77, 4 for 160): blocks
/// whose last warps lie past `lq`, causal blocks whose rows need different key counts.
#[test]
fn tiles_kernel_matches_the_reference() {
    let mut rng = Rng::new(12);
    let cases: [DenseCase; 4] = [
        (2, 21, 70, 2, 40, false),
        (1, 70, 70, 1, 77, true),
        (1, 21, 37, 2, 160, false),
        (1, 1, 130, 1, 8, false),
    ];
    for case in cases {
        let p = Dense::new(&mut rng, case);
        p.check(
            "attention_tiles_f32",
            attention::attention_tiles_f32,
            tiles_config(p.d),
            F32_TOL,
        );
    }
}

/// `attention_flash_f32` on the widths the host gives it (multiples of 4 up to 80: 40, 64, 80
/// and 12, whose last column chunk is partial): partial query blocks and key tiles, causal.
#[test]
fn flash_f32_matches_the_reference() {
    let mut rng = Rng::new(13);
    let cases: [DenseCase; 4] = [
        (2, 70, 37, 2, 40, false),
        (1, 130, 130, 1, 64, true),
        (1, 1, 70, 2, 80, false),
        (2, 37, 33, 1, 12, true),
    ];
    for case in cases {
        let p = Dense::new(&mut rng, case);
        p.check(
            "attention_flash_f32",
            attention::attention_flash_f32,
            flash_config(p.d),
            F32_TOL,
        );
    }
}

/// `attention_masked_flash_f32`, ragged (each segment to its own key rows: 77, a single key,
/// a segment without queries, 37) and masked over cached f16 maps (19 of 63 positions active,
/// all 72, a single one, none).
#[test]
fn masked_flash_f32_matches_the_reference() {
    let mut rng = Rng::new(14);
    let ragged = Segmented::ragged(
        &mut rng,
        2,
        40,
        &[70, 1, 0, 5],
        &[40..117, 0..1, 5..5, 3..40],
    );
    ragged.check(
        "attention_masked_flash_f32",
        attention::attention_masked_flash_f32,
        flash_config(40),
        F32_TOL,
    );
    let masked = Segmented::masked(&mut rng, 2, 32, &[(63, 19), (72, 72), (50, 1), (40, 0)]);
    masked.check(
        "attention_masked_flash_f32",
        attention::attention_masked_flash_f32,
        flash_config(32),
        F32_TOL,
    );
}

/// `attention_flash_wide_f32` on SD1.5's 160-wide heads and on widths whose last column
/// chunk is partial (100: four chunks, the last 4 wide; 84) or that leave chunks unused
/// (12): partial query blocks and key tiles, causal.
#[test]
fn flash_wide_f32_matches_the_reference() {
    let mut rng = Rng::new(15);
    let cases: [DenseCase; 4] = [
        (2, 70, 37, 2, 160, false),
        (1, 130, 70, 1, 100, true),
        (1, 33, 65, 3, 84, false),
        (1, 5, 9, 1, 12, true),
    ];
    for case in cases {
        let p = Dense::new(&mut rng, case);
        p.check(
            "attention_flash_wide_f32",
            attention::attention_flash_wide_f32,
            wide_flash_config(p.d),
            F32_TOL,
        );
    }
}

/// `attention_masked_flash_wide_f32`: ragged (160-wide heads, each segment to its own key
/// rows) and masked over cached f16 maps (132-wide heads).
#[test]
fn masked_flash_wide_f32_matches_the_reference() {
    let mut rng = Rng::new(16);
    let ragged = Segmented::ragged(
        &mut rng,
        2,
        160,
        &[70, 1, 0, 5],
        &[40..117, 0..1, 5..5, 3..40],
    );
    ragged.check(
        "attention_masked_flash_wide_f32",
        attention::attention_masked_flash_wide_f32,
        wide_flash_config(160),
        F32_TOL,
    );
    let masked = Segmented::masked(&mut rng, 1, 132, &[(63, 19), (72, 72), (50, 1), (40, 0)]);
    masked.check(
        "attention_masked_flash_wide_f32",
        attention::attention_masked_flash_wide_f32,
        wide_flash_config(132),
        F32_TOL,
    );
}

// ---------------------------------------------------------------------------------------
// The tensor-core kernels.

/// The dense f16 and bf16 entries per head width.
const MMA_DENSE: [(usize, DenseKernel, DenseKernel); 4] = [
    (
        40,
        attention_mma::attention_flash_mma_f16_d40,
        attention_mma::attention_flash_mma_bf16_d40,
    ),
    (
        64,
        attention_mma::attention_flash_mma_f16_d64,
        attention_mma::attention_flash_mma_bf16_d64,
    ),
    (
        80,
        attention_mma::attention_flash_mma_f16_d80,
        attention_mma::attention_flash_mma_bf16_d80,
    ),
    (
        160,
        attention_mma::attention_flash_mma_f16_d160,
        attention_mma::attention_flash_mma_bf16_d160,
    ),
];

/// The masked f16 and bf16 entries per head width.
const MMA_MASKED: [(usize, MaskedKernel, MaskedKernel); 4] = [
    (
        40,
        attention_mma::attention_masked_flash_mma_f16_d40,
        attention_mma::attention_masked_flash_mma_bf16_d40,
    ),
    (
        64,
        attention_mma::attention_masked_flash_mma_f16_d64,
        attention_mma::attention_masked_flash_mma_bf16_d64,
    ),
    (
        80,
        attention_mma::attention_masked_flash_mma_f16_d80,
        attention_mma::attention_masked_flash_mma_bf16_d80,
    ),
    (
        160,
        attention_mma::attention_masked_flash_mma_f16_d160,
        attention_mma::attention_masked_flash_mma_bf16_d160,
    ),
];

/// Dense cases per width (`d` filled in): partial 64-row blocks and 64-key tiles, several
/// key tiles, causal (also with `lq > lk`), batches and heads, a single query.
fn mma_dense_cases(d: usize) -> [DenseCase; 2] {
    let big = match d {
        40 => (2, 70, 130, 2, d, false),
        64 => (1, 130, 130, 1, d, true),
        80 => (2, 37, 70, 1, d, false),
        _ => (1, 70, 37, 2, d, true),
    };
    [big, (1, 1, 37, 1, d, false)]
}

fn mma_dense(half: usize, name: &str, tol: f32, seed: u64) {
    let mut rng = Rng::new(seed);
    for (d, f16_kernel, bf16_kernel) in MMA_DENSE {
        let kernel = [f16_kernel, bf16_kernel][half];
        for case in mma_dense_cases(d) {
            let p = Dense::new(&mut rng, case);
            p.check(&format!("{name}_d{d}"), kernel, mma_config(d), tol);
        }
    }
}

/// Cases per width (2 heads for 40 and 64, 1 for 80 and 160): ragged (keys of 77, 1 and 37;
/// a segment without queries) and masked over cached f16 maps (19 of 63 positions active;
/// all 72: two query blocks and two key tiles; a single one; none).
fn mma_masked(half: usize, name: &str, tol: f32, seed: u64) {
    let mut rng = Rng::new(seed);
    for (d, f16_kernel, bf16_kernel) in MMA_MASKED {
        let kernel = [f16_kernel, bf16_kernel][half];
        let heads = if d <= 64 { 2 } else { 1 };
        let name = format!("{name}_d{d}");
        let ragged = Segmented::ragged(
            &mut rng,
            heads,
            d,
            &[70, 1, 0, 5],
            &[40..117, 0..1, 5..5, 3..40],
        );
        ragged.check(&name, kernel, mma_config(d), tol);
        let masked = Segmented::masked(&mut rng, heads, d, &[(63, 19), (72, 72), (50, 1), (40, 0)]);
        masked.check(&name, kernel, mma_config(d), tol);
    }
}

/// `attention_flash_mma_f16_d{40,64,80,160}` (selftest tolerance 1e-2).
#[test]
fn flash_mma_f16_matches_the_reference() {
    mma_dense(0, "attention_flash_mma_f16", F16_TOL, 21);
}

/// `attention_flash_mma_bf16_d{40,64,80,160}` (selftest tolerance 5e-2).
#[test]
fn flash_mma_bf16_matches_the_reference() {
    mma_dense(1, "attention_flash_mma_bf16", BF16_TOL, 22);
}

/// `attention_masked_flash_mma_f16_d{40,64,80,160}`, ragged and masked (1e-2).
#[test]
fn masked_flash_mma_f16_matches_the_reference() {
    mma_masked(0, "attention_masked_flash_mma_f16", F16_TOL, 23);
}

/// `attention_masked_flash_mma_bf16_d{40,64,80,160}`, ragged and masked (5e-2).
#[test]
fn masked_flash_mma_bf16_matches_the_reference() {
    mma_masked(1, "attention_masked_flash_mma_bf16", BF16_TOL, 24);
}
