//! Where an image of the tiny model's kind shows its shape: the box an edit mask covers when
//! the tiny model is scored (the same rule as `tools/train-tiny/eval_tiny.py`'s
//! `shape_boxes`). The model does not reliably put a shape where its caption says, so the
//! mask is drawn around what the template shows, as a user would.

use crate::pipeline::RgbImage;

/// How the box is found; the defaults are the evaluation script's.
#[derive(Clone, Copy, Debug)]
pub struct ShapeBoxRule {
    /// A pixel is part of the shape when some channel is this far from the image's median
    /// colour (0..=255; the script's 0.5 on [-1, 1]).
    pub threshold: f32,
    /// Rows and columns with fewer such pixels are background speckle.
    pub min_run: usize,
    /// Pixels added around the shape's extent.
    pub margin: usize,
    /// The box is grown to whole cells of this size (the VAE factor: latent positions).
    pub grid: usize,
}

impl Default for ShapeBoxRule {
    fn default() -> Self {
        ShapeBoxRule {
            threshold: 63.75,
            min_run: 3,
            margin: 3,
            grid: 4,
        }
    }
}

/// The shape's box `[x0, y0, x1, y1]` (end exclusive, on the grid), or None when no pixel
/// stands out from the background.
pub fn shape_box(image: &RgbImage, rule: ShapeBoxRule) -> Option<[usize; 4]> {
    let (w, h) = (image.width, image.height);
    if w == 0 || h == 0 || image.pixels.len() != w * h * 3 {
        return None;
    }
    // The background: shapes cover well under half the image, so the median is its colour.
    // The lower median, as torch.median takes it.
    let median: Vec<f32> = (0..3)
        .map(|c| {
            let mut v: Vec<u8> = image.pixels.iter().skip(c).step_by(3).copied().collect();
            let mid = (v.len() - 1) / 2;
            *v.select_nth_unstable(mid).1 as f32
        })
        .collect();
    let mut rows = vec![0usize; h];
    let mut cols = vec![0usize; w];
    for (i, px) in image.pixels.chunks_exact(3).enumerate() {
        let far = px
            .iter()
            .zip(&median)
            .any(|(&p, &m)| (p as f32 - m).abs() > rule.threshold);
        if far {
            rows[i / w] += 1;
            cols[i % w] += 1;
        }
    }
    let extent = |counts: &[usize]| {
        let first = counts.iter().position(|&n| n >= rule.min_run)?;
        let last = counts.iter().rposition(|&n| n >= rule.min_run)?;
        Some((first, last + 1))
    };
    let (y0, y1) = extent(&rows)?;
    let (x0, x1) = extent(&cols)?;
    let g = rule.grid.max(1);
    let lo = |v: usize| v.saturating_sub(rule.margin) / g * g;
    let hi = |v: usize, size: usize| ((v + rule.margin).min(size)).div_ceil(g) * g;
    Some([lo(x0), lo(y0), hi(x1, w).min(w), hi(y1, h).min(h)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_with_square(w: usize, h: usize, [x0, y0, x1, y1]: [usize; 4]) -> RgbImage {
        let mut pixels = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let inside = (x0..x1).contains(&x) && (y0..y1).contains(&y);
                pixels.extend_from_slice(if inside {
                    &[230, 40, 30]
                } else {
                    &[20, 60, 200]
                });
            }
        }
        RgbImage {
            width: w,
            height: h,
            pixels,
        }
    }

    #[test]
    fn finds_a_square_and_grows_it_to_the_grid() {
        let img = image_with_square(64, 64, [21, 10, 30, 17]);
        // x: 21-3 = 18 -> 16; 30+3 = 33 -> 36. y: 10-3 = 7 -> 4; 17+3 = 20 -> 20.
        assert_eq!(
            shape_box(&img, ShapeBoxRule::default()),
            Some([16, 4, 36, 20])
        );
    }

    #[test]
    fn ignores_speckles_and_clamps_to_the_image() {
        let mut img = image_with_square(64, 64, [58, 60, 64, 64]);
        // Two isolated bright pixels: rows/columns with fewer than 3 do not count.
        for &(x, y) in &[(3usize, 3usize), (40, 20)] {
            img.pixels[(y * 64 + x) * 3..][..3].copy_from_slice(&[255, 255, 255]);
        }
        assert_eq!(
            shape_box(&img, ShapeBoxRule::default()),
            Some([52, 56, 64, 64])
        );
    }

    #[test]
    fn a_flat_image_has_no_shape() {
        let img = image_with_square(32, 32, [0, 0, 0, 0]);
        assert_eq!(shape_box(&img, ShapeBoxRule::default()), None);
    }
}
