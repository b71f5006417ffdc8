//! The LoRA kernels (`device/lora.rs`) against plain f64 references: the merge into an f32,
//! f16 or bf16 weight in place (`lora_patch_*`), and the unmerged path over a ragged batch
//! (`lora_shrink_segments_f32` into the `[n, max_rank]` scratch, then
//! `lora_expand_segments_f32`), with the host launchers' launch shapes (`cuda/lora.rs`) and
//! the GPU selftest's tolerances (`cuda/selftest.rs`, `lora`). Ranks 1 to 64; feature counts
//! that are not multiples of 32.
//!
//! The host restores a patched weight from a copy it kept (`CudaTensor::try_clone`, as the
//! CPU's `LoraBackup`), not with a kernel, so there is no restore kernel to check here.
#![cfg(kernel_emu)]

mod common;
use common::*;
use retouch_kernels_emu::lora;

/// Elements past the end of every written buffer, checked unchanged afterwards.
const GUARD: usize = 37;

/// `values` followed by [`GUARD`] sentinel values.
fn guarded<T: Copy>(values: &[T], sentinel: T) -> DeviceBuffer<T> {
    let mut v = values.to_vec();
    v.extend(std::iter::repeat_n(sentinel, GUARD));
    DeviceBuffer::from_slice(&v)
}

/// The first `n` elements of a [`guarded`] buffer, after checking its guard is unchanged.
fn unguarded<T: Copy + PartialEq + std::fmt::Debug>(
    what: &str,
    buf: &DeviceBuffer<T>,
    n: usize,
    sentinel: T,
) -> Vec<T> {
    let mut v = buf.to_vec();
    assert_eq!(v.len(), n + GUARD);
    for (i, g) in v[n..].iter().enumerate() {
        assert_eq!(
            *g,
            sentinel,
            "{what}: element {} past the end was written",
            n + i
        );
    }
    v.truncate(n);
    v
}

/// `scale * up @ down` for `up = [out, rank]`, `down = [rank, in]`, in f64: `[out, in]`.
fn delta(up: &[f32], down: &[f32], out: usize, inp: usize, rank: usize, scale: f32) -> Vec<f64> {
    let mut d = vec![0.0f64; out * inp];
    for o in 0..out {
        for c in 0..inp {
            let mut s = 0.0f64;
            for r in 0..rank {
                s += up[o * rank + r] as f64 * down[r * inp + c] as f64;
            }
            d[o * inp + c] = scale as f64 * s;
        }
    }
    d
}

/// (out, in, rank, scale): a single element and rank 1, a rank-7 and a rank-64 adapter on
/// widths that are not multiples of 32, and more elements than the capped grid's threads
/// (the stride loop runs several times).
const PATCHES: [(usize, usize, usize, f32); 5] = [
    (1, 3, 1, 0.75),
    (7, 45, 7, 0.75),
    (37, 77, 64, -1.25),
    (70, 33, 16, 0.75),
    (83, 29, 1, 2.5),
];

/// One patch case: the weight (f32 values, rounded to the storage type by the caller), and
/// the adapter.
struct Patch {
    out: usize,
    inp: usize,
    rank: usize,
    scale: f32,
    w: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

impl Patch {
    fn new(rng: &mut Rng, (out, inp, rank, scale): (usize, usize, usize, f32)) -> Patch {
        Patch {
            out,
            inp,
            rank,
            scale,
            w: rng.values(out * inp, -2.0, 2.0),
            up: rng.values(out * rank, -1.0, 1.0),
            down: rng.values(rank * inp, -1.0, 1.0),
        }
    }

    fn size(&self) -> String {
        format!(
            "{}x{} r{} scale {}",
            self.out, self.inp, self.rank, self.scale
        )
    }

    /// `w0 + scale * up @ down` in f64, for the weight as stored (`w0`, widened).
    fn reference(&self, w0: &[f32]) -> Vec<f64> {
        let d = delta(
            &self.up, &self.down, self.out, self.inp, self.rank, self.scale,
        );
        w0.iter().zip(d).map(|(&w, d)| w as f64 + d).collect()
    }

    /// Launches `lora_patch_*` on `w` as the host's `lora_patch` does (a 1-D grid-stride
    /// launch over `n = out * in`; here a capped grid so the stride loop runs).
    fn launch<T>(
        &self,
        kernel: unsafe fn(*mut T, *const f32, *const f32, u32, u32, u32, f32),
        w: &DeviceBuffer<T>,
    ) where
        T: Copy,
    {
        let (up, down) = (
            DeviceBuffer::from_slice(&self.up),
            DeviceBuffer::from_slice(&self.down),
        );
        let n = self.out * self.inp;
        let (n_u, inp_u, rank_u) = (n as u32, self.inp as u32, self.rank as u32);
        unsafe {
            launch(grid_stride(n, 3), || {
                kernel(
                    w.ptr_mut(),
                    up.ptr(),
                    down.ptr(),
                    n_u,
                    inp_u,
                    rank_u,
                    self.scale,
                )
            })
        };
    }
}

/// `lora_patch_f32`: `W += scale * up @ down` in place, every element against f64 (selftest
/// tolerance 1e-5), nothing past the weight written.
#[test]
fn lora_patch_f32_matches_the_reference() {
    let mut rng = Rng::new(11);
    for case in PATCHES {
        let p = Patch::new(&mut rng, case);
        let n = p.out * p.inp;
        let sentinel = 1234.5f32;
        let w = guarded(&p.w, sentinel);
        p.launch(lora::lora_patch_f32, &w);
        let what = format!("lora_patch_f32 {}", p.size());
        let got = unguarded(&what, &w, n, sentinel);
        assert_within(&what, &got, &p.reference(&p.w), 1e-5);
    }
}

/// `lora_patch_f16`: an f16 weight widened, patched in f32 and rounded once, against the
/// f64 patch of the stored weight (selftest tolerance 2e-3: f16's 11-bit significand).
#[test]
fn lora_patch_f16_matches_the_reference() {
    let mut rng = Rng::new(12);
    for case in PATCHES {
        let p = Patch::new(&mut rng, case);
        let n = p.out * p.inp;
        let stored = to_f16(&p.w);
        let w0: Vec<f32> = stored.iter().map(|h| h.to_f32()).collect();
        let sentinel = half::f16::from_f32(-777.0);
        let w = guarded(&stored, sentinel);
        p.launch(
            |w, up, down, n, inp, rank, scale| unsafe {
                lora::lora_patch_f16(w.cast(), up, down, n, inp, rank, scale)
            },
            &w,
        );
        let what = format!("lora_patch_f16 {}", p.size());
        let got: Vec<f32> = unguarded(&what, &w, n, sentinel)
            .iter()
            .map(|h| h.to_f32())
            .collect();
        assert_within(&what, &got, &p.reference(&w0), 2e-3);
    }
}

/// `lora_patch_bf16`: as the f16 patch for a bf16 weight (selftest tolerance 1.6e-2: bf16's
/// 8-bit significand).
#[test]
fn lora_patch_bf16_matches_the_reference() {
    let mut rng = Rng::new(13);
    for case in PATCHES {
        let p = Patch::new(&mut rng, case);
        let n = p.out * p.inp;
        let stored = to_bf16(&p.w);
        let w0: Vec<f32> = stored
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect();
        let sentinel = half::bf16::from_f32(-777.0).to_bits();
        let w = guarded(&stored, sentinel);
        p.launch(
            |w: *mut u16, up, down, n, inp, rank, scale| unsafe {
                lora::lora_patch_bf16(w.cast(), up, down, n, inp, rank, scale)
            },
            &w,
        );
        let what = format!("lora_patch_bf16 {}", p.size());
        let got: Vec<f32> = unguarded(&what, &w, n, sentinel)
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect();
        assert_within(&what, &got, &p.reference(&w0), 1.6e-2);
    }
}

/// `seg_of_row` of a row no segment owns (the kernels' and the host's `NO_SEGMENT`).
const NO_SEGMENT: u32 = u32::MAX;

/// One segment of an unmerged batch: its rows, its adapter (`down = [rank, in]`,
/// `up = [out, rank]`) and scale.
struct Segment {
    rows: std::ops::Range<usize>,
    rank: usize,
    down: Vec<f32>,
    up: Vec<f32>,
    scale: f32,
}

/// An unmerged batch: `x = [n, in]`, `y0 = [n, out]` and the segments.
struct Batch {
    n: usize,
    inp: usize,
    out: usize,
    x: Vec<f32>,
    y0: Vec<f32>,
    segments: Vec<Segment>,
}

impl Batch {
    /// As the selftest builds its cases: `n` is 3 past the last segment's rows, scale
    /// `0.5 + 0.25 i` for segment `i`.
    fn new(
        rng: &mut Rng,
        inp: usize,
        out: usize,
        segs: &[(std::ops::Range<usize>, usize)],
    ) -> Batch {
        let n = segs.iter().map(|(r, _)| r.end).max().unwrap_or(0) + 3;
        let segments = segs
            .iter()
            .enumerate()
            .map(|(i, (rows, rank))| Segment {
                rows: rows.clone(),
                rank: *rank,
                down: rng.values(rank * inp, -1.0, 1.0),
                up: rng.values(out * rank, -1.0, 1.0),
                scale: 0.5 + 0.25 * i as f32,
            })
            .collect();
        Batch {
            n,
            inp,
            out,
            x: rng.values(n * inp, -1.0, 1.0),
            y0: rng.values(n * out, -1.0, 1.0),
            segments,
        }
    }

    fn max_rank(&self) -> usize {
        self.segments.iter().map(|s| s.rank).max().unwrap_or(0)
    }

    fn size(&self) -> String {
        let segs: Vec<String> = self
            .segments
            .iter()
            .map(|s| format!("{:?} r{}", s.rows, s.rank))
            .collect();
        format!(
            "{}x{}->{} [{}]",
            self.n,
            self.inp,
            self.out,
            segs.join(", ")
        )
    }

    /// `tmp[i, r] = x[i] . down_s[r]` for each row `i` of segment `s` and `r < rank_s`, 0
    /// elsewhere (the host zero-fills the scratch), `[n, max_rank]`, in f64.
    fn tmp_reference(&self) -> Vec<f64> {
        let mr = self.max_rank();
        let mut tmp = vec![0.0f64; self.n * mr];
        for s in &self.segments {
            for i in s.rows.clone() {
                for r in 0..s.rank {
                    tmp[i * mr + r] = (0..self.inp)
                        .map(|c| self.x[i * self.inp + c] as f64 * s.down[r * self.inp + c] as f64)
                        .sum();
                }
            }
        }
        tmp
    }

    /// `y0[i, o] + scale_s * sum_r (x[i] . down_s[r]) up_s[o, r]` for the rows of segment
    /// `s`, `y0` for rows no segment owns; in f64 from the exact `tmp`.
    fn y_reference(&self) -> Vec<f64> {
        let mr = self.max_rank();
        let tmp = self.tmp_reference();
        let mut y: Vec<f64> = self.y0.iter().map(|&v| v as f64).collect();
        for s in &self.segments {
            for i in s.rows.clone() {
                for o in 0..self.out {
                    let acc: f64 = (0..s.rank)
                        .map(|r| tmp[i * mr + r] * s.up[o * s.rank + r] as f64)
                        .sum();
                    y[i * self.out + o] += s.scale as f64 * acc;
                }
            }
        }
        y
    }

    /// Runs the two launches as the host's `lora_segments` does (its segment tables, its
    /// shrink launch of `ceil(n * max_rank / 8)` blocks of 256 threads unless `shrink_blocks`
    /// caps it, the expand kernel grid-stride on a capped grid); returns `(tmp, y)`.
    fn run(&self, shrink_blocks: Option<u32>) -> (Vec<f32>, Vec<f32>) {
        let (n, mr) = (self.n, self.max_rank());
        let mut seg_of_row = vec![NO_SEGMENT; n];
        for (i, s) in self.segments.iter().enumerate() {
            seg_of_row[s.rows.clone()].fill(i as u32);
        }
        let ranks: Vec<u32> = self.segments.iter().map(|s| s.rank as u32).collect();
        let scales: Vec<f32> = self.segments.iter().map(|s| s.scale).collect();
        let downs: Vec<DeviceBuffer<f32>> = self
            .segments
            .iter()
            .map(|s| DeviceBuffer::from_slice(&s.down))
            .collect();
        let ups: Vec<DeviceBuffer<f32>> = self
            .segments
            .iter()
            .map(|s| DeviceBuffer::from_slice(&s.up))
            .collect();
        let down_table =
            DeviceBuffer::from_slice(&downs.iter().map(|b| b.address()).collect::<Vec<_>>());
        let up_table =
            DeviceBuffer::from_slice(&ups.iter().map(|b| b.address()).collect::<Vec<_>>());
        let (ranks_d, scales_d, seg_d) = (
            DeviceBuffer::from_slice(&ranks),
            DeviceBuffer::from_slice(&scales),
            DeviceBuffer::from_slice(&seg_of_row),
        );
        let x = DeviceBuffer::from_slice(&self.x);
        let tmp = guarded(&vec![0.0f32; n * mr], 4321.0f32);
        let y = guarded(&self.y0, -4321.0f32);
        let (n_u, inp_u, out_u, mr_u) = (n as u32, self.inp as u32, self.out as u32, mr as u32);
        let warps = n * mr;
        let host_blocks = warps.div_ceil(8).min(1 << 16) as u32;
        let blocks = shrink_blocks.map_or(host_blocks, |b| b.min(host_blocks));
        unsafe {
            launch(Launch::new([blocks, 1, 1], 256, 0), || {
                lora::lora_shrink_segments_f32(
                    x.ptr(),
                    down_table.ptr(),
                    ranks_d.ptr(),
                    seg_d.ptr(),
                    tmp.ptr_mut(),
                    n_u,
                    inp_u,
                    mr_u,
                )
            });
            launch(grid_stride(n * self.out, 3), || {
                lora::lora_expand_segments_f32(
                    tmp.ptr(),
                    up_table.ptr(),
                    ranks_d.ptr(),
                    scales_d.ptr(),
                    seg_d.ptr(),
                    y.ptr_mut(),
                    n_u,
                    out_u,
                    mr_u,
                )
            });
        }
        let what = format!("lora segments {}", self.size());
        (
            unguarded(&format!("{what} tmp"), &tmp, n * mr, 4321.0),
            unguarded(&format!("{what} y"), &y, n * self.out, -4321.0),
        )
    }

    /// Checks the scratch and the output (selftest tolerance 1e-4, `lora_segments`).
    fn check(&self, shrink_blocks: Option<u32>) {
        let (tmp, y) = self.run(shrink_blocks);
        let what = format!("{} (shrink blocks {shrink_blocks:?})", self.size());
        assert_within(
            &format!("lora_shrink_segments_f32 {what}"),
            &tmp,
            &self.tmp_reference(),
            1e-4,
        );
        assert_within(
            &format!("lora_expand_segments_f32 {what}"),
            &y,
            &self.y_reference(),
            1e-4,
        );
    }
}

/// Segments of ranks 7, 1 and 64 (one of a single row) with rows no segment owns between
/// and after them, on 45 -> 83 features: the host's launch shapes.
#[test]
fn lora_segments_ranks_1_7_64_match_the_reference() {
    let mut rng = Rng::new(21);
    Batch::new(&mut rng, 45, 83, &[(0..3, 7), (5..6, 1), (6..10, 64)]).check(None);
}

/// Narrow outputs (77 -> 3), and an empty segment holding the largest rank: the scratch's
/// row stride (`max_rank` 9) exceeds every rank used.
#[test]
fn lora_segments_with_an_empty_segment_of_the_largest_rank() {
    let mut rng = Rng::new(22);
    Batch::new(&mut rng, 77, 3, &[(0..1, 2), (1..7, 3), (7..7, 9)]).check(None);
}

/// The shrink kernel's warp-stride loop: one block (8 warps) for 22 x 16 (row, rank) pairs,
/// and two blocks, against the host's grid for the same batch.
#[test]
fn lora_shrink_segments_strides_over_the_work() {
    let mut rng = Rng::new(23);
    let b = Batch::new(&mut rng, 33, 40, &[(2..19, 16)]);
    b.check(None);
    b.check(Some(1));
    b.check(Some(2));
}
