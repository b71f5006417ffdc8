//! FLOPs of one UNet step as the masked forward runs it. Per resolution level, a layer's
//! cost is linear in that level's active tokens: convolutions, projections and feed-forwards
//! compute rows for active positions only, self-attention queries are the active rows over
//! keys of every position (cached K/V fill the inactive ones), cross-attention queries are the
//! active rows over the prompt's tokens. Only the projection of the prompt into keys and
//! values is independent of the mask. Element-wise work (norms with cached statistics, adds,
//! activations) is left out: the fitted intercept and slope absorb it.
//! With every token active the count is the dense forward's.

use std::path::Path;

use retouch_models::unet::UNetConfig;

/// Per-level coefficients of one branch's UNet step (one sample of the CFG batch).
#[derive(Clone, Debug)]
pub struct StepFlops {
    /// FLOPs per active token of the layers linear in the active tokens.
    per_token: Vec<f64>,
    /// FLOPs per (active query, key position) pair of the self-attentions at each level.
    per_pair: Vec<f64>,
    /// FLOPs independent of the mask (the prompt's keys and values).
    fixed: f64,
}

/// Tokens per level of a `height x width` latent: each level halves the previous one,
/// rounding up, as the stride-2 convs (padding 1) and the token-set pooling do.
pub fn level_sizes(height: usize, width: usize, levels: usize) -> Vec<usize> {
    let (mut h, mut w) = (height, width);
    (0..levels)
        .map(|level| {
            if level > 0 {
                (h, w) = (h.div_ceil(2), w.div_ceil(2));
            }
            h * w
        })
        .collect()
}

impl StepFlops {
    /// Walks the UNet a config describes, block by block, in the order `UNet` builds it;
    /// `context_tokens` is the prompt length (the text encoder's positions).
    pub fn new(config: &UNetConfig, context_tokens: usize) -> Result<StepFlops, String> {
        let plan = config
            .plan(Path::new("unet/config.json"))
            .map_err(|e| e.to_string())?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let mut f = StepFlops {
            per_token: vec![0.0; n],
            per_pair: vec![0.0; n],
            fixed: 0.0,
        };
        let t = context_tokens as f64;
        let ctx = config.cross_attention_dim as f64;
        let conv3 = |cin: usize, cout: usize| 2.0 * 9.0 * (cin * cout) as f64;
        let resnet = |f: &mut StepFlops, level: usize, inp: usize, out: usize| {
            let shortcut = if inp == out {
                0.0
            } else {
                2.0 * (inp * out) as f64
            };
            f.per_token[level] += conv3(inp, out) + conv3(out, out) + shortcut;
        };
        let transformer = |f: &mut StepFlops, level: usize, c: usize, depth: usize| {
            let c = c as f64;
            // proj_in, proj_out: 2c^2 each.
            f.per_token[level] += 4.0 * c * c;
            for _ in 0..depth {
                // attn1 q,k,v,out (8c^2); attn2 q,out (4c^2); GEGLU feed-forward c->8c,
                // 4c->c (24c^2); cross-attention scores and mix over the prompt (4ct).
                f.per_token[level] += 36.0 * c * c + 4.0 * c * t;
                // Self-attention scores and mix: 4c per (query, key).
                f.per_pair[level] += 4.0 * c;
                // attn2's keys and values of the prompt.
                f.fixed += 2.0 * 2.0 * t * ctx * c;
            }
        };

        let k_in = (config.conv_in_kernel * config.conv_in_kernel) as f64;
        f.per_token[0] += 2.0 * k_in * (config.in_channels * ch[0]) as f64;
        let mut out_ch = ch[0];
        for (i, &block_ch) in ch.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = block_ch;
            for j in 0..plan.layers[i] {
                resnet(&mut f, i, if j == 0 { in_ch } else { out_ch }, out_ch);
                if plan.cross_attention[i] {
                    transformer(&mut f, i, out_ch, plan.depth[i]);
                }
            }
            if i + 1 < n {
                // The stride-2 conv computes the next level's active positions.
                f.per_token[i + 1] += conv3(out_ch, out_ch);
            }
        }
        let last = ch[n - 1];
        resnet(&mut f, n - 1, last, last);
        transformer(&mut f, n - 1, last, plan.depth[n - 1]);
        resnet(&mut f, n - 1, last, last);

        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        for i in 0..n {
            let level = n - 1 - i;
            let prev_out = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let layers = plan.layers[level] + 1;
            for j in 0..layers {
                let skip = if j == layers - 1 { in_ch } else { out_ch };
                let inp = if j == 0 { prev_out } else { out_ch };
                resnet(&mut f, level, inp + skip, out_ch);
                if plan.up_cross_attention[i] {
                    transformer(&mut f, level, out_ch, plan.depth[level]);
                }
            }
            if i + 1 < n {
                // Nearest 2x, then a 3x3 conv at the finer level.
                f.per_token[level - 1] += conv3(out_ch, out_ch);
            }
        }
        let k_out = (config.conv_out_kernel * config.conv_out_kernel) as f64;
        f.per_token[0] += 2.0 * k_out * (ch[0] * config.out_channels) as f64;
        Ok(f)
    }

    pub fn levels(&self) -> usize {
        self.per_token.len()
    }

    /// One branch's step with `active[l]` of `total[l]` tokens active at level `l`.
    /// Levels missing from either slice count as empty.
    pub fn step(&self, active: &[usize], total: &[usize]) -> f64 {
        let mut flops = self.fixed;
        for level in 0..self.levels() {
            let a = active.get(level).copied().unwrap_or(0) as f64;
            let n = total.get(level).copied().unwrap_or(0) as f64;
            flops += a * (self.per_token[level] + self.per_pair[level] * n);
        }
        flops
    }

    /// One branch's dense step.
    pub fn dense(&self, total: &[usize]) -> f64 {
        self.step(total, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> UNetConfig {
        serde_json::from_value(json).unwrap()
    }

    /// A one-level UNet: conv_in, one resnet, the mid block, two up resnets, conv_out.
    fn one_level() -> UNetConfig {
        config(serde_json::json!({
            "in_channels": 4, "out_channels": 4, "block_out_channels": [32],
            "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"],
            "layers_per_block": 1, "cross_attention_dim": 16, "attention_head_dim": 1,
            "norm_num_groups": 8,
        }))
    }

    fn tiny() -> UNetConfig {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/tiny/unet/config.json"
        );
        config(serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
    }

    #[test]
    fn dense_count_of_a_one_level_unet_by_hand() {
        let f = StepFlops::new(&one_level(), 77).unwrap();
        let (c, n, t, d) = (32.0, 64.0, 77.0, 16.0);
        let conv = |i: f64, o: f64| 18.0 * i * o;
        let resnet_same = conv(c, c) * 2.0;
        // Up resnets take (hidden, skip) concatenations of 2c channels.
        let resnet_up = conv(2.0 * c, c) + conv(c, c) + 2.0 * 2.0 * c * c;
        let transformer = 40.0 * c * c + 4.0 * c * t + 4.0 * c * n;
        let per_token = conv(4.0, c)
            + resnet_same
            + 2.0 * resnet_same
            + transformer
            + 2.0 * resnet_up
            + conv(c, 4.0);
        let want = n * per_token + 4.0 * t * d * c;
        let got = f.dense(&[64]);
        assert!((got - want).abs() < 1e-6 * want, "{got} vs {want}");
    }

    #[test]
    fn all_active_is_dense_and_fewer_active_tokens_cost_less() {
        let f = StepFlops::new(&tiny(), 77).unwrap();
        let total = level_sizes(16, 16, f.levels());
        assert_eq!(total, vec![256, 64, 16]);
        assert_eq!(f.step(&total, &total), f.dense(&total));
        let mut last = 0.0;
        for a0 in [1usize, 16, 64, 128, 256] {
            let active = [a0, a0.div_ceil(4), a0.div_ceil(16)];
            let flops = f.step(&active, &total);
            assert!(flops > last, "{a0}: {flops} <= {last}");
            last = flops;
        }
        assert!(last <= f.dense(&total));
        // A level alone also moves the count.
        assert!(f.step(&[10, 10, 10], &total) > f.step(&[10, 10, 9], &total));
        // The dense tiny UNet at 16x16 latents: tens of MFLOPs per branch.
        assert!((1e7..1e9).contains(&f.dense(&total)), "{}", f.dense(&total));
    }

    #[test]
    fn level_sizes_round_up() {
        assert_eq!(level_sizes(5, 3, 4), vec![15, 6, 2, 1]);
    }
}
