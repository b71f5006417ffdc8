//! The shape classifier that ships with the tiny model (`models/tiny/classifier/`, trained by
//! tools/train-tiny/shape_classifier.py): reads shape, colour, background, position and size
//! from a whole image, or shape, colour and background from a masked region, to score what
//! the pipeline generates and edits.
//!
//! Net: conv3x3 stride 2 padding 1 + ReLU per `channels` entry; features = the last map
//! flattened in (C, H, W) order followed by its per-channel max over (H, W); fc1 + ReLU; fc2 to
//! the concatenated logits of the heads, in the config's order.

use std::fmt;
use std::path::Path;

use retouch_kernels::{Conv2dParams, Tensor};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::nn::{Conv2d, Linear, Scope};
use crate::pipeline::RgbImage;
use crate::weights::{Weights, read_json};
use crate::{Error, Result};

#[derive(Debug, Deserialize)]
struct ClassifierConfig {
    image_size: usize,
    channels: Vec<usize>,
    hidden: usize,
    heads: Heads,
}

/// The heads in file order (the logits are sliced in that order; a plain map would sort them).
#[derive(Debug)]
struct Heads(Vec<(String, Vec<String>)>);

impl<'de> Deserialize<'de> for Heads {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Heads, D::Error> {
        struct InOrder;
        impl<'de> Visitor<'de> for InOrder {
            type Value = Heads;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map from head name to its labels")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Heads, A::Error> {
                let mut heads = Vec::new();
                while let Some(entry) = map.next_entry::<String, Vec<String>>()? {
                    heads.push(entry);
                }
                Ok(Heads(heads))
            }
        }
        d.deserialize_map(InOrder)
    }
}

/// One image's answer: per head, the most likely label.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub labels: Vec<(String, String)>,
}

impl Prediction {
    pub fn get(&self, head: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(h, _)| h == head)
            .map(|(_, l)| l.as_str())
    }
}

pub struct ShapeClassifier {
    image_size: usize,
    heads: Vec<(String, Vec<String>)>,
    convs: Vec<Conv2d>,
    fc1: Linear,
    fc2: Linear,
}

impl ShapeClassifier {
    /// Loads `dir/config.json` and `dir/model.safetensors`.
    pub fn load(dir: impl AsRef<Path>) -> Result<ShapeClassifier> {
        let dir = dir.as_ref();
        let config: ClassifierConfig = read_json(&dir.join("config.json"))?;
        let side = config.image_size >> config.channels.len();
        if config.channels.is_empty()
            || side == 0
            || side << config.channels.len() != config.image_size
        {
            return Err(Error::Invalid(format!(
                "{}: image_size {} must be a multiple of 2^{} (one halving per conv)",
                dir.display(),
                config.image_size,
                config.channels.len()
            )));
        }
        let weights = Weights::open(dir, None)?;
        let root = Scope::root(&weights);
        let mut convs = Vec::with_capacity(config.channels.len());
        let mut cin = 3;
        for (i, &c) in config.channels.iter().enumerate() {
            convs.push(Conv2d::load(
                root.at(format!("convs.{i}")).scope(),
                cin,
                c,
                3,
                Conv2dParams::DOWN_3X3,
            )?);
            cin = c;
        }
        let features = cin * side * side + cin;
        let outputs = config.heads.0.iter().map(|(_, l)| l.len()).sum();
        Ok(ShapeClassifier {
            image_size: config.image_size,
            heads: config.heads.0,
            convs,
            fc1: Linear::load(root.at("fc1").scope(), features, config.hidden, true)?,
            fc2: Linear::load(root.at("fc2").scope(), config.hidden, outputs, true)?,
        })
    }

    pub fn image_size(&self) -> usize {
        self.image_size
    }

    /// The concatenated head logits `[n, outputs]` of the views.
    pub fn logits(&self, views: &[(&RgbImage, View)]) -> Result<Tensor> {
        let s = self.image_size;
        let mut data = Vec::with_capacity(views.len() * s * s * 3);
        for (image, view) in views {
            data.extend(self.input(image, *view)?);
        }
        let mut x = Tensor::from_vec(data, &[views.len(), s, s, 3])?;
        for conv in &self.convs {
            x = conv.forward(&x)?.relu()?;
        }
        let (n, c) = (x.dim(0)?, x.dim(-1)?);
        let area = x.elem_count() / (n * c);
        let flat = x.nhwc_to_nchw()?.reshape(&[n, c * area])?;
        let maxima = channel_max(&x, n, area, c)?;
        let features = Tensor::concat_last(&[&flat, &maxima])?;
        self.fc2.forward(&self.fc1.forward(&features)?.relu()?)
    }

    /// The most likely label of every head, per view. For a region, only the heads a crop can
    /// answer (shape, colour, background) are meaningful.
    pub fn classify(&self, views: &[(&RgbImage, View)]) -> Result<Vec<Prediction>> {
        let logits = self.logits(views)?;
        let width = logits.dim(-1)?;
        let values = logits.as_slice::<f32>()?;
        Ok(values
            .chunks(width)
            .map(|row| {
                let mut start = 0;
                let labels = self
                    .heads
                    .iter()
                    .map(|(head, labels)| {
                        let part = &row[start..start + labels.len()];
                        start += labels.len();
                        let best = (0..part.len())
                            .max_by(|&a, &b| part[a].total_cmp(&part[b]))
                            .unwrap_or(0);
                        (head.clone(), labels[best].clone())
                    })
                    .collect();
                Prediction { labels }
            })
            .collect())
    }

    /// The net's input for a view, channels-last in [-1, 1]: the whole image (which must have
    /// the input size), or a box of it resized to the input size as the training crops were
    /// (in floating point, no rounding).
    fn input(&self, image: &RgbImage, view: View) -> Result<Vec<f32>> {
        let s = self.image_size;
        let scaled = |p: &u8| f32::from(*p) / 127.5 - 1.0;
        match view {
            View::Whole => {
                if (image.width, image.height) != (s, s) {
                    return Err(Error::Invalid(format!(
                        "the classifier reads {s}x{s} images, got {}x{}",
                        image.width, image.height
                    )));
                }
                Ok(image.pixels.iter().map(scaled).collect())
            }
            View::Region([x0, y0, x1, y1]) => {
                // As the training script crops: at least 2 pixels each way where the image
                // allows, clipped to the image.
                let x1 = x1.max(x0 + 2).min(image.width);
                let y1 = y1.max(y0 + 2).min(image.height);
                if x1 <= x0 || y1 <= y0 {
                    return Err(Error::Invalid(format!(
                        "crop box {:?} is empty in a {}x{} image",
                        [x0, y0, x1, y1],
                        image.width,
                        image.height
                    )));
                }
                let plane: Vec<f32> = image.pixels.iter().map(scaled).collect();
                Ok(resize_box(&plane, image.width, (x0, y0, x1, y1), s, s))
            }
        }
    }
}

/// What the classifier looks at.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum View {
    Whole,
    /// The box `[x0, y0, x1, y1]` in pixels, end exclusive.
    Region([usize; 4]),
}

/// Per image and channel, the maximum over the map's positions: `[n, c]`.
fn channel_max(x: &Tensor, n: usize, area: usize, c: usize) -> Result<Tensor> {
    let values = x.as_slice::<f32>()?;
    let mut out = vec![f32::NEG_INFINITY; n * c];
    for (b, image) in values.chunks(area * c).enumerate() {
        for position in image.chunks(c) {
            for (m, &v) in out[b * c..(b + 1) * c].iter_mut().zip(position) {
                *m = m.max(v);
            }
        }
    }
    Ok(Tensor::from_vec(out, &[n, c])?)
}

/// Taps and weights of one output coordinate: PyTorch's antialiased bilinear interpolation
/// (`align_corners=False`): a triangle filter widened by the scale when shrinking, normalised,
/// which is plain bilinear when enlarging.
fn filter_taps(input: usize, output: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = input as f64 / output as f64;
    let support = scale.max(1.0);
    let inv = 1.0 / scale.max(1.0);
    (0..output)
        .map(|i| {
            let centre = scale * (i as f64 + 0.5);
            let lo = ((centre - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((centre + support + 0.5).floor() as usize).min(input);
            let mut w: Vec<f64> = (lo..hi)
                .map(|j| (1.0 - ((j as f64 - centre + 0.5) * inv).abs()).max(0.0))
                .collect();
            let total: f64 = w.iter().sum();
            w.iter_mut().for_each(|v| *v /= total);
            (lo, w)
        })
        .collect()
}

/// Resizes the box `(x0, y0, x1, y1)` of a channels-last RGB plane `width` pixels wide to
/// `out_w x out_h` (horizontal pass, then vertical, accumulating in f64).
fn resize_box(
    plane: &[f32],
    width: usize,
    (x0, y0, x1, y1): (usize, usize, usize, usize),
    out_w: usize,
    out_h: usize,
) -> Vec<f32> {
    let (bw, bh) = (x1 - x0, y1 - y0);
    let xs = filter_taps(bw, out_w);
    let ys = filter_taps(bh, out_h);
    let mut rows = vec![0.0f64; bh * out_w * 3];
    for y in 0..bh {
        let src = &plane[((y0 + y) * width + x0) * 3..];
        for (x, (lo, w)) in xs.iter().enumerate() {
            for c in 0..3 {
                rows[(y * out_w + x) * 3 + c] = w
                    .iter()
                    .enumerate()
                    .map(|(k, wk)| wk * f64::from(src[(lo + k) * 3 + c]))
                    .sum();
            }
        }
    }
    let mut out = vec![0.0f32; out_w * out_h * 3];
    for (y, (lo, w)) in ys.iter().enumerate() {
        for x in 0..out_w {
            for c in 0..3 {
                let v: f64 = w
                    .iter()
                    .enumerate()
                    .map(|(k, wk)| wk * rows[((lo + k) * out_w + x) * 3 + c])
                    .sum();
                out[(y * out_w + x) * 3 + c] = v as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enlarging_is_plain_bilinear_with_half_pixel_centres() {
        // 2 -> 4: output centres at input coordinates -0.25, 0.25, 0.75, 1.25.
        let taps = filter_taps(2, 4);
        let at = |i: usize| -> Vec<(usize, f64)> {
            let (lo, w) = &taps[i];
            w.iter()
                .enumerate()
                .map(|(k, &v)| (lo + k, v))
                .filter(|(_, v)| *v > 0.0)
                .collect()
        };
        assert_eq!(at(0), vec![(0, 1.0)]);
        assert_eq!(at(1), vec![(0, 0.75), (1, 0.25)]);
        assert_eq!(at(2), vec![(0, 0.25), (1, 0.75)]);
        assert_eq!(at(3), vec![(1, 1.0)]);
    }

    #[test]
    fn shrinking_by_two_averages_pairs_with_a_wider_triangle() {
        // 4 -> 2: output 0 is centred at input coordinate 1.0; inputs 0, 1, 2 (centres 0.5,
        // 1.5, 2.5) lie 0.25, 0.25, 0.75 filter widths away; input -1 is outside, so the
        // weights are renormalised over the three.
        let taps = filter_taps(4, 2);
        let (lo, w) = &taps[0];
        assert_eq!(*lo, 0);
        let want = [0.75 / 1.75, 0.75 / 1.75, 0.25 / 1.75];
        for (a, b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{w:?}");
        }
    }
}
