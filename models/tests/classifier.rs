//! The tiny model's shape classifier against PyTorch, on the fixture of
//! `tools/fixtures/classifier.py`: whole images and crops (enlarged and shrunk, at borders).

use std::path::PathBuf;

use retouch_kernels::{SafeTensorsFile, Tensor};
use retouch_models::classifier::{ShapeClassifier, View};
use retouch_models::pipeline::RgbImage;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/classifier")
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.as_slice::<i64>().unwrap().to_vec()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let (g, w) = (got.to_vec_f32(), want.to_vec_f32());
    let scale = w.iter().map(|v| v.abs()).sum::<f32>() / w.len() as f32;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (b.abs() + scale),
            "{what}: element {i} is {a}, PyTorch gives {b}"
        );
    }
}

#[test]
fn classifier_matches_pytorch_on_whole_images_and_crops() {
    let net = ShapeClassifier::load(fixture().join("model")).unwrap();
    let cases = SafeTensorsFile::open(fixture().join("cases.safetensors")).unwrap();
    let images_t = cases.get("images").unwrap();
    let [n, h, w, _] = images_t.shape().try_into().unwrap();
    let pixels: Vec<u8> = ints(&images_t).into_iter().map(|v| v as u8).collect();
    let images: Vec<RgbImage> = pixels
        .chunks(h * w * 3)
        .map(|p| RgbImage {
            width: w,
            height: h,
            pixels: p.to_vec(),
        })
        .collect();
    assert_eq!(images.len(), n);

    // Whole-image inputs are the top-left `image_size` square of each image.
    let s = net.image_size();
    let corners: Vec<RgbImage> = images
        .iter()
        .map(|img| RgbImage {
            width: s,
            height: s,
            pixels: (0..s)
                .flat_map(|y| img.pixels[y * w * 3..(y * w + s) * 3].iter().copied())
                .collect(),
        })
        .collect();
    let views: Vec<(&RgbImage, View)> = corners.iter().map(|c| (c, View::Whole)).collect();
    let want = cases.get("whole_logits").unwrap();
    assert_close("whole images", &net.logits(&views).unwrap(), &want);

    let boxes = ints(&cases.get("boxes").unwrap());
    let owners = ints(&cases.get("box_image").unwrap());
    let views: Vec<(&RgbImage, View)> = boxes
        .chunks(4)
        .zip(&owners)
        .map(|(b, &i)| {
            let b = [b[0], b[1], b[2], b[3]].map(|v| v as usize);
            (&images[i as usize], View::Region(b))
        })
        .collect();
    let want = cases.get("crop_logits").unwrap();
    assert_close("crops", &net.logits(&views).unwrap(), &want);

    // Labels come out per head, in the config's order.
    let predictions = net.classify(&views).unwrap();
    assert_eq!(predictions.len(), views.len());
    let heads: Vec<&str> = predictions[0]
        .labels
        .iter()
        .map(|(h, _)| h.as_str())
        .collect();
    assert_eq!(heads, ["shape", "colour", "background", "position", "size"]);
}

#[test]
fn classifier_rejects_wrong_sizes_and_empty_boxes() {
    let net = ShapeClassifier::load(fixture().join("model")).unwrap();
    let img = RgbImage {
        width: 20,
        height: 20,
        pixels: vec![7; 20 * 20 * 3],
    };
    assert!(net.logits(&[(&img, View::Whole)]).is_err());
    assert!(net.logits(&[(&img, View::Region([25, 0, 30, 5]))]).is_err());
    assert!(net.logits(&[(&img, View::Region([2, 3, 9, 9]))]).is_ok());
}
