use std::path::Path;

use retouch_kernels::Tensor;

use crate::{Error, Result};

/// An 8-bit RGB image, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    pub fn save_png(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        image::save_buffer(
            path,
            &self.pixels,
            self.width as u32,
            self.height as u32,
            image::ColorType::Rgb8,
        )
        .map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    pub fn encode_png(&self) -> Result<Vec<u8>> {
        let mut out = std::io::Cursor::new(Vec::new());
        image::write_buffer_with_format(
            &mut out,
            &self.pixels,
            self.width as u32,
            self.height as u32,
            image::ColorType::Rgb8,
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::Invalid(format!("PNG encoding failed: {e}")))?;
        Ok(out.into_inner())
    }
}

/// The VAE's output `[1, h, w, 3]` in about [-1, 1] to 8-bit RGB, as diffusers' image
/// processor does it: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.
pub fn latents_to_image(decoded: &Tensor) -> Result<RgbImage> {
    let s = decoded.shape();
    if s.len() != 4 || s[0] != 1 || s[3] != 3 {
        return Err(Error::Invalid(format!(
            "expected one RGB image [1, h, w, 3], got {s:?}"
        )));
    }
    let pixels = decoded
        .to_vec_f32()
        .iter()
        .map(|&v| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    Ok(RgbImage {
        width: s[2],
        height: s[1],
        pixels,
    })
}

impl RgbImage {
    /// Reads a PNG (any colour type) as 8-bit RGB.
    pub fn load_png(path: impl AsRef<Path>) -> Result<RgbImage> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        RgbImage::decode_png(&bytes).map_err(|e| Error::config(path, e.to_string()))
    }

    pub fn decode_png(bytes: &[u8]) -> Result<RgbImage> {
        let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
            .map_err(|e| Error::Invalid(format!("not a PNG image: {e}")))?
            .to_rgb8();
        Ok(RgbImage {
            width: img.width() as usize,
            height: img.height() as usize,
            pixels: img.into_raw(),
        })
    }
}
