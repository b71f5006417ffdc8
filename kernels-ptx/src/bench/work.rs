//! What each benchmark case computes, independent of the device: its shapes, its FLOPs and
//! the bytes its operands must move.

use super::rect_token_set;

/// The work of one benchmark case. Maps are channels-last; masked cases use a centred
/// rectangle of about `ratio` of the positions ([`rect_token_set`]) and an f16 cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Work {
    /// `[m, k] x [n, k]^T` (a linear layer without bias).
    Linear { m: usize, k: usize, n: usize },
    /// A 3x3 conv, stride 1, same padding, with bias.
    Conv3x3 {
        batch: usize,
        side: usize,
        cin: usize,
        cout: usize,
    },
    /// The same conv on the active positions of one `side x side x c` map, the halo read
    /// from the cache.
    MaskedConv3x3 { side: usize, c: usize, ratio: f64 },
    /// Self-attention over `tokens` tokens of width `c`.
    Attention {
        batch: usize,
        tokens: usize,
        c: usize,
        heads: usize,
    },
    /// The active queries of a `side x side` map against fresh keys where active and cached
    /// ones elsewhere.
    MaskedAttention {
        side: usize,
        c: usize,
        heads: usize,
        ratio: f64,
    },
    /// Group norm followed by SiLU over `[batch, side, side, c]`.
    GroupNormSilu {
        batch: usize,
        side: usize,
        c: usize,
        groups: usize,
    },
    /// Layer norm of `[rows, c]`.
    LayerNorm { rows: usize, c: usize },
    /// GEGLU: `[rows, 2 c]` to `[rows, c]`.
    Geglu { rows: usize, c: usize },
    /// Elementwise sum of two tensors of `len` values.
    Add { len: usize },
    /// A rank-`rank` LoRA merged in place into an f16 `[out, inp]` weight.
    LoraPatch { out: usize, inp: usize, rank: usize },
}

const F32: f64 = 4.0;
const F16: f64 = 2.0;

impl Work {
    /// Floating-point operations of one run (multiply-add = 2); 0 for data movement.
    pub fn flops(&self) -> f64 {
        match *self {
            Work::Linear { m, k, n } => 2.0 * (m * k * n) as f64,
            Work::Conv3x3 {
                batch,
                side,
                cin,
                cout,
            } => 2.0 * (batch * side * side * 9 * cin * cout) as f64,
            Work::MaskedConv3x3 { side, c, ratio } => {
                2.0 * (rect_token_set(side, side, ratio).len() * 9 * c * c) as f64
            }
            Work::Attention {
                batch, tokens, c, ..
            } => 4.0 * (batch * tokens * tokens * c) as f64,
            // Each active query meets every token once: cached where inactive, fresh where
            // active.
            Work::MaskedAttention { side, c, ratio, .. } => {
                let n = rect_token_set(side, side, ratio).len();
                4.0 * (n * side * side * c) as f64
            }
            Work::GroupNormSilu { .. }
            | Work::LayerNorm { .. }
            | Work::Geglu { .. }
            | Work::Add { .. } => 0.0,
            Work::LoraPatch { out, inp, rank } => 2.0 * (out * inp * rank) as f64,
        }
    }

    /// Bytes of one run if every operand were read once and every result written once:
    /// activations f32, caches f16, weights `weight_bytes` per value (a LoRA's target is
    /// f16). Achieved GB/s are these bytes over the time; kernels that read an operand
    /// twice (group norm's statistics pass) or stage tiles through shared memory move more.
    pub fn bytes(&self, weight_bytes: f64) -> f64 {
        match *self {
            Work::Linear { m, k, n } => {
                (m * k + m * n) as f64 * F32 + (n * k) as f64 * weight_bytes
            }
            Work::Conv3x3 {
                batch,
                side,
                cin,
                cout,
            } => {
                (batch * side * side * (cin + cout) + cout) as f64 * F32
                    + (9 * cin * cout) as f64 * weight_bytes
            }
            Work::MaskedConv3x3 { side, c, ratio } => {
                let tokens = rect_token_set(side, side, ratio);
                let halo = halo_len(side, tokens.positions());
                (2 * tokens.len() * c + c) as f64 * F32
                    + (halo * c) as f64 * F16
                    + (9 * c * c) as f64 * weight_bytes
            }
            Work::Attention {
                batch, tokens, c, ..
            } => (4 * batch * tokens * c) as f64 * F32,
            Work::MaskedAttention { side, c, ratio, .. } => {
                let n = rect_token_set(side, side, ratio).len();
                (4 * n * c) as f64 * F32 + (2 * (side * side - n) * c) as f64 * F16
            }
            Work::GroupNormSilu { batch, side, c, .. } => {
                (2 * batch * side * side * c + 2 * c) as f64 * F32
            }
            Work::LayerNorm { rows, c } => (2 * rows * c + 2 * c) as f64 * F32,
            Work::Geglu { rows, c } => (3 * rows * c) as f64 * F32,
            Work::Add { len } => (3 * len) as f64 * F32,
            Work::LoraPatch { out, inp, rank } => {
                (2 * out * inp) as f64 * F16 + ((out + inp) * rank) as f64 * F32
            }
        }
    }

    /// Whether the case's weights are a layer's GEMM operand (linear or conv), whose stored
    /// width depends on the device's GEMM backend.
    pub fn has_gemm_weight(&self) -> bool {
        matches!(
            self,
            Work::Linear { .. } | Work::Conv3x3 { .. } | Work::MaskedConv3x3 { .. }
        )
    }

    /// The shapes, for the report.
    pub fn shape(&self) -> String {
        match *self {
            Work::Linear { m, k, n } => format!("[{m},{k}] x [{n},{k}]^T"),
            Work::Conv3x3 {
                batch,
                side,
                cin,
                cout,
            } => format!("[{batch},{side},{side},{cin}] -> {cout}"),
            Work::MaskedConv3x3 { side, c, ratio } => {
                let active = rect_token_set(side, side, ratio).len();
                format!("{active} of {side}x{side}x{c}, f16 cache")
            }
            Work::Attention {
                batch,
                tokens,
                c,
                heads,
            } => format!("[{batch},{tokens},{c}] {heads} heads"),
            Work::MaskedAttention { side, c, ratio, .. } => {
                let n = rect_token_set(side, side, ratio).len();
                format!("{n} of {} tokens x {c}, f16 cache", side * side)
            }
            Work::GroupNormSilu {
                batch,
                side,
                c,
                groups,
            } => format!("[{batch},{side},{side},{c}] {groups} groups"),
            Work::LayerNorm { rows, c } => format!("[{rows},{c}]"),
            Work::Geglu { rows, c } => format!("[{rows},{}] -> [{rows},{c}]", 2 * c),
            Work::Add { len } => format!("{len} values"),
            Work::LoraPatch { out, inp, rank } => format!("[{out},{inp}] f16, rank {rank}"),
        }
    }
}

/// Positions outside `active` (sorted) with an active neighbour in their 3x3 window: the
/// cached values a masked 3x3 conv reads.
pub fn halo_len(side: usize, active: &[u32]) -> usize {
    let is_active = |y: isize, x: isize| {
        (0..side as isize).contains(&y)
            && (0..side as isize).contains(&x)
            && active
                .binary_search(&((y as usize * side + x as usize) as u32))
                .is_ok()
    };
    let mut halo = 0;
    for y in 0..side as isize {
        for x in 0..side as isize {
            if is_active(y, x) {
                continue;
            }
            let near = (-1..=1).any(|dy| (-1..=1).any(|dx| is_active(y + dy, x + dx)));
            halo += usize::from(near);
        }
    }
    halo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halo_of_a_square_is_its_ring() {
        // A 3x3 square in the middle of 8x8: the 5x5 around it less the square.
        let active: Vec<u32> = (3..6)
            .flat_map(|y| (3..6).map(move |x| (y * 8 + x) as u32))
            .collect();
        assert_eq!(halo_len(8, &active), 25 - 9);
        // At a corner the ring is clipped: 3x3 around (0, 0) less the position itself.
        assert_eq!(halo_len(8, &[0]), 3);
        assert_eq!(halo_len(8, &[]), 0);
    }

    #[test]
    fn flops_and_bytes_count_each_operand() {
        let linear = Work::Linear { m: 3, k: 5, n: 7 };
        assert_eq!(linear.flops(), 210.0);
        assert_eq!(linear.bytes(2.0), (15.0 + 21.0) * 4.0 + 35.0 * 2.0);
        let add = Work::Add { len: 10 };
        assert_eq!((add.flops(), add.bytes(4.0)), (0.0, 120.0));
        // A full mask reads no cache: every neighbour is fresh.
        let full = Work::MaskedConv3x3 {
            side: 4,
            c: 2,
            ratio: 1.0,
        };
        assert_eq!(full.bytes(4.0), (2.0 * 16.0 * 2.0 + 2.0) * 4.0 + 36.0 * 4.0);
        let lora = Work::LoraPatch {
            out: 4,
            inp: 6,
            rank: 2,
        };
        assert_eq!(lora.flops(), 96.0);
        assert_eq!(lora.bytes(4.0), 48.0 * 2.0 + 20.0 * 4.0);
    }
}
