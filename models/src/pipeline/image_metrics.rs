//! Image quality metrics for edit reports: PSNR and SSIM between two RGB images, over the
//! whole image or over a weighted region (e.g. the pixels outside an edit mask).

use super::image::RgbImage;
use crate::{Error, Result};

/// PSNR of identical images (zero error) is infinite; reports cap it here so that averages
/// over cases stay finite.
pub const PSNR_CAP_DB: f64 = 100.0;

/// SSIM's Gaussian window: 11x11, sigma 1.5, as in Wang et al. (2004) and most libraries.
const WINDOW: usize = 11;
const SIGMA: f64 = 1.5;
const C1: f64 = (0.01 * 255.0) * (0.01 * 255.0);
const C2: f64 = (0.03 * 255.0) * (0.03 * 255.0);

fn check(a: &RgbImage, b: &RgbImage, region: Option<&[f32]>) -> Result<()> {
    if (a.width, a.height) != (b.width, b.height) {
        return Err(Error::Invalid(format!(
            "images differ in size: {}x{} and {}x{}",
            a.width, a.height, b.width, b.height
        )));
    }
    if let Some(r) = region
        && r.len() != a.width * a.height
    {
        return Err(Error::Invalid(format!(
            "region has {} weights for a {}x{} image",
            r.len(),
            a.width,
            a.height
        )));
    }
    Ok(())
}

/// Peak signal-to-noise ratio in dB over the pixels with weight > 0 in `region` (all pixels
/// when `None`), all three channels; capped at [`PSNR_CAP_DB`]. `None` when the region is empty.
pub fn psnr(a: &RgbImage, b: &RgbImage, region: Option<&[f32]>) -> Result<Option<f64>> {
    check(a, b, region)?;
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (i, (pa, pb)) in a.pixels.chunks(3).zip(b.pixels.chunks(3)).enumerate() {
        if region.is_some_and(|r| r[i] <= 0.0) {
            continue;
        }
        for (&x, &y) in pa.iter().zip(pb) {
            let d = f64::from(x) - f64::from(y);
            sum += d * d;
        }
        count += 3;
    }
    if count == 0 {
        return Ok(None);
    }
    let mse = sum / count as f64;
    Ok(Some(if mse == 0.0 {
        PSNR_CAP_DB
    } else {
        (10.0 * (255.0 * 255.0 / mse).log10()).min(PSNR_CAP_DB)
    }))
}

/// Mean structural similarity: the SSIM map (Gaussian 11x11 window, sigma 1.5, per channel,
/// channels averaged) at every pixel where the whole window fits, averaged over those whose
/// weight in `region` is > 0. `None` when no such pixel exists (image or region too small).
pub fn ssim(a: &RgbImage, b: &RgbImage, region: Option<&[f32]>) -> Result<Option<f64>> {
    check(a, b, region)?;
    let (w, h) = (a.width, a.height);
    if w < WINDOW || h < WINDOW {
        return Ok(None);
    }
    let kernel = gaussian_kernel();
    let (ow, oh) = (w - WINDOW + 1, h - WINDOW + 1);
    let mut map = vec![0.0f64; ow * oh];
    for channel in 0..3 {
        let plane = |img: &RgbImage| -> Vec<f64> {
            img.pixels
                .iter()
                .skip(channel)
                .step_by(3)
                .map(|&v| f64::from(v))
                .collect()
        };
        let (x, y) = (plane(a), plane(b));
        let product =
            |p: &[f64], q: &[f64]| -> Vec<f64> { p.iter().zip(q).map(|(u, v)| u * v).collect() };
        let mx = blur_valid(&x, w, h, &kernel);
        let my = blur_valid(&y, w, h, &kernel);
        let mxx = blur_valid(&product(&x, &x), w, h, &kernel);
        let myy = blur_valid(&product(&y, &y), w, h, &kernel);
        let mxy = blur_valid(&product(&x, &y), w, h, &kernel);
        for i in 0..map.len() {
            let (ux, uy) = (mx[i], my[i]);
            let vx = mxx[i] - ux * ux;
            let vy = myy[i] - uy * uy;
            let cov = mxy[i] - ux * uy;
            map[i] += ((2.0 * ux * uy + C1) * (2.0 * cov + C2))
                / ((ux * ux + uy * uy + C1) * (vx + vy + C2))
                / 3.0;
        }
    }
    let half = WINDOW / 2;
    let (mut sum, mut count) = (0.0, 0usize);
    for oy in 0..oh {
        for ox in 0..ow {
            let centre = (oy + half) * w + ox + half;
            if region.is_some_and(|r| r[centre] <= 0.0) {
                continue;
            }
            sum += map[oy * ow + ox];
            count += 1;
        }
    }
    Ok((count > 0).then(|| sum / count as f64))
}

fn gaussian_kernel() -> [f64; WINDOW] {
    let mut k = [0.0; WINDOW];
    let half = (WINDOW / 2) as f64;
    for (i, v) in k.iter_mut().enumerate() {
        let d = i as f64 - half;
        *v = (-d * d / (2.0 * SIGMA * SIGMA)).exp();
    }
    let total: f64 = k.iter().sum();
    k.map(|v| v / total)
}

/// Separable Gaussian blur keeping only the positions where the window fits.
fn blur_valid(plane: &[f64], w: usize, h: usize, k: &[f64; WINDOW]) -> Vec<f64> {
    let ow = w - WINDOW + 1;
    let mut rows = vec![0.0; ow * h];
    for y in 0..h {
        for x in 0..ow {
            rows[y * ow + x] = (0..WINDOW).map(|i| k[i] * plane[y * w + x + i]).sum();
        }
    }
    let oh = h - WINDOW + 1;
    let mut out = vec![0.0; ow * oh];
    for y in 0..oh {
        for x in 0..ow {
            out[y * ow + x] = (0..WINDOW).map(|i| k[i] * rows[(y + i) * ow + x]).sum();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: usize, h: usize, f: impl Fn(usize, usize, usize) -> u8) -> RgbImage {
        let mut pixels = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    pixels.push(f(x, y, c));
                }
            }
        }
        RgbImage {
            width: w,
            height: h,
            pixels,
        }
    }

    fn noise(seed: u64) -> impl Fn(usize, usize, usize) -> u8 {
        move |x, y, c| {
            let mut v = (x as u64 * 73_856_093) ^ (y as u64 * 19_349_663) ^ (c as u64 * 83_492_791);
            v = v.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(seed);
            (v >> 56) as u8
        }
    }

    #[test]
    fn psnr_matches_its_definition() {
        let a = image(13, 7, noise(1));
        let b = image(13, 7, |x, y, c| noise(1)(x, y, c).saturating_add(4));
        let mse: f64 = a
            .pixels
            .iter()
            .zip(&b.pixels)
            .map(|(&p, &q)| (f64::from(p) - f64::from(q)).powi(2))
            .sum::<f64>()
            / a.pixels.len() as f64;
        let want = 10.0 * (255.0f64 * 255.0 / mse).log10();
        let got = psnr(&a, &b, None).unwrap().unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert_eq!(psnr(&a, &a, None).unwrap(), Some(PSNR_CAP_DB));
    }

    #[test]
    fn psnr_over_a_region_ignores_the_rest() {
        let a = image(9, 9, noise(2));
        // b differs only in the left half; the region is the right half.
        let b = image(9, 9, |x, y, c| {
            let v = noise(2)(x, y, c);
            if x < 4 { v ^ 0x55 } else { v }
        });
        let right: Vec<f32> = (0..81)
            .map(|i| if i % 9 >= 4 { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(psnr(&a, &b, Some(&right)).unwrap(), Some(PSNR_CAP_DB));
        assert!(psnr(&a, &b, None).unwrap().unwrap() < 30.0);
        assert_eq!(psnr(&a, &b, Some(&[0.0; 81])).unwrap(), None);
    }

    #[test]
    fn ssim_is_one_for_equal_images_and_drops_with_noise() {
        let a = image(32, 24, |x, y, c| ((x * 7 + y * 3 + c * 40) % 256) as u8);
        assert!((ssim(&a, &a, None).unwrap().unwrap() - 1.0).abs() < 1e-12);
        let b = image(32, 24, |x, y, c| {
            let v = ((x * 7 + y * 3 + c * 40) % 256) as i32;
            (v + i32::from(noise(3)(x, y, c) % 61) - 30).clamp(0, 255) as u8
        });
        let s = ssim(&a, &b, None).unwrap().unwrap();
        assert!(s > 0.0 && s < 0.95, "{s}");
        // Too small for one window.
        let tiny = image(8, 8, noise(4));
        assert_eq!(ssim(&tiny, &tiny, None).unwrap(), None);
    }

    /// SSIM against a direct, unseparated evaluation of the formula at one position.
    #[test]
    fn ssim_matches_a_direct_window_sum() {
        let (w, h) = (11, 11);
        let a = image(w, h, noise(5));
        let b = image(w, h, noise(6));
        let k = gaussian_kernel();
        let mut want = 0.0;
        for c in 0..3 {
            let (mut ux, mut uy, mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for y in 0..h {
                for x in 0..w {
                    let g = k[x] * k[y];
                    let p = f64::from(a.pixels[(y * w + x) * 3 + c]);
                    let q = f64::from(b.pixels[(y * w + x) * 3 + c]);
                    ux += g * p;
                    uy += g * q;
                    sxx += g * p * p;
                    syy += g * q * q;
                    sxy += g * p * q;
                }
            }
            let (vx, vy, cov) = (sxx - ux * ux, syy - uy * uy, sxy - ux * uy);
            want += ((2.0 * ux * uy + C1) * (2.0 * cov + C2))
                / ((ux * ux + uy * uy + C1) * (vx + vy + C2))
                / 3.0;
        }
        let got = ssim(&a, &b, None).unwrap().unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
}
