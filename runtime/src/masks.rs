//! Synthetic edit masks for measurements (`retouch quality`, `retouch replay`, the
//! balancer's start-up timing): ellipses of a given area at seeded positions, and boxes.

use retouch_models::pipeline::Mask;

/// A splitmix64 stream of uniform numbers in [0, 1): seeded, stable across platforms and
/// crate versions, so a seed names the same mask everywhere.
struct Uniform(u64);

impl Uniform {
    fn new(seed: u64) -> Uniform {
        Uniform(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// An ellipse covering about `ratio` of a `width x height` image, at a position and aspect
/// drawn from `seed`, inside the image.
pub fn ellipse_mask(width: usize, height: usize, ratio: f64, seed: u64) -> Mask {
    let mut uniform = Uniform::new(seed);
    let (w, h) = (width as f64, height as f64);
    let aspect = 0.7 + 0.7 * uniform.next();
    let area = ratio.clamp(0.0, 1.0) * w * h;
    let rx = (area / (std::f64::consts::PI * aspect)).sqrt().min(w / 2.0);
    let ry = (area / (std::f64::consts::PI * rx)).min(h / 2.0);
    let cx = rx + (w - 2.0 * rx) * uniform.next();
    let cy = ry + (h - 2.0 * ry) * uniform.next();
    let values = (0..height)
        .flat_map(|y| {
            (0..width).map(move |x| {
                let dx = (x as f64 + 0.5 - cx) / rx;
                let dy = (y as f64 + 0.5 - cy) / ry;
                if dx * dx + dy * dy <= 1.0 { 1.0 } else { 0.0 }
            })
        })
        .collect();
    Mask {
        width,
        height,
        values,
    }
}

/// A rectangle `[x0, y0, x1, y1]` (pixels, end exclusive) of a `width x height` mask.
pub fn box_mask(width: usize, height: usize, [x0, y0, x1, y1]: [usize; 4]) -> Mask {
    let values = (0..height)
        .flat_map(|y| {
            (0..width)
                .map(move |x| f32::from(u8::from((x0..x1).contains(&x) && (y0..y1).contains(&y))))
        })
        .collect();
    Mask {
        width,
        height,
        values,
    }
}

/// A centred box covering about `ratio` of the image (at least one pixel).
pub fn centred_box(width: usize, height: usize, ratio: f64) -> Mask {
    let scale = ratio.clamp(0.0, 1.0).sqrt();
    let bw = ((width as f64 * scale).round() as usize).clamp(1, width.max(1));
    let bh = ((height as f64 * scale).round() as usize).clamp(1, height.max(1));
    let (x0, y0) = ((width - bw) / 2, (height - bh) / 2);
    box_mask(width, height, [x0, y0, x0 + bw, y0 + bh])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ellipse_masks_cover_about_the_requested_share() {
        for (ratio, seed) in [(0.05, 1), (0.1, 2), (0.2, 3), (0.5, 4)] {
            let m = ellipse_mask(64, 64, ratio, seed);
            assert!((m.ratio() - ratio).abs() < 0.02, "{ratio}: {}", m.ratio());
        }
    }

    #[test]
    fn box_masks_cover_their_box() {
        let m = box_mask(8, 6, [2, 1, 5, 4]);
        assert_eq!(m.ratio(), 9.0 / 48.0);
        assert_eq!(m.values[8 + 2], 1.0);
        assert_eq!(m.values[8 + 5], 0.0);
    }

    #[test]
    fn centred_boxes_cover_about_the_requested_share() {
        for ratio in [0.05, 0.25, 1.0] {
            let m = centred_box(64, 64, ratio);
            assert!((m.ratio() - ratio).abs() < 0.01, "{ratio}: {}", m.ratio());
        }
        assert!(centred_box(8, 8, 0.0).ratio() > 0.0);
    }
}
